#!/usr/bin/env bash
# Installs csi-sanity (github.com/kubernetes-csi/csi-test) at a pinned version into
# ${CSI_CACHE_DIR:-$HOME/.cache/nodelocal-csi}/bin and prints the binary's path on its last line.
#
# Idempotent: nothing is fetched or built when that exact version is already there. Building
# needs Go >= 1.23; a machine without one (Debian 12 ships 1.19) gets a pinned Go toolchain
# from the Go module proxy (the golang.org/toolchain module, sha256-checked) into the cache.
. "$(dirname "$0")/lib.sh"

CSI_SANITY_PACKAGE="github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity"
CSI_SANITY_VERSION="v5.4.0"
GO_MIN="1.23"
GO_TOOLCHAIN="go1.24.7"
# sha256 of golang.org/toolchain@v0.0.1-go1.24.7.linux-amd64.zip, the same bytes `go mod
# download` verifies against sum.golang.org (h1:3R2NlHET4fpU7qLG10YzothrBHDbSepihIvLagThQHQ=).
GO_TOOLCHAIN_SHA256_AMD64="4c2a63c008dbb90112f22ff9e47eb6fb487b17da1c70ecc7b9fad77577b8031e"

BIN="$CSI_CACHE_DIR/bin/csi-sanity"
STAMP="$CSI_CACHE_DIR/stamps/csi-sanity"
WANT="$CSI_SANITY_PACKAGE@$CSI_SANITY_VERSION"
mkdir -p "$CSI_CACHE_DIR/stamps"

if [ -x "$BIN" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
    say "csi-sanity $CSI_SANITY_VERSION already installed"
    echo "$BIN"
    exit 0
fi

go_is_recent() {
    local v
    v=$("$1" env GOVERSION 2>/dev/null) || return 1
    v=${v#go}
    [ "$(printf '%s\n%s\n' "$GO_MIN" "$v" | sort -V | head -n1)" = "$GO_MIN" ]
}

# find_go: prints a go binary of at least GO_MIN, fetching the pinned toolchain if needed.
find_go() {
    local candidate
    for candidate in "$(command -v go || true)" /usr/local/go/bin/go \
        "$CSI_CACHE_DIR/go-$GO_TOOLCHAIN/bin/go"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && go_is_recent "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done
    if [ "$(uname -m)" != "x86_64" ]; then
        say "no Go >= $GO_MIN found and only a linux-amd64 toolchain is pinned; install Go first"
        return 1
    fi
    apt_install curl unzip ca-certificates >&2
    local url="https://proxy.golang.org/golang.org/toolchain/@v/v0.0.1-$GO_TOOLCHAIN.linux-amd64.zip"
    local work
    work=$(mktemp -d)
    say "fetching Go toolchain $GO_TOOLCHAIN from the Go module proxy"
    if ! curl -fsSL --retry 3 -o "$work/go.zip" "$url"; then
        rm -rf "$work"
        return 1
    fi
    if ! echo "$GO_TOOLCHAIN_SHA256_AMD64  $work/go.zip" | sha256sum -c --quiet - >&2; then
        say "checksum mismatch for $url"
        rm -rf "$work"
        return 1
    fi
    unzip -q "$work/go.zip" -d "$work/x"
    local root="$work/x/golang.org/toolchain@v0.0.1-$GO_TOOLCHAIN.linux-amd64"
    # Module zips keep no file modes: make the tools executable again.
    chmod +x "$root"/bin/* "$root"/pkg/tool/*/*
    rm -rf "$CSI_CACHE_DIR/go-$GO_TOOLCHAIN"
    mv "$root" "$CSI_CACHE_DIR/go-$GO_TOOLCHAIN"
    rm -rf "$work"
    echo "$CSI_CACHE_DIR/go-$GO_TOOLCHAIN/bin/go"
}

GO=$(find_go)
say "building csi-sanity $CSI_SANITY_VERSION with $("$GO" env GOVERSION)"
rm -f "$STAMP"
GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$CSI_CACHE_DIR/bin" \
    nice -n 10 "$GO" install -trimpath "$WANT" >&2
printf '%s\n' "$WANT" >"$STAMP"
echo "$BIN"
