"""Gateway benchmark: what the OpenAI-compatible gateway adds over submitting through the producer.

    python benchmarks/bench_gateway.py                 # its own Redis, null worker and gateway
    python benchmarks/bench_gateway.py --requests 50 --concurrency 8 --rounds 1   # a quick run

Side by side in one run, against a null worker process (answers every job at once with an empty
result, `bench_queue.null_worker`), so that only the request path is measured:
- latency, one request at a time: the direct path (`AsyncProducer.submit` + `result`) and the
  gateway (`POST /v1/chat/completions` over a kept-alive HTTP connection, non-streaming, and
  `stream: true` read to ``[DONE]``); p50 and p99 of each, and the gateway's added p50/p99;
- throughput with `--concurrency` requests in flight: jobs/s through the producer, requests/s
  through the gateway.
The rounds alternate the paths so that drift hits both alike. The gateway runs as its own
`lorafleet gateway` process (one uvicorn worker), as deployed; the client is one asyncio process.
On a CPU development machine the absolute times are CPU figures (client, gateway, worker and Redis
share the cores); the ratios are what carries over.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from bench_queue import percentile, start_null_worker
from common import RESULTS_DIR, machine_info, print_table

from lorafleet.producer import AsyncProducer
from lorafleet.worker.cli.redis_server import RedisServer

NAMESPACE = "bench-gateway"
ADAPTER = "bench"
MESSAGES = [{"role": "user", "content": "The printer is on fire again; who do I call?"}]
BODY = {"model": ADAPTER, "messages": MESSAGES, "max_tokens": 16}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_gateway(url: str, port: int) -> subprocess.Popen[bytes]:
    """`lorafleet gateway` on `port`, open (no keys), every adapter id accepted (no registry)."""
    command = [
        sys.executable, "-m", "lorafleet.producer.cli", "gateway", "--redis-url", url,
        "--namespace", NAMESPACE, "--port", str(port), "--models", "any", "--log-level", "warning",
    ]  # fmt: skip
    return subprocess.Popen(command, stderr=subprocess.DEVNULL)


async def wait_ready(http: httpx.AsyncClient, producer: AsyncProducer) -> None:
    """Until the gateway answers and the null worker answers a job through it."""
    deadline = time.monotonic() + 60
    while True:
        try:
            if (await http.post("/v1/chat/completions", json=BODY)).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway or the null worker did not start")
        await asyncio.sleep(0.2)
    for _ in range(50):  # warm both paths
        await (await producer.submit(messages=MESSAGES, adapter=ADAPTER, max_new_tokens=16)).result(
            timeout=10
        )
        await http.post("/v1/chat/completions", json=BODY)


async def direct_once(producer: AsyncProducer) -> float:
    started = time.perf_counter()
    handle = await producer.submit(messages=MESSAGES, adapter=ADAPTER, max_new_tokens=16, timeout=30)
    await handle.result()
    return (time.perf_counter() - started) * 1000


async def gateway_once(http: httpx.AsyncClient) -> float:
    started = time.perf_counter()
    answer = await http.post("/v1/chat/completions", json=BODY)
    answer.raise_for_status()
    return (time.perf_counter() - started) * 1000


async def gateway_stream_once(http: httpx.AsyncClient) -> float:
    started = time.perf_counter()
    async with http.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():
            if line == "data: [DONE]":
                break
    return (time.perf_counter() - started) * 1000


async def throughput(call: Any, total: int, concurrency: int) -> float:
    """Requests per second with `concurrency` callers sharing `total` calls."""
    left = total

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return total / (time.perf_counter() - started)


async def measure(url: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    latency: dict[str, list[float]] = {"direct": [], "gateway": [], "gateway stream": []}
    rates: dict[str, list[float]] = {"direct": [], "gateway": []}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with (
        AsyncProducer(url, namespace=NAMESPACE, max_waiting_per_adapter=0) as producer,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits) as http,
    ):
        await wait_ready(http, producer)
        for _ in range(args.rounds):
            for _ in range(args.requests):
                latency["direct"].append(await direct_once(producer))
                latency["gateway"].append(await gateway_once(http))
                latency["gateway stream"].append(await gateway_stream_once(http))
            total = args.requests * 4
            rates["direct"].append(await throughput(lambda: direct_once(producer), total, args.concurrency))
            rates["gateway"].append(await throughput(lambda: gateway_once(http), total, args.concurrency))
    return {"latency": latency, "rates": rates}


def rows_of(measured: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    latency, rates = measured["latency"], measured["rates"]
    direct_p50, direct_p99 = statistics.median(latency["direct"]), percentile(latency["direct"], 99)
    rows = []
    for path, values in latency.items():
        p50, p99 = statistics.median(values), percentile(values, 99)
        rows.append({
            "path": path, "metric": "latency, one request at a time", "p50_ms": p50, "p99_ms": p99,
            "added_p50_ms": p50 - direct_p50, "added_p99_ms": p99 - direct_p99, "n": len(values),
        })  # fmt: skip
    direct_rate = statistics.median(rates["direct"])
    for path, values in rates.items():
        rate = statistics.median(values)
        rows.append({
            "path": path, "metric": f"throughput, {args.concurrency} in flight", "per_s": rate,
            "vs_direct": rate / direct_rate, "n": args.requests * 4 * args.rounds,
        })  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", help="use this Redis (default: start one)")
    parser.add_argument("--requests", type=int, default=300, help="requests per path per round (300)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight for throughput (32)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    server = None if args.redis_url else RedisServer.start(source="auto")
    url = args.redis_url or server.url  # type: ignore[union-attr]
    port = free_port()
    worker = start_null_worker(url, NAMESPACE)
    gateway = start_gateway(url, port)
    try:
        measured = asyncio.run(measure(url, port, args))
    finally:
        for proc in (gateway, worker):
            proc.terminate()
            proc.wait()
        if server is not None:
            server.stop()
    rows = rows_of(measured, args)
    print_table(
        [r for r in rows if "p50_ms" in r], ["path", "p50_ms", "p99_ms", "added_p50_ms", "added_p99_ms", "n"]
    )
    print()
    print_table([r for r in rows if "per_s" in r], ["path", "metric", "per_s", "vs_direct", "n"])
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / "bench_gateway.json"
    settings = {"requests": args.requests, "rounds": args.rounds, "concurrency": args.concurrency}
    payload = {"benchmark": "bench_gateway", "machine": machine_info(), "settings": settings, "rows": rows}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("LORAFLEET_LOG_LEVEL", "warning")
    sys.exit(main())
