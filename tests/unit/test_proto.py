"""The wire contract: our .proto files against the published ones, and the stubs against both.

The CSI and kubelet registration APIs are fixed by others; a renamed field or a changed number
would compile and run here yet break every real kubelet and sidecar. So the official files are
fetched at test time (Go's module proxy, the same place the Go ecosystem gets them) and both
sides are compiled to descriptors and compared element by element.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc_tools  # type: ignore[import-untyped]
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "csi_driver" / "proto"
WELL_KNOWN = Path(grpc_tools.__file__).parent / "_proto"

CSI_MODULE = "github.com/container-storage-interface/spec"
CSI_VERSION = "v1.12.0"
KUBELET_MODULE = "k8s.io/kubelet"
KUBELET_VERSION = "v0.34.2"
KUBELET_REGISTRATION_PROTO = "pkg/apis/pluginregistration/v1/api.proto"

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

# Element attributes compared through their own entries rather than as one blob.
_NESTED = {"field", "nested_type", "enum_type", "oneof_decl", "extension", "value", "method"}
_FILE_SKIP = {"name", "message_type", "enum_type", "service", "extension", "source_code_info"}


# ----------------------------------------------------------------------------- fetching


def _go() -> str:
    found = shutil.which("go") or (
        "/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None
    )
    if found is None:
        pytest.fail(
            "the Go toolchain is required to fetch the official .proto files "
            "(install Go, e.g. to /usr/local/go); this check must not be skipped"
        )
    return found


def _go_module_dir(module: str, version: str, workdir: Path) -> Path:
    """Downloads one module into Go's module cache (a no-op when already there)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    go = _go()
    if not (workdir / "go.mod").exists():
        subprocess.run(
            [go, "mod", "init", "protocheck"],
            cwd=workdir,
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
    proc = subprocess.run(
        [go, "mod", "download", "-json", f"{module}@{version}"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        info = json.loads(proc.stdout)
    except json.JSONDecodeError:
        info = {}
    if proc.returncode != 0 or "Error" in info or "Dir" not in info:
        pytest.fail(
            f"go mod download {module}@{version} failed (exit {proc.returncode}): "
            f"{info.get('Error') or proc.stderr.strip() or proc.stdout.strip()}"
        )
    return Path(info["Dir"])


@pytest.fixture(scope="module")
def official_csi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _go_module_dir(CSI_MODULE, CSI_VERSION, tmp_path_factory.mktemp("gomod"))


@pytest.fixture(scope="module")
def official_kubelet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _go_module_dir(KUBELET_MODULE, KUBELET_VERSION, tmp_path_factory.mktemp("gomod"))


# ----------------------------------------------------------------------------- compiling


def _compile(include: Path, proto: str, out_dir: Path) -> descriptor_pb2.FileDescriptorProto:
    """Compiles one .proto (with its imports) and returns the descriptor of that file."""
    out = out_dir / (re.sub(r"[^A-Za-z0-9]+", "_", proto) + ".pb")
    rc = protoc.main(
        [
            "protoc",
            f"--proto_path={include}",
            f"--proto_path={WELL_KNOWN}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            proto,
        ]
    )
    assert rc == 0, f"protoc failed on {include / proto} (its errors are on stderr above)"
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    matching = [f for f in files if f.name == proto]
    assert len(matching) == 1, f"{proto} missing from its own descriptor set"
    return matching[0]


# ----------------------------------------------------------------------------- flattening


def _wire_items(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Decodes serialized protobuf into (number, wire type, value), no schema needed.

    Options carry custom extensions; decoding the raw bytes keeps the comparison independent
    of which extensions happen to be registered in this process (importing our own csi_pb2
    would otherwise change how the official file's options print).
    """
    pos = 0

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 1:
            yield number, wire, data[pos : pos + 8]
            pos += 8
        elif wire == 2:
            size = varint()
            yield number, wire, data[pos : pos + size]
            pos += size
        elif wire == 5:
            yield number, wire, data[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire} in options")


def _options_text(options: Message, extension_names: dict[tuple[str, int], str]) -> str:
    """Renders an options message as `name(number)=value`, sorted, extensions by our map."""
    descriptor = options.DESCRIPTOR
    items = []
    for number, _wire, value in _wire_items(options.SerializeToString(deterministic=True)):
        known = descriptor.fields_by_number.get(number)
        if known is not None:
            name = known.name
        else:
            name = extension_names.get((descriptor.full_name, number), "?")
        items.append(f"{name}({number})={value!r}")
    return ", ".join(sorted(items))


class _Flattener:
    """Turns one file's descriptor into {element key: {attribute: rendered value}}."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self.file = file
        self.extension_names = {
            (ext.extendee.lstrip("."), ext.number): ext.name for ext in file.extension
        }
        self.out: dict[str, dict[str, str]] = {}

    def attrs(self, message: Message, skip: set[str] = _NESTED) -> dict[str, str]:
        rendered: dict[str, str] = {}
        for field, value in message.ListFields():
            if field.name in skip:
                continue
            if field.name == "options":
                rendered["options"] = _options_text(value, self.extension_names)
            elif field.name == "dependency":
                rendered["dependency"] = str(sorted(value))
            elif field.enum_type is not None:
                rendered[field.name] = field.enum_type.values_by_number[value].name
            else:
                rendered[field.name] = repr(value)
        return rendered

    def field(
        self, scope: str, field: descriptor_pb2.FieldDescriptorProto, oneofs: list[str]
    ) -> None:
        attrs = self.attrs(field, _NESTED | {"oneof_index"})
        if field.HasField("oneof_index"):
            attrs["oneof"] = oneofs[field.oneof_index]
        self.out[f"field {scope}.{field.name}"] = attrs

    def enum(self, scope: str, enum: descriptor_pb2.EnumDescriptorProto) -> None:
        name = f"{scope}.{enum.name}"
        self.out[f"enum {name}"] = self.attrs(enum)
        for value in enum.value:
            self.out[f"enum value {name}.{value.name}"] = self.attrs(value)

    def message(self, scope: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{scope}.{message.name}"
        self.out[f"message {name}"] = self.attrs(message)
        oneofs = [oneof.name for oneof in message.oneof_decl]
        for oneof in message.oneof_decl:
            self.out[f"oneof {name}.{oneof.name}"] = self.attrs(oneof)
        for field in message.field:
            self.field(name, field, oneofs)
        for extension in message.extension:
            self.field(name, extension, oneofs)
        for nested in message.nested_type:
            self.message(name, nested)
        for enum in message.enum_type:
            self.enum(name, enum)

    def run(self) -> dict[str, dict[str, str]]:
        scope = f".{self.file.package}" if self.file.package else ""
        self.out["file"] = self.attrs(self.file, _FILE_SKIP)
        for extension in self.file.extension:
            self.field(scope, extension, [])
        for message in self.file.message_type:
            self.message(scope, message)
        for enum in self.file.enum_type:
            self.enum(scope, enum)
        for service in self.file.service:
            self.out[f"service {scope}.{service.name}"] = self.attrs(service)
            for method in service.method:
                self.out[f"method {scope}.{service.name}.{method.name}"] = self.attrs(method)
        return self.out


def _differences(
    ours: descriptor_pb2.FileDescriptorProto, official: descriptor_pb2.FileDescriptorProto
) -> list[str]:
    mine, theirs = _Flattener(ours).run(), _Flattener(official).run()
    problems = [f"missing from ours: {key}" for key in sorted(theirs.keys() - mine.keys())]
    problems += [f"not in the official file: {key}" for key in sorted(mine.keys() - theirs.keys())]
    for key in sorted(mine.keys() & theirs.keys()):
        a, b = mine[key], theirs[key]
        for attr in sorted(a.keys() | b.keys()):
            if a.get(attr) != b.get(attr):
                problems.append(
                    f"{key}: {attr} is {a.get(attr, '<unset>')} in ours, "
                    f"{b.get(attr, '<unset>')} in the official file"
                )
    return problems


def _assert_same(
    ours: descriptor_pb2.FileDescriptorProto, official: descriptor_pb2.FileDescriptorProto
) -> None:
    problems = _differences(ours, official)
    assert not problems, f"{len(problems)} difference(s) from the official API:\n" + "\n".join(
        problems
    )


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def our_csi(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorProto:
    return _compile(REPO, "csi_driver/proto/csi.proto", tmp_path_factory.mktemp("ours"))


def test_committed_stubs_match_the_generator(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gen-proto.sh"), str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"scripts/gen-proto.sh failed:\n{proc.stderr}"
    fresh_dir = tmp_path / "csi_driver" / "proto"
    fresh = sorted(p.name for p in fresh_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES))
    committed = sorted(p.name for p in PROTO_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES))
    assert fresh == committed
    assert len(fresh) == 6

    tools = importlib.metadata.version("grpcio-tools")
    grpc_file = (PROTO_DIR / "csi_pb2_grpc.py").read_text()
    stamped = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_file)
    hint = (
        f"; the committed stubs were made by grpcio-tools {stamped.group(1) if stamped else '?'}"
        f" and {tools} is installed: pin one version or rerun scripts/gen-proto.sh"
    )
    stale = []
    for name in fresh:
        new, old = (fresh_dir / name).read_bytes(), (PROTO_DIR / name).read_bytes()
        if new != old:
            diff = difflib.unified_diff(
                old.decode().splitlines(), new.decode().splitlines(), "committed", "fresh", n=1
            )
            stale.append(f"{name}:\n" + "\n".join(list(diff)[:20]))
    assert not stale, "generated stubs are stale" + hint + "\n" + "\n".join(stale)


def test_csi_proto_equals_the_official_spec(
    official_csi_dir: Path, our_csi: descriptor_pb2.FileDescriptorProto, tmp_path: Path
) -> None:
    official = _compile(official_csi_dir, "csi.proto", tmp_path)
    _assert_same(our_csi, official)
    # Guard against comparing two empty things.
    assert {s.name for s in official.service} == {
        "Identity",
        "Controller",
        "GroupController",
        "SnapshotMetadata",
        "Node",
    }


def test_comparison_reports_each_kind_of_drift(
    our_csi: descriptor_pb2.FileDescriptorProto,
) -> None:
    """The comparison itself must catch drift, or the spec test above would prove nothing."""
    changed = descriptor_pb2.FileDescriptorProto()
    changed.CopyFrom(our_csi)
    messages = {m.name: m for m in changed.message_type}

    create = messages["CreateVolumeRequest"]
    fields = {f.name: f for f in create.field}
    fields["name"].number = 9
    fields["secrets"].ClearField("options")
    capability = {n.name: n for n in messages["VolumeCapability"].nested_type}
    capability["AccessMode"].enum_type[0].value[1].number = 42
    {f.name: f for f in messages["PluginCapability"].field}["service"].ClearField("oneof_index")
    controller = next(s for s in changed.service if s.name == "Controller")
    del controller.method[0]
    changed.message_type.add(name="Invented")

    problems = "\n".join(_differences(changed, our_csi))
    assert "field .csi.v1.CreateVolumeRequest.name: number is 9 in ours, 1" in problems
    assert "field .csi.v1.CreateVolumeRequest.secrets: options is <unset> in ours" in problems
    assert "csi_secret(1059)=1" in problems
    assert "enum value .csi.v1.VolumeCapability.AccessMode.Mode.SINGLE_NODE_WRITER" in problems
    assert "field .csi.v1.PluginCapability.service: oneof is <unset> in ours, type" in problems
    assert "missing from ours: method .csi.v1.Controller.CreateVolume" in problems
    assert "not in the official file: message .csi.v1.Invented" in problems
    assert _differences(our_csi, our_csi) == []


def test_secret_fields_carry_the_csi_secret_option() -> None:
    """Log redaction finds secrets by this option, so every secrets map must carry it."""
    from csi_driver.proto import csi_pb2

    secret_fields = []
    for message in _all_messages(csi_pb2.DESCRIPTOR.message_types_by_name.values()):
        for field in message.fields:
            # The generated .pyi types extensions loosely; the runtime lookup is what matters.
            extensions: Any = field.GetOptions().Extensions
            marked = bool(extensions[csi_pb2.csi_secret])
            assert marked == (field.name == "secrets"), field.full_name
            if marked:
                secret_fields.append(field.full_name)
    assert "csi.v1.NodeStageVolumeRequest.secrets" in secret_fields
    assert len(secret_fields) == 19


def _all_messages(messages: Iterable[Descriptor]) -> Iterator[Descriptor]:
    for message in messages:
        yield message
        yield from _all_messages(message.nested_types)


def test_stubs_import_package_absolute() -> None:
    from csi_driver.proto import csi_pb2, csi_pb2_grpc, registration_pb2_grpc

    assert csi_pb2_grpc.csi__driver_dot_proto_dot_csi__pb2 is csi_pb2
    for service in ("Identity", "Controller", "Node", "GroupController", "SnapshotMetadata"):
        assert callable(getattr(csi_pb2_grpc, f"add_{service}Servicer_to_server"))
    assert callable(registration_pb2_grpc.add_RegistrationServicer_to_server)
    request = csi_pb2.CreateVolumeRequest(name="pvc-1", secrets={"k": "v"})
    assert csi_pb2.CreateVolumeRequest.FromString(request.SerializeToString()) == request


def test_registration_proto_equals_kubelets(official_kubelet_dir: Path, tmp_path: Path) -> None:
    ours = _compile(REPO, "csi_driver/proto/registration.proto", tmp_path)
    official = _compile(
        official_kubelet_dir / Path(KUBELET_REGISTRATION_PROTO).parent, "api.proto", tmp_path
    )
    _assert_same(ours, official)


def test_registration_stub_field_numbers() -> None:
    from csi_driver.proto import registration_pb2

    numbers = {f.name: f.number for f in registration_pb2.PluginInfo.DESCRIPTOR.fields}
    assert numbers == {"type": 1, "name": 2, "endpoint": 3, "supported_versions": 4}
    status = {f.name: f.number for f in registration_pb2.RegistrationStatus.DESCRIPTOR.fields}
    assert status == {"plugin_registered": 1, "error": 2}
    service = registration_pb2.DESCRIPTOR.services_by_name["Registration"]
    assert service.full_name == "pluginregistration.Registration"
    assert {m.name: (m.input_type.name, m.output_type.name) for m in service.methods} == {
        "GetInfo": ("InfoRequest", "PluginInfo"),
        "NotifyRegistrationStatus": ("RegistrationStatus", "RegistrationStatusResponse"),
    }
