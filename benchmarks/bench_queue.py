"""Queue benchmark: enqueue rate and round-trip latency of protocol v1, beside raw XADD on the same server.

    python benchmarks/bench_queue.py                    # starts its own redis-server on loopback
    python benchmarks/bench_queue.py --redis-url redis://host:6379/0

Rates (each measured --repeat times, round robin so that load drift hits all alike; median reported):
- raw XADD: redis-benchmark, 50 clients without pipelining (the reference), and with -P 16;
- submit script: redis-benchmark EVALSHA of the real submit script (random job ids), 50 clients:
  the server-side cost of a submit (idempotency, backpressure, XADD, waiting index, wake-up);
- Producer.submit (one client, a round trip per job) and Producer.submit_many (pipelined batches).
Round trip: submit -> a null worker process (the protocol's consumer helpers, empty result) -> result,
one job at a time (p50, p99), and the throughput with a batch of jobs in flight.

Targets (loopback): pipelined enqueue >= 50% of raw XADD; round trip p50 <= 2 ms, p99 <= 10 ms.

    python benchmarks/bench_queue.py --parsers python,hiredis   # needs `pip install hiredis`

compares redis-py's reply parsers side by side instead (results/bench_queue_parsers.json): the same
workload, each case run with each parser in turn in every round (order alternating), on connections
forced to one parser class (`parser_class=`). Cases: the worker's read of 64 jobs of ~4 KB
(`read_jobs`, the READ script) and a plain XREADGROUP of them; the producer's XREAD of its reply
stream (512 streamed chunks; 64 results of ~3 KB); Producer.submit and submit_many; a step's
replies (`ReplyBatch.flush`, 64 chunks and the cancel counter); a round trip through a null worker
using the same parser. Each parser's rate is the median over rounds; the speedup is hiredis over
python, with the spread of the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.connection
from common import print_table, write_results
from redis.utils import HIREDIS_AVAILABLE

from lorafleet.producer import (
    Chunk,
    Keys,
    Producer,
    ProtocolError,
    Result,
    consumer,
    decode_job,
    encode_job,
    scripts,
)
from lorafleet.producer.protocol import JOB_FIELD, REPLY_FIELD, encode_reply
from lorafleet.producer.spec import build_job
from lorafleet.producer.streams import xread_entries
from lorafleet.worker.cli.redis_server import RedisServer

PROMPT = "Summarise the following support ticket in one sentence: " + "the printer is on fire again. " * 5
ADAPTERS = [f"adapter-{i}" for i in range(8)]
RAW_XADD = "raw XADD (redis-benchmark, 50 clients)"
PIPELINED = "Producer.submit_many (pipelined)"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def job_size(namespace: str) -> int:
    spec = {"prompt": PROMPT, "adapter": ADAPTERS[0]}
    return len(encode_job(build_job(spec, reply_to=Keys(namespace).reply("c"), reply_ttl=3600)))


def drop_namespace(url: str, namespace: str) -> None:
    client = redis.Redis.from_url(url, protocol=2)
    batch = []
    for key in client.scan_iter(match=f"{namespace}:*", count=5000):
        batch.append(key)
        if len(batch) == 5000:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)
    client.close()


# -- rates -------------------------------------------------------------------------------------------


def redis_benchmark(url: str, n: int, command: list[str], extra: list[str]) -> float:
    """requests/s that redis-benchmark reports for `command`."""
    parts = urlsplit(url)
    db = (parts.path or "/0").strip("/") or "0"
    args = ["redis-benchmark", "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379)]
    done = subprocess.run(
        [*args, "--dbnum", db, "-n", str(n), "-q", *extra, *command],
        capture_output=True,
        text=True,
        timeout=600,
    )
    rates = re.findall(r"([\d.]+) requests per second", done.stdout)
    if done.returncode != 0 or not rates:
        raise RuntimeError(f"redis-benchmark failed: {done.stdout[-300:]} {done.stderr[-300:]}")
    return float(rates[-1])


def raw_measurements(url: str, namespace: str, n: int) -> dict[str, Callable[[], float]]:
    """redis-benchmark rows, with a printable stand-in payload as long as a real job."""
    filler = "x" * job_size(namespace)
    keys = Keys(namespace)
    client = redis.Redis.from_url(url, protocol=2)
    sha = client.script_load(scripts.SUBMIT)
    client.close()
    idempotency = keys.job("rb-__rand_int__")  # redis-benchmark -r makes each job id (nearly) unique
    submit_keys = [keys.jobs("rb"), keys.waiting, keys.wake, idempotency, keys.queues]
    evalsha = ["EVALSHA", sha, "5", *submit_keys, filler, "rb", "0", "60000", "1000", keys.group]
    xadd = ["XADD", f"{namespace}:raw-xadd", "*", "j", filler]
    return {
        RAW_XADD: lambda: redis_benchmark(url, n, xadd, []),
        "raw XADD (redis-benchmark, -P 16)": lambda: redis_benchmark(url, n, xadd, ["-P", "16"]),
        "submit script (redis-benchmark EVALSHA, 50 clients)": lambda: redis_benchmark(
            url, n, evalsha, ["-r", "1000000000"]
        ),
    }


def producer_measurements(
    producer: Producer, single: int, pipelined: int, batch: int
) -> dict[str, Callable[[], float]]:
    def one_at_a_time() -> float:
        started = time.perf_counter()
        for i in range(single):
            producer.submit(PROMPT, adapter=ADAPTERS[i % 8])
        return single / (time.perf_counter() - started)

    specs = [{"prompt": PROMPT, "adapter": ADAPTERS[i % 8]} for i in range(pipelined)]

    def many() -> float:
        started = time.perf_counter()
        for i in range(0, pipelined, batch):
            producer.submit_many(specs[i : i + batch])
        return pipelined / (time.perf_counter() - started)

    return {"Producer.submit (a round trip each)": one_at_a_time, PIPELINED: many}


def rate_rows(args: argparse.Namespace, url: str, namespace: str) -> list[dict[str, Any]]:
    samples: dict[str, list[float]] = {}
    with Producer(url, namespace=namespace, max_waiting_per_adapter=0) as producer:
        producer.submit_many([{"prompt": PROMPT, "adapter": a} for a in ADAPTERS])  # groups, script cache
        measurements = producer_measurements(producer, args.single, args.pipelined, args.batch)
        if shutil.which("redis-benchmark"):
            measurements = raw_measurements(url, namespace + "-raw", args.raw_n) | measurements
        for _ in range(args.repeat):
            for name, measure in measurements.items():
                samples.setdefault(name, []).append(measure())
                drop_namespace(url, namespace + "-raw")
            drop_namespace(url, namespace)
    counts = {PIPELINED: args.pipelined, "Producer.submit (a round trip each)": args.single}
    return [
        {
            "metric": name,
            "value": statistics.median(values),
            "best": max(values),
            "unit": "ops/s" if name.startswith(("raw", "submit script")) else "jobs/s",
            "n": counts.get(name, args.raw_n),
            "samples": [round(v) for v in values],
            **({"batch": args.batch} if name == PIPELINED else {}),
        }
        for name, values in samples.items()
    ]


# -- round trip through a null worker ----------------------------------------------------------------


def null_worker(url: str, namespace: str, parser: str | None = None) -> None:
    """Answer every job at once with an empty result, using the protocol's consumer helpers."""
    forced = {"parser_class": parser_classes([parser])[parser]} if parser else {}
    r = redis.Redis.from_url(url, protocol=2, socket_timeout=10, **forced)
    keys = Keys(namespace)
    position = consumer.wake_position(r, keys)
    while True:
        queues = [queue for queue, _ in consumer.waiting_queues(r, keys)]
        deliveries = consumer.read_jobs(r, keys, queues, "null-worker", 256) if queues else []
        if not deliveries:
            position = consumer.wait_for_work(r, keys, position, 1.0)
        for d in deliveries:
            try:
                job = decode_job(d.payload, keys)
            except ProtocolError as exc:
                consumer.reject(r, keys, d, exc, worker="null")
                continue
            result = Result(id=job.id, text="", worker="null")
            consumer.publish_final(
                r, d.stream, d.entry_id, result, reply_to=job.reply_to, reply_ttl=job.reply_ttl
            )


