"""Pushed adapter versions through a real `lorafleet worker` process: what a job sees.

The adapter store is a local folder or an S3 bucket (moto over HTTP), each test on both; versions
are uploaded and marked ready in the registry as the control plane would (test_adapter_control
covers the control plane itself). Jobs go through the Producer, so these tests check the worker's
side of issue 7 end to end: an update reaches a running worker without a restart while a sequence
already running finishes on its version, a removed adapter fails new jobs with adapter_not_found,
and with the store down resident adapters keep serving while a job for a cold one fails at its
deadline with the reason, and service resumes when the store returns.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from store_harness import StoreBackend

from lorafleet.producer import Chunk, ErrorCode, JobFailed, Keys, Producer, Result
from lorafleet.worker.adapters.control_client import remove_adapter, upload_version
from lorafleet.worker.adapters.registry import Registry
from lorafleet.worker.engine import synthetic
from lorafleet.worker.engine.engine import Engine
from lorafleet.worker.engine.sequence import GenerationRequest

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return synthetic.write_model(tmp_path_factory.mktemp("model") / "tiny", "llama", "tiny", seed=3)


def oracle(model_dir: Path, folder: Path, max_new_tokens: int) -> list[int]:
    """Greedy tokens of PROMPT with the adapter in `folder`, from an engine of this process."""
    engine = Engine.from_pretrained(model_dir, max_loras=1, max_rank=16, device="cpu", dtype=torch.float32)
    engine.add_adapter("a", folder)
    request = GenerationRequest(
        prompt_ids=PROMPT, adapter="a", max_new_tokens=max_new_tokens, ignore_eos=True
    )
    return list(engine.generate([request])[0].token_ids)


class Fleet:
    """An adapter store (a folder or an S3 bucket), the registry, and one worker process serving
    from them."""

    def __init__(self, model_dir: Path, tmp_path: Path, backend: StoreBackend, redis_client, redis_url: str):
        self.model_dir, self.tmp_path, self.redis_url = model_dir, tmp_path, redis_url
        self.backend = backend
        self.store = backend.open()
        self.registry = Registry(redis_client, Keys())
        args = [
            sys.executable, "-P", "-m", "lorafleet.producer.cli", "worker", "--redis-url", redis_url,
            "--model", str(model_dir), "--adapters", backend.uri, "--name", "w1", "--max-loras", "2",
            "--max-batch", "4", "--kv-cache-tokens", "2048", "--drain-timeout", "5",
        ]  # fmt: skip
        env = {**os.environ, **backend.env()}
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=None, env=env)

    def adapter(self, folder: str, seed: int) -> Path:
        return synthetic.write_adapter(self.tmp_path / folder, self.model_dir, rank=8, seed=seed)

    def publish(self, name: str, folder: Path) -> str:
        """Upload a version and mark it ready (and current), as a validation job would."""
        record = upload_version(folder, name, self.store)
        self.registry.set_pending(record)
        self.registry.set_ready(name, record.version, rank=8, targets=["q_proj", "v_proj"])
        return record.version

    def store_down(self) -> None:
        self.backend.down()  # the S3 server stops listening; the folder goes as an unmounted volume

    def store_up(self) -> None:
        self.backend.up()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def fleet(model_dir, tmp_path, store_backend, redis_client, redis_url):
    fleet = Fleet(model_dir, tmp_path, store_backend, redis_client, redis_url)
    yield fleet
    fleet.close()


def greedy(producer: Producer, adapter: str, max_new_tokens: int = 6, **spec) -> list[int]:
    handle = producer.submit(
        prompt_ids=PROMPT, adapter=adapter, max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True,
        **spec,
    )  # fmt: skip
    return list(handle.result(timeout=180).token_ids)


def test_an_update_reaches_the_worker_while_a_running_sequence_keeps_its_version(fleet):
    v1, v2 = fleet.adapter("v1", seed=1), fleet.adapter("v2", seed=2)
    assert oracle(fleet.model_dir, v1, 6) != oracle(fleet.model_dir, v2, 6)  # the versions differ
    fleet.publish("bot", v1)
    with Producer(fleet.redis_url) as producer:
        assert greedy(producer, "bot") == oracle(fleet.model_dir, v1, 6)
        long = producer.submit(
            prompt_ids=PROMPT,
            adapter="bot",
            max_new_tokens=150,
            temperature=0.0,
            ignore_eos=True,
            stream=True,
        )
        stream = long.stream(timeout=180)
        assert isinstance(next(stream), Chunk)  # the sequence runs on v1 now
        fleet.publish("bot", v2)  # acknowledged push: from here on new sequences get v2
        assert greedy(producer, "bot") == oracle(fleet.model_dir, v2, 6)
        final = [item for item in stream if isinstance(item, Result)]
    assert len(final) == 1
    assert list(final[0].token_ids) == oracle(fleet.model_dir, v1, 150)


def test_a_removed_adapter_fails_new_jobs_with_adapter_not_found(fleet):
    fleet.publish("bot", fleet.adapter("v1", seed=1))
    with Producer(fleet.redis_url) as producer:
        greedy(producer, "bot")
        remove_adapter("bot", fleet.store, fleet.registry)
        with pytest.raises(JobFailed) as caught:
            greedy(producer, "bot")
    assert caught.value.code == ErrorCode.ADAPTER_NOT_FOUND


def test_with_the_store_down_resident_adapters_serve_and_cold_ones_fail_at_their_deadline(fleet):
    resident, cold = fleet.adapter("resident", seed=1), fleet.adapter("cold", seed=2)
    fleet.publish("resident", resident)
    fleet.publish("cold", cold)
    with Producer(fleet.redis_url) as producer:
        assert greedy(producer, "resident") == oracle(fleet.model_dir, resident, 6)
        fleet.store_down()
        try:
            assert greedy(producer, "resident") == oracle(fleet.model_dir, resident, 6)
            started = time.monotonic()
            with pytest.raises(JobFailed) as caught:
                greedy(producer, "cold", timeout=3.0)
            assert time.monotonic() - started < 60
        finally:
            fleet.store_up()
        assert caught.value.code == ErrorCode.DEADLINE_EXCEEDED
        assert "adapter store unavailable" in caught.value.message
        assert greedy(producer, "cold") == oracle(fleet.model_dir, cold, 6)  # service resumes
