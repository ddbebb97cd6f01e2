#!/usr/bin/env bash
# Installs what the real-kernel VM lane (scripts/test-vm.sh) needs. Idempotent: a second run
# changes nothing and only prints what is already there.
#
#   Debian packages: qemu (software emulation is enough), Debian's own kernel (it has
#   device-mapper and quota support, which the host kernel may lack), busybox-static, and the
#   storage tools the guest runs from the shared host filesystem (lvm2, thin-provisioning-tools,
#   xfsprogs, e2fsprogs, kmod for modprobe).
#   virtme-ng (PyPI, pinned) into its own venv under the tools cache: it is a test-time tool, not
#   a dependency of the driver, and the cache survives a fresh clone.
#   virtiofsd (crates.io, pinned, built with cargo) into the tools cache: with it the guest sees
#   the host's filesystem over virtio-fs with caching instead of 9p, which makes every program
#   start in the guest 5-10 times faster under software emulation (python: ~1 s instead of
#   ~10 s). Debian 12 has no package of it, and qemu's old C daemon takes other flags. Without
#   cargo the lane still works over 9p, slowly, and says so.
#
# Prints, as its last line, the path of the `vng` executable.
. "$(dirname "$0")/lib.sh"

VIRTME_NG_VERSION=1.42
VENV="$CSI_CACHE_DIR/virtme-ng-$VIRTME_NG_VERSION"
VIRTIOFSD_VERSION=1.14.0

apt_install qemu-system-x86 qemu-system-data seabios linux-image-amd64 busybox-static \
    lvm2 dmsetup thin-provisioning-tools xfsprogs e2fsprogs kmod util-linux
say "install-vm: Debian packages present (qemu-system-x86, linux-image-amd64, busybox-static," \
    "lvm2, thin-provisioning-tools, xfsprogs, e2fsprogs, kmod)"

# The kernel the VM boots: the newest /boot/vmlinuz-* with its modules installed.
kernel=""
for k in /boot/vmlinuz-*; do
    [ -e "$k" ] || continue
    v=${k#/boot/vmlinuz-}
    [ -d "/lib/modules/$v/kernel/drivers/md" ] || continue
    if [ -z "$kernel" ] || dpkg --compare-versions "$v" gt "${kernel#/boot/vmlinuz-}"; then
        kernel=$k
    fi
done
if [ -z "$kernel" ]; then
    echo "install-vm: no /boot/vmlinuz-* with modules under /lib/modules after installing" \
        "linux-image-amd64" >&2
    exit 1
fi
say "install-vm: guest kernel $kernel"

if [ -x "$VENV/bin/vng" ] && [ -f "$VENV/.installed" ]; then
    say "install-vm: virtme-ng $VIRTME_NG_VERSION already in $VENV"
else
    say "install-vm: installing virtme-ng $VIRTME_NG_VERSION into $VENV"
    rm -rf "$VENV"
    # The project's interpreter: install-python.sh made sure it exists and can create venvs.
    py="$ROOT/.venv/bin/python"
    [ -x "$py" ] || py=${PYTHON:-python3}
    "$py" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "virtme-ng==$VIRTME_NG_VERSION"
    touch "$VENV/.installed"
fi

vfsd="$CSI_CACHE_DIR/bin/virtiofsd"
vfsd_stamp="$CSI_CACHE_DIR/stamps/virtiofsd"
mkdir -p "$CSI_CACHE_DIR/stamps"
if [ -x "$vfsd" ] && [ "$(cat "$vfsd_stamp" 2>/dev/null)" = "$VIRTIOFSD_VERSION" ]; then
    say "install-vm: virtiofsd $VIRTIOFSD_VERSION already in $vfsd"
else
    cargo=$(command -v cargo || true)
    [ -n "$cargo" ] || { [ -x "$HOME/.cargo/bin/cargo" ] && cargo=$HOME/.cargo/bin/cargo; }
    if [ -z "$cargo" ]; then
        say "install-vm: WARNING: no cargo, so no virtiofsd: the guest will use 9p (much slower)"
    else
        apt_install libseccomp-dev libcap-ng-dev pkg-config
        say "install-vm: building virtiofsd $VIRTIOFSD_VERSION with cargo (a few minutes, once)"
        build=$(mktemp -d)
        trap 'rm -rf "$build"' EXIT
        if CARGO_TARGET_DIR="$build/target" nice -n 10 "$cargo" install --quiet --locked \
            --root "$build/root" "virtiofsd@$VIRTIOFSD_VERSION" >&2; then
            install -m 0755 "$build/root/bin/virtiofsd" "$vfsd"
            echo "$VIRTIOFSD_VERSION" >"$vfsd_stamp"
            say "install-vm: virtiofsd $VIRTIOFSD_VERSION installed in $vfsd"
        else
            say "install-vm: WARNING: building virtiofsd failed: the guest will use 9p (slower)"
        fi
    fi
fi
echo "$VENV/bin/vng"
