"""Which Ray cluster a driver uses, and joining it in bounded time.

Rules (the README's "Which Ray cluster" section states them for users):

- The address comes from, in order: an explicit one (the CLI's ``--address``, ``address=`` of
  ``Fleet.launch``/``Fleet.connect``), ``RAY_ADDRESS``, the fleet config's ``address``.
- With none, ``Fleet.launch`` starts a *private* Ray for this process (``ray.init(address="local")``):
  it never joins a head it did not ask for, live (one ``weight-refit launch`` left) or dead (a
  stale record of a killed one). ``Fleet.connect`` and the CLI join the head that ``ray start``
  recorded last (Ray's ``ray_current_cluster`` file), if it answers.
- Joining is bounded: an address nobody answers at fails at once, and a join that does not finish
  within ``connect_timeout_s()`` (15 s; ``WEIGHT_REFIT_CONNECT_TIMEOUT_S``) fails; both raise
  ``NoRayCluster`` naming the address.

``HeadRecord`` remembers the head ``weight-refit launch`` started (address and session directory,
in ``$WEIGHT_REFIT_HOME/ray-head.json``, default ``~/.weight-refit``), so that ``weight-refit
shutdown --stop-ray`` stops exactly that head and no other Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray

from .errors import NoRayCluster

__all__ = ["HeadRecord", "connect_timeout_s", "ensure_ray", "head_start_flags", "join", "recorded_head",
           "start_private"]

DEFAULT_CONNECT_TIMEOUT_S = 15.0
_PROBE_S = 2.0


def connect_timeout_s() -> float:
    raw = os.environ.get("WEIGHT_REFIT_CONNECT_TIMEOUT_S")
    if not raw:
        return DEFAULT_CONNECT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"WEIGHT_REFIT_CONNECT_TIMEOUT_S={raw!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"WEIGHT_REFIT_CONNECT_TIMEOUT_S={raw!r} must be a positive number of seconds")
    return value


def current_cluster_file() -> Path:
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def recorded_head() -> str | None:
    """The address ``ray start`` recorded last on this machine, or None."""
    try:
        return current_cluster_file().read_text().strip() or None
    except OSError:
        return None


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def answers(address: str, timeout_s: float = _PROBE_S) -> bool:
    """Whether anything accepts a TCP connection at ``address`` (host:port)."""
    hp = _host_port(address)
    if hp is None:
        return True  # not ours to judge: let Ray say what is wrong with it
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            return True
    except OSError:
        return False


class _NotFromMainThread(logging.Filter):
    """Ray warns that it sets no SIGTERM handler when ``ray.init`` runs off the main thread; this
    driver does not need one, and the warning would break the CLI's one-line errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


logging.getLogger("ray._private.worker").addFilter(_NotFromMainThread())


