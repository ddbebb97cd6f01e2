"""The per-call memo of lvm2 reports (csi_driver/callmemo.py, Lvm2.report): one call reads the
volume groups once until something changes; no answer outlives its call."""

from __future__ import annotations

import threading

import grpc
import pytest

from csi_driver import callmemo
from csi_driver.backends.lvm.backend import LvmBackend
from csi_driver.errors import CsiError
from tests.unit.test_lvm import NODE, THICK, THIN, FakeLvm, spec


def _backend() -> tuple[LvmBackend, FakeLvm]:
    lvm = FakeLvm()
    lvm.add_pool()
    backend = LvmBackend([THIN, THICK], NODE, lvm, udev_sync=False)
    return backend, lvm


def test_one_call_reads_the_volume_groups_once() -> None:
    backend, lvm = _backend()
    volume = backend.create_volume(spec(backend))
    lvm.calls.clear()
    with callmemo.call():
        assert backend.get_volume(volume.id) == volume
        assert backend.locate(volume.id) is not None
        assert backend.get_volume(volume.id) == volume
    assert lvm.commands() == ["fullreport"]


def test_a_change_in_the_call_is_seen_by_its_next_read() -> None:
    backend, lvm = _backend()
    volume = backend.create_volume(spec(backend))
    lvm.calls.clear()
    with callmemo.call():
        backend.set_published(volume.id, "node-a", True)
        backend.set_published(volume.id, "node-a", True)  # reads again: now tagged, no change
    assert lvm.commands() == ["fullreport", "lvchange", "fullreport"]


def test_a_change_by_another_call_drops_the_memo() -> None:
    backend, lvm = _backend()
    volume = backend.create_volume(spec(backend))
    other = backend.create_volume(spec(backend, "pvc-2"))
    lvm.calls.clear()
    with callmemo.call():
        assert backend.get_volume(volume.id) is not None
        # another RPC's thread removes a volume between two reads of this one
        t = threading.Thread(target=callmemo.in_call, args=(backend.delete_volume, other.id))
        t.start()
        t.join()
        assert backend.get_volume(other.id) is None
    assert lvm.commands() == ["fullreport", "fullreport", "lvremove", "fullreport"]


def test_nothing_is_remembered_outside_a_call_or_after_it() -> None:
    backend, lvm = _backend()
    volume = backend.create_volume(spec(backend))
    lvm.calls.clear()
    backend.get_volume(volume.id)
    backend.get_volume(volume.id)
    with callmemo.call():
        backend.get_volume(volume.id)
    with callmemo.call():
        backend.get_volume(volume.id)
    assert callmemo.current() is None
    assert lvm.commands() == ["fullreport"] * 4


def test_an_unmount_in_the_call_is_seen_by_the_delete_that_follows() -> None:
    """An inline volume's unpublish unmounts and then deletes in one call: the delete must
    not trust the 'open' flag read before the unmount (callmemo.forget, as the mounter
    calls it)."""
    backend, lvm = _backend()
    volume = backend.create_volume(spec(backend))
    lv = volume.id.partition("@")[0]
    lvm.lvs[lv]["lv_attr"] = lvm.lvs[lv]["lv_attr"][:5] + "o" + lvm.lvs[lv]["lv_attr"][6:]
    with callmemo.call():
        assert backend.get_volume(volume.id) is not None  # read while mounted
        lvm.lvs[lv]["lv_attr"] = lvm.lvs[lv]["lv_attr"][:5] + "-" + lvm.lvs[lv]["lv_attr"][6:]
        with pytest.raises(CsiError) as stale:
            backend.delete_volume(volume.id)  # without forget: the stale flag refuses it
        assert stale.value.code is grpc.StatusCode.FAILED_PRECONDITION
        callmemo.forget()
        backend.delete_volume(volume.id)
    assert lv not in lvm.lvs


def test_a_call_inside_a_call_keeps_the_outer_memo() -> None:
    with callmemo.call() as outer:
        outer["a"] = 1
        with callmemo.call() as inner:
            assert inner == {}
        assert callmemo.current() is outer
    assert callmemo.current() is None
