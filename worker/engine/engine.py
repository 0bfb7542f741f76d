"""The multi-LoRA engine: one base model, a pool of adapter slots, continuous batching.

    engine = Engine.from_pretrained(model_dir, max_loras=8, max_rank=64, device="cuda", dtype=torch.bfloat16)
    engine.add_adapter("name", adapter_dir)
    outputs = engine.generate([GenerationRequest(prompt_ids=[...], adapter="name", max_new_tokens=64)])

The worker drives the incremental interface instead: `add_request` queues a request, `step` admits
waiting requests into free sequence slots (loading their adapter into a device slot when needed),
runs one forward over every running sequence (prefill of the new ones, one decode token for the
rest) and returns what each produced; `abort` ends a request at the next step boundary.

Prefix caching (`EngineConfig.prefix_cache`, on by default): a request whose prompt starts with full
KV blocks already computed for the same model, adapter registration and tokens (an earlier or running
request's system prompt, few-shot examples, chat history) shares those blocks and prefills only the
rest; its last prompt token is always computed. `GenerationOutput.cached_tokens` says how many prompt
tokens were found, `Engine.prefix_stats` totals them. See kv_cache.py and prefix_cache.py.

`step` is `launch` then `finish`. On a GPU, `launch` returns once the step's forward and sampling
are queued on the device; the worker does its own host work (reading Redis, cancels, claims) before
`finish` waits for the sampled tokens, so that work overlaps the GPU's instead of adding to it.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from lorafleet.worker.engine.adapter_pool import AdapterPool
from lorafleet.worker.engine.batch import StepBatch, build_step_batch
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.engine.cuda_graphs import DecodeGraphs
from lorafleet.worker.engine.fold import AdapterFold
from lorafleet.worker.engine.kv_cache import KVCache, KVCacheInfo, PrefixMatch
from lorafleet.worker.engine.lora import (
    AdapterError,
    AdapterSlots,
    LoraAdapter,
    parse_adapter,
    read_adapter_dir,
)
from lorafleet.worker.engine.model import DecoderModel
from lorafleet.worker.engine.output import TextOutput
from lorafleet.worker.engine.prefix_cache import extend_keys, root_key
from lorafleet.worker.engine.sampling import SamplingBatch, greedy, sample
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
        self.fold = AdapterFold(model, self.slots) if config.fold_single_adapter else None
        self.kv = KVCache(
            spec.num_layers, self._kv_blocks(), config.block_size, spec.num_kv_heads, spec.head_dim,
            model.dtype, model.device,
        )  # fmt: skip
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and config.cuda_graphs:
            max_blocks = self.kv.blocks_for(self.max_model_len)
            self.graphs = DecodeGraphs(
                model, self.kv, self.slots, config.max_batch, max_blocks, folded=self.fold is not None
            )
        self.pool = AdapterPool(self.slots)  # registered adapters and their device slots
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._finished: dict[str, Sequence] = {}
        self._carried: list[StepOutput] = []  # outputs of a step whose forward raised
        self._launched: _Launched | None = None  # the step between launch() and finish()
        self._host_ids: torch.Tensor | None = None  # pinned buffer the sampled ids are copied into
        self._ids = itertools.count()
        self.stats = self.pool.stats  # adapter_loads, adapter_evictions, adapter_hits
        # Prompt tokens admitted and, of those, found in the prefix cache (not computed).
        self.prefix_stats = {"prompt_tokens": 0, "cached_tokens": 0}
        # The base model's part of every prefix-cache key. Cached blocks live in this engine's KV
        # cache and die with it, so one model's config (plus dtype) is enough to tell it apart; being
        # deterministic (no random salt), the same keys can name prefixes across a fleet's workers.
        self.model_key = hashlib.blake2b(
            f"{model.config.to_json_string()}\0{model.dtype}".encode(), digest_size=16
        ).hexdigest()

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
        self.pool.register(name, adapter)

    def remove_adapter(self, name: str) -> None:
        """Forget an adapter; requests already running on it finish on it."""
        if not self.pool.remove(name):
            raise UnknownAdapter(name)

    def evict_adapter(self, name: str) -> bool:
        """Free the device slot of `name` if no running sequence uses it; True if it was freed."""
        return self.pool.evict(name)

    @property
    def adapters(self) -> list[str]:
        """Names of the registered adapters."""
        return list(self.pool.adapters)

    @property
    def resident_adapters(self) -> list[str]:
        """Adapters in a device slot now, least recently used first."""
        return self.pool.resident

    # ----- requests -----

    def add_request(self, request: GenerationRequest) -> str:
        """Queue a request; it joins the running batch at a coming step. Returns its request id."""
        if request.adapter is not None and request.adapter not in self.pool.adapters:
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
                    computed = self._try_start(seq, prefill_tokens)
                except Exception:  # e.g. a slot copy failed: it waits again, with the rest
                    kept.append(seq)
                    raise
                if computed is None:
                    kept.append(seq)
                    continue
                prefill_tokens += computed
        except Exception:
            self._carried += outputs  # reported by the next step
            raise
        finally:
            kept.extend(self._waiting)
            self._waiting = kept
        return outputs

    def _try_start(self, seq: Sequence, prefill_tokens: int) -> int | None:
        """Admit `seq` if the batch, the step's prefill budget, KV blocks and an adapter slot allow:
        the prompt tokens it will compute (those not in the prefix cache), or None."""
        prompt = len(seq.request.prompt_ids)
        if len(self._running) >= self.config.max_batch:
            return None
        name = seq.request.adapter
        if name is not None and name not in self.pool.adapters:
            seq.finish_reason = FinishReason.ABORTED
            return None
        match = self._match_prefix(seq)
        computed = prompt - match.cached_tokens
        if prefill_tokens and prefill_tokens + computed > self.config.max_prefill_tokens:
            return None
        blocks = self.kv.blocks_for(self._budget(seq.request))
        if blocks - len(match.shared) > self.kv.unreserved_blocks:  # a quick no before a slot load
            return None
        slot = -1
        if name is not None:
            acquired = self.pool.acquire(name)
            if acquired is None:
                return None
            slot = acquired
        owed = self.kv.admit(seq.block_table, match, blocks)
        if owed is None:  # shared blocks that were reclaimable count too
            if slot >= 0:
                self.pool.release(slot)
            return None
        seq.lora_slot, seq.reserved_blocks = slot, owed
        seq.num_cached = seq.prefix_hit = match.cached_tokens
        seq.indexed = len(match.shared)  # indexed already
        self.prefix_stats["prompt_tokens"] += prompt
        self.prefix_stats["cached_tokens"] += match.cached_tokens
        self._running.append(seq)
        return computed

    def _match_prefix(self, seq: Sequence) -> PrefixMatch:
        """The prompt's longest prefix of full blocks in the prefix cache (keys kept on `seq`)."""
        if not self.config.prefix_cache:
            return PrefixMatch.none()
        name = seq.request.adapter
        root = root_key(self.model_key, None if name is None else self.pool.version_key(name))
        if root != seq.cache_root:  # first try, or its adapter was replaced while it waited
            seq.cache_root = root
            seq.block_keys.clear()
        prompt = seq.request.prompt_ids
        extend_keys(
            seq.block_keys, seq.cache_root, prompt, self.kv.block_size, len(prompt) // self.kv.block_size
        )
        return self.kv.match(seq.block_keys, len(prompt))

    def _index_full_blocks(self, seq: Sequence) -> None:
        """Offer the blocks that this step filled to the prefix cache."""
        full = seq.num_cached // self.kv.block_size
        if seq.cache_root is None or full <= seq.indexed:
            return
        tokens = seq.request.prompt_ids
        if full * self.kv.block_size > len(tokens):  # blocks of generated tokens too
            tokens = tokens + seq.output_ids
        extend_keys(seq.block_keys, seq.cache_root, tokens, self.kv.block_size, full)
        self.kv.index_blocks(seq.block_table, seq.block_keys[:full], seq.indexed)
        seq.indexed = full

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
                seq.reserved_blocks -= self.kv.grow(seq.block_table, seq.length)
            batch = build_step_batch(seqs, self.kv.block_size, self.device)
            if self.fold is not None:
                self.fold.prepare(batch, {s.lora_slot for s in seqs if s.lora_slot >= 0})
            logits = self._forward(batch)  # [B, V]
            if all(s.request.temperature == 0 for s in seqs):
                next_ids = greedy(logits)  # no per-row parameters to copy to the device
            else:
                next_ids = sample(logits, SamplingBatch.of(seqs, self.device))
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
            self._index_full_blocks(seq)
            seq.output_ids.append(int(token))
            self._check_stop(seq)
        finished = [s for s in seqs if s.is_finished and s.finish_reason != FinishReason.ABORTED]
        for seq in seqs:
            if not seq.is_finished:
                text = seq.text_out.take() if seq.text_out is not None else ""
                outputs.append(StepOutput(seq.request_id, [seq.output_ids[-1]], False, text=text))
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
                self.pool.release(seq.lora_slot)
            new = [seq.output_ids[-1]] if with_last_token and seq.output_ids else []
            text = seq.text_out.finish() if seq.text_out is not None else ""  # all the rest
            outputs.append(StepOutput(seq.request_id, new, True, seq.finish_reason, text))
            self._finished[seq.request_id] = seq
        return outputs

    def _check_stop(self, seq: Sequence) -> None:
        req, token = seq.request, seq.output_ids[-1]
        out = seq.text_out  # only requests that stream text or have stop strings decode each step
        if out is None and self.tokenizer is not None and (req.stream_text or req.stop):
            out = seq.text_out = TextOutput(self.tokenizer, req.stop)
        if (not req.ignore_eos and token in self.model.spec.eos_token_ids) or token in req.stop_token_ids:
            seq.finish_reason = FinishReason.STOP  # the token stays out of the text
            return
        if out is not None:
            out.add(token)
            if out.stop_hit:
                seq.finish_reason = FinishReason.STOP_STRING
                return
        if len(seq.output_ids) >= req.max_new_tokens or seq.length >= self.max_model_len:
            seq.finish_reason = FinishReason.LENGTH

    # ----- offline use -----

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        """Run `requests` to completion in one continuous batch; outputs in request order."""
        ids = [self.add_request(r) for r in requests]
        while self.has_unfinished():
            self.step()
        return [self.pop_output(i) for i in ids]

    def pop_output(self, request_id: str) -> GenerationOutput:
        """The final output of a finished request (removed from the engine's memory). Its text (None
        without a tokenizer) leaves out the EOS or stop token that ended the output (the ids keep it)."""
        seq = self._finished.pop(request_id)
        reason = seq.finish_reason or FinishReason.ABORTED
        text: str | None = None
        if seq.text_out is not None:  # decoded step by step: the steps' StepOutput.text joined
            text = seq.text_out.text
        elif self.tokenizer is not None:  # one decode
            ids = seq.output_ids[:-1] if reason == FinishReason.STOP else seq.output_ids
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return GenerationOutput(
            seq.request_id, list(seq.output_ids), reason, text, len(seq.request.prompt_ids), seq.prefix_hit
        )


def _load_tokenizer(model_dir: Path) -> Any:
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
