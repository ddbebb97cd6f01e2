# Shared helpers for the project's scripts. Source it: . "$(dirname "$0")/lib.sh"
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CSI_CACHE_DIR=${CSI_CACHE_DIR:-$HOME/.cache/nodelocal-csi}
export CSI_CACHE_DIR
mkdir -p "$CSI_CACHE_DIR/bin"
export PATH="$CSI_CACHE_DIR/bin:/usr/local/go/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive

say() { printf '==> %s\n' "$*" >&2; }

# apt_lists_fresh: runs `apt-get update` unless this project did so in the last day (a fresh
# machine has no package lists).
apt_lists_fresh() {
    local stamp=/var/lib/apt/periodic/nodelocal-csi-update
    if [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +1440 2>/dev/null)" ]; then
        say "apt-get update"
        apt-get update -qq
        mkdir -p "$(dirname "$stamp")" && touch "$stamp"
    fi
}

# apt_install PKG...: installs the packages that are missing, running `apt-get update` at most
# once a day (a fresh machine has no package lists).
apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    apt_lists_fresh
    say "apt-get install ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Build stamps: $CSI_CACHE_DIR/stamps/NAME holds one line describing the inputs of a cached
# build (versions, checksums), so a script rebuilds exactly when an input changed.
# stamp_matches NAME WANT [FILE...]: the stamp reads WANT and every FILE is executable.
stamp_matches() {
    local name=$1 want=$2 f
    shift 2
    for f in "$@"; do
        [ -x "$f" ] || return 1
    done
    [ "$(cat "$CSI_CACHE_DIR/stamps/$name" 2>/dev/null)" = "$want" ]
}

# stamp_write NAME WANT: record a finished build. stamp_clear NAME: forget it (before a rebuild,
# so an interrupted one is never taken for finished).
stamp_write() {
    mkdir -p "$CSI_CACHE_DIR/stamps"
    printf '%s\n' "$2" >"$CSI_CACHE_DIR/stamps/$1"
}
stamp_clear() { rm -f "$CSI_CACHE_DIR/stamps/$1"; }
