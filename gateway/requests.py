"""OpenAI request bodies -> job parameters, checked field by field (400s name the field).

Both endpoints take the sampling fields OpenAI defines that a job can honour (max_tokens,
temperature, top_p, seed, stop, user, n = 1) and, through the client's ``extra_body`` (which the
`openai` client merges into the top level of the body), ``top_k``, ``priority``, ``deadline``
(unix seconds) and vLLM's ``ignore_eos``. Fields OpenAI defines that lorafleet cannot honour are
accepted only at their neutral value (``n: 1``, ``logprobs: false``, ``frequency_penalty: 0``,
...), so a client that sends defaults works and one that asks for more gets a clear 400 rather
than a silent difference.
Any other field is an error too: a misspelt ``max_token`` must not be ignored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lorafleet.gateway.errors import invalid
from lorafleet.producer.protocol import (
    MAX_NEW_TOKENS,
    MAX_PRIORITY,
    MAX_SEED,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_TOP_K,
    MIN_PRIORITY,
)

CHAT, COMPLETION = "chat", "completion"
MAX_USER_CHARS = 256
MAX_MESSAGES = 1024
ROLES = frozenset({"system", "developer", "user", "assistant"})
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat has none (the job's 128)

# OpenAI fields accepted only at these values (None always counts as unset).
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v == 1 and not isinstance(v, bool),
    "logprobs": lambda v: v is False,
    "top_logprobs": lambda v: v == 0 and not isinstance(v, bool),
    "frequency_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "presence_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "logit_bias": lambda v: v == {},
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "parallel_tool_calls": lambda v: isinstance(v, bool),
    "response_format": lambda v: v == {"type": "text"},
    "store": lambda v: v is False,
    "service_tier": lambda v: v in ("auto", "default"),
    "echo": lambda v: v is False,
    "best_of": lambda v: v == 1 and not isinstance(v, bool),
    "suffix": lambda v: v == "",
}
_COMMON = frozenset(
    {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop", "user"}
    | {"top_k", "priority", "deadline", "ignore_eos"}
)
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}
_CHAT_NEUTRAL = frozenset(_NEUTRAL) - {"echo", "best_of", "suffix"}
_COMPLETION_FIELDS = _COMMON | {"prompt"}
_COMPLETION_NEUTRAL = frozenset(
    {"n", "logprobs", "frequency_penalty", "presence_penalty", "logit_bias", "echo", "best_of", "suffix"}
)


@dataclass(frozen=True)
class GenerationRequest:
    """One checked request: what to run (`spec`, the job parameters but the adapter) and how to answer."""

    kind: str  # CHAT | COMPLETION
    model: str
    spec: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    user: str | None = None


def parse_request(kind: str, body: Mapping[str, Any], request_timeout: float) -> GenerationRequest:
    """Check an OpenAI request body of `kind` and build the job parameters (400 naming the field)."""
    _check_fields(body, _CHAT_FIELDS if kind == CHAT else _COMPLETION_FIELDS, _CHAT_NEUTRAL if kind == CHAT
                  else _COMPLETION_NEUTRAL)  # fmt: skip
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required: an adapter name, name@version or the base model's name", "model")
    spec = _prompt_spec(kind, body)
    spec.update(_sampling(kind, body))
    spec.update(_scheduling(body, request_timeout))
    stream = _optional_bool(body, "stream") or False
    include_usage = _stream_options(body.get("stream_options"), stream)
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > MAX_USER_CHARS):
        raise invalid(f"user must be a string of at most {MAX_USER_CHARS} characters", "user")
    spec["stream"] = stream
    return GenerationRequest(kind, model, spec, stream, include_usage, user)


def _check_fields(body: Mapping[str, Any], known: frozenset[str], neutral: frozenset[str]) -> None:
    for name, value in body.items():
        if name in known:
            continue
        if name in neutral:
            if value is not None and not _NEUTRAL[name](value):
                raise invalid(f"{name}={_short(value)} is not supported by this server", name, "unsupported")
            continue
        raise invalid(f"unknown field {name!r}", name, "unknown_field")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _prompt_spec(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    if kind == CHAT:
        return {"messages": _messages(body.get("messages"))}
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("prompt must not be empty", "prompt")
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        return {"prompt_ids": prompt}
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise invalid("one prompt per request: batches of prompts are not supported", "prompt", "unsupported")
    raise invalid("prompt must be a non-empty string or a list of token ids", "prompt")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_MESSAGES:
        raise invalid(f"messages must be a list of 1..{MAX_MESSAGES} messages", "messages")
    out = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object with role and content", where)
        unknown = sorted(set(message) - {"role", "content", "name"})
        if unknown:
            raise invalid(f"{where} has an unknown field {unknown[0]!r}", f"{where}.{unknown[0]}")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(sorted(ROLES))}", f"{where}.role")
        out.append({"role": role, "content": _content(message.get("content"), f"{where}.content")})
    return out


def _content(value: Any, where: str) -> str:
    """Text content: a string, or a list of ``{"type": "text", "text": ...}`` parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for index, part in enumerate(value):
            is_text = isinstance(part, dict) and part.get("type") == "text"
            if not (is_text and isinstance(part.get("text"), str)):
                raise invalid(f"{where}[{index}] must be a text part (only text is supported)", where)
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"{where} must be a string or a list of text parts", where)


