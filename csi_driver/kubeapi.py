"""Reading the Kubernetes API from inside a Pod: GET only, with the Pod's service account.

The driver reads one thing from the API (where each node's plugin Pod listens, for the peer
channel, docs/deploy.md), so it carries no client library: the in-cluster configuration is the
``KUBERNETES_SERVICE_HOST``/``_PORT`` environment, the CA bundle and the token the kubelet
mounts under ``/var/run/secrets/kubernetes.io/serviceaccount``. The token is read again for
every request (the kubelet rotates projected tokens); replies are bounded in size and in total
time; redirects are not followed and proxies are not used (the token goes to the API only).
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
TIMEOUT = 10.0


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
        self, path: str, query: Mapping[str, str] | None = None, timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        """The JSON object at ``path`` (its parts already quoted by the caller). ``timeout``
        (at most TIMEOUT) bounds the whole exchange: see :func:`_read_until`."""
        deadline = time.monotonic() + min(timeout, TIMEOUT)
        url = self._base + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
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
        request = urllib.request.Request(  # noqa: S310 (https only: __init__)
            url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
        )
        try:
            with opener.open(request, timeout=_left(deadline, path)) as reply:
                body = _read_until(reply, deadline, path)
        except urllib.error.HTTPError as exc:
            detail = exc.read(4096).decode("utf-8", "replace") if exc.fp else ""
            raise ApiError(f"GET {path}: HTTP {exc.code}: {cap_message(detail)}", exc.code) from exc
        except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
            raise ApiError(f"GET {path}: {cap_message(str(exc))}") from exc
        try:
            parsed = json.loads(body)
        except ValueError as exc:
            raise ApiError(f"GET {path}: the reply is not JSON") from exc
        if not isinstance(parsed, dict):
            raise ApiError(f"GET {path}: the reply is not a JSON object")
        return parsed


def _left(deadline: float, path: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ApiError(f"GET {path}: no answer in time")
    return left


def _read_until(reply: Any, deadline: float, path: str) -> bytes:
    """The body, at most MAX_REPLY_BYTES, by ``deadline``: the deadline is checked between
    reads and each read waits at most the socket timeout the request was opened with (the
    time that was left then), so a server dripping bytes holds the caller at most twice the
    timeout."""
    chunks: list[bytes] = []
    size = 0
    while True:
        _left(deadline, path)
        chunk = reply.read1(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise ApiError(f"GET {path}: the reply is larger than {MAX_REPLY_BYTES} bytes")
        chunks.append(chunk)


__all__ = ["ApiError", "KubeApi"]
