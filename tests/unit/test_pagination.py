import base64

import grpc
import pytest

from csi_driver import ids
from csi_driver.errors import Aborted, InvalidArgument
from csi_driver.services import pagination


def vol_ids(n: int) -> list[str]:
    return sorted(ids.volume_id_for(f"pvc-{i}", "n1") for i in range(n))


def walk(items: list[str], max_entries: int) -> list[list[str]]:
    pages = []
    token = ""
    while True:
        page, token = pagination.paginate(items, lambda x: x, "v", max_entries, token)
        pages.append(page)
        if not token:
            return pages


def test_pages_cover_everything_once_in_order() -> None:
    items = vol_ids(7)
    pages = walk(list(reversed(items)), 3)
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [x for p in pages for x in p] == items


def test_exact_multiple_has_no_empty_trailing_page() -> None:
    pages = walk(vol_ids(4), 2)
    assert [len(p) for p in pages] == [2, 2]


def test_zero_means_everything_and_negative_is_invalid() -> None:
    items = vol_ids(5)
    assert pagination.paginate(items, lambda x: x, "v", 0, "") == (items, "")
    with pytest.raises(InvalidArgument) as exc:
        pagination.paginate(items, lambda x: x, "v", -1, "")
    assert exc.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_token_survives_deleting_the_last_listed_entry() -> None:
    items = vol_ids(5)
    first, token = pagination.paginate(items, lambda x: x, "v", 2, "")
    remaining = [i for i in items if i not in first]
    rest, token2 = pagination.paginate(remaining, lambda x: x, "v", 0, token)
    assert rest == remaining and token2 == ""


def test_token_is_opaque_and_round_trips() -> None:
    last = vol_ids(1)[0]
    token = pagination.encode_token("v", last)
    assert last not in token
    assert pagination.decode_token(token, "v") == last


@pytest.mark.parametrize(
    "token",
    [
        "invalid-token",
        "!!!",
        "x" * 600,
        base64.urlsafe_b64encode(b"v1:v:not-an-id").decode(),
        base64.urlsafe_b64encode(b"v2:v:" + vol_ids(1)[0].encode()).decode().rstrip("="),
        # canonical token plus padding: not the exact string the driver issued
        pagination.encode_token("v", vol_ids(1)[0]) + "==",
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ],
)
def test_foreign_tokens_are_aborted(token: str) -> None:
    with pytest.raises(Aborted) as exc:
        pagination.paginate(vol_ids(3), lambda x: x, "v", 0, token)
    assert exc.value.code is grpc.StatusCode.ABORTED


def test_volume_token_is_not_a_snapshot_token() -> None:
    token = pagination.encode_token("v", vol_ids(1)[0])
    with pytest.raises(Aborted):
        pagination.decode_token(token, "s")
