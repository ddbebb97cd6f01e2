"""Talking to the Kubernetes API from inside a Pod, with the Pod's service account.

The driver asks the API for little: where each node's plugin Pod listens (the peer channel,
docs/deploy.md), and, when the opt-in reconcilers run (docs/operations.md), lists of Nodes and
PersistentVolumes, a Lease, Events and the deletion of claims and volumes of lost nodes. So it
carries no client library (the ``kubernetes`` package is over 100 MB installed, and importing
its client costs a process about half a second and 20 MB more; docs/operations.md has the
measurements): the in-cluster configuration is the
``KUBERNETES_SERVICE_HOST``/``_PORT`` environment, the CA bundle and the token the kubelet
mounts under ``/var/run/secrets/kubernetes.io/serviceaccount``. The token is read again for
every request (the kubelet rotates projected tokens); replies are bounded in size and in total
time; redirects are not followed and proxies are not used (the token goes to the API only).
Writes carry JSON bodies (at most MAX_BODY_BYTES) and, where the caller needs it, a
precondition (the object's uid or resourceVersion), so a write never lands on a newer object
than the one decided about. A listing is either complete or an error (:meth:`KubeApi.list_all`):
the reconcilers never act on part of one.
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from csi_driver.bounded import cap_message

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_REPLY_BYTES = 8 << 20
MAX_BODY_BYTES = 1 << 20
TIMEOUT = 10.0
#: what one listing may hold in all (pages of LIST_PAGE items): past it, the listing fails
MAX_LIST_ITEMS = 100_000
LIST_PAGE = 500
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
MERGE_PATCH = "application/merge-patch+json"
#: a listing of only the items' metadata (names, uids, labels): a few hundred bytes per Node
#: where the full object is tens of kilobytes (images, conditions), so that a large cluster's
#: Node listing stays within MAX_REPLY_BYTES per page
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"


class ApiError(Exception):
    """The API could not be asked, or refused; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, never followed: following it would send the token elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class KubeApi:
    def __init__(self, base_url: str, token_file: Path, ca_file: Path | None) -> None:
        if not base_url.startswith("https://"):
            raise ValueError(f"the API is reached over https only, not {base_url!r}")
        self._base = base_url.rstrip("/")
        self._token_file = token_file
        self._ca_file = ca_file

    @classmethod
    def in_cluster(cls, env: Mapping[str, str] = os.environ) -> KubeApi:
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise ApiError("not in a Pod: KUBERNETES_SERVICE_HOST/PORT are not set")
        if ":" in host:
            host = f"[{host}]"
        return cls(
            f"https://{host}:{port}",
            SERVICE_ACCOUNT_DIR / "token",
            SERVICE_ACCOUNT_DIR / "ca.crt",
        )

    def get(
        self,
        path: str,
        query: Mapping[str, str] | None = None,
        timeout: float = TIMEOUT,
        accept: str = "application/json",
    ) -> dict[str, Any]:
        """The JSON object at ``path`` (its parts already quoted by the caller). ``timeout``
        (at most TIMEOUT) bounds the whole exchange: see :func:`_read_until`."""
        return self.request("GET", path, query=query, timeout=timeout, accept=accept)

    def list_all(
        self,
        path: str,
        query: Mapping[str, str] | None = None,
        timeout: float = TIMEOUT,
        metadata_only: bool = False,
    ) -> list[dict[str, Any]]:
        """Every item of the collection at ``path``, page by page (``limit``/``continue``),
        or ApiError: a page that fails, an expired continue token (HTTP 410), an item that is
        not an object or more than MAX_LIST_ITEMS items fail the whole listing, never return
        part of it. ``timeout`` bounds each page. With ``metadata_only`` each item is a
        PartialObjectMetadata (its ``metadata`` only): see METADATA_ONLY."""
        accept = METADATA_ONLY if metadata_only else "application/json"
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            page_query = {**(query or {}), "limit": str(LIST_PAGE)}
            if token:
                page_query["continue"] = token
            page = self.get(path, page_query, timeout, accept)
            page_items = page.get("items")
            if metadata_only:
                if page.get("kind") != "PartialObjectMetadataList":
                    raise ApiError(f"LIST {path}: the reply is not a PartialObjectMetadataList")
                if page_items is None:  # how the API writes an empty one
                    page_items = []
            if not isinstance(page_items, list) or not all(isinstance(i, dict) for i in page_items):
                raise ApiError(f"LIST {path}: the reply has no list of objects")
            items.extend(page_items)
            if len(items) > MAX_LIST_ITEMS:
                raise ApiError(f"LIST {path}: more than {MAX_LIST_ITEMS} items")
            metadata = page.get("metadata")
            token = metadata.get("continue", "") if isinstance(metadata, dict) else ""
            if not isinstance(token, str):
                raise ApiError(f"LIST {path}: the continue token is not a string")
            if not token:
                return items

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body=body)

    def replace(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """PUT: the body's ``metadata.resourceVersion`` makes it conditional (HTTP 409 when
        the object changed since it was read)."""
        return self.request("PUT", path, body=body)

    def merge_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, body=body, content_type=MERGE_PATCH)

    def delete(self, path: str, uid: str | None = None) -> dict[str, Any]:
        """DELETE, only of the object with ``uid`` when given (HTTP 409 when the name now
        belongs to another object). A 404 is an ApiError too: the caller decides."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": uid}}
        return self.request("DELETE", path, body=body if uid else None)

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float = TIMEOUT,
        accept: str = "application/json",
    ) -> dict[str, Any]:
        """One exchange: ``method`` on ``path`` with an optional JSON ``body``; the reply's
        JSON object. Bounded as :meth:`get` is."""
        if method not in _METHODS:
            raise ValueError(f"unsupported method {method!r}")
        what = f"{method} {path}"
        deadline = time.monotonic() + min(timeout, TIMEOUT)
        url = self._base + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            if len(data) > MAX_BODY_BYTES:
                raise ApiError(f"{what}: the request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            # both read for every request: the kubelet rotates the token and the CA bundle
            token = self._token_file.read_text().strip()
            context = ssl.create_default_context(
                cafile=str(self._ca_file) if self._ca_file else None
            )
        except OSError as exc:
            raise ApiError(f"cannot read the service account's files: {exc.strerror}") from exc
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),  # the API directly, whatever HTTPS_PROXY says
            urllib.request.HTTPSHandler(context=context),
            _NoRedirect(),
        )
        headers = {"Authorization": f"Bearer {token}", "Accept": accept}
        if data is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(  # noqa: S310 (https only: __init__)
            url, data=data, headers=headers, method=method
        )
        try:
            with opener.open(request, timeout=_left(deadline, what)) as reply:
                raw = _read_until(reply, deadline, what)
        except urllib.error.HTTPError as exc:
            detail = exc.read(4096).decode("utf-8", "replace") if exc.fp else ""
            raise ApiError(f"{what}: HTTP {exc.code}: {cap_message(detail)}", exc.code) from exc
        except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
            raise ApiError(f"{what}: {cap_message(str(exc))}") from exc
        try:
            parsed = json.loads(raw)
        except ValueError as exc:
            raise ApiError(f"{what}: the reply is not JSON") from exc
        if not isinstance(parsed, dict):
            raise ApiError(f"{what}: the reply is not a JSON object")
        return parsed


def quote(segment: str) -> str:
    """One path segment (a name, a namespace), quoted so it cannot reach another path."""
    return urllib.parse.quote(segment, safe="")


def _left(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ApiError(f"{what}: no answer in time")
    return left


def _read_until(reply: Any, deadline: float, what: str) -> bytes:
    """The body, at most MAX_REPLY_BYTES, by ``deadline``: the deadline is checked between
    reads and each read waits at most the socket timeout the request was opened with (the
    time that was left then), so a server dripping bytes holds the caller at most twice the
    timeout."""
    chunks: list[bytes] = []
    size = 0
    while True:
        _left(deadline, what)
        chunk = reply.read1(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise ApiError(f"{what}: the reply is larger than {MAX_REPLY_BYTES} bytes")
        chunks.append(chunk)


__all__ = ["ApiError", "KubeApi", "quote"]
