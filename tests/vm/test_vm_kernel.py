"""The VM lane's own smoke test: the guest kernel really has what the lane exists for.

If these fail, every other test in tests/vm fails for a reason that is not the driver's.
Runs only inside the VM (scripts/test-vm.sh sets CSI_VM_LANE=1 and the CSI_TEST_* variables).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

if os.environ.get("CSI_VM_LANE") != "1":
    pytest.skip("runs inside the real-kernel VM: scripts/test-vm.sh", allow_module_level=True)

pytestmark = pytest.mark.vm

VG = os.environ["CSI_TEST_VG"]
THINPOOL = os.environ["CSI_TEST_THINPOOL"]


def run(*argv: str, timeout: float = 120) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


@pytest.fixture
def thin_lv() -> Iterator[Path]:
    """A thin LV of 320 MiB (virtual, so it costs the pool only what is written): mkfs.xfs
    refuses anything under 300 MB."""
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    run("lvcreate", "-y", "-V", "320M", "-T", f"{VG}/{THINPOOL}", "-n", name)
    try:
        yield Path(f"/dev/{VG}/{name}")
    finally:
        run("lvremove", "-f", "-y", f"{VG}/{name}")


def test_device_mapper_is_in_the_kernel() -> None:
    assert Path("/sys/class/misc/device-mapper").exists()
    assert "Driver version:" in run("dmsetup", "version")


def test_lvs_reports_the_lane_thin_pool() -> None:
    report = json.loads(run("lvs", "--reportformat", "json", "-o", "lv_name,segtype,pv_count", VG))
    lvs = {lv["lv_name"]: lv for lv in report["report"][0]["lv"]}
    assert lvs[THINPOOL]["segtype"] == "thin-pool"
    pvs = json.loads(run("pvs", "--reportformat", "json", "-o", "pv_name,vg_name"))
    in_vg = sorted(pv["pv_name"] for pv in pvs["report"][0]["pv"] if pv["vg_name"] == VG)
    assert in_vg == sorted(os.environ["CSI_TEST_PVS"].split())


def test_thin_volume_keeps_the_bytes_written(thin_lv: Path) -> None:
    payload = os.urandom(1 << 20)
    with thin_lv.open("r+b") as dev:
        dev.seek(8 << 20)
        dev.write(payload)
        dev.flush()
        os.fsync(dev.fileno())
    run("blockdev", "--flushbufs", str(thin_lv))
    with thin_lv.open("rb") as dev:
        dev.seek(8 << 20)
        assert dev.read(len(payload)) == payload


def test_xfs_project_quota_is_enforced(thin_lv: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mkfs.xfs", "-q", "-f", str(thin_lv))
    run("mount", "-o", "prjquota", str(thin_lv), str(mnt))
    try:
        limited = mnt / "limited"
        limited.mkdir()
        run("xfs_quota", "-x", "-c", f"project -s -p {limited} 42", str(mnt))
        run("xfs_quota", "-x", "-c", "limit -p bhard=4m 42", str(mnt))
        with pytest.raises(OSError) as raised, (limited / "big").open("wb", buffering=0) as f:
            for _ in range(8):
                f.write(b"\0" * (1 << 20))
                os.fsync(f.fileno())
        # XFS reports a project's hard limit as a full filesystem (ENOSPC), user and group
        # limits as EDQUOT.
        assert raised.value.errno in (errno.ENOSPC, errno.EDQUOT)
        report = run("xfs_quota", "-x", "-c", "report -p -n -b", str(mnt))
        used_kib = next(int(r.split()[1]) for r in report.splitlines() if r.startswith("#42 "))
        assert 3 * 1024 <= used_kib <= 4 * 1024, report
        # Outside the project the same write succeeds: the limit is the project's, not the fs's.
        (mnt / "free").write_bytes(b"\0" * (8 << 20))
    finally:
        run("umount", str(mnt))
