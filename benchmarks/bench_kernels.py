"""Multi-LoRA shrink + expand on a GPU (bf16, Llama-3-8B dims): time, bytes, GB/s, speed-up over torch.

Cases
  decode:  T in {1, 16, 64, 256} tokens spread round robin over N in {1, 16, 64, 256} distinct adapters
           (N <= T), rank 16 and 64, q/o projection 4096 -> 4096; plus the other 8B projections
           (k/v 4096 -> 1024, gate/up 4096 -> 14336, down 14336 -> 4096) at the headline point.
  prefill: T in {2048, 16384} tokens over N in {1, 4} adapters, rank 16 and 64, 4096 -> 4096.

Columns (per call)
  ms, shrink_ms, expand_ms  shrink + expand (and each apart) with a prebuilt LoraBatchMeta, timed by
                            CUDA-graph replay as the engine's decode step runs them; meta_ms is the
                            per-step LoraBatchMeta.build shared by every layer
  MB                        bytes the ops must move: x, the A and B rows of the active adapters up to
                            their rank, out read + written (h, the fp32 [T, R] intermediate, is extra)
  GB/s, %hbm                MB / ms, against a device-to-device copy measured in the same run
  base_ms, speedup          torch baseline: gather each token's A and B (lora_a[slots], lora_b[slots]),
                            two bmm, scale and add (padded to R, as peers do); speedup = base_ms / ms
  x_read_once               decode, N = 1 batches only: ms / ms of one token on one adapter (the same kernels
                            reading that adapter once): what the extra tokens on that adapter cost
  pdl_ms, pdl_gain,         the pair as lora_apply(pdl=True) runs it (programmatic dependent launch: expand
  pdl_speedup               starts while shrink runs and loads its first block of B meanwhile); pdl_gain
                            = ms / pdl_ms, pdl_speedup = base_ms / pdl_ms (and pdl_x_read_once,
                            pdl_bit_exact: its out equals the plain pair's, in the JSON)
  copies_ms, copies_%hbm      two device-to-device copies (two kernels, as shrink + expand are) moving the
                            same bytes in the same way: what two kernels of that size reach on this GPU
After the table, q/k/v at 8B sizes (tokens over adapters: 64/64, 64/1, 1/1; rank 16) as three launch
pairs and as one grouped pair, the way the engine runs a fused q/k/v projection, and that pair with
PDL (JSON: qkv_groups).

Each measurement rotates over enough copies of the batch (adapter weights, x and out per copy) that the
bytes of one replay exceed 3x the L2 cache: every call reads them from HBM. The copies share the token
slots and their LoraBatchMeta, as every LoRA layer of one engine step shares the step's metadata.

Targets (H200, headline: 64 tokens over 64 adapters, rank 16, 4096 -> 4096): %hbm >= 70, speedup >= 3,
and 64 tokens on one adapter x_read_once <= 1.2.

    python benchmarks/bench_kernels.py            # full grid, a few minutes on an H200
    python benchmarks/bench_kernels.py --quick    # 6 points

Prints a table and writes benchmarks/results/bench_kernels.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import graph_seconds, hbm_bandwidth, print_table, write_results

from lorafleet.kernels import LoraBatchMeta, lora_apply, lora_expand, lora_shrink
from lorafleet.kernels.testing import assign_slots, make_problem

DEVICE = "cuda"
DTYPE = torch.bfloat16
MAX_COPIES = 1024
TARGET_SECONDS = 0.1  # of graph replays per measurement
MAX_REPLAYS = 500  # at the most
PROJECTIONS = {"q_o": (4096, 4096), "k_v": (4096, 1024), "gate_up": (4096, 14336), "down": (14336, 4096)}
HEADLINE = ("decode", "q_o", 64, 64, 16)  # kind, projection, tokens, adapters, rank
COLUMNS = [
    "kind", "proj", "tokens", "adapters", "rank", "ms", "shrink_ms", "expand_ms", "meta_ms", "MB",
    "GB/s", "%hbm", "copies_ms", "copies_%hbm", "base_ms", "speedup", "x_read_once", "pdl_ms", "pdl_gain",
    "pdl_speedup",
]  # fmt: skip


@dataclass(frozen=True)
class Case:
    kind: str  # decode | prefill
    proj: str  # key of PROJECTIONS
    tokens: int
    adapters: int
    rank: int

    @property
    def key(self) -> tuple[str, str, int, int, int]:
        return (self.kind, self.proj, self.tokens, self.adapters, self.rank)


def cases(quick: bool) -> list[Case]:
    if quick:
        return [
            Case(*HEADLINE),
            Case("decode", "q_o", 64, 1, 16),
            Case("decode", "q_o", 1, 1, 16),
            Case("decode", "gate_up", 64, 64, 16),
            Case("decode", "q_o", 256, 256, 64),
            Case("prefill", "q_o", 2048, 4, 16),
        ]
    grid = [
        Case("decode", "q_o", t, n, r)
        for r in (16, 64)
        for t in (1, 16, 64, 256)
        for n in (1, 16, 64, 256)
        if n <= t
    ]
    grid += [Case("decode", proj, 64, 64, 16) for proj in ("k_v", "gate_up", "down")]
    grid += [Case("prefill", "q_o", t, n, r) for r in (16, 64) for t in (2048, 16384) for n in (1, 4)]
    return grid


# ------------------------------------------------------------------------------------------------
# timing


def graph_ms(calls: list[Callable[[], object]]) -> float:
    """Milliseconds per call: all `calls` captured in one CUDA graph, replayed; total / len(calls)."""
    return 1e3 * graph_seconds(calls, TARGET_SECONDS, MAX_REPLAYS)


def two_copies_ms(nbytes: int) -> float:
    """Two copy kernels, each reading and writing nbytes / 4 (nbytes of traffic in all), rotating buffers."""
    quarter = max(1, nbytes // 4)
    pairs = max(1, min(64, (256 << 20) // max(nbytes, 1)))
    bufs = [torch.empty(quarter, dtype=torch.uint8, device=DEVICE) for _ in range(4 * pairs)]

    def call(i: int) -> Callable[[], object]:
        def run() -> None:
            bufs[4 * i + 1].copy_(bufs[4 * i])
            bufs[4 * i + 3].copy_(bufs[4 * i + 2])

        return run

    return graph_ms([call(i) for i in range(pairs)])


# ------------------------------------------------------------------------------------------------
# one case


@dataclass
class Batch:
    """One copy of a case's batch: its own adapter weights (a pool of its own), x and out.

    The copies share the token slots and their LoraBatchMeta, as the layers of one engine step do: a
    step builds the metadata once and every LoRA layer reads it (it stays in L2), while each layer's
    adapter weights are its own (read from HBM).
    """

    x: torch.Tensor  # [T, d_in]
    out: torch.Tensor  # [T, d_out]
    lora_a: torch.Tensor  # [N, R, d_in]
    lora_b: torch.Tensor  # [N, d_out, R]
    ranks: torch.Tensor  # [N] int32
    scales: torch.Tensor  # [N] fp32
    slots: torch.Tensor  # [T] int32, shared by the copies
    meta: LoraBatchMeta  # shared by the copies

    def shrink(self) -> torch.Tensor:
        """h [T, R] fp32 of this copy."""
        return lora_shrink(self.x, self.lora_a, self.slots, self.ranks, meta=self.meta)

    def expand(self, h: torch.Tensor) -> None:
        """out += the LoRA update of h."""
        lora_expand(h, self.lora_b, self.slots, self.ranks, self.scales, self.out, meta=self.meta)

    def both(self) -> None:
        """Shrink then expand: one multi-LoRA layer."""
        self.expand(self.shrink())

    def apply_pdl(self) -> None:
        """The same pair launched with programmatic dependent launch (`lora_apply(pdl=True)`)."""
        lora_apply(
            self.x, self.lora_a, self.lora_b, self.slots, self.ranks, self.scales, self.out,
            meta=self.meta, pdl=True,
        )  # fmt: skip

    def baseline(self) -> None:
        """The torch baseline's update of out."""
        torch_baseline(self.x, self.lora_a, self.lora_b, self.slots, self.scales, self.out)


