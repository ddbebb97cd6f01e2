#!/usr/bin/env bash
# Installs what the chart tests need, all from the Go module proxy at pinned versions:
#   - helm and kubeconform, built into ${CSI_CACHE_DIR:-$HOME/.cache/nodelocal-csi}/bin;
#   - kubeconform schemas for each Kubernetes version in K8S_SCHEMA_VERSIONS, generated locally
#     (tests/chart/openapi2schema.py) from the OpenAPI document inside the k8s.io/kubernetes module
#     and the snapshot CRDs inside the external-snapshotter client module, into
#     <cache>/kubeconform-schemas/v<version>-standalone-strict/.
#   - prometheus and promtool, taken out of Debian's `prometheus` package (downloaded, not
#     installed: no service, no user, no dependencies) into the same bin directory, for the
#     tests that load the chart's alert rules into a real Prometheus.
# Idempotent: what is already there at the pinned version is kept.
#
# Needs: go (>= the tools' go directive), a Python with PyYAML (the project's .venv, or $PYTHON).
# Prints the bin directory on its last line.
set -euo pipefail

HELM_VERSION="v3.22.0"
# The Kubernetes minor of helm's client-go (v0.37.x for helm v3.22): helm's own release build
# stamps it in, and without it `helm template` would assume Kubernetes v1.20.
HELM_K8S_MINOR="37"
KUBECONFORM_VERSION="v0.8.0"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the one the pinned
# sidecars are built against.
K8S_SCHEMA_VERSIONS="1.34.4 1.36.3"
# The external-snapshotter release whose csi-snapshotter image the chart pins.
SNAPSHOTTER_CLIENT_VERSION="v8.6.0"

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
BIN_DIR="$CSI_CACHE_DIR/bin"

command -v go >/dev/null 2>&1 || {
    echo "install-chart-tools: go is not installed (needed to build helm and kubeconform)" >&2
    exit 1
}

export GOFLAGS="-mod=mod"
export CGO_ENABLED=0
export GOBIN="$BIN_DIR"

# install NAME PACKAGE VERSION LDFLAGS: go install PACKAGE@VERSION unless the stamp says that
# exact build is there already.
install_tool() {
    local name="$1" package="$2" version="$3" ldflags="$4"
    local want="$package@$version $ldflags"
    if stamp_matches "$name" "$want" "$BIN_DIR/$name"; then
        echo "install-chart-tools: $name $version already installed"
        return 0
    fi
    echo "install-chart-tools: building $name $version from the Go module proxy"
    stamp_clear "$name"
    nice -n 10 go install -trimpath -ldflags "$ldflags" "$package@$version"
    stamp_write "$name" "$want"
}

helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    helm_ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$HELM_K8S_MINOR"
done
install_tool helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" "$helm_ldflags"
install_tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION" "-s -w"

# prometheus 2.42 is what Debian 12 ships; the rules the chart renders use nothing newer.
install_prometheus() {
    local want="debian-package prometheus 2"
    if stamp_matches prometheus "$want" "$BIN_DIR/prometheus" "$BIN_DIR/promtool"; then
        echo "install-chart-tools: prometheus and promtool already installed"
        return 0
    fi
    echo "install-chart-tools: taking prometheus and promtool out of Debian's package"
    stamp_clear prometheus
    apt_lists_fresh
    local tmp
    tmp=$(mktemp -d)
    (
        cd "$tmp"
        # apt's sandbox user cannot write here; the download itself is checked by apt
        apt-get download -qq -o APT::Sandbox::User=root prometheus
        dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/prometheus ./usr/bin/promtool
    ) || { rm -rf "$tmp"; return 1; }
    install -m 0755 "$tmp/usr/bin/prometheus" "$tmp/usr/bin/promtool" "$BIN_DIR/"
    rm -rf "$tmp"
    "$BIN_DIR/promtool" --version 2>&1 | head -n 1 | grep -q '^promtool, version 2\.' || {
        echo "install-chart-tools: Debian's promtool is not a 2.x release" >&2
        return 1
    }
    stamp_write prometheus "$want"
}
install_prometheus

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
CONVERTER="$ROOT/tests/chart/openapi2schema.py"
SCHEMA_DIR="$CSI_CACHE_DIR/kubeconform-schemas"

# generate_schemas VERSION: the module sources are fetched into a throw-away module cache (about
# 110 MB unpacked per Kubernetes version) that is removed once the schemas are written.
generate_schemas() {
    local version="$1"
    local stamp="schemas-v$version"
    local want
    want="k8s.io/kubernetes@v$version client/v8@$SNAPSHOTTER_CLIENT_VERSION $(sha256sum "$CONVERTER" | cut -d' ' -f1)"
    if [ -d "$SCHEMA_DIR/v$version-standalone-strict" ] && stamp_matches "$stamp" "$want"; then
        echo "install-chart-tools: kubeconform schemas for Kubernetes v$version already generated"
        return 0
    fi
    echo "install-chart-tools: generating kubeconform schemas for Kubernetes v$version"
    stamp_clear "$stamp"
    local modcache
    modcache="$(mktemp -d "$CSI_CACHE_DIR/gomodcache.XXXXXX")"
    local snapshot_module="github.com/kubernetes-csi/external-snapshotter/client/v8"
    (
        cd "$modcache"
        GOMODCACHE="$modcache/mod" nice -n 10 go mod download \
            "k8s.io/kubernetes@v$version" "$snapshot_module@$SNAPSHOTTER_CLIENT_VERSION"
    )
    local crds="$modcache/mod/$snapshot_module@$SNAPSHOTTER_CLIENT_VERSION/config/crd"
    local rc=0
    "$PYTHON" "$CONVERTER" \
        --openapi "$modcache/mod/k8s.io/kubernetes@v$version/api/openapi-spec/swagger.json" \
        --crd "$crds/snapshot.storage.k8s.io_volumesnapshotclasses.yaml" \
        --crd "$crds/snapshot.storage.k8s.io_volumesnapshotcontents.yaml" \
        --crd "$crds/snapshot.storage.k8s.io_volumesnapshots.yaml" \
        --kubernetes-version "$version" --out "$SCHEMA_DIR" || rc=$?
    GOMODCACHE="$modcache/mod" go clean -modcache
    rm -rf "$modcache"
    [ "$rc" -eq 0 ] || return "$rc"
    stamp_write "$stamp" "$want"
}

for version in $K8S_SCHEMA_VERSIONS; do
    generate_schemas "$version"
done

"$BIN_DIR/helm" version --short >/dev/null
"$BIN_DIR/kubeconform" -v >/dev/null
echo "$BIN_DIR"
