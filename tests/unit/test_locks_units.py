import threading

import pytest

from csi_driver.errors import Aborted
from csi_driver.locks import KeyLocks
from csi_driver.units import parse_bytes, round_up


def test_second_holder_of_a_key_is_aborted_and_key_is_released_after() -> None:
    locks = KeyLocks()
    with locks.hold("vol-1", "name-1"):
        with pytest.raises(Aborted, match="vol-1"), locks.hold("vol-1"):
            pass
        with pytest.raises(Aborted), locks.hold("other", "name-1"):
            pass
        assert not locks.is_held("other")  # the failed attempt took nothing
        with locks.hold("vol-2"):
            assert locks.is_held("vol-2")
    assert not locks.is_held("vol-1")
    with locks.hold("vol-1"):
        pass


def test_lock_released_when_body_raises() -> None:
    locks = KeyLocks()
    with pytest.raises(RuntimeError), locks.hold("k"):
        raise RuntimeError("boom")
    assert not locks.is_held("k")


def test_concurrent_threads_exactly_one_wins() -> None:
    locks = KeyLocks()
    barrier = threading.Barrier(8)
    inside = threading.Event()
    release = threading.Event()
    outcomes: list[str] = []

    def worker() -> None:
        barrier.wait()
        try:
            with locks.hold("same"):
                inside.set()
                release.wait(5)
                outcomes.append("ran")
        except Aborted:
            outcomes.append("aborted")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    inside.wait(5)
    # Release the winner only once every other thread has tried (and been turned away).
    for _ in range(500):
        if outcomes.count("aborted") == 7:
            break
        threading.Event().wait(0.01)
    release.set()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["aborted"] * 7 + ["ran"]


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("4096", 4096), ("1Ki", 1024), ("1Gi", 2**30), ("500M", 500 * 10**6), ("2k", 2000)],
)
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "-1", "1.5Gi", "1GB", "Gi", "1 Gi x"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="byte quantity"):
        parse_bytes(text)


def test_round_up() -> None:
    assert round_up(1, 4096) == 4096
    assert round_up(4096, 4096) == 4096
    assert round_up(0, 4096) == 0
