#!/usr/bin/env bash
# The many-nodes run (`make scale`, docs/scale.md): the e2e lane's control plane, kwok for 100
# simulated nodes, one real driver and one real csi-provisioner per node, 2,000 Pods with
# WaitForFirstConsumer PVCs; prints a table and writes benchmarks/results/scale-*.json.
# Installs what it needs first (scripts/install-cluster.sh, scripts/install-kwok.sh). Holds the
# e2e lock (/tmp/nodelocal-e2e.lock): the two lanes share the machine's cluster tooling.
# Arguments go to tests/scale/run.py, e.g. `scripts/scale.sh --nodes 20 --pods 200`.
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

t0=$(date +%s)
"$ROOT/scripts/install-python.sh"
"$ROOT/scripts/install-cluster.sh" >/dev/null
"$ROOT/scripts/install-kwok.sh" >/dev/null
t1=$(date +%s)
say "scale: installs took $((t1 - t0)) s"
set +e
flock /tmp/nodelocal-e2e.lock .venv/bin/python -m tests.scale.run "$@"
rc=$?
set -e
say "scale: run took $(($(date +%s) - t1)) s"
# The harness ends every process it started, also on failure; say so if anything survived.
if pgrep -af 'nlscale-' >&2; then
    say "scale: processes of a scale run are still there (listed above)"
    rc=1
fi
exit $rc
