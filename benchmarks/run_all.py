"""Run every benchmark in turn (`make bench`); the GPU ones only where CUDA is present.

    python benchmarks/run_all.py            # all that can run here
    python benchmarks/run_all.py --quick    # each with its --quick flag

Each script prints its table and writes JSON (and plots) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CPU_BENCHMARKS = [
    "bench_queue.py",
    "bench_scheduler.py",
    "bench_adapters.py",
    "bench_worker_overhead.py",
    "bench_engine_host.py",
    "chaos.py",
]
GPU_BENCHMARKS = ["bench_kernels.py", "bench_attention.py", "bench_engine.py"]


def main() -> int:
    parser = argparse.ArgumentParser(description="Run every benchmark.")
    parser.add_argument("--quick", action="store_true", help="pass --quick to each benchmark")
    args = parser.parse_args()
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    scripts = CPU_BENCHMARKS + (GPU_BENCHMARKS if has_cuda else [])
    if not has_cuda:
        print(f"no CUDA device: skipping {', '.join(GPU_BENCHMARKS)}")
    failed = []
    for script in scripts:
        if not (HERE / script).exists():
            continue
        print(f"== {script}", flush=True)
        cmd = [sys.executable, str(HERE / script)] + (["--quick"] if args.quick else [])
        if subprocess.run(cmd).returncode != 0:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
