"""Adapters on their way to the GPU: PEFT folders (`files`), the disk cache, the registry of versions
in Redis (`registry`), validation against a base model, the control plane (`control`, RQ jobs, and
`control_client`, what the CLI calls), and the worker's adapter manager (`manager`: store -> disk ->
host memory -> engine slot).

May import: store/, engine/ (slots and parsing), Redis. Never serve/ or cli/.
"""
