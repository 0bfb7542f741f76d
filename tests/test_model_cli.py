"""`lorafleet models push`: a base model put into an S3 store (moto over HTTP) that workers then read."""

from __future__ import annotations

import pytest
from s3_server import ACCESS_KEY, REGION, SECRET_KEY, S3Server

from lorafleet.producer.cli import main
from lorafleet.worker.store.models import fetch_model


@pytest.fixture
def s3(monkeypatch, tmp_path):
    server = S3Server.start()
    server.create_bucket("models")
    for name, value in {
        "S3_ENDPOINT": server.endpoint, "S3_ACCESS_KEY": ACCESS_KEY, "S3_SECRET_KEY": SECRET_KEY,
        "S3_REGION": REGION, "CACHE_DIR": str(tmp_path / "cache"),
    }.items():  # fmt: skip
        monkeypatch.setenv(f"LORAFLEET_{name}", value)
    yield server
    server.stop()


def test_a_synthetic_model_pushed_once_is_what_workers_fetch(s3, capsys):
    uri = "s3://models/base"
    assert main(["models", "push", "synthetic:qwen3:tiny", uri, "--if-missing"]) == 0
    folder = fetch_model(uri)
    assert (folder / "model.safetensors").is_file()
    assert '"qwen3"' in (folder / "config.json").read_text()
    # --if-missing leaves a model that is there alone (compose runs it at every start).
    assert main(["models", "push", "synthetic:llama:tiny", uri, "--if-missing"]) == 0
    assert "already holds a model" in capsys.readouterr().out
    assert '"qwen3"' in (fetch_model(uri) / "config.json").read_text()


def test_a_model_folder_is_pushed_file_by_file(s3, tmp_path):
    source = tmp_path / "source"
    assert main(["models", "push", "synthetic:llama:tiny", str(source)]) == 0  # a local folder store
    assert main(["models", "push", str(source), "s3://models/llama"]) == 0
    fetched = fetch_model("s3://models/llama")
    assert sorted(p.name for p in fetched.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in source.iterdir()
    )


@pytest.mark.parametrize(
    ("source", "uri", "message"),
    [
        ("synthetic:gpt9", "s3://models/x", "arch must be one of"),
        ("{tmp}/nothing", "s3://models/x", "is not a model folder"),
        ("synthetic:llama", "ftp://host/x", "neither a local path"),
    ],
)
def test_bad_arguments_get_a_clear_error(s3, tmp_path, capsys, source, uri, message):
    assert main(["models", "push", source.format(tmp=tmp_path), uri]) == 2
    assert message in capsys.readouterr().err
