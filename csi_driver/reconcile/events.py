"""Events on the objects the reconcilers find something about, so ``kubectl describe`` on the
PV, the PVC or the Node shows it. An Event that cannot be written is logged and dropped: the
log line and the metric carry the same finding."""

from __future__ import annotations

import datetime
import logging
import secrets
from collections.abc import Callable

from csi_driver.bounded import cap_message
from csi_driver.kubeapi import ApiError, KubeApi, quote
from csi_driver.reconcile.objects import Ref

log = logging.getLogger(__name__)

#: where Events about cluster-scoped objects (PVs, Nodes) go, as kubectl looks for them
CLUSTER_EVENTS_NAMESPACE = "default"
#: an object name (a DNS subdomain) is at most this long; the Event's is the object's, cut
#: short enough for the random suffix
MAX_NAME = 253
_SUFFIX_HEX = 16


def event_name(about: str) -> str:
    stem = about[: MAX_NAME - _SUFFIX_HEX - 1].rstrip(".-")
    return f"{stem}.{secrets.token_hex(_SUFFIX_HEX // 2)}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reporter:
    def __init__(
        self, api: KubeApi, component: str, host: str, now: Callable[[], str] = _now
    ) -> None:
        self._api = api
        self._component = component
        self._host = host
        self._now = now

    def event(self, about: Ref, reason: str, message: str, warning: bool = True) -> bool:
        namespace = about.namespace or CLUSTER_EVENTS_NAMESPACE
        stamp = self._now()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": event_name(about.name),
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": about.api_version,
                "kind": about.kind,
                "name": about.name,
                "namespace": about.namespace,
                "uid": about.uid,
            },
            "reason": reason,
            "message": cap_message(message),
            "type": "Warning" if warning else "Normal",
            "source": {"component": self._component, "host": self._host},
            "reportingComponent": self._component,
            "reportingInstance": self._host,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self._api.create(f"/api/v1/namespaces/{quote(namespace)}/events", body)
        except ApiError as exc:
            log.warning(
                "cannot record an event",
                extra={"reason": reason, "object": f"{about.kind}/{about.name}", "error": str(exc)},
            )
            return False
        return True


__all__ = ["CLUSTER_EVENTS_NAMESPACE", "Reporter", "event_name"]
