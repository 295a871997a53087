"""Broker frames: exact JSON names, round trips, and typed errors for any input."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from claudemesh.shared.protocol import errors, wire
from claudemesh.shared.protocol.errors import RemoteProtocolError

PK = "ab" * 32
SIG = "cd" * 64

SAMPLES: list[wire.Frame] = [
    wire.Hello(
        mesh_id="m",
        member_id="u",
        pubkey=PK,
        session_id="s",
        pid=1,
        cwd="/",
        timestamp=1,
        signature=SIG,
        groups=[wire.GroupRef(name="ops", role="lead")],
    ),
    wire.HelloAck(presence_id="p", member_display_name="alice", limits=wire.Limits(max_frame=10)),
    wire.Send(
        id="1",
        target_spec=PK,
        priority="next",
        nonce="bm9uY2U=",
        ciphertext="Y3Q=",
        client_message_id="c1",
        request_fingerprint="f" * 64,
    ),
    wire.Ack(id="1", message_id="b1", queued=True, client_message_id="c1", duplicate=True),
    wire.Ack(id="1", queued=False, error=wire.ErrorInfo(code="payload_too_large", message="x")),
    wire.Push(
        message_id="b1",
        mesh_id="m",
        sender_pubkey=PK,
        priority="now",
        nonce="n",
        ciphertext="c",
        created_at="2026-01-01T00:00:00Z",
        subtype="system",
        event="peer_joined",
        event_data={"pubkey": PK, "name": "bob"},
    ),
    wire.ClientAck(broker_message_id="b1"),
    wire.Receipt(message_id="b1", state="delivered", receipt_id="r1", client_message_id="c1"),
    wire.ListPeers(),
    wire.PeersList(
        peers=[
            wire.PeerInfo(
                pubkey=PK,
                display_name="bob",
                status="idle",
                summary="",
                groups=[],
                session_id="",
                connected_at="",
                online=True,
            )
        ]
    ),
    wire.SetStatus(status="working"),
    wire.SetSummary(summary="refactoring"),
    wire.JoinGroup(name="ops"),
    wire.LeaveGroup(name="ops"),
    wire.Error(code="unauthorized", message="no"),
    wire.MeshCreate(id="1", name="team", pubkey=PK, timestamp=1, signature=SIG),
    wire.MeshCreated(id="1", mesh_id="m", member_id="u"),
    wire.InvitePut(
        id="1", invite_id="i", expires_at=5, claim_pubkey=PK, sealed="c2Vh", signature=SIG
    ),
    wire.InviteRevoke(id="1", invite_id="i"),
    wire.InviteClaim(
        id="1",
        mesh_id="m",
        invite_id="i",
        member_pubkey=PK,
        display_name="b",
        timestamp=1,
        signature=SIG,
    ),
    wire.InviteClaimed(
        id="1",
        mesh_id="m",
        member_id="u",
        invite_id="i",
        role="member",
        uses=1,
        expires_at=5,
        claim_pubkey=PK,
        sealed="c2Vh",
        admin_pubkey=PK,
        admin_signature=SIG,
    ),
    wire.Ok(id="1"),
    wire.SessionHello(
        session_pubkey=PK,
        session_id="s",
        timestamp=1,
        signature=SIG,
        attestation=wire.SessionAttestation(
            parent_pk=PK, session_pk=PK, expires_at=2, signature=SIG
        ),
    ),
    wire.SessionBye(session_pubkey=PK),
]


def test_every_frame_type_has_a_sample() -> None:
    assert {json.loads(wire.encode_frame(f))["type"] for f in SAMPLES} == wire.FRAME_TYPES


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: type(f).__name__)
def test_round_trip(frame: wire.Frame) -> None:
    assert wire.decode_frame(wire.encode_frame(frame)) == frame


def test_exact_v01_json_names() -> None:
    hello = json.loads(wire.encode_frame(SAMPLES[0]))
    assert set(hello) >= {
        "type",
        "meshId",
        "memberId",
        "pubkey",
        "sessionId",
        "pid",
        "cwd",
        "timestamp",
        "signature",
    }
    send = json.loads(wire.encode_frame(SAMPLES[2]))
    assert set(send) == {
        "type",
        "id",
        "targetSpec",
        "priority",
        "nonce",
        "ciphertext",
        "client_message_id",
        "request_fingerprint",
    }
    push = json.loads(wire.encode_frame(SAMPLES[5]))
    assert {"messageId", "meshId", "senderPubkey", "createdAt", "eventData"} <= set(push)
    ack = json.loads(wire.encode_frame(SAMPLES[0 + 3]))
    assert ack == {
        "type": "ack",
        "id": "1",
        "messageId": "b1",
        "queued": True,
        "client_message_id": "c1",
        "duplicate": True,
    }
    assert json.loads(wire.encode_frame(wire.ClientAck(broker_message_id="b"))) == {
        "type": "client_ack",
        "brokerMessageId": "b",
    }


def test_reference_hello_decodes_and_unknown_fields_are_ignored() -> None:
    raw = {
        "type": "hello",
        "meshId": "m",
        "memberId": "u",
        "pubkey": PK,
        "sessionId": "s",
        "pid": 3,
        "cwd": "/w",
        "timestamp": 9,
        "signature": SIG,
        "peerType": "ai",
        "someFutureField": {"x": 1},
    }
    frame = wire.decode_frame(json.dumps(raw))
    assert isinstance(frame, wire.Hello)
    assert frame.peer_type == "ai"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", errors.MALFORMED),
        (b"not json", errors.MALFORMED),
        (b"[1,2]", errors.MALFORMED),
        (b'{"no": "type"}', errors.MALFORMED),
        (b'{"type": 5}', errors.MALFORMED),
        (b'{"type": "teleport"}', errors.UNKNOWN_TYPE),
        (b'{"type": "send", "id": "1"}', errors.INVALID_FIELD),
        (b'{"type": "set_status", "status": "asleep"}', errors.INVALID_FIELD),
        (b'{"type": "hello", "meshId": 1}', errors.INVALID_FIELD),
        (b'{"type": "send"', errors.MALFORMED),
        (b"\xff\xfe", errors.MALFORMED),
        (b"[" * 100_000, errors.MALFORMED),
    ],
)
def test_bad_input_gets_typed_error(data: bytes, code: str) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        wire.decode_frame(data)
    assert exc.value.code == code
    assert exc.value.message


def test_invalid_field_names_the_field() -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        wire.decode_frame(b'{"type": "send", "id": "1", "nonce": "", "ciphertext": ""}')
    assert "targetSpec" in exc.value.message


def test_oversize_frame() -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        wire.decode_frame(b"x" * 101, max_frame=100)
    assert exc.value.code == errors.FRAME_TOO_LARGE


def test_payload_too_large() -> None:
    big = wire.Send(id="1", target_spec="*", priority="low", nonce="", ciphertext="A" * (4 * 1000))
    wire.check_send(big, max_ciphertext=3000)
    with pytest.raises(RemoteProtocolError) as exc:
        wire.check_send(big, max_ciphertext=2999)
    assert exc.value.code == errors.PAYLOAD_TOO_LARGE
    assert wire.max_frame_bytes() > wire.MAX_CIPHERTEXT * 4 // 3


def test_b64_decoded_len() -> None:
    import base64

    for n in range(10):
        assert wire.b64_decoded_len(base64.b64encode(b"x" * n).decode()) == n


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4)
    ),
    max_leaves=20,
)


@given(st.binary(max_size=512))
def test_any_bytes_give_frame_or_typed_error(data: bytes) -> None:
    try:
        wire.decode_frame(data)
    except RemoteProtocolError as exc:
        assert exc.code in {errors.MALFORMED, errors.UNKNOWN_TYPE, errors.INVALID_FIELD}


@given(st.sampled_from(sorted(wire.FRAME_TYPES)), st.dictionaries(st.text(max_size=12), _json))
def test_any_object_with_known_type_gives_frame_or_typed_error(
    kind: str, fields: dict[str, object]
) -> None:
    data = msgspec.json.encode({**fields, "type": kind})
    try:
        frame = wire.decode_frame(data)
    except RemoteProtocolError as exc:
        assert exc.code in {errors.INVALID_FIELD, errors.MALFORMED}
    else:
        assert json.loads(wire.encode_frame(frame))["type"] == kind


@given(st.sampled_from(SAMPLES), st.integers(min_value=0, max_value=400))
def test_truncated_frames_give_typed_error(frame: wire.Frame, cut: int) -> None:
    data = wire.encode_frame(frame)
    if cut >= len(data):
        return
    with pytest.raises(RemoteProtocolError):
        wire.decode_frame(data[:cut])


def test_canonical_strings() -> None:
    assert wire.session_hello_canonical("m", "p", "s", 5) == "claudemesh-session-hello|m|p|s|5"
    assert wire.session_attest_canonical("p", "s", 7) == "claudemesh-session-attest|p|s|7"
    assert wire.is_pubkey_hex(PK)
    assert not wire.is_pubkey_hex(PK.upper())
    assert not wire.is_pubkey_hex(PK[:-1])


def test_v01_fields_are_on_the_wire_even_when_empty() -> None:
    """v0.1 clients read these unconditionally; omitting defaults must not drop them."""
    system = wire.Push(
        message_id="b",
        mesh_id="m",
        sender_pubkey=PK,
        priority="low",
        nonce="",
        ciphertext="",
        created_at="2026-01-01T00:00:00Z",
        subtype="system",
    )
    assert {"nonce", "ciphertext", "createdAt", "priority"} <= set(
        json.loads(wire.encode_frame(system))
    )
    offline = wire.PeerInfo(
        pubkey=PK,
        display_name="bob",
        status="idle",
        summary="",
        groups=[],
        session_id="",
        connected_at="",
    )
    listed = json.loads(wire.encode_frame(wire.PeersList(peers=[offline])))["peers"][0]
    assert {"status", "summary", "groups", "sessionId", "connectedAt"} <= set(listed)
