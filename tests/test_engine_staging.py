"""stage / commit / discard semantics, subset refits and what they cost in memory, retained sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines import BuilderConfig, NotRetainedError, StagedState, build_engine


class _TwoWeights(torch.nn.Module):
    """outputs (x * a, x[:1] * b.sum()): a is 4 floats (16 B), b is 64 floats (256 B)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(4))
        self.b = torch.nn.Parameter(torch.zeros(64))

    def forward(self, x: torch.Tensor):
        return x * self.a, x[:1] * self.b.sum()


X = torch.ones(4)
A_BYTES, B_BYTES = 16, 256


def _engine(**cfg):
    return build_engine(_TwoWeights(), [X], BuilderConfig(enable_refit=True, **cfg))


def _values(engine) -> tuple[float, float, int]:
    r = engine.infer(X)
    assert np.all(r.outputs[0] == r.outputs[0][0])
    return float(r.outputs[0][0]), float(r.outputs[1][0]), r.version


def _full(a: float, b: float) -> dict[str, torch.Tensor]:
    return {"a": torch.full((4,), a), "b": torch.full((64,), b / 64)}


@pytest.fixture(params=["swap", "copy", "shared"])
def mode(request):
    return request.param


# ------------------------------------------------------------------------- stage / commit / discard


def test_staged_set_is_invisible_until_commit(mode):
    engine = _engine(memory_mode=mode)
    staged = engine.stage(_full(2.0, 3.0), version=7)
    assert staged.state is StagedState.STAGED
    assert staged.version == 7
    assert _values(engine) == (0.0, 0.0, 0)
    assert engine.version == 0
    assert engine.commit(staged) == 7
    assert staged.state is StagedState.COMMITTED
    assert _values(engine) == (2.0, 3.0, 7)
    assert engine.version == 7


def test_commit_twice_is_idempotent(mode):
    engine = _engine(memory_mode=mode)
    staged = engine.stage(_full(2.0, 3.0), version=3)
    assert engine.commit(staged) == 3
    weights = engine.weights()
    memory = engine.memory()
    assert engine.commit(staged) == 3
    assert _values(engine) == (2.0, 3.0, 3)
    assert engine.memory() == memory
    assert all(engine.weights()[n] is t for n, t in weights.items())


def test_discard_frees_the_staged_memory(mode):
    engine = _engine(memory_mode=mode)
    assert engine.memory().staged_bytes == 0
    staged = engine.stage(_full(2.0, 3.0), version=1)
    assert staged.nbytes == A_BYTES + B_BYTES
    assert engine.memory().staged_bytes == A_BYTES + B_BYTES
    engine.discard(staged)
    assert staged.state is StagedState.DISCARDED
    assert engine.memory().staged_bytes == 0
    assert _values(engine) == (0.0, 0.0, 0)
    # the version number was not consumed: it can be staged again
    assert engine.commit(engine.stage(_full(1.0, 1.0), version=1)) == 1


def test_several_staged_sets_count_and_free_separately(mode):
    engine = _engine(memory_mode=mode)
    s1 = engine.stage({"a": torch.ones(4)}, version=1)
    s2 = engine.stage({"b": torch.ones(64)}, version=2)
    assert engine.memory().staged_bytes == A_BYTES + B_BYTES
    engine.discard(s2)
    assert engine.memory().staged_bytes == A_BYTES
    engine.commit(s1)
    assert engine.memory().staged_bytes == 0
    assert _values(engine) == (1.0, 0.0, 1)


def test_discarded_swap_buffers_are_reused_by_the_next_stage():
    engine = _engine(memory_mode="swap")
    s1 = engine.stage({"b": torch.ones(64)}, version=1)
    ptr = s1.weight_set.tensors["b"].data_ptr()
    engine.discard(s1)
    assert engine.memory().pool_bytes == B_BYTES
    s2 = engine.stage({"b": torch.full((64,), 2.0)}, version=1)
    assert s2.weight_set.tensors["b"].data_ptr() == ptr
    assert engine.memory().pool_bytes == 0
    engine.commit(s2)
    assert _values(engine) == (0.0, 128.0, 1)


# ------------------------------------------------------------------------- subset refits