def bytes_moved(case: Case) -> int:
    d_in, d_out = PROJECTIONS[case.proj]
    elem = torch.finfo(DTYPE).bits // 8
    active = min(case.adapters, case.tokens)
    weights = active * case.rank * (d_in + d_out)
    return elem * (case.tokens * d_in + weights + 2 * case.tokens * d_out)


def torch_baseline(
    x: torch.Tensor,  # [T, d_in]
    lora_a: torch.Tensor,  # [S, R, d_in]
    lora_b: torch.Tensor,  # [S, d_out, R]
    slots: torch.Tensor,  # [T] int32
    scales: torch.Tensor,  # [S] fp32
    out: torch.Tensor,  # [T, d_out], updated in place
) -> None:
    """Per-token gather of A and B, then bmm: what a multi-LoRA layer costs without grouping."""
    s = slots.long()
    h = torch.bmm(lora_a[s], x.unsqueeze(2))  # [T, R, d_in] @ [T, d_in, 1] -> [T, R, 1]
    delta = torch.bmm(lora_b[s], h).squeeze(2)  # [T, d_out, R] @ [T, R, 1] -> [T, d_out]
    out += delta * scales[s][:, None].to(out.dtype)


def make_batches(case: Case, seed: int, l2_bytes: int, *, block_m: int | None = None) -> list[Batch]:
    """Enough copies of the case's batch that one replay of them all moves over 3x the L2 cache."""
    d_in, d_out = PROJECTIONS[case.proj]
    copies = max(1, min(MAX_COPIES, math.ceil(3 * l2_bytes / bytes_moved(case))))
    # tokens spread over the case's adapters, one each while they last (round robin)
    slots = assign_slots(case.tokens, case.adapters, "distinct", seed=seed).to(DEVICE)
    meta = LoraBatchMeta.build(slots, case.adapters, block_m=block_m)
    batches = []
    for c in range(copies):
        pool = make_problem(
            1, case.adapters, d_in, d_out, ranks=case.rank, dtype=DTYPE, device=DEVICE, seed=seed + c
        )
        x = torch.randn(case.tokens, d_in, device=DEVICE, dtype=DTYPE)
        out = torch.randn(case.tokens, d_out, device=DEVICE, dtype=DTYPE)
        batches.append(
            Batch(x, out, pool.lora_a, pool.lora_b, pool.slot_ranks, pool.slot_scales, slots, meta)
        )
    return batches


