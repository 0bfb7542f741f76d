"""lorafleet replies -> OpenAI response objects (chat.completion, text_completion and their chunks).

Every response names the adapter version that served it: ``model`` is ``name@version`` for an
adapter (the base model's name otherwise), and ``system_fingerprint`` carries the same, so that a
client can tell which version answered even when it asked for a bare name.
"""

from __future__ import annotations

import time
from typing import Any

from lorafleet.gateway.requests import CHAT
from lorafleet.producer.protocol import FinishReason, Result, Usage

# OpenAI has two finish reasons for a normal end: "stop" (EOS or a stop sequence) and "length".
_FINISH: dict[str, str] = {
    FinishReason.STOP: "stop",
    FinishReason.STOP_STRING: "stop",
    FinishReason.LENGTH: "length",
}


def finish_reason(result: Result) -> str:
    """OpenAI's finish_reason of a result."""
    return _FINISH.get(result.finish_reason, "stop")


def served_model(requested: str, adapter: str | None, version: str | None, base_model: str) -> str:
    """The ``model`` of a response: the adapter and the version that ran (``name@version``)."""
    if adapter is None:
        return base_model
    name = adapter.partition("@")[0]
    return f"{name}@{version}" if version else requested


def usage(counts: Usage) -> dict[str, Any]:
    """OpenAI's usage object; prompt tokens a worker's prefix cache served (when the worker reports
    them) go in ``prompt_tokens_details.cached_tokens``, as OpenAI reports its own cache hits."""
    out: dict[str, Any] = {
        "prompt_tokens": counts.prompt_tokens,
        "completion_tokens": counts.completion_tokens,
        "total_tokens": counts.prompt_tokens + counts.completion_tokens,
    }
    cached = getattr(counts, "cached_tokens", 0)  # a field of newer workers' replies
    if isinstance(cached, int) and cached > 0:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


class ResponseShaper:
    """Builds the objects of one response; `kind` is CHAT or COMPLETION, `response_id` is shared by
    every chunk of a stream."""

    def __init__(self, kind: str, response_id: str, model: str) -> None:
        self.kind = kind
        self.id = response_id
        self.model = model
        self.created = int(time.time())

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        if self.kind == CHAT:
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {
            "id": self.id, "object": obj, "created": self.created, "model": self.model,
            "system_fingerprint": self.model,
        }  # fmt: skip

    def complete(self, result: Result) -> dict[str, Any]:
        """The whole (non-streaming) response."""
        out = self._envelope(chunk=False)
        reason = finish_reason(result)
        if self.kind == CHAT:
            message = {"role": "assistant", "content": result.text, "refusal": None}
            out["choices"] = [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason}]
        else:
            out["choices"] = [{"index": 0, "text": result.text, "logprobs": None, "finish_reason": reason}]
        out["usage"] = usage(result.usage)
        return out

    def delta(self, text: str, *, first: bool = False, reason: str | None = None) -> dict[str, Any]:
        """One streamed chunk carrying `text` (the chat's first one also says the role)."""
        out = self._envelope(chunk=True)
        if self.kind == CHAT:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            if reason is not None and not text:
                delta = {}
            out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
        else:
            out["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]
        return out

    def usage_chunk(self, counts: Usage) -> dict[str, Any]:
        """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
        out = self._envelope(chunk=True)
        out["choices"] = []
        out["usage"] = usage(counts)
        return out
