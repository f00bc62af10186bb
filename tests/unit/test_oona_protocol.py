"""Oona's parsing and naming rules, without a server: XAUTOCLAIM replies, URLs, socket paths."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from esper.contracts import Envelope, EpochEvent, Topic
from esper.errors import BadInputError
from esper.oona import Oona, normalise_autoclaim, redact_url, socket_path_for
from esper.oona.embedded import MAX_SOCKET_PATH_BYTES
from esper.oona.streams import (
    DeadLetter,
    block_argument,
    dead_letter_fields,
    min_id_for_age,
    parse_envelope,
)
from esper.workspace import Workspace


def _epoch_envelope() -> Envelope:
    event = EpochEvent(run_id="r1", epoch=3, global_step=300, train_loss=0.5, validation_loss=0.6)
    return Envelope.wrap(Topic.SYSTEM_EVENTS_EPOCH, event, sender_id="tolaria")


# XAUTOCLAIM --------------------------------------------------------------------------------------

def test_autoclaim_two_element_reply_of_redis_6_2():
    # Literal wire shape from redis-server 6.2.14: a deleted entry is a bare nil.
    reply = [b"0-0", [[b"1-0", [b"e", b"x"]], None, [b"3-0", [b"e", b"z", b"k", b"v"]]]]
    got = normalise_autoclaim(reply)
    assert got.next_id == "0-0"
    assert got.claimed == [("1-0", {b"e": b"x"}), ("3-0", {b"e": b"z", b"k": b"v"})]
    assert got.deleted_ids == []
    assert got.unnamed_deleted == 1


def test_autoclaim_two_element_reply_with_named_nil_body():
    got = normalise_autoclaim([b"5-0", [[b"4-0", None]]])
    assert (got.next_id, got.claimed, got.deleted_ids) == ("5-0", [], ["4-0"])
    assert got.unnamed_deleted == 0


def test_autoclaim_three_element_reply_of_redis_7():
    reply = [b"7-1", [[b"6-0", [b"e", b"y"]]], [b"2-0", b"2-1"]]
    got = normalise_autoclaim(reply)
    assert got.next_id == "7-1"
    assert got.claimed == [("6-0", {b"e": b"y"})]
    assert got.deleted_ids == ["2-0", "2-1"]
    assert got.unnamed_deleted == 0


@pytest.mark.parametrize("reply", [[b"0-0"], [b"0-0", [], [], []]])
def test_autoclaim_reply_of_another_shape_is_refused(reply):
    with pytest.raises(ValueError, match="expected 2 or 3"):
        normalise_autoclaim(reply)


# URLs --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, shown", [
    ("redis://:s3cret@db.example:6380/0", "redis://:***@db.example:6380/0"),
    ("rediss://alice:s3cret@db.example/1", "rediss://alice:***@db.example/1"),
    ("unix://:s3cret@/run/redis.sock", "unix://:***@/run/redis.sock"),
    ("redis://db.example:6379?password=s3cret&db=2", "redis://db.example:6379?password=***&db=2"),
    ("redis://db.example:6379/0", "redis://db.example:6379/0"),
])
def test_redact_url_hides_only_the_password(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize("url, reason", [
    ("http://:s3cret@db.example:6379", "scheme"),
    ("db.example:6379", "scheme"),
    ("redis://:s3cret@db.example:notaport", "Port"),
    ("redis://:s3cret@db.example:99999", "Port"),
    ("redis://:s3cret@:6379", "no host"),
    ("unix://", "socket's path"),
    ("redis://:s3cret@db.example:6379/0?socket_timeout=soon", "socket_timeout"),
])
def test_bad_url_is_one_line_without_the_password(url, reason):
    with pytest.raises(BadInputError) as caught:
        Oona.connect(None, url, sender_id="test")
    message = str(caught.value)
    assert reason in message
    assert "s3cret" not in message
    assert "\n" not in message
    assert caught.value.exit_code == 2


def test_no_url_and_no_workspace_is_bad_input():
    with pytest.raises(BadInputError, match="no Redis URL and no workspace"):
        Oona.connect(None, None, sender_id="test")


# Socket paths ------------------------------------------------------------------------------------

def test_socket_lives_in_the_workspace_when_the_path_is_short():
    workspace = Workspace(Path("/srv/esper-ws"))
    assert socket_path_for(workspace) == Path("/srv/esper-ws/oona/redis.sock")


def test_socket_moves_to_a_short_private_place_when_the_path_is_too_long():
    deep = Workspace(Path("/data/" + "nested-directory/" * 8 + "ws"))
    other = Workspace(Path("/data/" + "nested-directory/" * 8 + "ws2"))
    chosen = socket_path_for(deep)
    assert len(str(deep.oona_dir / "redis.sock")) > MAX_SOCKET_PATH_BYTES
    assert len(str(chosen)) <= MAX_SOCKET_PATH_BYTES
    assert chosen.name == "redis.sock"
    assert chosen == socket_path_for(Workspace(deep.root))  # every process agrees
    assert chosen != socket_path_for(other)


# Stream entries ----------------------------------------------------------------------------------

def test_envelope_round_trips_through_its_entry_field():
    envelope = _epoch_envelope()
    parsed = parse_envelope(Topic.SYSTEM_EVENTS_EPOCH, "1-0", {b"e": envelope.to_json().encode()})
    assert parsed == envelope
    assert parsed.message.global_step == 300


@pytest.mark.parametrize("fields, reason", [
    ({b"junk": b"1"}, "no 'e' field"),
    ({b"e": b"{not json"}, "invalid Envelope"),
    ({b"e": b'{"topic": "system.events.epoch"}'}, "invalid Envelope"),
])
def test_entry_without_a_valid_envelope_is_bad_input(fields, reason):
    with pytest.raises(BadInputError, match=reason):
        parse_envelope(Topic.SYSTEM_EVENTS_EPOCH, "9-0", fields)


def test_envelope_in_the_wrong_stream_is_bad_input():
    fields = {b"e": _epoch_envelope().to_json().encode()}
    with pytest.raises(BadInputError, match="in the stream of control.run"):
        parse_envelope(Topic.CONTROL_RUN, "9-0", fields)


def test_min_id_for_age_counts_back_from_now():
    assert min_id_for_age(timedelta(hours=72), now_ms=300_000_000) == "40800000-0"
    assert min_id_for_age(timedelta(days=3650), now_ms=1_000) == "0-0"


def test_dead_letter_keeps_the_original_fields_apart():
    fields = dead_letter_fields(reason="bad", original_id="5-0", group="tamiyo", consumer="c1",
                                deliveries=3, body={b"reason": b"theirs", b"e": b"{}"})
    encoded = {k: v.encode() if isinstance(v, str) else v for k, v in fields.items()}
    letter = DeadLetter.from_fields("8-0", encoded)
    assert (letter.reason, letter.original_id, letter.group, letter.deliveries) == \
        ("bad", "5-0", "tamiyo", 3)
    assert letter.body == {"reason": b"theirs", "e": b"{}"}


@pytest.mark.parametrize("block_ms, sent", [(None, None), (250, 250), (60_000, 5_000)])
def test_block_argument(block_ms, sent):
    assert block_argument(block_ms) == sent


def test_block_zero_is_refused_because_redis_reads_it_as_forever():
    with pytest.raises(ValueError, match="positive"):
        block_argument(0)
