"""The adapter control plane: push, validate on RQ, reject with a reason, ls/show/rm/warm from the CLI.

Validation jobs run on RQ against the test's real Redis: in this process (SimpleWorker, burst) for
most tests, and once through a real `lorafleet control --burst` process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis
import torch
from rq import SimpleWorker
from rq.serializers import JSONSerializer
from safetensors.torch import load_file, save_file
from store_harness import StoreBackend

from lorafleet.producer.cli import main
from lorafleet.producer.keys import Keys
from lorafleet.worker.adapters.control import ControlConfig, ControlPlane, configure
from lorafleet.worker.adapters.control_client import Pushed, control_queue, push_adapter
from lorafleet.worker.adapters.files import ADAPTER_FILES, AdapterError, version_key
from lorafleet.worker.adapters.registry import AdapterRecord, Registry
from lorafleet.worker.engine import synthetic

MAX_RANK = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return synthetic.write_model(tmp_path_factory.mktemp("model") / "tiny")


@dataclasses.dataclass
class Env:
    """A store of one kind, the test's Redis with a registry and control queue, the base model."""

    backend: StoreBackend
    redis: redis.Redis
    model_dir: Path
    tmp_path: Path

    def __post_init__(self) -> None:
        self.store = self.backend.open()
        self.registry = Registry(self.redis, Keys())
        self.queue = control_queue(self.redis, Keys())

    def adapter(self, folder: str = "a", model=None, **kwargs) -> Path:
        return synthetic.write_adapter(self.tmp_path / folder, model or self.model_dir, **kwargs)

    def push(self, path: Path, name: str) -> Pushed:
        return push_adapter(path, name, self.store, self.registry, self.queue)

    def run_jobs(self) -> None:
        worker = SimpleWorker([self.queue], connection=self.redis, serializer=JSONSerializer)
        worker.work(burst=True, logging_level="WARNING")

    def cli_while_serving(self, *argv: str) -> int:
        """Run a CLI command on a thread while this thread serves control jobs (RQ wants the main thread)."""
        status: list[int] = []
        thread = threading.Thread(target=lambda: status.append(main(list(argv))))
        thread.start()
        while thread.is_alive():
            self.run_jobs()
            thread.join(0.05)
        return status[0]


@pytest.fixture
def env(store_backend, redis_client, model_dir, tmp_path) -> Env:
    return Env(store_backend, redis_client, model_dir, tmp_path)


@pytest.fixture
def plane(env):
    """Configure this process's control plane (max rank 16); returns a function that changes limits."""

    def make(max_rank: int = MAX_RANK, max_bytes: int = 1 << 30) -> ControlPlane:
        settings = dataclasses.replace(env.backend.settings, max_adapter_bytes=max_bytes)
        config = ControlConfig(env.backend.uri, str(env.model_dir), max_rank=max_rank, settings=settings)
        control = ControlPlane(config, client=env.redis)
        configure(control)
        return control

    make()
    yield make
    configure(None)


@pytest.fixture
def cli_env(env, redis_url, monkeypatch):
    """The CLI reaches the test's store and Redis through LORAFLEET_* variables."""
    for name, value in {**env.backend.env(), "LORAFLEET_REDIS_URL": redis_url}.items():
        monkeypatch.setenv(name, value)


def test_push_validates_and_makes_the_version_current(env, plane):
    pushed = env.push(env.adapter(rank=8), "support-bot")
    assert env.registry.record("support-bot", pushed.version).state == "pending"
    assert env.registry.current("support-bot") is None  # not served before it is validated
    env.run_jobs()
    record = env.registry.record("support-bot", pushed.version)
    assert (record.state, record.rank, record.targets) == ("ready", 8, ["q_proj", "v_proj"])
    assert env.registry.current("support-bot") == pushed.version
    for filename in ADAPTER_FILES:
        info = env.store.stat(version_key("support-bot", pushed.version, filename))
        assert info.sha256 == record.files[filename]["sha256"]


def test_a_new_push_becomes_current_and_the_old_one_stays_ready(env, plane):
    first = env.push(env.adapter("v1", seed=1), "bot")
    env.run_jobs()
    second = env.push(env.adapter("v2", seed=2), "bot")
    assert env.registry.current("bot") == first.version  # until the new one is validated
    env.run_jobs()
    assert env.registry.current("bot") == second.version
    assert env.registry.record("bot", first.version).state == "ready"  # bot@<first> still resolves
    again = env.push(env.tmp_path / "v1", "bot")  # known content: a rollback, no new upload
    assert (again.version, again.job_id) == (first.version, None)
    assert env.registry.current("bot") == first.version


