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
from common import print_table, write_results

from lorafleet.producer import (
    Keys,
    Producer,
    ProtocolError,
    Result,
    consumer,
    decode_job,
    encode_job,
    scripts,
)
from lorafleet.producer.spec import build_job
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


def null_worker(url: str, namespace: str) -> None:
    """Answer every job at once with an empty result, using the protocol's consumer helpers."""
    r = redis.Redis.from_url(url, protocol=2, socket_timeout=10)
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


def round_trip_rows(url: str, namespace: str, n: int, inflight: int) -> list[dict[str, Any]]:
    worker = subprocess.Popen(
        [sys.executable, __file__, "--null-worker", "--redis-url", url, "--namespace", namespace],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)},
    )
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
    parser.add_argument("--null-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--namespace", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.null_worker:
        null_worker(args.redis_url, args.namespace)
    else:
        run(args)


if __name__ == "__main__":
    main()
