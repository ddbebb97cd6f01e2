"""Container images for the e2e cluster, built without a Docker engine or a registry.

Nothing can be pulled on the machines this lane runs on, so every image a pod uses is assembled
here as a docker-archive tarball (uncompressed layer tars, an image config and a manifest.json
naming the image) and imported into containerd's ``k8s.io`` namespace with ``ctr images import``.
Layer tars are cached under ``$CSI_CACHE_DIR/e2e-images`` keyed by what went into them, so a
warm run only re-imports.

The driver image is the Dockerfile's equivalent: a Debian bookworm root filesystem made by
mmdebstrap with bookworm's python3 (3.11, the minor of the Dockerfile's python:3.11-slim-bookworm
base) and the Dockerfile's packages (lvm2, dmsetup, thin-provisioning-tools, e2fsprogs,
xfsprogs, util-linux, mount), a virtualenv in /opt/venv with the project's runtime dependencies
as wheels from PyPI and the Dockerfile's user 65532 (base layer), and the project's wheel
installed into that virtualenv (a second layer, rebuilt when the code changes). Its entrypoint,
``/opt/venv/bin/python -m csi_driver``, is what the Dockerfile's ``csi-driver`` script runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Fixed mtime for files we synthesise, so layer digests only change with content.
_EPOCH = 0

# A registry host that resolves nowhere: these images only exist in the node's containerd.
E2E_REGISTRY = "nodelocal-csi.e2e"
PAUSE_IMAGE = f"{E2E_REGISTRY}/pause:1"
BUSYBOX_IMAGE = f"{E2E_REGISTRY}/busybox:1"
DRIVER_REPOSITORY = f"{E2E_REGISTRY}/csi-driver"

# Debian packages of the driver image: the Dockerfile's apt-get install line, plus the
# interpreter its python:3.11-slim-bookworm base brings.
DRIVER_DEBIAN_PACKAGES = (
    "python3",
    "python3-venv",
    "lvm2",
    "dmsetup",
    "thin-provisioning-tools",
    "e2fsprogs",
    "xfsprogs",
    "util-linux",
    "mount",
)
# The Dockerfile's unprivileged user (the controller runs as it; node pods set runAsUser: 0).
DRIVER_USER = "65532:65532"
DEBIAN_SUITE = "bookworm"
# bookworm's python3; the project wheel is pure Python, so installing it from the host's pip
# into this interpreter's site-packages is what pip inside the image would do.
DRIVER_IMAGE_PYTHON = "python3.11"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# Directories whose contents a container runtime provides or that only hold build leftovers.
_ROOTFS_EMPTIED = ("dev", "proc", "sys", "run", "tmp", "var/cache/apt", "var/lib/apt/lists")


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
    """One image: its reference and the layer tarballs, bottom first."""

    name: str
    layers: tuple[Path, ...]
    config: ImageConfig = field(default_factory=ImageConfig)


def cache_dir() -> Path:
    base = Path(os.environ.get("CSI_CACHE_DIR", Path.home() / ".cache" / "nodelocal-csi"))
    path = base / "e2e-images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def write_tree_layer(out: Path, root: Path, emptied: Sequence[str] = ()) -> Path:
    """Tar a directory tree (a root filesystem) as a layer, sorted, keeping owners and modes.

    The directories in ``emptied`` are kept but their contents left out.
    """
    skip = {root / e for e in emptied}

    def walk(directory: Path) -> Iterator[Path]:
        for child in sorted(directory.iterdir(), key=lambda p: p.name):
            yield child
            if child.is_dir() and not child.is_symlink() and child not in skip:
                yield from walk(child)

    with _atomic(out) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in walk(root):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
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


# ----------------------------------------------------------------------------- driver image


def build_wheel(work: Path) -> Path:
    """Build the project's wheel from a copy of its sources, leaving the checkout untouched.

    CSI_E2E_DRIVER_SRC names another source tree (a checkout with pyproject.toml) to build the
    driver image from, e.g. to try a change without touching the working copy.
    """
    src = work / "src"
    origin = Path(os.environ.get("CSI_E2E_DRIVER_SRC") or ROOT)
    shutil.copytree(
        origin / "csi_driver",
        src / "csi_driver",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    for name in ("pyproject.toml", "README.md"):
        if (origin / name).exists():
            shutil.copy2(origin / name, src / name)
    dist = work / "dist"
    # Without build isolation when setuptools is at hand: no PyPI round trip on warm runs.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            *isolation,
            "--wheel-dir",
            str(dist),
            str(src),
        ],
        check=True,
        timeout=600,
    )
    wheels = sorted(dist.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel in {dist}, found {wheels}")
    return wheels[0]


def wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's unconditional Requires-Dist lines (no extras)."""
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode())
    reqs = meta.get_all("Requires-Dist") or []
    return sorted(r for r in reqs if "extra ==" not in r)