def run_case(case: Case, seed: int, l2_bytes: int) -> dict[str, Any]:
    batches = make_batches(case, seed, l2_bytes)
    per_call = bytes_moved(case)
    hs = [t.shrink() for t in batches]  # h buffers for expand alone
    err = check_against_baseline(batches[0])
    ms = graph_ms([t.both for t in batches])
    pdl_ms = graph_ms([t.apply_pdl for t in batches])
    row: dict[str, Any] = asdict(case)
    row.update(
        copies=len(batches),
        ms=ms,
        pdl_ms=pdl_ms,
        pdl_gain=ms / pdl_ms,
        shrink_ms=graph_ms([t.shrink for t in batches]),
        expand_ms=graph_ms([partial(t.expand, h) for t, h in zip(batches, hs, strict=True)]),
        meta_ms=graph_ms([partial(LoraBatchMeta.build, t.slots, case.adapters) for t in batches]),
        base_ms=graph_ms([t.baseline for t in batches]),
        copies_ms=two_copies_ms(per_call),
        bytes=per_call,
        MB=per_call / 1e6,
        max_abs_err_vs_baseline=err,
        pdl_bit_exact=pdl_is_bit_exact(batches[0]),
    )
    row["GB/s"] = per_call / (ms / 1e3) / 1e9
    row["speedup"] = row["base_ms"] / ms
    row["pdl_speedup"] = row["base_ms"] / pdl_ms
    return row


