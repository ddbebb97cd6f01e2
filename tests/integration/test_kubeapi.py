"""The driver's API reader (csi_driver/kubeapi.py) against real HTTPS servers that misbehave:
the service account token goes to the API and nowhere else, and a slow server cannot hold
the caller past its time."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from csi_driver.kubeapi import ApiError, KubeApi
from tests.pki import Pki

TOKEN = "SECRET-SA-TOKEN"


class Server:
    def __init__(
        self, handler: Callable[[BaseHTTPRequestHandler], None], tls: ssl.SSLContext | None
    ):
        seen: list[dict[str, str]] = []
        self.seen = seen

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(dict(self.headers))
                handler(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    pki = Pki(tmp_path / "pki")
    pair = pki.issue("api", "127.0.0.1", dns=("localhost",), ips=("127.0.0.1",), server=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pair.cert, pair.key)
    return context, pki.ca.cert


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.close()


def _api(port: int, ca: Path, tmp_path: Path) -> KubeApi:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    return KubeApi(f"https://127.0.0.1:{port}", token, ca)


def test_answers_are_read(
    tls: tuple[ssl.SSLContext, Path],
    servers: list[Server],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def ok(h: BaseHTTPRequestHandler) -> None:
        body = json.dumps({"items": [], "path": h.path}).encode()
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    servers.append(Server(ok, tls[0]))
    # a proxy in the environment is not used: the API is reached directly
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    reply = _api(servers[0].port, tls[1], tmp_path).get("/api/v1/pods", {"labelSelector": "a=b"})
    assert reply["path"] == "/api/v1/pods?labelSelector=a%3Db"
    assert servers[0].seen[0]["Authorization"] == f"Bearer {TOKEN}"


def test_a_redirect_is_not_followed(
    tls: tuple[ssl.SSLContext, Path], servers: list[Server], tmp_path: Path
) -> None:
    def elsewhere(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.end_headers()

    servers.append(Server(elsewhere, None))
    target = f"http://127.0.0.1:{servers[0].port}/stolen"

    def redirect(h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", target)
        h.send_header("Content-Length", "0")
        h.end_headers()

    servers.append(Server(redirect, tls[0]))
    with pytest.raises(ApiError) as exc:
        _api(servers[1].port, tls[1], tmp_path).get("/api/v1/pods")
    assert exc.value.status == 302
    assert servers[0].seen == [], "the token followed a redirect"


def test_a_dripping_server_is_cut_off(
    tls: tuple[ssl.SSLContext, Path], servers: list[Server], tmp_path: Path
) -> None:
    stop = threading.Event()

    def drip(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        h.wfile.write(b"{")
        h.wfile.flush()
        while not stop.wait(0.3):
            h.wfile.write(b" ")
            h.wfile.flush()

    servers.append(Server(drip, tls[0]))
    t0 = time.monotonic()
    try:
        with pytest.raises(ApiError, match="in time"):
            _api(servers[0].port, tls[1], tmp_path).get("/api/v1/pods", timeout=1.0)
    finally:
        stop.set()
    # bounded by twice the timeout (kubeapi._read_until), with room for a loaded machine
    assert time.monotonic() - t0 < 6
