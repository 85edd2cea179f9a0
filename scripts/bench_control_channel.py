"""What one control round costs a coordinator: a fan-out of one call to every replica and the wait
for all replies, through Ray's task path (what the fleet uses: ``.remote`` and ``ray.wait``/``get``)
against a Ray Compiled Graph (shared-memory channels; ``ray.dag``), against a plain TCP socket
per member (each message and reply framed by its length, a thread per connection in the member),
and against the fleet's own control channel (``actors.control_channel``: that socket with a
handshake, a MAC on every frame and pickled calls), from an actor to actors with the replicas'
concurrency groups, on one local Ray of its own. Nothing else of the fleet runs: this measures the
transport a PREPARE or COMMIT round rides on (see docs/benchmarks.md, "The control channel").

    python scripts/bench_control_channel.py --rounds 400 --sittings 3 --json out.json

``--faults`` then tries what a fleet would meet, and reports each outcome: the calling actor killed
and a new one compiling a graph of the same members (as after a coordinator's restart), and a member
hung in a round (as under a ``hang`` failpoint): the round's timeout, whether the graph's teardown
returns, and a new graph once the member answers again.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

MODES = ("tasks", "compiled", "socket", "channel")


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "little") + payload


def _read_frame(conn: socket.socket) -> bytes:
    """One framed message; b"" once the peer has closed the connection."""
    head = conn.recv(4, socket.MSG_WAITALL)
    if len(head) < 4:
        return b""
    return conn.recv(int.from_bytes(head, "little"), socket.MSG_WAITALL)


def _actors(ray: Any) -> tuple[Any, Any]:
    @ray.remote(concurrency_groups={"serve": 2, "control": 2})
    class Member:
        def __init__(self) -> None:
            from actors.control_channel import ControlServer

            self.hung = threading.Event()
            self.control = ControlServer({"handle": self.handle}, "127.0.0.1")

        @ray.method(concurrency_group="control")
        def open_control(self, key: bytes) -> tuple[str, int]:
            return self.control.open(key)

        @ray.method(concurrency_group="control")
        def hang(self, on: bool) -> None:
            self.hung.set() if on else self.hung.clear()

        @ray.method(concurrency_group="control")
        def handle(self, message: bytes) -> int:
            while self.hung.is_set():
                time.sleep(0.01)
            return len(message)

        @ray.method(concurrency_group="control")
        def listen(self) -> int:
            """Serve ``handle`` on a socket of this node as well (a thread per connection, each
            message and reply framed by its length); the port."""
            server = socket.create_server(("127.0.0.1", 0))

            def serve(conn: socket.socket) -> None:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with conn:
                    while message := _read_frame(conn):
                        conn.sendall(_frame(str(self.handle(message)).encode()))

            def accept() -> None:
                while True:
                    conn, _ = server.accept()
                    threading.Thread(target=serve, args=(conn,), daemon=True).start()

            threading.Thread(target=accept, daemon=True).start()
            return server.getsockname()[1]

    @ray.remote(max_concurrency=4, max_restarts=0)
    class Caller:
        def __init__(self, members: list[Any]) -> None:
            self.members = members  # the driver's: they outlive a caller, as replicas outlive a coordinator
            ray.get([m.handle.remote(b"") for m in self.members])
            self.graph: Any = None
            self.sockets = [socket.create_connection(("127.0.0.1", port))
                            for port in ray.get([m.listen.remote() for m in self.members])]
            for s in self.sockets:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            from actors.control_channel import ControlChannel

            self.channel = ControlChannel(os.urandom(32))
            self.rids = [str(i) for i in range(len(members))]
            for rid, address in zip(self.rids, ray.get([m.open_control.remote(self.channel.key)
                                                        for m in members]), strict=True):
                self.channel.set_address(rid, tuple(address))

        def compile(self) -> None:
            from ray.dag import InputNode, MultiOutputNode

            with InputNode() as message:
                dag = MultiOutputNode([m.handle.bind(message) for m in self.members])
            self.graph = dag.experimental_compile()

        def rounds(self, n: int, mode: str, nbytes: int) -> list[float]:
            message = b"x" * nbytes
            out = []
            for _ in range(n):
                t = time.perf_counter()
                if mode == "compiled":
                    ray.get(self.graph.execute(message))
                elif mode == "socket":
                    for s in self.sockets:
                        s.sendall(_frame(message))
                    for s in self.sockets:
                        _read_frame(s)
                elif mode == "channel":
                    answers, unsent = self.channel.fan_out("handle", self.rids, (message,), 5.0, "handle")
                    assert not unsent and answers == dict.fromkeys(self.rids, nbytes), (answers, unsent)
                else:
                    ray.get([m.handle.remote(message) for m in self.members])
                out.append(time.perf_counter() - t)
            return out

        def one_round(self, timeout_s: float) -> str:
            try:
                ray.get(self.graph.execute(b"x"), timeout=timeout_s)
                return "ok"
            except Exception as exc:  # noqa: BLE001  (the outcome is what is measured)
                return type(exc).__name__

        def teardown(self, wait_s: float | None = None) -> bool:
            """Tear the graph down; False if that did not return within ``wait_s``."""
            graph, self.graph = self.graph, None
            if graph is None:
                return True
            done = threading.Thread(target=graph.teardown, daemon=True)
            done.start()
            done.join(wait_s)
            return not done.is_alive()

    return Member, Caller


def run_faults(ray: Any, caller_cls: Any, caller: Any, members: list[Any]) -> dict[str, str]:
    """The outcomes of a caller's death and of a hung member (see the module docstring)."""
    ray.kill(caller, no_restart=True)
    successor = caller_cls.remote(members)
    ray.get(successor.compile.remote())
    out = {"after_the_caller_died_a_new_graph_of_the_same_members": ray.get(successor.one_round.remote(2.0))}
    ray.get(successor.teardown.remote(5.0))
    fresh = caller_cls.remote(members)
    ray.get(fresh.compile.remote())
    out["a_first_round_of_a_further_graph"] = ray.get(fresh.one_round.remote(2.0))
    ray.get(members[-1].hang.remote(True))
    out["a_round_with_one_member_hung"] = ray.get(fresh.one_round.remote(1.0))
    out["its_teardown_returned_within_5_s"] = str(ray.get(fresh.teardown.remote(5.0)))
    ray.get(members[-1].hang.remote(False))
    ray.get(fresh.compile.remote())
    out["a_new_graph_once_the_member_answers_again"] = ray.get(fresh.one_round.remote(2.0))
    out["the_members_answer_tasks_meanwhile"] = str(ray.get([m.handle.remote(b"x") for m in members],
                                                            timeout=10) == [1] * len(members))
    for what, outcome in out.items():
        print(f"{what.replace('_', ' ')}: {outcome}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=2, help="replicas the round reaches (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=400, help="rounds per mode and sitting")
    p.add_argument("--sittings", type=int, default=3, help="alternating sittings of both modes")
    p.add_argument("--bytes", type=int, default=200, help="message size (a sealed PREPARE of the conv: ~200)")
    p.add_argument("--faults", action="store_true", help="then try a caller's death and a hung member")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.bytes < 1 or args.members < 1 or args.rounds < 1:
        p.error("--bytes, --members and --rounds must be at least 1")
    import ray

    ray.init(address="local", num_cpus=max(4, args.members + 2), include_dashboard=False,
             log_to_driver=False, logging_level="ERROR")
    try:
        member_cls, caller_cls = _actors(ray)
        members = [member_cls.remote() for _ in range(args.members)]
        caller = caller_cls.remote(members)
        ray.get(caller.compile.remote())
        sittings = []
        for sitting in range(args.sittings):
            row: dict[str, Any] = {"sitting": sitting + 1}
            for mode in MODES:
                ray.get(caller.rounds.remote(max(10, args.rounds // 8), mode, args.bytes))  # warm up
                times = sorted(ray.get(caller.rounds.remote(args.rounds, mode, args.bytes)))
                row[mode] = {"median_ms": statistics.median(times) * 1e3,
                             "p90_ms": times[int(0.9 * (len(times) - 1))] * 1e3}
            for mode in MODES[1:]:
                row[f"tasks_over_{mode}"] = row["tasks"]["median_ms"] / row[mode]["median_ms"]
            sittings.append(row)
            print(f"sitting {sitting + 1}, median of {args.rounds} rounds to {args.members} members: "
                  + ", ".join(f"{mode} {row[mode]['median_ms']:.3f} ms" for mode in MODES), flush=True)
        faults = run_faults(ray, caller_cls, caller, members) if args.faults else None
        if faults is None:
            ray.get(caller.teardown.remote())
    finally:
        ray.shutdown()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "control round: Ray tasks, a compiled graph, a socket, the fleet's channel",
            "date": time.strftime("%Y-%m-%d"),
            "members": args.members, "rounds": args.rounds, "message_bytes": args.bytes,
            "machine": {"cpus": os.cpu_count(), "loadavg_1m_end": os.getloadavg()[0]},
            "ray": ray.__version__, "sittings": sittings, "faults": faults}, indent=1))
        print(f"JSON written: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