def _download_wheels(requirements: Sequence[str], dest: Path) -> None:
    """Fetch the runtime dependencies as wheels for bookworm's CPython with the host's pip.

    pip inside the image would need the host's network settings (proxies, extra CA
    certificates); wheels for the image's interpreter and glibc, installed offline, avoid that.
    """
    platforms = [
        "manylinux2014_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux_2_28_x86_64",
        "manylinux_2_34_x86_64",
        "linux_x86_64",
    ]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            DRIVER_IMAGE_PYTHON.removeprefix("python"),
            *[f"--platform={p}" for p in platforms],
            "--dest",
            str(dest),
            *requirements,
        ],
        check=True,
        timeout=900,
    )


def _base_rootfs_layer(requirements: Sequence[str]) -> Path:
    """mmdebstrap's bookworm + the apt packages + /opt/venv with the runtime dependencies."""
    key = _key(DEBIAN_SUITE, *DRIVER_DEBIAN_PACKAGES, *requirements)
    out = cache_dir() / f"driver-base-{key}.tar"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(prefix="e2e-rootfs-", dir=cache_dir()) as tmp:
        rootfs, wheels = Path(tmp) / "rootfs", Path(tmp) / "wheels"
        _download_wheels(requirements, wheels)
        reqs = " ".join(f"'{r}'" for r in requirements)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        subprocess.run(
            [
                "mmdebstrap",
                "--mode=root",
                "--variant=minbase",
                "--quiet",
                f"--include={','.join(DRIVER_DEBIAN_PACKAGES)}",
                f"--customize-hook=copy-in {wheels} /tmp",
                '--customize-hook=chroot "$1" python3 -m venv /opt/venv',
                '--customize-hook=chroot "$1" /opt/venv/bin/pip install --quiet --no-index '
                f"--no-cache-dir --find-links /tmp/wheels {reqs}",
                '--customize-hook=rm -rf "$1/tmp/wheels"',
                DEBIAN_SUITE,
                str(rootfs),
                DEBIAN_MIRROR,
            ],
            check=True,
            timeout=1800,
            env=env,
        )
        write_tree_layer(out, rootfs, _ROOTFS_EMPTIED)
    return out


def _app_layer(wheel: Path) -> Path:
    """The project wheel installed into the base image's virtualenv, as its own layer."""
    out = cache_dir() / f"driver-app-{_key(_sha256_file(wheel))}.tar"
    if out.exists():
        return out
    py = DRIVER_IMAGE_PYTHON
    with tempfile.TemporaryDirectory(prefix="e2e-app-") as tmp:
        stage = Path(tmp)
        site = stage / "opt" / "venv" / "lib" / py / "site-packages"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--no-compile",
                "--target",
                str(site),
                str(wheel),
            ],
            check=True,
            timeout=600,
        )
        shutil.rmtree(site / "bin", ignore_errors=True)
        write_tree_layer(out, stage)
    return out


def driver_image(tag: str) -> Image:
    """The driver image, the Dockerfile's equivalent (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="e2e-wheel-") as tmp:
        wheel = build_wheel(Path(tmp))
        base = _base_rootfs_layer(wheel_requirements(wheel))
        app = _app_layer(wheel)
    return Image(
        f"{DRIVER_REPOSITORY}:{tag}",
        (base, app),
        ImageConfig(
            entrypoint=("/opt/venv/bin/python", "-m", "csi_driver"),
            env=(
                "PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "PYTHONUNBUFFERED=1",
                "PYTHONDONTWRITEBYTECODE=1",
            ),
            user=DRIVER_USER,
        ),
    )


# ----------------------------------------------------------------------------- import


def import_images(import_argv: Sequence[str], images: Iterable[Image], work: Path) -> list[str]:
    """Write each image as a docker archive under work and import it with ``import_argv``
    (``ctr ... images import [flags]``) + the archive; return the names."""
    names = []
    for image in images:
        archive = work / f"{_key(image.name)}.tar"
        write_docker_archive(archive, image)
        res = subprocess.run(
            [*import_argv, str(archive)], capture_output=True, text=True, timeout=600
        )
        if res.returncode != 0:
            raise RuntimeError(f"importing {image.name} failed: {res.stderr.strip()}")
        archive.unlink()
        names.append(image.name)
    return names
