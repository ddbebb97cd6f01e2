import base64
from collections.abc import Callable

import grpc
import pytest

from csi_driver import ids
from csi_driver.backends.base import listed_after
from csi_driver.errors import Aborted, InvalidArgument
from csi_driver.services import pagination


class Entry(str):
    """A reply entry: the id, and as many serialized bytes as ``size`` says."""

    size = 10

    def ByteSize(self) -> int:  # protobuf spells it so
        return self.size


def paginate(
    items: list[str], key: Callable[[str], str], kind: str, max_entries: int, token: str
) -> tuple[list[str], str]:
    """``pagination.page`` over entries at hand, listed by the backends' rule."""
    entries, next_token = pagination.page(
        lambda after, limit: listed_after(items, key, after, limit),
        key,
        kind,
        max_entries,
        token,
        Entry,
    )
    return [str(e) for e in entries], next_token


def vol_ids(n: int) -> list[str]:
    return sorted(ids.volume_id_for(f"pvc-{i}", "n1") for i in range(n))


def walk(items: list[str], max_entries: int) -> list[list[str]]:
    pages = []
    token = ""
    while True:
        page, token = paginate(items, lambda x: x, "v", max_entries, token)
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
    assert paginate(items, lambda x: x, "v", 0, "") == (items, "")
    with pytest.raises(InvalidArgument) as exc:
        paginate(items, lambda x: x, "v", -1, "")
    assert exc.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_token_survives_deleting_the_last_listed_entry() -> None:
    items = vol_ids(5)
    first, token = paginate(items, lambda x: x, "v", 2, "")
    remaining = [i for i in items if i not in first]
    rest, token2 = paginate(remaining, lambda x: x, "v", 0, token)
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
        paginate(vol_ids(3), lambda x: x, "v", 0, token)
    assert exc.value.code is grpc.StatusCode.ABORTED


def test_volume_token_is_not_a_snapshot_token() -> None:
    token = pagination.encode_token("v", vol_ids(1)[0])
    with pytest.raises(Aborted):
        pagination.decode_token(token, "s")


def test_a_page_asks_for_one_entry_more_after_the_token_id() -> None:
    """The lister is asked once per page: after the id the token names, one entry more than
    the page, which says whether another page follows."""
    items = vol_ids(5)
    asked: list[tuple[str, int]] = []

    def list_after(after: str, limit: int) -> list[str]:
        asked.append((after, limit))
        return [i for i in items if i > after][: limit or None]

    first, token = pagination.page(list_after, lambda x: x, "v", 2, "", Entry)
    second, token = pagination.page(list_after, lambda x: x, "v", 2, token, Entry)
    rest, token = pagination.page(list_after, lambda x: x, "v", 0, token, Entry)
    assert (first, second, rest, token) == (items[:2], items[2:4], items[4:], "")
    cap = pagination.MAX_PAGE_ENTRIES + 1
    assert asked == [("", 3), (items[1], 3), (items[3], cap)]


def test_a_reply_stops_at_its_entry_and_byte_bounds_with_a_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """max_entries 0 (no limit asked) still gets pages the clients' 4 MiB receive limit can
    take; the tokens lead through every entry once."""
    items = vol_ids(23)
    monkeypatch.setattr(pagination, "MAX_PAGE_ENTRIES", 10)
    assert [len(p) for p in walk(items, 0)] == [10, 10, 3]
    assert [len(p) for p in walk(items, 50)] == [10, 10, 3]
    monkeypatch.setattr(pagination, "MAX_PAGE_BYTES", 4 * (Entry.size + 8))
    pages = walk(items, 0)
    assert [len(p) for p in pages] == [4, 4, 4, 4, 4, 3]
    assert [x for p in pages for x in p] == items
