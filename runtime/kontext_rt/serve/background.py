"""An app served on a free loopback port from a background thread: for tests, benchmarks and notebooks.

with serving(create_app(pipe)) as port:
    ...  # http://127.0.0.1:{port}/v1/images/generations
"""

from __future__ import annotations

import contextlib
import threading
import time


@contextlib.contextmanager
def serving(app, start_timeout_s: float = 60.0):
    """Yield the port of a uvicorn server running `app` on 127.0.0.1 (a free port, lifespan on); it stops, its
    queue drained, when the block ends."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(start_timeout_s)
