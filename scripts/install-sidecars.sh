#!/usr/bin/env bash
# Builds the Kubernetes CSI sidecars the chart deploys, at the releases its image tags name, into
# ${CSI_CACHE_DIR:-$HOME/.cache/nodelocal-csi}/bin:
#   csi-provisioner  csi-attacher  csi-resizer  csi-snapshotter  snapshot-controller
#       from the Go module proxy through our tools module (tools/sidecars);
#   csi-node-driver-registrar  livenessprobe  hostpathplugin (the reference driver `make bench`
#   runs side by side with this one)
#       from their upstream release sources in ../shared/third_party (beside the repository;
#       $CSI_THIRD_PARTY_DIR overrides), offline with their vendor folders, else from the Go
#       module proxy. Their modules are published without the /v2 suffix their v2.x tags need,
#       so the proxy normally has nothing to serve; when neither source works the script fails
#       and names what is missing.
# Idempotent: a binary is rebuilt only when its input changed (tools/sidecars/go.mod and go.sum;
# the source tarball's checksum), recorded in a stamp under $CSI_CACHE_DIR/stamps.
# Arguments name the binaries to build (default: all), e.g. `install-sidecars.sh hostpathplugin`.
# Prints the bin directory on its last line.
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MODULE_DIR="$ROOT/tools/sidecars"
BIN_DIR="$CSI_CACHE_DIR/bin"
STAMP_DIR="$CSI_CACHE_DIR/stamps"
THIRD_PARTY_DIR="${CSI_THIRD_PARTY_DIR:-$(dirname "$ROOT")/shared/third_party}"
mkdir -p "$BIN_DIR" "$STAMP_DIR"

command -v go >/dev/null 2>&1 || { echo "install-sidecars: go is not installed" >&2; exit 1; }
export CGO_ENABLED=0

# binary  main package  release (stamped into the binary's version, as the sidecars' releases do)
SIDECARS=(
    "csi-provisioner github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner v6.3.0"
    "csi-attacher github.com/kubernetes-csi/external-attacher/v4/cmd/csi-attacher v4.12.0"
    "csi-resizer github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer v2.2.0"
    "csi-snapshotter github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter v8.6.0"
    "snapshot-controller github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller v8.6.0"
)

# binary  release  source tarball in the third-party folder  main package (module-relative)
NODE_SIDECARS=(
    "csi-node-driver-registrar v2.17.0 node-driver-registrar-v2.17.0.tar.gz github.com/kubernetes-csi/node-driver-registrar cmd/csi-node-driver-registrar"
    "livenessprobe v2.19.0 livenessprobe-v2.19.0.tar.gz github.com/kubernetes-csi/livenessprobe cmd/livenessprobe"
    "hostpathplugin v1.18.0 csi-driver-host-path-v1.18.0.tar.gz github.com/kubernetes-csi/csi-driver-host-path cmd/hostpathplugin"
)

