"""Settings from LORAFLEET_* variables: one reader (`env_settings`) behind the producer's, the worker's and
the control plane's config objects, so that a variable means the same to every command."""

from __future__ import annotations

import pytest

from lorafleet.producer.cli import main
from lorafleet.producer.config import ProducerConfig, env_settings, redis_target
from lorafleet.worker.adapters.control import ControlConfig
from lorafleet.worker.serve.config import WorkerConfig
from lorafleet.worker.store.settings import StoreSettings

SHARED = {
    "LORAFLEET_REDIS_URL": "redis://env:6379/3",
    "LORAFLEET_NAMESPACE": "env-ns",
    "LORAFLEET_MODEL": "s3://models/base",
    "LORAFLEET_ADAPTERS": "s3://adapters",
    "LORAFLEET_MAX_RANK": "32",
    "LORAFLEET_LOG_LEVEL": "debug",
}


def test_every_config_reads_a_shared_variable_the_same_way():
    worker = WorkerConfig.from_env(env=SHARED)
    control = ControlConfig.from_env(env=SHARED)
    producer = ProducerConfig.from_env(SHARED)
    assert (worker.redis_url, worker.namespace) == (control.redis_url, control.namespace)
    assert (producer.redis_url, producer.namespace) == ("redis://env:6379/3", "env-ns")
    assert redis_target(env=SHARED) == ("redis://env:6379/3", "env-ns")
    assert (worker.model, worker.adapters, worker.max_rank) == (control.model, control.adapters, 32)
    assert worker.log_level == control.log_level == "debug"


def test_control_config_flags_win_and_required_fields_name_their_flag():
    config = ControlConfig.from_env({"adapters": "file:///flag", "max_rank": 8, "model": None}, env=SHARED)
    assert (config.adapters, config.max_rank, config.model) == ("file:///flag", 8, "s3://models/base")
    with pytest.raises(ValueError, match=r"adapters is required \(--store or LORAFLEET_ADAPTERS\)"):
        ControlConfig.from_env(env={}, required=("adapters",))
    with pytest.raises(ValueError, match=r"model is required \(--model or LORAFLEET_MODEL\)"):
        ControlConfig.from_env(env={"LORAFLEET_ADAPTERS": "s3://a"}, required=("adapters", "model"))
    assert ControlConfig.from_env(env={}).adapters == ""  # `adapters ls` works without a store


def test_control_config_checks_each_setting_once():
    with pytest.raises(ValueError, match="LORAFLEET_MAX_RANK='big' is not a valid int"):
        ControlConfig.from_env(env={"LORAFLEET_MAX_RANK": "big"})
    with pytest.raises(ValueError, match=r"max_rank must be in 1\.\.256"):
        ControlConfig.from_env(env={"LORAFLEET_MAX_RANK": "512"})
    with pytest.raises(ValueError, match="log_level must be debug, info, warning or error"):
        ControlConfig.from_env(env={"LORAFLEET_LOG_LEVEL": "loud"})
    with pytest.raises(ValueError, match="redis_url must start with"):
        ControlConfig.from_env(env={"LORAFLEET_REDIS_URL": "http://nope"})
    with pytest.raises(ValueError, match="namespace"):
        ControlConfig.from_env({"namespace": "bad ns"}, env={})


def test_control_config_takes_its_store_settings_from_the_same_environment():
    config = ControlConfig.from_env(env={"LORAFLEET_S3_ENDPOINT": "minio:9000", "LORAFLEET_SETTINGS": "x"})
    assert config.settings == StoreSettings(endpoint="minio:9000")


def test_empty_variables_are_unset_and_only_plain_fields_are_read():
    env = {
        "LORAFLEET_MAX_BATCH": "",
        "LORAFLEET_NAME": "",
        "LORAFLEET_SETTINGS": "x",
        "LORAFLEET_MAX_RANK": "9",
    }
    assert env_settings(ControlConfig, env) == {"max_rank": 9}
    assert env_settings(WorkerConfig, env, names=("max_batch", "name")) == {}
    assert env_settings(ProducerConfig, {"LORAFLEET_CLIENT_ID": "me"}) == {"client_id": "me"}  # str | None


def test_control_command_reports_a_missing_or_bad_setting_without_a_traceback(monkeypatch, capsys):
    for name in SHARED:
        monkeypatch.delenv(name, raising=False)
    assert main(["control", "--store", "s3://adapters"]) == 2
    assert "error: model is required (--model or LORAFLEET_MODEL)" in capsys.readouterr().err
    monkeypatch.setenv("LORAFLEET_MODEL", "s3://models/base")
    monkeypatch.setenv("LORAFLEET_LOG_LEVEL", "loud")
    assert main(["control", "--store", "s3://adapters"]) == 2
    assert "log_level must be debug, info, warning or error" in capsys.readouterr().err
    monkeypatch.setenv("LORAFLEET_LOG_LEVEL", "info")
    assert main(["control", "--store", "s3://adapters", "--max-rank", "0"]) == 2
    assert "max_rank must be in 1..256" in capsys.readouterr().err
    assert main(["adapters", "ls", "--namespace", "bad ns"]) == 2
    assert "error:" in capsys.readouterr().err