def start_null_worker(url: str, namespace: str, parser: str | None = None) -> subprocess.Popen[bytes]:
    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)  # keep the caller's
    command = [sys.executable, __file__, "--null-worker", "--redis-url", url, "--namespace", namespace]
    return subprocess.Popen(
        command + (["--parser", parser] if parser else []), env={**os.environ, "PYTHONPATH": path}
    )


def round_trip_rows(url: str, namespace: str, n: int, inflight: int) -> list[dict[str, Any]]:
    worker = start_null_worker(url, namespace)
    try:
        with Producer(url, namespace=namespace, max_waiting_per_adapter=0) as producer:
            for _ in range(200):  # warm-up (and wait for the worker to start)
                producer.submit(PROMPT, adapter="rt").result(timeout=30)
            latencies = []
            for i in range(n):
                started = time.perf_counter()
                producer.submit(PROMPT, adapter=f"rt-{i % 4}").result(timeout=10)
                latencies.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            done = 0
            while done < n:
                specs = [{"prompt": PROMPT, "adapter": f"rt-{j % 4}"} for j in range(inflight)]
                for handle in producer.submit_many(specs):
                    handle.result(timeout=30)
                done += inflight
            throughput = done / (time.perf_counter() - started)
    finally:
        worker.terminate()
        worker.wait()
    return [
        {
            "metric": "round trip p50 (one job at a time)",
            "value": statistics.median(latencies),
            "unit": "ms",
            "n": n,
        },
        {
            "metric": "round trip p99 (one job at a time)",
            "value": percentile(latencies, 99),
            "unit": "ms",
            "n": n,
        },
        {
            "metric": f"round trip throughput ({inflight} in flight)",
            "value": throughput,
            "unit": "jobs/s",
            "n": done,
        },
    ]


