"""`lorafleet worker` processes against a real Redis: answers, crashes, drains, bad input."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import redis
import torch

from lorafleet.producer import Chunk, ErrorCode, JobFailed, Keys, Producer, Result
from lorafleet.producer.consumer import read_jobs
from lorafleet.worker.engine import synthetic
from lorafleet.worker.engine.engine import Engine
from lorafleet.worker.engine.sequence import GenerationRequest
from lorafleet.worker.serve import fleet

ADAPTERS = [f"team-{i}" for i in range(5)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny model and a folder of adapters (more adapters than the workers' slots)."""
    root = tmp_path_factory.mktemp("store")
    model = synthetic.write_model(root / "model", "llama", "tiny", seed=11)
    adapters = root / "adapters"
    for i, name in enumerate(ADAPTERS):
        synthetic.write_adapter(adapters / name, model, rank=2 + 2 * i, targets=synthetic.ALL_TARGETS, seed=i)
    return model, adapters


def start_worker(store, redis_url, name, *extra, stderr=None):
    model, adapters = store
    args = [
        sys.executable, "-P", "-m", "lorafleet.producer.cli", "worker", "--redis-url", redis_url,
        "--model", str(model),
        "--adapters", str(adapters), "--name", name, "--max-loras", "2", "--max-batch", "6",
        "--kv-cache-tokens", "4096", "--visibility-timeout", "2", "--drain-timeout", "20", *extra,
    ]  # fmt: skip
    env = {**os.environ, "LORAFLEET_CACHE_DIR": str(model.parent / "cache")}
    if stderr is None:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=None, env=env)
    with open(stderr, "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=env)


@pytest.fixture
def workers(store, redis_url):
    started: list[subprocess.Popen] = []

    def start(name, *extra, stderr=None):
        proc = start_worker(store, redis_url, name, *extra, stderr=stderr)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def expected_tokens(store, prompt_ids, adapter, max_new_tokens):
    model, adapters = store
    engine = Engine.from_pretrained(model, max_loras=1, max_rank=16, device="cpu", dtype=torch.float32)
    if adapter is not None:
        engine.add_adapter(adapter, adapters / adapter)
    request = GenerationRequest(prompt_ids=prompt_ids, adapter=adapter, max_new_tokens=max_new_tokens)
    return engine.generate([request])[0].token_ids


def test_jobs_over_more_adapters_than_slots_are_all_answered_correctly(store, redis_url, workers):
    workers("w1")
    specs = [
        dict(
            prompt_ids=[5 + i, 9, 13, 2 + i],
            adapter=[None, *ADAPTERS][i % 6],
            max_new_tokens=6,
            temperature=0.0,
        )
        for i in range(18)
    ]
    with Producer(redis_url) as producer:
        handles = producer.submit_many(specs)
        results = [h.result(timeout=120) for h in handles]
    for spec, result in zip(specs, results, strict=True):
        assert isinstance(result, Result)
        assert list(result.token_ids) == expected_tokens(store, spec["prompt_ids"], spec["adapter"], 6)
        assert result.worker == "w1"
        assert result.usage.completion_tokens == len(result.token_ids)
        # the version the job ran on: the adapter's content version; none for the base model
        assert (result.adapter_version is None) == (spec["adapter"] is None)
        if spec["adapter"] is not None:
            assert len(result.adapter_version) >= 8


def test_text_prompts_chat_messages_and_streaming(store, redis_url, workers):
    workers("w1")
    with Producer(redis_url) as producer:
        text = producer.submit("the quick brown fox", adapter="team-1", max_new_tokens=5, temperature=0.0)
        chat = producer.submit(
            messages=[{"role": "user", "content": "hello"}], max_new_tokens=4, temperature=0
        )
        streamed = producer.submit(prompt_ids=[5, 6, 7], max_new_tokens=8, temperature=0.0, stream=True,
                                   ignore_eos=True)  # fmt: skip
        items = list(streamed.stream(timeout=120))
        assert text.result(timeout=120).usage.completion_tokens >= 1
        assert chat.result(timeout=120).usage.prompt_tokens > 3
    chunks = [i for i in items if isinstance(i, Chunk)]
    final = items[-1]
    assert isinstance(final, Result)
    assert len(chunks) >= 1
    streamed_ids = [t for c in chunks for t in c.token_ids]
    streamed_text = "".join(c.text for c in chunks)
    assert streamed_ids == list(final.token_ids)
    assert streamed_text == final.text


def test_sigkill_mid_generation_every_job_answered_exactly_once(store, redis_url, workers):
    first = workers("doomed")
    specs = [dict(prompt_ids=[7, 8, i + 3], adapter=ADAPTERS[i % 3], max_new_tokens=120, ignore_eos=True,
                  temperature=0.0, stream=True) for i in range(4)]  # fmt: skip
    with Producer(redis_url) as producer:
        handles = producer.submit_many(specs)
        stream = handles[0].stream(timeout=120)
        assert isinstance(next(stream), Chunk)  # generation is under way on the doomed worker
        first.send_signal(signal.SIGKILL)
        first.wait()
        workers("rescuer")
        results = {}
        for handle in handles:
            final = [x for x in handle.stream(timeout=180) if isinstance(x, Result)]
            results[handle.id] = final
    assert all(len(final) == 1 for final in results.values())
    assert {final[0].worker for final in results.values()} == {"rescuer"}
    assert all(len(final[0].token_ids) == 120 for final in results.values())


def test_a_worker_restarted_mid_run_under_its_own_name_answers_every_job_once(store, redis_url, workers):
    first = workers("phoenix")
    specs = [dict(prompt_ids=[6, 7, i + 3], adapter=ADAPTERS[i % 2], max_new_tokens=80, ignore_eos=True,
                  temperature=0.0, stream=True) for i in range(4)]  # fmt: skip
    with Producer(redis_url) as producer:
        handles = producer.submit_many(specs)
        assert isinstance(next(handles[0].stream(timeout=120)), Chunk)
        first.send_signal(signal.SIGKILL)
        first.wait()
        workers("phoenix")  # the same consumer name: its own pending jobs come back to it
        finals = {h.id: [x for x in h.stream(timeout=180) if isinstance(x, Result)] for h in handles}
    assert all(len(final) == 1 and len(final[0].token_ids) == 80 for final in finals.values())


def test_sigterm_drains_in_flight_jobs(store, redis_url, workers):
    worker = workers("drainer")
    with Producer(redis_url) as producer:
        handles = producer.submit_many(
            [dict(prompt_ids=[4, 5, i + 3], max_new_tokens=60, ignore_eos=True, temperature=0.0, stream=True)
             for i in range(3)]
        )  # fmt: skip
        assert isinstance(next(handles[0].stream(timeout=120)), Chunk)
        worker.send_signal(signal.SIGTERM)
        results = [h.result(timeout=60) for h in handles]
        assert worker.wait(timeout=60) == 0
    assert all(r.worker == "drainer" and len(r.token_ids) == 60 for r in results)
    keys = Keys()
    client = redis.Redis.from_url(redis_url, protocol=2)
    assert not client.exists(keys.worker("drainer"))  # left the fleet directory


def test_bad_input_gets_error_replies_and_the_worker_goes_on(store, redis_url, workers):
    keys = Keys()
    client = redis.Redis.from_url(redis_url, protocol=2)
    with Producer(redis_url) as producer:
        expired = producer.submit(prompt_ids=[5, 6], max_new_tokens=3, timeout=0.2)
        time.sleep(0.3)  # its deadline passes before any worker runs
        workers("sturdy")
        unknown = producer.submit(prompt_ids=[5, 6], adapter="no-such-adapter", max_new_tokens=3)
        too_long = producer.submit(prompt_ids=[5] * 600, max_new_tokens=3)
        # Undecodable bytes straight onto a job stream: nobody to answer, so a dead letter.
        stream = keys.jobs(None)
        client.xadd(stream, {"j": b"\xc1not msgpack"})
        client.zadd(keys.waiting, {"~base": 1}, nx=True)
        client.xadd(keys.wake, {"q": "~base"})
        for handle, code in [(unknown, ErrorCode.ADAPTER_NOT_FOUND), (too_long, ErrorCode.PROMPT_TOO_LONG),
                             (expired, ErrorCode.DEADLINE_EXCEEDED)]:  # fmt: skip
            with pytest.raises(JobFailed) as failure:
                handle.result(timeout=60)
            assert failure.value.code == code
        good = producer.submit(prompt_ids=[5, 6, 7], max_new_tokens=4, temperature=0.0)
        assert isinstance(good.result(timeout=60), Result)
    deadline = time.time() + 10
    while client.xlen(keys.dead) == 0 and time.time() < deadline:
        time.sleep(0.1)
    dead = client.xrange(keys.dead)
    assert len(dead) == 1
    assert dead[0][1][b"j"] == b"\xc1not msgpack"


def test_cancel_stops_a_running_job(store, redis_url, workers):
    workers("w1")
    with Producer(redis_url) as producer:
        handle = producer.submit(prompt_ids=[5, 6, 7], max_new_tokens=2000, ignore_eos=True, stream=True,
                                 temperature=0.0)  # fmt: skip
        stream = handle.stream(timeout=120)
        assert isinstance(next(stream), Chunk)
        handle.cancel()
        with pytest.raises(JobFailed) as failure:
            for _ in stream:
                pass
        assert failure.value.code == ErrorCode.CANCELLED


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text, name):
    """The value of one sample of the Prometheus text `text` (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_status_shows_the_fleet_and_metrics_are_served(store, redis_url, workers):
    port = free_port()
    workers("observed", "--metrics-port", str(port))
    with Producer(redis_url) as producer:
        result = producer.submit(prompt_ids=[5, 6], adapter="team-2", max_new_tokens=3).result(timeout=120)
    time.sleep(1.5)  # one heartbeat after the job
    out = subprocess.run(
        [sys.executable, "-P", "-m", "lorafleet.producer.cli", "status", "--redis-url", redis_url],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "observed" in out.stdout
    assert "team-2" in out.stdout
    status = json.loads(
        subprocess.run(
            [sys.executable, "-P", "-m", "lorafleet.producer.cli", "status", "--redis-url", redis_url,
             "--json"],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    (entry,) = status["workers"]
    assert entry["id"] == "observed"
    assert "team-2" in entry["resident"]
    assert status["dead_letters"] == 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert metric(text, "lorafleet_queue_wait_seconds_count") == 1
    assert metric(text, "lorafleet_ttft_seconds_count") == 1
    assert metric(text, "lorafleet_tokens_total") == result.usage.completion_tokens
    assert metric(text, 'lorafleet_adapter_loads_total{adapter="team-2"}') == 1
    assert metric(text, 'lorafleet_adapter_resident{adapter="team-2"}') == 1
    assert metric(text, 'lorafleet_jobs_total{adapter="team-2"}') == 1
    assert metric(text, "lorafleet_batch_size_count") >= 1


def test_a_job_delivered_too_often_goes_to_the_dead_letter_stream_with_an_error_reply(
    store, redis_url, workers, tmp_path
):
    keys = Keys()
    port = free_port()
    log_file = tmp_path / "judge.log"
    client = redis.Redis.from_url(redis_url, protocol=2)
    with Producer(redis_url) as producer:
        handle = producer.submit(prompt_ids=[5, 6], adapter="team-0", max_new_tokens=3, metadata={"t": 7})
        # A worker that took the job and died without a trace: delivered once, never acknowledged.
        stream = keys.jobs("team-0")
        client.xreadgroup(keys.group, "vanished", {stream: ">"}, count=1)
        workers("judge", "--max-deliveries", "1", "--metrics-port", str(port), "--log-level", "debug",
                stderr=log_file)  # fmt: skip
        with pytest.raises(JobFailed) as failure:
            handle.result(timeout=60)
    assert failure.value.code == ErrorCode.WORKER_ERROR
    assert "delivered 2 times" in str(failure.value)
    assert failure.value.reply.metadata == {"t": 7}  # echoed, as on every reply
    dead = client.xrange(keys.dead)
    assert len(dead) == 1
    assert client.xpending(stream, keys.group)["pending"] == 0  # acknowledged, not left pending
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert metric(text, "lorafleet_redeliveries_total") == 1
    assert metric(text, "lorafleet_dead_letters_total") == 1
    # JSON log lines bound with the job, its adapter and the worker
    deadline = time.monotonic() + 10
    while True:  # the worker logs before it answers; allow for the file on a loaded machine anyway
        lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]
        dead = [e for e in lines if e.get("event") == "dead-lettered"]
        if dead or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    (dead,) = dead
    assert (dead["job"], dead["adapter"], dead["worker"]) == (handle.job.id, "team-0", "judge")


# ----- in process, turn by turn: the worker loop's decisions without the races of a subprocess -----


@pytest.fixture
def inproc(store, redis_url, tmp_path, monkeypatch):
    """make(**settings) -> a Worker in this process (2 adapter slots, batch 6); shut down at teardown."""
    from lorafleet.worker.serve.config import WorkerConfig
    from lorafleet.worker.serve.worker import Worker

    monkeypatch.setenv("LORAFLEET_CACHE_DIR", str(tmp_path / "cache"))
    made = []

    def make(**settings):
        model, adapters = store
        options = dict(adapters=str(adapters), name="inproc", max_loras=2, max_batch=6, kv_cache_tokens=4096)
        config = WorkerConfig(model=str(model), redis_url=redis_url, **{**options, **settings})
        made.append(Worker(config))
        return made[-1]

    yield make
    for worker in made:
        worker._shutdown()


def turn_until(worker, done, timeout=120.0):
    """Run loop turns until done(); a turn that raises is what the loop would log and retry forever."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        worker.turn()


