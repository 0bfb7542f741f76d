"""Prefix caching: prompts that share a prefix with earlier ones skip its prefill, and get the tokens
they get without the cache (and from PEFT), whatever the adapter versions, the batch and the memory."""

from __future__ import annotations

import io
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import redis
import torch
from interpreter import require_interpreter
from peft import PeftModel
from rich.console import Console
from transformers import AutoModelForCausalLM

from lorafleet.producer import Keys, Producer
from lorafleet.worker.cli.top import render
from lorafleet.worker.engine import synthetic
from lorafleet.worker.engine.engine import Engine
from lorafleet.worker.engine.sequence import GenerationRequest
from lorafleet.worker.serve.config import WorkerConfig
from lorafleet.worker.serve.fleet import fleet_status

BLOCK = 8
ADAPTERS = [
    ("all-r4", 4, synthetic.ALL_TARGETS),
    ("qv-r8", 8, ("q", "v")),
    ("mlp-r8", 8, ("gate", "up", "down")),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per architecture: a model directory, its adapters, and a second version of the first adapter."""
    root = tmp_path_factory.mktemp("prefix")
    out = {}
    for arch in ("llama", "mistral"):
        extra = {"sliding_window": 6} if arch == "mistral" else {}
        model_dir = synthetic.write_model(root / arch, arch, "tiny", seed=5, **extra)
        adapters = {
            name: synthetic.write_adapter(root / f"{arch}-{name}", model_dir, rank=r, targets=t, seed=i)
            for i, (name, r, t) in enumerate(ADAPTERS)
        }
        updated = synthetic.write_adapter(root / f"{arch}-v2", model_dir, rank=4, seed=77)
        out[arch] = (model_dir, adapters, updated)
    return out


def _engine(model_dir, adapters, **kwargs):
    kwargs = {"max_loras": 4, "max_rank": 8, "device": "cpu", "dtype": torch.float32, "block_size": BLOCK,
              **kwargs}  # fmt: skip
    engine = Engine.from_pretrained(model_dir, **kwargs)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


_ORACLE: dict[tuple, list[int]] = {}


def _peft(model_dir, adapter_dir, prompt, new_tokens):
    """PEFT's greedy tokens for one request alone (memoised: the same request recurs across tests)."""
    key = (str(model_dir), str(adapter_dir), tuple(prompt), new_tokens)
    if key not in _ORACLE:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir)
        model.generation_config.eos_token_id = None  # like ignore_eos: EOS is a token like any other
        out = model.generate(
            input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new_tokens, do_sample=False, pad_token_id=synthetic.PAD_ID,
        )  # fmt: skip
        _ORACLE[key] = out[0, len(prompt) :].tolist()
    return _ORACLE[key]


