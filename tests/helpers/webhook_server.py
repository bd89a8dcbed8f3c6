"""A real HTTP server on 127.0.0.1 for webhook tests: records every POST and answers as told."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookServer:
    """``with WebhookServer() as srv:`` — ``srv.url`` to post to, ``srv.received`` what arrived.

    ``script`` is a list of answers used in turn for successive requests (the last one repeats):
    ``200``, ``500``, ``(429, retry_after_seconds)`` or ``("slow", seconds)`` (sleep, then 200).
    """

    def __init__(self, script=(200,), path: str = "/services/T0/B0/SECRETTOKEN") -> None:
        self.script = list(script)
        self.path = path
        self.received: list[dict] = []  # {"time", "path", "headers", "body", "json"}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with server._lock:
                    n = len(server.received)
                    answer = server.script[min(n, len(server.script) - 1)]
                    try:
                        parsed = json.loads(body)
                    except ValueError:
                        parsed = None
                    server.received.append({"time": time.monotonic(), "path": self.path,
                                            "headers": dict(self.headers), "body": body, "json": parsed})
                if isinstance(answer, tuple) and answer[0] == "slow":
                    time.sleep(answer[1])
                    answer = 200
                try:
                    if isinstance(answer, tuple) and answer[0] == 429:
                        self.send_response(429)
                        self.send_header("Retry-After", str(answer[1]))
                    else:
                        self.send_response(int(answer))
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:  # the client gave up (timeout): nothing to answer
                    pass

            def log_message(self, *args):  # keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}{path}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[dict]:
        """Wait until ``n`` requests arrived (or ``timeout``); return what arrived."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if len(self.received) >= n:
                    break
            time.sleep(0.02)
        with self._lock:
            return list(self.received)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a dead URL or a process-group rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_url(path: str = "/services/T0/B0/SECRETTOKEN") -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}{path}"
