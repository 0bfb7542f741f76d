"""The demo's files: a synthetic model (unless --model) and synthetic adapters of mixed ranks, written
in the plain layout that workers read (NAME/adapter_config.json + NAME/adapter_model.safetensors) and,
with --adapters s3://bucket/prefix, uploaded to that store.
"""

from __future__ import annotations

from pathlib import Path

from lorafleet.worker.cli.demo_run import RANKS, DemoError, DemoRun


def write_files(run: DemoRun) -> None:
    """Write the synthetic model (unless --model) and the adapters into the adapter folder."""
    from transformers.utils import logging as hf_logging

    from lorafleet.worker.engine import synthetic

    hf_logging.disable_progress_bar()  # "Writing model shards" would cut through the demo's output
    config = run.config
    if config.model is None:
        run.model_dir = synthetic.write_model(run.root / "model", config.arch, config.size, seed=config.seed)
    else:
        run.model_dir = Path(config.model)
        if not (run.model_dir / "config.json").is_file():
            raise DemoError(f"--model {config.model}: no config.json there (a Hugging Face model directory?)")
    store_uri = config.adapters if config.adapters and config.adapters.startswith("s3://") else None
    run.adapter_dir = Path(config.adapters) if config.adapters and not store_uri else run.root / "adapters"
    for i in range(config.adapters_count):
        name = f"demo-{i:02d}"
        targets = synthetic.ALL_TARGETS if i % 2 == 0 else ("q_proj", "v_proj")
        try:
            synthetic.write_adapter(
                run.adapter_dir / name, run.model_dir, rank=RANKS[i % len(RANKS)], targets=targets,
                seed=config.seed + i,
            )  # fmt: skip
        except (OSError, ValueError, KeyError) as exc:
            raise DemoError(f"could not write adapter {name} for {run.model_dir}: {exc}") from None
        run.adapter_names.append(name)
    if store_uri is not None:
        upload_adapters(run, store_uri)
    run.adapter_store = store_uri or str(run.adapter_dir)


def upload_adapters(run: DemoRun, uri: str) -> None:
    """Upload the written adapters to the store at `uri`, in the plain layout the workers read."""
    from lorafleet.worker.adapters.files import ADAPTER_FILES, plain_key
    from lorafleet.worker.store.store import StoreError, open_store

    assert run.adapter_dir is not None
    try:
        store = open_store(uri)
        for name in run.adapter_names:
            for filename in ADAPTER_FILES:
                store.put_file(plain_key(name, filename), run.adapter_dir / name / filename)
    except (StoreError, ValueError) as exc:
        raise DemoError(f"could not upload the adapters to {uri}: {exc}") from None
