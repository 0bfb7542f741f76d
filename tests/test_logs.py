"""Every line a worker logs is JSON, whether it comes through structlog or the standard library."""

from __future__ import annotations

import json
import subprocess
import sys

PROGRAM = """
import logging, structlog
from lorafleet.worker.serve.logs import configure_logging
configure_logging("info")
logging.getLogger("lorafleet.worker.store.models").info("fetched %s", "model.safetensors")
logging.getLogger("lorafleet.worker.store.models").debug("below the level")
logging.getLogger("urllib3").info("another library's chatter")
logging.getLogger("urllib3").warning("another library's warning")
structlog.get_logger("lorafleet.worker").info("job finished", job="j1")
"""


def test_stdlib_and_structlog_lines_are_json_at_the_chosen_level():
    out = subprocess.run([sys.executable, "-P", "-c", PROGRAM], capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in out.stderr.splitlines()]  # every line parses
    assert [(e["event"], e["level"]) for e in lines] == [
        ("fetched model.safetensors", "info"),
        ("another library's warning", "warning"),
        ("job finished", "info"),
    ]
    assert lines[0]["logger"] == "lorafleet.worker.store.models"
    assert lines[2]["job"] == "j1"
    assert all("timestamp" in e for e in lines)
