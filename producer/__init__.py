"""lorafleet.producer: the client library and wire protocol for backends that submit jobs.

>>> from lorafleet.producer import Producer
>>> with Producer("redis://127.0.0.1:6379/0") as producer:
...     print(producer.submit("Hello", adapter="greeter").result(timeout=30).text)

`Producer` (threads) and `AsyncProducer` (asyncio) submit jobs and read replies; `Job`, the reply
types and the codec (`encode_job`, `decode_job`, `encode_reply`, `decode_reply`) are wire protocol
v1 (docs/protocol.md); `Keys` names every Redis key; `lorafleet.producer.consumer` holds the
worker's side of the contract. This package depends on redis, msgpack and structlog only, never on torch.
"""

from lorafleet.producer.aio import AsyncJobHandle, AsyncProducer
from lorafleet.producer.client import JobHandle, Producer
from lorafleet.producer.config import ProducerConfig
from lorafleet.producer.errors import JobFailed, LorafleetError, ProtocolError, QueueFull
from lorafleet.producer.keys import BASE_QUEUE, Keys
from lorafleet.producer.protocol import (
    PROTOCOL_VERSION,
    Chunk,
    ErrorCode,
    ErrorReply,
    FinishReason,
    Job,
    Message,
    Reply,
    Result,
    SamplingParams,
    Timings,
    Usage,
    decode_job,
    decode_reply,
    encode_job,
    encode_reply,
)
from lorafleet.producer.spec import JobSpec

__all__ = [
    "BASE_QUEUE",
    "PROTOCOL_VERSION",
    "AsyncJobHandle",
    "AsyncProducer",
    "Chunk",
    "ErrorCode",
    "ErrorReply",
    "FinishReason",
    "Job",
    "JobFailed",
    "JobHandle",
    "JobSpec",
    "Keys",
    "LorafleetError",
    "Message",
    "Producer",
    "ProducerConfig",
    "ProtocolError",
    "QueueFull",
    "Reply",
    "Result",
    "SamplingParams",
    "Timings",
    "Usage",
    "decode_job",
    "decode_reply",
    "encode_job",
    "encode_reply",
]
