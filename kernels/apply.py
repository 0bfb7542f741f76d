"""lora_apply: a whole LoRA delta, out += scale * (x @ A.T) @ B.T per token, as one shrink-expand pair.

The pair is what programmatic dependent launch needs (pdl=True, compute capability 9.0+): the shrink
waits for the kernel before it, then lets the expand start, and the expand loads its weights while the
shrink still runs. Expand's early reads are safe only because the kernel right before it is that
shrink, so the pair is launched here, back to back, with the batch metadata built before either.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafleet.kernels.expand import lora_expand
from lorafleet.kernels.meta import LoraBatchMeta
from lorafleet.kernels.shrink import check_shrink_args, lora_shrink

__all__ = ["lora_apply"]


def lora_apply(
    x: torch.Tensor,  # [T, d_in] (rows may be strided)
    lora_a: torch.Tensor,  # [S, R, d_in] (or [S, G * R, d_in]) same dtype as x
    lora_b: torch.Tensor,  # [S, d_out, R] (or [S, sum of widths, R]) same dtype as x
    token_slots: torch.Tensor,  # [T] int32, -1 = no adapter
    slot_ranks: torch.Tensor,  # [S] int32 (or [G, S])
    slot_scales: torch.Tensor,  # [S] fp32 (or [G, S])
    out: torch.Tensor,  # [T, d_out] updated in place (rows may be strided)
    *,
    group_widths: Sequence[int] | None = None,
    meta: LoraBatchMeta | None = None,
    backend: str = "auto",
    debug: bool = False,
    pdl: bool = False,
) -> None:
    """out[t] += scale[s] * (x[t] @ lora_a[s, :r].T) @ lora_b[s, :, :r].T: `lora_shrink` then
    `lora_expand`, with their arguments, checks and results (groups included).

    pdl=True launches the pair with programmatic dependent launch where the GPU supports it (compute
    capability 9.0+; elsewhere the same kernels run one after the other): the expand's start-up and its
    first block of weights overlap the shrink. The result is the same, bit for bit. `meta` is built here
    when not given.
    """
    if meta is None:  # built before the pair (expand with pdl=True needs it); arguments checked first
        check_shrink_args(x, lora_a, token_slots, slot_ranks)
        meta = LoraBatchMeta.build(token_slots, lora_a.shape[0])
    h = lora_shrink(x, lora_a, token_slots, slot_ranks, meta=meta, backend=backend, debug=debug, pdl=pdl)
    lora_expand(
        h, lora_b, token_slots, slot_ranks, slot_scales, out,
        group_widths=group_widths, meta=meta, backend=backend, debug=debug, pdl=pdl,
    )  # fmt: skip
