"""Field checks shared by the job and reply dataclasses: each error message names the field.

Booleans are rejected where a number is expected (``True`` is an ``int`` in Python, not in msgpack
producers of other languages), and floats must be finite. Messages show a bad value through
`describe`, never its full repr: a value from the wire may be a megabyte long or nested a thousand
levels deep (``repr`` of that raises RecursionError).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class ContainerKey:
    """Stands in for a map key that was an array or a map on the wire (Python cannot hash those), so
    that the rest of the map stays readable and a check can name the bad key."""

    __slots__ = ()


# Characters of a string value shown in an error message.
_SHOWN_CHARS = 40


def describe(value: Any) -> str:
    """A short, safe description of any decoded value for an error message: scalars as their repr
    (strings cut to 40 characters), containers by type and size (never walked)."""
    if value is None or isinstance(value, bool | int | float):
        text = repr(value)
        return text if len(text) <= _SHOWN_CHARS else f"an integer of {len(text)} digits"
    if isinstance(value, str | bytes):
        kind = "a string" if isinstance(value, str) else "bytes"
        if len(value) <= _SHOWN_CHARS:
            return repr(value).encode("ascii", "backslashreplace").decode()
        shown = repr(value[:_SHOWN_CHARS]).encode("ascii", "backslashreplace").decode()
        return f"{kind} of length {len(value)} starting {shown}"
    if isinstance(value, list | tuple | dict):
        return f"a {'map' if isinstance(value, dict) else 'list'} of {len(value)} items"
    if isinstance(value, ContainerKey):
        return "a list or map used as a map key"
    return f"a value of type {type(value).__name__}"


def check_int(field: str, value: Any, lo: int, hi: int) -> int:
    """An integer in lo..hi."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field} must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{field} must be in {lo}..{hi}, got {value}")
    return value


def check_float(field: str, value: Any, lo: float, hi: float, *, low_open: bool = False) -> float:
    """A finite number in lo..hi (lo excluded when `low_open`), returned as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{field} must be a number, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{field} must be finite, got {number}")
    too_low = number <= lo if low_open else number < lo
    if too_low or number > hi:
        interval = f"({lo}, {hi}]" if low_open else f"[{lo}, {hi}]"
        raise ValueError(f"{field} must be in {interval}, got {number}")
    return number


def check_bool(field: str, value: Any) -> bool:
    """A boolean (not 0/1)."""
    if not isinstance(value, bool):
        raise TypeError(f"{field} must be a boolean, not {type(value).__name__}")
    return value


def check_str(field: str, value: Any, *, min_len: int = 0, max_bytes: int | None = None) -> str:
    """A string of at least `min_len` characters and at most `max_bytes` UTF-8 bytes."""
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a string, not {type(value).__name__}")
    if len(value) < min_len:
        raise ValueError(f"{field} must not be empty" if min_len == 1 else f"{field} is too short")
    size = utf8_size(field, value)
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{field} is {size} bytes of UTF-8, more than the limit of {max_bytes}")
    return value


def utf8_size(field: str, value: str) -> int:
    """The UTF-8 length of a string; ValueError naming `field` when it holds bytes that were not
    UTF-8 on the wire (decoded as lone surrogates, so that the rest of the job stays readable)."""
    if value.isascii():  # O(1) in CPython: no copy for the common case
        return len(value)
    try:
        return len(value.encode())
    except UnicodeEncodeError as exc:
        raise ValueError(f"{field} is not valid UTF-8 (at character {exc.start})") from None


def check_int_list(field: str, value: Any, *, min_len: int, max_len: int, hi: int) -> tuple[int, ...]:
    """A list of integers in 0..hi with min_len..max_len items, returned as a tuple."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"{field} must be a list of integers, not {type(value).__name__}")
    if not min_len <= len(value) <= max_len:
        raise ValueError(f"{field} must have {min_len}..{max_len} items, got {len(value)}")
    for index, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= hi:
            raise ValueError(f"{field}[{index}] must be an integer in 0..{hi}, got {describe(item)}")
    return tuple(value)


def check_str_list(field: str, value: Any, *, max_len: int, max_chars: int) -> tuple[str, ...]:
    """A list of 1..max_chars-character strings with at most max_len items, returned as a tuple."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"{field} must be a list of strings, not {type(value).__name__}")
    if len(value) > max_len:
        raise ValueError(f"{field} must have at most {max_len} items, got {len(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not 1 <= len(item) <= max_chars:
            raise ValueError(
                f"{field}[{index}] must be a string of 1..{max_chars} characters, got {describe(item)}"
            )
        utf8_size(f"{field}[{index}]", item)
    return tuple(value)
