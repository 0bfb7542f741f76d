"""The producer's settings: one dataclass, validated once, built from keywords or the environment.

`env_settings` is the one reader of LORAFLEET_<FIELD> variables; the worker's and the control plane's
settings objects use it too (the worker may import the producer, never the reverse).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from lorafleet.producer.keys import DEFAULT_NAMESPACE, check_client_id, check_namespace
from lorafleet.producer.protocol import DEFAULT_REPLY_TTL, MAX_REPLY_TTL

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
ENV_PREFIX = "LORAFLEET_"


@dataclass(frozen=True)
class ProducerConfig:
    """Settings of a `Producer` / `AsyncProducer` (and of `lorafleet submit`).

    redis_url: where Redis is; the client pins RESP2 unless the URL asks for ``protocol=3``.
    namespace: prefix of every key (docs/protocol.md, "Keys").
    client_id: names this client's reply stream; a random one when None. Give a stable id to read
        replies of jobs submitted before a restart.
    max_waiting_per_adapter: backpressure limit on the length of one adapter's job stream
        (waiting + running jobs); 0 disables it. Over it, submit raises `QueueFull`.
    reply_ttl: seconds the reply stream lives after the last reply written to it.
    dedup_ttl: seconds a job id stays reserved (its idempotency key) after submission.
    cancel_ttl: seconds a cancel marker lives when the job has no deadline.
    socket_timeout: seconds for every ordinary command (connect included).
    max_block: longest single blocking read (XREAD BLOCK) in seconds; the reader's socket timeout
        is max_block + socket_timeout, so blocking reads never time out spuriously.
    wake_maxlen: approximate length the wake-up stream is trimmed to.
    """

    redis_url: str = DEFAULT_REDIS_URL
    namespace: str = DEFAULT_NAMESPACE
    client_id: str | None = None
    max_waiting_per_adapter: int = 10_000
    reply_ttl: int = DEFAULT_REPLY_TTL
    dedup_ttl: int = 3600
    cancel_ttl: int = 3600
    socket_timeout: float = 5.0
    max_block: float = 10.0
    wake_maxlen: int = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.redis_url, str) or not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError(
                f"redis_url must start with redis://, rediss:// or unix://, got {self.redis_url!r}"
            )
        check_namespace(self.namespace)
        if self.client_id is not None:
            check_client_id(self.client_id)
        check_int("max_waiting_per_adapter", self.max_waiting_per_adapter, 0)
        check_int("reply_ttl", self.reply_ttl, 1, MAX_REPLY_TTL)
        check_int("dedup_ttl", self.dedup_ttl, 1)
        check_int("cancel_ttl", self.cancel_ttl, 1)
        check_positive("socket_timeout", self.socket_timeout)
        check_positive("max_block", self.max_block)
        check_int("wake_maxlen", self.wake_maxlen, 1)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ProducerConfig:
        """Settings from ``LORAFLEET_<FIELD>`` variables (e.g. LORAFLEET_REDIS_URL), then `overrides`."""
        return cls().with_settings(**env_settings(cls, env)).with_settings(**overrides)

    def redis_options(self, *, blocking: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``Redis.from_url`` (sync or asyncio) of one of the client's connections.

        RESP2 is pinned (a URL with ``?protocol=3`` still wins; replies are parsed for both). The
        blocking reader's socket timeout exceeds the longest block, so XREAD BLOCK never times out
        on the socket before Redis answers.
        """
        timeout = self.max_block + self.socket_timeout if blocking else self.socket_timeout
        return {"protocol": 2, "socket_timeout": timeout, "socket_connect_timeout": self.socket_timeout}

    def with_settings(self, **settings: Any) -> ProducerConfig:
        """A copy with some fields replaced; an unknown name raises TypeError naming it."""
        known = {f.name for f in fields(self)}
        for name in settings:
            if name not in known:
                raise TypeError(f"unknown producer setting {name!r} (known: {', '.join(sorted(known))})")
        return replace(self, **settings) if settings else self


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    """Raise ValueError naming `name` unless `value` is an integer (not a bool) in lo..hi."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    """Raise ValueError naming `name` unless `value` is a finite number of seconds above 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def redis_target(
    redis_url: str | None = None, namespace: str | None = None, env: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """The Redis URL and namespace a command works on: its flags where given, else LORAFLEET_REDIS_URL
    and LORAFLEET_NAMESPACE, else the defaults; validated as a producer's are. Every command resolves
    them here, so that they all agree."""
    values = env_settings(ProducerConfig, env, names=("redis_url", "namespace"))
    values.update({k: v for k, v in (("redis_url", redis_url), ("namespace", namespace)) if v})
    config = ProducerConfig(**values)
    return config.redis_url, config.namespace


_PARSERS: dict[str, Callable[[str], Any]] = {"str": str, "int": int, "float": float}


def env_settings(
    config_class: type[Any], env: Mapping[str, str] | None = None, names: Collection[str] | None = None
) -> dict[str, Any]:
    """The fields of the dataclass `config_class` that LORAFLEET_<FIELD> variables of `env` (default:
    the process's) set, each parsed to its field's type; `names` limits the fields read.

    Every settings object of lorafleet reads its environment here: `ProducerConfig`, the worker's
    `WorkerConfig` and the control plane's `ControlConfig`. Fields typed str, int or float (or one of
    them ``| None``) are read, others never; an empty variable counts as unset. A value that does not
    parse raises ValueError naming the variable.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(config_class):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        kind = annotation.split("|")[0].strip()
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw and kind in _PARSERS and (names is None or f.name in names):
            try:
                values[f.name] = _PARSERS[kind](raw)
            except ValueError:
                raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind}") from None
    return values
