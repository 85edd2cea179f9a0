"""Small weights staged from their packed buffer (``engines.packed``): one copy into a block of
the engine's own, blocks reused only once no set holds a view of them, every entry checked first."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.payload import spec_dict, staged_from_wire, to_wire
from engines import BuilderConfig, build_engine
from engines.checksum import ChecksumMismatch, checksums
from engines.errors import (
    DtypeMismatchError,
    NonFiniteWeightError,
    ShapeMismatchError,
    UnknownWeightError,
    WeightFileError,
)
from engines.packed import PackedWeights, non_finite


class _ThreeWeights(torch.nn.Module):
    """outputs (x * a, x[:1] * b.sum(), x[:1] * c.sum()): three small weights."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(4))
        self.b = torch.nn.Parameter(torch.zeros(64))
        self.c = torch.nn.Parameter(torch.zeros(2, 3))

    def forward(self, x: torch.Tensor):
        return x * self.a, x[:1] * self.b.sum(), x[:1] * self.c.sum()


X = torch.ones(4)


def _engine(**cfg):
    return build_engine(_ThreeWeights(), [X], BuilderConfig(enable_refit=True, **cfg))


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"a": torch.full((4,), value), "b": torch.full((64,), value), "c": torch.full((2, 3), value)}


def _packed(tensors: dict[str, torch.Tensor]) -> PackedWeights:
    rest, packed = staged_from_wire([to_wire(tensors)], spec_dict(tensors))
    assert not rest and len(packed) == 1
    return packed[0]


def _serves(engine, value: float) -> bool:
    out = engine.infer(X).outputs
    return float(out[0][0]) == value and float(out[1][0]) == 64 * value and float(out[2][0]) == 6 * value


def _refit(engine, version: int, value: float):
    staged = engine.stage({}, version, packed=[_packed(_weights(value))])
    engine.commit(staged)
    return staged


def test_a_packed_buffer_is_staged_with_one_copy_as_views_of_one_block() -> None:
    engine = _engine()
    staged = engine.stage({}, 1, packed=[_packed(_weights(2.0))])
    tensors = staged.weight_set.tensors
    storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
    assert len(storages) == 1 and set(staged.names) == {"a", "b", "c"}
    assert _serves(engine, 0.0)
    engine.commit(staged)
    assert _serves(engine, 2.0) and engine.version == 1
    assert all(torch.equal(engine.weights()[n], t) for n, t in _weights(2.0).items())


def test_a_retired_sets_block_is_reused_for_the_next_version_of_its_layout() -> None:
    engine = _engine()  # keep_previous: live, previous and the set being staged
    first = _refit(engine, 1, 1.0).weight_set.tensors["a"].untyped_storage().data_ptr()
    _refit(engine, 2, 2.0)
    _refit(engine, 3, 3.0)  # version 1 retires: its block is free
    allocated = engine.allocated_bytes
    fourth = _refit(engine, 4, 4.0).weight_set.tensors["a"].untyped_storage().data_ptr()
    assert fourth == first
    for version in range(5, 10):
        _refit(engine, version, float(version))
    assert engine.allocated_bytes == allocated
    assert _serves(engine, 9.0)
    block, first_set = _packed(_weights(0.0)).buffer.numel(), engine.memory().live_bytes
    assert engine.memory().pool_bytes == first_set + block  # version 0's buffers, version 7's block
    engine.drop_previous()
    assert engine.memory().pool_bytes == first_set + 2 * block


def test_a_block_goes_back_only_once_no_set_holds_a_view_of_it() -> None:
    engine = _engine()
    _refit(engine, 1, 1.0)
    partial = engine.stage({"a": torch.full((4,), 2.0)}, 2)  # b and c stay views of version 1's block
    engine.commit(partial)
    _refit(engine, 3, 3.0)  # version 1 retires; version 2, the previous set, still reads its block
    _refit(engine, 4, 4.0)  # stages while version 2 is previous: must not take version 1's block
    previous = engine.weights(version=3)
    assert float(previous["b"][0]) == 3.0
    _refit(engine, 5, 5.0)
    assert _serves(engine, 5.0)
    assert all(float(t.flatten()[0]) == 4.0 for t in engine.weights(version=4).values())


