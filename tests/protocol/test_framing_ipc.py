"""IPC framing and frames: any chunking, oversize and corrupt input."""

from __future__ import annotations

import struct

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from claudemesh.shared.protocol import errors, ipc
from claudemesh.shared.protocol.errors import LocalProtocolError, RemoteProtocolError
from claudemesh.shared.protocol.framing import MAX_IPC_FRAME, FrameBuffer, frame_bytes

FRAMES: list[ipc.IpcFrame] = [
    ipc.Hello(client="cli", pid=5, cwd="/tmp", session_id="s1"),
    ipc.Welcome(daemon_version="0.1.0", features=["subscribe"], workspace="team"),
    ipc.Error(code="malformed", message="bad"),
    ipc.Request(id=1, method="message.send", params={"to": "bob", "body": "hi"}),
    ipc.Reply(id=1, result={"client_message_id": "c", "state": "accepted"}),
    ipc.error_reply(2, ipc.NOT_FOUND, "no peer 'bobb'", candidates=["bob"]),
    ipc.Event(sub=3, cursor=42, kind="message", data={"body": "hi"}),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_round_trip(frame: ipc.IpcFrame) -> None:
    buf = FrameBuffer()
    (body,) = buf.feed(ipc.encode_ipc(frame))
    assert ipc.decode_ipc(body) == frame
    assert buf.pending == 0


def test_error_reply_shape() -> None:
    rep = ipc.error_reply(2, ipc.NOT_FOUND, "nope", candidates=["bob"])
    assert not rep.ok
    assert rep.error is not None
    assert rep.error.details == {"candidates": ["bob"]}
    assert ipc.Reply(id=1, result=None).ok


@given(st.lists(st.integers(min_value=1, max_value=50), max_size=40))
def test_any_chunking_yields_the_same_frames(cuts: list[int]) -> None:
    stream = b"".join(ipc.encode_ipc(f) for f in FRAMES)
    buf = FrameBuffer()
    got: list[bytes] = []
    pos = 0
    for cut in cuts:
        got += buf.feed(stream[pos : pos + cut])
        pos += cut
    got += buf.feed(stream[pos:])
    buf.check_eof()
    assert [ipc.decode_ipc(b) for b in got] == FRAMES


def test_oversize_announced_length_is_refused_before_buffering() -> None:
    buf = FrameBuffer(max_frame=100)
    with pytest.raises(RemoteProtocolError) as exc:
        buf.feed(struct.pack(">I", 101))
    assert exc.value.code == errors.FRAME_TOO_LARGE
    assert buf.pending == 0
    with pytest.raises(RemoteProtocolError):  # stays broken
        buf.feed(b"\x00\x00\x00\x01x")


def test_default_limit_is_one_mebibyte() -> None:
    assert MAX_IPC_FRAME == 1024 * 1024
    FrameBuffer().feed(frame_bytes(b"x" * MAX_IPC_FRAME))
    with pytest.raises(LocalProtocolError):
        frame_bytes(b"x" * (MAX_IPC_FRAME + 1))
    with pytest.raises(RemoteProtocolError):
        FrameBuffer().feed(struct.pack(">I", MAX_IPC_FRAME + 1))


def test_truncated_stream() -> None:
    buf = FrameBuffer()
    assert buf.feed(ipc.encode_ipc(FRAMES[0])[:-1]) == []
    with pytest.raises(RemoteProtocolError) as exc:
        buf.check_eof()
    assert exc.value.code == errors.MALFORMED


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", errors.MALFORMED),
        (b"\xc1", errors.MALFORMED),
        (msgspec.msgpack.encode([1, 2]), errors.MALFORMED),
        (msgspec.msgpack.encode({"type": "warp"}), errors.UNKNOWN_TYPE),
        (msgspec.msgpack.encode({"type": "req", "id": "x", "method": 1}), errors.INVALID_FIELD),
        (msgspec.msgpack.encode({"type": "req"}), errors.INVALID_FIELD),
    ],
)
def test_corrupt_body(body: bytes, code: str) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        ipc.decode_ipc(body)
    assert exc.value.code == code


@given(st.binary(max_size=300))
def test_any_body_gives_frame_or_typed_error(body: bytes) -> None:
    try:
        ipc.decode_ipc(body)
    except RemoteProtocolError as exc:
        assert exc.code in {errors.MALFORMED, errors.UNKNOWN_TYPE, errors.INVALID_FIELD}


@given(st.binary(max_size=600))
def test_any_stream_gives_bodies_or_typed_error(stream: bytes) -> None:
    buf = FrameBuffer(max_frame=256)
    try:
        for body in buf.feed(stream):
            assert len(body) <= 256
    except RemoteProtocolError as exc:
        assert exc.code == errors.FRAME_TOO_LARGE