def test_subset_refit_shares_the_unchanged_tensors():
    engine = _engine(memory_mode="swap")
    live = engine.weights()
    staged = engine.stage({"a": torch.full((4,), 5.0)}, version=1)
    assert staged.names == ("a",)
    assert staged.nbytes == A_BYTES
    assert engine.memory().staged_bytes == A_BYTES
    engine.commit(staged)
    new = engine.weights()
    assert new["b"] is live["b"]
    assert new["b"].data_ptr() == live["b"].data_ptr()
    assert new["a"] is not live["a"]
    assert new["a"].data_ptr() != live["a"].data_ptr()
    assert torch.equal(live["a"], torch.zeros(4))  # the old set was not written
    assert _values(engine) == (5.0, 0.0, 1)


@pytest.mark.parametrize("names", [("a",), ("b",), ("a", "b")])
def test_memory_of_a_subset_refit_is_the_changed_tensors(mode, names):
    engine = _engine(memory_mode=mode)
    sizes = {"a": A_BYTES, "b": B_BYTES}
    full = _full(1.0, 64.0)
    staged = engine.stage({n: full[n] for n in names}, version=1)
    expected = sum(sizes[n] for n in names)
    assert staged.nbytes == expected
    report = engine.memory()
    assert report.staged_bytes == expected
    assert report.live_bytes == A_BYTES + B_BYTES
    assert report.extra_bytes == expected
    engine.commit(staged)
    assert engine.memory().staged_bytes == 0


@pytest.mark.parametrize("keep", [True, False])
def test_keep_previous(keep):
    engine = _engine(memory_mode="swap", keep_previous=keep)
    v0 = engine.weights()
    engine.refit_now({"b": torch.ones(64)})
    report = engine.memory()
    if keep:
        assert report.previous_bytes == B_BYTES  # b only: a is shared with the live set
        assert engine.retained_versions() == [1, 0]
        assert engine.weights(0)["b"] is v0["b"]
        assert engine.weights(0)["a"] is engine.weights()["a"]
    else:
        assert report.previous_bytes == 0
        assert engine.retained_versions() == [1]
        with pytest.raises(NotRetainedError):
            engine.weights(0)
        assert report.pool_bytes == B_BYTES  # the replaced buffer went back to the pool
    engine.drop_previous()
    assert engine.memory().previous_bytes == 0
    assert engine.retained_versions() == [1]


def test_stage_retained_restages_the_previous_set_without_copying():
    engine = _engine(memory_mode="swap", keep_previous=True)
    engine.refit_now(_full(1.0, 64.0))
    v1 = engine.weights()
    engine.refit_now({"a": torch.full((4,), 9.0)})
    assert _values(engine) == (9.0, 64.0, 2)
    staged = engine.stage_retained(1, 3)
    assert staged.nbytes == 0
    assert engine.memory().staged_bytes == 0
    assert _values(engine) == (9.0, 64.0, 2)  # invisible until commit
    assert engine.commit(staged) == 3
    assert _values(engine) == (1.0, 64.0, 3)
    now = engine.weights()
    for name in v1:
        assert now[name] is v1[name]
        assert now[name].data_ptr() == v1[name].data_ptr()
    assert engine.retained_versions() == [3, 2]


def test_stage_retained_of_the_live_version():
    engine = _engine(memory_mode="swap")
    engine.refit_now(_full(1.0, 64.0))
    live = engine.weights()
    engine.commit(engine.stage_retained(1, 2))
    assert _values(engine) == (1.0, 64.0, 2)
    assert all(engine.weights()[n] is t for n, t in live.items())


def test_stage_retained_is_refused_in_copy_mode():
    engine = _engine(memory_mode="copy")
    engine.refit_now(_full(1.0, 64.0))
    with pytest.raises(NotRetainedError):
        engine.stage_retained(0, 2)
    assert _values(engine) == (1.0, 64.0, 1)


# ------------------------------------------------------------------------- commit modes


def test_copy_mode_commits_in_place():
    engine = _engine(memory_mode="copy")
    ptrs = {n: t.data_ptr() for n, t in engine.weights().items()}
    staged = engine.stage(_full(4.0, 64.0), version=1)
    assert staged.weight_set is None
    assert set(staged.host) == {"a", "b"}
    assert all(t.device.type == "cpu" for t in staged.host.values())
    engine.commit(staged)
    assert {n: t.data_ptr() for n, t in engine.weights().items()} == ptrs
    assert _values(engine) == (4.0, 64.0, 1)
    report = engine.memory()
    assert report.previous_bytes == 0
    assert report.staged_bytes == 0
    assert report.pool_bytes == 0
    assert staged.host == {}


