"""Checks an adapter must pass before the fleet serves it, against the base model's shapes.

The adapter rules themselves (PEFT config, safetensors only, shapes, rank, NaN/Inf) are those of
`adapters.read_adapter_dir` and `adapters.parse_adapter`, the same code a worker loads with; this
module adds what only the control plane decides: a size limit, the fleet's rank limit, and that the
config's target_modules list the modules the weights adapt. Base-model shapes come from config.json
alone (no weights are read), from a local model folder or a store URI.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.worker.adapters.files import AdapterError, adapter_file_paths
from lorafleet.worker.engine.lora import ModelShapes, parse_adapter, read_adapter_dir
from lorafleet.worker.store.settings import StoreSettings
from lorafleet.worker.store.store import open_store


@dataclass(frozen=True)
class Limits:
    """What the fleet accepts: the largest rank (its workers' max_rank) and the largest adapter."""

    max_rank: int
    max_bytes: int


@dataclass(frozen=True)
class AdapterSummary:
    """What validation learned about an adapter that passed."""

    rank: int
    targets: list[str]
    nbytes: int  # bytes of the weights at their stored dtype


def base_shapes(model: str, settings: StoreSettings | None = None) -> ModelShapes:
    """Shapes a base model's adapters must fit, read from its config.json (a folder or store URI)."""
    from transformers import AutoConfig

    from lorafleet.worker.engine.model import ModelSpec

    with tempfile.TemporaryDirectory() as tmp:
        if model.startswith("s3://"):
            config_file = Path(tmp) / "config.json"
            config_file.write_bytes(open_store(model, settings).get_bytes("config.json"))
            folder = tmp
        else:
            folder = str(Path(model.removeprefix("file://")).expanduser())
        config = AutoConfig.from_pretrained(folder)
    return ModelSpec.from_config(config).shapes


def validate_adapter_dir(path: Path, name: str, shapes: ModelShapes, limits: Limits) -> AdapterSummary:
    """Check the adapter in `path` against the base model and the limits; AdapterError says why not."""
    files = adapter_file_paths(path)
    size = sum(p.stat().st_size for p in files.values())
    if size > limits.max_bytes:
        raise AdapterError(f"adapter {name!r} is {size:,} bytes; the limit is {limits.max_bytes:,}")
    config, tensors = read_adapter_dir(path)
    if not tensors:
        raise AdapterError(f"adapter {name!r}: adapter_model.safetensors holds no tensors")
    dtype = next(iter(tensors.values())).dtype  # check at the stored dtype: no copies
    adapter = parse_adapter(name, config, tensors, shapes, limits.max_rank, dtype)
    _check_target_modules(name, config, adapter.targets)
    return AdapterSummary(rank=adapter.rank, targets=list(adapter.targets), nbytes=adapter.nbytes)


def _check_target_modules(name: str, config: Mapping[str, Any], adapted: tuple[str, ...]) -> None:
    listed = config.get("target_modules")
    if not isinstance(listed, list):  # a regex string or absent: PEFT matches by pattern
        return
    short = {str(m).rsplit(".", 1)[-1] for m in listed}
    missing = [t for t in adapted if t not in short]
    if missing:
        raise AdapterError(
            f"adapter {name!r}: the weights adapt {missing} but adapter_config.json target_modules "
            f"lists only {json.dumps(sorted(short))}"
        )
