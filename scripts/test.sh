#!/usr/bin/env bash
# Installs what the tests need and runs every lane: static checks, host tests (unit,
# integration, chart, csi-sanity), the real-kernel VM lane and the Kubernetes end-to-end lane.
# CSI_TEST_LANES selects lanes (default: "static host vm e2e"); a failed lane fails the run.
. "$(dirname "$0")/lib.sh"
cd "$ROOT"
lanes=${CSI_TEST_LANES:-static host vm e2e}
results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT
failed=()
start_all=$(date +%s)

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

"$ROOT/scripts/install-host-tools.sh"
"$ROOT/scripts/install-python.sh"
export CSI_JUNIT_DIR=$results

for lane in $lanes; do
    case $lane in
        static) run_lane static "$ROOT/scripts/lint.sh" ;;
        host)
            "$ROOT/scripts/install-csi-sanity.sh" >/dev/null
            "$ROOT/scripts/install-chart-tools.sh" >/dev/null
            "$ROOT/scripts/install-sidecars.sh" >/dev/null
            run_lane host .venv/bin/pytest -p no:cacheprovider -q -rfE \
                --junitxml="$results/host.xml" tests/unit tests/integration tests/chart tests/sanity tests/adversarial
            ;;
        vm) run_lane vm "$ROOT/scripts/test-vm.sh" ;;
        e2e) run_lane e2e "$ROOT/scripts/test-e2e.sh" ;;
        *) say "unknown lane $lane"; failed+=("$lane") ;;
    esac
done

say "all lanes done in $(( $(date +%s) - start_all )) s"
.venv/bin/python "$ROOT/scripts/junit_summary.py" "$results"
if [ ${#failed[@]} -gt 0 ]; then
    say "failed lanes: ${failed[*]}"
    exit 1
fi
