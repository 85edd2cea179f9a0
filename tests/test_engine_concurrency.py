"""Concurrent infer() and refits: no torn reads, versions never go backwards, buffers not reused
under a reader.

A mixed read is detectable by construction: the model has K weights and returns K outputs, each
read at a different point of the forward (``x * w_i``, with the input all ones). Version v's
expected values per weight are recorded before v is committed; a result is torn when any element of
any output differs from what the version the response names holds.

The switch interval is lowered (DESIGN.md) so thread switches land inside forward passes.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
import torch

from engines import BuilderConfig, build_engine, load_engine

K = 4  # weights, one output each
N = 64  # elements per weight
REFITS = 200
READERS = 4
PACE = 3  # the refitter waits for readers every PACE refits


class _Layers(torch.nn.Module):
    def __init__(self, k: int = K, n: int = N) -> None:
        super().__init__()
        self.k = k
        for i in range(k):
            setattr(self, f"w{i}", torch.nn.Parameter(torch.zeros(n)))

    def forward(self, x: torch.Tensor):
        outs = []
        h = x
        for i in range(self.k):
            h = torch.tanh(h) + 1.0  # work between the reads of two weights
            outs.append(x * getattr(self, f"w{i}"))
        outs.append(h)
        return outs


X = torch.ones(N)
NAMES = [f"w{i}" for i in range(K)]


@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _engine(**cfg):
    return build_engine(_Layers(), [X], BuilderConfig(enable_refit=True, **cfg))


def _torn(outputs: list[np.ndarray], expected: list[float]) -> bool:
    return any(not np.all(outputs[i] == expected[i]) for i in range(K))


def _held_ptrs(ws) -> dict[str, int]:
    return {n: t.data_ptr() for n, t in ws.tensors.items()}


def _pool_ptrs(engine) -> list[int]:
    return [t.data_ptr() for bucket in engine._pool._free.values() for t in bucket]


def _in_use_ptrs(engine, exclude=None) -> dict[int, str]:
    """data_ptr -> where, for every tensor of a set the engine holds (live, previous, staged)."""
    out = {}
    sets = [("live", engine._live), ("previous", engine._previous)]
    sets += [(f"staged v{s.version}", s.weight_set) for s in engine._staged.values()]
    for where, ws in sets:
        if ws is None or ws is exclude:
            continue
        for n, t in ws.tensors.items():
            out[t.data_ptr()] = f"{where} {n}"
    return out


# ------------------------------------------------------------------------- readers vs a refitter


@pytest.mark.parametrize("subset", [False, True], ids=["full", "subset"])
@pytest.mark.parametrize("mode", ["swap", "copy"])
def test_readers_never_see_a_torn_or_older_result(fast_switching, mode, subset):
    # subset refits share buffers across sets; without a previous set they are reclaimed sooner
    engine = _engine(memory_mode=mode, keep_previous=not subset)
    expected: dict[int, list[float]] = {0: [0.0] * K}
    done = threading.Event()
    start = threading.Barrier(READERS + 1)
    errors: list[BaseException] = []
    torn: list[tuple[int, int, list[float]]] = []
    versions: list[list[int]] = [[] for _ in range(READERS)]
    served = threading.Condition()
    newest_read = [0]  # the newest version any reader has been served

    def reader(idx: int) -> None:
        try:
            start.wait()
            seen = versions[idx]
            while True:
                final = done.is_set()
                r = engine.infer(X)
                want = expected[r.version]
                if _torn(r.outputs, want):
                    torn.append((idx, r.version, [float(o[0]) for o in r.outputs[:K]]))
                seen.append(r.version)
                if r.version > newest_read[0]:
                    with served:
                        newest_read[0] = max(newest_read[0], r.version)
                        served.notify_all()
                if final:
                    return
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def refitter() -> None:
        try:
            start.wait()
            values = [0.0] * K
            for v in range(1, REFITS + 1):
                names = [NAMES[v % K], NAMES[(3 * v + 1) % K]] if subset else NAMES
                for n in names:
                    values[NAMES.index(n)] = float(v)
                expected[v] = list(values)  # recorded before it can be served
                staged = engine.stage({n: torch.full((N,), float(v)) for n in names}, version=v)
                engine.commit(staged)
                if v % PACE:
                    continue
                # pace on the readers, not on time: every PACE refits, wait until the newest
                # version has been served, so refits keep racing readers inside their forwards
                with served:
                    if not served.wait_for(lambda v=v: newest_read[0] >= v, timeout=30):
                        raise TimeoutError(f"no reader was served version {v}")
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(READERS)]
    threads.append(threading.Thread(target=refitter))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert errors == []
    assert engine.version == REFITS
    assert torn == [], f"{len(torn)} torn results, first: {torn[:3]}"
    for seen in versions:
        assert seen, "a reader never read"
        assert seen == sorted(seen), "a reader's versions went backwards"
        assert seen[-1] == REFITS  # the read after the last refit sees it
    distinct = set().union(*map(set, versions))
    paced = set(range(PACE, REFITS + 1, PACE))
    assert paced <= distinct, f"versions never served: {sorted(paced - distinct)[:10]}"
    assert engine.memory().staged_bytes == 0


# ------------------------------------------------------------------------- slow readers (swap mode)


def _hold(engine):
    ws, version = engine._acquire()
    snapshot = {n: t.clone() for n, t in ws.tensors.items()}
    return ws, version, snapshot


def _assert_held_intact(engine, ws, version, snapshot, where: str) -> None:
    held = _held_ptrs(ws)
    pooled = set(_pool_ptrs(engine))
    in_pool = sorted(n for n, p in held.items() if p in pooled)
    assert in_pool == [], f"{where}: buffers {in_pool} of held version {version} are in the pool"
    for n, t in ws.tensors.items():
        assert torch.equal(t, snapshot[n]), f"{where}: held version {version}'s {n} was overwritten"
    with torch.inference_mode():
        outs = ws.program([X])
    for i in range(K):
        assert torch.equal(outs[i], X * snapshot[NAMES[i]]), f"{where}: output {i} torn"


@pytest.mark.parametrize("keep_previous", [True, False])
def test_slow_reader_keeps_its_set_through_later_refits(keep_previous):
    engine = _engine(memory_mode="swap", keep_previous=keep_previous)
    engine.refit_now({n: torch.full((N,), 1.0) for n in NAMES})
    ws, version, snapshot = _hold(engine)
    assert version == 1
    held = _held_ptrs(ws)
    for v in range(2, 6):  # 4 later refits: every other set is retired and its buffers reused
        engine.refit_now({n: torch.full((N,), float(v)) for n in NAMES})
        _assert_held_intact(engine, ws, version, snapshot, f"after refit to v{v}")
        in_use = _in_use_ptrs(engine, exclude=ws)  # the held set may be the previous one
        assert not set(held.values()) & set(in_use), "a held buffer was reused by a newer set"
    assert engine.infer(X).version == 5
    pool_before = engine.memory().pool_bytes
    engine._release(ws)
    # the last reader left: the held set's buffers are reclaimed now, not before
    assert set(held.values()) <= set(_pool_ptrs(engine))
    assert engine.memory().pool_bytes == pool_before + K * N * 4
    assert len(_pool_ptrs(engine)) == len(set(_pool_ptrs(engine))), "a buffer is pooled twice"


def test_slow_reader_keeps_shared_buffers_through_subset_refits():
    """A held set shares weights with newer sets; once those sets are retired, the shared
    buffers must not be pooled (and then overwritten) while the held set still has a reader."""
    engine = _engine(memory_mode="swap", keep_previous=False)
    engine.refit_now({n: torch.full((N,), 1.0) for n in NAMES})
    ws, version, snapshot = _hold(engine)
    for v in range(2, 8):  # subset refits: one weight each, round robin
        engine.refit_now({NAMES[v % K]: torch.full((N,), float(v))})
        _assert_held_intact(engine, ws, version, snapshot, f"after subset refit to v{v}")
    engine._release(ws)


def test_release_after_subset_refits_never_pools_a_live_buffer():
    """After a slow reader leaves, no buffer of a set still in use may be in the pool, or the
    next stage overwrites the weights of the version being served."""
    engine = _engine(memory_mode="swap", keep_previous=False)
    engine.refit_now({n: torch.full((N,), 1.0) for n in NAMES})
    ws, _ = engine._acquire()
    for v in range(2, 6):
        engine.refit_now({NAMES[v % K]: torch.full((N,), float(v))})
    engine._release(ws)
    pooled = _pool_ptrs(engine)
    in_use = _in_use_ptrs(engine)
    assert [in_use[p] for p in pooled if p in in_use] == [], "live buffers sit in the pool"
    assert len(pooled) == len(set(pooled)), "a buffer is pooled twice"
    # what a caller sees: staging the next versions must not change what the live version serves
    for v in range(6, 6 + 2 * K):
        live = engine.infer(X)
        staged = engine.stage({n: torch.full((N,), float(v)) for n in NAMES}, version=v)
        after = engine.infer(X)
        assert after.version == live.version
        for i in range(K):
            np.testing.assert_array_equal(after.outputs[i], live.outputs[i],
                                          err_msg=f"staging v{v} changed live v{live.version}")
        engine.commit(staged)


# ------------------------------------------------------------------------- slow reader (copy mode)


def test_copy_mode_commit_waits_for_a_slow_reader():
    engine = _engine(memory_mode="copy")
    ws, version, snapshot = _hold(engine)
    assert version == 0
    result: dict[str, object] = {}

    def refit() -> None:
        try:
            result["version"] = engine.refit_now({n: torch.full((N,), 1.0) for n in NAMES})
        except BaseException as exc:
            result["error"] = exc

    t = threading.Thread(target=refit)
    t.start()
    deadline = time.monotonic() + 30
    while not engine._writer_waiting:  # the commit is waiting for our reader to leave
        assert t.is_alive(), f"refit finished while a reader held the live set: {result}"
        assert time.monotonic() < deadline, "the commit never started"
        time.sleep(0.001)
    assert t.is_alive()
    for n, tensor in ws.tensors.items():
        assert torch.equal(tensor, snapshot[n]), f"{n} overwritten under a reader"
    assert engine.version == 0
    with torch.inference_mode():
        outs = ws.program([X])
    assert all(torch.equal(outs[i], torch.zeros(N)) for i in range(K))
    engine._release(ws)
    t.join(timeout=30)
    assert not t.is_alive()
    assert result == {"version": 1}
    r = engine.infer(X)
    assert r.version == 1
    assert all(np.all(r.outputs[i] == 1.0) for i in range(K))


# ------------------------------------------------------------------------- save during refits


class _Big(torch.nn.Module):
    """Two 1 MiB weights: big enough that serializing them overlaps a concurrent commit."""

    def __init__(self, n: int = 1 << 18) -> None:
        super().__init__()
        self.w0 = torch.nn.Parameter(torch.zeros(n))
        self.w1 = torch.nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor):
        return x * self.w0[:4], x * self.w1[:4]


@pytest.mark.parametrize("mode", ["swap", "copy"])
def test_save_during_refits_writes_a_single_version(fast_switching, tmp_path, mode):
    """``save`` reads the live set like a request does: the file must hold one version's weights,
    the version its header names, however refits interleave (in copy mode a commit writes the
    live buffers in place; in swap mode a retired set's buffers go back to the pool)."""
    n = 1 << 18
    engine = build_engine(_Big(n), [torch.ones(4)],
                          BuilderConfig(enable_refit=True, memory_mode=mode, keep_previous=False))
    done = threading.Event()
    errors: list[BaseException] = []

    def refitter() -> None:
        try:
            v = 0
            while not done.is_set():
                v += 1
                engine.refit_now({"w0": torch.full((n,), float(v)), "w1": torch.full((n,), float(v))})
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=refitter)
    t.start()
    torn = []
    try:
        for i in range(20):
            path = tmp_path / f"s{i}.engine"
            engine.save(path)
            saved = load_engine(path)
            values = {name: sorted(set(w.unique().tolist())) for name, w in saved.weights().items()}
            if any(vals != [float(saved.version)] for vals in values.values()):
                torn.append((saved.version, {k: v[:4] for k, v in values.items()}))
            path.unlink()
    finally:
        done.set()
        t.join(timeout=60)
    assert errors == []
    assert engine.version > 0
    assert torn == [], f"{len(torn)} of 20 saved files mix versions, first: {torn[:2]}"


