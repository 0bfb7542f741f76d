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
    assert sum(n for (_, lora), n in replays.items() if not lora) > 0
    assert sum(n for (_, lora), n in replays.items() if lora) == 0
    assert eager == cpu
    assert graphed == eager
    mixed = [o.token_ids for o in engine.generate(_requests())]
    assert sum(n for (_, lora), n in replays.items() if lora) > 0
    assert mixed == _run(model_dir, adapters, "cpu")[0]


def test_lora_pairs_with_programmatic_dependent_launch_give_the_same_tokens(model_and_adapters):
    """EngineConfig.lora_pdl (programmatic dependent launch on compute capability 9.0+; elsewhere the
    same kernels without it): the tokens of the engine without it, eager and replayed from graphs."""
    model_dir, adapters = model_and_adapters
    plain, _ = _run(model_dir, adapters, "cuda")
    eager, _ = _run(model_dir, adapters, "cuda", cuda_graphs=False, lora_pdl=True)
    graphed, engine = _run(model_dir, adapters, "cuda", lora_pdl=True)
    assert engine.graphs is not None
    assert sum(n for (_, lora), n in engine.graphs.replays.items() if lora) > 0
    assert eager == plain
    assert graphed == plain
