#!/usr/bin/env bash
# The Kubernetes end-to-end lane: installs (or finds cached) the cluster's parts
# (scripts/install-cluster.sh; scripts/install-vm.sh for the lvm node's VM), builds the driver
# image from the repository's Dockerfile (scripts/build-image.sh: an OCI archive, cached), then
# runs pytest tests/e2e, which starts the cluster from its components, imports that archive,
# installs the chart with helm, runs the scenarios and tears everything down.
# Extra arguments go to pytest (e.g. -k snapshot). See docs/testing-e2e.md.
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

t0=$(date +%s)
"$ROOT/scripts/install-python.sh"
"$ROOT/scripts/install-cluster.sh" >/dev/null
# The lvm node (tests/e2e/test_09_lvm.py) is a VM on Debian's kernel, booted like the VM lane's.
CSI_VNG=$("$ROOT/scripts/install-vm.sh" | tail -n 1)
export CSI_VNG
t1=$(date +%s)
say "e2e: install-cluster.sh and install-vm.sh took $((t1 - t0)) s"
# CSI_E2E_DRIVER_SRC: build the image from another source tree (docs/testing-e2e.md).
CSI_E2E_DRIVER_ARCHIVE=$("$ROOT/scripts/build-image.sh" --context "${CSI_E2E_DRIVER_SRC:-$ROOT}" | tail -n 1)
export CSI_E2E_DRIVER_ARCHIVE
tb=$(date +%s)
say "e2e: build-image.sh took $((tb - t1)) s ($CSI_E2E_DRIVER_ARCHIVE)"
t1=$tb

junit=()
if [ -n "${CSI_JUNIT_DIR:-}" ]; then
    junit=(--junitxml="$CSI_JUNIT_DIR/e2e.xml")
fi
set +e
.venv/bin/pytest -p no:cacheprovider -q -rfE "${junit[@]}" tests/e2e "$@"
rc=$?
set -e
t2=$(date +%s)
say "e2e: pytest took $((t2 - t1)) s; lane total $((t2 - t0)) s (artifacts: ${CSI_E2E_ARTIFACTS:-$CSI_CACHE_DIR/e2e-artifacts/last})"
exit $rc
