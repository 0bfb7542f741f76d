"""The multi-LoRA Triton kernels compile for an H100/H200 (sm_90) on a machine without a GPU.

Each launcher runs on CPU tensors with its launch intercepted: the arguments, block sizes, warps and
stages it would pass are compiled ahead of time with Triton's compiler and the ptxas shipped in the
triton wheel, and the cubin's resource usage must show no register spills. This catches what the
interpreter cannot see (tl.dot shape rules, layouts, types, spills) before a GPU run.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from typing import Any

import pytest
import torch

from lorafleet.kernels import HAS_TRITON, LoraBatchMeta, lora_expand, lora_shrink
from lorafleet.kernels.testing import make_problem

pytestmark = [
    pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package"),
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning"),
]

_POINTER_TYPES = {
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.int32: "*i32",
}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "launch_pdl")


class _Launch:
    """Stands in for `kernel[grid]`: records what the launcher passes."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.grid: tuple[int, ...] = ()
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}

    def __getitem__(self, grid: tuple[int, ...]) -> _Launch:
        self.grid = grid
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


def _record(monkeypatch: pytest.MonkeyPatch, module: str, call: Any) -> _Launch:
    import importlib

    launches: list[_Launch] = []
    monkeypatch.setattr(
        importlib.import_module(module),
        "runnable_kernel",
        lambda kernel, device: launches.append(_Launch(kernel)) or launches[-1],
    )
    call()
    (launch,) = launches
    return launch


def _record_pair(
    monkeypatch: pytest.MonkeyPatch, p: Any, meta: LoraBatchMeta, *, pdl: bool = False
) -> tuple[_Launch, _Launch]:
    """The launches lora_shrink and lora_expand make for problem `p` (Triton kernels, CPU tensors)."""
    h = torch.zeros(p.num_tokens, p.max_rank)
    shrink = _record(
        monkeypatch,
        "lorafleet.kernels.shrink",
        lambda: lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks, meta=meta, backend="triton", pdl=pdl),
    )
    expand = _record(
        monkeypatch,
        "lorafleet.kernels.expand",
        lambda: lora_expand(
            h, p.lora_b, p.token_slots, p.slot_ranks, p.slot_scales, p.new_out(), meta=meta,
            backend="triton", pdl=pdl,
        ),
    )  # fmt: skip
    return shrink, expand


