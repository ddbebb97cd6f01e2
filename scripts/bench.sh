#!/usr/bin/env bash
# The benchmarks (`make bench`, docs/benchmarks.md):
#   1. benchmarks/versus.py: this driver side by side with the reference hostpath driver
#      (kubernetes-csi's hostpathplugin, built offline by install-sidecars.sh from
#      ../shared/third_party), under one client in one run, with the ratio of each metric. Its
#      flags are this script's: `--alone` runs this driver only, `--help` lists the rest.
#   2. benchmarks/rpc_latency.py: per-RPC latency and external commands per operation of this
#      driver, including the node stage/publish cycle of block volumes (root: real loop devices).
#   3. benchmarks/hostpath_create.py: the hostpath backend's CPU per create, in-process.
# Results go to benchmarks/results/. About 10 minutes on 2 cores with the default sizes.
. "$(dirname "$0")/lib.sh"
cd "$ROOT"
"$ROOT/scripts/install-python.sh"
if [ "$(id -u)" -ne 0 ]; then
    say "not root: node publish and the node stage/publish cycle (real mounts) will not be measured"
fi
alone=false
for arg in "$@"; do
    [ "$arg" = "--alone" ] && alone=true
done
if ! $alone; then
    if ! "$ROOT/scripts/install-sidecars.sh" hostpathplugin >/dev/null; then
        say "cannot build the reference driver (see above); \`scripts/bench.sh --alone\` runs this driver only"
        exit 1
    fi
fi
say "benchmarks/versus.py"
.venv/bin/python -m benchmarks.versus "$@"
say "benchmarks/rpc_latency.py"
.venv/bin/python -m benchmarks.rpc_latency
say "benchmarks/hostpath_create.py"
.venv/bin/python benchmarks/hostpath_create.py
