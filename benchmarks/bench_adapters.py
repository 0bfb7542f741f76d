"""Adapter cold load: store -> disk -> host -> device slot, and what a load in the background costs decode.

The adapter is rank 16 on all seven projections at Llama-3-8B dimensions (32 layers, hidden 4096,
kv dim 1024, intermediate 14336): ~84 MB in bf16.

1. Cold load by stage, for a local-folder store and an S3 store (moto's server in its own process,
   over loopback HTTP), each repeat with an empty disk cache (median reported):
     store -> disk    DiskCache.fetch: stat, download, sha256 of every file against the version
     disk -> host     read_adapter_dir (safetensors into host memory)
     host check       parse_adapter against the base model's shapes (+ pin on CUDA)
     host -> slot     AdapterSlots.load into a device slot (+ synchronize)
     manager          AdapterManager.ensure -> ready, polled from the main thread (all but the slot)
2. Decode during a load: a small engine runs decode steps in the main loop (plus manager.poll each
   turn, as the worker does) while the manager fetches the 84 MB adapter from S3 in the background.
   Step times before the load vs during it, once with each way of handing the parsed adapter to the
   engine: `add_adapter` (re-checks the tensors on the loop thread) and `register_adapter` (takes the
   already parsed adapter: nothing left to do on the loop).

    python benchmarks/bench_adapters.py            # CPU or CUDA, whichever is here
    python benchmarks/bench_adapters.py --quick    # rank 16 at Llama-3-1B dimensions, fewer repeats

Targets (GPU; not measurable on CPU): store -> GPU slot <= 200 ms for 84 MB over loopback; no decode
step during the load longer than two steps before it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test S3 server
from common import RESULTS_DIR, machine_info, print_table
from s3_server import ACCESS_KEY, REGION, SECRET_KEY

from lorafleet.worker.adapters.control_client import upload_version
from lorafleet.worker.adapters.disk_cache import DiskCache
from lorafleet.worker.adapters.manager import AdapterManager, AdapterRef
from lorafleet.worker.cli.redis_server import free_port
from lorafleet.worker.engine import synthetic
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.engine.engine import Engine
from lorafleet.worker.engine.lora import AdapterSlots, LoraAdapter, parse_adapter, read_adapter_dir
from lorafleet.worker.engine.model import DecoderModel, ModelSpec
from lorafleet.worker.engine.sequence import GenerationRequest
from lorafleet.worker.store.settings import StoreSettings
from lorafleet.worker.store.store import Store, open_store

RANK = 16
MAX_RANK = 64


class ShapesEngine:
    """What AdapterManager needs of an engine, at a real model's shapes but without its weights.

    `add_adapter` does what Engine.add_adapter does with tensors in memory (check + pin); with
    `fast=True` it also offers `register_adapter`, which takes the parsed adapter as it is.
    """

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, fast: bool):
        self.model = SimpleNamespace(spec=spec, dtype=dtype)
        self.config = SimpleNamespace(max_rank=MAX_RANK)
        self.device = device
        self.registered: dict[str, LoraAdapter] = {}
        if fast:
            self.register_adapter = self.registered.__setitem__

    def add_adapter(self, name: str, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        pin = self.device.type == "cuda"
        shapes = self.model.spec.shapes
        self.registered[name] = parse_adapter(
            name, config, tensors, shapes, MAX_RANK, self.model.dtype, pin_memory=pin
        )

    def remove_adapter(self, name: str) -> None:
        del self.registered[name]

    @property
    def adapters(self) -> list[str]:
        return list(self.registered)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- stores -----


def moto_process(port: int) -> subprocess.Popen:
    """moto's S3 server in its own process (like a MinIO next to the worker), ready to serve."""
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)


def make_stores(tmp: Path, port: int) -> dict[str, tuple[Store, StoreSettings]]:
    s3_settings = StoreSettings(
        endpoint=f"127.0.0.1:{port}",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        region=REGION,
        cache_dir=tmp,
    )
    s3 = open_store("s3://lorafleet-bench/adapters", s3_settings)
    s3.client.make_bucket("lorafleet-bench")  # type: ignore[attr-defined]
    (tmp / "folder").mkdir()
    return {"local": (open_store(str(tmp / "folder")), StoreSettings(cache_dir=tmp)), "s3": (s3, s3_settings)}


