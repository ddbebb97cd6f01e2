#!/usr/bin/env bash
# Renders the plain manifests in deploy/ from the chart, for clusters installed without helm:
#   deploy/nodelocal-csi.yaml       the chart's default values (hostpath backend)
#   deploy/nodelocal-csi-lvm.yaml   the same with backend=lvm (device class "default" on VG "nodelocal")
# Both install into kube-system as release "nodelocal-csi". Both leave modify.enabled off: the
# peer channel's certificates are made per install, and keys in a published file would be
# everyone's keys. Changing a VolumeAttributesClass needs the chart (docs/deploy.md).
#
#   scripts/render-deploy.sh              rewrite deploy/
#   scripts/render-deploy.sh --out DIR    render into DIR instead (the chart tests compare the two)
#
# helm comes from scripts/install-chart-tools.sh (run first if it is not in the tools cache).
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="${CSI_CACHE_DIR:-$HOME/.cache/nodelocal-csi}"
HELM="${HELM:-$CACHE_DIR/bin/helm}"
OUT_DIR="$REPO_DIR/deploy"
if [ "${1:-}" = "--out" ]; then
    OUT_DIR="$2"
elif [ $# -gt 0 ]; then
    echo "usage: $0 [--out DIR]" >&2
    exit 2
fi
if [ ! -x "$HELM" ]; then
    echo "render-deploy: $HELM not found; run scripts/install-chart-tools.sh" >&2
    exit 1
fi
mkdir -p "$OUT_DIR"

# render FILE [helm args...]
render() {
    local file="$1"
    shift
    {
        echo "# Rendered from charts/nodelocal-csi by scripts/render-deploy.sh; do not edit by hand."
        echo "# Values: $*"
        "$HELM" template nodelocal-csi "$REPO_DIR/charts/nodelocal-csi" \
            --namespace kube-system --kube-version 1.34.4 "$@"
    } >"$OUT_DIR/$file.tmp"
    mv "$OUT_DIR/$file.tmp" "$OUT_DIR/$file"
    echo "render-deploy: wrote $OUT_DIR/$file"
}

render nodelocal-csi.yaml --set backend=hostpath --set modify.enabled=false
render nodelocal-csi-lvm.yaml --set backend=lvm --set modify.enabled=false
