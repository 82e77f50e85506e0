"""Running the HTTP server inside a test process: uvicorn on a free loopback port, in a thread.

    with serve(app) as url:   # "http://127.0.0.1:PORT"
        ...

The app's lifespan starts its engine and stops it when the block ends.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import uvicorn


@contextlib.contextmanager
def serve(app, timeout: float = 120.0):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_until(predicate, timeout: float = 10.0, every: float = 0.05) -> bool:
    """Polls `predicate()` until it is true (-> True) or `timeout` passes (-> False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()
