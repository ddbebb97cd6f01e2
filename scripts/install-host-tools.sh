#!/usr/bin/env bash
# Debian packages the host lanes (unit, integration, csi-sanity) use at run time, and the image
# build's (scripts/build-image.sh): buildah builds the Dockerfile without a Docker engine,
# mmdebstrap makes its local base image.
. "$(dirname "$0")/lib.sh"
apt_install util-linux mount e2fsprogs xfsprogs kmod ca-certificates buildah mmdebstrap
