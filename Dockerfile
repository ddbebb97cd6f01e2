# syntax=docker/dockerfile:1
#
# The driver image. One image serves both halves of the deployment: the node plugin (DaemonSet,
# runs privileged as root: it mounts, formats and drives lvm2) and the controller (Deployment,
# runs as the unprivileged user this image defaults to).
#
#   docker build -t nodelocal-csi/csi-driver:0.1.0 .
#   docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm@sha256:<digest> ...   # pin a digest
#   make image    # no Docker: buildah builds this file into dist/csi-driver-<version>.oci.tar
#
# The e2e lane runs the image this file builds (scripts/build-image.sh, with a local Debian
# bookworm + python3.11 base as BASE_IMAGE, since no registry is reachable there).
#
# Both stages use the same base so the wheels built in the first stage match the interpreter
# (and libc) of the second.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY csi_driver ./csi_driver
# The gRPC stubs are generated into the source tree and committed; a tree without them would
# build an image that fails at its first import.
RUN test -f csi_driver/proto/csi_pb2.py && test -f csi_driver/proto/registration_pb2.py \
    || { echo "csi_driver/proto/*_pb2.py missing: generate the stubs before building" >&2; exit 1; }
# The project's wheel and wheels of all its runtime dependencies (grpcio, protobuf, ...), so the
# runtime stage installs offline and carries no compiler or build tool.
RUN pip wheel --wheel-dir /wheels .

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="nodelocal-csi" \
      org.opencontainers.image.description="CSI driver for node-local volumes from LVM volume groups or host directories" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# Only what the driver runs at run time:
#   lvm2 (+ dmsetup)              logical volumes, thin pools, snapshots
#   thin-provisioning-tools       thin_check, which lvm2 runs when it activates a thin pool
#   e2fsprogs, xfsprogs           mkfs, resize2fs/xfs_growfs, fsck, xfs_quota, project ids
#   util-linux, mount             mount/umount, findmnt, blkid, losetup, nsenter, blockdev
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        lvm2 \
        dmsetup \
        thin-provisioning-tools \
        e2fsprogs \
        xfsprogs \
        util-linux \
        mount \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels csi-driver \
    && csi-driver --help >/dev/null
# The controller runs as this user; the node DaemonSet sets runAsUser: 0 and privileged.
RUN groupadd --system --gid 65532 csi \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin csi
USER 65532:65532
ENTRYPOINT ["csi-driver"]
