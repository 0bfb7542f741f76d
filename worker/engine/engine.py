"""The multi-LoRA engine: one base model, a pool of adapter slots, continuous batching.

    engine = Engine.from_pretrained(model_dir, max_loras=8, max_rank=64, device="cuda", dtype=torch.bfloat16)
    engine.add_adapter("name", adapter_dir)
    outputs = engine.generate([GenerationRequest(prompt_ids=[...], adapter="name", max_new_tokens=64)])

The worker drives the incremental interface instead: `add_request` queues a request, `step` admits
waiting requests into free sequence slots (loading their adapter into a device slot when needed),
runs one forward over every running sequence (prefill of the new ones, one decode token for the
rest) and returns what each produced; `abort` ends a request at the next step boundary.

`step` is `launch` then `finish`. On a GPU, `launch` returns once the step's forward and sampling
are queued on the device; the worker does its own host work (reading Redis, cancels, claims) before
`finish` waits for the sampled tokens, so that work overlaps the GPU's instead of adding to it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from collections.abc import Sequence as TokenIds
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from lorafleet.worker.engine.batch import StepBatch, build_step_batch
from lorafleet.worker.engine.cuda_graphs import DecodeGraphs
from lorafleet.worker.engine.detokenize import IncrementalDecoder
from lorafleet.worker.engine.kv_cache import KVCache, KVCacheInfo
from lorafleet.worker.engine.lora import (
    AdapterError,
    AdapterSlots,
    LoraAdapter,
    parse_adapter,
    read_adapter_dir,
)
from lorafleet.worker.engine.model import DecoderModel
from lorafleet.worker.engine.sampling import SamplingBatch, default_seed, greedy, sample
from lorafleet.worker.engine.sequence import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    Sequence,
    StepOutput,
)

log = structlog.get_logger("lorafleet.engine")


class PromptTooLong(ValueError):
    """The prompt (plus one generated token) does not fit the model's context or the KV cache."""


