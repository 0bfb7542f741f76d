"""The engine: one shared base model, a pool of GPU adapter slots, continuous batching.

`engine.Engine` is the entry point (add_request, launch/finish a step, pop_output). Beside it: the
model (`model`), the step's batch metadata (`batch`), sequences and outputs (`sequence`), sampling,
the paged KV cache, CUDA graphs, attention, incremental detokenizing, LoRA adapter parsing and slots
(`lora`), and random-weight models and adapters in real formats for tests and demos (`synthetic`).

May import: torch, transformers, safetensors, lorafleet.kernels, and `adapters.files` (reading PEFT
folders). Never Redis, never serve/ or cli/.
"""
