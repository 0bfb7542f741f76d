"""The worker's reply sender: a step's replies go out in the background, in order, and a Redis that
goes away and comes back loses none of them."""

from __future__ import annotations

import redis

from lorafleet.producer import Chunk, Keys, Producer, Result, consumer
from lorafleet.producer.protocol import decode_job, decode_reply
from lorafleet.worker.serve.reply_sender import ReplySender

KEYS = Keys()


def chunk_batch(stream: str, seqs: range) -> consumer.ReplyBatch:
    batch = consumer.ReplyBatch()
    for seq in seqs:
        batch.chunk(Chunk("job", seq, (seq,), str(seq)), reply_to=stream, reply_ttl=60)
    return batch


def test_batches_go_out_in_order_with_the_keys_read_after_them(redis_url):
    client = redis.Redis.from_url(redis_url, protocol=2)
    stream = KEYS.reply("sender-order")
    sender = ReplySender(client, [KEYS.cancels])
    try:
        assert sender.take_values() is None  # nothing sent yet
        for start in range(0, 12, 3):
            sender.submit(chunk_batch(stream, range(start, start + 3)))
        client.incr(KEYS.cancels)
        sender.submit(consumer.ReplyBatch())  # an empty step still reads the counter
        assert sender.wait(10)
        seqs = [decode_reply(fields[b"r"]).seq for _, fields in client.xrange(stream)]
        assert seqs == list(range(12))
        assert sender.take_values() == [b"1"]
        assert sender.take_values() is None  # taken
    finally:
        sender.close()


def test_replies_handed_over_while_redis_is_down_are_sent_when_it_returns(redis_server_factory):
    """The final reply of a job read before the outage is sent and the job acknowledged once Redis
    is back (AOF keeps the pending entry), with the chunk before it, in order."""
    server = redis_server_factory(appendonly=True)
    client = redis.Redis.from_url(server.url, protocol=2, socket_timeout=5)
    with Producer(server.url) as producer:
        handle = producer.submit("survives", stream=True)
        (delivery,) = consumer.read_jobs(client, KEYS, ["~base"], "w1")
        job = decode_job(delivery.payload, KEYS)
        sender = ReplySender(client, [KEYS.cancels])
        try:
            server.kill()
            batch = consumer.ReplyBatch()
            batch.chunk(Chunk(job.id, 0, (7,), "partial"), reply_to=job.reply_to, reply_ttl=60)
            result = Result(id=job.id, text="done after the outage")
            batch.final(delivery.stream, delivery.entry_id, result, reply_to=job.reply_to, reply_ttl=60)
            sender.submit(batch)
            assert not sender.wait(1.5)  # kept, retried while Redis is away
            server.restart()
            assert sender.wait(30)
        finally:
            sender.close()
        replies = list(handle.stream(timeout=10))
        assert [r.text for r in replies] == ["partial", "done after the outage"]
        assert client.xpending(delivery.stream, KEYS.group)["pending"] == 0
