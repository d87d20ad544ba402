"""commandbus.uuid7: RFC 9562 version 7 ids, ordered by their millisecond."""

from __future__ import annotations

import time
import uuid

from commandbus import uuid7


def test_an_id_is_version_7_with_the_rfc_variant_and_now_as_its_time() -> None:
    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000
    assert isinstance(value, uuid.UUID)
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    assert before <= value.int >> 80 <= after


def test_ids_of_later_milliseconds_sort_after_and_all_are_distinct() -> None:
    first = [uuid7() for _ in range(5_000)]
    time.sleep(0.002)
    later = [uuid7() for _ in range(5_000)]
    assert max(first) < min(later)
    assert len(set(first + later)) == 10_000
    # random within a millisecond: not one value repeated with a counter
    assert len({v.int & ((1 << 62) - 1) for v in first}) == 5_000
