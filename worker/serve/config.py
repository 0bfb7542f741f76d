"""WorkerConfig: every setting of a `lorafleet worker` process, built once from flags or environment."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lorafleet.producer.config import ENV_PREFIX, env_settings
from lorafleet.producer.keys import DEFAULT_NAMESPACE, check_client_id, check_namespace


@dataclass(frozen=True)
class WorkerConfig:
    """Settings of one worker process; each field also reads LORAFLEET_<FIELD> from the environment."""

    model: str  # a Hugging Face model directory
    adapters: str  # a folder of PEFT adapters, one sub-folder per adapter name
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = DEFAULT_NAMESPACE
    name: str = ""  # worker id; default: host-pid-random
    device: str = "cpu"
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    max_loras: int = 8
    max_rank: int = 64
    max_batch: int = 64
    kv_cache_tokens: int = 0  # 0: sized from free memory
    visibility_timeout: float = 30.0  # a pending job idle this long is claimed by another worker
    max_deliveries: int = 3  # past this many deliveries a job goes to the dead-letter stream
    drain_timeout: float = 30.0  # on SIGTERM, finish in-flight jobs for at most this long
    heartbeat_interval: float = 1.0
    heartbeat_ttl: float = 10.0
    idle_block: float = 0.5  # longest blocking wait on the wake stream (keep below max_wait)
    max_wait: float = 2.0  # starvation bound of the scheduler
    metrics_port: int = 0  # Prometheus endpoint; 0 = off
    prefix_cache: bool = True  # reuse KV blocks of cached prompt prefixes; LORAFLEET_NO_PREFIX_CACHE=1: off
    # steps on one adapter run its shrink inside the base GEMMs (engine/fold.py); LORAFLEET_NO_FOLD=1: off
    fold_single_adapter: bool = True
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        name = "".join(c if c.isalnum() or c in "._-" else "-" for c in self.name)[:64]
        object.__setattr__(self, "name", name.lstrip("."))
        check_client_id(self.name, "name")
        check_namespace(self.namespace)
        if not self.model:
            raise ValueError("model must name a model directory")
        if not self.adapters:
            raise ValueError("adapters must name an adapter folder")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda[:N], not {self.device!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, not {self.dtype!r}")
        positive = (
            "max_loras", "max_rank", "max_batch", "max_deliveries", "visibility_timeout", "drain_timeout",
            "heartbeat_interval", "heartbeat_ttl", "idle_block", "max_wait",
        )  # fmt: skip
        for field_name in positive:
            if getattr(self, field_name) <= 0:
                raise ValueError(f"{field_name} must be > 0, not {getattr(self, field_name)!r}")
        if self.kv_cache_tokens < 0 or not 0 <= self.metrics_port <= 65535:
            raise ValueError("kv_cache_tokens must be >= 0 and metrics_port in 0..65535")
        if self.heartbeat_ttl <= self.heartbeat_interval:
            raise ValueError("heartbeat_ttl must be longer than heartbeat_interval")

    @classmethod
    def from_env(
        cls, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> WorkerConfig:
        """Fields from LORAFLEET_* variables, then `overrides` (e.g. command-line flags that were given)."""
        values = env_settings(cls, env)
        for field_name, variable in (("prefix_cache", "NO_PREFIX_CACHE"), ("fold_single_adapter", "NO_FOLD")):
            raw = (os.environ if env is None else env).get(f"{ENV_PREFIX}{variable}", "")
            if raw:  # LORAFLEET_NO_*: a switch that turns a default-on feature off
                values[field_name] = not _switch(f"{ENV_PREFIX}{variable}", raw)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        for required in ("model", "adapters"):
            if required not in values:
                raise ValueError(f"{required} is required (--{required} or {ENV_PREFIX}{required.upper()})")
        return cls(**values)

    @property
    def torch_dtype(self) -> Any:
        """The torch dtype of the model weights."""
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)


def _switch(variable: str, raw: str) -> bool:
    """An on/off variable: 1/true/yes/on or 0/false/no/off (any case); ValueError naming it otherwise."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{variable}={raw!r} is not on/off (1, true, yes, on / 0, false, no, off)")
