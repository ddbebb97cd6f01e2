#!/usr/bin/env bash
# Debian packages the host lanes (unit, integration, csi-sanity) use at run time.
. "$(dirname "$0")/lib.sh"
apt_install util-linux mount e2fsprogs xfsprogs kmod ca-certificates