def _tokens(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def _count_computed(engine):
    """Wrap the model's forward to record the tokens each step computes (test instrumentation)."""
    computed: list[int] = []
    forward = engine.model.forward

    def counting(batch, cache, slots):
        computed.append(batch.num_tokens)
        return forward(batch, cache, slots)

    engine.model.forward = counting
    return computed


def _run_in_waves(engine, waves, steps_between=2):
    """Add each wave of requests a few steps after the previous one (continuous batching); outputs by id."""
    for wave in waves:
        for request in wave:
            engine.add_request(request)
        for _ in range(steps_between):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    return {r.request_id: engine.pop_output(r.request_id) for wave in waves for r in wave}


def _assert_no_blocks_leak(engine):
    kv = engine.kv
    assert not engine.has_unfinished()
    assert kv.unreserved_blocks == kv.num_blocks
    assert kv.free_blocks + kv.index.idle == kv.num_blocks  # every block free or reclaimable
    assert not any(kv._refs)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_greedy_tokens_with_the_cache_equal_those_without_it_and_peft(models, arch):
    """Mixed adapters over one system prompt (shared by all, fully or in part), later requests joining
    while earlier ones that share their prefix still run: the same tokens with the cache, without it,
    and from PEFT, and the later requests skip the shared blocks' prefill."""
    model_dir, adapters, _ = models[arch]
    system = _tokens(27, seed=1)  # 3 full blocks and 3 tokens
    names = [None, "all-r4", "qv-r8", "mlp-r8"]

    def request(i, prompt, adapter):
        return GenerationRequest(prompt_ids=prompt, adapter=adapter, max_new_tokens=5, ignore_eos=True,
                                 request_id=f"r{i}")  # fmt: skip

    first = [request(i, system + _tokens(4, 10 + i), name) for i, name in enumerate(names)]
    later = [
        request(4, system + _tokens(6, 20), "all-r4"),  # the whole system prompt cached
        request(5, system[:19] + _tokens(5, 21), "qv-r8"),  # a part of it: 2 full blocks
        request(6, system + _tokens(3, 22), None),
        request(7, system + _tokens(4, 23), "mlp-r8"),
        request(8, system + _tokens(4, 24), "ko-none"),  # an adapter seen with no other prompt: no hit
    ]
    adapters = {**adapters, "ko-none": adapters["all-r4"]}  # the same weights under another name

    cached = _engine(model_dir, adapters)
    on = _run_in_waves(cached, [first, later])
    off = _run_in_waves(_engine(model_dir, adapters, prefix_cache=False), [first, later])
    for r in first + later:
        adapter_dir = adapters[r.adapter] if r.adapter else None
        expected = _peft(model_dir, adapter_dir, r.prompt_ids, r.max_new_tokens)
        assert on[r.request_id].token_ids == off[r.request_id].token_ids == expected, (arch, r.request_id)
        assert off[r.request_id].cached_tokens == 0
    assert [on[r.request_id].cached_tokens for r in first] == [0, 0, 0, 0]
    assert [on[r.request_id].cached_tokens for r in later] == [24, 16, 24, 24, 0]
    assert cached.prefix_stats == {
        "prompt_tokens": sum(len(r.prompt_ids) for r in first + later),
        "cached_tokens": 24 + 16 + 24 + 24,
    }
    _assert_no_blocks_leak(cached)


def test_an_updated_adapter_never_reads_blocks_of_its_old_version(models):
    """The same prompt on an adapter replaced by a new version between two jobs: no hit, the new
    version's tokens; then a hit on the new version's own blocks. A version re-registered under the
    worker's `name@version` keys is another adapter to the cache, and so is the base model."""
    model_dir, adapters, updated = models["llama"]
    prompt = _tokens(20, seed=3)
    engine = _engine(model_dir, {"tenant": adapters["all-r4"]})

    def run(adapter):
        req = GenerationRequest(prompt_ids=prompt, adapter=adapter, max_new_tokens=6, ignore_eos=True)
        return engine.generate([req])[0]

    old = run("tenant")
    assert old.token_ids == _peft(model_dir, adapters["all-r4"], prompt, 6)
    assert run("tenant").cached_tokens == 16  # the same version: a hit
    engine.add_adapter("tenant", updated)  # a new version under the same name
    new = run("tenant")
    assert new.cached_tokens == 0
    assert new.token_ids == _peft(model_dir, updated, prompt, 6) != old.token_ids
    again = run("tenant")
    assert (again.cached_tokens, again.token_ids) == (16, new.token_ids)
    assert run(None).cached_tokens == 0

    engine.add_adapter("tenant@v3", adapters["all-r4"])
    engine.remove_adapter("tenant@v3")
    engine.add_adapter("tenant@v3", updated)  # reloaded after a removal: a fresh key, never stale
    reloaded = run("tenant@v3")
    assert (reloaded.cached_tokens, reloaded.token_ids) == (0, new.token_ids)


def test_a_prompt_that_is_all_cached_still_computes_its_last_token(models):
    """A prompt equal to a cached prefix, ending on a block boundary or not: one token computed (for the
    first token's logits), written into a copy of the last shared block; the tokens are those of an
    uncached run. Chat turns that repeat the previous answer hit its blocks too."""
    model_dir, adapters, _ = models["llama"]
    engine = _engine(model_dir, adapters)
    computed = _count_computed(engine)
    base = _tokens(24, seed=4)  # 3 full blocks

    def run(prompt, new=6):
        req = GenerationRequest(prompt_ids=prompt, adapter="qv-r8", max_new_tokens=new, ignore_eos=True)
        return engine.generate([req])[0]

    def uncached(prompt, new=6):
        req = GenerationRequest(prompt_ids=prompt, adapter="qv-r8", max_new_tokens=new, ignore_eos=True)
        return _engine(model_dir, adapters, prefix_cache=False).generate([req])[0].token_ids

    first = run(base)
    computed.clear()
    whole = run(base)  # the prompt ends on a cached block
    assert whole.cached_tokens == 23
    assert computed[0] == 1
    assert whole.token_ids == first.token_ids
    computed.clear()
    part = run(base[:17])  # 2 cached blocks and one token
    assert part.cached_tokens == 16
    assert computed[0] == 1
    assert part.token_ids == uncached(base[:17])
    computed.clear()
    boundary = run(base[:16])  # ends on the second block
    assert boundary.cached_tokens == 15
    assert computed[0] == 1
    assert boundary.token_ids == uncached(base[:16])

    # A second turn: the first turn's prompt, its answer and a new message. The answer's blocks were
    # filled by decoding and are found too.
    turn1 = run(base, new=12)
    turn2 = base + turn1.token_ids + _tokens(5, seed=5)
    second = run(turn2)
    assert second.cached_tokens == (len(base) + 11) // BLOCK * BLOCK  # the last answer token has no K/V
    assert second.token_ids == uncached(turn2)
    _assert_no_blocks_leak(engine)


def test_eviction_under_memory_pressure_keeps_the_tokens_right(models):
    """A KV cache of a few blocks: prefixes are reclaimed least recently used first, the blocks running
    sequences share are never reclaimed, and every output matches the uncached one."""
    model_dir, adapters, _ = models["llama"]
    prompts = [_tokens(17, seed=30 + i) for i in range(4)]
    order = [0, 1, 0, 2, 3, 0, 1, 2, 3, 3]  # 4 prefixes of 2 blocks; room for about 2 of them when idle
    requests = [
        GenerationRequest(prompt_ids=prompts[p] + [i + 3], adapter=["all-r4", None][p % 2], max_new_tokens=6,
                          ignore_eos=True, request_id=f"e{i}")
        for i, p in enumerate(order)
    ]  # fmt: skip
    waves = [requests[i : i + 2] for i in range(0, len(requests), 2)]
    small = _engine(model_dir, adapters, kv_cache_tokens=8 * BLOCK)
    on = _run_in_waves(small, waves, steps_between=3)
    off = _run_in_waves(_engine(model_dir, adapters, prefix_cache=False), waves, steps_between=3)
    assert {k: o.token_ids for k, o in on.items()} == {k: o.token_ids for k, o in off.items()}
    hits = [on[r.request_id].cached_tokens for r in requests]
    assert small.kv.index.reclaimed > 0
    assert hits[2] == hits[9] == 16  # a prefix just used is found
    assert hits[6] == 0  # prefix 1, the least recently used, was reclaimed for prefixes 2 and 3
    _assert_no_blocks_leak(small)


def test_sharing_sequences_hold_the_same_blocks_and_write_only_their_own(models):
    """Two running sequences with one prefix hold its blocks (read-only, two holders); each writes its
    own tokens into blocks of its own. When both finish, the prefix stays findable, and its blocks go
    back to the pool when memory is needed."""
    model_dir, adapters, _ = models["llama"]
    engine = _engine(model_dir, adapters, kv_cache_tokens=12 * BLOCK)
    prefix = _tokens(16, seed=6)
    engine.generate([GenerationRequest(prompt_ids=[*prefix, 7], max_new_tokens=2)])
    a = engine.add_request(GenerationRequest(prompt_ids=[*prefix, 8, 9], max_new_tokens=12, ignore_eos=True))
    b = engine.add_request(GenerationRequest(prompt_ids=[*prefix, 10], max_new_tokens=12, ignore_eos=True))
    engine.step()
    seq_a, seq_b = engine._running
    assert seq_a.block_table[:2] == seq_b.block_table[:2]
    assert [engine.kv._refs[x] for x in seq_a.block_table[:2]] == [2, 2]
    assert not set(seq_a.block_table[2:]) & set(seq_b.block_table)
    # The promise covers what each may still need, so the rest of the cache is what is left to others.
    assert engine.kv.unreserved_blocks == 12 - 2 - 2 * 2  # shared prefix, then 2 more blocks each
    while engine.has_unfinished():
        engine.step()
    assert engine.pop_output(a).cached_tokens == engine.pop_output(b).cached_tokens == 16
    _assert_no_blocks_leak(engine)
    # A prompt that needs every block: the cached ones are reclaimed for it.
    big = GenerationRequest(prompt_ids=_tokens(12 * BLOCK - 3, seed=7), max_new_tokens=4, ignore_eos=True)
    assert engine.generate([big])[0].cached_tokens == 0
    assert engine.generate([GenerationRequest(prompt_ids=[*prefix, 8, 9])])[0].cached_tokens == 0
    _assert_no_blocks_leak(engine)


def test_seeded_sampling_is_the_same_with_and_without_the_cache(models):
    model_dir, adapters, _ = models["llama"]
    prompt = _tokens(30, seed=8)
    sampled = dict(prompt_ids=prompt, adapter="mlp-r8", max_new_tokens=10, temperature=0.9, top_k=40,
                   seed=4321, ignore_eos=True)  # fmt: skip
    cached = _engine(model_dir, adapters)
    cached.generate([GenerationRequest(**{**sampled, "seed": 1})])  # warms the prefix
    hit = cached.generate([GenerationRequest(**sampled)])[0]
    assert hit.cached_tokens == 24
    plain = _engine(model_dir, adapters, prefix_cache=False).generate([GenerationRequest(**sampled)])[0]
    assert hit.token_ids == plain.token_ids


def test_stop_strings_and_streamed_text_are_the_same_with_a_prefix_hit(models):
    """A request that finds its prompt's prefix cached stops at the same stop string, with the same
    streamed text, as without the cache."""
    model_dir, adapters, _ = models["llama"]
    prompt = _tokens(26, seed=12)

    def run(prefix_cache):
        engine = _engine(model_dir, adapters, prefix_cache=prefix_cache)
        free = GenerationRequest(prompt_ids=prompt, adapter="all-r4", max_new_tokens=12, ignore_eos=True)
        text = engine.generate([free])[0].text
        # two characters past its first third (bytes of random tokens may decode to replacement marks)
        stop = next(
            text[i : i + 2] for i in range(len(text) // 3, len(text)) if "\ufffd" not in text[i : i + 2]
        )
        request = GenerationRequest(prompt_ids=prompt, adapter="all-r4", max_new_tokens=12, stop=[stop],
                                    ignore_eos=True, stream_text=True, request_id="s")  # fmt: skip
        engine.add_request(request)
        streamed = []
        while engine.has_unfinished():
            streamed += [o.text for o in engine.step()]
        out = engine.pop_output("s")
        return out.cached_tokens, out.finish_reason, out.text, "".join(streamed), stop

    hit, reason, text, streamed, stop = run(prefix_cache=True)
    assert hit == 24
    assert (reason, streamed) == ("stop_string", text)
    assert stop not in text
    assert run(prefix_cache=False)[1:] == (reason, text, streamed, stop)


@pytest.mark.slow
def test_prefix_hits_under_the_triton_kernels_give_the_reference_results(models, monkeypatch):
    """Prefill of only the uncached suffix, attending over shared blocks, with the Triton paged
    attention and LoRA kernels (under the interpreter): the tokens of the torch reference path."""
    require_interpreter()
    model_dir, adapters, _ = models["llama"]
    system = _tokens(16, seed=9)
    waves = [
        [GenerationRequest(prompt_ids=[*system, 5], adapter="all-r4", max_new_tokens=3, request_id="a")],
        [GenerationRequest(prompt_ids=[*system, 6, 7], adapter="all-r4", max_new_tokens=3, request_id="b"),
         GenerationRequest(prompt_ids=system, adapter="all-r4", max_new_tokens=3, request_id="c")],
    ]  # fmt: skip
    reference = _run_in_waves(_engine(model_dir, adapters), waves, steps_between=1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton = _run_in_waves(_engine(model_dir, adapters), waves, steps_between=1)
    assert [triton[k].cached_tokens for k in "abc"] == [0, 16, 15]
    assert {k: o.token_ids for k, o in triton.items()} == {k: o.token_ids for k, o in reference.items()}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_worker(model_dir, adapters_dir, redis_url, name, *extra):
    args = [
        sys.executable, "-P", "-m", "lorafleet.producer.cli", "worker", "--redis-url", redis_url,
        "--model", str(model_dir), "--adapters", str(adapters_dir), "--name", name, "--max-loras", "2",
        "--kv-cache-tokens", "2048", *extra,
    ]  # fmt: skip
    env = {**os.environ, "LORAFLEET_CACHE_DIR": str(adapters_dir.parent / f"cache-{name}")}
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("cache", [True, False])
def test_a_worker_reports_cached_prompt_tokens_in_usage_metrics_and_top(models, tmp_path, redis_url, cache):
    """A real worker process: the second job with the same prompt prefix reports its cached tokens in
    the result's usage, in the Prometheus counters and in the fleet directory that `lorafleet top`
    draws; with --no-prefix-cache none, and the same tokens."""
    model_dir, adapters, _ = models["llama"]
    store = tmp_path / "adapters"
    shutil.copytree(adapters["qv-r8"], store / "tenant")
    port = _free_port()
    extra = ("--metrics-port", str(port)) + (() if cache else ("--no-prefix-cache",))
    proc = _start_worker(model_dir, store, redis_url, "w1", *extra)
    try:
        system = _tokens(40, seed=11)
        with Producer(redis_url) as producer:
            results = [
                producer.submit_many([dict(prompt_ids=system + turn, adapter="tenant", max_new_tokens=4,
                                           temperature=0.0)])[0].result(timeout=120)
                for turn in ([5, 6], [7, 8, 9])
            ]  # fmt: skip
        assert [r.usage.cached_tokens for r in results] == ([0, 32] if cache else [0, 0])
        for r, turn in zip(results, ([5, 6], [7, 8, 9]), strict=True):
            assert list(r.token_ids) == _peft(model_dir, adapters["qv-r8"], system + turn, 4)
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'lorafleet_prompt_tokens_total{adapter="tenant"} 85.0' in scraped
        cached = 32 if cache else 0
        assert f'lorafleet_cached_prompt_tokens_total{{adapter="tenant"}} {cached}.0' in scraped
        client = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the next heartbeat carries the totals
            (entry,) = fleet_status(client, Keys())["workers"]
            if entry["prompt_tokens"] == 85:
                break
            time.sleep(0.2)
        assert (entry["prompt_tokens"], entry["cached_tokens"]) == (85, cached)
        console = Console(record=True, width=200, file=io.StringIO())
        console.print(render(fleet_status(client, Keys())))
        frame = console.export_text()
        assert f"prefix hits {100 * cached / 85:.1f}%" in frame
    finally:
        proc.kill()
        proc.wait()


def test_the_prefix_cache_is_on_unless_the_worker_variable_turns_it_off():
    env = {"LORAFLEET_MODEL": "m", "LORAFLEET_ADAPTERS": "a"}
    assert WorkerConfig.from_env(env=env).prefix_cache is True
    assert WorkerConfig.from_env(env={**env, "LORAFLEET_NO_PREFIX_CACHE": "1"}).prefix_cache is False
    assert WorkerConfig.from_env(env={**env, "LORAFLEET_NO_PREFIX_CACHE": "false"}).prefix_cache is True
    assert WorkerConfig.from_env({"prefix_cache": False}, env=env).prefix_cache is False  # the flag
    with pytest.raises(ValueError, match="LORAFLEET_NO_PREFIX_CACHE='maybe' is not on/off"):
        WorkerConfig.from_env(env={**env, "LORAFLEET_NO_PREFIX_CACHE": "maybe"})
