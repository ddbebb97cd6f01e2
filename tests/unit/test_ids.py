import pytest

from csi_driver import ids
from csi_driver.errors import InvalidArgument, NotFound


def test_ids_are_deterministic_and_carry_the_node() -> None:
    a = ids.volume_id_for("pvc-1", "node-a")
    assert a == ids.volume_id_for("pvc-1", "node-a")
    assert a != ids.volume_id_for("pvc-2", "node-a")
    parsed = ids.require_volume_id(a)
    assert parsed.node_id == "node-a"
    assert parsed.local.startswith("v") and len(parsed.local) == 33
    assert str(parsed) == a


def test_snapshot_ids_are_not_volume_ids() -> None:
    s = ids.snapshot_id_for("snap", "n")
    assert ids.parse(s, "v") is None
    assert ids.require_snapshot_id(s).kind == "s"
    with pytest.raises(NotFound):
        ids.require_volume_id(s)


@pytest.mark.parametrize(
    "value", ["../../etc", "v" + "0" * 32 + "@../x", "a/b", "x\x00y", "v" * 300]
)
def test_unsafe_ids_are_invalid_argument(value: str) -> None:
    with pytest.raises(InvalidArgument):
        ids.require_volume_id(value)


@pytest.mark.parametrize("value", ["some-volume", "v1234@node", "V" + "0" * 32 + "@n"])
def test_foreign_ids_are_not_found(value: str) -> None:
    with pytest.raises(NotFound):
        ids.require_volume_id(value)


def test_empty_id_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        ids.require_volume_id("")


def test_the_local_part_is_given_only_for_this_nodes_ids_of_the_kind() -> None:
    v = ids.volume_id_for("pvc-1", "node-a")
    local = ids.local_of(v, "v", "node-a")
    assert local is not None and local == v.partition("@")[0]
    assert ids.id_of(local, "node-a") == v
    assert ids.local_of(v, "v", "node-b") is None
    assert ids.local_of(v, "s", "node-a") is None
    assert ids.local_of(v + "\n", "v", "node-a") is None
    assert ids.local_of("", "v", "node-a") is None
