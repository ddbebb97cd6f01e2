#!/usr/bin/env bash
# Builds kwok (sigs.k8s.io/kwok), the simulated-node controller of the scale lane
# (tests/scale, docs/scale.md), from the Go module proxy into
# ${CSI_CACHE_DIR:-$HOME/.cache/nodelocal-csi}/bin/kwok. kwok makes Node objects Ready and marks
# the Pods bound to them Running, without a kubelet or containers.
# The kwok binary has no stages of its own (kwokctl hands them over): the release's node
# (initialize, heartbeat with lease) and fast pod (ready, complete, delete) stages are copied
# from the same module into $CSI_CACHE_DIR/kwok/stages-$KWOK_VERSION.yaml, given to kwok as its
# --config.
# Idempotent: rebuilt only when KWOK_VERSION changes (a stamp under $CSI_CACHE_DIR/stamps);
# a second run takes a moment. Prints the binary's path on its last line.
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The release docs/scale.md's figures were measured with.
KWOK_VERSION=${KWOK_VERSION:-v0.7.0}
PACKAGE=sigs.k8s.io/kwok/cmd/kwok
BIN="$CSI_CACHE_DIR/bin/kwok"
STAGES="$CSI_CACHE_DIR/kwok/stages-$KWOK_VERSION.yaml"
STAGE_FILES="node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml
pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml"

command -v go >/dev/null 2>&1 || { echo "install-kwok: go is not installed" >&2; exit 1; }

want="$PACKAGE@$KWOK_VERSION $(echo $STAGE_FILES)"
if stamp_matches kwok "$want" "$BIN" && [ -s "$STAGES" ]; then
    echo "install-kwok: kwok $KWOK_VERSION already built" >&2
else
    say "building kwok $KWOK_VERSION (a few minutes on 2 cores)"
    stamp_clear kwok
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # kwok's own go.mod and go.sum pin its dependencies (and its version is in its source).
    CGO_ENABLED=0 GOBIN="$work" nice -n 10 go install -trimpath -ldflags "-s -w" \
        "$PACKAGE@$KWOK_VERSION"
    dir=$(cd "$work" && go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" |
        sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
    [ -n "$dir" ] || { echo "install-kwok: no module directory for kwok $KWOK_VERSION" >&2; exit 1; }
    mkdir -p "$(dirname "$STAGES")"
    for f in $STAGE_FILES; do
        printf -- '---\n'
        cat "$dir/kustomize/stage/$f"
    done >"$work/stages.yaml"
    mv "$work/kwok" "$BIN"
    mv "$work/stages.yaml" "$STAGES"
    stamp_write kwok "$want"
fi
echo "$BIN"