def nan_weights(path: Path) -> None:
    tensors = {k: v.clone() for k, v in load_file(path / "adapter_model.safetensors").items()}
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, path / "adapter_model.safetensors")


def pickle_in_disguise(path: Path) -> None:
    tensors = {k: v.clone() for k, v in load_file(path / "adapter_model.safetensors").items()}
    torch.save(tensors, path / "adapter_model.safetensors")


def config_edit(**changes):
    """A spoiler that rewrites adapter_config.json with `changes`."""

    def spoil(path: Path) -> None:
        config = json.loads((path / "adapter_config.json").read_text())
        config.update(changes)
        (path / "adapter_config.json").write_text(json.dumps(config))

    return spoil


def config_text(text: str):
    def spoil(path: Path) -> None:
        (path / "adapter_config.json").write_text(text)

    return spoil


# case: (write_adapter options, how to spoil the files, plane limits, words of the reason)
REJECTIONS = {
    "config not JSON": (dict(rank=8), config_text("{"), {}, "adapter_config.json is not valid JSON"),
    "config a list": (dict(rank=8), config_text("[8]"), {}, "must hold an object, not a list"),
    "rank not a number": (dict(rank=8), config_edit(r="four"), {}, "r must be an integer, not 'four'"),
    "alpha not a number": (dict(rank=8), config_edit(lora_alpha=[1]), {}, "lora_alpha must be a number"),
    "target_modules short of the weights": (
        dict(rank=8),
        config_edit(target_modules=["q_proj"]),
        {},
        "target_modules lists only",
    ),
    "rank too large": (dict(rank=32), None, {}, "rank 32 is outside 1..16"),
    "NaN weights": (dict(rank=8), nan_weights, {}, "NaN or Inf"),
    "pickle named .safetensors": (dict(rank=8), pickle_in_disguise, {}, "cannot be read"),
    "over the size limit": (dict(rank=8), None, dict(max_bytes=4096), "the limit is 4,096"),
    "another base model": (
        dict(model=synthetic.model_config(hidden_size=32)),
        None,
        {},
        "the base model needs",
    ),
}


@pytest.mark.parametrize("case", REJECTIONS, ids=list(REJECTIONS))
def test_a_bad_adapter_is_rejected_with_the_reason(case, env, plane):
    options, spoil, limits, reason = REJECTIONS[case]
    path = env.adapter("bad", **options)
    if spoil is not None:
        spoil(path)
    if limits:
        plane(**limits)
    pushed = env.push(path, "bad")
    env.run_jobs()
    record = env.registry.record("bad", pushed.version)
    assert record.state == "rejected"
    assert reason in record.reason
    assert str(env.tmp_path) not in record.reason  # no temporary paths of the control plane
    assert env.registry.current("bad") is None


def test_a_pickle_only_folder_is_refused_before_any_upload(env, cli_env, capsys):
    path = env.adapter()
    torch.save(load_file(path / "adapter_model.safetensors"), path / "adapter_model.bin")
    (path / "adapter_model.safetensors").unlink()
    assert main(["adapters", "push", str(path), "pickled"]) == 1
    assert "adapter_model.bin is a pickle" in capsys.readouterr().err
    with pytest.raises(AdapterError, match="pickle"):
        env.push(path, "pickled")
    assert env.store.list_keys() == []
    assert env.registry.names() == []


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "x" * 129, "with space"])
def test_bad_names_are_refused_by_every_command(name, env, cli_env, capsys):
    path = env.adapter()
    for argv in (["push", str(path), name], ["show", name], ["rm", name], ["warm", name]):
        assert main(["adapters", *argv]) == 2, argv
        assert "error:" in capsys.readouterr().err
    assert env.store.list_keys() == []


def test_cli_push_waits_for_the_verdict(env, plane, cli_env, capsys):
    assert env.cli_while_serving("adapters", "push", str(env.adapter(rank=4)), "bot") == 0
    out = capsys.readouterr().out
    assert "ready bot@" in out
    assert "rank 4" in out
    assert env.cli_while_serving("adapters", "push", str(env.adapter("big", rank=32)), "bot") == 1
    assert "rejected: adapter 'bot': rank 32 is outside 1..16" in capsys.readouterr().err


