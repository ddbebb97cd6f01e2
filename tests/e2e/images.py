"""Container images for the e2e cluster, without a Docker engine or a registry.

Nothing can be pulled on the machines this lane runs on, so every image a pod uses is brought
into containerd's ``k8s.io`` namespace with ``ctr images import``:

- the driver: the image users build, from the repository's own Dockerfile. scripts/build-image.sh
  builds it with buildah and writes an OCI archive (test-e2e.sh runs it and passes the path in
  ``CSI_E2E_DRIVER_ARCHIVE``); that archive is imported as it is, under the name it carries,
  and :class:`OciArchive` reads the digests the tests compare with what the pods run;
- the pause, test and sidecar images, which are not the project's: assembled here as
  docker-archive tarballs (uncompressed layer tars, an image config, a manifest.json naming the
  image) from Debian's busybox-static and the sidecars' static binaries. Their layer tars are
  cached under ``$CSI_CACHE_DIR/e2e-images`` keyed by what went into them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fixed mtime for files we synthesise, so layer digests only change with content.
_EPOCH = 0

# A registry host that resolves nowhere: these images only exist in the node's containerd.
E2E_REGISTRY = "nodelocal-csi.e2e"
PAUSE_IMAGE = f"{E2E_REGISTRY}/pause:1"
BUSYBOX_IMAGE = f"{E2E_REGISTRY}/busybox:1"


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an OCI image config the kubelet and containerd read."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    working_dir: str = "/"
    user: str = ""


@dataclass(frozen=True)
class Image:
    """One image: its reference and the layer tarballs, bottom first; or, with ``archive``, an
    image someone else wrote (an OCI or docker archive that names it), imported as it is."""

    name: str
    layers: tuple[Path, ...]
    config: ImageConfig = field(default_factory=ImageConfig)
    archive: Path | None = None


@dataclass(frozen=True)
class OciArchive:
    """An image as ``buildah push ... oci-archive:`` writes it (one manifest): the name it
    carries and the two digests that identify it, the manifest's (what containerd's image record
    points at) and the config's (the image id, which a Pod's status reports as ``imageID``)."""

    path: Path
    name: str
    manifest_digest: str
    config_digest: str

    @classmethod
    def read(cls, path: Path) -> OciArchive:
        with tarfile.open(path) as tar:

            def blob(member: str) -> dict[str, Any]:
                f = tar.extractfile(member)
                if f is None:
                    raise ValueError(f"{path}: no file {member}")
                doc: dict[str, Any] = json.load(f)
                return doc

            manifests = blob("index.json")["manifests"]
            if len(manifests) != 1:
                raise ValueError(f"{path}: expected one image, the index lists {len(manifests)}")
            desc = manifests[0]
            name = desc.get("annotations", {}).get("org.opencontainers.image.ref.name", "")
            if "/" not in name or ":" not in name.rpartition("/")[2]:
                raise ValueError(f"{path}: the image carries no full name:tag ({name!r})")
            algo, _, hexdigest = desc["digest"].partition(":")
            manifest = blob(f"blobs/{algo}/{hexdigest}")
        return cls(path, name, desc["digest"], manifest["config"]["digest"])

    @property
    def repository(self) -> str:
        return self.name.rpartition(":")[0]

    @property
    def tag(self) -> str:
        return self.name.rpartition(":")[2]

    def image(self) -> Image:
        return Image(self.name, (), archive=self.path)


def cache_dir() -> Path:
    base = Path(os.environ.get("CSI_CACHE_DIR", Path.home() / ".cache" / "nodelocal-csi"))
    path = base / "e2e-images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _key(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of path that replaces it only when the block succeeds."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- layer writers


@dataclass(frozen=True)
class Entry:
    """A file, directory or symlink to put into a synthesised layer."""

    path: str
    source: Path | None = None
    data: bytes | None = None
    link: str | None = None
    mode: int = 0o755
    is_dir: bool = False


def _tarinfo(entry: Entry) -> tuple[tarfile.TarInfo, io.BufferedIOBase | io.BytesIO | None]:
    info = tarfile.TarInfo(entry.path.lstrip("/"))
    info.mtime = _EPOCH
    info.uid = info.gid = 0
    info.mode = entry.mode
    if entry.is_dir:
        info.type = tarfile.DIRTYPE
        return info, None
    if entry.link is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = entry.link
        info.mode = 0o777
        return info, None
    if entry.data is not None:
        info.size = len(entry.data)
        return info, io.BytesIO(entry.data)
    assert entry.source is not None
    info.size = entry.source.stat().st_size
    return info, entry.source.open("rb")


def write_entries_layer(out: Path, entries: Iterable[Entry]) -> Path:
    """Write entries (parents first) as an uncompressed layer tar."""
    with _atomic(out) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info, fileobj = _tarinfo(entry)
            try:
                tar.addfile(info, fileobj)
            finally:
                if fileobj is not None:
                    fileobj.close()
    return out


def write_docker_archive(out: Path, image: Image) -> Path:
    """Write image as a docker-archive tarball (what ``docker save`` makes) for ctr to import."""
    diff_ids = [f"sha256:{_sha256_file(layer)}" for layer in image.layers]
    cfg = image.config
    config_doc: dict[str, object] = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": list(cfg.env),
            "Entrypoint": list(cfg.entrypoint) or None,
            "Cmd": list(cfg.cmd) or None,
            "WorkingDir": cfg.working_dir,
            "User": cfg.user,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "tests/e2e/images.py"} for _ in image.layers],
    }
    config_bytes = json.dumps(config_doc, sort_keys=True).encode()
    config_name = f"{hashlib.sha256(config_bytes).hexdigest()}.json"
    layer_names = [f"{d.removeprefix('sha256:')}/layer.tar" for d in diff_ids]
    manifest = [{"Config": config_name, "RepoTags": [image.name], "Layers": layer_names}]
    with _atomic(out) as tmp, tarfile.open(tmp, "w") as tar:
        for name, data in (
            (config_name, config_bytes),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = _EPOCH
            tar.addfile(info, io.BytesIO(data))
        for layer, name in zip(image.layers, layer_names, strict=True):
            tar.add(layer, arcname=name, recursive=False)
    return out


# ----------------------------------------------------------------------------- the images


def _busybox_binary() -> Path:
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if candidate.is_file():
            return candidate
    raise RuntimeError("busybox-static is not installed (scripts/install-cluster.sh installs it)")


def busybox_layer() -> Path:
    """/bin/busybox with a symlink per applet: the pause and test images' only layer."""
    binary = _busybox_binary()
    out = cache_dir() / f"busybox-{_key(_sha256_file(binary))}.tar"
    if out.exists():
        return out
    applets = subprocess.run(
        [str(binary), "--list"], check=True, capture_output=True, text=True, timeout=30
    ).stdout.split()
    entries = [
        Entry("bin", is_dir=True),
        Entry("tmp", is_dir=True, mode=0o1777),
        Entry("etc", is_dir=True),
        Entry(
            "etc/passwd",
            data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
        ),
        Entry("etc/group", data=b"root:x:0:\nnogroup:x:65534:\n", mode=0o644),
        Entry("bin/busybox", source=binary),
    ]
    entries += [Entry(f"bin/{a}", link="busybox") for a in sorted(set(applets)) if a != "busybox"]
    return write_entries_layer(out, entries)


