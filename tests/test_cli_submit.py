"""`lorafleet submit` against the minimal worker: output formats and exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from minimal_worker import MinimalWorker

from lorafleet.producer import Producer
from lorafleet.producer.cli import main


@pytest.fixture
def worker(redis_url):
    with MinimalWorker(redis_url, adapters=frozenset({"bot"})) as w:
        yield w


def submit(url: str, *args: str) -> int:
    return main(["submit", "--redis-url", url, *args])


def test_prints_the_result_text(redis_url, worker, capsys):
    assert submit(redis_url, "--adapter", "bot", "hello there") == 0
    assert capsys.readouterr().out == "bot: hello there\n"


def test_stream_prints_the_text_as_it_arrives(redis_url, worker, capsys):
    assert submit(redis_url, "--stream", "one two three") == 0
    assert capsys.readouterr().out == "base: one two three\n"


def test_json(redis_url, worker, capsys):
    assert (
        submit(redis_url, "--json", "-a", "bot", "--max-new-tokens", "8", "--temperature", "0", "abcdef") == 0
    )
    reply = json.loads(capsys.readouterr().out)
    assert reply["type"] == "result"
    assert reply["v"] == 1
    assert reply["text"] == "bot: abc"
    assert reply["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 8
    assert reply["worker"] == worker.name


def test_json_stream_prints_one_line_per_reply(redis_url, worker, capsys):
    assert submit(redis_url, "--json", "--stream", "--chat", "a b") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["type"] for r in lines] == ["chunk", "chunk", "chunk", "result"]
    assert [r["seq"] for r in lines[:-1]] == [0, 1, 2]
    assert lines[-1]["text"] == "base: a b"


def test_error_reply_exits_non_zero_with_the_code(redis_url, worker, capsys):
    assert submit(redis_url, "--adapter", "ghost", "x") == 1
    captured = capsys.readouterr()
    assert "adapter_not_found" in captured.err
    assert captured.out == ""
    assert submit(redis_url, "--json", "--adapter", "ghost", "x") == 1
    assert json.loads(capsys.readouterr().out)["code"] == "adapter_not_found"


def test_bad_arguments_name_the_field(redis_url, capsys):
    assert submit(redis_url, "--max-new-tokens", "-1", "x") == 2
    assert "max_new_tokens" in capsys.readouterr().err
    assert submit(redis_url, "--adapter", "../etc", "x") == 2
    assert "adapter" in capsys.readouterr().err
    assert main(["submit", "--redis-url", "http://nope", "x"]) == 2
    assert "redis_url" in capsys.readouterr().err


def test_timeout_without_a_worker(redis_url, capsys):
    assert submit(redis_url, "--timeout", "0.2", "anyone?") == 3
    assert "no reply" in capsys.readouterr().err


def test_settings_from_the_environment_and_queue_full(redis_url, monkeypatch, capsys):
    monkeypatch.setenv("LORAFLEET_REDIS_URL", redis_url)
    monkeypatch.setenv("LORAFLEET_NAMESPACE", "envns")
    monkeypatch.setenv("LORAFLEET_MAX_WAITING_PER_ADAPTER", "1")
    with Producer(redis_url, namespace="envns") as producer:
        producer.submit("occupies the only slot", adapter="busy")
    assert main(["submit", "--adapter", "busy", "x"]) == 4
    assert "full" in capsys.readouterr().err
    with MinimalWorker(redis_url, namespace="envns"):
        assert main(["submit", "--adapter", "free", "from env"]) == 0
    assert capsys.readouterr().out == "free: from env\n"


def test_unreachable_redis(capsys):
    assert main(["submit", "--redis-url", "redis://127.0.0.1:1/0", "x"]) == 5
    assert "Redis" in capsys.readouterr().err


def test_installed_command_reads_the_prompt_from_stdin(redis_url, worker):
    script = Path(sys.executable).parent / "lorafleet"
    command = [str(script)] if script.exists() else [sys.executable, "-P", "-m", "lorafleet.producer.cli"]
    done = subprocess.run(
        [*command, "submit", "--redis-url", redis_url, "-a", "bot", "-"],
        input="from stdin",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "bot: from stdin\n"), done.stderr


def test_a_worker_command_without_the_worker_extra_prints_the_install_command(monkeypatch, capsys):
    """On a base install (here: rich hidden) `lorafleet top` answers with the install command, not a
    traceback."""
    import sys

    from lorafleet.producer.cli import main

    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    assert main(["top", "--once", "--redis-url", "redis://127.0.0.1:1/0"]) == 2
    assert 'rich is missing): pip install "lorafleet[worker]"' in capsys.readouterr().err
