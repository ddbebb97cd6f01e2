"""Scenario 4: a raw block volume (volumeMode: Block) consumed as a device."""

from __future__ import annotations

from .conftest import Release
from .kube import Kube, unique

DEVICE = "/dev/xvda"


def test_block_volume_written_and_read_back(driver: Release, ns: Kube) -> None:
    claim = unique("raw")
    ns.pvc(claim, "32Mi", block=True)
    writer = unique("blk-writer")
    ns.pod_with_claim(writer, claim, block=True)
    ns.wait_running(writer)
    pvc = ns.wait_pvc_bound(claim)
    assert ns.read_pv(pvc["spec"]["volumeName"])["spec"]["volumeMode"] == "Block"

    # A block device of the requested size, not a directory.
    assert ns.exec(writer, f"test -b {DEVICE} && echo block").strip() == "block"
    size = int(ns.exec(writer, f"blockdev --getsize64 {DEVICE}").strip())
    assert size >= 32 * 1024 * 1024
    # 1 MiB of random bytes at offset 4 MiB, flushed, read back by another pod: the bytes must
    # have reached the volume's backing store.
    digest = ns.exec(
        writer,
        "dd if=/dev/urandom of=/tmp/blob bs=64k count=16 2>/dev/null && "
        f"dd if=/tmp/blob of={DEVICE} bs=64k seek=64 conv=fsync 2>/dev/null && "
        "sha256sum /tmp/blob | cut -d' ' -f1",
    ).strip()
    assert len(digest) == 64
    ns.delete_pod(writer)

    reader = unique("blk-reader")
    ns.pod_with_claim(reader, claim, block=True)
    ns.wait_running(reader)
    again = ns.exec(
        reader, f"dd if={DEVICE} bs=64k skip=64 count=16 2>/dev/null | sha256sum | cut -d' ' -f1"
    ).strip()
    assert again == digest