def _init_bounded(timeout_s: float, **kwargs: Any) -> None:
    errors: list[BaseException] = []

    def init() -> None:
        try:
            ray.init(**kwargs)
        except BaseException as exc:  # noqa: BLE001  (handed to the caller)
            errors.append(exc)

    worker = threading.Thread(target=init, name="ray-init", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise NoRayCluster(f"the Ray cluster at {kwargs.get('address')} did not answer within "
                           f"{timeout_s:g}s (WEIGHT_REFIT_CONNECT_TIMEOUT_S)")
    if errors:
        exc = errors[0]
        if isinstance(exc, ConnectionError) and not isinstance(exc, NoRayCluster):
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise NoRayCluster(f"cannot join the Ray cluster at {kwargs.get('address')}: {first}") from None
        raise exc


def join(address: str, *, timeout_s: float | None = None) -> None:
    """Join the running Ray at ``address`` (``"auto"``: the head ``ray start`` recorded last)."""
    timeout = connect_timeout_s() if timeout_s is None else timeout_s
    if address == "auto":
        recorded = recorded_head()
        if recorded is None:
            raise NoRayCluster("no Ray cluster is running here: start one with `weight-refit launch` or "
                               "`ray start --head`, or name one with --address / RAY_ADDRESS")
        if not answers(recorded):
            raise NoRayCluster(f"the Ray head recorded at {recorded} ({current_cluster_file()}) does not "
                               "answer: it was stopped or crashed; start one with `weight-refit launch`")
    elif not answers(address):
        raise NoRayCluster(f"no Ray cluster answers at {address}")
    _init_bounded(timeout, address=address, log_to_driver=False, logging_level=logging.WARNING)


def start_private(init_kwargs: Mapping[str, Any] | None = None) -> None:
    """Start a Ray of this process's own (it ends with the process)."""
    kwargs = {"include_dashboard": False, "log_to_driver": False, **dict(init_kwargs or {})}
    ray.init(address="local", **kwargs)


# ray.init keywords that `ray start --head` takes as flags
_HEAD_FLAGS = {
    "num_cpus": "--num-cpus", "num_gpus": "--num-gpus", "resources": "--resources",
    "object_store_memory": "--object-store-memory", "_system_config": "--system-config",
    "_plasma_directory": "--plasma-directory", "_temp_dir": "--temp-dir",
    "include_dashboard": "--include-dashboard", "dashboard_host": "--dashboard-host",
    "dashboard_port": "--dashboard-port",
}
# ray.init keywords about the driver's own output: a head started for a fleet has no driver
_DRIVER_OUTPUT = frozenset({"log_to_driver", "logging_level", "logging_format", "configure_logging",
                            "ignore_reinit_error"})


def head_start_flags(init_kwargs: Mapping[str, Any]) -> list[str]:
    """The ``ray start --head`` flags for the ``ray.init`` keywords of a Ray a fleet starts
    (``local_ray_init_kwargs``). A keyword no head takes raises ValueError naming it, before
    anything starts: none is dropped unseen."""
    refused = sorted(set(init_kwargs) - set(_HEAD_FLAGS) - _DRIVER_OUTPUT)
    if refused:
        raise ValueError(
            f"ray_init {', '.join(refused)}: a Ray head that `weight-refit launch` starts cannot take "
            f"{'it' if len(refused) == 1 else 'them'} (it takes {', '.join(sorted(_HEAD_FLAGS))}); "
            "start the head yourself and pass --address, or launch the fleet from Python (Fleet.launch)")
    flags = []
    for key, flag in _HEAD_FLAGS.items():
        if key in init_kwargs:
            value = init_kwargs[key]
            if isinstance(value, Mapping):
                value = json.dumps(dict(value))
            elif isinstance(value, bool):
                value = str(value).lower()
            flags.append(f"{flag}={value}")
    return flags


def ensure_ray(address: str | None = None, init_kwargs: Mapping[str, Any] | None = None, *,
               private: bool = True) -> None:
    """Use ``address`` (or ``RAY_ADDRESS``); with neither, a private Ray (``private``) or the
    recorded head. Does nothing if this process already joined a Ray."""
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target:
        join(target)
    elif private:
        start_private(init_kwargs)
    else:
        join("auto")


@dataclass(frozen=True)
class HeadRecord:
    """The Ray head ``weight-refit launch`` started."""

    address: str
    session_dir: str

    @staticmethod
    def path() -> Path:
        home = os.environ.get("WEIGHT_REFIT_HOME") or os.path.join("~", ".weight-refit")
        return Path(home).expanduser() / "ray-head.json"

    def save(self) -> None:
        path = self.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, path)

    @classmethod
    def load(cls) -> HeadRecord | None:
        try:
            data = json.loads(cls.path().read_text())
            return cls(address=str(data["address"]), session_dir=str(data["session_dir"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def owns(self, cmdline: bytes) -> bool:
        """Whether a process (its NUL-separated ``/proc/<pid>/cmdline``) belongs to this head: it
        names the session dir, or it is the head's Ray client server (which names only the address)."""
        if self.session_dir.encode() in cmdline:
            return True
        args = cmdline.split(b"\0")
        return b"ray.util.client.server" in args and f"--address={self.address}".encode() in args

    def stop(self) -> int:
        """Kill every process of this head; forget it (and Ray's record of it). Returns how many
        processes were signalled."""
        killed = 0
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if self.owns((proc / "cmdline").read_bytes()):
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed += 1
        with contextlib.suppress(OSError):
            self.path().unlink()
        if recorded_head() == self.address:
            with contextlib.suppress(OSError):
                current_cluster_file().unlink()
        return killed


def session_dir() -> str:
    """The session directory of the Ray this process joined."""
    from ray._private import worker

    return str(worker.global_worker.node.get_session_dir_path())
