"""Any backend: a Node.js producer written from docs/protocol.md alone (tests/node/) against the
Python minimal worker and alongside the Python client.

`npm ci` runs in a temporary copy of tests/node, so nothing is installed into the checkout. The tests
are skipped, with the reason, where node/npm is missing or the install fails (no network).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from minimal_worker import MinimalWorker

from lorafleet.producer import Keys, Producer, scripts
from lorafleet.producer.protocol import decode_job

NODE_DIR = Path(__file__).resolve().parent / "node"
SOURCES = ("package.json", "package-lock.json", "submit.mjs")


def test_node_program_runs_the_published_submit_script():
    source = (NODE_DIR / "submit.mjs").read_text()
    match = re.search(r"const SUBMIT_LUA = `(.*?)`;", source, re.DOTALL)
    assert match is not None
    assert match.group(1) == scripts.SUBMIT


@pytest.fixture(scope="module")
def node_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the Node.js producer test")
    workdir = tmp_path_factory.mktemp("node-producer")
    for name in SOURCES:
        shutil.copy(NODE_DIR / name, workdir / name)
    try:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("npm ci timed out (no access to the npm registry?)")
    if done.returncode != 0:
        pytest.skip(f"npm ci failed (no access to the npm registry?): {done.stderr.strip()[-500:]}")
    return workdir / "submit.mjs"


def run_node(program: Path, redis_url: str, *args: str) -> tuple[int, list[dict]]:
    done = subprocess.run(
        ["node", str(program), "--redis-url", redis_url, "--timeout", "10", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode in (0, 1, 3, 4), done.stderr
    return done.returncode, lines


def test_node_producer_gets_its_result(node_program, redis_url, redis_client):
    with MinimalWorker(redis_url, adapters=frozenset({"bot"})):
        status, lines = run_node(
            node_program, redis_url, "--adapter", "bot", "--max-new-tokens", "64", "hi js"
        )
    assert status == 0
    assert lines[0]["event"] == "submitted"
    assert lines[0]["status"] == "ok"
    assert lines[-1]["type"] == "result"
    assert lines[-1]["text"] == "bot: hi js"
    assert lines[-1]["id"] == lines[0]["id"]
    keys = Keys()
    assert redis_client.xlen(keys.jobs("bot")) == 0  # answered, acked, deleted
    assert redis_client.smembers(keys.queues) == set()  # recorded by the submit, pruned by the final reply


def test_node_streaming_chat(node_program, redis_url):
    with MinimalWorker(redis_url):
        status, lines = run_node(node_program, redis_url, "--stream", "--chat", "one two")
    assert status == 0
    chunks = [line for line in lines if line.get("type") == "chunk"]
    assert [c["seq"] for c in chunks] == [0, 1, 2]
    assert "".join(c["text"] for c in chunks) == lines[-1]["text"] == "base: one two"


def test_node_error_reply_and_queue_full(node_program, redis_url):
    with MinimalWorker(redis_url, adapters=frozenset()):
        status, lines = run_node(node_program, redis_url, "--adapter", "ghost", "x")
    assert status == 1
    assert lines[-1]["type"] == "error"
    assert lines[-1]["code"] == "adapter_not_found"
    with Producer(redis_url) as producer:
        producer.submit("takes the only slot", adapter="busy")
    status, lines = run_node(node_program, redis_url, "--adapter", "busy", "--max-waiting", "1", "x")
    assert status == 4
    assert lines == [{"event": "submitted", "status": "full", "adapter": "busy", "length": 1}]


def test_node_and_python_jobs_are_the_same_on_the_wire(node_program, redis_url, redis_client):
    """The Node job decodes with the shared codec, and its id is reserved for Python producers too."""
    status, lines = run_node(
        node_program,
        redis_url,
        "--timeout",
        "0.5",
        "--adapter",
        "a@1",
        "--job-id",
        "js-1",
        "--max-new-tokens",
        "7",
        "q",
    )
    assert status == 3  # no worker: timed out
    (entry_id, fields), *_ = redis_client.xrange(Keys().jobs("a@1"))
    job = decode_job(fields[b"j"], Keys())
    assert (job.id, job.adapter, job.prompt, job.sampling.max_new_tokens) == ("js-1", "a@1", "q", 7)
    assert job.reply_to.startswith("lorafleet:reply:")
    assert job.deadline is not None
    assert entry_id.decode() == lines[0]["entry_id"]
    with Producer(redis_url) as producer:
        assert producer.submit("q", adapter="a@1", job_id="js-1").duplicate
    assert redis_client.xlen(Keys().jobs("a@1")) == 1
