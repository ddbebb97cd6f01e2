#!/usr/bin/env bash
# Installs everything the e2e lane's single-node cluster needs, idempotently:
#   - Debian packages: etcd-server, containerd, runc, containernetworking-plugins, iptables,
#     mmdebstrap (the driver image's root filesystem), busybox-static (test and pause images);
#   - Kubernetes server binaries (kube-apiserver, kube-controller-manager, kube-scheduler,
#     kubelet) built from the k8s.io/kubernetes module pinned in tools/kubernetes/go.mod into
#     $CSI_CACHE_DIR/kubernetes/<version>/bin;
#   - helm (scripts/install-chart-tools.sh) and the CSI sidecars, the node-driver-registrar and
#     the livenessprobe included (scripts/install-sidecars.sh);
#   - the VolumeSnapshot CRDs of the sidecars' external-snapshotter release, into
#     $CSI_CACHE_DIR/e2e-crds.
# A second run only checks stamps and is done in a second. See docs/testing-e2e.md.
#   --only-k8s   build the Kubernetes binaries and nothing else (used to start the long build
#                early, in the background).
# Prints the Kubernetes bin directory on its last line.
. "$(dirname "$0")/lib.sh"

K8S_MOD_DIR="$ROOT/tools/kubernetes"
K8S_VERSION=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}
                   $1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' "$K8S_MOD_DIR/go.mod" | head -n 1)
[ -n "$K8S_VERSION" ] || { echo "install-cluster: no k8s.io/kubernetes in $K8S_MOD_DIR/go.mod" >&2; exit 1; }
K8S_BIN="$CSI_CACHE_DIR/kubernetes/$K8S_VERSION/bin"
K8S_COMMANDS="kube-apiserver kube-controller-manager kube-scheduler kubelet"
# BUILD_NICE: the machine is shared; the builds yield to everyone else.
BUILD_NICE=${BUILD_NICE:-15}

command -v go >/dev/null 2>&1 || {
    echo "install-cluster: go (>= 1.24) is needed to build Kubernetes; put it on PATH" >&2
    exit 1
}

install_debs() {
    apt_install etcd-server containerd runc containernetworking-plugins iptables conntrack \
        mmdebstrap busybox-static openssl iproute2 kmod util-linux e2fsprogs
}

# build_k8s: one `go build` per command so that a failure names its command; the stamp holds
# the go.sum hash and the ldflags (which name the version), so a version bump rebuilds.
build_k8s() {
    local major minor
    major=$(echo "$K8S_VERSION" | sed -E 's/^v([0-9]+)\..*/\1/')
    minor=$(echo "$K8S_VERSION" | sed -E 's/^v[0-9]+\.([0-9]+)\..*/\1/')
    local ldflags="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
        ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    local want
    want="$(sha256sum <"$K8S_MOD_DIR/go.sum" | cut -d' ' -f1) $ldflags"
    mkdir -p "$K8S_BIN"
    for cmd in $K8S_COMMANDS; do
        local stamp="$K8S_BIN/.$cmd.stamp"
        if [ -x "$K8S_BIN/$cmd" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
            continue
        fi
        say "building $cmd $K8S_VERSION (several minutes on 2 cores)"
        rm -f "$stamp"
        (cd "$K8S_MOD_DIR" && CGO_ENABLED=0 GOFLAGS=-mod=mod nice -n "$BUILD_NICE" \
            go build -trimpath -ldflags "$ldflags" -o "$K8S_BIN/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd")
        mv "$K8S_BIN/$cmd.tmp" "$K8S_BIN/$cmd"
        printf '%s\n' "$want" >"$stamp"
    done
}

# snapshot_crds: the VolumeSnapshot CRDs of the external-snapshotter release the sidecars are
# built from (its client module ships them), copied to $CSI_CACHE_DIR/e2e-crds.
snapshot_crds() {
    local version dir
    version=$(awk '$1 == "github.com/kubernetes-csi/external-snapshotter/client/v8" {print $2}' \
        "$ROOT/tools/sidecars/go.mod")
    [ -n "$version" ] || { echo "install-cluster: no snapshotter client in tools/sidecars/go.mod" >&2; exit 1; }
    local out="$CSI_CACHE_DIR/e2e-crds"
    if [ "$(cat "$out/.stamp" 2>/dev/null)" = "$version" ]; then
        return 0
    fi
    dir=$(cd "$ROOT/tools/sidecars" && GOFLAGS=-mod=mod go mod download -json \
        "github.com/kubernetes-csi/external-snapshotter/client/v8@$version" |
        sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
    mkdir -p "$out"
    cp "$dir"/config/crd/snapshot.storage.k8s.io_*.yaml "$out/"
    chmod 644 "$out"/*.yaml
    printf '%s\n' "$version" >"$out/.stamp"
}

case "${1:-}" in
    --only-k8s)
        build_k8s
        echo "$K8S_BIN"
        exit 0
        ;;
esac

install_debs
build_k8s
# helm (and kubeconform) and the sidecars come from the chart engineer's scripts.
"$ROOT/scripts/install-chart-tools.sh" >&2
"$ROOT/scripts/install-sidecars.sh" >&2
snapshot_crds
echo "$K8S_BIN"
