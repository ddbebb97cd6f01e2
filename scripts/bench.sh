#!/usr/bin/env bash
# The benchmarks (`make bench`): RPC latency of a real driver process over its unix socket, with
# 10 and 1,000 existing volumes, ListVolumes paging, node stage/publish cycles (root: real bind
# mounts and loop devices) and external commands per operation. Prints a table and writes
# benchmarks/results/<date>.json (pass --out FILE or --out - ; other flags: --help).
# Also runs benchmarks/hostpath_create.py when it is there. About 3 minutes on 2 busy cores.
. "$(dirname "$0")/lib.sh"
cd "$ROOT"
"$ROOT/scripts/install-python.sh"
if [ "$(id -u)" -ne 0 ]; then
    say "not root: the node stage/publish cycle (real mounts) will not be measured"
fi
say "benchmarks/rpc_latency.py"
.venv/bin/python -m benchmarks.rpc_latency "$@"
if [ -f benchmarks/hostpath_create.py ]; then
    say "benchmarks/hostpath_create.py"
    .venv/bin/python benchmarks/hostpath_create.py
fi