def _sampling(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    max_tokens = _optional_int(body, "max_tokens", 1, MAX_NEW_TOKENS)
    if kind == CHAT:
        completion = _optional_int(body, "max_completion_tokens", 1, MAX_NEW_TOKENS)
        if max_tokens is not None and completion is not None and max_tokens != completion:
            raise invalid("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        max_tokens = completion if completion is not None else max_tokens
    elif max_tokens is None:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    if max_tokens is not None:
        spec["max_new_tokens"] = max_tokens
    temperature = _optional_number(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        spec["temperature"] = temperature
    top_p = _optional_number(body, "top_p", 0.0, 1.0)
    if top_p is not None:
        if top_p == 0:
            raise invalid("top_p must be in (0, 1]", "top_p")
        spec["top_p"] = top_p
    for name, hi in (("seed", MAX_SEED), ("top_k", MAX_TOP_K)):
        value = _optional_int(body, name, 0, hi)
        if value is not None:
            spec[name] = value
    stop = _stop(body.get("stop"))
    if stop:
        spec["stop"] = stop
    if _optional_bool(body, "ignore_eos"):  # vLLM's extension: generate max_tokens whatever comes
        spec["ignore_eos"] = True
    return spec


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOP:
        raise invalid(f"stop must be a string or a list of at most {MAX_STOP} strings", "stop")
    for item in stops:
        if not isinstance(item, str) or not 1 <= len(item) <= MAX_STOP_CHARS:
            raise invalid(f"each stop string must have 1..{MAX_STOP_CHARS} characters", "stop")
    return list(stops)


def _scheduling(body: Mapping[str, Any], request_timeout: float) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    priority = _optional_int(body, "priority", MIN_PRIORITY, MAX_PRIORITY)
    if priority is not None:
        spec["priority"] = priority
    now = time.time()
    deadline = _optional_number(body, "deadline", 0.0, math.inf)
    if deadline is not None and deadline <= now:
        raise invalid(f"deadline {deadline} (unix seconds) is in the past", "deadline")
    # No job waits for ever: without a deadline the gateway's request timeout is the job's.
    spec["deadline"] = min(deadline, now + request_timeout) if deadline is not None else now + request_timeout
    return spec


def _stream_options(value: Any, stream: bool) -> bool:
    if value is None:
        return False
    if not stream:
        raise invalid("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(value, dict) or set(value) - {"include_usage"}:
        raise invalid("stream_options may hold only include_usage", "stream_options")
    include = value.get("include_usage", False)
    if not isinstance(include, bool):
        raise invalid("stream_options.include_usage must be a boolean", "stream_options.include_usage")
    return include


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_bool(body: Mapping[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(f"{name} must be a boolean, not {type(value).__name__}", name)
    return value


def _optional_int(body: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or not lo <= value <= hi:
        raise invalid(f"{name} must be an integer in {lo}..{hi}, got {_short(value)}", name)
    return int(value)


def _optional_number(body: Mapping[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        bound = f"{lo:g}..{hi:g}" if hi != math.inf else f">= {lo:g}"
        raise invalid(f"{name} must be a number in {bound}, got {_short(value)}", name)
    return float(value)