# -- reply parsers side by side (--parsers) ----------------------------------------------------------

PARSER_CLASSES = {"python": "_RESP2Parser", "hiredis": "_HiredisParser"}  # in redis.connection
BIG_PROMPT = PROMPT + "the printer is on fire again. " * 135  # a job of ~4 KB
READ_BATCH = 64  # jobs per read: a worker's step-sized batch
REPLY_CHUNKS = 512  # streamed chunks per XREAD: the producer's READ_COUNT
RESULT_TEXT = "The printer is on fire again, says the ticket, and nobody has called facilities yet. " * 24
READ_JOBS = f"read_jobs: READ script, {READ_BATCH} jobs x ~4 KB"
XREADGROUP = f"XREADGROUP {READ_BATCH} jobs x ~4 KB (pending history)"
XREAD_CHUNKS = f"producer XREAD of its reply stream, {REPLY_CHUNKS} chunks"
XREAD_RESULTS = f"producer XREAD of its reply stream, {READ_BATCH} results x ~3 KB"
SUBMIT = "Producer.submit (a round trip each)"
FLUSH = f"ReplyBatch.flush ({READ_BATCH} chunks + MGET cancels)"
ROUND_TRIP = "round trip p50 through a null worker (one job at a time)"
PARSER_CASES = [READ_JOBS, XREADGROUP, XREAD_CHUNKS, XREAD_RESULTS, SUBMIT, PIPELINED, FLUSH, ROUND_TRIP]


def parser_classes(names: list[str]) -> dict[str, type]:
    """redis-py's parser class of each name; SystemExit naming the fix for an unknown or missing one."""
    out = {}
    for name in names:
        if name not in PARSER_CLASSES:
            raise SystemExit(f"unknown parser {name!r} (known: {', '.join(PARSER_CLASSES)})")
        if name == "hiredis" and not HIREDIS_AVAILABLE:
            raise SystemExit("the hiredis parser needs the hiredis package: pip install hiredis")
        out[name] = getattr(redis.connection, PARSER_CLASSES[name])
    return out


