"""Raw msgpack for the fuzz entries (benchmarks/fuzz_kinds.py): what `msgpack.packb` will not write,
an invalid UTF-8 str or nesting past its limits, built byte by byte.

    pack({"id": "x", "prompt": raw_str(b"\\xff\\xfe")})   # a str that is not UTF-8
    pack({"stop": nested(100_000, "x")})                # 100,000 one-item arrays, no recursion
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import msgpack


class Raw(bytes):
    """Bytes that are msgpack already: `pack` inserts them as they are."""


def _header(n: int, fix: int, fix_max: int, codes: Sequence[tuple[int, str]]) -> bytes:
    if n <= fix_max:
        return bytes([fix | n])
    for code, fmt in codes:
        if n < 1 << (8 * struct.calcsize(fmt)):
            return bytes([code]) + struct.pack(fmt, n)
    raise ValueError(f"{n} items is more than msgpack can hold")


def raw_str(data: bytes) -> Raw:
    """A msgpack str over `data` whatever its bytes are (invalid UTF-8 included)."""
    return Raw(_header(len(data), 0xA0, 31, [(0xD9, ">B"), (0xDA, ">H"), (0xDB, ">I")]) + data)


def pack(value: Any) -> bytes:
    """msgpack of `value`, with `Raw` parts inserted unchanged (maps keep their insertion order)."""
    if isinstance(value, Raw):
        return bytes(value)
    if isinstance(value, dict):
        head = _header(len(value), 0x80, 15, [(0xDE, ">H"), (0xDF, ">I")])
        return head + b"".join(pack(k) + pack(v) for k, v in value.items())
    if isinstance(value, list):
        head = _header(len(value), 0x90, 15, [(0xDC, ">H"), (0xDD, ">I")])
        return head + b"".join(pack(v) for v in value)
    return bytes(msgpack.packb(value, use_bin_type=True))


def nested(depth: int, leaf: Any) -> Raw:
    """`leaf` inside `depth` one-item arrays, built by hand: no recursion, any depth."""
    return Raw(b"\x91" * depth + pack(leaf))