# ----- 1. cold load by stage -----


def cold_load(store: Store, version: str, spec: ModelSpec, device: torch.device, cache_root: Path) -> dict:
    """Seconds of each stage of one cold load (empty disk cache)."""
    cache = DiskCache(cache_root / uuid.uuid4().hex, 1 << 40)
    dtype = torch.bfloat16
    slots = AdapterSlots(spec.shapes, 1, RANK, dtype, device)
    sync(device)
    t0 = time.perf_counter()
    folder = cache.fetch(store, "bench", version)
    t1 = time.perf_counter()
    config, tensors = read_adapter_dir(folder)
    t2 = time.perf_counter()
    adapter = parse_adapter(
        "bench", config, tensors, spec.shapes, MAX_RANK, dtype, pin_memory=device.type == "cuda"
    )
    t3 = time.perf_counter()
    slots.load(0, adapter)
    slots.wait_ready(0)
    sync(device)
    t4 = time.perf_counter()
    return {"store -> disk": t1 - t0, "disk -> host": t2 - t1, "host check": t3 - t2, "host -> slot": t4 - t3}


def manager_load(
    store: Store, settings: StoreSettings, version: str, engine: ShapesEngine, tmp: Path
) -> float:
    """Seconds from ensure() to ready through AdapterManager, polled every 0.5 ms."""
    settings = dataclasses.replace(settings, cache_dir=tmp / uuid.uuid4().hex)
    manager = AdapterManager(engine, store, None, settings)
    ref = AdapterRef("bench", version)
    start = time.perf_counter()
    manager.ensure(ref)
    while manager.state(ref)[0] != "ready":
        manager.poll(lambda key: True)
        if manager.state(ref)[0] == "failed":
            raise RuntimeError(manager.state(ref)[1])
        time.sleep(0.0005)
    elapsed = time.perf_counter() - start
    manager.close()
    engine.registered.clear()
    return elapsed


def stage_rows(stores: dict, version: str, spec: ModelSpec, device: torch.device, tmp: Path, repeat: int,
               nbytes: int) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for kind, (store, settings) in stores.items():
        samples: dict[str, list[float]] = {}
        for _ in range(repeat):
            for stage, seconds in cold_load(store, version, spec, device, tmp / "stages").items():
                samples.setdefault(stage, []).append(seconds)
            engine = ShapesEngine(spec, device, torch.bfloat16, fast=True)
            samples.setdefault("manager: ensure -> ready", []).append(
                manager_load(store, settings, version, engine, tmp)
            )
        total = 0.0
        for stage, values in samples.items():
            median = statistics.median(values)
            if not stage.startswith("manager"):
                total += median
            rows.append(_stage_row(kind, stage, median, nbytes))
        rows.append(_stage_row(kind, "total: store -> slot", total, nbytes))
    return rows


def _stage_row(kind: str, stage: str, seconds: float, nbytes: int) -> dict[str, Any]:
    return {
        "part": "cold_load",
        "store": kind,
        "stage": stage,
        "ms": seconds * 1e3,
        "MB_per_s": nbytes / seconds / 1e6,
    }


# ----- 2. decode during a background load -----


def small_engine(device: torch.device, size: str, sequences: int) -> Engine:
    config = synthetic.model_config("llama", size)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hf_model = synthetic.build_model(config, dtype=dtype, device=device)
    model = DecoderModel(config, dict(hf_model.state_dict()), device, dtype)
    engine = Engine(
        model, EngineConfig(max_loras=2, max_rank=RANK, max_batch=sequences, kv_cache_tokens=sequences * 2048)
    )
    for i in range(sequences):
        prompt = [(7 * i + j) % 1000 + 3 for j in range(16)]
        engine.add_request(GenerationRequest(prompt_ids=prompt, max_new_tokens=2000, ignore_eos=True))
    return engine