def force_parser(client: redis.Redis, parser_class: type) -> str:
    """Make `client`'s connections (none opened yet) parse with `parser_class`; the class then in use."""
    pool = client.connection_pool
    pool.connection_kwargs["parser_class"] = parser_class
    conn = pool.get_connection()
    try:
        return type(conn._parser).__name__  # type: ignore[attr-defined]
    finally:
        pool.release(conn)


def timed_rate(call: Callable[[Any], Any], seconds: float, per_call: int = 1,
               prepare: Callable[[], Any] = lambda: None) -> float:  # fmt: skip
    """Operations per second of `call(prepare())` repeated for about `seconds` of timed calls
    (`prepare` runs untimed)."""
    spent, calls = 0.0, 0
    while spent < seconds:
        arg = prepare()
        started = time.perf_counter()
        call(arg)
        spent += time.perf_counter() - started
        calls += 1
    return calls * per_call / spent


def fixture_sizes() -> dict[str, int]:
    """Wire bytes of one job, chunk and result of the parser cases (msgpack)."""
    job = build_job({"prompt": BIG_PROMPT, "adapter": "big"}, reply_to=Keys("n").reply("c"), reply_ttl=3600)
    chunk = Chunk(id=job.id, seq=0, token_ids=(1234,), text=" fire")
    result = Result(id=job.id, text=RESULT_TEXT, token_ids=tuple(range(1000, 1480)), worker="w-1")
    sizes = {"job": encode_job(job), "chunk": encode_reply(chunk), "result": encode_reply(result)}
    return {name: len(data) for name, data in sizes.items()}


