"""The control channel (``actors.control_channel``) on its own, over real sockets: answers and
errors come back as the Ray path gives them, a hung call times out without spoiling the next one,
and nothing runs for a peer that cannot prove the key or for a frame that was tampered with."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from actors.control_channel import (
    HEADER,
    MAC,
    MAX_PAYLOAD,
    NONCE,
    ChannelClosed,
    ControlChannel,
    ControlServer,
    Sealed,
    _proof,
)
from actors.replies import Ack, Failed, FailureKind

KEY = os.urandom(32)


class Handlers:
    """A replica's methods as the channel sees them; each call is recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.release = threading.Event()

    def commit(self, epoch: int, txn: str, activate: bool = False) -> Ack:
        self.calls.append(("commit", (epoch, txn, activate)))
        if txn == "bad":
            raise RuntimeError(f"no staged set for {txn}\nsecond line")
        if txn == "hang":
            self.release.wait(30)
        return Ack("r0", txn, epoch, "serving")


@pytest.fixture
def served() -> Iterator[tuple[Handlers, ControlServer, ControlChannel]]:
    handlers = Handlers()
    server = ControlServer({"commit": handlers.commit}, "127.0.0.1")
    channel = ControlChannel(KEY)
    channel.set_address("r0", server.open(KEY))
    yield handlers, server, channel
    handlers.release.set()
    channel.close()
    server.close()


def test_a_call_returns_the_methods_answer_and_reuses_its_connection(served) -> None:
    handlers, server, channel = served
    for epoch in (1, 2):
        out, unsent = channel.fan_out("commit", ["r0"], (epoch, "t1", True), 5.0, "commit")
        assert unsent == [] and out == {"r0": Ack("r0", "t1", epoch, "serving")}
    assert handlers.calls == [("commit", (1, "t1", True)), ("commit", (2, "t1", True))]
    assert server.calls == 2 and len(channel._idle["r0"]) == 1  # one connection, used twice


def test_an_exception_in_the_method_comes_back_as_its_own_error(served) -> None:
    _, _, channel = served
    replies: list[tuple[str, Any]] = []
    out, _ = channel.fan_out("commit", ["r0"], (1, "bad"), 5.0, "commit",
                             on_reply=lambda rid, r: replies.append((rid, r)))
    assert out["r0"] == Failed(FailureKind.ERROR, "RuntimeError: no staged set for bad")
    assert replies == [("r0", out["r0"])]


def test_a_method_the_replica_does_not_serve_is_an_error_naming_it(served) -> None:
    handlers, _, channel = served
    out, _ = channel.fan_out("export", ["r0"], (1,), 5.0, "export")
    assert out["r0"] == Failed(FailureKind.ERROR, "ValueError: control channel: no method 'export'")
    assert handlers.calls == []


def test_a_frame_larger_than_the_limit_closes_the_connection_unread(served) -> None:
    handlers, _, channel = served
    session = channel._connect(channel._addresses["r0"], _deadline())
    session.sock.sendall(HEADER.pack(MAX_PAYLOAD + 1, 1) + bytes(MAC))
    with pytest.raises(ChannelClosed):
        session.receive(_deadline())
    assert handlers.calls == []


def test_a_hung_call_times_out_and_the_next_call_gets_a_new_connection(served) -> None:
    handlers, _, channel = served
    out, _ = channel.fan_out("commit", ["r0"], (1, "hang"), 0.3, "commit")
    assert out["r0"].kind is FailureKind.TIMEOUT and "commit" in out["r0"].reason
    out, _ = channel.fan_out("commit", ["r0"], (2, "t2"), 5.0, "commit")
    assert out["r0"] == Ack("r0", "t2", 2, "serving")  # not the hung call's late answer
    handlers.release.set()


def test_replicas_without_an_open_channel_are_left_to_the_caller(served) -> None:
    handlers, server, channel = served
    channel.set_address("r1", ("127.0.0.1", _free_port()))  # nothing listens there
    out, unsent = channel.fan_out("commit", ["r0", "r1", "r2"], (1, "t1"), 5.0, "commit")
    assert set(out) == {"r0"} and sorted(unsent) == ["r1", "r2"]
    assert not channel.knows("r1")  # asked again (through Ray) before its next call