class UnknownAdapter(KeyError):
    """A request names an adapter that was never added (or was removed)."""


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings, checked once at construction."""

    max_loras: int = 8
    max_rank: int = 64
    max_batch: int = 256  # running sequences at once
    max_prefill_tokens: int = 8192  # prompt tokens admitted per step (one longer prompt still runs alone)
    block_size: int = 16
    kv_cache_tokens: int | None = None  # None: sized from free device memory (CPU: 65,536 tokens)
    kv_memory_fraction: float = 0.85  # share of free device memory for the KV cache
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    cuda_graphs: bool = True  # capture decode steps in CUDA graphs (CUDA devices only)
    # Launch each LoRA shrink-expand pair with programmatic dependent launch (`lora_apply(pdl=True)`;
    # compute capability 9.0+, ignored elsewhere). Off until benchmarks/bench_kernels.py measures it.
    lora_pdl: bool = False

    def __post_init__(self) -> None:
        checks = {
            "max_loras": self.max_loras >= 1,
            "max_rank": 1 <= self.max_rank <= 256,
            "max_batch": self.max_batch >= 1,
            "max_prefill_tokens": self.max_prefill_tokens >= 1,
            "block_size": self.block_size >= 1,
            "kv_cache_tokens": self.kv_cache_tokens is None or self.kv_cache_tokens >= self.block_size,
            "kv_memory_fraction": 0 < self.kv_memory_fraction <= 1,
            "max_model_len": self.max_model_len is None or self.max_model_len >= 2,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"EngineConfig.{name} is out of range: {getattr(self, name)!r}")


@dataclass
class _Launched:
    """A step between `Engine.launch` and `Engine.finish`."""

    outputs: list[StepOutput]  # of requests retired before the forward (aborted, refused)
    seqs: list[Sequence]  # the sequences the forward runs, in batch order
    host_ids: torch.Tensor  # [>= B] int64: the sampled ids, valid once `ready` has passed
    ready: torch.cuda.Event | None  # recorded after the copy to the host (None on the CPU)


class Engine:
    """One base model serving many LoRA adapters in the same batch."""

    def __init__(self, model: DecoderModel, config: EngineConfig, tokenizer: Any = None):
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.device = model.device
        model.lora_pdl = config.lora_pdl
        spec = model.spec
        self.max_model_len = min(config.max_model_len or spec.max_positions, spec.max_positions)
        self.slots = AdapterSlots(spec.shapes, config.max_loras, config.max_rank, model.dtype, model.device)
        self.kv = KVCache(
            spec.num_layers, self._kv_blocks(), config.block_size, spec.num_kv_heads, spec.head_dim,
            model.dtype, model.device,
        )  # fmt: skip
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and config.cuda_graphs:
            max_blocks = self.kv.blocks_for(self.max_model_len)
            self.graphs = DecodeGraphs(model, self.kv, self.slots, config.max_batch, max_blocks)
        self._adapters: dict[str, LoraAdapter] = {}
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # resident adapters, least recently used first
        self._users: dict[int, int] = {}  # slot -> running sequences
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._finished: dict[str, Sequence] = {}
        self._carried: list[StepOutput] = []  # outputs of a step whose forward raised
        self._launched: _Launched | None = None  # the step between launch() and finish()
        self._host_ids: torch.Tensor | None = None  # pinned buffer the sampled ids are copied into
        self._ids = itertools.count()
        self.stats = {"adapter_loads": 0, "adapter_evictions": 0, "adapter_hits": 0}

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        max_loras: int = 8,
        max_rank: int = 64,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        **config: Any,
    ) -> Engine:
        """Load a Hugging Face model directory (Llama, Mistral, Qwen2, Qwen3) and size the caches.

        Extra keywords are EngineConfig fields (max_batch, kv_cache_tokens, block_size, ...).
        """
        engine_config = EngineConfig(max_loras=max_loras, max_rank=max_rank, **config)
        model = DecoderModel.from_pretrained(model_dir, torch.device(device), dtype)
        return cls(model, engine_config, _load_tokenizer(Path(model_dir)))

    def _kv_blocks(self) -> int:
        spec, cfg = self.model.spec, self.config
        per_block = KVCache.bytes_per_block(
            spec.num_layers, cfg.block_size, spec.num_kv_heads, spec.head_dim, self.model.dtype
        )
        if cfg.kv_cache_tokens is not None:
            return -(-cfg.kv_cache_tokens // cfg.block_size)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, int(free * cfg.kv_memory_fraction) // per_block)
        return 65_536 // cfg.block_size

    # ----- adapters -----

    def add_adapter(
        self,
        name: str,
        source: str | Path | Mapping[str, torch.Tensor],
        config: Mapping[str, Any] | None = None,
    ) -> LoraAdapter:
        """Register an adapter from a PEFT directory, or from tensors in memory plus their config.

        The adapter is checked against the base model (AdapterError names what does not fit) and
        kept in host memory (pinned on CUDA); it is copied into a device slot when a request needs it.
        Adding a name again replaces the adapter for requests admitted from then on.
        """
        if isinstance(source, str | Path):
            file_config, tensors = read_adapter_dir(source)
            config = file_config if config is None else config
        else:
            if config is None:
                raise AdapterError(f"adapter {name!r}: tensors in memory need their adapter config")
            tensors = dict(source)
        adapter = parse_adapter(
            name, config, tensors, self.model.spec.shapes, self.config.max_rank, self.model.dtype,
            pin_memory=self.device.type == "cuda",
        )  # fmt: skip
        self.register_adapter(name, adapter)
        return adapter

    def register_adapter(self, name: str, adapter: LoraAdapter) -> None:
        """Register an adapter already checked by `parse_adapter` (e.g. on a fetch thread) under `name`.

        Like `add_adapter` without re-reading or re-checking it on the caller's thread.
        """
        self._retire_resident(name)
        self._adapters[name] = adapter

    def remove_adapter(self, name: str) -> None:
        """Forget an adapter; requests already running on it finish on it."""
        if self._adapters.pop(name, None) is None:
            raise UnknownAdapter(name)
        self._retire_resident(name)

    def _retire_resident(self, name: str) -> None:
        # A replaced or removed adapter leaves the name map at once; its slot is reused only once
        # no running sequence reads it (users == 0).
        slot = self._slot_of.pop(name, None)
        if slot is not None and self._users.get(slot, 0) == 0:
            self._users.pop(slot, None)

    def evict_adapter(self, name: str) -> bool:
        """Free the device slot of `name` if no running sequence uses it; True if it was freed."""
        slot = self._slot_of.get(name)
        if slot is None or self._users.get(slot, 0) > 0:
            return False
        del self._slot_of[name]
        self.stats["adapter_evictions"] += 1
        return True

    @property
    def adapters(self) -> list[str]:
        """Names of the registered adapters."""
        return list(self._adapters)

    @property
    def resident_adapters(self) -> list[str]:
        """Adapters in a device slot now, least recently used first."""
        return list(self._slot_of)

    def _acquire_slot(self, name: str) -> int | None:
        """The slot holding `name`, loading it (evicting an idle adapter) if needed; None if all busy."""
        slot = self._slot_of.get(name)
        if slot is not None:
            self._slot_of.move_to_end(name)
            self.stats["adapter_hits"] += 1
            return slot
        busy = set(self._slot_of.values()) | {s for s, users in self._users.items() if users > 0}
        free = [s for s in range(self.config.max_loras) if s not in busy]
        if not free:
            victim = next((n for n, s in self._slot_of.items() if self._users.get(s, 0) == 0), None)
            if victim is None:
                return None
            free = [self._slot_of.pop(victim)]
            self.stats["adapter_evictions"] += 1
        slot = free[0]
        self.slots.load(slot, self._adapters[name])
        self.slots.wait_ready(slot)
        self._slot_of[name] = slot
        self.stats["adapter_loads"] += 1
        return slot

    # ----- requests -----

    def add_request(self, request: GenerationRequest) -> str:
        """Queue a request; it joins the running batch at a coming step. Returns its request id."""
        if request.adapter is not None and request.adapter not in self._adapters:
            raise UnknownAdapter(request.adapter)
        prompt_len = len(request.prompt_ids)
        if prompt_len + 1 > self.max_model_len:
            raise PromptTooLong(
                f"prompt of {prompt_len} tokens leaves no room in a context of {self.max_model_len}"
            )
        if any(t >= self.model.spec.vocab_size for t in request.prompt_ids):
            raise ValueError(
                f"prompt_ids hold a token id >= the vocabulary size {self.model.spec.vocab_size}"
            )
        budget = self._budget(request)
        if self.kv.blocks_for(budget) > self.kv.num_blocks:
            raise PromptTooLong(
                f"prompt of {prompt_len} tokens with max_new_tokens {request.max_new_tokens} needs "
                f"{budget} tokens of KV cache; this worker's holds {self.kv.info.tokens}"
            )
        request_id = request.request_id or f"req-{next(self._ids)}"
        eos = self.model.spec.eos_token_ids
        seq = Sequence(request=request, request_id=request_id, eos_token_id=eos[0] if eos else None)
        self._waiting.append(seq)
        return request_id

    def _budget(self, request: GenerationRequest) -> int:
        # Tokens a request may hold in the cache: its prompt plus every token it may generate
        # (the last generated token's K/V are never written).
        return min(len(request.prompt_ids) + request.max_new_tokens - 1, self.max_model_len)

    def abort(self, request_id: str) -> bool:
        """End a waiting or running request; it is reported finished (aborted) by the next step."""
        for seq in itertools.chain(self._waiting, self._running):
            if seq.request_id == request_id and not seq.is_finished:
                seq.finish_reason = FinishReason.ABORTED
                return True
        return False

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._waiting or self._running)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_info(self) -> KVCacheInfo:
        """Size of the KV cache."""
        return self.kv.info

    # ----- the step -----

    def _admit(self) -> list[StepOutput]:
        """Move waiting requests into the running batch while room, KV blocks and slots allow."""
        outputs: list[StepOutput] = []
        prefill_tokens = 0
        kept: deque[Sequence] = deque()
        try:
            while self._waiting:
                seq = self._waiting.popleft()
                if seq.is_finished:  # aborted while waiting
                    self._finished[seq.request_id] = seq
                    outputs.append(StepOutput(seq.request_id, [], True, seq.finish_reason))
                    continue
                try:
                    started = self._try_start(seq, prefill_tokens)
                except Exception:  # e.g. a slot copy failed: it waits again, with the rest
                    kept.append(seq)
                    raise
                if not started:
                    kept.append(seq)
                    continue
                prefill_tokens += len(seq.request.prompt_ids)
        except Exception:
            self._carried += outputs  # reported by the next step
            raise
        finally:
            kept.extend(self._waiting)
            self._waiting = kept
        return outputs

    def _try_start(self, seq: Sequence, prefill_tokens: int) -> bool:
        prompt = len(seq.request.prompt_ids)
        if len(self._running) >= self.config.max_batch:
            return False
        if prefill_tokens and prefill_tokens + prompt > self.config.max_prefill_tokens:
            return False
        name = seq.request.adapter
        if name is not None and name not in self._adapters:
            seq.finish_reason = FinishReason.ABORTED
            return False
        blocks = self.kv.blocks_for(self._budget(seq.request))
        if blocks > self.kv.unreserved_blocks:
            return False
        if name is not None:
            slot = self._acquire_slot(name)
            if slot is None:
                return False
            seq.lora_slot = slot
            self._users[slot] = self._users.get(slot, 0) + 1
        self.kv.reserve(blocks)
        seq.reserved_blocks = blocks
        self._running.append(seq)
        return True

    def step(self) -> list[StepOutput]:
        """Admit, run one forward over all running sequences, sample, retire the finished ones.

        If the forward raises, the outputs of requests retired before it (aborted, refused) come
        with the next step instead of being lost.
        """
        self.launch()
        return self.finish()

    def launch(self) -> None:
        """The first half of `step`: admit, retire, and start one forward and sampling over the running
        sequences (queued on the device on a GPU; done on return on the CPU). `finish` completes it.

        Requests added and aborted before `finish` are seen by the next step; an aborted request's
        token from this step is dropped.
        """
        if self._launched is not None:
            raise RuntimeError("launch() called twice: finish() the launched step first")
        outputs, self._carried = self._carried + self._admit(), []
        outputs += self._retire([s for s in self._running if s.is_finished])
        seqs = list(self._running)
        if not seqs:
            self._launched = _Launched(outputs, [], torch.empty(0, dtype=torch.int64), None)
            return
        try:
            for seq in seqs:
                self.kv.grow(seq.block_table, seq.length)
            batch = build_step_batch(seqs, self.kv.block_size, self.device)
            logits = self._forward(batch)  # [B, V]
            if all(s.request.temperature == 0 for s in seqs):
                next_ids = greedy(logits)  # no per-row parameters to copy to the device
            else:
                next_ids = sample(logits, self._sampling_batch(seqs))
            host_ids, ready = self._to_host(next_ids)
        except Exception:
            self._carried = outputs
            raise
        self._launched = _Launched(outputs, seqs, host_ids, ready)

    def finish(self) -> list[StepOutput]:
        """The second half of `step`: wait for the launched step's tokens, check stops, retire the
        finished sequences; what each request produced. [] when no step was launched."""
        launched, self._launched = self._launched, None
        if launched is None:
            return []
        outputs, seqs = launched.outputs, launched.seqs
        if not seqs:
            return outputs
        try:
            if launched.ready is not None:
                launched.ready.synchronize()
            next_ids = launched.host_ids[: len(seqs)].tolist()
        except Exception:
            self._carried = outputs
            raise
        for seq, token in zip(seqs, next_ids, strict=True):
            if seq.is_finished:  # aborted while the step ran: its token is dropped
                continue
            seq.num_cached = seq.length
            seq.output_ids.append(int(token))
            self._check_stop(seq)
        finished = [s for s in seqs if s.is_finished and s.finish_reason != FinishReason.ABORTED]
        decodes = self.tokenizer is not None  # stop strings are looked for in the decoded text
        for seq in seqs:
            if not seq.is_finished:
                decoded = seq.decoded if decodes and seq.request.stop else None
                outputs.append(StepOutput(seq.request_id, [seq.output_ids[-1]], False, decoded=decoded))
        outputs += self._retire(finished, with_last_token=True)
        return outputs

    def _to_host(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Start copying the sampled ids [B] to the host; the event to wait on (None on the CPU)."""
        if ids.device.type != "cuda":
            return ids, None
        if self._host_ids is None or self._host_ids.shape[0] < ids.shape[0]:
            self._host_ids = torch.empty(
                max(ids.shape[0], self.config.max_batch), dtype=ids.dtype, pin_memory=True
            )
        host = self._host_ids
        host[: ids.shape[0]].copy_(ids, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(ids.device))  # the engine's device, not the current one
        return host, ready

    def _forward(self, batch: StepBatch) -> torch.Tensor:
        if self.graphs is not None and self.graphs.can_run(batch):
            if not self.graphs.captured:
                try:
                    self.graphs.capture()  # once, at the first decode step
                except Exception:  # e.g. out of memory: serve without graphs rather than not at all
                    log.warning("CUDA graph capture failed: decoding without graphs", exc_info=True)
                    self.graphs = None
                    torch.cuda.synchronize(self.device)  # nothing of the capture still in flight
                    torch.cuda.empty_cache()
                    return self.model.forward(batch, self.kv, self.slots)
            return self.graphs.run(batch)
        return self.model.forward(batch, self.kv, self.slots)

    def _retire(self, seqs: Iterable[Sequence], with_last_token: bool = False) -> list[StepOutput]:
        outputs = []
        for seq in seqs:
            self._running.remove(seq)
            self.kv.release(seq.reserved_blocks, seq.block_table)
            if seq.lora_slot >= 0:
                self._users[seq.lora_slot] -= 1
            new = [seq.output_ids[-1]] if with_last_token and seq.output_ids else []
            outputs.append(StepOutput(seq.request_id, new, True, seq.finish_reason))
            self._finished[seq.request_id] = seq
        return outputs

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        reqs = [s.request for s in seqs]
        temps = [r.temperature for r in reqs]

        def tensor(values: list[Any], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        return SamplingBatch(
            temperature=tensor(temps, torch.float32),
            top_p=tensor([r.top_p for r in reqs], torch.float32),
            top_k=tensor([r.top_k for r in reqs], torch.int64),
            seeds=tensor([_seed_of(s) for s in seqs], torch.int64),
            steps=tensor([len(s.output_ids) for s in seqs], torch.int64),
            all_greedy=all(t == 0 for t in temps),
            any_top_p=any(r.top_p < 1 for r in reqs),
            any_top_k=any(r.top_k > 0 for r in reqs),
        )

    def _check_stop(self, seq: Sequence) -> None:
        req, token = seq.request, seq.output_ids[-1]
        eos = not req.ignore_eos and token in self.model.spec.eos_token_ids
        stop_token = eos or token in req.stop_token_ids
        if stop_token:
            seq.finish_reason = FinishReason.STOP
        elif req.stop and self.tokenizer is not None and self._hit_stop_string(seq):
            seq.finish_reason = FinishReason.STOP_STRING
        elif len(seq.output_ids) >= req.max_new_tokens or seq.length >= self.max_model_len:
            seq.finish_reason = FinishReason.LENGTH

    def _hit_stop_string(self, seq: Sequence) -> bool:
        # The text grows by an incremental decode of the newest tokens (decoding the whole output
        # each step is O(n) per step); a stop string that the new text completes starts at most
        # len(stop) - 1 characters before it, so only that tail is searched.
        if seq.decoder is None:
            seq.decoder = IncrementalDecoder(self._decode)
        delta = seq.decoder.delta(seq.output_ids)
        if not delta:
            return False
        start = len(seq.decoded)
        seq.decoded += delta
        text = seq.decoded
        found = (text.find(s, max(0, start - len(s) + 1)) for s in seq.request.stop)
        cut = min((i for i in found if i >= 0), default=-1)
        if cut < 0:
            return False
        seq.text = text[:cut]
        return True

    def _decode(self, token_ids: TokenIds[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    # ----- offline use -----

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        """Run `requests` to completion in one continuous batch; outputs in request order."""
        ids = [self.add_request(r) for r in requests]
        while self.has_unfinished():
            self.step()
        return [self.pop_output(i) for i in ids]

    def pop_output(self, request_id: str) -> GenerationOutput:
        """The final output of a finished request (removed from the engine's memory)."""
        seq = self._finished.pop(request_id)
        text = seq.text
        reason = seq.finish_reason or FinishReason.ABORTED
        if text is None and self.tokenizer is not None:
            # The text leaves out the EOS or stop token that ended the output (the ids keep it).
            ids = seq.output_ids[:-1] if reason == FinishReason.STOP else seq.output_ids
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return GenerationOutput(
            seq.request_id, list(seq.output_ids), reason, text, len(seq.request.prompt_ids)
        )


def _seed_of(seq: Sequence) -> int:
    if seq.request.seed is not None:
        return seq.request.seed
    return default_seed(seq.request_id)


def _load_tokenizer(model_dir: Path) -> Any:
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