class ParserBench:
    """The parser cases on connections forced to one parser class, in namespaces of their own:
    `<ns>-r` holds read-only fixtures, `<ns>-w` what the write cases add (dropped by `reset`), and
    `<ns>-rt` the round trips of a null worker that uses the same parser."""

    def __init__(self, url: str, namespace: str, name: str, parser_class: type, args: argparse.Namespace):
        self.url, self.namespace, self.args = url, namespace, args
        self.keys, self.write_keys = Keys(namespace + "-r"), Keys(namespace + "-w")
        self.client = redis.Redis.from_url(url, protocol=2, socket_timeout=30)
        self.in_use = {"client": force_parser(self.client, parser_class)}
        self.producer = Producer(url, namespace=namespace + "-w", max_waiting_per_adapter=0)
        self.rt_producer = Producer(url, namespace=namespace + "-rt", max_waiting_per_adapter=0)
        for role, producer in (("producer", self.producer), ("round trip producer", self.rt_producer)):
            force_parser(producer._reader, parser_class)
            self.in_use[role] = force_parser(producer.redis, parser_class)
        self.worker = start_null_worker(url, namespace + "-rt", name)
        self._fill()
        self._counter = 0
        self.cases: dict[str, Callable[[], Any]] = {
            READ_JOBS: lambda: timed_rate(self._read_jobs, args.sample_s, prepare=self._rewind),
            XREADGROUP: lambda: timed_rate(self._xreadgroup, args.sample_s),
            XREAD_CHUNKS: lambda: self._xread(self.keys.reply("chunks"), REPLY_CHUNKS),
            XREAD_RESULTS: lambda: self._xread(self.keys.reply("results"), READ_BATCH),
            SUBMIT: self._submit,
            PIPELINED: self._submit_many,
            FLUSH: self._flush,
            ROUND_TRIP: self._round_trips,
        }

    def _fill(self) -> None:
        """The job stream (its READ_BATCH jobs pending for consumer "bench") and two reply streams."""
        stream, reply_to = self.keys.jobs_of_queue("big"), self.keys.reply("c")
        pipe = self.client.pipeline(transaction=False)
        for _ in range(READ_BATCH):
            job = build_job({"prompt": BIG_PROMPT, "adapter": "big"}, reply_to=reply_to, reply_ttl=3600)
            pipe.xadd(stream, {JOB_FIELD: encode_job(job)})
        for seq in range(REPLY_CHUNKS):
            chunk = Chunk(id="job-1", seq=seq, token_ids=(1234 + seq,), text=" fire")
            pipe.xadd(self.keys.reply("chunks"), {REPLY_FIELD: encode_reply(chunk)})
        for i in range(READ_BATCH):
            result = Result(id=f"job-{i}", text=RESULT_TEXT, token_ids=tuple(range(1000, 1480)), worker="w-1")
            pipe.xadd(self.keys.reply("results"), {REPLY_FIELD: encode_reply(result)})
        pipe.execute()
        consumer.ensure_group(self.client, self.keys, "big")
        if len(self._read_jobs(None)) != READ_BATCH or len(self._xreadgroup()) != READ_BATCH:
            raise RuntimeError("the job fixture did not read back whole")
        for _ in range(200):  # warm-up (and wait for the null worker to start)
            self.rt_producer.submit(PROMPT, adapter="rt").result(timeout=30)

    def _read_jobs(self, _: Any) -> list[consumer.Delivery]:
        return consumer.read_jobs(self.client, self.keys, ["big"], "bench", READ_BATCH)

    def _rewind(self) -> None:
        self.client.xgroup_setid(self.keys.jobs_of_queue("big"), self.keys.group, "0")

    def _xreadgroup(self, _: Any = None) -> list[Any]:
        stream = self.keys.jobs_of_queue("big")
        response = self.client.xreadgroup(self.keys.group, "bench", {stream: "0"}, count=READ_BATCH)
        return xread_entries(response, stream)

    def _xread(self, stream: str, expected: int) -> float:
        def read(_: Any) -> None:  # as Producer._read: a pipeline (with the XDEL of what was read)
            pipe = self.client.pipeline(transaction=False)
            pipe.xread({stream: b"0-0"}, count=REPLY_CHUNKS)
            if len(xread_entries(pipe.execute()[-1], stream)) != expected:
                raise RuntimeError(f"{stream} did not read back whole")

        return timed_rate(read, self.args.sample_s)

    def _submit(self) -> float:
        def one(_: Any) -> None:
            self._counter += 1
            self.producer.submit(PROMPT, adapter=ADAPTERS[self._counter % 8])

        return timed_rate(one, self.args.sample_s)

    def _submit_many(self) -> float:
        specs = [{"prompt": PROMPT, "adapter": ADAPTERS[i % 8]} for i in range(self.args.batch)]
        return timed_rate(lambda _: self.producer.submit_many(specs), self.args.sample_s, self.args.batch)

    def _flush(self) -> float:
        def batch() -> consumer.ReplyBatch:
            out = consumer.ReplyBatch()
            for i in range(READ_BATCH):
                chunk = Chunk(id=f"job-{i}", seq=self._counter, token_ids=(1234,), text=" fire")
                out.chunk(chunk, reply_to=self.write_keys.reply(f"c{i}"), reply_ttl=60)
            self._counter += 1
            return out

        return timed_rate(lambda b: b.flush(self.client, [self.write_keys.cancels]), self.args.sample_s,
                          prepare=batch)  # fmt: skip

    def _round_trips(self) -> list[float]:
        latencies = []
        for i in range(self.args.rt_jobs):
            started = time.perf_counter()
            self.rt_producer.submit(PROMPT, adapter=f"rt-{i % 4}").result(timeout=10)
            latencies.append((time.perf_counter() - started) * 1000)
        return latencies

    def measure(self, case: str) -> Any:
        """One sample: a rate, or (ROUND_TRIP) the latencies in ms."""
        return self.cases[case]()

    def reset(self) -> None:
        drop_namespace(self.url, self.write_keys.namespace)

    def close(self) -> None:
        self.worker.terminate()
        self.worker.wait()
        self.producer.close()
        self.rt_producer.close()
        self.client.close()
        for suffix in ("-r", "-w", "-rt"):
            drop_namespace(self.url, self.namespace + suffix)


