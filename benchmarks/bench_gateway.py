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
import openai
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
        sys.executable, "-P", "-m", "lorafleet.producer.cli", "gateway", "--redis-url", url,
        "--namespace", NAMESPACE, "--port", str(port), "--models", "any", "--log-level", "warning",
    ]  # fmt: skip
    return subprocess.Popen(command, stderr=subprocess.DEVNULL)


class Connection:
    """One kept-alive HTTP/1.1 connection with just enough client for this benchmark: a request, then
    its response read by Content-Length or chunked encoding (server-sent events).

    Not httpx: on this machine an httpx.AsyncClient with 32 connections tops out near 300 requests/s
    on the gateway's trivial /health (measured), so it would measure itself; this costs ~0.1 ms."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        self.writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await self.writer.drain()
        lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:] if b": " in line)
        if b"content-length" in headers:
            return status, await self.reader.readexactly(int(headers[b"content-length"]))
        parts = []
        while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):  # chunked
            parts.append(await self.reader.readexactly(size + 2))
        await self.reader.readuntil(b"\r\n")
        return status, b"".join(parts)

    def close(self) -> None:
        self.writer.close()


class Pool:
    """Connections for `size` concurrent callers, each used by one caller at a time."""

    def __init__(self, port: int, size: int) -> None:
        self.port, self.size = port, size
        self.idle: asyncio.Queue[Connection] = asyncio.Queue()

    async def __aenter__(self) -> Pool:
        for _ in range(self.size):
            self.idle.put_nowait(await Connection.open(self.port))
        return self

    async def __aexit__(self, *exc: object) -> None:
        while not self.idle.empty():
            self.idle.get_nowait().close()

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        connection = await self.idle.get()
        try:
            return await connection.post(path, body)
        finally:
            self.idle.put_nowait(connection)


CHAT_PATH = "/v1/chat/completions"
CHAT_BODY = json.dumps(BODY).encode()
STREAM_BODY = json.dumps({**BODY, "stream": True}).encode()


async def wait_ready(port: int) -> None:
    """Until the gateway answers and the null worker answers a job through it."""
    deadline = time.monotonic() + 60
    while True:
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                if (await http.post(CHAT_PATH, json=BODY)).status_code == 200:
                    return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway or the null worker did not start")
        await asyncio.sleep(0.2)


async def direct_once(producer: AsyncProducer) -> float:
    started = time.perf_counter()
    handle = await producer.submit(messages=MESSAGES, adapter=ADAPTER, max_new_tokens=16, timeout=30)
    await handle.result()
    return (time.perf_counter() - started) * 1000


async def gateway_once(pool: Pool, body: bytes = CHAT_BODY) -> float:
    started = time.perf_counter()
    status, answer = await pool.post(CHAT_PATH, body)
    if status != 200 or (body is STREAM_BODY and not answer.rstrip().endswith(b"data: [DONE]")):
        raise RuntimeError(f"gateway answered {status}: {answer[:300]!r}")
    return (time.perf_counter() - started) * 1000


async def openai_once(client: openai.AsyncOpenAI) -> float:
    started = time.perf_counter()
    await client.chat.completions.create(model=ADAPTER, messages=MESSAGES, max_tokens=16)  # type: ignore[arg-type]
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
    paths = ("direct", "gateway", "gateway stream", "gateway, openai client")
    latency: dict[str, list[float]] = {path: [] for path in paths}
    rates: dict[str, list[float]] = {"direct": [], "gateway": []}
    await wait_ready(port)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    async with (
        AsyncProducer(url, namespace=NAMESPACE, max_waiting_per_adapter=0) as producer,
        Pool(port, args.concurrency) as pool,
    ):
        once = {
            "direct": lambda: direct_once(producer),
            "gateway": lambda: gateway_once(pool),
            "gateway stream": lambda: gateway_once(pool, STREAM_BODY),
            "gateway, openai client": lambda: openai_once(client),
        }
        for _ in range(50):  # warm every path
            for call in once.values():
                await call()
        for _ in range(args.rounds):
            for _ in range(args.requests):
                for path in paths:
                    latency[path].append(await once[path]())
            for path in rates:
                rates[path].append(await throughput(once[path], args.requests * 4, args.concurrency))
    await client.close()
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