# wanted NAME: NAME is among the arguments, or there are none.
wanted() {
    [ ${#ONLY[@]} -eq 0 ] && return 0
    local n
    for n in "${ONLY[@]}"; do [ "$n" = "$1" ] && return 0; done
    return 1
}
ONLY=("$@")
for n in "${ONLY[@]}"; do
    printf '%s\n' "${SIDECARS[@]}" "${NODE_SIDECARS[@]}" | grep -q "^$n " ||
        { echo "install-sidecars: no binary named '$n' here" >&2; exit 2; }
done

module_hash="$(cat "$MODULE_DIR/go.mod" "$MODULE_DIR/go.sum" | sha256sum | cut -d' ' -f1)"
for entry in "${SIDECARS[@]}"; do
    read -r name package version <<<"$entry"
    wanted "$name" || continue
    want="$package@$version $module_hash"
    if stamp_matches "sidecar-$name" "$want" "$BIN_DIR/$name"; then
        echo "install-sidecars: $name $version already built"
        continue
    fi
    echo "install-sidecars: building $name $version"
    stamp_clear "sidecar-$name"
    (
        cd "$MODULE_DIR"
        GOFLAGS=-mod=mod nice -n 10 go build -trimpath -ldflags "-s -w -X main.version=$version" \
            -o "$BIN_DIR/$name.tmp.$$" "$package"
    )
    mv "$BIN_DIR/$name.tmp.$$" "$BIN_DIR/$name"
    stamp_write "sidecar-$name" "$want"
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# build_from_tarball NAME VERSION TARBALL PACKAGE: unpack the (verified) tarball and build
# PACKAGE offline: its vendor folder, no proxy, the local toolchain.
build_from_tarball() {
    local name=$1 version=$2 tarball=$3 package=$4 src="$work/$1"
    mkdir -p "$src"
    tar -xzf "$THIRD_PARTY_DIR/$tarball" -C "$src"
    (
        cd "$src"
        GOFLAGS=-mod=vendor GOPROXY=off GOTOOLCHAIN=local nice -n 10 go build -trimpath \
            -ldflags "-s -w -X main.version=$version" -o "$BIN_DIR/$name.tmp.$$" "./$package"
    )
    mv "$BIN_DIR/$name.tmp.$$" "$BIN_DIR/$name"
}

# build_from_proxy NAME VERSION MODULE PACKAGE: `go install MODULE/PACKAGE@VERSION`; its error
# output is left in $work/NAME.proxy.log for the failure message.
build_from_proxy() {
    local name=$1 version=$2 module=$3 package=$4 gobin="$work/gobin-$1"
    mkdir -p "$gobin"
    if ! GOBIN="$gobin" GOFLAGS=-mod=mod nice -n 10 go install -trimpath \
        -ldflags "-s -w -X main.version=$version" "$module/$package@$version" \
        >"$work/$name.proxy.log" 2>&1; then
        return 1
    fi
    mv "$gobin/$(basename "$package")" "$BIN_DIR/$name"
}

missing=()
for entry in "${NODE_SIDECARS[@]}"; do
    read -r name version tarball module package <<<"$entry"
    wanted "$name" || continue
    if [ -f "$THIRD_PARTY_DIR/$tarball" ]; then
        sum=$(awk -v f="$tarball" '$2 == f || $2 == "*" f {print $1}' "$THIRD_PARTY_DIR/SHA256SUMS" 2>/dev/null)
        if [ -z "$sum" ]; then
            echo "install-sidecars: $THIRD_PARTY_DIR/SHA256SUMS has no checksum for $tarball" >&2
            exit 1
        fi
        if ! printf '%s  %s\n' "$sum" "$THIRD_PARTY_DIR/$tarball" | sha256sum --quiet -c - >&2; then
            echo "install-sidecars: $THIRD_PARTY_DIR/$tarball does not match its SHA256SUMS entry" >&2
            exit 1
        fi
        want="$version source $tarball sha256:$sum"
        if stamp_matches "sidecar-$name" "$want" "$BIN_DIR/$name"; then
            echo "install-sidecars: $name $version already built from $tarball"
            continue
        fi
        echo "install-sidecars: building $name $version from $THIRD_PARTY_DIR/$tarball"
        stamp_clear "sidecar-$name"
        build_from_tarball "$name" "$version" "$tarball" "$package"
        stamp_write "sidecar-$name" "$want"
        continue
    fi
    # No source here: a binary of this release built earlier (from either source) will do.
    if [ -x "$BIN_DIR/$name" ] && [[ "$(cat "$STAMP_DIR/sidecar-$name" 2>/dev/null)" == "$version "* ]]; then
        echo "install-sidecars: $name $version already built ($(cat "$STAMP_DIR/sidecar-$name"))"
        continue
    fi
    echo "install-sidecars: no $THIRD_PARTY_DIR/$tarball; trying the Go module proxy for $name $version"
    stamp_clear "sidecar-$name"
    if build_from_proxy "$name" "$version" "$module" "$package"; then
        stamp_write "sidecar-$name" "$version proxy $module/$package@$version"
        continue
    fi
    missing+=("$name $version: neither $THIRD_PARTY_DIR/$tarball (the upstream release source with its vendor folder) nor the Go module proxy ($module/$package@$version: $(tail -n 1 "$work/$name.proxy.log" | sed "s/^[[:space:]]*//"))")
done

if [ ${#missing[@]} -gt 0 ]; then
    for m in "${missing[@]}"; do
        echo "install-sidecars: cannot build $m" >&2
    done
    echo "install-sidecars: provide the source tarballs (see ../shared/third_party/README.md) or set CSI_THIRD_PARTY_DIR" >&2
    exit 1
fi
echo "$BIN_DIR"
