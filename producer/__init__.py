"""lorafleet.producer: the client library and wire protocol for backends that submit jobs.

This package depends on redis, msgpack and structlog only, never on torch.
"""
