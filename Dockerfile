# The lorafleet image: `lorafleet worker` by default; docker-compose.yml also runs `lorafleet control`
# from it. One build argument picks the PyTorch wheels:
#   docker build -t lorafleet:cuda .                                                  # CUDA (default)
#   docker build -t lorafleet:cpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
# PyPI's Linux torch wheels carry their CUDA runtime, so a slim Python base is enough on a GPU host
# with the NVIDIA Container Toolkit and a driver recent enough for that CUDA version. For an older
# driver, pick a matching index, e.g. --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126.
FROM python:3.12-slim-bookworm

ARG TORCH_INDEX=https://pypi.org/simple
ARG TORCH_SPEC="torch>=2.11,<2.16"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Triton compiles a small C launcher for its kernels at first use: it needs a C compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the chosen index (its own layer: it is by far the largest and changes least),
# so that the worker extra below finds it already satisfied.
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"

COPY pyproject.toml README.md /tmp/lorafleet/
COPY producer /tmp/lorafleet/producer
COPY worker /tmp/lorafleet/worker
COPY kernels /tmp/lorafleet/kernels
COPY gateway /tmp/lorafleet/gateway
RUN pip install "/tmp/lorafleet[worker,gateway]" && rm -rf /tmp/lorafleet

RUN useradd --create-home --uid 10001 --user-group lorafleet \
    && install -d -o lorafleet -g lorafleet /var/cache/lorafleet
USER lorafleet
WORKDIR /home/lorafleet
ENV LORAFLEET_CACHE_DIR=/var/cache/lorafleet

ENTRYPOINT ["lorafleet"]
CMD ["worker"]