def test_a_reader_finishing_during_a_commit_cannot_pool_tensors_still_in_use():
    """Regression: the commit used to swap the live set in one critical section and retire the
    replaced set in another. A reader that released an older retired set in between had that
    older set reclaimed while the replaced set (sharing tensors with it) was in neither list, so
    the shared tensors were pooled under the replaced set's readers and pooled twice later: two
    staged sets then received the same buffer (torn reads, seen 3 times in 60 stress runs).

    The release is forced into that window by running it from ``_retire``, the step the old
    commit took after leaving the critical section."""
    engine = _engine(memory_mode="swap", keep_previous=False)
    old, _ = engine._acquire()  # a reader on v0 ...
    engine.commit(engine.stage({"w0": torch.full((N,), 1.0)}, version=1))  # ... so v0 drains
    assert engine._draining == [old]
    original_retire = engine._retire

    def release_reader_then_retire(ws):  # what a reader finishing at that moment does
        if engine._draining:
            engine._release(old)
        original_retire(ws)

    engine._retire = release_reader_then_retire
    engine.commit(engine.stage({n: torch.full((N,), 2.0) for n in NAMES[1:]}, version=2))
    if engine._draining:  # the commit no longer leaves that window: release normally
        engine._release(old)
    pooled = [t for bucket in engine._pool._free.values() for t in bucket]
    assert len({id(t) for t in pooled}) == len(pooled), "a buffer is in the pool twice"
    live = {id(t) for t in engine._live.tensors.values()}
    assert not live & {id(t) for t in pooled}, "a live buffer is in the pool"
    for v in (3, 4):  # and the next refits get distinct buffers, so reads stay whole
        engine.commit(engine.stage({"w1": torch.full((N,), float(v)), "w2": torch.full((N,), -float(v))},
                                   version=v))
        out = engine.infer(X).outputs
        assert [float(o[0]) for o in out[:K]] == [1.0, float(v), float(-v), 2.0]