def test_a_rolled_back_set_keeps_the_block_it_reads_until_it_retires() -> None:
    engine = _engine()
    _refit(engine, 1, 1.0)
    engine.commit(engine.stage({"a": torch.full((4,), 2.0)}, 2))  # b and c: version 1's block
    _refit(engine, 3, 3.0)
    engine.commit(engine.stage_retained(2, 4))  # version 2's weights again, version 1's block
    _refit(engine, 5, 5.0)
    back = engine.weights(version=4)
    assert [float(back[n].flatten()[0]) for n in "abc"] == [2.0, 1.0, 1.0]
    _refit(engine, 6, 6.0)  # version 4 retires, and with it the last view of version 1's block
    assert all(float(t.flatten()[0]) == 5.0 for t in engine.weights(version=5).values())
    allocated = engine.allocated_bytes
    _refit(engine, 7, 7.0)  # in version 1's block, back whole in the pool
    assert engine.allocated_bytes == allocated and _serves(engine, 7.0)


@pytest.mark.parametrize("mode,cfg", [("copy", {}), ("shared", {}),
                                      ("swap", {"memory_budget_bytes": 1 << 20})])
def test_other_modes_and_budgets_stage_the_packed_weights_as_ordinary_tensors(mode, cfg) -> None:
    engine = _engine(memory_mode=mode, **cfg)
    staged = engine.stage({}, 1, packed=[_packed(_weights(2.0))], borrow=True)
    engine.commit(staged)
    assert _serves(engine, 2.0)
    engine.commit(engine.stage({}, 2, packed=[_packed(_weights(3.0))], borrow=True))
    assert _serves(engine, 3.0)


def test_packed_and_plain_weights_stage_together_and_a_name_given_twice_is_refused() -> None:
    engine = _engine()
    w = _weights(4.0)
    engine.commit(engine.stage({"a": w["a"]}, 1, packed=[_packed({"b": w["b"], "c": w["c"]})]))
    assert _serves(engine, 4.0)
    with pytest.raises(WeightFileError, match="'a' is given twice") as err:
        engine.stage({"a": w["a"]}, 2, packed=[_packed(_weights(5.0))])
    assert isinstance(err.value, ValueError) and err.value.name == "a"


def _hostile(offsets=None, specs=None, buffer=None) -> PackedWeights:
    good = _packed(_weights(6.0))
    return PackedWeights(good.buffer if buffer is None else buffer,
                         {**good.offsets, **(offsets or {})}, {**good.specs, **(specs or {})})


@pytest.mark.parametrize("packed,error,name", [
    (_hostile(offsets={"zz": (0, 16)}, specs={"zz": {"shape": [4], "dtype": "float32"}}),
     UnknownWeightError, "zz"),
    (_hostile(specs={"b": {"shape": [8, 8], "dtype": "float32"}}), ShapeMismatchError, "b"),
    (_hostile(specs={"a": {"shape": [4], "dtype": "float64"}}), DtypeMismatchError, "a"),
    (_hostile(offsets={"c": (128, 20)}), WeightFileError, "c"),  # 20 bytes for six floats
    (_hostile(offsets={"b": (1 << 20, 256)}), WeightFileError, "b"),  # past the buffer's end
    (_hostile(offsets={"b": (-64, 256)}), WeightFileError, "b"),
    (_hostile(offsets={"a": (2, 16)}), WeightFileError, "a"),  # not where a float32 can start
    (PackedWeights(_packed(_weights(6.0)).buffer, {"a": (0, 16)}, {}), WeightFileError, "a"),
], ids=["unknown", "shape", "dtype", "size", "past-the-end", "negative", "misaligned", "no-spec"])
def test_a_bad_packed_entry_is_refused_naming_it_and_nothing_is_staged(packed, error, name) -> None:
    engine = _engine()
    before = (engine.allocated_bytes, engine.memory())
    with pytest.raises(error) as err:
        engine.stage({}, 1, packed=[packed])
    assert isinstance(err.value, ValueError) and err.value.name == name and repr(name) in str(err.value)
    assert (engine.allocated_bytes, engine.memory()) == before and engine.version == 0
    assert _serves(engine, 0.0)