def pause_image() -> Image:
    # The sandbox only has to hold the namespaces; containerd stops it with SIGKILL.
    return Image(
        PAUSE_IMAGE,
        (busybox_layer(),),
        ImageConfig(entrypoint=("/bin/busybox", "sleep", "2147483647")),
    )


def busybox_image() -> Image:
    return Image(BUSYBOX_IMAGE, (busybox_layer(),), ImageConfig(cmd=("/bin/sh",)))


def binary_image(name: str, binary: Path) -> Image:
    """A scratch image around one static Go binary (the sidecars)."""
    out = cache_dir() / f"bin-{binary.name}-{_key(_sha256_file(binary))}.tar"
    if not out.exists():
        write_entries_layer(
            out,
            [
                Entry("tmp", is_dir=True, mode=0o1777),
                Entry(binary.name, source=binary),
            ],
        )
    return Image(name, (out,), ImageConfig(entrypoint=(f"/{binary.name}",), env=()))


# ----------------------------------------------------------------------------- import


def import_images(import_argv: Sequence[str], images: Iterable[Image], work: Path) -> list[str]:
    """Import each image with ``import_argv`` (``ctr ... images import [flags]``) + an archive:
    its own archive, or a docker archive written under work; return the names."""
    names = []
    for image in images:
        archive = image.archive or write_docker_archive(work / f"{_key(image.name)}.tar", image)
        res = subprocess.run(
            [*import_argv, str(archive)], capture_output=True, text=True, timeout=600
        )
        if res.returncode != 0:
            raise RuntimeError(f"importing {image.name} failed: {res.stderr.strip()}")
        if image.archive is None:
            archive.unlink()
        names.append(image.name)
    return names