def parser_names(args: argparse.Namespace) -> list[str]:
    return [name.strip() for name in args.parsers.split(",") if name.strip()]


def parser_samples(
    args: argparse.Namespace, url: str, namespace: str
) -> tuple[dict[str, dict[str, list[Any]]], dict[str, Any]]:
    """Every case with every parser, alternately, `args.rounds` times: the samples and, per parser,
    the parser class each client used."""
    names = parser_names(args)
    benches: dict[str, ParserBench] = {}
    samples: dict[str, dict[str, list[Any]]] = {case: {name: [] for name in names} for case in PARSER_CASES}
    try:
        for name, parser_class in parser_classes(names).items():
            benches[name] = ParserBench(url, f"{namespace}-{name}", name, parser_class, args)
        for bench in benches.values():  # one untimed pass: caches, scripts, consumer groups
            for case in PARSER_CASES[:-1]:
                bench.measure(case)
            bench.reset()
        for round_ in range(args.rounds):
            order = names if round_ % 2 == 0 else names[::-1]  # neither parser always goes first
            for case in PARSER_CASES:
                for name in order:
                    samples[case][name].append(benches[name].measure(case))
            for bench in benches.values():
                bench.reset()
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        return samples, {name: bench.in_use for name, bench in benches.items()}
    finally:
        for bench in benches.values():
            bench.close()