def test_swap_mode_commit_is_a_reference_swap():
    engine = _engine(memory_mode="swap")
    ptrs = {n: t.data_ptr() for n, t in engine.weights().items()}
    staged = engine.stage(_full(4.0, 64.0), version=1)
    new_ptrs = {n: t.data_ptr() for n, t in staged.weight_set.tensors.items()}
    assert set(new_ptrs.values()).isdisjoint(ptrs.values())
    engine.commit(staged)
    assert {n: t.data_ptr() for n, t in engine.weights().items()} == new_ptrs
    # a functional upper bound on one reference swap, not a benchmark
    assert engine.last_swap_ns < 100_000, engine.last_swap_ns
    assert _values(engine) == (4.0, 64.0, 1)


# ------------------------------------------------------------------------- prefilled pool


def test_prefilled_pool_serves_the_first_refits_without_new_buffers():
    engine = _engine(keep_previous=True)
    assert engine.prefill_pool(2) == 2 * (A_BYTES + B_BYTES)
    assert engine.memory().pool_bytes == 2 * (A_BYTES + B_BYTES)
    pooled = {t.data_ptr() for t in engine._pool._free[((4,), torch.float32, "cpu")]}
    pooled |= {t.data_ptr() for t in engine._pool._free[((64,), torch.float32, "cpu")]}
    seen = set()
    for v, val in ((1, 2.0), (2, 3.0)):
        engine.commit(engine.stage(_full(val, val), version=v))
        seen |= {t.data_ptr() for t in engine.weights().values()}
        assert _values(engine) == (val, val, v)
    assert seen == pooled  # both refits staged into the prefilled buffers
    assert engine.memory().pool_bytes == A_BYTES + B_BYTES  # v0's set, retired by the 2nd commit


