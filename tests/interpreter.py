"""Whether Triton's interpreter can run the kernels here: the CPU tests of the Triton kernels need it."""

from __future__ import annotations

import functools

import pytest

from lorafleet.kernels import HAS_TRITON, lora_shrink
from lorafleet.kernels.testing import make_problem


@functools.cache
def interpreter_unavailable() -> str | None:
    """Why Triton's interpreter cannot run the kernels in this environment (None when it can).

    Triton 3.6's interpreter turns runtime loop bounds into Python ints with int() of a 1-element
    array, which numpy >= 2.4 refuses; later Triton releases squeeze first. Such an environment skips
    the interpreter tests (the GPU tests still run the kernels for real) instead of failing them.
    """
    if not HAS_TRITON:
        return "needs the triton package"
    p = make_problem(1, 1, 4, 4, ranks=1)
    try:
        lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks, backend="triton")
    except Exception as exc:
        if "0-dimensional arrays" not in str(exc):
            raise
        import numpy
        import triton

        versions = f"triton {triton.__version__}, numpy {numpy.__version__}"
        return f"Triton's interpreter cannot run loops with runtime bounds here ({versions})"
    return None


def require_interpreter() -> None:
    """Skip the calling test where the interpreter cannot run the kernels."""
    reason = interpreter_unavailable()
    if reason is not None:
        pytest.skip(reason)