def out_after(t: Batch, update: Callable[[], object]) -> torch.Tensor:
    """out as `update` leaves it; out is then put back as it was."""
    before = t.out.clone()
    update()
    after = t.out.clone()
    t.out.copy_(before)
    return after


def pdl_is_bit_exact(t: Batch) -> bool:
    """Whether lora_apply(pdl=True) updates out exactly as shrink then expand do."""
    return torch.equal(out_after(t, t.apply_pdl), out_after(t, t.both))


def check_against_baseline(t: Batch) -> float:
    """Max |ours - baseline| of one update of out (sanity check; both in bf16)."""
    return float((out_after(t, t.both).float() - out_after(t, t.baseline).float()).abs().max())


QKV_WIDTHS = (4096, 1024, 1024)  # Llama-3-8B q, k, v outputs of one 4096-wide hidden state
QKV_POINTS = ((64, 64), (64, 1), (1, 1))  # (tokens, adapters), rank 16


def run_qkv_groups(tokens: int, adapters: int, rank: int, l2_bytes: int) -> dict[str, Any]:
    """q, k and v LoRA as three shrink + expand pairs, and as one grouped pair (what the engine runs)."""
    d_in = 4096
    elem = torch.finfo(DTYPE).bits // 8
    per_call = elem * (
        tokens * d_in + adapters * rank * (3 * d_in + sum(QKV_WIDTHS)) + 2 * tokens * sum(QKV_WIDTHS)
    )
    copies = max(1, min(MAX_COPIES, math.ceil(3 * l2_bytes / per_call)))
    slots = assign_slots(tokens, adapters, "distinct", seed=0).to(DEVICE)
    meta = LoraBatchMeta.build(slots, adapters)
    separate: list[Callable[[], None]] = []
    grouped: list[Callable[[], None]] = []
    grouped_pdl: list[Callable[[], None]] = []
    for c in range(copies):
        parts = [
            make_problem(1, adapters, d_in, w, ranks=rank, dtype=DTYPE, device=DEVICE, seed=3 * c + g)
            for g, w in enumerate(QKV_WIDTHS)
        ]
        x = torch.randn(tokens, d_in, device=DEVICE, dtype=DTYPE)
        out = torch.randn(tokens, sum(QKV_WIDTHS), device=DEVICE, dtype=DTYPE)  # the fused GEMM's output
        outs = out.split(QKV_WIDTHS, dim=1)
        a = torch.cat([p.lora_a for p in parts], dim=1)  # [N, 3R, d_in]
        b = torch.cat([p.lora_b for p in parts], dim=1)  # [N, sum widths, R]
        ranks = torch.stack([p.slot_ranks for p in parts])  # [3, N]
        scales = torch.stack([p.slot_scales for p in parts])

        def three(x=x, parts=parts, outs=outs) -> None:
            for p, o in zip(parts, outs, strict=True):
                h = lora_shrink(x, p.lora_a, slots, p.slot_ranks, meta=meta)
                lora_expand(h, p.lora_b, slots, p.slot_ranks, p.slot_scales, o, meta=meta)

        def one(x=x, a=a, b=b, ranks=ranks, scales=scales, out=out, pdl=False) -> None:
            widths = list(QKV_WIDTHS)
            lora_apply(x, a, b, slots, ranks, scales, out, group_widths=widths, meta=meta, pdl=pdl)

        separate.append(three)
        grouped.append(one)
        grouped_pdl.append(partial(one, pdl=True))
    row = {"tokens": tokens, "adapters": adapters, "rank": rank, "bytes": per_call, "copies": copies}
    row["separate_ms"] = graph_ms(separate)
    row["grouped_ms"] = graph_ms(grouped)
    row["speedup"] = row["separate_ms"] / row["grouped_ms"]
    row["grouped_pdl_ms"] = graph_ms(grouped_pdl)
    row["pdl_gain"] = row["grouped_ms"] / row["grouped_pdl_ms"]
    return row


