"""A small threaded HTTP server for loopback addresses: serves a directory plus optional custom routes.

The demo, the tests and the benchmarks serve the built-in corpus through it, so ingest always exercises the
real download path. It refuses to bind anything but a loopback address: this project never sends traffic
to a host it did not start itself.
"""

from __future__ import annotations

import ipaddress
import mimetypes
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# A route handler receives the request handler and writes the whole response itself.
RouteHandler = Callable[[BaseHTTPRequestHandler], None]


class LoopbackServer:
    """`with LoopbackServer(root) as server: server.base_url` -> "http://127.0.0.1:<port>".

    `routes` maps a path ("/slow") to a handler; everything else is looked up under `root`.
    Every request path is appended to `requests` (thread-safe), so tests can assert what was fetched.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        routes: dict[str, RouteHandler] | None = None,
    ):
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"LoopbackServer binds loopback addresses only, got {host}")
        self.root = Path(root).resolve() if root is not None else None
        self.host = host
        self.routes = dict(routes or {})
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> LoopbackServer:
        # A short poll: stop() waits for the loop's next look at its shutdown flag.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loopback-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _record(self, path: str) -> None:
        with self._lock:
            self.requests.append(path)

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes; with Nagle on, each response waits ~40 ms.
            disable_nagle_algorithm = True

            def log_message(self, *args):  # keep test and demo output clean
                pass

            def do_GET(self):
                path = unquote(urlsplit(self.path).path)
                server._record(path)
                route = server.routes.get(path) or (lambda handler: handler._serve_file(path))
                try:
                    route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout under test, say): nothing left to answer

            def _serve_file(self, path: str) -> None:
                if server.root is None:
                    self.send_error(404)
                    return
                target = (server.root / path.lstrip("/")).resolve()
                if server.root not in target.parents or not target.is_file():
                    self.send_error(404)
                    return
                body = target.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", mimetypes.guess_type(target.name)[0] or "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


def send_bytes(handler: BaseHTTPRequestHandler, body: bytes, content_type: str, status: int = 200) -> None:
    """Write a complete response; a helper for route handlers."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def redirect_to(location: str, status: int = 302) -> RouteHandler:
    """A route handler that redirects to `location`."""

    def handler(request: BaseHTTPRequestHandler) -> None:
        request.send_response(status)
        request.send_header("Location", location)
        request.send_header("Content-Length", "0")
        request.end_headers()

    return handler