def test_a_connection_the_replica_closed_is_not_used_again(served) -> None:
    """A replica that restarted closed its end: the call goes elsewhere instead of being lost."""
    handlers, server, channel = served
    channel.fan_out("commit", ["r0"], (1, "t1"), 5.0, "commit")
    server.close()  # as the replica's process ending would: the listener and every connection
    out, unsent = channel.fan_out("commit", ["r0"], (2, "t2"), 5.0, "commit")
    assert out == {} and unsent == ["r0"]
    assert [c[0] for c in handlers.calls] == ["commit"]


def test_a_replica_whose_connection_timed_out_is_not_tried_again_for_a_while(served) -> None:
    _, _, channel = served
    with socket.create_server(("127.0.0.1", 0), backlog=0) as silent:  # accepts, never speaks
        channel.set_address("r1", silent.getsockname()[:2])
        t = time.monotonic()
        out, unsent = channel.fan_out("commit", ["r0", "r1"], (1, "t1"), 0.5, "commit")
    assert set(out) == {"r0"} and unsent == ["r1"] and time.monotonic() - t < 2.0
    assert not channel.usable("r1") and channel.usable("r0")


def test_a_peer_without_the_key_is_refused_and_nothing_runs(served) -> None:
    handlers, server, channel = served
    stranger = ControlChannel(os.urandom(32))
    stranger.set_address("r0", channel._addresses["r0"])
    out, unsent = stranger.fan_out("commit", ["r0"], (1, "t1"), 5.0, "commit")
    assert out == {} and unsent == ["r0"] and handlers.calls == []


def test_the_key_a_new_coordinator_hands_over_replaces_the_old_one(served) -> None:
    handlers, server, channel = served
    newer = os.urandom(32)
    assert server.open(newer) == channel._addresses["r0"]
    out, unsent = channel.fan_out("commit", ["r0"], (1, "t1"), 5.0, "commit")
    assert unsent == ["r0"] and handlers.calls == []  # the old key opens nothing new
    successor = ControlChannel(newer)
    successor.set_address("r0", server.open(newer))
    out, _ = successor.fan_out("commit", ["r0"], (2, "t2"), 5.0, "commit")
    assert out["r0"] == Ack("r0", "t2", 2, "serving")
    successor.close()


@pytest.mark.parametrize("tamper", ["mac", "payload", "replay", "reflected"])
def test_a_tampered_frame_closes_the_connection_and_nothing_runs(served, tamper: str) -> None:
    handlers, _, channel = served
    session = channel._connect(channel._addresses["r0"], _deadline())
    if tamper == "reflected":  # signed as if the server had sent it
        session._sends = b"C"
    frame = bytearray(session.encode(Sealed(("commit", (1, "t1")))))
    if tamper == "mac":
        frame[12] ^= 1
    elif tamper == "payload":
        frame[-2] ^= 1
    session.sock.sendall(bytes(frame))
    if tamper == "replay":
        session.sock.sendall(bytes(frame))  # the same frame again: out of order
        assert session.receive(_deadline())[0] == "ok"  # the first one ran
    with pytest.raises(ChannelClosed):
        session.receive(_deadline())
    assert len(handlers.calls) == (1 if tamper == "replay" else 0)


def test_a_handshake_without_the_proof_is_dropped(served) -> None:
    handlers, _, channel = served
    with socket.create_connection(channel._addresses["r0"], timeout=5) as sock:
        nonce = sock.recv(NONCE)
        sock.sendall(os.urandom(NONCE) + _proof(os.urandom(32), nonce + os.urandom(NONCE)))
        assert sock.recv(100) == b""  # closed without a "ready"
    assert handlers.calls == []


def test_a_short_key_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="control channel key: 8 bytes"):
        ControlServer({}, "127.0.0.1").open(b"12345678")


def _deadline() -> float:
    return time.monotonic() + 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
