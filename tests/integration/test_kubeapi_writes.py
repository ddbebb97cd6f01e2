"""The API client's writes and paged listings (csi_driver/kubeapi.py), as the reconcilers use
them, against a real HTTPS server: each write carries its method, JSON body, content type and
precondition; a listing is whole or an error (a failed or expired page never returns part)."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from csi_driver.kubeapi import LIST_PAGE, METADATA_ONLY, ApiError, KubeApi, quote
from tests.pki import Pki

Reply = tuple[int, Any]


class Api:
    """An HTTPS server answering each request with ``answer(method, path, body)``."""

    def __init__(self, tmp_path: Path, answer: Callable[[str, str, Any, dict[str, str]], Reply]):
        pki = Pki(tmp_path / "pki")
        pair = pki.issue("api", "127.0.0.1", dns=("localhost",), ips=("127.0.0.1",), server=True)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert, pair.key)
        self.seen: list[tuple[str, str, Any, dict[str, str]]] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                headers = dict(self.headers)
                seen.append((self.command, self.path, body, headers))
                status, reply = answer(self.command, self.path, body, headers)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        token = tmp_path / "token"
        token.write_text("T\n")
        self.client = KubeApi(
            f"https://127.0.0.1:{self.httpd.server_address[1]}", token, pki.ca.cert
        )

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def make_api(tmp_path: Path) -> Iterator[Callable[..., Api]]:
    made: list[Api] = []

    def make(answer: Callable[[str, str, Any, dict[str, str]], Reply]) -> Api:
        made.append(Api(tmp_path, answer))
        return made[-1]

    yield make
    for api in made:
        api.close()


def test_writes_carry_method_body_type_and_precondition(make_api: Callable[..., Api]) -> None:
    api = make_api(lambda m, p, b, h: (200, {"ok": m}))
    c = api.client
    assert c.create("/api/v1/namespaces/x/events", {"a": 1}) == {"ok": "POST"}
    c.replace("/x/l", {"metadata": {"resourceVersion": "7"}})
    c.merge_patch("/x/pv", {"metadata": {"finalizers": []}})
    c.delete("/x/pvc", uid="u-1")
    c.delete("/x/other")
    methods = [(m, p, b) for m, p, b, _ in api.seen]
    assert methods == [
        ("POST", "/api/v1/namespaces/x/events", {"a": 1}),
        ("PUT", "/x/l", {"metadata": {"resourceVersion": "7"}}),
        ("PATCH", "/x/pv", {"metadata": {"finalizers": []}}),
        (
            "DELETE",
            "/x/pvc",
            {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": "u-1"}},
        ),
        ("DELETE", "/x/other", None),
    ]
    types = [h.get("Content-Type") for *_, h in api.seen]
    assert types == [
        "application/json",
        "application/json",
        "application/merge-patch+json",
        "application/json",
        None,
    ]
    assert all(h["Authorization"] == "Bearer T" for *_, h in api.seen)


def test_a_refused_write_is_an_error_with_its_status(make_api: Callable[..., Api]) -> None:
    api = make_api(lambda m, p, b, h: (409, {"reason": "Conflict"}))
    with pytest.raises(ApiError) as exc:
        api.client.delete("/x/pvc", uid="u")
    assert exc.value.status == 409 and "DELETE /x/pvc" in str(exc.value)


def test_a_listing_follows_every_page(make_api: Callable[..., Api]) -> None:
    def pages(m: str, p: str, b: Any, h: dict[str, str]) -> Reply:
        assert f"limit={LIST_PAGE}" in p
        if "continue=" not in p:
            return 200, {"items": [{"n": 1}], "metadata": {"continue": "tok 2"}}
        assert "continue=tok+2" in p
        return 200, {"items": [{"n": 2}], "metadata": {}}

    api = make_api(pages)
    assert api.client.list_all("/api/v1/persistentvolumes") == [{"n": 1}, {"n": 2}]


def test_a_metadata_only_listing_asks_for_partial_objects(make_api: Callable[..., Api]) -> None:
    """Nodes are listed as PartialObjectMetadataList: a page of full Node objects can pass the
    reply cap in a cluster of a few hundred nodes."""

    def pages(m: str, p: str, b: Any, h: dict[str, str]) -> Reply:
        assert h["Accept"] == METADATA_ONLY
        meta = {"name": "n1", "labels": {"k": "v"}}
        return 200, {"kind": "PartialObjectMetadataList", "items": [{"metadata": meta}]}

    api = make_api(pages)
    items = api.client.list_all("/api/v1/nodes", metadata_only=True)
    assert items == [{"metadata": {"name": "n1", "labels": {"k": "v"}}}]


def test_an_empty_metadata_only_listing_is_empty(make_api: Callable[..., Api]) -> None:
    """The API writes the items of an empty PartialObjectMetadataList as null."""
    api = make_api(lambda m, p, b, h: (200, {"kind": "PartialObjectMetadataList", "items": None}))
    assert api.client.list_all("/api/v1/nodes", metadata_only=True) == []


def test_a_full_list_where_metadata_was_asked_is_an_error(make_api: Callable[..., Api]) -> None:
    api = make_api(lambda m, p, b, h: (200, {"kind": "NodeList", "items": []}))
    with pytest.raises(ApiError, match="PartialObjectMetadataList"):
        api.client.list_all("/api/v1/nodes", metadata_only=True)


@pytest.mark.parametrize(
    "second",
    [
        (410, {"reason": "Expired"}),  # the continue token expired: the listing must restart
        (500, {}),
        (200, {"items": "nope"}),
        (200, {"items": [1, 2]}),
    ],
)
def test_a_listing_with_a_bad_page_is_an_error_not_a_part(
    make_api: Callable[..., Api], second: Reply
) -> None:
    def pages(m: str, p: str, b: Any, h: dict[str, str]) -> Reply:
        if "continue=" not in p:
            return 200, {"items": [{"n": 1}], "metadata": {"continue": "c"}}
        return second

    api = make_api(pages)
    with pytest.raises(ApiError):
        api.client.list_all("/api/v1/persistentvolumes")


def test_names_are_quoted_into_one_segment() -> None:
    assert quote("a/../b") == "a%2F..%2Fb"
    assert quote("pvc-1") == "pvc-1"
