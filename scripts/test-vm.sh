#!/usr/bin/env bash
# The real-kernel VM lane: boots Debian's kernel under qemu (software emulation) with
# virtme-ng, builds an LVM volume group with a thin pool on blank sparse disks, runs
# `pytest tests/vm` and csi-sanity against the lvm backend (mount and block) inside the VM.
# See docs/testing-vm.md.
#
#   scripts/test-vm.sh                          # everything
#   scripts/test-vm.sh --only pytest -k lvm     # only pytest tests/vm, extra args to pytest
#   scripts/test-vm.sh --only sanity            # only csi-sanity (mount and block)
#   scripts/test-vm.sh --only sanity -ginkgo.focus=NodeExpandVolume   # args to csi-sanity
#   scripts/test-vm.sh --only setup             # boot, build and check the VG, tear down
#
# CSI_SKIP_VM_LANE=1 skips the lane (a developer's switch; CI never sets it).
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

if [ "${CSI_SKIP_VM_LANE:-}" = "1" ]; then
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
    echo "!!! VM LANE SKIPPED because CSI_SKIP_VM_LANE=1: LVM and quota code NOT TESTED" >&2
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
    exit 0
fi

start=$(date +%s)
"$ROOT/scripts/install-python.sh"
vng=$("$ROOT/scripts/install-vm.sh" | tail -n 1)
# helm and prometheus, for the tests of the chart's alerts on a real lvm driver
"$ROOT/scripts/install-chart-tools.sh" >/dev/null

only=all
prev=""
for arg in "$@"; do
    [ "$prev" = "--only" ] && only=$arg
    case $arg in --only=*) only=${arg#--only=} ;; esac
    prev=$arg
done
sanity=${CSI_SANITY_BIN:-}
if [ -z "$sanity" ] && { [ "$only" = all ] || [ "$only" = sanity ]; }; then
    if [ -x "$ROOT/scripts/install-csi-sanity.sh" ]; then
        # Prints the binary's path on its last line.
        sanity=$("$ROOT/scripts/install-csi-sanity.sh" | tail -n 1) || sanity=""
    elif [ -x "$CSI_CACHE_DIR/bin/csi-sanity" ]; then
        sanity=$CSI_CACHE_DIR/bin/csi-sanity
    fi
fi
# A missing binary is not fatal here: the sanity step fails inside the VM and says why.
say "test-vm: tools ready in $(( $(date +%s) - start )) s (vng $vng, csi-sanity ${sanity:-not installed})"

exec "$ROOT/.venv/bin/python" "$ROOT/scripts/vm/launch.py" --vng "$vng" --csi-sanity "$sanity" "$@"
