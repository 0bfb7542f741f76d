"""Reading a request body safely: a byte limit while it arrives, a nesting limit before parsing.

Python's json parser recurses once per nesting level and raises RecursionError around 1,000 levels
(after burning the stack); a body of 10,000 ``[`` would also cost time for nothing. So the depth is
counted on the raw bytes first, with a scan that only looks at brackets, quotes and backslashes,
and a body deeper than the limit is refused before `json.loads` sees it.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

from lorafleet.gateway.errors import APIError, invalid

_STRUCTURE = re.compile(rb'[\[\]{}"\\]')
_OPEN = frozenset(b"[{")
_CLOSE = frozenset(b"]}")


async def read_limited(chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """The whole body, or 413 as soon as it passes `max_bytes` (the rest is never buffered)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body is larger than {max_bytes} bytes", code="request_too_large")
        parts.append(chunk)
    return b"".join(parts)


def nesting_depth(body: bytes, limit: int) -> int:
    """Deepest nesting of arrays and objects in JSON text, counting stops once it passes `limit`.

    Brackets inside strings do not count; a backslash escapes the next byte inside a string.
    """
    depth = deepest = 0
    in_string = False
    escaped_at = -1  # position of the byte a backslash escapes
    for match in _STRUCTURE.finditer(body):
        position = match.start()
        byte = body[position]
        if position == escaped_at:
            continue
        if in_string:
            if byte == 0x5C:  # backslash
                escaped_at = position + 1
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif byte in _CLOSE:
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes, max_depth: int) -> dict[str, Any]:
    """The request's JSON object; 400 naming what is wrong (empty, not UTF-8, not JSON, too deep,
    NaN/Infinity, not an object)."""
    if not body.strip():
        raise invalid("the request body is empty: send a JSON object")
    if nesting_depth(body, max_depth) > max_depth:
        raise invalid(f"the request body nests deeper than {max_depth} levels", code="too_deep")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"the request body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:  # the depth scan should have stopped it; never let it escape
        raise invalid(f"the request body nests deeper than {max_depth} levels", code="too_deep") from None
    except ValueError as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise invalid(f"the request body must be a JSON object, not {type(value).__name__}")
    return value
