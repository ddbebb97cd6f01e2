#!/usr/bin/env bash
# Debian packages the host lanes (unit, integration, csi-sanity) use at run time, and the image
# build's (scripts/build-image.sh): buildah builds the Dockerfile without a Docker engine,
# mmdebstrap makes its local base image; openssl makes the throw-away certificates of the peer
# channel and API tests (tests/pki.py).
. "$(dirname "$0")/lib.sh"
apt_install util-linux mount e2fsprogs xfsprogs kmod ca-certificates openssl buildah mmdebstrap