def decode_during_load(engine: Engine, store: Store, settings: StoreSettings, version: str, spec: ModelSpec,
                       fast: bool, before: int, tmp: Path) -> dict[str, Any]:  # fmt: skip
    """Decode step times (engine.step + manager.poll) before and during a background load."""
    device = engine.device
    target = ShapesEngine(spec, device, torch.bfloat16, fast=fast)
    settings = dataclasses.replace(settings, cache_dir=tmp / uuid.uuid4().hex)
    manager = AdapterManager(target, store, None, settings)
    ref = AdapterRef("bench", version)

    def turn() -> float:
        start = time.perf_counter()
        engine.step()
        sync(device)
        manager.poll(lambda key: True)
        return time.perf_counter() - start

    for _ in range(5):  # warm up (CUDA graphs, allocator)
        turn()
    steady = [turn() for _ in range(before)]
    load_start = time.perf_counter()
    manager.ensure(ref)
    during = []
    while manager.state(ref)[0] == "loading":
        during.append(turn())
    load_s = time.perf_counter() - load_start
    if manager.state(ref)[0] != "ready":
        raise RuntimeError(f"load failed: {manager.state(ref)[1]}")
    manager.close()
    base = statistics.median(steady)
    worst = max(during)
    return {
        "part": "decode_during_load",
        "register": "register_adapter" if fast else "add_adapter",
        "step_ms_before": base * 1e3,
        "step_ms_during_median": statistics.median(during) * 1e3,
        "step_ms_during_max": worst * 1e3,
        "max_stretch_steps": (worst - base) / base,
        "steps_during": len(during),
        "load_ms": load_s * 1e3,
    }


# ----- main -----


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="Llama-3-1B dimensions, 1 repeat")
    parser.add_argument("--repeat", type=int, default=3, help="cold loads per store (median reported)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument("--engine-size", default="small", help="synthetic size of the decoding engine")
    parser.add_argument("--sequences", type=int, default=8, help="running sequences in the decoding engine")
    parser.add_argument("--steps-before", type=int, default=30, help="decode steps timed before the load")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR / "bench_adapters.json", help="JSON output path"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    size = "llama-3-1b" if args.quick else "llama-3-8b"
    repeat = 1 if args.quick else args.repeat
    config = synthetic.model_config("llama", size)
    spec = ModelSpec.from_config(config)
    port = free_port()
    moto = moto_process(port)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp_name:
            tmp = Path(tmp_name)
            folder = synthetic.write_adapter(
                tmp / "adapter", config, rank=RANK, targets=synthetic.ALL_TARGETS, dtype=torch.bfloat16
            )
            nbytes = sum(f.stat().st_size for f in folder.iterdir())
            stores = make_stores(tmp, port)
            versions = {upload_version(folder, "bench", store).version for store, _ in stores.values()}
            [version] = versions
            print(f"adapter: rank {RANK}, all linear, {size} dims, {nbytes / 1e6:.1f} MB; device {device}")
            rows = stage_rows(stores, version, spec, device, tmp, repeat, nbytes)
            engine = small_engine(device, args.engine_size, args.sequences)
            s3, s3_settings = stores["s3"]
            for fast in (False, True):
                rows.append(
                    decode_during_load(engine, s3, s3_settings, version, spec, fast, args.steps_before, tmp)
                )
    finally:
        moto.kill()
        moto.wait()
    print_table([r for r in rows if r["part"] == "cold_load"], ["store", "stage", "ms", "MB_per_s"])
    print()
    print_table(
        [r for r in rows if r["part"] == "decode_during_load"],
        ["register", "step_ms_before", "step_ms_during_median", "step_ms_during_max", "max_stretch_steps",
         "steps_during", "load_ms"],
    )  # fmt: skip
    extra = {"adapter_bytes": nbytes, "dims": size, "rank": RANK, "device": str(device),
             "engine_size": args.engine_size, "sequences": args.sequences}  # fmt: skip
    payload = {"benchmark": "bench_adapters", "machine": machine_info(), **extra, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
