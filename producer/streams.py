"""Reading stream replies the same way whether the connection speaks RESP2 or RESP3.

redis-py returns XREAD as ``[[stream, [(id, {field: value})...]]...]`` under RESP2 and as
``{stream: [[(id, {field: value})...]]}`` under RESP3; a raw ``execute_command`` gives flat field
lists instead of dicts. These helpers accept all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Entry = tuple[bytes, dict[bytes, bytes]]


def text(value: Any) -> str:
    """A Redis reply value as text: bytes decoded as UTF-8, anything else through str()."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _as_bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _fields(raw: Any) -> dict[bytes, bytes]:
    if isinstance(raw, Mapping):
        return {_as_bytes(k): _as_bytes(v) for k, v in raw.items()}
    items = list(raw or ())
    return {_as_bytes(items[i]): _as_bytes(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def _entries(raw: Any) -> list[Entry]:
    out: list[Entry] = []
    for item in raw or ():
        if item and isinstance(item[0], list | tuple):  # RESP3 wraps the entry list once more
            out.extend(_entries(item))
        elif item:
            out.append((_as_bytes(item[0]), _fields(item[1])))
    return out


def xread_entries(response: Any, stream: str) -> list[Entry]:
    """The entries of `stream` in an XREAD/XREADGROUP response (None when the read timed out)."""
    if not response:
        return []
    wanted = stream.encode()
    if isinstance(response, Mapping):
        for name, raw in response.items():
            if _as_bytes(name) == wanted:
                return _entries(raw)
        return []
    for name, raw in response:
        if _as_bytes(name) == wanted:
            return _entries(raw)
    return []


def xrange_entries(response: Any) -> list[Entry]:
    """The entries of an XRANGE/XREVRANGE response."""
    return _entries(response)
