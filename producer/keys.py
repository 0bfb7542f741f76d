"""Every Redis key lorafleet uses, in one place, and the syntax of the names that go into them.

All keys live under a namespace prefix (default ``lorafleet``), so that several deployments can
share one Redis. docs/protocol.md lists the same keys for producers written in other languages.

>>> keys = Keys()
>>> keys.jobs("support-bot@3")
'lorafleet:jobs:support-bot@3'
>>> keys.jobs(None)
'lorafleet:jobs:~base'

Names are checked here because they become parts of keys: an adapter id can never contain ``~``
(so no adapter collides with the base model's queue), ``/`` or ``..`` (so it is never a path
traversal on a worker's disk cache), and no id contains whitespace or ``*``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

DEFAULT_NAMESPACE = "lorafleet"
# The queue name of jobs for the base model (no adapter). `~` is outside the adapter charset.
BASE_QUEUE = "~base"

_NAME = re.compile(r"[A-Za-z0-9._-]+")
_JOB_ID = re.compile(r"[A-Za-z0-9._:-]+")
# Braces are allowed so that a namespace can be a Redis Cluster hash tag, e.g. "{lf}".
_NAMESPACE = re.compile(r"[A-Za-z0-9._:{}-]+")

MAX_ADAPTER_NAME = 128
MAX_ADAPTER_VERSION = 64
MAX_JOB_ID = 128
MAX_CLIENT_ID = 64
MAX_NAMESPACE = 64


def _check_name(field: str, value: object, max_len: int) -> str:
    """A name of charset [A-Za-z0-9._-], 1..max_len chars, no leading dot and no '..'."""
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a string, not {type(value).__name__}")
    if not 1 <= len(value) <= max_len:
        raise ValueError(f"{field} must be 1..{max_len} characters long, got {len(value)}")
    if not _NAME.fullmatch(value):
        raise ValueError(f"{field} {value!r} may contain only letters, digits, '.', '_' and '-'")
    if value.startswith(".") or ".." in value:
        raise ValueError(f"{field} {value!r} must not start with '.' or contain '..'")
    return value


def check_adapter_id(adapter: object, field: str = "adapter") -> str:
    """Validate an adapter id, ``name`` or ``name@version``, and return it.

    name: [A-Za-z0-9._-], 1..128 chars, no leading dot, no '..'; version: the same rules, 1..64 chars.
    """
    if not isinstance(adapter, str):
        raise TypeError(f"{field} must be a string or None, not {type(adapter).__name__}")
    name, sep, version = adapter.partition("@")
    _check_name(f"{field} name", name, MAX_ADAPTER_NAME)
    if sep:
        _check_name(f"{field} version", version, MAX_ADAPTER_VERSION)
    return adapter


def check_adapter_name(name: object, field: str = "adapter name") -> str:
    """Validate a bare adapter name (no ``@version``): the name rules of `check_adapter_id`."""
    return _check_name(field, name, MAX_ADAPTER_NAME)


def check_adapter_version(version: object, field: str = "adapter version") -> str:
    """Validate an adapter version: [A-Za-z0-9._-], 1..64 chars, no leading dot, no '..'."""
    return _check_name(field, version, MAX_ADAPTER_VERSION)


def check_job_id(job_id: object, field: str = "id") -> str:
    """Validate a job id: [A-Za-z0-9._:-], 1..128 chars."""
    if not isinstance(job_id, str):
        raise TypeError(f"{field} must be a string, not {type(job_id).__name__}")
    if not 1 <= len(job_id) <= MAX_JOB_ID:
        raise ValueError(f"{field} must be 1..{MAX_JOB_ID} characters long, got {len(job_id)}")
    if not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"{field} {job_id!r} may contain only letters, digits, '.', '_', ':' and '-'")
    return job_id


def check_client_id(client_id: object, field: str = "client_id") -> str:
    """Validate a client id: [A-Za-z0-9._-], 1..64 chars, no leading dot, no '..'."""
    return _check_name(field, client_id, MAX_CLIENT_ID)


def check_namespace(namespace: object, field: str = "namespace") -> str:
    """Validate a namespace: [A-Za-z0-9._:{}-], 1..64 chars."""
    if not isinstance(namespace, str):
        raise TypeError(f"{field} must be a string, not {type(namespace).__name__}")
    if not 1 <= len(namespace) <= MAX_NAMESPACE or not _NAMESPACE.fullmatch(namespace):
        raise ValueError(
            f"{field} {namespace!r} must be 1..{MAX_NAMESPACE} characters of [A-Za-z0-9._:{{}}-]"
        )
    return namespace


def queue_name(adapter: str | None) -> str:
    """The queue (job stream suffix, member of the waiting set) of an adapter id; None or '' is the base."""
    if adapter is None or adapter == "":
        return BASE_QUEUE
    return check_adapter_id(adapter)


def check_queue(queue: object) -> str:
    """Validate a queue name read from Redis (a member of ``waiting`` or ``queues``) and return it as
    text: ``~base`` or an adapter id. Producers that skip the submit script's rules can put anything
    there, bytes that are not UTF-8 included; a worker must never build keys or paths from those."""
    if isinstance(queue, bytes):
        try:
            queue = queue.decode()
        except UnicodeDecodeError:
            raise ValueError("queue name is not valid UTF-8") from None
    if queue == BASE_QUEUE:
        return BASE_QUEUE
    return check_adapter_id(queue, "queue")


def queue_label(raw_queue: bytes) -> str:
    """A queue name read from Redis as logs and tables show it, whatever it holds: the first 200
    bytes, anything that is not UTF-8 escaped."""
    return raw_queue[:200].decode(errors="backslashreplace")


def check_reply_to(reply_to: object, prefix: str) -> str:
    """Validate a job's reply stream: exactly ``prefix`` (``{ns}:reply:``) and a client id."""
    if not isinstance(reply_to, str):
        raise TypeError(f"reply_to must be a string, not {type(reply_to).__name__}")
    if not reply_to.startswith(prefix):
        shown = reply_to[:80].encode("ascii", "backslashreplace").decode()
        raise ValueError(f"reply_to must be a key under {prefix!r}, got {shown!r}")
    check_client_id(reply_to[len(prefix) :], "reply_to client id")
    return reply_to


