"""`lorafleet gateway`, `lorafleet usage` and `lorafleet gateway-key`, registered into the
`lorafleet` command of `lorafleet.producer.cli`.

Nothing here imports the web stack at registration: `lorafleet.gateway.app` (Starlette, uvicorn)
loads only when `lorafleet gateway` runs, and without the `gateway` extra that command says how to
install it and exits 2. `usage` and `gateway-key` need only the base install.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any

from lorafleet.gateway.config import GatewayConfig
from lorafleet.gateway.tenants import Tenants, hash_key, new_key

EXTRA_HINT = "pip install 'lorafleet[gateway]'"
WEB_MODULES = ("starlette", "uvicorn", "sse_starlette", "prometheus_client")

# Flags of `lorafleet gateway`: (flag, type, help); each also reads LORAFLEET_<FLAG>.
_FLAGS: list[tuple[str, type, str]] = [
    ("redis-url", str, "Redis URL (default redis://127.0.0.1:6379/0)"),
    ("namespace", str, "Redis key namespace (default lorafleet)"),
    ("host", str, "address to listen on (default 127.0.0.1)"),
    ("port", int, "port to listen on (default 8000)"),
    ("base-model", str, "the model name that means the base model (default base)"),
    ("models", str, "registry: only ready adapters of the registry (default); any: every valid adapter id"),
    ("api-keys-file", str, "JSON file of tenants and their hashed keys (none: the gateway is open)"),
    ("max-body-bytes", int, "largest request body (default 4 MiB)"),
    ("max-depth", int, "deepest JSON nesting accepted (default 32)"),
    ("request-timeout", float, "job deadline when a request gives none, seconds (default 600)"),
    ("max-waiting-per-adapter", int, "queue length per adapter past which requests get 429 (default 10000)"),
    ("log-level", str, "debug, info, warning or error (default info)"),
]


def register(commands: argparse._SubParsersAction) -> None:
    """Add `gateway`, `usage` and `gateway-key` to the `lorafleet` command."""
    gateway = commands.add_parser(
        "gateway",
        help="serve an OpenAI-compatible HTTP API onto the queue",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics; "
        "each request becomes a job on the queue. Every flag also reads LORAFLEET_<FLAG>; "
        "LORAFLEET_API_KEYS holds tenants inline. Needs the gateway extra: " + EXTRA_HINT,
    )
    for flag, kind, text in _FLAGS:
        gateway.add_argument(f"--{flag}", type=kind, default=None, help=text)
    gateway.set_defaults(func=run_gateway)
    usage = commands.add_parser(
        "usage", help="tokens and requests served by the gateway, per adapter and API key tenant"
    )
    usage.add_argument("--adapter", help="only this adapter name (~base for the base model)")
    usage.add_argument("--key", help="only this tenant (the name of an API key; - when open)")
    usage.add_argument(
        "--since", default="24h", help="window start: 30m, 24h (default), 7d, an ISO time or unix seconds"
    )
    usage.add_argument("--json", action="store_true", help="print JSON for scripts")
    usage.add_argument("--redis-url", help="Redis URL (env LORAFLEET_REDIS_URL)")
    usage.add_argument("--namespace", help="key namespace (env LORAFLEET_NAMESPACE)")
    usage.set_defaults(func=run_usage)
    key = commands.add_parser(
        "gateway-key", help="make an API key for a tenant and print its entry for the keys file"
    )
    key.add_argument("name", help="tenant name, [A-Za-z0-9._-]")
    key.add_argument("--models", nargs="+", default=["*"], help="adapter names or globs it may call")
    key.add_argument("--requests-per-minute", type=int)
    key.add_argument("--tokens-per-minute", type=int)
    key.set_defaults(func=run_gateway_key)


def _missing_web_module() -> str | None:
    import importlib.util

    for module in WEB_MODULES:
        if importlib.util.find_spec(module) is None:
            return module
    return None


def run_gateway(args: argparse.Namespace) -> int:
    """`lorafleet gateway`: serve until SIGINT/SIGTERM; 2 on bad settings or a missing extra."""
    missing = _missing_web_module()
    if missing is not None:
        message = f"lorafleet gateway needs the gateway extra ({missing} is missing): {EXTRA_HINT}"
        print(message, file=sys.stderr)
        return 2
    overrides = {f.name: getattr(args, f.name, None) for f in fields(GatewayConfig)}
    try:
        config = GatewayConfig.from_env(**overrides)
        tenants = Tenants.load(config.api_keys_file, config.api_keys)
    except (TypeError, ValueError) as exc:
        print(f"lorafleet gateway: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from lorafleet.gateway.app import create_app

    if tenants.open:
        print(
            "WARNING: lorafleet gateway: NO API KEYS CONFIGURED: anyone who reaches "
            f"http://{config.host}:{config.port} may call every model. Set --api-keys-file or "
            "LORAFLEET_API_KEYS (lorafleet gateway-key NAME makes a key).",
            file=sys.stderr,
        )
    else:
        print(f"lorafleet gateway: {len(tenants.names)} API key tenants loaded", file=sys.stderr)
    uvicorn.run(create_app(config, tenants), host=config.host, port=config.port, log_level=config.log_level)
    return 0


def run_usage(args: argparse.Namespace) -> int:
    """`lorafleet usage`: the usage counters over a window, as a table or JSON."""
    import redis

    from lorafleet.gateway.usage import group_totals, parse_since, read_usage
    from lorafleet.producer.config import redis_target
    from lorafleet.producer.keys import Keys

    try:
        url, namespace = redis_target(args.redis_url, args.namespace)
        since = parse_since(args.since)
    except (TypeError, ValueError) as exc:
        print(f"lorafleet usage: {exc}", file=sys.stderr)
        return 2
    client = redis.Redis.from_url(url, protocol=2, socket_timeout=10, socket_connect_timeout=5)
    try:
        rows = read_usage(client, Keys(namespace), since, adapter=args.adapter, tenant=args.key)
    except redis.RedisError as exc:
        print(f"error: Redis: {exc}", file=sys.stderr)
        return 5
    except ValueError as exc:
        print(f"lorafleet usage: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    report: dict[str, Any] = {
        "since": since,
        "rows": [r.to_dict() for r in rows],
        "totals": group_totals(rows),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_usage(report)
    return 0


def _print_usage(report: dict[str, Any]) -> None:
    columns = ("adapter", "tenant", "requests", "prompt_tokens", "completion_tokens", "total_tokens")
    table = [list(columns)] + [[str(row[c]) for c in columns] for row in report["rows"]]
    table.append(["total", "", *(str(report["totals"][c]) for c in columns[2:])])
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        pairs = enumerate(zip(line, widths, strict=True))
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in pairs]
        print("  ".join(cells).rstrip())


def run_gateway_key(args: argparse.Namespace) -> int:
    """`lorafleet gateway-key NAME`: a new key (shown once) and its tenants-file entry (hash only)."""
    from lorafleet.gateway.tenants import parse_tenants

    key = new_key()
    entry: dict[str, Any] = {"name": args.name, "key_sha256": hash_key(key), "models": args.models}
    for rate in ("requests_per_minute", "tokens_per_minute"):
        if getattr(args, rate) is not None:
            entry[rate] = getattr(args, rate)
    try:
        parse_tenants(json.dumps({"tenants": [entry]}), "the new entry")
    except ValueError as exc:
        print(f"lorafleet gateway-key: {exc}", file=sys.stderr)
        return 2
    print(f"API key (shown once, keep it secret): {key}", file=sys.stderr)
    print(json.dumps(entry))
    return 0
