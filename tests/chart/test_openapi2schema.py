"""The OpenAPI-to-kubeconform converter on small, hand-made documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.chart import openapi2schema as conv

META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"

DOCUMENT: dict[str, Any] = {
    "definitions": {
        META: {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {
            "type": "string",
            "format": "int-or-string",
        },
        conv.QUANTITY: {"type": "string", "description": "a quantity"},
        "io.example.v1.Port": {
            "type": "object",
            "properties": {
                "port": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.util.intstr.IntOrString"},
                "size": {"$ref": f"#/definitions/{conv.QUANTITY}"},
                "inner": {"$ref": "#/definitions/io.example.v1.Port"},
            },
        },
        "io.example.v1.Widget": {
            "type": "object",
            "required": ["spec"],
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"$ref": f"#/definitions/{META}"},
                "spec": {"$ref": "#/definitions/io.example.v1.Port"},
            },
            "x-kubernetes-group-version-kind": [
                {"group": "widgets.example.io", "version": "v1", "kind": "Widget"}
            ],
        },
        "io.k8s.api.core.v1.Thing": {
            "type": "object",
            "properties": {"apiVersion": {"type": "string"}},
            "x-kubernetes-group-version-kind": [{"group": "", "version": "v1", "kind": "Thing"}],
        },
    }
}


@pytest.mark.parametrize(
    ("group", "version", "kind", "name"),
    [
        ("", "v1", "ConfigMap", "configmap-v1.json"),
        ("apps", "v1", "DaemonSet", "daemonset-apps-v1.json"),
        ("storage.k8s.io", "v1", "CSIDriver", "csidriver-storage-v1.json"),
        (
            "snapshot.storage.k8s.io",
            "v1",
            "VolumeSnapshotClass",
            "volumesnapshotclass-snapshot-v1.json",
        ),
    ],
)
def test_file_names_follow_kubeconform(group: str, version: str, kind: str, name: str) -> None:
    assert conv.schema_file_name(group, version, kind) == name


def test_builtin_kinds_become_closed_standalone_schemas() -> None:
    schemas = conv.schemas_from_openapi(DOCUMENT)
    assert set(schemas) == {"widget-widgets-v1.json", "thing-v1.json"}
    widget = schemas["widget-widgets-v1.json"]
    assert widget["additionalProperties"] is False
    assert widget["required"] == ["spec"]
    assert widget["properties"]["apiVersion"]["enum"] == ["widgets.example.io/v1"]
    assert widget["properties"]["kind"]["enum"] == ["Widget"]
    port = widget["definitions"]["io.example.v1.Port"]
    assert port["additionalProperties"] is False
    assert widget["definitions"]["io.k8s.apimachinery.pkg.util.intstr.IntOrString"]["oneOf"] == [
        {"type": "string"},
        {"type": "integer"},
    ]
    assert {"type": "number"} in widget["definitions"][conv.QUANTITY]["oneOf"]
    # maps keep their open value schema
    assert widget["definitions"][META]["properties"]["labels"]["additionalProperties"] == {
        "type": "string"
    }
    assert schemas["thing-v1.json"]["properties"]["apiVersion"]["enum"] == ["v1"]
    assert "definitions" in schemas["thing-v1.json"]


def test_dangling_reference_is_an_error() -> None:
    broken = json.loads(json.dumps(DOCUMENT))
    del broken["definitions"]["io.example.v1.Port"]
    with pytest.raises(KeyError, match=r"io\.example\.v1\.Port"):
        conv.schemas_from_openapi(broken)


CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "gadgets.things.example.io"},
    "spec": {
        "group": "things.example.io",
        "names": {"kind": "Gadget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "metadata": {"type": "object"},
                            "size": {"x-kubernetes-int-or-string": True},
                            "free": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": True,
                                "properties": {"a": {"type": "string"}},
                            },
                            "note": {"type": "string", "nullable": True},
                        },
                    }
                },
            },
            {"name": "v1beta1", "served": False, "schema": {"openAPIV3Schema": {"type": "object"}}},
        ],
    },
}


def test_crds_become_closed_schemas_with_object_meta() -> None:
    schemas = conv.schemas_from_crds([CRD], DOCUMENT["definitions"])
    assert set(schemas) == {"gadget-things-v1.json"}
    gadget = schemas["gadget-things-v1.json"]
    assert gadget["additionalProperties"] is False
    assert gadget["properties"]["metadata"] == {"$ref": f"#/definitions/{META}"}
    assert META in gadget["definitions"]
    assert gadget["properties"]["size"]["oneOf"] == [{"type": "string"}, {"type": "integer"}]
    assert "additionalProperties" not in gadget["properties"]["free"]
    assert gadget["properties"]["note"]["type"] == ["string", "null"]
    assert gadget["properties"]["apiVersion"]["enum"] == ["things.example.io/v1"]


def test_write_replaces_the_version_directory_whole(tmp_path: Path) -> None:
    conv.write_schemas({"a-v1.json": {"type": "object"}}, tmp_path, "1.2.3")
    target = conv.write_schemas({"b-v1.json": {"type": "object"}}, tmp_path, "v1.2.3")
    assert target == tmp_path / "v1.2.3-standalone-strict"
    assert sorted(p.name for p in target.iterdir()) == ["b-v1.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1.2.3-standalone-strict"]
