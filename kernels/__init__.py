"""lorafleet.kernels: Triton multi-LoRA kernels (shrink and expand) and their pure-torch references."""
