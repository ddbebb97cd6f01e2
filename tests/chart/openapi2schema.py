"""Turns the Kubernetes OpenAPI document (and CRD manifests) into kubeconform's schema layout.

kubeconform looks schemas up as
``<dir>/v<k8s version>-standalone-strict/<kind>-<group>-<version>.json``.
The published copies of that layout live on a web host the CI machines cannot reach, so the chart
tests build their own from the OpenAPI document that ships inside the k8s.io/kubernetes Go module
(and from the external-snapshotter CRDs for the snapshot kinds). "Strict" means every object
schema that lists its properties rejects any other property, so a misspelt field in a template
fails validation instead of being dropped silently by the API server.

Usage::

    python tests/chart/openapi2schema.py --openapi swagger.json [--crd crd.yaml ...] \
        --kubernetes-version 1.34.4 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

JsonObject = dict[str, Any]

DRAFT = "http://json-schema.org/draft-07/schema#"
REF_PREFIX = "#/definitions/"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"


def schema_file_name(group: str, version: str, kind: str) -> str:
    """The file name kubeconform derives from an object's apiVersion and kind."""
    first = group.split(".")[0] if group else version
    suffix = f"-{first}" if not group else f"-{first}-{version}"
    return f"{kind.lower()}{suffix}.json".lower()


def _tighten(node: Any) -> Any:
    """Copies a schema node, closing objects and spelling out Kubernetes' special formats."""
    if isinstance(node, list):
        return [_tighten(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: JsonObject = {key: _tighten(value) for key, value in node.items()}
    if out.get("format") == "int-or-string" or out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.pop("format", None)
        out["oneOf"] = [{"type": "string"}, {"type": "integer"}]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def _refs(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(REF_PREFIX):
            yield ref[len(REF_PREFIX) :]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _closure(roots: Iterable[str], definitions: Mapping[str, JsonObject]) -> dict[str, JsonObject]:
    """Every definition reachable from the roots, converted."""
    found: dict[str, JsonObject] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in found:
            continue
        if name not in definitions:
            raise KeyError(f"the OpenAPI document refers to {name!r} but does not define it")
        converted = _convert_definition(name, definitions[name])
        found[name] = converted
        pending.extend(_refs(converted))
    return found


def _convert_definition(name: str, definition: JsonObject) -> JsonObject:
    if name == QUANTITY:
        # Quantities are written as strings ("64Mi") or plain numbers (cpu: 1).
        return {
            "description": definition.get("description", ""),
            "oneOf": [{"type": "string"}, {"type": "number"}],
        }
    converted: JsonObject = _tighten(definition)
    converted.pop("x-kubernetes-group-version-kind", None)
    return converted


def _pin_type_meta(schema: JsonObject, api_version: str, kind: str) -> None:
    """Only this apiVersion and kind validate against this file."""
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"type": "string", "enum": [api_version]}
    props["kind"] = {"type": "string", "enum": [kind]}


def schemas_from_openapi(document: Mapping[str, Any]) -> dict[str, JsonObject]:
    """One standalone schema per (group, version, kind) of the built-in API."""
    definitions: Mapping[str, JsonObject] = document["definitions"]
    out: dict[str, JsonObject] = {}
    for name, definition in definitions.items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            group, version, kind = gvk.get("group", ""), gvk["version"], gvk["kind"]
            api_version = f"{group}/{version}" if group else version
            root = _convert_definition(name, definition)
            if "properties" not in root:
                continue
            _pin_type_meta(root, api_version, kind)
            deps = _closure(_refs(root), definitions)
            out[schema_file_name(group, version, kind)] = {
                "$schema": DRAFT,
                **root,
                "definitions": deps,
            }
    return out


def schemas_from_crds(
    crd_documents: Iterable[Mapping[str, Any]], definitions: Mapping[str, JsonObject]
) -> dict[str, JsonObject]:
    """One schema per served version of each CustomResourceDefinition.

    The CRD's own metadata schema is only ``type: object``; the built-in ObjectMeta replaces it,
    so labels and annotations are checked as they are for built-in kinds.
    """
    out: dict[str, JsonObject] = {}
    for crd in crd_documents:
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
        spec = crd["spec"]
        group, kind = spec["group"], spec["names"]["kind"]
        for version in spec["versions"]:
            if not version.get("served", False):
                continue
            raw = version.get("schema", {}).get("openAPIV3Schema")
            if raw is None:
                raise ValueError(f"CRD {crd['metadata']['name']} {version['name']} has no schema")
            root: JsonObject = _tighten(raw)
            root.setdefault("properties", {})["metadata"] = {"$ref": REF_PREFIX + OBJECT_META}
            root["additionalProperties"] = False
            _pin_type_meta(root, f"{group}/{version['name']}", kind)
            out[schema_file_name(group, version["name"], kind)] = {
                "$schema": DRAFT,
                **root,
                "definitions": _closure([OBJECT_META], definitions),
            }
    return out


def write_schemas(
    schemas: Mapping[str, JsonObject], out_dir: Path, kubernetes_version: str
) -> Path:
    """Writes the layout atomically: a half-written directory never looks complete."""
    version = kubernetes_version.removeprefix("v")
    target = out_dir / f"v{version}-standalone-strict"
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=out_dir))
    try:
        for file_name, schema in sorted(schemas.items()):
            (staging / file_name).write_text(json.dumps(schema, sort_keys=True) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--openapi", type=Path, required=True, help="swagger.json of k8s.io/kubernetes"
    )
    parser.add_argument("--crd", type=Path, action="append", default=[], help="CRD manifest (YAML)")
    parser.add_argument("--kubernetes-version", required=True, help="e.g. 1.34.4")
    parser.add_argument("--out", type=Path, required=True, help="schema root for kubeconform")
    args = parser.parse_args(argv)

    document = json.loads(args.openapi.read_text())
    schemas = schemas_from_openapi(document)
    crds: list[Mapping[str, Any]] = []
    for path in args.crd:
        crds.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    crd_schemas = schemas_from_crds(crds, document["definitions"])
    clash = schemas.keys() & crd_schemas.keys()
    if clash:
        raise SystemExit(f"CRD kinds clash with built-in kinds: {sorted(clash)}")
    schemas.update(crd_schemas)
    target = write_schemas(schemas, args.out, args.kubernetes_version)
    print(f"{len(schemas)} schemas ({len(crd_schemas)} from CRDs) in {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
