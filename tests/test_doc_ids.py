"""New document ids (``POST /data/{collection}``): 32 lowercase hex characters, unique, and in
creation order from one millisecond to the next, so CouchDB appends them to its b-tree."""

from __future__ import annotations

import re
import time

from vibed.data import check_doc_id, new_doc_id


def test_new_ids_are_hex_unique_valid_and_in_creation_order() -> None:
    ids = [new_doc_id() for _ in range(2000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", doc_id) for doc_id in ids)
    assert len(set(ids)) == len(ids)
    assert all(check_doc_id(doc_id) == doc_id for doc_id in ids[:10])
    later = []
    for _ in range(5):
        time.sleep(0.002)
        later.append(new_doc_id())
    assert later == sorted(later) and max(ids) < later[0]
    # The leading 12 digits are the creation time in milliseconds.
    assert abs(int(later[-1][:12], 16) - time.time() * 1000) < 5_000
