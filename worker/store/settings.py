"""StoreSettings: how to reach S3-compatible storage and how big the local caches may grow.

Built once per process by `StoreSettings.from_env()` from these variables:

| variable | default | meaning |
|---|---|---|
| LORAFLEET_S3_ENDPOINT | 127.0.0.1:9000 | host:port of the S3 API (MinIO, AWS, ...) |
| LORAFLEET_S3_ACCESS_KEY, LORAFLEET_S3_SECRET_KEY | (none) | credentials |
| LORAFLEET_S3_ACCESS_KEY_FILE, ..._SECRET_KEY_FILE | (none) | the same, read from files (docker secrets) |
| LORAFLEET_S3_SECURE | 0 | 1 = HTTPS with certificate checks (0 fits a MinIO on a private network) |
| LORAFLEET_S3_CA_FILE | certifi's bundle | CA bundle for HTTPS |
| LORAFLEET_S3_REGION | (none) | region; without one the client asks the server |
| LORAFLEET_S3_TIMEOUT | 30 | seconds to wait on a read from the store |
| LORAFLEET_CACHE_DIR | ~/.cache/lorafleet | disk cache of adapters and base models |
| LORAFLEET_CACHE_DISK_BYTES | 20G | bound of the adapter disk cache (least recently used evicted) |
| LORAFLEET_CACHE_HOST_BYTES | 8G | bound of adapters held in host memory by a worker |
| LORAFLEET_MAX_ADAPTER_BYTES | 2G | largest adapter the control plane accepts |

Byte sizes take a suffix K, M, G or T (powers of 1024).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1 << 30
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def parse_bytes(text: str, field_name: str = "size") -> int:
    """'512M' -> 536870912; plain integers are bytes."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{field_name} {text!r} is not a size (e.g. 1048576, 512M, 20G)")
    power = " KMGT".index(match[2].upper() or " ")
    return int(float(match[1]) * 1024**power)


@dataclass(frozen=True)
class StoreSettings:
    """Where the object store is and what the local caches may hold; see the module docstring."""

    endpoint: str = "127.0.0.1:9000"
    access_key: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)
    secure: bool = False
    ca_file: str | None = None
    region: str | None = None
    timeout: float = 30.0
    cache_dir: Path = field(default_factory=lambda: Path("~/.cache/lorafleet").expanduser())
    cache_disk_bytes: int = 20 * GiB
    cache_host_bytes: int = 8 * GiB
    max_adapter_bytes: int = 2 * GiB

    def __post_init__(self) -> None:
        if not self.endpoint or "/" in self.endpoint:
            raise ValueError(f"endpoint must be host:port without a scheme or path, not {self.endpoint!r}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0, not {self.timeout!r}")
        for name in ("cache_disk_bytes", "cache_host_bytes", "max_adapter_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StoreSettings:
        """Settings from LORAFLEET_* variables; unset ones keep their defaults."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        text = {
            "endpoint": "LORAFLEET_S3_ENDPOINT",
            "region": "LORAFLEET_S3_REGION",
            "ca_file": "LORAFLEET_S3_CA_FILE",
        }
        for name, var in text.items():
            if env.get(var):
                values[name] = env[var]
        for name, var in (
            ("access_key", "LORAFLEET_S3_ACCESS_KEY"),
            ("secret_key", "LORAFLEET_S3_SECRET_KEY"),
        ):
            secret = _secret(env, var)
            if secret is not None:
                values[name] = secret
        if "LORAFLEET_S3_SECURE" in env:
            values["secure"] = _flag(env["LORAFLEET_S3_SECURE"], "LORAFLEET_S3_SECURE")
        if env.get("LORAFLEET_S3_TIMEOUT"):
            values["timeout"] = float(env["LORAFLEET_S3_TIMEOUT"])
        if env.get("LORAFLEET_CACHE_DIR"):
            values["cache_dir"] = Path(env["LORAFLEET_CACHE_DIR"]).expanduser()
        sizes = {
            "cache_disk_bytes": "LORAFLEET_CACHE_DISK_BYTES",
            "cache_host_bytes": "LORAFLEET_CACHE_HOST_BYTES",
            "max_adapter_bytes": "LORAFLEET_MAX_ADAPTER_BYTES",
        }
        for name, var in sizes.items():
            if env.get(var):
                values[name] = parse_bytes(env[var], var)
        return cls(**values)  # type: ignore[arg-type]


def _secret(env: Mapping[str, str], var: str) -> str | None:
    """A credential from VAR, else from the file named by VAR_FILE (trailing newline dropped)."""
    if env.get(var):
        return env[var]
    path = env.get(f"{var}_FILE")
    if not path:
        return None
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"{var}_FILE={path!r} cannot be read: {exc}") from exc


def _flag(text: str, var: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{var}={text!r} must be 1 or 0")