def adapter_of_queue(queue: str) -> str | None:
    """Inverse of `queue_name`: the adapter id of a queue, None for the base model's queue."""
    return None if queue == BASE_QUEUE else queue


@dataclass(frozen=True)
class Keys:
    """Key names under one namespace.

    Job streams and the consumer group:
        jobs(adapter)     ``{ns}:jobs:{queue}``  stream, one per adapter id (``~base`` for the base model)
        GROUP             ``workers``            the consumer group on every job stream
    Indexes and signals:
        waiting           ``{ns}:waiting``       sorted set: queue -> enqueue ms of its oldest undelivered job
        queues            ``{ns}:queues``        set: the queues submitted to that still hold jobs (pruned
                                                 when a queue's last job is answered; a submit re-adds it)
        pending           ``{ns}:pending``       set: the queues with entries pending in the group (recovery)
        wake              ``{ns}:wake``          stream, an entry per queue that starts waiting; workers block
        dead              ``{ns}:dead``          stream of dead-lettered jobs
    Per client and per job:
        reply(client_id)  ``{ns}:reply:{client_id}``  stream of replies to one client, expiring when idle
        cancel(job_id)    ``{ns}:cancel:{job_id}``    string with a TTL: the job is cancelled
        cancels           ``{ns}:cancels``            integer, incremented after each cancel marker is set
        job(job_id)       ``{ns}:job:{job_id}``       string with a TTL: idempotency key, holds the entry id
    Fleet directory (written by workers):
        workers           ``{ns}:workers``            sorted set: worker id -> unix time of its last heartbeat
        worker(worker_id) ``{ns}:worker:{worker_id}`` hash with a TTL: id, device, load, residents
        lease(queue)      ``{ns}:lease:{queue}``      string with a short TTL: the worker loading that adapter
    Adapter registry and control plane:
        adapters          ``{ns}:adapters``           hash: adapter name -> its current ready version
        adapter(name)     ``{ns}:adapter:{name}``     hash: version -> JSON record (state, files, rank)
        adapter_names     ``{ns}:adapter-names``      set: every name with a registry entry
        adapter_events    ``{ns}:adapter-events``     stream (MAXLEN ~): ready/warm/removed, for workers
        control           ``{ns}:control``            name of the RQ queue of control jobs (RQ keys: ``rq:``)
    Gateway rates and usage metering:
        rate(tenant, kind) ``{ns}:rate:{tenant}:{kind}`` hash with a TTL: a tenant's token bucket (level, ms);
                                                 kind = requests | tokens
        usage(hour)       ``{ns}:usage:{hour}``       hash with a TTL, one per hour (unix seconds // 3600):
                                                 ``{adapter}|{tenant}|{kind}`` -> count
    """

    namespace: str = DEFAULT_NAMESPACE

    GROUP: ClassVar[str] = "workers"

    def __post_init__(self) -> None:
        check_namespace(self.namespace)

    @property
    def group(self) -> str:
        """Name of the consumer group on every job stream."""
        return self.GROUP

    @property
    def pattern(self) -> str:
        """SCAN pattern of every key of this namespace (a namespace holds no glob characters)."""
        return f"{self.namespace}:*"

    def jobs(self, adapter: str | None) -> str:
        """Job stream of an adapter id (None or '' for the base model)."""
        return f"{self.namespace}:jobs:{queue_name(adapter)}"

    def jobs_of_queue(self, queue: str) -> str:
        """Job stream of a queue name as stored in `waiting` and `queues`."""
        return f"{self.namespace}:jobs:{queue}"

    @property
    def jobs_prefix(self) -> str:
        """Common prefix of every job stream key."""
        return f"{self.namespace}:jobs:"

    def queue_of_stream(self, stream: str) -> str:
        """Queue name of a job stream key (inverse of `jobs_of_queue`)."""
        if not stream.startswith(self.jobs_prefix):
            raise ValueError(f"{stream!r} is not a job stream of namespace {self.namespace!r}")
        return stream[len(self.jobs_prefix) :]

    @property
    def waiting(self) -> str:
        """Sorted set of queues with undelivered jobs, scored by the oldest one's enqueue time (ms)."""
        return f"{self.namespace}:waiting"

    @property
    def queues(self) -> str:
        """Set of the queue names submitted to whose streams may still hold jobs: the submit script adds
        a queue when it starts waiting, the final-reply and dead-letter scripts remove it when its
        stream is left empty with nothing pending."""
        return f"{self.namespace}:queues"

    @property
    def pending(self) -> str:
        """Set of the queues whose job streams have entries pending in the consumer group (delivered,
        not yet answered): the worker scripts keep it, so that recovery looks at these queues only."""
        return f"{self.namespace}:pending"

    @property
    def wake(self) -> str:
        """Wake-up stream: an entry whenever a queue starts waiting, trimmed (MAXLEN ~); carries no jobs."""
        return f"{self.namespace}:wake"

    @property
    def dead(self) -> str:
        """Dead-letter stream."""
        return f"{self.namespace}:dead"

    @property
    def reply_prefix(self) -> str:
        """Common prefix of every reply stream key; workers write replies only under it."""
        return f"{self.namespace}:reply:"

    def reply(self, client_id: str) -> str:
        """Reply stream of one client."""
        return self.reply_prefix + check_client_id(client_id)

    def cancel(self, job_id: str) -> str:
        """Cancel marker of a job."""
        return f"{self.namespace}:cancel:{check_job_id(job_id)}"

    @property
    def cancels(self) -> str:
        """Counter bumped after each cancel marker: workers read it instead of every running job's marker."""
        return f"{self.namespace}:cancels"

    def job(self, job_id: str) -> str:
        """Idempotency key of a job id."""
        return f"{self.namespace}:job:{check_job_id(job_id)}"

    @property
    def workers(self) -> str:
        """Sorted set of worker ids scored by their last heartbeat (unix seconds)."""
        return f"{self.namespace}:workers"

    def worker(self, worker_id: str) -> str:
        """Directory entry (hash) of one worker."""
        return f"{self.namespace}:worker:{check_client_id(worker_id, 'worker id')}"

    def lease(self, queue: str) -> str:
        """Load lease of an adapter's queue: held by the worker that is loading it."""
        return f"{self.namespace}:lease:{queue}"

    @property
    def adapters(self) -> str:
        """Hash of adapter name -> its current ready version (what a bare name resolves to)."""
        return f"{self.namespace}:adapters"

    def adapter(self, name: str) -> str:
        """Hash of one adapter's versions: version -> JSON record (state, reason, files, rank, ...)."""
        return f"{self.namespace}:adapter:{check_adapter_name(name)}"

    @property
    def adapter_names(self) -> str:
        """Set of every adapter name with a registry entry (pending, ready or rejected versions)."""
        return f"{self.namespace}:adapter-names"

    @property
    def adapter_events(self) -> str:
        """Stream of adapter events (fields `e` = ready|warm|removed, `n` = name, `v` = version)."""
        return f"{self.namespace}:adapter-events"

    @property
    def control(self) -> str:
        """Name of the RQ queue of control-plane jobs (validate, warm); RQ keeps it at ``rq:queue:<name>``."""
        return f"{self.namespace}:control"

    def usage(self, hour: int) -> str:
        """Hash of one hour's gateway usage (`hour` = unix seconds // 3600): field
        ``{adapter}|{tenant}|{kind}`` -> count, kind = prompt | completion | requests."""
        if isinstance(hour, bool) or not isinstance(hour, int) or hour < 0:
            raise ValueError(f"usage hour must be a non-negative integer, got {hour!r}")
        return f"{self.namespace}:usage:{hour}"

    def rate(self, tenant: str, kind: str) -> str:
        """Token bucket of one tenant's rate (a hash of ``level`` and ``ms``; kind = requests | tokens)."""
        if kind not in ("requests", "tokens"):
            raise ValueError(f"rate kind must be requests or tokens, got {kind!r}")
        return f"{self.namespace}:rate:{check_client_id(tenant, 'tenant')}:{kind}"

    @property
    def usage_prefix(self) -> str:
        """Common prefix of the hourly usage hashes."""
        return f"{self.namespace}:usage:"
