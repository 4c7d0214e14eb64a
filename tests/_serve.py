"""An in-process latentdiff server for the serve tests: uvicorn in a background thread on a free loopback port; one
request to it."""

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import uvicorn

from latentdiff.serve.app import ServeConfig, create_app


@contextlib.contextmanager
def running(pipe, config: ServeConfig):
    """The app on a free loopback port, served by uvicorn in a background thread; yields the base URL."""
    app = create_app(pipe, config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.queue.close()


def call(url: str, method: str = "GET", body=None, headers: dict | None = None, raw: bytes | None = None):
    """(status, parsed JSON or bytes, headers) of one request; errors answered, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, content, hdrs = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        status, content, hdrs = e.code, e.read(), e.headers
    try:
        return status, json.loads(content), hdrs
    except ValueError:
        return status, content, hdrs
