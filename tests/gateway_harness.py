"""Serving a gateway app from a test: uvicorn in a thread on a free port, stopped at the end."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from lorafleet.gateway.app import create_app
from lorafleet.gateway.config import GatewayConfig
from lorafleet.gateway.tenants import Tenants


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServedGateway:
    """A running gateway: `base_url` ends in /v1, `url` is the server's root."""

    server: uvicorn.Server
    thread: threading.Thread
    port: int
    config: GatewayConfig

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(config: GatewayConfig, tenants: Tenants | None = None) -> ServedGateway:
    """Start `create_app(config)` on a free port and wait until it listens."""
    port = free_port()
    config = config.with_settings(port=port)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config, tenants), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
    )
    thread = threading.Thread(target=server.run, name=f"gateway-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the gateway did not start")
        time.sleep(0.02)
    return ServedGateway(server, thread, port, config)
