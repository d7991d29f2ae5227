"""Run the controller as a process: the API on a socket, loops in the same event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from pathlib import Path

import uvicorn

from fleetvisor.controller.core import Controller
from fleetvisor.controller.settings import ControllerSettings
from fleetvisor.scheduler import SchedulerConfig

ENDPOINT_FILE = "controller.json"
log = logging.getLogger("fleetvisor.controller")


def serve(
    *,
    state_dir: Path,
    db_url: str | None,
    listen: str,
    port: int,
    settings: ControllerSettings,
    scheduler: SchedulerConfig | None = None,
) -> None:
    from fleetvisor.api.app import create_app

    controller = Controller(
        state_dir=state_dir, db_url=db_url, settings=settings, scheduler=scheduler
    )
    controller.prepare()
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP;
    # without it a response written as headers + body waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((listen, port))
    url = f"http://{listen}:{sock.getsockname()[1]}"
    endpoint = state_dir / ENDPOINT_FILE
    tmp = endpoint.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    os.replace(tmp, endpoint)
    log.info("controller serving %s (state %s, db %s)", url, state_dir, controller.db.url)
    server = uvicorn.Server(uvicorn.Config(create_app(controller), log_level="warning"))
    # uvicorn re-raises the signal that stopped it; a no-op handler lets the cleanup
    # below run instead of the default action killing the process mid-way.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        controller.db.dispose()
        try:
            if json.loads(endpoint.read_text()).get("pid") == os.getpid():
                endpoint.unlink()
        except (OSError, ValueError):
            pass
