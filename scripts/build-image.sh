#!/usr/bin/env bash
# Builds the driver image from the repository's own Dockerfile, without a Docker engine or a
# registry, and writes it as an OCI archive (what `make image` hands to users and what the e2e
# lane imports into its cluster). Prints the archive's path on its last line.
#
#   scripts/build-image.sh [--context DIR] [--out FILE]
#
#   --context DIR   the build context (default: the repository); its Dockerfile is built
#   --out FILE      also copy the archive to FILE
#
# How: buildah (daemonless) as root with the vfs storage driver and chroot isolation, its storage
# in a throwaway directory under $CSI_CACHE_DIR/image that is removed afterwards, also after a
# failed or killed build. No registry can be reached, so the Dockerfile's BASE_IMAGE is a base
# made here: Debian bookworm's root filesystem (mmdebstrap) with bookworm's python3 (3.11) and
# pip, `python` and `pip` on PATH and no PEP 668 marker, i.e. what the Dockerfile needs of
# python:3.11-slim-bookworm. The build's apt-get reads this host's apt configuration (/etc/apt,
# mounted read-only into every RUN) and pip this host's CA bundle, so both reach Debian's
# packages and PyPI the way this machine does; neither mount ends up in the image.
#
# Cache: the archive is kept in $CSI_CACHE_DIR/image keyed by the Dockerfile, the files the
# build context holds (scripts/build_context.py reads .dockerignore as Docker does), the base's
# recipe and this script; a run with nothing changed builds nothing and takes a second.
. "$(dirname "$0")/lib.sh"

context=$ROOT
out=
while [ $# -gt 0 ]; do
    case $1 in
        --context) context=$(cd "$2" && pwd); shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "build-image: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done

"$ROOT/scripts/install-host-tools.sh"

IMAGE_DIR=$CSI_CACHE_DIR/image
mkdir -p "$IMAGE_DIR"
# One build at a time (the e2e lane and `make image` may overlap); waiting is cheaper than two
# builds on two cores.
exec 9>"$IMAGE_DIR/.lock"
flock 9
# Layers of the driver image the e2e harness used to assemble itself, before it ran this build.
rm -f "$CSI_CACHE_DIR"/e2e-images/driver-base-*.tar "$CSI_CACHE_DIR"/e2e-images/driver-app-*.tar

# The base: what the Dockerfile's steps use of python:3.11-slim-bookworm.
BASE_SUITE=bookworm
BASE_PACKAGES=python3,python3-pip,python-is-python3,ca-certificates,netbase,passwd
BASE_SOURCES=(
    "deb http://deb.debian.org/debian $BASE_SUITE main"
    "deb http://deb.debian.org/debian $BASE_SUITE-updates main"
    "deb http://deb.debian.org/debian-security $BASE_SUITE-security main"
)
BASE_ENV=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)
base_recipe="$BASE_SUITE $BASE_PACKAGES ${BASE_SOURCES[*]} ${BASE_ENV[*]} pep668-removed v1"
base_key=$(printf '%s' "$base_recipe" | sha256sum | cut -c1-16)
base_tar=$IMAGE_DIR/base-$base_key.tar

version=$("$ROOT/scripts/version.sh" "$context")
ref=localhost/nodelocal-csi/csi-driver:$version
key=$({
    python3 "$ROOT/scripts/build_context.py" "$context"
    echo "$base_key $ref"
    sha256sum <"$ROOT/scripts/build-image.sh"
} | sha256sum | cut -c1-16)
archive=$IMAGE_DIR/csi-driver-$version-$key.oci.tar

finish() {
    if [ -n "$out" ]; then
        mkdir -p "$(dirname "$out")"
        cp "$archive" "$out.tmp" && mv "$out.tmp" "$out"
        say "image: $ref written to $out"
    fi
    echo "${out:-$archive}"
}

if [ -f "$archive" ]; then
    say "image: $ref unchanged, cached in $archive"
    finish
    exit 0
fi

# ----------------------------------------------------------------------------- cleanup
# buildah, as root, also writes outside its storage: a blob-info cache in /var/lib/containers
# (no flag moves it) and a CNI lock in /etc/cni (moved by CONTAINERS_CONF below). Whatever of
# /var/lib/containers did not exist before is removed again (the path is noted in a file first,
# so that the next build removes it after a killed one).
BLOB_CACHE_PATHS=(/var/lib/containers /var/lib/containers/cache
    /var/lib/containers/cache/blob-info-cache-v1.boltdb)
leftover_note=$IMAGE_DIR/.leftover
leftover=$(cat "$leftover_note" 2>/dev/null || true)
if [ -z "$leftover" ]; then
    for p in "${BLOB_CACHE_PATHS[@]}"; do
        if [ ! -e "$p" ]; then leftover=$p; break; fi
    done
    printf '%s\n' "$leftover" >"$leftover_note"
