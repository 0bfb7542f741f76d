"""The engine: one shared base model, a pool of GPU adapter slots, continuous batching.

`engine.Engine` is the entry point (add_request, launch/finish a step, pop_output), set up by
`config.EngineConfig`. Beside it: the model (`model`), the step's batch metadata (`batch`),
sequences and outputs (`sequence`), sampling, the paged KV cache (`kv_cache`) and the index of its
shared prompt prefixes (`prefix_cache`), CUDA graphs, attention, output
text (`output`: incremental detokenizing, stop strings, the final text), LoRA adapter parsing and
device slots (`lora`), which adapter holds which slot (`adapter_pool`), and random-weight models
and adapters in real formats for tests and demos (`synthetic`).

May import: torch, transformers, tokenizers, safetensors, lorafleet.kernels, and `adapters.files`
(reading PEFT folders). Never Redis, never serve/ or cli/.
"""
