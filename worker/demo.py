"""`lorafleet demo`: everything on one machine, with nothing installed but this package.

It starts the embedded Redis server, writes a synthetic model and adapters to a temporary folder,
checks the queue round trip and generates with the base model and each adapter.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lorafleet.worker.redis_server import RedisServer


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run."""

    adapters: int = 4
    arch: str = "llama"
    size: str = "tiny"
    max_new_tokens: int = 12

    def __post_init__(self) -> None:
        if not 0 <= self.adapters <= 64:
            raise ValueError(f"adapters must be between 0 and 64, not {self.adapters}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, not {self.max_new_tokens}")


def run_demo(config: DemoConfig) -> int:
    """Run the demo; returns the exit status."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafleet.worker import synthetic

    with tempfile.TemporaryDirectory(prefix="lorafleet-demo-") as tmp, RedisServer.start() as server:
        root = Path(tmp)
        client = server.client()
        version = client.info("server")["redis_version"]
        print(f"redis {version} on {server.url} ({server.binary})")
        started = time.perf_counter()
        model_dir = synthetic.write_model(root / "model", config.arch, config.size)
        adapter_dirs = [
            synthetic.write_adapter(root / f"adapter-{i}", model_dir, rank=4 * (i % 4 + 1), seed=i)
            for i in range(config.adapters)
        ]
        print(
            f"synthetic {config.arch}/{config.size} model and {len(adapter_dirs)} adapters written "
            f"in {time.perf_counter() - started:.2f}s"
        )
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ids = tokenizer("hello world", return_tensors="pt").input_ids  # [1, P]
        with torch.no_grad():
            for _ in range(config.max_new_tokens):  # greedy, no cache: a smoke test of the model files
                next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
                ids = torch.cat([ids, next_id], dim=1)
        text = str(tokenizer.decode(ids[0].tolist()))
        client.set("lorafleet:demo", text)
        echoed = client.get("lorafleet:demo")
        print(f"base model: {text!r}; queue round trip {'ok' if echoed == text.encode() else 'MISMATCH'}")
        print("engine and worker: not built yet; this demo grows with them")
    return 0
