#!/usr/bin/env bash
# Builds the Kubernetes CSI sidecars the chart deploys, at the releases its image tags name, from
# the Go module proxy through our tools module (tools/sidecars), into
# ${CSI_CACHE_DIR:-$HOME/.cache/nodelocal-csi}/bin:
#   csi-provisioner  csi-attacher  csi-resizer  csi-snapshotter  snapshot-controller
# Idempotent: a binary is rebuilt only when tools/sidecars/go.mod or go.sum changed.
#
# csi-node-driver-registrar and livenessprobe cannot be built this way: their modules
# (github.com/kubernetes-csi/node-driver-registrar, .../livenessprobe) are published without the
# /v2 suffix their v2.x tags need, so the module proxy has no release of them to serve. Put
# binaries of the chart's pinned releases (v2.17.0 and v2.19.0) into the bin directory yourself;
# this script reports whether they are there (--require-all makes their absence an error).
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODULE_DIR="$REPO_DIR/tools/sidecars"
CACHE_DIR="${CSI_CACHE_DIR:-$HOME/.cache/nodelocal-csi}"
BIN_DIR="$CACHE_DIR/bin"
STAMP_DIR="$CACHE_DIR/stamps"
REQUIRE_ALL=0
[ "${1:-}" = "--require-all" ] && REQUIRE_ALL=1
mkdir -p "$BIN_DIR" "$STAMP_DIR"

if ! command -v go >/dev/null 2>&1; then
    if [ -x /usr/local/go/bin/go ]; then
        PATH="/usr/local/go/bin:$PATH"
    else
        echo "install-sidecars: go is not installed" >&2
        exit 1
    fi
fi
export GOFLAGS="-mod=mod"
export CGO_ENABLED=0

# binary  main package  release (stamped into the binary's version, as the sidecars' releases do)
SIDECARS=(
    "csi-provisioner github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner v6.3.0"
    "csi-attacher github.com/kubernetes-csi/external-attacher/v4/cmd/csi-attacher v4.12.0"
    "csi-resizer github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer v2.2.0"
    "csi-snapshotter github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter v8.6.0"
    "snapshot-controller github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller v8.6.0"
)

module_hash="$(cat "$MODULE_DIR/go.mod" "$MODULE_DIR/go.sum" | sha256sum | cut -d' ' -f1)"
for entry in "${SIDECARS[@]}"; do
    read -r name package version <<<"$entry"
    stamp="$STAMP_DIR/sidecar-$name"
    want="$package@$version $module_hash"
    if [ -x "$BIN_DIR/$name" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        echo "install-sidecars: $name $version already built"
        continue
    fi
    echo "install-sidecars: building $name $version"
    rm -f "$stamp"
    (
        cd "$MODULE_DIR"
        nice -n 10 go build -trimpath -ldflags "-s -w -X main.version=$version" \
            -o "$BIN_DIR/$name.tmp" "$package"
    )
    mv "$BIN_DIR/$name.tmp" "$BIN_DIR/$name"
    printf '%s\n' "$want" >"$stamp"
done

missing=0
for name in csi-node-driver-registrar livenessprobe; do
    if [ -x "$BIN_DIR/$name" ]; then
        echo "install-sidecars: $name present in $BIN_DIR"
    else
        echo "install-sidecars: $name is not in $BIN_DIR and cannot be built from the Go module proxy" >&2
        missing=1
    fi
done
if [ "$REQUIRE_ALL" -eq 1 ] && [ "$missing" -eq 1 ]; then
    exit 1
fi
echo "$BIN_DIR"
