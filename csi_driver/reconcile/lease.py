"""Leader election through a ``coordination.k8s.io/v1`` Lease, so that of several controller
replicas one reconciles at a time.

The same protocol as the kubernetes-csi sidecars': the holder renews ``renewTime`` every
:attr:`LeaderElection.retry_period`; another candidate takes the Lease over once it has seen
the record unchanged for ``leaseDurationSeconds`` on its own monotonic clock (clocks of two
machines are never compared). Every write is a PUT carrying the resourceVersion that was
read, so two candidates cannot both win: the API answers the second with 409. A leader that
has not renewed for :attr:`LeaderElection.renew_deadline` stops acting before another can
take over (:meth:`LeaderElection.leading`).

:meth:`LeaderElection.step` runs on a thread of its own (start.py), never inside a round, so a
slow round cannot miss a renewal; the round threads only read :meth:`LeaderElection.leading`.
After :meth:`LeaderElection.release` the candidate never writes the Lease again.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from csi_driver.kubeapi import ApiError, KubeApi, quote

log = logging.getLogger(__name__)


def _micro_time() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElection:
    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: int = 15,
        clock: Callable[[], float] = time.monotonic,
        stamp: Callable[[], str] = _micro_time,
    ) -> None:
        self._api = api
        self._path = (
            f"/apis/coordination.k8s.io/v1/namespaces/{quote(namespace)}/leases/{quote(name)}"
        )
        self._collection = f"/apis/coordination.k8s.io/v1/namespaces/{quote(namespace)}/leases"
        self._namespace, self._name = namespace, name
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_deadline = lease_seconds * 2 / 3
        self.retry_period = lease_seconds / 5
        self._clock = clock
        self._stamp = stamp
        self._renewed_at: float | None = None
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._lock = threading.Lock()
        self._closed = False

    def leading(self) -> bool:
        """True while the last renewal is recent enough that nobody else can hold the Lease."""
        return (
            self._renewed_at is not None and self._clock() - self._renewed_at < self.renew_deadline
        )

    def step(self) -> bool:
        """Acquire or renew once; whether this process leads now."""
        with self._lock:
            if self._closed:
                return False
            return self._step()

    def _step(self) -> bool:
        now = self._clock()
        try:
            lease = self._api.get(self._path)
        except ApiError as exc:
            if exc.status != 404:
                log.warning("cannot read the leader lease", extra={"error": str(exc)})
                return self.leading()
            return self._create(now)
        spec = lease.get("spec") if isinstance(lease.get("spec"), dict) else {}
        assert isinstance(spec, dict)
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = spec.get("leaseDurationSeconds")
        duration = duration if isinstance(duration, int) and duration > 0 else self.lease_seconds
        if holder != self.identity and holder and now - self._observed_at < duration:
            self._renewed_at = None
            return False
        return self._write(lease, spec, holder, now)

    def _body(self, spec: dict[str, Any], taking: bool) -> dict[str, Any]:
        stamp = self._stamp()
        new = {
            **spec,
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.lease_seconds,
            "renewTime": stamp,
        }
        if taking:
            new["acquireTime"] = stamp
            transitions = spec.get("leaseTransitions")
            new["leaseTransitions"] = (transitions if isinstance(transitions, int) else 0) + 1
        return new

    def _create(self, now: float) -> bool:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self._name, "namespace": self._namespace},
            "spec": {**self._body({}, taking=True), "leaseTransitions": 0},
        }
        try:
            self._api.create(self._collection, body)
        except ApiError as exc:
            log.info("leader lease not created", extra={"error": str(exc)})
            return False
        return self._won(now, taking=True)

    def _write(self, lease: dict[str, Any], spec: dict[str, Any], holder: str, now: float) -> bool:
        taking = holder != self.identity
        body = {**lease, "spec": self._body(spec, taking)}
        try:
            self._api.replace(self._path, body)
        except ApiError as exc:
            if exc.status != 409:
                log.warning("cannot write the leader lease", extra={"error": str(exc)})
            return self.leading() if not taking else False
        return self._won(now, taking)

    def _won(self, now: float, taking: bool) -> bool:
        if taking or self._renewed_at is None:
            log.info("leading the reconcilers", extra={"lease": self._name, "id": self.identity})
        self._renewed_at = now
        return True

    def release(self) -> None:
        """Give the Lease up at shutdown, so the next replica need not wait out its duration;
        no write of this candidate follows."""
        with self._lock:
            self._closed = True
            if not self.leading():
                return
            self._renewed_at = None
            self._give_up()

    def _give_up(self) -> None:
        try:
            lease = self._api.get(self._path)
            spec = lease.get("spec")
            if isinstance(spec, dict) and spec.get("holderIdentity") == self.identity:
                self._api.replace(
                    self._path, {**lease, "spec": {**spec, "holderIdentity": "", "renewTime": None}}
                )
        except ApiError as exc:
            log.info("leader lease not released", extra={"error": str(exc)})


__all__ = ["LeaderElection"]
