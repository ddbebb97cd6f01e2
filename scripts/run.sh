#!/usr/bin/env bash
# Installs what is needed and runs the driver on its embedded default: standalone mode, the
# hostpath backend with its data directory inside the checkout. Extra arguments are passed on.
. "$(dirname "$0")/lib.sh"
"$ROOT/scripts/install-host-tools.sh"
"$ROOT/scripts/install-python.sh"
data=${CSI_DATA_DIR:-$ROOT/.data}
mkdir -p "$data/kubelet"
exec "$ROOT/.venv/bin/python" -m csi_driver \
    --mode standalone --backend hostpath \
    --hostpath-root "$data/hostpath" \
    --endpoint "unix://$data/csi.sock" \
    --kubelet-dir "$data/kubelet" \
    "$@"
