"""lorafleet.worker: the GPU worker, in rooms that show its layers.

    engine/    one base model, many adapters, continuous batching (torch; never Redis)
    store/     object stores (a local folder or S3) and fetching base models from them
    adapters/  adapter files, the disk cache, the registry, the control plane, the adapter manager
    serve/     the worker loop behind the queue: scheduler, fleet directory, recovery, replies, metrics
    cli/       the commands: worker, status, top, demo, adapters, models

Dependencies point down that list and never back up: engine/ imports nothing of serve/ or Redis;
adapters/ never imports serve/; only cli/ imports cli/.
"""