def _compile_sm90(launch: _Launch, dtype: torch.dtype) -> tuple[str, str]:
    """Compile the recorded launch for sm_90 with `dtype` for the float tensors: cuobjdump's usage line,
    and the PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.kernel
    names = fn.arg_names
    signature: dict[str, str] = {}
    for name, value in zip(names, launch.args, strict=False):
        if isinstance(value, torch.Tensor):
            kind = _POINTER_TYPES[value.dtype]
            signature[name] = _POINTER_TYPES[dtype] if value.is_floating_point() and kind != "*fp32" else kind
        else:
            signature[name] = "i32"
    constexprs = {k: v for k, v in launch.kwargs.items() if k not in _LAUNCH_OPTIONS}
    if dtype == torch.float32:
        constexprs["DOT_PRECISION"] = "ieee"
    signature.update({name: "constexpr" for name in constexprs})
    options = {k: launch.kwargs[k] for k in _LAUNCH_OPTIONS if k in launch.kwargs}
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
        options=options,
    )
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True, check=True
        )
    return next(line.strip() for line in usage.stdout.splitlines() if "REG:" in line), compiled.asm["ptx"]


# (tokens, max rank, dtype): tokens pick the kernel variant (4-row multiply-reduce, 16- and 64-row dot)
CASES = [
    (t, r, dtype)
    for t in (64, 512, 4096)
    for r, dtype in ((16, torch.bfloat16), (256, torch.bfloat16), (64, torch.float32))
]


@pytest.mark.parametrize(("num_tokens", "max_rank", "dtype"), CASES)
def test_kernels_compile_for_sm90_without_spills(monkeypatch, num_tokens, max_rank, dtype):
    _skip_without_nvidia_compiler()
    # fp16 on CPU (the interpreter refuses bf16); the compiled signature gets the requested dtype
    cpu_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    p = make_problem(
        num_tokens, 8, 64, 48, ranks="mixed", max_rank=max_rank, popularity="zipf", dtype=cpu_dtype
    )
    meta = LoraBatchMeta.build(p.token_slots, p.num_slots)
    shrink, expand = _record_pair(monkeypatch, p, meta)
    assert shrink.grid[0] == meta.num_tiles
    assert expand.grid[0] == meta.num_expand_tiles
    for launch in (shrink, expand):
        usage, _ = _compile_sm90(launch, dtype)
        assert "STACK:0 " in usage + " ", f"{launch.kernel.__name__} spills registers: {usage}"


def _skip_without_nvidia_compiler() -> None:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this triton cannot compile for NVIDIA GPUs: {exc}")


def _global_loads_around(ptx: str, instruction: str) -> tuple[int, int]:
    """Global loads of the PTX before and after the first `instruction`."""
    lines = ptx.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith(instruction))
    loads = [i for i, line in enumerate(lines) if "ld.global" in line]
    return sum(i < at for i in loads), sum(i > at for i in loads)


@pytest.mark.parametrize(
    ("num_tokens", "max_rank", "dtype"),
    [(64, 16, torch.bfloat16), (64, 64, torch.bfloat16), (512, 16, torch.bfloat16), (64, 64, torch.float32)],
)
def test_pdl_pair_compiles_for_sm90_with_its_reads_on_the_right_side_of_the_wait(
    monkeypatch, num_tokens, max_rank, dtype
):
    """lora_apply(pdl=True) on an sm_90 GPU: both kernels launch with PDL and without spills. The shrink
    reads nothing before its grid-dependency wait and only then lets the expand start; the expand
    reads its metadata and first block of B before its wait (the point of PDL) and h after it."""
    _skip_without_nvidia_compiler()
    import lorafleet.kernels.expand as expand_module
    import lorafleet.kernels.shrink as shrink_module

    for module in (shrink_module, expand_module):  # as on an H100, whatever this machine has
        monkeypatch.setattr(module, "pdl_supported", lambda device: True)
    cpu_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    p = make_problem(num_tokens, 8, 64, 48, ranks="mixed", max_rank=max_rank, dtype=cpu_dtype)
    meta = LoraBatchMeta.build(p.token_slots, p.num_slots)
    shrink, expand = _record_pair(monkeypatch, p, meta, pdl=True)
    for launch in (shrink, expand):
        assert launch.kwargs["launch_pdl"] is True
        assert launch.kwargs["GDC"] is True
    usage, ptx = _compile_sm90(shrink, dtype)
    assert "STACK:0 " in usage + " ", f"shrink spills registers: {usage}"
    assert _global_loads_around(ptx, "griddepcontrol.wait")[0] == 0
    assert ptx.index("griddepcontrol.wait") < ptx.index("griddepcontrol.launch_dependents")
    usage, ptx = _compile_sm90(expand, dtype)
    assert "STACK:0 " in usage + " ", f"expand spills registers: {usage}"
    assert "griddepcontrol.launch_dependents" not in ptx
    before, after = _global_loads_around(ptx, "griddepcontrol.wait")
    assert before > 0
    assert after > 0


def test_pdl_is_off_where_the_device_cannot_use_it(monkeypatch):
    """On CPU (the interpreter) pdl=True runs the same kernels without the launch option or the
    grid-dependency instructions, which the interpreter does not know."""
    p = make_problem(7, 3, 16, 24, ranks="mixed", max_rank=16, dtype=torch.float16)
    meta = LoraBatchMeta.build(p.token_slots, p.num_slots)
    _, expand = _record_pair(monkeypatch, p, meta, pdl=True)
    assert "launch_pdl" not in expand.kwargs
    assert expand.kwargs["GDC"] is False
    assert expand.kwargs["PREFETCH_B"] is True
