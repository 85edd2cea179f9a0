"""The control channel: the coordinator's PREPARE, COMMIT and ABORT fan-outs over one TCP
connection per replica, beside Ray's task path, which costs several times more per round
(docs/benchmarks.md, "The control channel").

Contract:
- The replica's ``ControlServer`` listens on its node's address once the coordinator handed it the
  fleet's key through Ray (``ReplicaActor.open_control``); it keeps the latest key only.
- Every connection opens with the server's random nonce and the client's; the client proves the
  key (a MAC of both nonces) and the server confirms. Every frame after that carries a MAC under a
  session key derived from the key and both nonces, over its direction and sequence number: a frame
  cannot be forged, replayed, reflected or reordered. Nothing is unpickled before its MAC checks.
  A connection that fails a check is closed at once. The channel authenticates; it does not
  encrypt (nor do Ray's own channels, by default).
- A call runs the replica's own method on the connection's thread (the same failpoints, epoch
  fencing and idempotence as through Ray) and answers what it returned or the error it raised.
- ``ControlChannel.send`` (the coordinator) sends one call to several replicas at once;
  ``Sent.wait`` waits for the answers until one deadline. Each replica gets its answer, or a
  ``Failed``: ``ERROR`` (the method raised: its type and message), ``TIMEOUT`` (the connection is
  closed, so a late answer is dropped) or ``UNAVAILABLE`` (the connection closed after the call
  was sent: the replica died or restarted). Replicas the channel could not reach before sending
  (no address, connection refused, a failed handshake) are named in ``Sent.unsent`` at once, for
  the caller to send through Ray before it waits. A replica whose connection
  attempt timed out (a firewall that drops the port, a node gone) is not tried again for
  ``UNREACHABLE_S`` (``usable``), so that no fan-out waits on it more than once in that time.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from .payload import seal, unseal
from .replies import Failed, FailureKind, error_reason

logger = logging.getLogger("weight_refit.control")

__all__ = ["ControlChannel", "ControlServer", "Sent"]

NONCE = 16
MAC = 16
HEADER = struct.Struct("!IQ")  # payload length, sequence number
MAX_PAYLOAD = 32 << 20  # a sealed PREPARE of an inline version is under 100 KiB
HANDSHAKE_S = 5.0
CONNECT_S = 1.0
UNREACHABLE_S = 60.0
TO_SERVER, TO_CLIENT = b"S", b"C"

Address = tuple[str, int]


def _proof(key: bytes, nonces: bytes) -> bytes:
    return hmac.new(key, b"weight-refit control " + nonces, hashlib.sha256).digest()


def _digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=32).digest()


class Sealed:
    """A message pickled once, with its payload's digest, for one or more connections."""

    __slots__ = ("digest", "payload")

    def __init__(self, obj: Any) -> None:
        self.payload = seal(obj)
        self.digest = _digest(self.payload)


class ChannelClosed(Exception):
    """The peer closed the connection, or a frame failed a check (the connection is then closed)."""


class _Session:
    """One authenticated connection's framing: MAC'd, numbered frames in each direction."""

    def __init__(self, sock: socket.socket, key: bytes, nonces: bytes, sends: bytes) -> None:
        self.sock = sock
        self._key = hashlib.blake2b(nonces, key=key[:64], digest_size=32).digest()
        self._sends = sends
        self._receives = TO_CLIENT if sends == TO_SERVER else TO_SERVER
        self._sent = 0
        self._received = 0
        self._buffer = bytearray()

    def _mac(self, direction: bytes, header: bytes, digest: bytes) -> bytes:
        """The frame's MAC: over its direction, header and the payload's digest (so that a
        message sent to several replicas is pickled and hashed once, and MAC'd once for each)."""
        return hashlib.blake2b(direction + header + digest, key=self._key, digest_size=MAC).digest()

    def encode(self, message: Sealed) -> bytes:
        """The next frame to send, carrying ``message``."""
        self._sent += 1
        header = HEADER.pack(len(message.payload), self._sent)
        return b"".join((header, self._mac(self._sends, header, message.digest), message.payload))

    def send(self, obj: Any) -> None:
        self.sock.sendall(self.encode(Sealed(obj)))

    def feed(self) -> bool:
        """Read what the socket has (non-blocking); False if the peer closed it."""
        try:
            chunk = self.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not chunk:
            return False
        self._buffer += chunk
        return True

    def frame(self) -> tuple[bool, Any]:
        """(True, the object) of the next whole frame in the buffer, or (False, None) if none is
        whole yet. Raises ``ChannelClosed`` for a frame that fails a check."""
        if len(self._buffer) < HEADER.size + MAC:
            return False, None
        header = bytes(self._buffer[:HEADER.size])
        size, seq = HEADER.unpack(header)
        if size > MAX_PAYLOAD:
            raise ChannelClosed(f"a frame of {size} bytes, over the channel's {MAX_PAYLOAD}")
        end = HEADER.size + MAC + size
        if len(self._buffer) < end:
            return False, None
        mac = bytes(self._buffer[HEADER.size:HEADER.size + MAC])
        payload = bytes(self._buffer[HEADER.size + MAC:end])
        del self._buffer[:end]
        if not hmac.compare_digest(mac, self._mac(self._receives, header, _digest(payload))):
            raise ChannelClosed("a frame failed its authentication")
        if seq != self._received + 1:
            raise ChannelClosed(f"frame {seq} out of order (expected {self._received + 1})")
        self._received = seq
        return True, unseal(payload)

    def receive(self, deadline: float | None) -> Any:
        """The next frame's object (blocking until ``deadline``; None: no deadline)."""
        while True:
            whole, obj = self.frame()
            if whole:
                return obj
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("no frame in time")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                raise
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc
            if not chunk:
                raise ChannelClosed("the peer closed the connection")
            self._buffer += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _read_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ChannelClosed("the peer closed the connection during the handshake")
        out += chunk
    return bytes(out)


