"""Many commands in one round trip, streamed: the fast path of `submit_many`.

redis-py's Pipeline packs every command argument by argument in Python and sends the whole batch
before reading any answer, so Redis idles while the client packs and the client idles while Redis
runs. Here commands are packed with a few bytes joins and sent in chunks, and their answers are
handed out one chunk behind: the client packs and handles answers while Redis runs the next chunk.
Answers come back in order; an error answer is given as the exception object, like
``Pipeline.execute(raise_on_error=False)``. On a connection error the connection is dropped and the
error raised: some commands may have run (submits are idempotent by job id, so sending the same jobs
again is safe).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncGenerator, Generator, Iterable, Iterator, Sequence
from typing import Any

import redis
import redis.asyncio
from redis.exceptions import ResponseError

Arg = bytes | str | int
CHUNK = 128  # commands per write


def bulk(arg: Arg) -> bytes:
    """One argument as a RESP bulk string."""
    data = arg if isinstance(arg, bytes) else str(arg).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def pack_command(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings (the form of every command, RESP2 and RESP3)."""
    return b"*%d\r\n" % len(args) + b"".join(bulk(arg) for arg in args)


def _chunks(commands: Iterable[bytes]) -> Iterator[tuple[bytes, int]]:
    """Packed commands joined CHUNK at a time, lazily: packing the next chunk overlaps Redis running
    the previous one."""
    iterator = iter(commands)
    while part := list(itertools.islice(iterator, CHUNK)):
        yield b"".join(part), len(part)


def _answer(conn: Any) -> Any:
    try:
        return conn.read_response()
    except ResponseError as exc:
        return exc


def iter_pipelined(client: redis.Redis, commands: Iterable[bytes]) -> Generator[Any, None, None]:
    """Send packed `commands` (see `pack_command`) on one connection of `client`'s pool and yield
    their answers in order, one chunk behind the commands sent: what the caller does with an
    answer overlaps Redis running the next chunk."""
    pool = client.connection_pool
    conn = pool.get_connection()
    sent = read = 0
    try:
        for payload, count in _chunks(commands):
            conn.send_packed_command([payload], check_health=sent == 0)
            sent += count
            while read < sent - count:
                read += 1
                yield _answer(conn)
        while read < sent:
            read += 1
            yield _answer(conn)
    finally:
        if read < sent:  # stopped early (error, or the caller gave up): answers are still in flight
            conn.disconnect()
        pool.release(conn)


async def _answer_async(conn: Any) -> Any:
    try:
        return await conn.read_response()
    except ResponseError as exc:
        return exc


async def iter_pipelined_async(
    client: redis.asyncio.Redis, commands: Iterable[bytes]
) -> AsyncGenerator[Any, None]:
    """`iter_pipelined` for redis.asyncio."""
    pool = client.connection_pool
    conn = await pool.get_connection()
    sent = read = 0
    try:
        for payload, count in _chunks(commands):
            await conn.send_packed_command([payload], check_health=sent == 0)
            sent += count
            while read < sent - count:
                read += 1
                yield await _answer_async(conn)
        while read < sent:
            read += 1
            yield await _answer_async(conn)
    finally:
        if read < sent:
            await conn.disconnect()
        await pool.release(conn)