def test_a_buffer_that_is_not_plain_bytes_on_the_cpu_is_refused() -> None:
    good = _packed(_weights(1.0))
    with pytest.raises(WeightFileError, match="uint8"):
        _engine().stage({}, 1, packed=[PackedWeights(good.buffer.view(torch.int16), good.offsets,
                                                     good.specs)])


def test_packed_weights_not_yet_verified_are_hashed_where_they_lie() -> None:
    engine = _engine()
    w = _weights(7.0)
    sums = checksums(w)
    packed = _packed(w)
    engine.commit(engine.stage({}, 1, packed=[packed], checksums=sums))
    assert _serves(engine, 7.0)
    corrupt = _packed(_weights(8.0))
    corrupt.buffer[corrupt.offsets["c"][0]] ^= 1
    with pytest.raises(ChecksumMismatch) as err:
        engine.stage({}, 2, packed=[corrupt], checksums=checksums(_weights(8.0)))
    assert err.value.name == "c" and engine.version == 1
    verified = engine.stage({}, 2, packed=[corrupt], checksums=checksums(_weights(8.0)), verified={"c"})
    assert verified.version == 2  # the caller vouched for c: its bytes are not hashed again


def test_a_tied_weight_among_packed_ones_is_staged_for_its_whole_group() -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Parameter(torch.zeros(4))
            self.head = self.emb
            self.bias = torch.nn.Parameter(torch.zeros(4))

        def forward(self, x: torch.Tensor):
            return x * self.head + self.bias

    engine = build_engine(Tied(), [X], BuilderConfig(enable_refit=True))
    tied_name = next(n for n in engine.manifest() if n in {"emb", "head"})
    w = {tied_name: torch.full((4,), 2.0), "bias": torch.full((4,), 1.0)}
    engine.commit(engine.stage({}, 1, packed=[_packed(w)]))
    assert np.allclose(engine.infer(X).outputs[0], 3.0)


def test_packed_values_are_refused_when_non_finite_unless_the_caller_checked_them() -> None:
    engine = _engine()  # non_finite: reject
    w = _weights(1.0)
    w["c"][1, 2] = float("nan")
    with pytest.raises(NonFiniteWeightError, match="1 non-finite") as err:
        engine.stage({}, 1, packed=[_packed(w)])
    assert err.value.name == "c" and engine.version == 0
    engine.commit(engine.stage({}, 1, packed=[_packed(w)], values_checked=True))
    assert engine.version == 1


def test_the_packed_scan_finds_each_bad_entry_whatever_the_order_and_the_bytes_between() -> None:
    buffer = torch.full((96,), 0xFF, dtype=torch.uint8)  # the bytes between entries: NaN as float32
    offsets = {"late": (64, 16), "early": (0, 16), "mid": (32, 8)}
    for start, nbytes in offsets.values():
        buffer[start:start + nbytes].view(torch.float32)[:] = 1.0
    assert non_finite(buffer, offsets, lambda name: torch.float32) == set()
    buffer[4:8].view(torch.float32)[0] = float("inf")
    assert non_finite(buffer, offsets, lambda name: torch.float32) == {"early"}


def test_a_large_packed_buffer_is_copied_on_the_helper_threads(monkeypatch) -> None:
    """Like a large tensor's copy: at the helpers' priority, below the threads that serve."""
    import threading

    import engines.engine as engine_module

    class Many(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ws = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(16384)) for _ in range(65)])

        def forward(self, x: torch.Tensor):
            return x * sum(w[0] for w in self.ws)

    engine = build_engine(Many(), [X], BuilderConfig(enable_refit=True))
    weights = {n: torch.full(tuple(s.shape), 0.5) for n, s in engine.manifest().items()}
    packed = _packed(weights)
    assert packed.buffer.numel() >= 4 << 20
    copied_on = []
    real = engine_module._copy_only

    def spy(dst: torch.Tensor, src: torch.Tensor) -> None:
        copied_on.append(threading.current_thread().name)
        real(dst, src)

    monkeypatch.setattr(engine_module, "_copy_only", spy)
    engine.commit(engine.stage({}, 1, packed=[packed]))
    assert len(copied_on) == 1 and copied_on[0].startswith("refit-helper")
    assert np.allclose(engine.infer(X).outputs[0], 65 * 0.5)
