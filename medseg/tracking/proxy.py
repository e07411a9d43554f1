"""A small HTTP reverse proxy from ``HOST:PORT`` to a server on a Unix socket.

omniboard has no option to choose the address it listens on (it takes every interface) and
no login. Given a socket path as its port, it listens on that socket only, which no other
machine can reach; this proxy then serves it on the address the user chose (127.0.0.1 by
default). Being in front of omniboard also lets ``medseg db omniboard`` restart it behind
the same address, and add a ``<script>`` to its pages (the plot's default selection).

The standard library's HTTP server is enough here (one user, a handful of requests a
page); a proxy package would be one more dependency for the same forwarding.
"""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

#: Not forwarded: they describe one connection, not the message.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade"}
_CHUNK = 64 * 1024


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Proxy(ThreadingHTTPServer):
    """Forwards every request to the server on ``socket_path``; HTML pages get ``head_html``
    inserted before ``</head>``. ``unavailable`` is the text answered (503) while that
    server is not there (being restarted)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], socket_path: Path, head_html: str = "",
                 unavailable: str = "the server is restarting; reload in a few seconds") -> None:
        self.socket_path, self.head_html, self.unavailable = socket_path, head_html, unavailable
        super().__init__(address, _Handler)

    def serve_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="medseg-proxy", daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    server: Proxy

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        upstream = UnixHTTPConnection(self.server.socket_path)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
        except OSError:
            upstream.close()
            self._answer(503, self.server.unavailable.encode(), "text/plain; charset=utf-8")
            return
        try:
            self._relay(response)
        finally:
            upstream.close()

    def _relay(self, response: http.client.HTTPResponse) -> None:
        content_type = response.getheader("Content-Type", "")
        if content_type.startswith("text/html") and self.server.head_html:
            page = response.read().replace(b"</head>", self.server.head_html.encode() + b"</head>",
                                           1)
            self._answer(response.status, page, content_type, response.getheaders())
            return
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes
        while chunk := response.read(_CHUNK):
            self.wfile.write(chunk)

    def _answer(self, status: int, body: bytes, content_type: str, headers=()) -> None:
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP | {"content-length", "content-type"}:
                self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        pass  # omniboard logs its own requests
