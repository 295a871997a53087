from __future__ import annotations

import time

from claudemesh.shared.protocol import ids


def test_uuid7_is_sortable_and_unique() -> None:
    made = [ids.uuid7() for _ in range(5000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    assert all(ids.is_uuid(m) and m[14] == "7" for m in made)


def test_uuid7_embeds_time() -> None:
    before = int(time.time() * 1000)
    value = ids.new_message_id()
    assert before - 5 <= ids.uuid7_time_ms(value) <= int(time.time() * 1000) + 5


def test_client_message_id_rules() -> None:
    assert ids.is_client_message_id("abc-123")
    assert not ids.is_client_message_id("")
    assert not ids.is_client_message_id("has space")
    assert not ids.is_client_message_id("x" * 129)
    assert not ids.is_client_message_id("é")
