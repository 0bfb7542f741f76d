"""The engine on a CUDA device: Triton kernels and CUDA graphs give the CPU path's tokens."""

from __future__ import annotations

import pytest
import torch

from lorafleet.worker.engine import synthetic
from lorafleet.worker.engine.engine import Engine
from lorafleet.worker.engine.sequence import GenerationRequest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def model_and_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-engine")
    model_dir = synthetic.write_model(root / "model", "qwen3", "small", seed=3)
    adapters = {
        f"a{i}": synthetic.write_adapter(root / f"a{i}", model_dir, rank=r, targets=t, seed=i)
        for i, (r, t) in enumerate(
            [(8, synthetic.ALL_TARGETS), (16, ("q", "v")), (4, ("gate", "up", "down"))]
        )
    }
    return model_dir, adapters


def _requests(names=(None, "a0", "a1", "a2")):
    prompts = [[(13 * i + j) % 2000 + 3 for j in range(5 + 7 * i)] for i in range(11)]
    return [
        GenerationRequest(prompt_ids=p, adapter=names[i % len(names)], max_new_tokens=12, ignore_eos=True)
        for i, p in enumerate(prompts)
    ]


def _run(model_dir, adapters, device, names=(None, "a0", "a1", "a2"), **config):
    engine = Engine.from_pretrained(
        model_dir,
        max_loras=4,
        max_rank=16,
        device=device,
        dtype=torch.float32,
        kv_cache_tokens=4096,
        **config,
    )
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return [o.token_ids for o in engine.generate(_requests(names))], engine


def test_gpu_kernels_and_graphs_match_the_cpu_path(model_and_adapters):
    model_dir, adapters = model_and_adapters
    cpu, _ = _run(model_dir, adapters, "cpu")
    eager, _ = _run(model_dir, adapters, "cuda", cuda_graphs=False)
    graphed, engine = _run(model_dir, adapters, "cuda")
    assert engine.graphs is not None
    assert engine.graphs.captured
    assert eager == cpu
    assert graphed == eager


def test_steps_without_adapters_replay_the_graphs_without_lora_and_match(model_and_adapters):
    """A batch where no sequence has an adapter replays the bucket's graph without the LoRA kernels;
    its tokens are the eager and CPU tokens (and a mixed batch after it still gets its adapters)."""
    model_dir, adapters = model_and_adapters
    base_only = (None,)
    cpu, _ = _run(model_dir, adapters, "cpu", names=base_only)
    eager, _ = _run(model_dir, adapters, "cuda", names=base_only, cuda_graphs=False)
    graphed, engine = _run(model_dir, adapters, "cuda", names=base_only)
    assert engine.graphs is not None
    replays = engine.graphs.replays
    assert sum(n for (_, mode), n in replays.items() if mode == "base") > 0
    assert sum(n for (_, mode), n in replays.items() if mode != "base") == 0
    assert eager == cpu
    assert graphed == eager
    mixed = [o.token_ids for o in engine.generate(_requests())]
    assert sum(n for (_, mode), n in replays.items() if mode == "lora") > 0
    assert mixed == _run(model_dir, adapters, "cpu")[0]


def test_lora_pairs_with_programmatic_dependent_launch_give_the_same_tokens(model_and_adapters):
    """EngineConfig.lora_pdl (programmatic dependent launch on compute capability 9.0+; elsewhere the
    same kernels without it): the tokens of the engine without it, eager and replayed from graphs."""
    model_dir, adapters = model_and_adapters
    plain, _ = _run(model_dir, adapters, "cuda")
    eager, _ = _run(model_dir, adapters, "cuda", cuda_graphs=False, lora_pdl=True)
    graphed, engine = _run(model_dir, adapters, "cuda", lora_pdl=True)
    assert engine.graphs is not None
    assert sum(n for (_, mode), n in engine.graphs.replays.items() if mode == "lora") > 0
    assert eager == plain
    assert graphed == plain


def test_steps_on_one_adapter_replay_the_folded_graphs_and_match(model_and_adapters):
    """Sequences on one adapter (rank 8 of max_rank 16) and on the base model: decode steps replay the
    folded graphs (the shrink inside the base GEMMs, fold.py), with the tokens of the engine that does
    not fold, eager and from graphs, and of the CPU path."""
    model_dir, adapters = model_and_adapters
    names = ("a0", None)
    cpu, _ = _run(model_dir, adapters, "cpu", names=names)
    unfolded, _ = _run(model_dir, adapters, "cuda", names=names, fold_single_adapter=False)
    eager, eager_engine = _run(model_dir, adapters, "cuda", names=names, cuda_graphs=False)
    graphed, engine = _run(model_dir, adapters, "cuda", names=names)
    assert eager_engine.fold is not None
    assert eager_engine.fold.steps > 0
    assert engine.graphs is not None
    replays = engine.graphs.replays
    assert sum(n for (_, mode), n in replays.items() if mode == "folded") > 0
    assert sum(n for (_, mode), n in replays.items() if mode == "lora") == 0
    assert unfolded == cpu
    assert eager == unfolded
    assert graphed == unfolded
    # another adapter afterwards: the fold copies its A before the graphs replay
    again = [o.token_ids for o in engine.generate(_requests(("a2", None)))]
    assert again == _run(model_dir, adapters, "cpu", names=("a2", None))[0]


def _shared_prefix_requests():
    system = [(7 * j) % 2000 + 3 for j in range(70)]  # 4 full KV blocks of 16 and a part
    names = (None, "a0", "a1", "a2")
    return [
        GenerationRequest(
            prompt_ids=[*system, 100 + i, 200 + i], adapter=names[i % 4], max_new_tokens=12, ignore_eos=True
        )
        for i in range(8)
    ]


def _twice(model_dir, adapters, device, prefix_cache):
    """The shared-prefix requests run twice on one engine (the second time from its prefix cache)."""
    engine = Engine.from_pretrained(
        model_dir, max_loras=4, max_rank=16, device=device, dtype=torch.float32, kv_cache_tokens=4096,
        prefix_cache=prefix_cache,
    )  # fmt: skip
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    runs = [[o.token_ids for o in engine.generate(_shared_prefix_requests())] for _ in range(2)]
    return runs, engine


def test_prefix_cache_hits_under_cuda_graphs_give_the_tokens_of_an_engine_without_it(model_and_adapters):
    """Prompts sharing 70 tokens over the base model and three adapters, run twice: with the prefix
    cache (the second run reads the shared blocks, decode steps replay CUDA graphs over them) the
    tokens are those of the same engine without the cache, and of the CPU path."""
    model_dir, adapters = model_and_adapters
    (cpu, _), _ = _twice(model_dir, adapters, "cpu", prefix_cache=False)
    without, _ = _twice(model_dir, adapters, "cuda", prefix_cache=False)
    cached, engine = _twice(model_dir, adapters, "cuda", prefix_cache=True)
    assert engine.graphs is not None
    assert engine.graphs.captured
    assert engine.prefix_stats["cached_tokens"] > 0
    assert cached == without
    assert cached[0] == cached[1] == cpu
