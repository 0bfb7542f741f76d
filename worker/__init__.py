"""lorafleet.worker: the engine, scheduler, adapter cache, worker loop and command line."""
