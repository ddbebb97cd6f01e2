"""What the reconcilers read from API objects, each field checked: API objects are input like
any other, and a field of an unexpected shape makes the object one the reconcilers leave alone
(None), never one they act on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def name_of(obj: dict[str, Any]) -> str:
    return _str(_dict(obj.get("metadata")).get("name"))


def node_ids(nodes: list[dict[str, Any]], topology_key: str) -> set[str] | None:
    """The node ids the listed Nodes stand for: each Node's name and the value of its
    ``topology_key`` label (the driver's --node-id, which the node plugin reports as its
    topology and the provisioner writes into each PV's node affinity; it equals the Node's
    name only when the chart passes that). None when a Node has no name: a listing of that
    shape decides nothing."""
    ids: set[str] = set()
    for node in nodes:
        meta = _dict(node.get("metadata"))
        name = _str(meta.get("name"))
        if not name:
            return None
        ids.add(name)
        label = _str(_dict(meta.get("labels")).get(topology_key))
        if label:
            ids.add(label)
    return ids


@dataclass(frozen=True)
class Ref:
    """An object an Event is about, or that a write is conditioned on."""

    kind: str
    name: str
    uid: str
    namespace: str = ""
    api_version: str = "v1"


@dataclass(frozen=True)
class PvFacts:
    name: str
    uid: str
    resource_version: str
    driver: str
    handle: str
    #: the one node the PV's required node affinity names by ``topology_key``, or "" when it
    #: names none or several (such a PV is never acted on)
    node: str
    phase: str
    reclaim_policy: str
    claim: Ref | None
    finalizers: tuple[str, ...]
    deleting: bool

    @property
    def ref(self) -> Ref:
        return Ref("PersistentVolume", self.name, self.uid)


def pv_facts(pv: dict[str, Any], topology_key: str) -> PvFacts | None:
    """The facts of one PersistentVolume list item, or None for one that is not a CSI PV."""
    meta, spec = _dict(pv.get("metadata")), _dict(pv.get("spec"))
    csi = _dict(spec.get("csi"))
    name, uid, handle = _str(meta.get("name")), _str(meta.get("uid")), _str(csi.get("volumeHandle"))
    if not name or not uid or not handle:
        return None
    claim_ref = _dict(spec.get("claimRef"))
    claim = None
    if _str(claim_ref.get("name")) and _str(claim_ref.get("namespace")):
        claim = Ref(
            "PersistentVolumeClaim",
            claim_ref["name"],
            _str(claim_ref.get("uid")),
            claim_ref["namespace"],
        )
    finalizers = meta.get("finalizers")
    return PvFacts(
        name=name,
        uid=uid,
        resource_version=_str(meta.get("resourceVersion")),
        driver=_str(csi.get("driver")),
        handle=handle,
        node=affinity_node(spec, topology_key),
        phase=_str(_dict(pv.get("status")).get("phase")),
        reclaim_policy=_str(spec.get("persistentVolumeReclaimPolicy")),
        claim=claim,
        finalizers=tuple(f for f in finalizers if isinstance(f, str))
        if isinstance(finalizers, list)
        else (),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def affinity_node(spec: dict[str, Any], topology_key: str) -> str:
    """The node named by ``topology_key In [node]`` in the PV's required node affinity, when
    every term names the same single node (what the provisioner writes); "" otherwise."""
    required = _dict(_dict(spec.get("nodeAffinity")).get("required"))
    terms = required.get("nodeSelectorTerms")
    if not isinstance(terms, list) or not terms:
        return ""
    named: set[str] = set()
    for term in terms:
        expressions = _dict(term).get("matchExpressions")
        found = [
            e
            for e in (expressions if isinstance(expressions, list) else [])
            if isinstance(e, dict) and e.get("key") == topology_key
        ]
        if len(found) != 1 or found[0].get("operator") != "In":
            return ""
        values = found[0].get("values")
        if not isinstance(values, list) or len(values) != 1 or not _str(values[0]):
            return ""
        named.add(values[0])
    return named.pop() if len(named) == 1 else ""


__all__ = ["PvFacts", "Ref", "affinity_node", "name_of", "node_ids", "pv_facts"]
