#!/usr/bin/env bash
# The Kubernetes end-to-end lane: installs (or finds cached) a single-node cluster's parts
# (scripts/install-cluster.sh), then runs pytest tests/e2e, which starts the cluster from its
# components, installs the chart with helm, runs the scenarios and tears everything down.
# Extra arguments go to pytest (e.g. -k snapshot). See docs/testing-e2e.md.
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

t0=$(date +%s)
"$ROOT/scripts/install-python.sh"
"$ROOT/scripts/install-cluster.sh" >/dev/null
t1=$(date +%s)
say "e2e: install-cluster.sh took $((t1 - t0)) s"

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
