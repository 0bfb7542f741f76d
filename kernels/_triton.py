"""Optional Triton: the import guard, and the choice between compiled and interpreted kernels.

`import lorafleet.kernels` must work where Triton is not installed (a CPU-only engine uses the torch
reference). The kernel modules import `triton` and `tl` from here; without Triton they get stand-ins
whose `jit` leaves the function undecorated and whose `constexpr` only serves as an annotation, and
`HAS_TRITON` is False so that the launchers refuse to run.

Compiled Triton kernels need CUDA tensors. On CPU tensors the launchers run the same kernel under
Triton's interpreter, built here from the kernel's Python function, so the interpreter does not depend
on TRITON_INTERPRET having been set before `triton` was imported (pytest imports modules in an order
the kernel tests do not control). The price: kernels run this way may call Triton *builtins* only.
`tl.zeros`, `tl.sum`, `tl.max` and `tl.cdiv` are themselves `@triton.jit` functions, which the
interpreter can call only if TRITON_INTERPRET=1 was set at triton's import; use `tl.full(shape, 0.0,
dtype)` and `tl.reduce(x, axis, tl.standard._sum_combine)` (the combine function tl.sum itself uses,
which the interpreter recognises and runs as one numpy sum) instead.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised in a subprocess by the tests

    class _LanguageStandIn:
        constexpr = Any

    class _TritonStandIn:
        @staticmethod
        def jit(fn: Any) -> Any:
            return fn

    triton = _TritonStandIn()
    tl = _LanguageStandIn()
    HAS_TRITON = False

try:  # grid dependency control (programmatic dependent launch), Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # pragma: no cover - an older Triton, or none
    gdc_launch_dependents = gdc_wait = None
    HAS_GDC = False

__all__ = [
    "HAS_GDC",
    "HAS_TRITON",
    "gdc_launch_dependents",
    "gdc_wait",
    "interpret_requested",
    "launch_options",
    "pdl_supported",
    "runnable_kernel",
    "tl",
    "triton",
    "use_triton",
]

_BACKENDS = ("auto", "triton", "torch")


def interpret_requested() -> bool:
    """True when TRITON_INTERPRET=1 asks for Triton's interpreter (read once per call, no caching)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def use_triton(device: torch.device, backend: str, dtype: torch.dtype | None = None) -> bool:
    """Whether an op on `device` runs the Triton kernel (True) or the torch reference (False).

    backend="auto": Triton on CUDA, the reference on CPU unless TRITON_INTERPRET=1.
    backend="triton": always Triton (the interpreter on CPU). backend="torch": always the reference.
    On CPU, bfloat16 (`dtype`) stays on the reference: the interpreter computes in numpy, which has no
    bfloat16 (it would read zeros), so TRITON_INTERPRET=1 leaves bf16 ops on the reference and
    backend="triton" raises.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    wanted = backend == "triton" or device.type == "cuda" or interpret_requested()
    if wanted and not HAS_TRITON:
        if backend == "triton":
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        return False
    if wanted and device.type == "cpu" and dtype == torch.bfloat16:
        if backend == "triton":
            raise ValueError(
                "backend='triton' on CPU runs Triton's interpreter, which cannot compute in bfloat16 "
                "(numpy has no bfloat16); use backend='torch' or CUDA tensors"
            )
        return False
    return wanted


def pdl_supported(device: torch.device) -> bool:
    """Whether compiled kernels on `device` can use programmatic dependent launch: a CUDA device of
    compute capability 9.0 or later (Hopper), and a Triton with grid dependency control."""
    if not HAS_GDC or device.type != "cuda":
        return False
    return _capability(torch.cuda.current_device() if device.index is None else device.index)[0] >= 9


def launch_options(pdl: bool) -> dict[str, Any]:
    """Extra launch keywords: programmatic dependent launch when `pdl` (only passed when set, so that
    the interpreter, which knows no such option, never sees it)."""
    return {"launch_pdl": True} if pdl else {}


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def runnable_kernel(kernel: Any, device: torch.device) -> Any:
    """`kernel` itself for CUDA tensors; the same function under Triton's interpreter for CPU tensors."""
    if device.type == "cuda":
        return kernel
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):  # TRITON_INTERPRET=1 was set before triton's import
        return kernel
    return _interpreted(kernel.fn)


@functools.cache
def _interpreted(fn: Any) -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)