# ------------------------------------------------------------------------------------------------
# report


def add_derived(rows: list[dict[str, Any]], hbm: float) -> None:
    """%hbm for every row; x_read_once for one-adapter rows that have a one-token row to compare."""
    one_token = {(r["proj"], r["rank"]): r for r in rows if r["tokens"] == 1 and r["adapters"] == 1}
    for row in rows:
        row["%hbm"] = 100 * row["GB/s"] * 1e9 / hbm
        row["copies_%hbm"] = 100 * row["bytes"] / (row["copies_ms"] / 1e3) / hbm
        ref = one_token.get((row["proj"], row["rank"]))
        if row["kind"] == "decode" and row["adapters"] == 1 and ref:
            row["x_read_once"] = row["ms"] / ref["ms"]
            row["pdl_x_read_once"] = row["pdl_ms"] / ref["pdl_ms"]


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets at the headline point, with the measured values."""
    by_key = {(r["kind"], r["proj"], r["tokens"], r["adapters"], r["rank"]): r for r in rows}
    head = by_key.get(HEADLINE)
    same = by_key.get(("decode", "q_o", 64, 1, 16))
    checks = []
    if head is not None:
        checks.append(
            _target("%hbm >= 70 (64 tokens over 64 adapters, rank 16)", head["%hbm"], head["%hbm"] >= 70)
        )
        checks.append(
            _target(
                "speedup >= 3 over the torch baseline (same point)", head["speedup"], head["speedup"] >= 3
            )
        )
        value = head["pdl_speedup"]
        checks.append(_target("the same with programmatic dependent launch (pdl=True)", value, value >= 3))
    if same is not None and same.get("x_read_once") is not None:
        value = same["x_read_once"]
        checks.append(_target("64 tokens on one adapter <= 1.2x one token on it", value, value <= 1.2))
        value = same["pdl_x_read_once"]
        checks.append(_target("the same with programmatic dependent launch (pdl=True)", value, value <= 1.2))
    return checks


def _target(name: str, value: float, ok: bool) -> dict[str, Any]:
    return {"target": name, "value": value, "ok": ok}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 points instead of the full grid")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.",
              file=sys.stderr)  # fmt: skip
        return 1
    started = time.perf_counter()
    hbm = hbm_bandwidth()
    l2_bytes = int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    print(
        f"{torch.cuda.get_device_name()}: device-to-device copy {hbm / 1e9:.0f} GB/s, L2 {l2_bytes >> 20} MiB"
    )
    rows = []
    for i, case in enumerate(cases(args.quick)):
        rows.append(run_case(case, seed=i, l2_bytes=l2_bytes))
        torch.cuda.empty_cache()
    add_derived(rows, hbm)
    print_table(rows, COLUMNS)
    qkv = [run_qkv_groups(t, n, 16, l2_bytes) for t, n in QKV_POINTS]
    for row in qkv:
        row["%hbm"] = 100 * row["bytes"] / (row["grouped_ms"] / 1e3) / hbm
    print("\nq, k and v (Llama-3-8B, rank 16): three launch pairs vs one grouped pair (and with PDL)")
    print_table(
        qkv,
        ["tokens", "adapters", "separate_ms", "grouped_ms", "speedup", "%hbm", "grouped_pdl_ms", "pdl_gain"],
    )
    targets = check_targets(rows)
    for check in targets:
        print(f"{'PASS' if check['ok'] else 'MISS'}  {check['target']}: {check['value']:.3g}")
    path = write_results(
        "bench_kernels",
        rows,
        extra={
            "hbm_bytes_per_s": hbm,
            "l2_bytes": l2_bytes,
            "quick": args.quick,
            "targets": targets,
            "qkv_groups": qkv,
        },
    )
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