def test_ls_show_and_rm(env, plane, cli_env, capsys):
    pushed = env.push(env.adapter(), "bot")
    env.run_jobs()
    plain = env.adapter("plain")
    for filename in ADAPTER_FILES:  # an unregistered folder in the plain layout
        env.store.put_file(f"legacy/{filename}", plain / filename)
    capsys.readouterr()
    assert main(["adapters", "ls", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["bot"]["current"] == pushed.version
    assert rows["legacy"]["latest_state"] == "plain"
    assert main(["adapters", "show", "bot"]) == 0
    assert f"* {pushed.version}  ready" in capsys.readouterr().out
    assert main(["adapters", "rm", "bot"]) == 0
    assert env.registry.current("bot") is None
    assert env.registry.records("bot") == []
    assert env.store.list_keys("bot/") == []
    assert env.store.list_keys("legacy/") != []
    assert main(["adapters", "show", "bot"]) == 1
    assert main(["adapters", "rm", "bot"]) == 1


def test_warm_asks_workers_to_prefetch_the_current_version(env, plane, cli_env, capsys):
    pushed = env.push(env.adapter(), "bot")
    env.run_jobs()
    after = env.registry.last_event_id()
    assert env.cli_while_serving("adapters", "warm", "bot") == 0
    assert f"warming bot@{pushed.version}" in capsys.readouterr().out
    assert [e[1:] for e in env.registry.read_events(after, block_ms=0)] == [("warm", "bot", pushed.version)]
    assert env.cli_while_serving("adapters", "warm", "ghost") == 1


def test_a_store_outage_never_rejects_an_adapter(env, plane):
    pushed = env.push(env.adapter(), "bot")
    env.backend.down()
    env.run_jobs()
    assert env.registry.record("bot", pushed.version).state == "pending"
    assert env.queue.fetch_job(pushed.job_id).get_status() == "scheduled"  # RQ runs it again later


def test_a_store_outage_is_reported_by_push_and_rm_without_a_traceback(env, plane, cli_env, capsys):
    path = env.adapter()
    env.push(path, "bot")
    env.run_jobs()
    env.backend.down()
    try:
        if env.backend.kind == "s3":  # a local folder that is gone is created again by an upload
            assert main(["adapters", "push", "--no-wait", str(env.adapter("v2", seed=5)), "bot"]) == 1
            assert "error: upload failed:" in capsys.readouterr().err
        assert main(["adapters", "rm", "bot"]) == 1
        err = capsys.readouterr().err
        assert "removed from the registry, but its files are still in the store" in err
        assert env.registry.current("bot") is None  # new jobs fail at once
    finally:
        env.backend.up()
    assert main(["adapters", "rm", "bot"]) == 0  # again, with the store back: the files go
    assert env.store.list_keys("bot/") == []


def test_lorafleet_control_process_validates_pushes(redis_client, redis_url, model_dir, tmp_path, monkeypatch,
                                                    capsys):  # fmt: skip
    backend = StoreBackend.make("s3", tmp_path)  # one kind is enough: this is about the process
    env = Env(backend, redis_client, model_dir, tmp_path)
    for name, value in {**backend.env(), "LORAFLEET_REDIS_URL": redis_url}.items():
        monkeypatch.setenv(name, value)
    assert main(["adapters", "push", "--no-wait", str(env.adapter(rank=8)), "bot"]) == 0
    assert "validating" in capsys.readouterr().out
    try:
        done = subprocess.run(
            [sys.executable, "-P", "-m", "lorafleet.producer.cli", "control", "--burst",
             "--model", str(model_dir), "--max-rank", "16"],
            env=os.environ.copy(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        backend.close()
    assert done.returncode == 0, done.stderr
    [record] = env.registry.records("bot")
    assert (record.state, record.rank) == ("ready", 8)


def test_a_push_validated_late_does_not_replace_a_newer_current_version(redis_client):
    registry = Registry(redis_client, Keys())
    registry.set_pending(AdapterRecord("bot", "1111111111111111", pushed_at=100.0))
    registry.set_pending(AdapterRecord("bot", "2222222222222222", pushed_at=200.0))
    after = registry.last_event_id()
    registry.set_ready("bot", "2222222222222222")
    registry.set_ready("bot", "1111111111111111")  # its validation finished last
    assert registry.current("bot") == "2222222222222222"
    assert registry.record("bot", "1111111111111111").state == "ready"
    assert [e[1:] for e in registry.read_events(after, 0)] == [("ready", "bot", "2222222222222222")]


@pytest.mark.parametrize("protocol", [2, 3])
def test_workers_read_adapter_events_in_either_protocol(redis_url, protocol):
    registry = Registry(redis.Redis.from_url(redis_url, protocol=protocol), Keys())
    after = registry.last_event_id()
    registry.publish("warm", "bot", "0123456789abcdef")
    [(entry_id, *event)] = registry.read_events(after, block_ms=10)
    assert event == ["warm", "bot", "0123456789abcdef"]
    assert registry.last_event_id() == entry_id
    assert registry.read_events(entry_id, block_ms=10) == []