def test_cold_adapters_fetched_together_never_overfill_the_adapter_slots(
    store, redis_url, inproc, monkeypatch
):
    """Every first job of an adapter waits for its fetch (parked); the slot its load took must stay
    taken meanwhile, or later plans load more adapters than there are slots (the worker then failed
    every turn with "3 adapters resident in 2 adapter_slots")."""
    worker = inproc()
    store_open = threading.Event()  # fetches wait for it: a slow store
    fetch = worker.adapters._fetch
    monkeypatch.setattr(worker.adapters, "_fetch", lambda load: (store_open.wait(30), fetch(load)))
    keys = Keys()
    client = redis.Redis.from_url(redis_url, protocol=2)
    specs = [
        dict(prompt_ids=[5, 6, 3 + i], adapter=ADAPTERS[i // 2], max_new_tokens=3, temperature=0.0)
        for i in range(10)
    ]

    def answered():
        assert len(worker.engine.resident_adapters) <= 2
        return not any(client.xlen(keys.jobs(a)) for a in ADAPTERS)

    try:
        with Producer(redis_url) as producer:
            handles = producer.submit_many(specs)
            for _ in range(20):
                worker.turn()
            assert len({p.job.adapter for p in worker.parked.values()}) == 2  # one per adapter slot
            time.sleep(0.3)  # a wait for the store that the parked jobs' timings must show
            store_open.set()
            turn_until(worker, answered)
            results = [h.result(timeout=10) for h in handles]
    finally:
        store_open.set()
    for spec, result in zip(specs, results, strict=True):
        assert list(result.token_ids) == expected_tokens(store, spec["prompt_ids"], spec["adapter"], 3)
    # the wait for the adapter is adapter_load: neither queue_wait nor prefill
    waited = [r.timings for r in results if r.timings.adapter_load >= 0.3]
    assert waited
    assert all(t.prefill < t.adapter_load for t in waited)
    assert all(t.queue_wait < t.adapter_load for t in waited)


def test_no_compute_for_a_job_cancelled_or_expired_before_it_ran(redis_url, inproc, monkeypatch):
    """A job cancelled while still queued, one cancelled while it waits for its adapter, and one
    whose deadline passes while it waits: each gets its error reply and never reaches the engine."""
    worker = inproc()
    store_open = threading.Event()  # fetches wait for it: a slow store
    fetch = worker.adapters._fetch
    monkeypatch.setattr(worker.adapters, "_fetch", lambda load: (store_open.wait(30), fetch(load)))
    added = []
    add_request = worker.engine.add_request
    monkeypatch.setattr(
        worker.engine, "add_request", lambda request: added.append(request) or add_request(request)
    )
    try:
        with Producer(redis_url) as producer:
            queued = producer.submit(prompt_ids=[5, 6], max_new_tokens=3)
            queued.cancel()  # before any worker read it
            parked = producer.submit(prompt_ids=[5, 6], adapter="team-3", max_new_tokens=3)
            expiring = producer.submit(prompt_ids=[5, 6], adapter="team-4", max_new_tokens=3, timeout=3.0)
            for _ in range(10):
                worker.turn()
            assert {p.job.id for p in worker.parked.values()} == {parked.id, expiring.id}
            parked.cancel()
            time.sleep(max(0.0, expiring.job.deadline - time.time()) + 0.05)
            turn_until(worker, lambda: not worker.parked, timeout=30)
            codes = {}
            for handle in (queued, parked, expiring):
                with pytest.raises(JobFailed) as failure:
                    handle.result(timeout=10)
                codes[handle.id] = failure.value.code
    finally:
        store_open.set()
    assert codes[queued.id] == ErrorCode.CANCELLED
    assert codes[parked.id] == ErrorCode.CANCELLED
    assert codes[expiring.id] == ErrorCode.DEADLINE_EXCEEDED
    assert added == []  # none of them reached the engine


def test_a_drain_that_runs_out_of_time_hands_a_running_job_to_another_worker(redis_url, inproc):
    """SIGTERM with a job that outlives the drain timeout: the job is handed back and answered once,
    in full, by another worker."""
    draining = inproc(name="draining", drain_timeout=0.3, visibility_timeout=2.0)
    launch = draining.engine.launch  # the worker's turn runs a step as launch, then finish
    draining.engine.launch = lambda: (time.sleep(0.005), launch())[1]  # 300 steps outlast the drain
    with Producer(redis_url) as producer:
        handle = producer.submit(prompt_ids=[5, 6, 7], max_new_tokens=300, ignore_eos=True, temperature=0.0)
        turn_until(draining, lambda: any(j.token_ids for j in draining.running.values()))
        draining._on_signal(signal.SIGTERM, None)
        turn_until(
            draining, lambda: not draining.running and not draining.engine.has_unfinished(), timeout=30
        )
        draining.wait_replies()
        other = inproc(name="other", visibility_timeout=2.0)
        turn_until(other, lambda: bool(other.running), timeout=30)
        turn_until(other, lambda: not other.running, timeout=120)
        result = handle.result(timeout=10)
    assert result.worker == "other"
    assert len(result.token_ids) == 300


def test_a_job_running_longer_than_the_visibility_timeout_keeps_its_claim(redis_url, inproc):
    """The worker refreshes the claims of its running jobs: a live second worker never takes over a
    job that runs for several visibility timeouts, and the job is answered once, by its worker."""
    busy = inproc(name="busy", visibility_timeout=1.5)
    launch = busy.engine.launch
    busy.engine.launch = lambda: (time.sleep(0.01), launch())[1]  # 250 steps: 2 visibility timeouts or more
    idle = inproc(name="idle", visibility_timeout=1.5, idle_block=0.05)
    with Producer(redis_url) as producer:
        handle = producer.submit(prompt_ids=[5, 6, 7], max_new_tokens=250, ignore_eos=True, temperature=0.0)
        turn_until(busy, lambda: bool(busy.running))
        started = time.monotonic()
        for turn in itertools.count():
            if not busy.running:
                break
            busy.turn()
            if turn % 10 == 0:  # (an idle turn blocks for idle_block)
                idle.turn()
                assert not idle.running  # never claimed away
        assert time.monotonic() - started > 2.0  # it did outlive the visibility timeout
        result = handle.result(timeout=10)
    assert result.worker == "busy"
    assert len(result.token_ids) == 250
    assert idle.metrics.registry.get_sample_value("lorafleet_redeliveries_total") == 0


def test_a_worker_does_not_take_its_own_running_job_for_a_stale_one(redis_url, inproc):
    """If a running job's claim goes stale (a turn longer than the refresh period), the worker's
    own recovery pass claims it back without starting it a second time."""
    worker = inproc(visibility_timeout=2.0)
    client = redis.Redis.from_url(redis_url, protocol=2)
    with Producer(redis_url) as producer:
        handle = producer.submit(prompt_ids=[5, 6, 7], max_new_tokens=40, ignore_eos=True, temperature=0.0)
        turn_until(worker, lambda: worker.engine.num_running == 1)
        (job,) = worker.running.values()
        client.xclaim(
            job.delivery.stream, Keys.GROUP, "inproc", 0, [job.delivery.entry_id], idle=60_000, justid=True
        )
        worker._next["recover"] = 0.0
        worker.turn()
        assert worker.engine.num_running + worker.engine.num_waiting == 1  # not started twice
        turn_until(worker, lambda: not worker.running)
        assert len(handle.result(timeout=10).token_ids) == 40
    assert worker.metrics.registry.get_sample_value("lorafleet_redeliveries_total") == 0


def test_deadline_stops_a_running_job_at_the_next_step(redis_url, inproc):
    worker = inproc()
    with Producer(redis_url) as producer:
        handle = producer.submit(prompt_ids=[5, 6, 7], max_new_tokens=400, ignore_eos=True, stream=True,
                                 temperature=0.0, timeout=3.0)  # fmt: skip
        turn_until(worker, lambda: any(j.token_ids for j in worker.running.values()))
        time.sleep(max(0.0, handle.job.deadline - time.time()) + 0.05)
        turn_until(worker, lambda: not worker.running and not worker.engine.has_unfinished(), timeout=30)
        chunks: list[Chunk] = []
        with pytest.raises(JobFailed) as failure:
            chunks.extend(handle.stream(timeout=10))  # the chunks, then the error reply raises
    assert failure.value.code == ErrorCode.DEADLINE_EXCEEDED
    assert 1 <= sum(len(c.token_ids) for c in chunks) < 400  # it ran, and stopped early


def test_a_cancel_stops_a_running_job_within_steps_and_a_bare_marker_within_the_poll(
    redis_url, inproc, monkeypatch
):
    """Producer.cancel bumps {ns}:cancels: the job stops within three loop turns (the step whose
    replies read the moved counter, the turn that sees it, the step that aborts), long before the
    poll. A producer that only sets the marker (older or hand-written) is honoured within the poll."""
    from lorafleet.worker.serve import worker as service

    monkeypatch.setattr(service, "CANCEL_POLL_S", 1000.0)  # first no poll: only the counter can stop it
    worker = inproc()
    keys = Keys()
    client = redis.Redis.from_url(redis_url, protocol=2)
    with Producer(redis_url) as producer:
        counted, bare = (
            producer.submit(prompt_ids=[5, 6, 7 + i], max_new_tokens=400, ignore_eos=True, temperature=0.0)
            for i in range(2)
        )
        turn_until(worker, lambda: len(worker.running) == 2 and worker.engine.num_running == 2)
        for _ in range(3):  # running, and the counter has been read with a step
            worker.turn()
        counted.cancel()
        # Then a short poll (a 400-token job on the tiny CPU model can finish within the default
        # second); it starts with the marker read that the moved counter causes.
        monkeypatch.setattr(service, "CANCEL_POLL_S", 0.1)
        for _ in range(3):
            # (the sender thread sends a step's replies, and reads the counter, while the next turn
            # runs; on a loaded machine it can lag a turn behind, so each turn starts once it is done)
            worker.wait_replies()
            worker.turn()
            if {j.job.id for j in worker.running.values()} == {bare.id}:
                break
        assert {j.job.id for j in worker.running.values()} == {bare.id}
        client.set(keys.cancel(bare.id), b"1", ex=60)  # no INCR
        started = time.monotonic()
        turn_until(worker, lambda: not worker.running, timeout=30)
        assert time.monotonic() - started < service.CANCEL_POLL_S + 5
        for handle in (counted, bare):
            with pytest.raises(JobFailed) as failure:
                handle.result(timeout=10)
            assert failure.value.code == ErrorCode.CANCELLED


def test_a_busy_turn_does_its_redis_work_while_the_engine_step_runs(redis_url, inproc):
    """With sequences running, a turn launches the engine step, then does housekeeping and admission
    (Redis round trips, overlapping the GPU's step), then finishes the step: a job submitted
    meanwhile is admitted there and joins the next step."""
    worker = inproc()
    calls: list[str] = []
    for name, owner in (
        ("launch", worker.engine),
        ("finish", worker.engine),
        ("_housekeeping", worker),
        ("admit", worker.intake),
    ):
        real = getattr(owner, name)

        def traced(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        setattr(owner, name, traced)
    spec = dict(max_new_tokens=30, ignore_eos=True, temperature=0.0)
    with Producer(redis_url) as producer:
        first = producer.submit(prompt_ids=[5, 6, 7], **spec)
        turn_until(worker, lambda: worker.engine.num_running == 1)
        second = producer.submit(prompt_ids=[5, 6, 8], **spec)
        calls.clear()
        worker.turn()
        assert calls == ["launch", "_housekeeping", "admit", "finish"]
        assert worker.engine.num_waiting == 1  # admitted during the step, runs from the next one
        turn_until(worker, lambda: not worker.running, timeout=60)
        assert len(first.result(timeout=10).token_ids) == len(second.result(timeout=10).token_ids) == 30


def test_running_jobs_cost_no_marker_reads_while_nobody_cancels(redis_url, inproc):
    """With no cancel counter in Redis yet (nobody ever cancelled), a step reads the counter with its
    replies and nothing else: no MGET of every running job's marker per step."""
    worker = inproc()
    client = redis.Redis.from_url(redis_url, protocol=2)
    assert client.get(Keys().cancels) is None
    with Producer(redis_url) as producer:
        handles = [
            producer.submit(prompt_ids=[5, 6, 7 + i], max_new_tokens=400, ignore_eos=True, temperature=0.0)
            for i in range(2)
        ]
        turn_until(worker, lambda: len(worker.running) == 2 and worker.engine.num_running == 2)
        for _ in range(3):  # until a turn has seen the counter read with a step's replies
            worker.turn()
        worker.wait_replies()
        client.config_resetstat()
        for _ in range(10):
            worker.turn()
        worker.wait_replies()
        mgets = client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0)
        assert len(worker.running) == 2
        assert mgets == 10  # the counter, once per step
        for handle in handles:
            handle.cancel()
        turn_until(worker, lambda: not worker.running, timeout=30)


def test_streamed_text_adds_up_to_the_result_and_holds_back_a_stop_string_in_the_making(redis_url, inproc):
    """The chunks' text is the result's text, also when a stop string that spans several tokens
    ends the job: its beginning, streamed as it came, would be text the result does not have."""
    worker = inproc()
    tokenizer = worker.engine.tokenizer
    spec = dict(prompt_ids=[5, 6, 7], max_new_tokens=24, ignore_eos=True, temperature=0.0)
    with Producer(redis_url) as producer:
        free = producer.submit(**spec)
        turn_until(worker, lambda: bool(worker.running))
        turn_until(worker, lambda: not worker.running)
        result = free.result(timeout=30)
        text, ids = result.text, list(result.token_ids)
        # a stop string whose first characters are text before the token that completes it
        prefixes = [tokenizer.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]
        stop = next(
            text[i : i + 5]
            for i in range(len(text) // 3, len(text) - 5)
            if "\ufffd" not in text[i : i + 5]
            and text[i : i + 5].strip()
            and any(p.endswith(text[i : i + 2]) and len(p) == i + 2 for p in prefixes)
        )
        streamed = producer.submit(**spec, stream=True, stop=[stop])
        turn_until(worker, lambda: bool(worker.running))
        turn_until(worker, lambda: not worker.running)
        items = list(streamed.stream(timeout=30))
    chunks, final = items[:-1], items[-1]
    assert final.finish_reason == "stop_string"
    assert final.text == text[: text.find(stop)]
    assert "".join(c.text for c in chunks) == final.text
    assert [t for c in chunks for t in c.token_ids] == list(final.token_ids)
    assert [c.seq for c in chunks] == list(range(len(chunks)))


def test_a_streamed_job_with_stop_strings_has_its_tokens_decoded_once(redis_url, inproc, monkeypatch):
    """One decoder per job, in the engine: the stop-string search and the stream's text share it, and
    it decodes each new token once (the tokenizer's incremental decode stream), never the output so
    far again. Per step, neither a streamed job nor one with stop strings calls the full decode."""
    worker = inproc()
    tokenizer = worker.engine.tokenizer
    calls = []
    real_decode = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    spec = dict(prompt_ids=[5, 6, 7], max_new_tokens=40, ignore_eos=True, temperature=0.0, stream=True)

    def decodes_per_step(**extra):
        with Producer(redis_url) as producer:
            handle = producer.submit(**spec, **extra)
            turn_until(worker, lambda: bool(worker.running) and worker.engine.num_running == 1)
            for _ in range(3):  # past the first steps (prefill, the decoders' first windows)
                worker.turn()
            calls.clear()
            for _ in range(10):
                worker.turn()
            per_step = len(calls) / 10
            turn_until(worker, lambda: not worker.running)
            items = list(handle.stream(timeout=30))
        assert "".join(c.text for c in items[:-1]) == items[-1].text
        return per_step

    plain = decodes_per_step()
    with_stops = decodes_per_step(stop=["no such text \u2603", "nor this"])
    assert plain == with_stops == 0


def test_engine_steps_that_keep_failing_hand_the_jobs_back_and_then_stop_the_worker(redis_url, inproc):
    """Three failed steps in a row hand every running job back to the queue (not held forever with
    its claim refreshed); they run again once steps succeed. An engine that fails whatever it runs
    (three hand-backs without a token) stops the worker, so that its supervisor restarts it."""
    from lorafleet.worker.serve import worker as service

    worker = inproc(visibility_timeout=2.0)
    failing = threading.Event()
    real_launch = worker.engine.launch

    def launch():
        if failing.is_set():
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_launch()

    worker.engine.launch = launch
    spec = dict(max_new_tokens=12, ignore_eos=True, temperature=0.0)
    with Producer(redis_url) as producer:
        handles = [producer.submit(prompt_ids=[5, 6, 7 + i], **spec) for i in range(2)]
        turn_until(worker, lambda: len(worker.running) == 2 and worker.engine.num_running == 2)
        failing.set()
        for _ in range(service.STEP_FAILURES_BEFORE_HAND_BACK):
            with pytest.raises(RuntimeError, match="simulated"):
                worker.turn()
        assert not worker.running
        failing.clear()
        # Claimed again at once, before the engine retired their aborted sequences: each must run
        # as a new request, not be taken for its old sequence (and bounced back to the queue).
        worker._next["recover"] = 0.0
        worker.turn()
        assert len(worker.running) == 2
        results = []
        deadline = time.monotonic() + 60
        while len(results) < 2:
            assert time.monotonic() < deadline, "the handed-back jobs did not run again"
            worker.turn()
            results = [r for r in (_result_now(h) for h in handles) if r is not None]
        assert [len(r.token_ids) for r in results] == [12, 12]

        producer.submit(prompt_ids=[9, 9], **spec)
        turn_until(worker, lambda: bool(worker.running))
        failing.set()
        turns = service.STEP_FAILURES_BEFORE_HAND_BACK * service.HAND_BACKS_BEFORE_EXIT
        for _ in range(turns - 1):
            with contextlib.suppress(RuntimeError):
                worker.turn()
        with pytest.raises(service.EngineBroken):
            worker.turn()
        assert not worker.running
        client = redis.Redis.from_url(redis_url, protocol=2)
        pending = client.xpending_range(Keys().jobs_of_queue("~base"), Keys.GROUP, "-", "+", 10)
        assert [p["consumer"] for p in pending] == [b"released"]  # handed back, for another worker


def _result_now(handle):
    """The handle's result if its final reply is in, else None (no waiting)."""
    try:
        return handle.result(timeout=0.01)
    except TimeoutError:
        return None


def test_an_adapter_that_cannot_be_loaded_gets_adapter_invalid_and_the_worker_goes_on(
    store, redis_url, inproc, tmp_path
):
    model, _ = store
    adapters = tmp_path / "adapters"
    synthetic.write_adapter(adapters / "oversized", model, rank=80, seed=1)  # above max_rank 64
    synthetic.write_adapter(adapters / "fine", model, rank=4, seed=2)
    worker = inproc(adapters=str(adapters))
    with Producer(redis_url) as producer:
        broken = producer.submit(prompt_ids=[5, 6], adapter="oversized", max_new_tokens=3)
        good = producer.submit(prompt_ids=[5, 6], adapter="fine", max_new_tokens=3)
        client = redis.Redis.from_url(redis_url, protocol=2)
        turn_until(worker, lambda: not any(client.xlen(Keys().jobs(a)) for a in ("oversized", "fine")))
        with pytest.raises(JobFailed) as failure:
            broken.result(timeout=60)
        assert failure.value.code == ErrorCode.ADAPTER_INVALID
        assert "rank" in str(failure.value)
        assert isinstance(good.result(timeout=10), Result)


def test_a_drain_hands_back_jobs_still_waiting_for_their_adapter(redis_url, inproc, monkeypatch):
    worker = inproc(drain_timeout=0.3)
    monkeypatch.setattr(worker.intake, "_adapter_ready", lambda adapter_id: None)  # a fetch that never ends
    client = redis.Redis.from_url(redis_url, protocol=2)
    with Producer(redis_url) as producer:
        handle = producer.submit(prompt_ids=[5, 6], adapter="team-0", max_new_tokens=3, temperature=0.0)
        turn_until(worker, lambda: worker.parked)
        worker._on_signal(signal.SIGTERM, None)
        turn_until(worker, lambda: not worker.parked, timeout=10)  # past the drain timeout: handed back
        assert worker.turn() is False  # idle: the loop ends
        rescuer = inproc(name="rescuer")
        turn_until(rescuer, lambda: client.xlen(Keys().jobs("team-0")) == 0)
        assert handle.result(timeout=10).worker == "rescuer"


def test_worker_settings_come_from_lorafleet_variables_and_flags_win():
    from lorafleet.worker.serve.config import WorkerConfig

    env = {
        "LORAFLEET_MODEL": "m", "LORAFLEET_ADAPTERS": "a", "LORAFLEET_MAX_LORAS": "4",
        "LORAFLEET_MAX_WAIT": "1.5", "LORAFLEET_DEVICE": "cuda:1", "LORAFLEET_NAME": "from-env",
    }  # fmt: skip
    config = WorkerConfig.from_env({"name": "from-flag", "max_batch": None}, env=env)
    assert (config.model, config.adapters, config.max_loras, config.max_wait) == ("m", "a", 4, 1.5)
    assert (config.device, config.name) == ("cuda:1", "from-flag")
    with pytest.raises(ValueError, match="adapters is required"):
        WorkerConfig.from_env(env={"LORAFLEET_MODEL": "m"})
    with pytest.raises(ValueError, match="LORAFLEET_MAX_LORAS='four' is not a valid int"):
        WorkerConfig.from_env(env={**env, "LORAFLEET_MAX_LORAS": "four"})
    with pytest.raises(ValueError, match="max_loras must be > 0"):
        WorkerConfig.from_env(env={**env, "LORAFLEET_MAX_LORAS": "0"})


def test_a_claimed_job_that_needs_an_adapter_slot_evicts_by_the_schedulers_policy(store, redis_url, inproc):
    """A job claimed from a dead worker starts without a plan; when its adapter finds every slot
    taken by idle adapters, the one that goes is the scheduler's choice (the fewest recent jobs
    here), not the engine's own least recently used: one eviction policy in the worker."""
    worker = inproc(visibility_timeout=1.0)
    keys = Keys()
    spec = dict(max_new_tokens=2, temperature=0.0)
    with Producer(redis_url) as producer:
        popular = [producer.submit(prompt_ids=[5, 6, i + 1], adapter=ADAPTERS[0], **spec) for i in range(5)]
        turn_until(worker, lambda: all(_result_now(h) is not None for h in popular))
        once = producer.submit(prompt_ids=[5, 7], adapter=ADAPTERS[1], **spec)  # used last, used once
        turn_until(worker, lambda: _result_now(once) is not None)
        assert [k.partition("@")[0] for k in worker.engine.resident_adapters] == ADAPTERS[:2]  # LRU first
        # A dead worker took this job and never answered it.
        orphan = producer.submit(prompt_ids=[5, 8], adapter=ADAPTERS[2], **spec)
        client = redis.Redis.from_url(redis_url, protocol=2)
        assert len(read_jobs(client, keys, [ADAPTERS[2]], "dead-worker", count=1)) == 1
        time.sleep(1.1)  # past the visibility timeout: any worker's recovery claims it
        worker._next["recover"] = 0.0
        turn_until(worker, lambda: _result_now(orphan) is not None)
    result = _result_now(orphan)
    assert isinstance(result, Result)
    assert list(result.token_ids) == expected_tokens(store, [5, 8], ADAPTERS[2], 2)
    resident = {k.partition("@")[0] for k in worker.engine.resident_adapters}
    assert resident == {ADAPTERS[0], ADAPTERS[2]}  # the once-used adapter went, the popular one stayed


def test_a_load_lease_is_held_while_the_adapter_is_fetched_and_released_once_it_is_resident(
    redis_url, inproc, monkeypatch
):
    """The lease outlives its TTL while the fetch is slow (renewed), and goes as soon as the adapter
    is in a device slot, after the directory entry that shows it there: other workers never see
    the adapter neither leased nor resident."""
    worker = inproc()
    ttl = worker.intake.scheduler.config.lease_ttl
    store_open = threading.Event()
    fetch = worker.adapters._fetch
    monkeypatch.setattr(worker.adapters, "_fetch", lambda load: (store_open.wait(30), fetch(load)))
    keys = Keys()
    client = redis.Redis.from_url(redis_url, protocol=2)
    seen: list[tuple[bool, bool]] = []  # (leased, resident in the directory), after each turn
    try:
        with Producer(redis_url) as producer:
            handle = producer.submit(
                prompt_ids=[5, 6, 7], adapter=ADAPTERS[0], max_new_tokens=3, temperature=0.0
            )
            deadline = time.monotonic() + 1.5 * ttl
            while time.monotonic() < deadline:  # the fetch takes longer than the lease's TTL
                worker.turn()
                time.sleep(0.05)
            assert client.get(keys.lease(ADAPTERS[0])) == b"inproc"
            assert worker.parked
            store_open.set()

            def observe():
                entries = {w.id: w for w in fleet.live_workers(client, keys)}
                resident = ADAPTERS[0] in (entries["inproc"].resident if "inproc" in entries else [])
                seen.append((client.exists(keys.lease(ADAPTERS[0])) == 1, resident))
                return isinstance(_result_now(handle), Result) and not seen[-1][0]

            turn_until(worker, observe, timeout=60)
    finally:
        store_open.set()
    assert seen[-1] == (False, True)  # released, and the directory shows it here
    assert (False, False) not in seen  # never unleased before the directory showed it


def test_jobs_other_workers_run_do_not_count_as_waiting(redis_url, inproc):
    """A queue's waiting count is its undelivered jobs (length minus the group's pending): five jobs
    another worker is running and one waiting must not look like a backlog its holder cannot keep
    up with, so this worker does not load a replica of the adapter for them."""
    worker = inproc(max_wait=60.0)
    keys = Keys()
    client = redis.Redis.from_url(redis_url, protocol=2)
    holder = fleet.WorkerEntry(id="holder", heartbeat=time.time(), free_slots=2, resident=[ADAPTERS[1]])
    fleet.publish(client, keys, holder, ttl=60)
    for other in ("idle-1", "idle-2"):  # a fleet of four: one adapter may have two holders
        fleet.publish(client, keys, fleet.WorkerEntry(id=other, heartbeat=time.time(), free_slots=6), ttl=60)
    with Producer(redis_url) as producer:
        for i in range(5):
            producer.submit(prompt_ids=[5, 6, i + 1], adapter=ADAPTERS[1], max_new_tokens=3)
        assert len(read_jobs(client, keys, [ADAPTERS[1]], "holder", count=5)) == 5  # running there
        producer.submit(prompt_ids=[5, 6, 9], adapter=ADAPTERS[1], max_new_tokens=3)
        for _ in range(20):
            worker.turn()
    assert worker.engine.adapters == []  # no replica was loaded here
    assert client.xlen(keys.jobs(ADAPTERS[1])) == 6  # the waiting job waits for its holder
    summary = client.xpending(keys.jobs(ADAPTERS[1]), keys.group)
    assert summary["pending"] == 5
    assert [c["name"] for c in summary["consumers"]] == [b"holder"]


def test_a_parked_job_whose_adapter_arrives_during_a_step_runs_in_the_next_one(
    redis_url, inproc, monkeypatch
):
    """A job parked for its adapter's fetch while other sequences run: once the adapter is in host
    memory, the next step the loop launches includes it (not the one after: the adapter is looked
    for before the launch, not in the housekeeping that follows it)."""
    worker = inproc()
    asked, store_open, fetched = threading.Event(), threading.Event(), threading.Event()
    fetch = worker.adapters._fetch
    monkeypatch.setattr(
        worker.adapters,
        "_fetch",
        lambda load: (asked.set(), store_open.wait(30), fetch(load), fetched.set()),
    )
    with Producer(redis_url) as producer:
        busy = producer.submit(prompt_ids=[5, 6, 7], max_new_tokens=1500, ignore_eos=True, temperature=0.0)
        turn_until(worker, lambda: worker.engine.num_running == 1)
        cold = producer.submit(prompt_ids=[5, 6, 9], adapter=ADAPTERS[0], max_new_tokens=3, temperature=0.0)
        turn_until(worker, asked.is_set, timeout=30)  # (after the store was probed for its version)
        assert worker.parked
        store_open.set()
        assert fetched.wait(30)
        worker.turn()
        (job,) = [j for j in worker.running.values() if j.job.id == cold.id]
        assert len(job.token_ids) == 1  # its prefill ran in the step this turn launched
        busy.cancel()
        turn_until(worker, lambda: _result_now(cold) is not None, timeout=60)
    assert isinstance(_result_now(cold), Result)


def test_a_redis_error_while_unparking_leaves_the_jobs_parked(redis_url, inproc, monkeypatch):
    """The cancel markers of parked jobs are read before the jobs leave the parked table: a Redis
    error there (the loop retries the turn) must not drop them from this worker's books, where
    their claims are refreshed and from where they start once their adapter is in."""
    worker = inproc()
    store_open = threading.Event()
    fetch = worker.adapters._fetch
    monkeypatch.setattr(worker.adapters, "_fetch", lambda load: (store_open.wait(30), fetch(load)))
    with Producer(redis_url) as producer:
        handle = producer.submit(prompt_ids=[5, 6, 9], adapter=ADAPTERS[0], max_new_tokens=2, temperature=0.0)
        turn_until(worker, lambda: worker.parked, timeout=30)
        real_mget = worker.redis.mget

        def broken(*args, **kwargs):
            raise redis.ConnectionError("Redis went away")

        monkeypatch.setattr(worker.redis, "mget", broken)
        with pytest.raises(redis.ConnectionError):
            worker.intake.unpark(time.time())
        assert [p.job.id for p in worker.parked.values()] == [handle.id]
        assert handle.entry_id in {d.entry_id for d in worker.jobs.deliveries()}  # its claim is refreshed
        monkeypatch.setattr(worker.redis, "mget", real_mget)
        store_open.set()
        turn_until(worker, lambda: _result_now(handle) is not None, timeout=60)
    assert isinstance(_result_now(handle), Result)


@pytest.mark.parametrize("max_prefetch", [2, 0])
def test_a_cold_adapter_waiting_for_a_slot_is_fetched_into_host_memory_meanwhile(
    redis_url, inproc, max_prefetch
):
    """Both adapter slots are busy with long jobs; a job of a third adapter waits for one. Its adapter
    is fetched store -> host memory while it waits (prefetch), so that once a slot frees its load
    is only the copy to the device; with prefetching off it is not touched until then."""
    from lorafleet.worker.serve.scheduler import SchedulerConfig

    worker = inproc()
    worker.intake.scheduler.config = SchedulerConfig(
        max_wait=worker.config.max_wait, max_prefetch=max_prefetch
    )
    long = dict(max_new_tokens=1500, ignore_eos=True, temperature=0.0)
    with Producer(redis_url) as producer:
        busy = [producer.submit(prompt_ids=[5, 6, i + 1], adapter=ADAPTERS[i], **long) for i in range(2)]
        turn_until(worker, lambda: worker.engine.num_running == 2)
        cold = producer.submit(prompt_ids=[5, 6, 9], adapter=ADAPTERS[2], max_new_tokens=2, temperature=0.0)
        ref = None
        deadline = time.monotonic() + 2  # the long jobs run for longer than that
        while time.monotonic() < deadline:
            worker.turn()
            ref = ref or _resolved(worker, ADAPTERS[2])
            if ref is not None and worker.adapters.state(ref)[0] == "ready":
                break
            time.sleep(0.02)
        assert worker.engine.num_running == 2  # the long jobs still hold both slots
        assert all(j.job.adapter != ADAPTERS[2] for j in worker.running.values())
        assert not worker.parked
        state = "absent" if ref is None else worker.adapters.state(ref)[0]
        assert state == ("ready" if max_prefetch else "absent")
        for handle in busy:
            handle.cancel()
        turn_until(worker, lambda: _result_now(cold) is not None, timeout=60)
    assert isinstance(_result_now(cold), Result)


def _resolved(worker, adapter):
    from lorafleet.worker.adapters.manager import AdapterNotFound, AdapterPending

    try:
        return worker.adapters.resolve(adapter)
    except (AdapterPending, AdapterNotFound):
        return None


def test_the_directory_shows_at_once_when_a_worker_has_no_free_sequence_slot(redis_url, inproc):
    """Other workers replicate an adapter when its holders have no free slot: a worker publishes its
    entry as soon as its last free sequence slot is taken, not only at its next heartbeat."""
    worker = inproc(heartbeat_interval=60.0, heartbeat_ttl=120.0)
    keys = Keys()
    client = redis.Redis.from_url(redis_url, protocol=2)
    spec = dict(max_new_tokens=300, ignore_eos=True, temperature=0.0)
    with Producer(redis_url) as producer:
        worker.turn()  # the first heartbeat: 6 free slots
        (entry,) = fleet.live_workers(client, keys)
        assert entry.free_slots == 6
        handles = [producer.submit(prompt_ids=[5, 6, i + 1], **spec) for i in range(6)]
        turn_until(worker, lambda: worker.engine.num_running == 6)
        worker.turn()
        (entry,) = fleet.live_workers(client, keys)
        assert entry.free_slots == 0  # long before the next heartbeat
        for handle in handles:
            handle.cancel()
        turn_until(worker, lambda: not worker.running)
