#!/usr/bin/env bash
# Installs what the tests need and runs every lane: static checks, host tests (unit,
# integration, chart, csi-sanity), the real-kernel VM lane, the reduced many-nodes run (20
# simulated nodes, tests/scale) and the Kubernetes end-to-end lane.
# CSI_TEST_LANES selects lanes (default: "static host vm scale e2e"); a failed lane fails the run.
. "$(dirname "$0")/lib.sh"
cd "$ROOT"
lanes=${CSI_TEST_LANES:-static host vm scale e2e}
results=$(mktemp -d)
failed=()
start_all=$(date +%s)
bg_pid=""

# descendants PID: every process below PID, children first.
descendants() {
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do
        descendants "$child"
        echo "$child"
    done
}

# A lane run in the background is stopped with the run (launch.py takes the VM down on SIGTERM),
# and what it printed so far is shown; so is a lane in the foreground when the run is stopped.
stop_background() {
    if [ -n "$bg_pid" ] && kill -0 "$bg_pid" 2>/dev/null; then
        kill -TERM $(descendants "$bg_pid") 2>/dev/null || true
        wait "$bg_pid" 2>/dev/null || true
        say "the background lane was stopped; its output so far:"
        cat "$results/background.log" >&2 || true
    fi
    kill -TERM $(descendants $$) 2>/dev/null || true
    rm -rf "$results"
}
trap stop_background EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

run_lane() {
    local name=$1; shift
    local t0=$(date +%s)
    say "lane $name: $*"
    if "$@"; then
        say "lane $name passed in $(( $(date +%s) - t0 )) s"
    else
        say "lane $name FAILED in $(( $(date +%s) - t0 )) s"
        failed+=("$name")
    fi
}

# start_background NAME CMD...: runs a lane beside the next ones, its output kept for later.
start_background() {
    local name=$1; shift
    say "lane $name (beside the next lanes, its output shown when it ends): $*"
    (
        t0=$(date +%s)
        if "$@"; then rc=0; else rc=$?; fi
        echo "$rc $(( $(date +%s) - t0 ))" >"$results/background.status"
    ) >"$results/background.log" 2>&1 &
    bg_pid=$!
    bg_name=$name
}

finish_background() {
    [ -n "$bg_pid" ] || return 0
    wait "$bg_pid" || true
    bg_pid=""
    cat "$results/background.log"
    local rc secs
    read -r rc secs <"$results/background.status" || { rc=1; secs=?; }
    if [ "$rc" = 0 ]; then
        say "lane $bg_name passed in $secs s (beside other lanes)"
    else
        say "lane $bg_name FAILED in $secs s (beside other lanes)"
        failed+=("$bg_name")
    fi
}

has_lane() { [[ " $lanes " == *" $1 "* ]]; }

"$ROOT/scripts/install-host-tools.sh"
"$ROOT/scripts/install-python.sh"
export CSI_JUNIT_DIR=$results
# Every lane's tools first, one installer after the other (they share apt's and go's locks).
if has_lane host || has_lane vm; then
    "$ROOT/scripts/install-csi-sanity.sh" >/dev/null
    "$ROOT/scripts/install-chart-tools.sh" >/dev/null
fi
has_lane host && "$ROOT/scripts/install-sidecars.sh" >/dev/null
has_lane vm && "$ROOT/scripts/install-vm.sh" >/dev/null
if has_lane scale; then
    "$ROOT/scripts/install-cluster.sh" >/dev/null
    "$ROOT/scripts/install-kwok.sh" >/dev/null
fi

# The VM lane runs beside the host and scale lanes: its emulated guest keeps about one of the
# host's two cores busy while its pytest runs (one driver, one lvm2 command at a time), which
# leaves the other for them. Together they take about as long as the VM lane alone.
beside=""
has_lane vm && { has_lane host || has_lane scale; } && beside=vm
start_vm_beside() {
    [ "$beside" = vm ] && [ -z "$bg_pid" ] && [ ! -e "$results/background.status" ] &&
        start_background vm "$ROOT/scripts/test-vm.sh"
    return 0
}

for lane in $lanes; do
    case $lane in
        static) run_lane static "$ROOT/scripts/lint.sh" ;;
        host)
            start_vm_beside
            run_lane host .venv/bin/pytest -p no:cacheprovider -q -rfE \
                --junitxml="$results/host.xml" tests/unit tests/integration tests/chart tests/sanity tests/adversarial
            ;;
        vm) [ "$beside" = vm ] || run_lane vm "$ROOT/scripts/test-vm.sh" ;;
        scale)
            start_vm_beside
            run_lane scale .venv/bin/pytest -p no:cacheprovider -q -rfE \
                --junitxml="$results/scale.xml" tests/scale
            ;;
        e2e)
            finish_background
            run_lane e2e "$ROOT/scripts/test-e2e.sh"
            ;;
        *) say "unknown lane $lane"; failed+=("$lane") ;;
    esac
done

finish_background
say "all lanes done in $(( $(date +%s) - start_all )) s"
.venv/bin/python "$ROOT/scripts/junit_summary.py" "$results"
if [ ${#failed[@]} -gt 0 ]; then
    say "failed lanes: ${failed[*]}"
    exit 1
fi