class _LargeWeights(torch.nn.Module):
    """A 4 MiB float32 weight and a 6 MiB bfloat16 one: staged on the helper threads."""

    def __init__(self) -> None:
        super().__init__()
        self.f = torch.nn.Parameter(torch.zeros(1024, 1024))
        self.h = torch.nn.Parameter(torch.zeros(3, 1 << 20, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor):
        return x * self.f[0, :4], (x * self.h[2, :4].float())


@pytest.mark.parametrize("prefill", [0, 2])
def test_large_staging_buffers_hold_every_value_in_their_dtype_and_shape(prefill):
    engine = build_engine(_LargeWeights(), [X], BuilderConfig(enable_refit=True))
    assert engine.prefill_pool(prefill) == prefill * (4 << 20) + prefill * (6 << 20)
    for v in (1, 2, 3):
        new = {"f": torch.arange(1 << 20, dtype=torch.float32).reshape(1024, 1024) * v,
               "h": torch.full((3, 1 << 20), float(v), dtype=torch.bfloat16)}
        engine.commit(engine.stage(new, version=v))
        live = engine.weights()
        for name, t in new.items():
            assert live[name].dtype == t.dtype and live[name].shape == t.shape and torch.equal(live[name], t)
        out = engine.infer(X).outputs
        assert out[0].tolist() == new["f"][0, :4].tolist() and out[1].tolist() == [float(v)] * 4
    if prefill:
        assert engine.allocated_bytes == 0  # every stage went into the prefilled buffers


def test_prefill_respects_the_memory_budget_and_copy_mode():
    budget = A_BYTES + B_BYTES + A_BYTES  # one spare set and one more small buffer
    engine = _engine(memory_budget_bytes=budget)
    added = engine.prefill_pool(3)
    assert 0 < added <= budget and engine.memory().extra_bytes <= budget
    engine.commit(engine.stage(_full(1.0, 1.0), version=1))  # still refits within the budget
    assert _values(engine) == (1.0, 1.0, 1)
    assert _engine(memory_mode="copy").prefill_pool(2) == 0


def test_every_weight_set_runs_the_one_graph_and_binding_builds_nothing(monkeypatch):
    """Building a module holds the GIL for milliseconds, stalling serving threads: a staged set
    is only the graph's leading arguments, so no refit builds or compiles a module."""
    engine = _engine(keep_previous=True)
    built = []
    monkeypatch.setattr(torch.fx.GraphModule, "recompile", lambda self: built.append(self))
    for v in range(1, 11):
        engine.commit(engine.stage(_full(float(v), float(v)), version=v))
        assert _values(engine) == (float(v), float(v), v)
    assert built == []
    engine.commit(engine.stage_retained(9, 11))  # shares the previous set's program
    engine.commit(engine.stage(_full(12.0, 12.0), version=12))
    assert _values(engine) == (12.0, 12.0, 12)
    engine.commit(engine.stage(_full(13.0, 13.0), version=13))
    assert _values(engine) == (13.0, 13.0, 13)


# ------------------------------------------------------------------------- shared mode (CPU)


def _read_only(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors over read-only numpy arrays, as a replica gets them from Ray's object store."""
    import warnings

    out = {}
    for name, t in values.items():
        arr = t.numpy().copy()
        arr.flags.writeable = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch: "the given NumPy array is not writable"
            out[name] = torch.from_numpy(arr)
    return out


def test_shared_mode_serves_borrowed_tensors_without_copying_them():
    engine = _engine(memory_mode="shared", keep_previous=False)
    src = _full(2.0, 3.0)
    engine.commit(engine.stage(src, version=1, borrow=True))
    live = engine.weights()
    assert all(live[n].data_ptr() == src[n].data_ptr() for n in src)
    assert _values(engine) == (2.0, 3.0, 1)
    mem = engine.memory()
    assert (mem.borrowed_bytes, mem.previous_bytes, mem.staged_bytes, mem.pool_bytes) == \
        (A_BYTES + B_BYTES, 0, 0, 0)


def test_shared_mode_copies_what_it_is_not_allowed_to_borrow():
    engine = _engine(memory_mode="shared")
    src = _full(2.0, 3.0)
    engine.commit(engine.stage(src, version=1))
    assert all(engine.weights()[n].data_ptr() != src[n].data_ptr() for n in src)
    src["a"].fill_(9.0)  # the caller's tensor is its own again
    assert _values(engine) == (2.0, 3.0, 1)


def test_other_modes_copy_even_when_borrowing_is_offered(mode):
    engine = _engine(memory_mode=mode)
    src = _full(2.0, 3.0)
    engine.commit(engine.stage(src, version=1, borrow=True))
    if mode != "shared":
        assert all(engine.weights()[n].data_ptr() != src[n].data_ptr() for n in src)
        src["a"].fill_(9.0)
    assert _values(engine) == (2.0, 3.0, 1)


def test_shared_mode_lets_go_of_a_retired_set_at_once():
    """Nothing pools a borrowed tensor and no spare module keeps one: once a set is retired and
    its readers are gone, the engine holds nothing of its memory (the object store can free it).
    Version 0 is not kept either: the exported program's own copy of the weights is dropped."""
    import gc
    import weakref

    engine = _engine(memory_mode="shared", keep_previous=False)
    assert dict(engine.backend.program.module.state_dict()) == {}
    assert not set(engine.backend.program.constants) & set(engine.weights())
    arrays = {n: t.numpy().copy() for n, t in _full(2.0, 3.0).items()}
    held = [weakref.ref(a) for a in arrays.values()]
    first = engine.stage({n: torch.from_numpy(a) for n, a in arrays.items()}, version=1, borrow=True)
    engine.commit(first)  # ``first`` stays referenced, as a replica's transaction record keeps it
    del arrays
    gc.collect()
    assert all(r() is not None for r in held), "the live set must hold what it serves"
    engine.commit(engine.stage(_read_only(_full(4.0, 5.0)), version=2, borrow=True))
    gc.collect()
    assert [r() for r in held] == [None, None], "a retired borrowed set is still referenced"
    assert _values(engine) == (4.0, 5.0, 2)
    assert engine.memory().pool_bytes == 0


def test_shared_mode_keeps_the_previous_set_for_instant_rollback():
    engine = _engine(memory_mode="shared", keep_previous=True)
    first = _read_only(_full(2.0, 3.0))
    engine.commit(engine.stage(first, version=1, borrow=True))
    engine.commit(engine.stage(_read_only(_full(4.0, 5.0)), version=2, borrow=True))
    assert engine.retained_versions() == [2, 1]
    engine.commit(engine.stage_retained(1, 3))
    assert _values(engine) == (2.0, 3.0, 3)
    assert engine.weights()["a"].data_ptr() == first["a"].data_ptr()


def test_shared_mode_subset_refit_borrows_only_the_named_tensors():
    engine = _engine(memory_mode="shared")
    engine.commit(engine.stage(_full(2.0, 3.0), version=1))
    owned_b = engine.weights()["b"]
    a = _read_only({"a": torch.full((4,), 7.0)})
    engine.commit(engine.stage(a, version=2, borrow=True))
    assert engine.weights()["a"].data_ptr() == a["a"].data_ptr()
    assert engine.weights()["b"] is owned_b
    assert engine.memory().borrowed_bytes == A_BYTES
    assert _values(engine) == (7.0, 3.0, 2)


@pytest.mark.parametrize("field", [{"device": "cuda"}, {"backend": "magicmind"}])
def test_shared_mode_needs_a_cpu_torch_engine(field):
    with pytest.raises(ValueError, match="memory_mode 'shared'"):
        BuilderConfig(enable_refit=True, memory_mode="shared", **field)


# ------------------------------------------------------------------------- verified as staged


BIG = (1 << 18) * 3 + 5  # 3 MiB and a bit: copied and hashed in 1 MiB blocks, in the staging thread
HUGE = (1 << 18) * 5 + 3  # 5 MiB and a bit: copied and hashed on the helper threads


def _big_engine(mode: str, numel: int = BIG):
    class Big(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(numel))

        def forward(self, x: torch.Tensor):
            return x * self.w[-1]

    return build_engine(Big(), [torch.ones(1)], BuilderConfig(enable_refit=True, memory_mode=mode))


@pytest.mark.parametrize("numel", [BIG, HUGE], ids=["in-thread", "on-helpers"])
def test_staging_with_checksums_verifies_every_block_as_it_copies(mode, numel):
    from engines.checksum import ChecksumMismatch, ChecksumMissing, tensor_checksum

    engine = _big_engine(mode, numel)
    good = torch.full((numel,), 2.0)
    want = {"w": tensor_checksum(good)}
    for at in (0, (1 << 18) + 7, numel - 1):  # the first, a middle and the last block
        bad = good.clone()
        bad[at] = 2.5
        with pytest.raises(ChecksumMismatch, match="'w'") as err:
            engine.stage({"w": bad}, version=1, borrow=True, checksums=want)
        assert err.value.where == "staging version 1"
        assert engine.memory().staged_bytes == 0
        assert float(engine.infer(torch.ones(1)).outputs[0][0]) == 0.0
    with pytest.raises(ChecksumMissing, match="'w'"):
        engine.stage({"w": good}, version=1, checksums={})
    staged = engine.stage({"w": good}, version=1, borrow=True, checksums=want)
    engine.commit(staged)
    assert float(engine.infer(torch.ones(1)).outputs[0][0]) == 2.0
    assert tensor_checksum(engine.weights()["w"]) == want["w"]


@pytest.mark.parametrize("numel", [BIG, HUGE], ids=["in-thread", "on-helpers"])
def test_a_failed_verification_returns_its_buffers_to_the_pool(numel):
    from engines.checksum import ChecksumMismatch, tensor_checksum

    engine = _big_engine("swap", numel)
    engine.prefill_pool(1)
    pooled = engine.memory()
    good = torch.full((numel,), 2.0)
    with pytest.raises(ChecksumMismatch):
        engine.stage({"w": good + 1}, version=1, checksums={"w": tensor_checksum(good)})
    assert engine.memory() == pooled


def test_a_large_tensor_staged_without_a_checksum_is_copied_on_a_helper_thread_too(monkeypatch):
    import threading

    import engines.engine as engine_module

    copied_on: list[str] = []
    copy_only = engine_module._copy_only

    def recording(dst: torch.Tensor, src: torch.Tensor) -> None:
        copied_on.append(threading.current_thread().name)
        copy_only(dst, src)

    monkeypatch.setattr(engine_module, "_copy_only", recording)
    engine = _big_engine("swap", HUGE)
    engine.commit(engine.stage({"w": torch.full((HUGE,), 3.0)}, version=1))
    assert float(engine.infer(torch.ones(1)).outputs[0][0]) == 3.0
    assert copied_on and all(name.startswith("refit-helper") for name in copied_on), copied_on


def test_refit_work_runs_on_helper_threads_that_yield_to_serving_threads():
    import os
    import threading

    from engines.threads import BACKGROUND_NICE, helpers

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = nice()
    assert helpers().submit(nice).result() == max(mine, BACKGROUND_NICE)
    assert nice() == mine  # the caller's own priority is untouched


@pytest.mark.parametrize("value, level", [("", 19), ("7", 7), ("off", None)])
def test_the_background_priority_can_be_set_or_turned_off(monkeypatch, value, level):
    from engines.threads import background_nice

    monkeypatch.setenv("WEIGHT_REFIT_BACKGROUND_NICE", value)
    assert background_nice() == level


@pytest.mark.parametrize("value", ["20", "-1", "low"])
def test_a_bad_background_priority_is_refused_naming_the_variable(monkeypatch, value):
    from engines.threads import background_nice

    monkeypatch.setenv("WEIGHT_REFIT_BACKGROUND_NICE", value)
    with pytest.raises(ValueError, match="WEIGHT_REFIT_BACKGROUND_NICE"):
        background_nice()