# ---------------------------------------------------------------------- the replica's side


class ControlServer:
    """Serves ``handlers`` (method name -> callable) to peers that prove the key."""

    def __init__(self, handlers: dict[str, Callable[..., Any]], host: str) -> None:
        self._handlers = handlers
        self._host = host
        self._key: bytes | None = None
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.calls = 0  # calls answered (tests and ``status`` read it)

    def open(self, key: bytes) -> Address:
        """Accept peers that hold ``key`` (from now on; the previous key no longer opens a
        connection) and return the address to connect to."""
        if len(key) < 16:
            raise ValueError(f"control channel key: {len(key)} bytes, need at least 16")
        with self._lock:
            self._key = key
            if self._listener is None:
                listener = socket.create_server((self._host, 0))
                self._listener = listener
                threading.Thread(target=self._accept, args=(listener,), name="control-accept",
                                 daemon=True).start()
            host, port = self._listener.getsockname()[:2]
        return host, port

    def close(self) -> None:
        """Stop listening and close every connection."""
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._open = self._open, set()
        for sock in [listener, *connections] if listener is not None else connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(sock,), name="control-conn", daemon=True).start()

    def _handshake(self, sock: socket.socket) -> _Session:
        key = self._key
        assert key is not None
        sock.settimeout(HANDSHAKE_S)
        ours = os.urandom(NONCE)
        sock.sendall(ours)
        theirs = _read_exact(sock, NONCE)
        proof = _read_exact(sock, 32)
        if not hmac.compare_digest(proof, _proof(key, ours + theirs)):
            raise ChannelClosed("the peer did not prove the fleet's key")
        session = _Session(sock, key, ours + theirs, TO_CLIENT)
        session.send("ready")
        sock.settimeout(None)
        return session

    def _serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._open.add(sock)
        session: _Session | None = None
        try:
            session = self._handshake(sock)
            while True:
                method, args = session.receive(None)
                session.send(self._run(method, args))
        except (ChannelClosed, TimeoutError, OSError) as exc:
            logger.debug("control connection closed: %s", exc)
        finally:
            with self._lock:
                self._open.discard(sock)
            sock.close()

    def _run(self, method: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
        handler = self._handlers.get(method)
        try:
            if handler is None:
                raise ValueError(f"control channel: no method {method!r}")
            value = handler(*args)
        except Exception as exc:  # noqa: BLE001  (the caller gets it as its own type and message)
            return ("error", error_reason(exc))
        with self._lock:
            self.calls += 1
        return ("ok", value)


# ---------------------------------------------------------------------- the coordinator's side


class ControlChannel:
    """The coordinator's connections to its replicas' ``ControlServer``s (see the module
    docstring); thread-safe: concurrent fan-outs take different connections."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self._addresses: dict[str, Address] = {}
        self._idle: dict[str, list[_Session]] = {}
        self._unreachable: dict[str, float] = {}  # rid -> until when it is not tried
        self._lock = threading.Lock()

    def knows(self, rid: str) -> bool:
        with self._lock:
            return rid in self._addresses

    def usable(self, rid: str) -> bool:
        """False for ``UNREACHABLE_S`` after a connection attempt to ``rid`` timed out."""
        with self._lock:
            return self._unreachable.get(rid, 0.0) <= time.monotonic()

    def set_address(self, rid: str, address: Address) -> None:
        with self._lock:
            if self._addresses.get(rid) != address:
                for session in self._idle.pop(rid, []):
                    session.close()
            self._addresses[rid] = address

    def forget(self, rid: str) -> None:
        with self._lock:
            self._addresses.pop(rid, None)
            idle = self._idle.pop(rid, [])
        for session in idle:
            session.close()

    def close(self) -> None:
        for rid in list(self._addresses):
            self.forget(rid)

    def _connect(self, address: Address, deadline: float) -> _Session:
        wait = max(0.01, min(CONNECT_S, deadline - time.monotonic()))
        sock = socket.create_connection(address, timeout=wait)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            theirs = _read_exact(sock, NONCE)
            ours = os.urandom(NONCE)
            sock.sendall(ours + _proof(self.key, theirs + ours))
            session = _Session(sock, self.key, theirs + ours, TO_SERVER)
            if session.receive(deadline) != "ready":
                raise ChannelClosed("the replica did not confirm the handshake")
            return session
        except BaseException:
            sock.close()
            raise

    def _checkout(self, rid: str, deadline: float) -> _Session | None:
        """An open connection to ``rid``: an idle one still open, else a new one; None if none
        can be had (the caller sends through Ray)."""
        with self._lock:
            address = self._addresses.get(rid)
            idle = self._idle.get(rid, [])
            while idle:
                session = idle.pop()
                if _still_open(session.sock):
                    return session
                session.close()
        if address is None:
            return None
        try:
            return self._connect(address, deadline)
        except (OSError, ChannelClosed, TimeoutError) as exc:
            with self._lock:
                if self._addresses.get(rid) == address:
                    del self._addresses[rid]  # the caller asks the replica again (it may have moved)
                if isinstance(exc, TimeoutError):
                    self._unreachable[rid] = time.monotonic() + UNREACHABLE_S
            if isinstance(exc, TimeoutError):
                logger.warning("control channel to %s at %s:%s timed out; its calls go through Ray for "
                               "%gs (control_channel: false turns the channel off)", rid, *address,
                               UNREACHABLE_S)
            else:
                logger.debug("control channel to %s not opened: %s", rid, exc)
            return None

    def checkin(self, rid: str, session: _Session) -> None:
        with self._lock:
            if rid in self._addresses:
                self._idle.setdefault(rid, []).append(session)
                return
        session.close()

    def fan_out(self, method: str, rids: list[str], args: tuple[Any, ...], timeout: float, what: str,
                on_reply: Callable[[str, Any], None] | None = None) -> tuple[dict[str, Any], list[str]]:
        """``send`` and wait: the answers, and the replicas the call never left for."""
        sent = self.send(method, rids, args, timeout, what)
        return sent.wait(on_reply), sent.unsent

    def send(self, method: str, rids: list[str], args: tuple[Any, ...], timeout: float, what: str) -> Sent:
        """Send ``method(*args)`` to every replica of ``rids`` at once, without waiting for the
        answers; ``Sent.unsent`` names the replicas the call never left for (send it through Ray
        before waiting here)."""
        sent = Sent(self, what, timeout)
        message = Sealed((method, args))
        for rid in rids:
            session = self._checkout(rid, sent.deadline)
            if session is None:
                sent.unsent.append(rid)
                continue
            try:
                session.sock.settimeout(max(0.01, sent.deadline - time.monotonic()))
                session.sock.sendall(session.encode(message))
                session.sock.setblocking(False)
            except OSError:
                session.close()
                sent.unsent.append(rid)
                continue
            sent.waiting[session.sock] = (rid, session)
        return sent


class Sent:
    """One call sent over the channel to several replicas, waiting for their answers."""

    def __init__(self, channel: ControlChannel, what: str, timeout: float) -> None:
        self._channel = channel
        self._what = what
        self._timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.unsent: list[str] = []
        self.waiting: dict[socket.socket, tuple[str, _Session]] = {}

    def wait(self, on_reply: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
        """Every answer (or ``Failed``) by the deadline, each passed to ``on_reply`` as it comes."""
        out: dict[str, Any] = {}
        waiting = self.waiting

        def answer(rid: str, value: Any) -> None:
            out[rid] = value
            if on_reply is not None:
                on_reply(rid, value)

        with selectors.DefaultSelector() as selector:
            for sock in waiting:
                selector.register(sock, selectors.EVENT_READ)
            while waiting:
                events = selector.select(timeout=max(0.0, self.deadline - time.monotonic()))
                if not events:
                    break
                for key, _ in events:
                    rid, session = waiting[key.fileobj]  # type: ignore[index]
                    reply = _reply_of(session, self._what)
                    if reply is None:
                        continue  # not whole yet
                    selector.unregister(session.sock)
                    del waiting[session.sock]
                    if isinstance(reply, Failed):
                        session.close()
                    else:
                        self._channel.checkin(rid, session)
                    answer(rid, reply.value if isinstance(reply, _Ok) else reply)
        for rid, session in waiting.values():
            session.close()  # a late answer must not be read as the next call's
            answer(rid, Failed(FailureKind.TIMEOUT, f"no answer to {self._what} within {self._timeout:g}s"))
        waiting.clear()
        return out


class _Ok:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _reply_of(session: _Session, what: str) -> _Ok | Failed | None:
    """The answer on ``session`` once it is whole; None while it is not."""
    alive = session.feed()
    try:
        whole, reply = session.frame()
    except ChannelClosed as exc:
        return Failed(FailureKind.ERROR, f"{what}: the control channel's answer was refused: {exc}")
    if whole:
        if reply[0] == "ok":
            return _Ok(reply[1])
        return Failed(FailureKind.ERROR, reply[1])
    if not alive:
        return Failed(FailureKind.UNAVAILABLE, f"{what} not answered: the replica's control channel closed "
                                               "(the replica died or is restarting)")
    return None


def _still_open(sock: socket.socket) -> bool:
    """Whether an idle connection is still open (the peer has not closed it: a replica that
    restarted closed its end when its process ended)."""
    try:
        sock.setblocking(False)
        return sock.recv(1, socket.MSG_PEEK) != b""
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
