"""EngineConfig: the engine's settings (adapter slots, batch, KV cache, CUDA graphs)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings, checked once at construction."""

    max_loras: int = 8
    max_rank: int = 64
    max_batch: int = 256  # running sequences at once
    max_prefill_tokens: int = 8192  # prompt tokens admitted per step (one longer prompt still runs alone)
    block_size: int = 16
    kv_cache_tokens: int | None = None  # None: sized from free device memory (CPU: 65,536 tokens)
    kv_memory_fraction: float = 0.85  # share of free device memory for the KV cache
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    cuda_graphs: bool = True  # capture decode steps in CUDA graphs (CUDA devices only)
    # Launch each LoRA shrink-expand pair with programmatic dependent launch (`lora_apply(pdl=True)`;
    # compute capability 9.0+, ignored elsewhere). Off until benchmarks/bench_kernels.py measures it.
    lora_pdl: bool = False
    # Steps whose sequences use one adapter run its shrink inside the base GEMMs (worker/engine/fold.py):
    # 4 LoRA launches per layer instead of 8, for G * max_rank spare weight rows per projection group.
    fold_single_adapter: bool = True
    # Share the KV blocks of prompt prefixes already computed (same model, adapter version and tokens):
    # their prefill is skipped. Off: every prompt is prefilled from scratch.
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        checks = {
            "max_loras": self.max_loras >= 1,
            "max_rank": 1 <= self.max_rank <= 256,
            "max_batch": self.max_batch >= 1,
            "max_prefill_tokens": self.max_prefill_tokens >= 1,
            "block_size": self.block_size >= 1,
            "kv_cache_tokens": self.kv_cache_tokens is None or self.kv_cache_tokens >= self.block_size,
            "kv_memory_fraction": 0 < self.kv_memory_fraction <= 1,
            "max_model_len": self.max_model_len is None or self.max_model_len >= 2,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"EngineConfig.{name} is out of range: {getattr(self, name)!r}")
