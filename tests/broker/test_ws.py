"""The broker's RFC 6455 framer: exact frames, every violation a FrameError, nothing else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import wsproto
from cmtest.broker import open_inproc_broker, open_peer
from hypothesis import given
from hypothesis import strategies as st
from wsproto.events import AcceptConnection, CloseConnection, Message, Ping, Request, TextMessage

from claudemesh.broker.ws import FrameError, Framer, frame_close, frame_text
from claudemesh.shared.protocol import wire


def client() -> wsproto.connection.Connection:
    """A wsproto client connection past the handshake: it masks like a real client."""
    return wsproto.connection.Connection(wsproto.ConnectionType.CLIENT)


def test_masked_text_fragments_ping_and_close() -> None:
    c = client()
    data = c.send(TextMessage(data="héllo", message_finished=False))
    data += c.send(Ping(payload=b"p1"))
    data += c.send(TextMessage(data=" world"))
    data += c.send(Message(data=b"\x00\x01"))  # binary
    data += c.send(CloseConnection(code=1000, reason="bye"))
    f = Framer(1 << 20)
    events = []
    for i in range(len(data)):  # byte by byte: no frame boundary assumptions
        events += f.feed(data[i : i + 1])
    assert events == [
        ("ping", b"p1"),
        ("message", "héllo world"),
        ("message", b"\x00\x01"),
        ("close", 1000, "bye"),
    ]


def test_server_frames_parse_in_a_client() -> None:
    c = client()
    c.receive_data(frame_text("x" * 70_000) + frame_text("y") + frame_close(1008, "no"))
    got = list(c.events())
    assert [type(e).__name__ for e in got] == ["TextMessage", "TextMessage", "CloseConnection"]
    assert got[0].data == "x" * 70_000
    assert got[2].code == 1008


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\x81\x05hello", 1002),  # unmasked
        (b"\xc1\x80abcd", 1002),  # reserved bit
        (b"\x83\x80abcd", 1002),  # unknown opcode
        (b"\x80\x80abcd", 1002),  # continuation without a start
        (b"\x09\x80abcd", 1002),  # fragmented ping
    ],
)
def test_violations(raw: bytes, code: int) -> None:
    with pytest.raises(FrameError) as info:
        Framer(1024).feed(raw)
    assert info.value.code == code


def test_too_big_and_bad_utf8() -> None:
    c = client()
    with pytest.raises(FrameError) as info:
        Framer(10).feed(c.send(TextMessage(data="x" * 11)))
    assert info.value.code == 1009
    bad = bytes([0x81, 0x82]) + b"\x00\x00\x00\x00" + b"\xff\xfe"
    with pytest.raises(FrameError) as info:
        Framer(10).feed(bad)
    assert info.value.code == 1007


@given(st.binary(max_size=300))
def test_any_bytes_give_events_or_frame_error(data: bytes) -> None:
    f = Framer(4096)
    try:
        f.feed(data)
    except FrameError:
        pass


async def test_garbage_after_handshake_closes_only_that_connection(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice = b.member(mesh, "alice")
        async with open_peer(b.url, alice) as a:
            for junk in (b"\x81\x05hello", os.urandom(64), b"\x88\x80\x00\x00\x00\x00"):
                stream = await trio.open_tcp_stream("127.0.0.1", b.broker.port)
                async with stream:
                    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
                    await stream.send_all(ws.send(Request(host="127.0.0.1", target="/ws")))
                    with trio.fail_after(5):
                        while not any(isinstance(e, AcceptConnection) for e in ws.events()):
                            ws.receive_data(await stream.receive_some(4096))
                    await stream.send_all(junk)
                    with trio.fail_after(5):  # the broker hangs up on it
                        while await stream.receive_some(4096):
                            pass
            reply = await a.request(wire.ListPeers(id="alive"))
            assert isinstance(reply, wire.PeersList)


async def test_idle_or_garbage_tcp_before_upgrade_never_stops_the_broker(tmp_path: Path) -> None:
    """A connection that never finishes the HTTP upgrade times out alone."""
    async with open_inproc_broker(tmp_path, hello_timeout=0.3) as b:
        mesh = b.mesh()
        alice = b.member(mesh, "alice")
        for first in (b"", b"GET /ws HTTP/1.1\r\n", b"\x00\xff garbage\r\n\r\n"):
            stream = await trio.open_tcp_stream("127.0.0.1", b.broker.port)
            async with stream:
                if first:
                    await stream.send_all(first)
                with trio.fail_after(5):  # the broker hangs up on it ...
                    while await stream.receive_some(4096):
                        pass
        async with open_peer(b.url, alice) as a:  # ... and still serves everyone else
            reply = await a.request(wire.ListPeers(id="alive"))
            assert isinstance(reply, wire.PeersList)