def parser_summary(
    samples: dict[str, dict[str, list[Any]]], names: list[str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (case x parser: the median over rounds) and the speedup of each parser over the first
    named, overall and per round (> 1: faster, i.e. a higher rate or a lower latency)."""
    rows, speedups = [], {}
    for case in PARSER_CASES:
        per_round: dict[str, list[float]] = {}
        value: dict[str, float] = {}
        for name in names:
            row: dict[str, Any] = {"metric": case, "parser": name}
            if case == ROUND_TRIP:
                per_round[name] = [statistics.median(s) for s in samples[case][name]]
                pooled = [ms for s in samples[case][name] for ms in s]
                row |= {"value": statistics.median(pooled), "p99": percentile(pooled, 99), "unit": "ms"}
                row["n"] = len(pooled)
            else:
                per_round[name] = samples[case][name]
                unit = "jobs/s" if case in (SUBMIT, PIPELINED) else "calls/s"
                row |= {"value": statistics.median(per_round[name]), "unit": unit}
            value[name] = row["value"]
            rows.append(row | {"samples": [round(v, 4) for v in per_round[name]]})
        first = names[0]
        for other in names[1:]:
            flip = case == ROUND_TRIP  # a latency: lower is faster
            pairs = zip(per_round[first], per_round[other], strict=True)
            ratios = [a / b if flip else b / a for a, b in pairs]
            overall = value[first] / value[other] if flip else value[other] / value[first]
            speedups.setdefault(f"{other} / {first}", {})[case] = {
                "speedup": round(overall, 4),
                "round_ratios": [round(r, 4) for r in ratios],
                "min": round(min(ratios), 4),
                "max": round(max(ratios), 4),
                "rounds": len(ratios),
            }
    return rows, speedups


def run_parsers(args: argparse.Namespace) -> None:
    names = parser_names(args)
    parser_classes(names)  # fail early
    server = None if args.redis_url else RedisServer.start()
    url = args.redis_url or server.url  # type: ignore[union-attr]
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        samples, in_use = parser_samples(args, url, namespace)
        rows, speedups = parser_summary(samples, names)
        info = redis.Redis.from_url(url, protocol=2).info("server")
        print_table(rows, ["metric", "parser", "value", "unit"])
        for pair, cases in speedups.items():
            for case, r in cases.items():
                print(f"{pair}  {case}: {r['speedup']:.3f} (rounds {r['min']:.3f}..{r['max']:.3f})")
        extra = {
            "mode": "parsers side by side",
            "load_average_1m": os.getloadavg()[0],
            "redis_version": info["redis_version"],
            "redis": "own server on loopback" if server else url,
            "redis_py": redis.__version__,
            "hiredis": _hiredis_version(),
            "rounds": args.rounds,
            "sample_s": args.sample_s,
            "round_trips_per_sample": args.rt_jobs,
            "batch": args.batch,
            "wire_bytes": fixture_sizes(),
            "parsers_in_use": in_use,
            "speedups": speedups,
        }
        print(f"wrote {write_results('bench_queue_parsers', rows, extra)}")
    finally:
        if server is not None:
            server.stop()


def _hiredis_version() -> str | None:
    try:
        import hiredis
    except ImportError:
        return None
    return str(hiredis.__version__)


# -- main ---------------------------------------------------------------------------------------------


def check_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    value = {row["metric"]: row["value"] for row in rows}
    p50 = value["round trip p50 (one job at a time)"]
    p99 = value["round trip p99 (one job at a time)"]
    targets: dict[str, Any] = {"round trip p50 <= 2 ms": p50 <= 2.0, "round trip p99 <= 10 ms": p99 <= 10.0}
    if RAW_XADD in value:
        targets["pipelined / raw XADD"] = value[PIPELINED] / value[RAW_XADD]
        targets["pipelined >= 50% of raw XADD"] = value[PIPELINED] >= 0.5 * value[RAW_XADD]
    return targets


def run(args: argparse.Namespace) -> None:
    server = None if args.redis_url else RedisServer.start()
    url = args.redis_url or server.url  # type: ignore[union-attr]
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        rows = rate_rows(args, url, namespace)
        rows += round_trip_rows(url, namespace, args.latency_jobs, args.inflight)
        targets = check_targets(rows)
        info = redis.Redis.from_url(url, protocol=2).info("server")
        print_table(rows, ["metric", "value", "best", "unit", "n"])
        for name, met in targets.items():
            print(f"{name}: {met:.2f}" if isinstance(met, float) else f"{name}: {'PASS' if met else 'FAIL'}")
        extra = {
            "load_average_1m": os.getloadavg()[0],  # other work on the machine skews every row alike
            "redis_version": info["redis_version"],
            "redis": "own server on loopback" if server else url,
            "job_bytes": job_size(namespace),
            "repeat": args.repeat,
            "targets": targets,
        }
        print(f"wrote {write_results('bench_queue', rows, extra)}")
    finally:
        drop_namespace(url, namespace)
        drop_namespace(url, namespace + "-raw")
        if server is not None:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", help="benchmark this server instead of starting one")
    parser.add_argument("--repeat", type=int, default=3, help="samples per rate (median reported)")
    parser.add_argument("--raw-n", type=int, default=100_000, help="redis-benchmark requests per sample")
    parser.add_argument("--single", type=int, default=5_000, help="jobs per one-at-a-time enqueue sample")
    parser.add_argument("--pipelined", type=int, default=50_000, help="jobs per pipelined enqueue sample")
    parser.add_argument("--batch", type=int, default=1_000, help="jobs per submit_many")
    parser.add_argument("--latency-jobs", type=int, default=3_000, help="round trips measured")
    parser.add_argument("--inflight", type=int, default=500, help="jobs in flight for the throughput row")
    parser.add_argument(
        "--parsers", help="compare redis-py reply parsers side by side instead, e.g. python,hiredis"
    )
    parser.add_argument("--rounds", type=int, default=21, help="--parsers: rounds (each parser per case)")
    parser.add_argument("--sample-s", type=float, default=0.15, help="--parsers: timed seconds per sample")
    parser.add_argument("--rt-jobs", type=int, default=200, help="--parsers: round trips per sample")
    parser.add_argument("--null-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--namespace", help=argparse.SUPPRESS)
    parser.add_argument("--parser", help=argparse.SUPPRESS)  # the null worker's forced parser
    args = parser.parse_args()
    if args.null_worker:
        null_worker(args.redis_url, args.namespace, args.parser)
    elif args.parsers:
        run_parsers(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
