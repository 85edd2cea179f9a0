"""Every refit error: its own type, naming the tensor, and the engine still serving its old weights.

After each refused call the engine must answer the same result with the same version as before,
and hold no staged memory (I4: validate before touching).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cluster.publish import load_and_check
from engines import (
    BuilderConfig,
    DtypeMismatchError,
    MemoryBudgetError,
    MissingWeightsError,
    NonFiniteWeightError,
    NotRetainedError,
    RefitDisabledError,
    RefitError,
    ShapeMismatchError,
    StagedSetDiscardedError,
    StagedSetSupersededError,
    UnknownWeightError,
    VersionOrderError,
    WeightError,
    WeightFileError,
    build_engine,
)


class _TwoWeights(torch.nn.Module):
    """y = x * a + b.sum(): two weights of different sizes (a: 4 floats, b: 8 floats)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.full((4,), 1.0))
        self.b = torch.nn.Parameter(torch.full((8,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.a + self.b.sum()


X = torch.ones(4)


def _engine(**cfg):
    cfg.setdefault("enable_refit", True)
    return build_engine(_TwoWeights(), [X], BuilderConfig(**cfg))


def _snapshot(engine):
    r = engine.infer(X)
    return r.outputs[0].copy(), r.version


def _assert_unchanged(engine, before) -> None:
    out, version = before
    r = engine.infer(X)
    np.testing.assert_array_equal(r.outputs[0], out)
    assert r.version == version
    assert engine.version == version
    assert engine.memory().staged_bytes == 0


@pytest.fixture(params=["swap", "copy"])
def engine(request):
    e = _engine(memory_mode=request.param)
    e.refit_now({"a": torch.full((4,), 2.0)})  # serve version 1, not the build's weights
    return e


GOOD_A = torch.full((4,), 3.0)


def _check_names(exc: WeightError, name: str) -> None:
    assert exc.name == name
    assert repr(name) in str(exc)


# ------------------------------------------------------------------------- manifest checks


@pytest.mark.parametrize("via", ["stage", "refitter", "refit_now"])
def test_unknown_name(engine, via):
    before = _snapshot(engine)
    bad = {"a": GOOD_A, "nope.weight": torch.zeros(4)}  # a good weight beside it changes nothing
    with pytest.raises(UnknownWeightError) as info:
        if via == "stage":
            engine.stage(bad, version=5)
        elif via == "refit_now":
            engine.refit_now(bad)
        else:
            engine.create_refitter().set_named_weights("nope.weight", torch.zeros(4))
    _check_names(info.value, "nope.weight")
    _assert_unchanged(engine, before)


@pytest.mark.parametrize("via", ["stage", "refitter"])
def test_wrong_shape(engine, via):
    before = _snapshot(engine)
    with pytest.raises(ShapeMismatchError, match=r"\(5,\)") as info:
        if via == "stage":
            engine.stage({"a": GOOD_A, "b": torch.zeros(5)}, version=5)
        else:
            engine.create_refitter().set_named_weights("b", torch.zeros(5))
    _check_names(info.value, "b")
    _assert_unchanged(engine, before)


@pytest.mark.parametrize("value", [np.zeros(8, np.float64), torch.zeros(8, dtype=torch.float16),
                                   torch.zeros(8, dtype=torch.int32)], ids=["f64", "f16", "i32"])
def test_wrong_dtype(engine, value):
    before = _snapshot(engine)
    with pytest.raises(DtypeMismatchError) as info:
        engine.stage({"a": GOOD_A, "b": value}, version=5)
    _check_names(info.value, "b")
    assert "float32" in str(info.value)
    _assert_unchanged(engine, before)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_rejected_by_policy(engine, bad):
    before = _snapshot(engine)
    b = torch.zeros(8)
    b[3] = bad
    with pytest.raises(NonFiniteWeightError) as info:
        engine.stage({"a": GOOD_A, "b": b}, version=5)
    _check_names(info.value, "b")
    with pytest.raises(NonFiniteWeightError):
        engine.create_refitter().set_named_weights("b", b.numpy())
    _assert_unchanged(engine, before)


def test_many_small_weights_checked_together_still_name_each_non_finite_one_in_order():
    from engines.validation import non_finite_names

    weights = {f"w{i}": torch.ones(64) for i in range(300)}  # joined into one check
    weights["big"] = torch.ones(1 << 17)  # checked alone
    weights["half"] = torch.ones(16, dtype=torch.bfloat16)
    weights["ints"] = torch.full((4,), 7, dtype=torch.int32)
    assert non_finite_names(weights) == []
    weights["w250"][5] = math.inf
    weights["w7"][63] = math.nan
    weights["big"][-1] = -math.inf
    weights["half"][0] = math.nan
    assert non_finite_names(weights) == ["w7", "w250", "big", "half"]
    huge = {"a": torch.full((8,), 3e38), "b": torch.full((8,), 3e38)}  # finite, but their sum is not
    assert non_finite_names(huge) == []


def test_the_fused_pass_gives_the_checksums_and_the_non_finite_names_of_separate_passes():
    from engines.checksum import checksums
    from engines.validation import checksums_and_non_finite, non_finite_names

    g = torch.Generator().manual_seed(0)
    weights = {
        "large": torch.randn(3 << 19, generator=g),  # 1.5 blocks: the last block is partial
        "large_bf16": torch.randn(3 << 20, generator=g).to(torch.bfloat16),
        "large_ints": torch.arange(1 << 20, dtype=torch.int32),
        "transposed": torch.randn(1024, 1024, generator=g).t(),  # not contiguous: the plain path
        "small": torch.randn(7, generator=g),
        "overflowing": torch.full((1 << 20,), 3e38),  # finite, but any sum of it is not
        "large_f16": torch.ones(1 << 20, dtype=torch.float16),  # its sums overflow at 65504
    }
    weights["large"][-1] = math.nan  # in the partial block
    weights["large_bf16"][1 << 21] = math.inf  # the first element of its second block (4 MiB of bf16)
    weights["small"][0] = -math.inf
    weights["large_f16"][-1] = math.inf
    sums, bad = checksums_and_non_finite(weights, scan_values=True)
    assert sums == checksums(weights)
    assert list(sums) == list(weights)
    assert bad == non_finite_names(weights) == ["large", "large_bf16", "small", "large_f16"]
    assert checksums_and_non_finite(weights, scan_values=False) == (sums, [])


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_allowed_by_policy_goes_through(bad):
    engine = _engine(non_finite="allow")
    b = torch.zeros(8)
    b[0] = bad
    assert engine.refit_now({"b": b}) == 1
    r = engine.infer(X)
    assert r.version == 1
    assert not np.isfinite(r.outputs[0]).any()


# ------------------------------------------------------------------------- Python's conventions


def _nan_b() -> torch.Tensor:
    b = torch.zeros(8)
    b[2] = math.nan
    return b


def _complete_refit_lacking_b(engine) -> None:
    """The caller's half of a complete refit (the engine itself accepts subsets)."""
    manifest = {n: s.model_dump() for n, s in engine.manifest().items()}
    load_and_check({"a": GOOD_A}, manifest, complete=True)


# (error, the call that raises it, what its message must name)
BAD_VALUES: list[tuple[type[RefitError], Callable[[Any], Any], str]] = [
    (UnknownWeightError, lambda e: e.stage({"a": GOOD_A, "nope.weight": torch.zeros(4)}, version=5),
     "'nope.weight'"),
    (ShapeMismatchError, lambda e: e.stage({"a": GOOD_A, "b": torch.zeros(5)}, version=5), "'b'"),
    (DtypeMismatchError, lambda e: e.stage({"b": torch.zeros(8, dtype=torch.float16)}, version=5), "'b'"),
    (NonFiniteWeightError, lambda e: e.stage({"a": GOOD_A, "b": _nan_b()}, version=5), "'b'"),
    (NonFiniteWeightError, lambda e: e.create_refitter().set_named_weights("b", _nan_b()), "'b'"),
    (WeightFileError, lambda e: e.stage({"b": np.array([{}, None] * 4, dtype=object)}, version=5), "'b'"),
    (VersionOrderError, lambda e: e.stage({"a": GOOD_A}, version=1), "version 1 "),
    (MissingWeightsError, _complete_refit_lacking_b, "'b'"),
]


@pytest.mark.parametrize(("error", "call", "named"), BAD_VALUES,
                         ids=[f"{e.__name__}-{i}" for i, (e, _, _) in enumerate(BAD_VALUES)])
def test_bad_value_errors_are_caught_by_except_value_error_and_still_name_the_tensor(
        engine, error, call, named):
    before = _snapshot(engine)
    caught: ValueError | None = None
    try:
        call(engine)
    except ValueError as exc:  # a user's plain `except ValueError` must catch it
        caught = exc
    assert type(caught) is error, f"expected {error.__name__}, caught {caught!r}"
    assert isinstance(caught, RefitError)  # still the engine's own hierarchy too
    assert named in str(caught)
    if isinstance(caught, WeightError):
        assert caught.name == named.strip("'")
    _assert_unchanged(engine, before)


def test_dtype_mismatch_is_caught_by_except_type_error_and_names_the_tensor(engine):
    before = _snapshot(engine)
    caught: TypeError | None = None
    try:
        engine.create_refitter().set_named_weights("b", torch.zeros(8, dtype=torch.int32))
    except TypeError as exc:
        caught = exc
    assert isinstance(caught, DtypeMismatchError), repr(caught)
    assert isinstance(caught, ValueError) and isinstance(caught, RefitError)
    assert caught.name == "b" and "'b'" in str(caught) and "float32" in str(caught)
    _assert_unchanged(engine, before)


# ------------------------------------------------------------------------- refit disabled


def test_refit_of_engine_built_without_enable_refit():
    engine = build_engine(_TwoWeights(), [X], BuilderConfig())  # enable_refit defaults to False
    assert engine.config.enable_refit is False
    before = _snapshot(engine)
    with pytest.raises(RefitDisabledError, match="enable_refit"):
        engine.create_refitter()
    with pytest.raises(RefitDisabledError):
        engine.stage({"a": GOOD_A}, version=1)
    with pytest.raises(RefitDisabledError):
        engine.refit_now({"a": GOOD_A})
    with pytest.raises(RefitDisabledError):
        engine.stage_retained(0, 1)
    _assert_unchanged(engine, before)


# ------------------------------------------------------------------------- staged-set lifecycle


def test_commit_of_a_discarded_set(engine):
    before = _snapshot(engine)
    staged = engine.stage({"a": GOOD_A}, version=5)
    assert engine.memory().staged_bytes == 16
    engine.discard(staged)
    engine.discard(staged)  # twice is a no-op
    with pytest.raises(StagedSetDiscardedError, match="version 5"):
        engine.commit(staged)
    _assert_unchanged(engine, before)


def test_commit_of_a_superseded_set(engine):
    first = engine.stage({"a": GOOD_A}, version=5)
    second = engine.stage({"a": torch.full((4,), 7.0)}, version=6)  # staged against version 1, too
    assert engine.commit(first) == 5
    before = _snapshot(engine)
    assert before[1] == 5
    with pytest.raises(StagedSetSupersededError, match="version 6"):
        engine.commit(second)
    _assert_unchanged(engine, before)  # the superseded set was freed, version 5 still serves
    with pytest.raises(StagedSetDiscardedError):
        engine.commit(second)


@pytest.mark.parametrize("version", [0, 1], ids=["older", "equal"])
def test_stage_of_a_version_not_newer(engine, version):
    before = _snapshot(engine)
    assert before[1] == 1
    with pytest.raises(VersionOrderError, match=f"version {version} "):
        engine.stage({"a": GOOD_A}, version=version)
    _assert_unchanged(engine, before)


def test_stage_retained_of_a_version_not_held():
    engine = _engine(keep_previous=False)
    engine.refit_now({"a": GOOD_A})
    engine.refit_now({"a": GOOD_A * 2})
    before = _snapshot(engine)
    with pytest.raises(NotRetainedError, match="version 0"):
        engine.stage_retained(0, 10)
    with pytest.raises(VersionOrderError):
        engine.stage_retained(2, 2)
    _assert_unchanged(engine, before)


# ------------------------------------------------------------------------- weight files


class _Evil:
    """Unpickling this would create a marker file: the classic pickle code-execution payload."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pt_file_with_a_pickle_payload_is_refused_without_running_it(engine, tmp_path):
    before = _snapshot(engine)
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"a": GOOD_A, "b": _Evil(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(WeightFileError, match="evil.pt"):
        engine.stage(path, version=5)
    assert not marker.exists()
    _assert_unchanged(engine, before)


def test_pt_file_that_is_not_a_flat_tensor_dict(engine, tmp_path):
    before = _snapshot(engine)
    path = tmp_path / "nested.pt"
    torch.save({"a": GOOD_A, "meta": {"lr": 0.1}}, path)
    with pytest.raises(WeightFileError, match="nested.pt"):
        engine.stage(path, version=5)
    _assert_unchanged(engine, before)


def test_npz_with_object_arrays_is_refused(engine, tmp_path):
    before = _snapshot(engine)
    path = tmp_path / "obj.npz"
    np.savez(path, a=np.array([{"x": 1}, None], dtype=object))
    with pytest.raises(WeightFileError, match="obj.npz"):
        engine.stage(path, version=5)
    _assert_unchanged(engine, before)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad-header"])
def test_malformed_safetensors(engine, tmp_path, damage):
    before = _snapshot(engine)
    good = tmp_path / "good.safetensors"
    save_file({"a": GOOD_A, "b": torch.zeros(8)}, str(good))
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) - 10])
    elif damage == "garbage":
        bad.write_bytes(np.random.default_rng(0).bytes(256))
    else:
        bad.write_bytes((10**6).to_bytes(8, "little") + data[8:])
    with pytest.raises(WeightFileError, match="bad.safetensors"):
        engine.stage(bad, version=5)
    _assert_unchanged(engine, before)


def test_missing_or_unknown_weights_file(engine, tmp_path):
    before = _snapshot(engine)
    with pytest.raises(WeightFileError, match="does not exist"):
        engine.stage(tmp_path / "nope.safetensors", version=5)
    other = tmp_path / "w.txt"
    other.write_text("a = 1")
    with pytest.raises(WeightFileError, match="unknown format"):
        engine.stage(other, version=5)
    _assert_unchanged(engine, before)


# ------------------------------------------------------------------------- memory budget


@pytest.mark.parametrize("mode", ["swap", "copy"])
def test_memory_budget_too_small(mode):
    engine = _engine(memory_mode=mode, memory_budget_bytes=20)  # a: 16 bytes fits, a + b: 48 does not
    engine.refit_now({"a": torch.full((4,), 2.0)})
    before = _snapshot(engine)
    with pytest.raises(MemoryBudgetError, match="budget 20"):
        engine.stage({"a": GOOD_A, "b": torch.zeros(8)}, version=5)
    _assert_unchanged(engine, before)
    assert engine.memory().extra_bytes <= 20
    # within the budget it still works
    staged = engine.stage({"a": GOOD_A}, version=5)
    assert engine.memory().extra_bytes <= 20
    engine.commit(staged)
    assert engine.infer(X).version == 5


def test_memory_budget_holds_when_the_pool_is_cleared():
    """Every successful stage keeps the engine's extra memory within the budget.

    Here the pool holds a buffer that fits one of the new tensors plus one that fits none; the
    budget check discounts the fitting buffer, then clears the pool (that buffer too) to make room,
    and the stage allocates every tensor afresh: 48 bytes staged against a budget of 40.
    """
    engine = build_engine(_ThreeWeights(), [X], BuilderConfig(
        enable_refit=True, keep_previous=False, memory_budget_bytes=40))
    engine.refit_now({"a": torch.ones(4)})  # old a (16 B) -> pool
    engine.refit_now({"c": torch.ones(2)})  # old c (8 B) -> pool
    assert engine.memory().pool_bytes == 24
    with contextlib.suppress(MemoryBudgetError):  # refusing is fine; exceeding the budget is not
        engine.stage({"a": torch.full((4,), 2.0), "b": torch.ones(8)}, version=5)  # needs 48 B
    assert engine.memory().extra_bytes <= 40, engine.memory()


class _ThreeWeights(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(4))
        self.b = torch.nn.Parameter(torch.zeros(8))
        self.c = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.a + self.b.sum() + self.c.sum()


# ------------------------------------------------------------------------- errors across processes


PICKLED_ERRORS: list[RefitError] = [
    UnknownWeightError("nope.weight", "not a refittable weight of this engine"),
    ShapeMismatchError("b", "shape (5,) != expected (8,)"),
    DtypeMismatchError("b", "dtype float16 != expected float32 (no implicit casts)"),
    NonFiniteWeightError("b", "1 non-finite value(s) (NaN/Inf) refused by policy"),
    WeightFileError("weight 'b': a meta tensor has no data", name="b"),
    MissingWeightsError(["a", "b"]),
    VersionOrderError("version 1 is not newer than the live version 1"),
]


@pytest.mark.parametrize("error", PICKLED_ERRORS, ids=[type(e).__name__ for e in PICKLED_ERRORS])
def test_every_refit_error_pickles_to_the_same_type_message_and_names(error: RefitError) -> None:
    """Errors cross Ray's process boundaries by pickle; a WeightError used to fail to unpickle."""
    import pickle

    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert getattr(copy, "name", None) == getattr(error, "name", None)
    assert getattr(copy, "names", None) == getattr(error, "names", None)