fi
# remove_leftover: the blob-info cache file, then the directories up to the first one that was
# there before; only ever that file and directories it leaves empty.
remove_leftover() {
    [ -n "$leftover" ] || return 0
    rm -f "${BLOB_CACHE_PATHS[2]}"
    local d
    for d in "${BLOB_CACHE_PATHS[1]}" "${BLOB_CACHE_PATHS[0]}"; do
        case $d in "$leftover"*) rmdir "$d" 2>/dev/null || true ;; esac
    done
}

# buildah_in STORE ARGS...: buildah on the throwaway storage STORE.
buildah_in() {
    local store=$1
    shift
    CONTAINERS_CONF=$store/containers.conf TMPDIR=$store/tmp \
        buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs "$@"
}

# remove_store STORE: remove a build's working containers (their mounts with them) and its
# storage. With vfs and chroot isolation nothing should be mounted; anything that is gets
# unmounted before the directory goes.
remove_store() {
    local store=$1
    [ -d "$store" ] || return 0
    if [ -d "$store/root" ]; then
        buildah_in "$store" rm --all >/dev/null 2>&1 || true
        buildah_in "$store" umount --all >/dev/null 2>&1 || true
    fi
    local mounts
    mounts=$(findmnt -rn -o TARGET | grep -F "$store/" | sort -r || true)
    if [ -n "$mounts" ]; then
        printf '%s\n' "$mounts" | xargs -r -d '\n' umount -l
    fi
    rm -rf "$store"
}

store=
log=$IMAGE_DIR/build.log
cleanup() {
    local rc=$?
    if [ "$rc" != 0 ] && [ -s "$log" ]; then
        say "image: build FAILED; the last lines of $log:"
        tail -n 60 "$log" >&2
    fi
    [ -n "$store" ] && remove_store "$store"
    rm -f "$archive.tmp" "$base_tar.tmp"
    remove_leftover
    rm -f "$leftover_note"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A build that was killed (SIGKILL) left its storage: remove it now.
for stale in "$IMAGE_DIR"/build.*; do
    [ -d "$stale" ] || continue
    say "image: removing the storage of an interrupted build, $stale"
    remove_store "$stale"
done

t0=$(date +%s)
: >"$log"
store=$(mktemp -d "$IMAGE_DIR/build.XXXXXX")
mkdir -p "$store/tmp" "$store/cni"
printf '[network]\nnetwork_config_dir = "%s"\n' "$store/cni" >"$store/containers.conf"

# ----------------------------------------------------------------------------- base
if [ ! -f "$base_tar" ]; then
    say "image: making the base root filesystem (Debian $BASE_SUITE + python3, mmdebstrap)"
    rm -f "$IMAGE_DIR"/base-*.tar
    mmdebstrap --mode=root --variant=minbase --format=tar --quiet --skip=output/dev \
        --aptopt='APT::Install-Recommends "false"' \
        --include="$BASE_PACKAGES" \
        --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
        "$BASE_SUITE" "$base_tar.tmp" "${BASE_SOURCES[@]}" >>"$log" 2>&1
    mv "$base_tar.tmp" "$base_tar"
fi
t1=$(date +%s)
base_ref=localhost/nodelocal-csi-base:$base_key
ctr=$(buildah_in "$store" from --pull-never scratch 2>>"$log")
buildah_in "$store" add --quiet "$ctr" "$base_tar" / >>"$log" 2>&1
config=()
for e in "${BASE_ENV[@]}"; do config+=(--env "$e"); done
buildah_in "$store" config "${config[@]}" --cmd python3 "$ctr" >>"$log" 2>&1
buildah_in "$store" commit --quiet --rm "$ctr" "$base_ref" >>"$log" 2>&1
t2=$(date +%s)

# ----------------------------------------------------------------------------- build
say "image: building $ref from $context/Dockerfile (buildah, BASE_IMAGE=$base_ref; log: $log)"
volumes=(-v /etc/apt:/etc/apt:ro)
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    volumes+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
fi
buildah_in "$store" bud --isolation chroot --pull-never \
    --build-arg "BASE_IMAGE=$base_ref" --build-arg "VERSION=$version" \
    "${volumes[@]}" --tag "$ref" --file "$context/Dockerfile" "$context" >>"$log" 2>&1
t3=$(date +%s)
buildah_in "$store" push --quiet "$ref" "oci-archive:$archive.tmp:$ref" >>"$log" 2>&1
mv "$archive.tmp" "$archive"
# Keep the newest archives only (each is ~120 MB).
ls -t "$IMAGE_DIR"/csi-driver-*.oci.tar | tail -n +4 | xargs -r rm -f
t4=$(date +%s)
say "image: built in $((t4 - t0)) s (base rootfs $((t1 - t0)) s, base import $((t2 - t1)) s," \
    "Dockerfile $((t3 - t2)) s, archive $((t4 - t3)) s)"
finish
