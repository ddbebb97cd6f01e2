"""An in-memory stand-in for csi_driver.kubeapi.KubeApi, for the reconcilers' error paths:
it records every write and can fail any path (or the next N requests) like the API would."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

from csi_driver.kubeapi import ApiError

_rv = itertools.count(1)


class FakeApi:
    def __init__(self) -> None:
        #: collection path -> name -> object
        self.objects: dict[str, dict[str, dict[str, Any]]] = {}
        #: paths (prefixes) whose requests fail, with the HTTP status
        self.failing: dict[str, int] = {}
        self.writes: list[tuple[str, str, Any]] = []
        self.events: list[dict[str, Any]] = []
        #: collection path -> called before each listing of it (to change the world meanwhile)
        self.on_list: dict[str, Callable[[], object]] = {}
        #: paths a DELETE only marks (deletionTimestamp), as a finalizer would keep them
        self.finalized: set[str] = set()
        #: (path, Accept metadata-only?) of every listing
        self.lists: list[tuple[str, bool]] = []

    def put_object(self, collection: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {})["resourceVersion"] = str(next(_rv))
        self.objects.setdefault(collection, {})[obj["metadata"]["name"]] = obj
        return obj

    def _check(self, method: str, path: str) -> None:
        for prefix, status in self.failing.items():
            if path.startswith(prefix):
                raise ApiError(f"{method} {path}: HTTP {status}", status)

    def _split(self, path: str) -> tuple[str, str]:
        collection, _, name = path.rpartition("/")
        return collection, name

    def list_all(
        self, path: str, query: Any = None, timeout: float = 0, metadata_only: bool = False
    ) -> list[dict[str, Any]]:
        self._check("LIST", path)
        self.lists.append((path, metadata_only))
        hook = self.on_list.get(path)
        if hook is not None:
            hook()
        items = [copy.deepcopy(o) for o in self.objects.get(path, {}).values()]
        selector = (query or {}).get("labelSelector")
        if selector:
            key, _, value = selector.partition("=")
            items = [i for i in items if i["metadata"].get("labels", {}).get(key) == value]
        if metadata_only:
            items = [{"metadata": i["metadata"]} for i in items]
        return items

    def get(self, path: str, query: Any = None, timeout: float = 0) -> dict[str, Any]:
        self._check("GET", path)
        collection, name = self._split(path)
        if name not in self.objects.get(collection, {}):
            raise ApiError(f"GET {path}: HTTP 404", 404)
        return copy.deepcopy(self.objects[collection][name])

    def create(self, path: str, body: Any) -> dict[str, Any]:
        self._check("POST", path)
        self.writes.append(("POST", path, body))
        if path.endswith("/events"):
            self.events.append(body)
            return dict(body)
        if body["metadata"]["name"] in self.objects.get(path, {}):
            raise ApiError(f"POST {path}: HTTP 409", 409)
        return self.put_object(path, body)

    def replace(self, path: str, body: Any) -> dict[str, Any]:
        self._check("PUT", path)
        self.writes.append(("PUT", path, body))
        collection, name = self._split(path)
        current = self.objects.get(collection, {}).get(name)
        if current is None:
            raise ApiError(f"PUT {path}: HTTP 404", 404)
        if current["metadata"]["resourceVersion"] != body["metadata"].get("resourceVersion"):
            raise ApiError(f"PUT {path}: HTTP 409", 409)
        return self.put_object(collection, body)

    def merge_patch(self, path: str, body: Any) -> dict[str, Any]:
        self._check("PATCH", path)
        self.writes.append(("PATCH", path, body))
        collection, name = self._split(path)
        current = self.objects[collection][name]
        rv = body["metadata"].get("resourceVersion")
        if rv and rv != current["metadata"]["resourceVersion"]:
            raise ApiError(f"PATCH {path}: HTTP 409", 409)
        current["metadata"]["finalizers"] = body["metadata"]["finalizers"]
        return self.put_object(collection, current)

    def delete(self, path: str, uid: str | None = None) -> dict[str, Any]:
        self._check("DELETE", path)
        self.writes.append(("DELETE", path, uid))
        collection, name = self._split(path)
        current = self.objects.get(collection, {}).get(name)
        if current is None:
            raise ApiError(f"DELETE {path}: HTTP 404", 404)
        if uid and current["metadata"].get("uid") != uid:
            raise ApiError(f"DELETE {path}: HTTP 409", 409)
        if path in self.finalized:
            current["metadata"].setdefault("deletionTimestamp", "2026-01-01T00:00:00Z")
            return current
        del self.objects[collection][name]
        return current

    def deletes(self) -> list[str]:
        return [path for method, path, _ in self.writes if method == "DELETE"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
