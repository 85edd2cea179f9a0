"""Hostile inputs get the engine layer's own errors, naming the tensor or file, and change nothing.

Covered: tensors that are not plain dense weights (meta, sparse, quantized, nested, lazy neg bit,
big-endian numpy), malformed engine files (metadata, program, tensors, safetensors header), paths
that are not regular files (FIFO, directory, device, symlink loop), decompression bombs and
oversized members in weights files (checked from headers against ``expect``, with bounded
memory), and version numbers that are not integers.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from threading import Thread
from typing import Any

import numpy as np
import pytest
import torch
from memory_probe import peak_growth as _peak_growth
from safetensors import safe_open
from safetensors.torch import save_file

from engines import (
    BuilderConfig,
    DtypeMismatchError,
    EngineFileError,
    InvalidVersionError,
    ShapeMismatchError,
    StagedSetError,
    UnknownWeightError,
    VersionOrderError,
    WeightFileError,
    build_engine,
    load_engine,
    load_weights,
)
from engines.checksum import tensor_checksum
from engines.engine_file import read_engine_file
from engines.manifest import TensorSpec


class _TwoWeights(torch.nn.Module):
    """y = x * a + b.sum(), a: 4 floats, b: 8 floats."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.full((4,), 1.0))
        self.b = torch.nn.Parameter(torch.full((8,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.a + self.b.sum()


X = torch.ones(4)
MANIFEST = {"a": TensorSpec(shape=(4,), dtype="float32"), "b": TensorSpec(shape=(8,), dtype="float32")}
MiB = 1 << 20


def _engine(**cfg: Any):
    cfg.setdefault("enable_refit", True)
    e = build_engine(_TwoWeights(), [X], BuilderConfig(**cfg))
    e.refit_now({"a": torch.full((4,), 2.0)})  # serve version 1
    return e


@pytest.fixture(params=["swap", "copy"])
def engine(request: pytest.FixtureRequest):
    return _engine(memory_mode=request.param)


def _snapshot(engine) -> tuple[np.ndarray, int, int]:
    r = engine.infer(X)
    return r.outputs[0].copy(), r.version, engine.memory().extra_bytes


def _assert_unchanged(engine, before: tuple[np.ndarray, int, int]) -> None:
    out, version, extra = before
    r = engine.infer(X)
    np.testing.assert_array_equal(r.outputs[0], out)
    assert r.version == version == engine.version
    assert engine.memory().staged_bytes == 0
    assert engine.memory().extra_bytes == extra


# ------------------------------------------------------------------------- hostile tensors


def _quiet(make: Callable[[], Any]) -> Callable[[], Any]:
    """``make`` without torch's beta/deprecation warnings (emitted once per process)."""
    def call() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return make()
    return call


_nested = _quiet(lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(2)]))
_quantized = _quiet(lambda: torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8))
_csr = _quiet(lambda: torch.ones(2, 2).to_sparse_csr())


# (id, a value offered as weight 'a', what the refusal must say)
REFUSED: list[tuple[str, Callable[[], Any], str]] = [
    ("meta", lambda: torch.empty(4, device="meta"), "a meta tensor has no data"),
    ("sparse-coo", lambda: torch.ones(4).to_sparse(), "layout torch.sparse_coo"),
    ("sparse-csr", _csr, "layout torch.sparse_csr"),
    ("quantized", _quantized, "quantized tensor (torch.qint8)"),
    ("nested", _nested, "a nested tensor"),
    ("masked-array", lambda: np.ma.masked_array(np.ones(4, np.float32), mask=[0, 1, 0, 0]), "mask"),
    ("numpy-strings", lambda: np.array(["1", "2", "3", "4"]), "numpy dtype <U1"),
    ("numpy-structured", lambda: np.zeros(4, dtype=[("x", "<f4")]), "is not a weight dtype"),
    ("numpy-datetime", lambda: np.zeros(4, dtype="datetime64[s]"), "is not a weight dtype"),
    ("numpy-longdouble", lambda: np.zeros(4, dtype=np.longdouble), "has no torch equivalent"),
    ("python-list", lambda: [1.0, 2.0, 3.0, 4.0], "expected a numpy array or torch tensor"),
]


def _offer(engine, via: str, value: Any) -> None:
    if via == "stage":
        engine.stage({"b": torch.zeros(8), "a": value}, version=5)  # a good weight beside it
    elif via == "refitter":
        engine.create_refitter().set_named_weights("a", value)
    elif via == "load_weights":
        load_weights({"a": value})
    else:
        load_weights({"a": value}, expect=engine.manifest())


@pytest.mark.parametrize("via", ["stage", "refitter", "load_weights", "load_weights-expect"])
@pytest.mark.parametrize(("value", "says"), [(v, s) for _, v, s in REFUSED], ids=[i for i, _, _ in REFUSED])
def test_a_hostile_tensor_is_refused_with_a_weight_file_error_naming_it_and_nothing_is_staged(
        engine, via: str, value: Callable[[], Any], says: str) -> None:
    before = _snapshot(engine)
    with pytest.raises(WeightFileError) as info:
        _offer(engine, via, value())
    assert info.value.name == "a"
    assert str(info.value).startswith("weight 'a': ")
    assert says in str(info.value)
    assert isinstance(info.value, ValueError)
    _assert_unchanged(engine, before)


def test_a_weight_name_that_is_not_a_string_is_refused(engine) -> None:
    before = _snapshot(engine)
    with pytest.raises(WeightFileError, match="weight names must be strings, got int 7"):
        engine.stage({7: torch.zeros(4)}, version=5)
    _assert_unchanged(engine, before)


def _values_of_a(engine) -> np.ndarray:
    """Weight a as the engine serves it: y = x * a + sum(b), with b of the build (sum 4.0)."""
    return engine.infer(X).outputs[0] - 4.0


# (id, a value whose values are 1..4 in some unusual representation)
ACCEPTED: list[tuple[str, Callable[[], Any]]] = [
    ("neg-view", lambda: torch.tensor([-1.0, -2.0, -3.0, -4.0])._neg_view()),
    ("every-other", lambda: torch.tensor([1.0, 9.0, 2.0, 9.0, 3.0, 9.0, 4.0, 9.0])[::2]),
    ("transposed-column", lambda: torch.tensor([[1.0, 2.0, 3.0, 4.0]]).t()[:, 0]),
    ("big-endian-numpy", lambda: np.arange(1, 5, dtype=">f4")),
    ("read-only-numpy", lambda: np.frombuffer(np.arange(1, 5, dtype="<f4").tobytes(), dtype="<f4")),
    ("requires-grad", lambda: torch.arange(1.0, 5.0, requires_grad=True)),
]


@pytest.mark.parametrize("value", [v for _, v in ACCEPTED], ids=[i for i, _ in ACCEPTED])
def test_an_unusual_but_valid_tensor_is_staged_with_its_values_not_its_raw_bytes(engine, value) -> None:
    want = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    loaded = load_weights({"a": value()}, expect=MANIFEST)["a"]
    assert not loaded.is_neg() and loaded.layout is torch.strided
    np.testing.assert_array_equal(loaded.numpy(), want)
    assert tensor_checksum(loaded) == tensor_checksum(torch.from_numpy(want))
    staged = engine.stage({"a": value()}, version=5)
    engine.commit(staged)
    np.testing.assert_array_equal(_values_of_a(engine), want)
    r = engine.create_refitter()
    r.set_named_weights("a", value())
    assert r.refit() == 6
    np.testing.assert_array_equal(_values_of_a(engine), want)


# ------------------------------------------------------------------------- malformed engine files


@pytest.fixture(scope="module")
def engine_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a real engine file, to mutate."""
    path = tmp_path_factory.mktemp("engine") / "linear.engine"
    build_engine(torch.nn.Linear(2, 2), [torch.ones(1, 2)], BuilderConfig(enable_refit=True)).save(path)
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118


def _program(edit: Callable[[dict], None]) -> Callable[[dict[str, str]], None]:
    """A change to the program of a file without a graph (written before graphs were, or for a
    program outside them): ``load_engine`` rebuilds the program itself."""
    def mutate(meta: dict[str, str]) -> None:
        program = json.loads(meta["program"])
        edit(program)
        meta["program"] = json.dumps(program)
        meta.pop("graph")
    return mutate


def _graph(edit: Callable[[dict], None]) -> Callable[[dict[str, str]], None]:
    def mutate(meta: dict[str, str]) -> None:
        graph = json.loads(meta["graph"])
        edit(graph)
        meta["graph"] = json.dumps(graph)
    return mutate


def _set(key: str, value: str) -> Callable[[dict[str, str]], None]:
    def mutate(meta: dict[str, str]) -> None:
        meta[key] = value
        if key == "program":
            meta.pop("graph")
    return mutate


def _first_call(graph: dict) -> dict:
    return next(n for n in graph["nodes"] if n["op"] == "call_function")


def _drop(key: str) -> Callable[[dict[str, str]], None]:
    return lambda meta: meta.pop(key)


# (id, a mutation of the metadata, what the error must say); each is caught by read_engine_file
# already, except the program ones, which load_engine catches when it rebuilds the program
METADATA_MUTATIONS: list[tuple[str, Callable[[dict[str, str]], None], str]] = [
    ("program-not-json", _set("program", "{not json"), "'program' is not JSON"),
    ("program-a-list", _set("program", "[]"), "'program' is not a serialized torch.export program"),
    ("program-empty-object", _set("program", "{}"), "'program' is not a serialized torch.export program"),
    ("program-graph-module-a-string", _set("program", '{"graph_module": "x"}'), "not a serialized"),
    ("program-without-graph", _program(lambda p: p["graph_module"].pop("graph")), "cannot be rebuilt"),
    ("program-without-signature", _program(lambda p: p["graph_module"].pop("signature")),
     "program is not a serialized torch.export program"),
    ("program-input-specs-a-string",
     _program(lambda p: p["graph_module"]["signature"].__setitem__("input_specs", "x")), "program"),
    ("program-nodes-garbage", _program(lambda p: p["graph_module"]["graph"].__setitem__("nodes", [1, 2])),
     "cannot be rebuilt"),
    ("program-changed-under-its-graph",
     lambda meta: meta.__setitem__("program", meta["program"].replace("linear", "linear ")),
     "metadata 'graph' was not written from its 'program'"),
    ("graph-not-json", lambda meta: meta.__setitem__("graph", "{"), "metadata 'graph' cannot be rebuilt"),
    ("graph-a-list", lambda meta: meta.__setitem__("graph", "[]"), "metadata 'graph' cannot be rebuilt"),
    ("graph-unknown-operator",
     _graph(lambda g: _first_call(g).__setitem__("target", "ops:aten::no_such_op.default")),
     "is not a registered operator"),
    ("graph-a-function-outside-the-list",
     _graph(lambda g: _first_call(g).__setitem__("target", "operator:attrgetter")),
     "'operator:attrgetter' is not a registered operator"),
    ("graph-a-module-call", _graph(lambda g: _first_call(g).__setitem__("op", "call_module")),
     "node op 'call_module'"),
    ("graph-an-object-argument", _graph(lambda g: _first_call(g).__setitem__("args", {"object": "os"})),
     "metadata 'graph' cannot be rebuilt"),
    ("graph-slot-of-another-kind", _graph(lambda g: g["slots"][0].__setitem__(0, "module")),
     "slot kind 'module'"),
    ("graph-slot-spec-not-a-shape", _graph(lambda g: g["slots"][0].__setitem__(2, 5)), "slot spec [5, "),
    ("graph-slot-for-a-missing-tensor", _graph(lambda g: g["slots"][0].__setitem__(1, "nothing")),
     "lacks tensor 'nothing'"),
    ("refittable-not-json", _set("refittable", "bias, weight"), "'refittable' is not JSON"),
    ("refittable-an-object", _set("refittable", '{"bias": 1}'), "'refittable' must be a JSON list"),
    ("refittable-numbers", _set("refittable", "[1, 2]"), "'refittable' must be a JSON list"),
    ("refittable-twice", _set("refittable", '["bias", "bias", "weight"]'), "names a weight twice"),
    ("refittable-lacks-one", _set("refittable", '["weight"]'), "does not name: ['bias']"),
    ("refittable-names-more", _set("refittable", '["bias", "extra", "weight"]'), "lacks weights ['extra']"),
    ("version-text", _set("version", "abc"), "'version' must be a decimal integer"),
    ("version-negative", _set("version", "-1"), "'version' must be a decimal integer"),
    ("version-float", _set("version", "1.5"), "'version' must be a decimal integer"),
    ("version-huge", _set("version", "9" * 30), "'version' must be a decimal integer"),
    ("builder-config-not-json", _set("builder_config", "{"), "'builder_config' is not JSON"),
    ("builder-config-a-list", _set("builder_config", "[1]"), "'builder_config' must be a JSON object"),
    ("builder-config-unknown-key", _set("builder_config", '{"zzz": 1}'), "not a valid BuilderConfig"),
    ("builder-config-bad-value", _set("builder_config", '{"memory_budget_bytes": -5}'),
     "not a valid BuilderConfig"),
    ("no-format", _drop("format"), "not a weight-refit engine"),
    ("other-format-version", _set("format_version", "2"), "format version '2' is not supported"),
    *[(f"no-{key}", _drop(key), f"metadata lacks ['{key}']")
      for key in ("program", "refittable", "version", "builder_config", "backend")],
]


def _write_engine(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(("mutate", "says"), [(m, s) for _, m, s in METADATA_MUTATIONS],
                         ids=[i for i, _, _ in METADATA_MUTATIONS])
def test_an_engine_file_with_malformed_metadata_is_refused_with_an_engine_file_error_naming_it(
        engine_file, tmp_path: Path, mutate, says: str) -> None:
    meta, tensors = engine_file
    meta = dict(meta)
    mutate(meta)
    path = tmp_path / "bad.engine"
    _write_engine(path, meta, tensors)
    with pytest.raises(EngineFileError) as info:
        load_engine(path)
    assert repr(str(path)) in str(info.value)
    assert says in str(info.value)


# (id, a mutation of the tensors, what the error must say)
TENSOR_MUTATIONS: list[tuple[str, Callable[[dict[str, torch.Tensor]], None], str]] = [
    ("weight-reshaped", lambda t: t.__setitem__("weight", torch.ones(4, 1)),
     "tensor 'weight' is (4, 1) torch.float32, but its program was exported for (2, 2) torch.float32"),
    ("bias-too-long", lambda t: t.__setitem__("bias", torch.ones(3)), "tensor 'bias' is (3,)"),
    ("bias-float64", lambda t: t.__setitem__("bias", torch.ones(2, dtype=torch.float64)), "torch.float64"),
    ("tensor-not-listed", lambda t: t.__setitem__("extra", torch.ones(2)),
     "tensors its refittable list does not name: ['extra']"),
    ("weight-missing", lambda t: t.pop("weight"), "lacks weights ['weight']"),
]


@pytest.mark.parametrize("graph", [True, False], ids=["from-its-graph", "from-its-program"])
@pytest.mark.parametrize(("mutate", "says"), [(m, s) for _, m, s in TENSOR_MUTATIONS],
                         ids=[i for i, _, _ in TENSOR_MUTATIONS])
def test_an_engine_file_whose_tensors_do_not_fit_its_program_is_refused_naming_the_tensor(
        engine_file, tmp_path: Path, mutate, says: str, graph: bool) -> None:
    meta, tensors = engine_file
    meta = dict(meta) if graph else {k: v for k, v in meta.items() if k != "graph"}
    tensors = dict(tensors)
    mutate(tensors)
    path = tmp_path / "bad.engine"
    _write_engine(path, meta, tensors)
    with pytest.raises(EngineFileError) as info:
        load_engine(path)
    assert repr(str(path)) in str(info.value)
    assert says in str(info.value)


def test_an_engine_file_with_extra_slotless_weights_listed_as_refittable_is_refused(
        engine_file, tmp_path: Path) -> None:
    meta, tensors = engine_file
    meta = {**meta, "refittable": json.dumps(["bias", "extra", "weight"])}
    path = tmp_path / "bad.engine"
    _write_engine(path, meta, {**tensors, "extra": torch.ones(2)})
    assert set(read_engine_file(path).weights) == {"bias", "extra", "weight"}  # the file itself is whole
    with pytest.raises(EngineFileError, match=r"holds weights its program has no slot for: \['extra'\]"):
        load_engine(path)


def _header_lie(edit: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        edit(header)
        raw = json.dumps(header).encode()
        return len(raw).to_bytes(8, "little") + raw + data[8 + n:]
    return mutate


# (id, a mutation of the file's bytes, what the error must say)
BYTE_MUTATIONS: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("empty", lambda d: b"", "truncated or malformed"),
    ("truncated-in-the-header", lambda d: d[:100], "truncated or malformed"),
    ("truncated-in-the-data", lambda d: d[:-4], "truncated or malformed"),
    ("header-length-beyond-the-file", lambda d: (len(d) * 2).to_bytes(8, "little") + d[8:],
     "truncated or malformed"),
    ("header-not-json", lambda d: d[:8] + b"\xff" * (int.from_bytes(d[:8], "little")) + d[8 + int.from_bytes(
        d[:8], "little"):], "truncated or malformed"),
    ("offsets-beyond-the-file", _header_lie(lambda h: h["bias"].__setitem__("data_offsets", [0, 10**9])),
     "truncated or malformed"),
    ("dtype-lies-about-size", _header_lie(lambda h: h["bias"].__setitem__("dtype", "F64")),
     "truncated or malformed"),
    ("metadata-not-strings", _header_lie(lambda h: h["__metadata__"].__setitem__("version", 3)),
     "truncated or malformed"),
    ("shape-lies-with-the-same-size", _header_lie(lambda h: h["weight"].__setitem__("shape", [4, 1])),
     "tensor 'weight' is (4, 1)"),
]


@pytest.mark.parametrize(("mutate", "says"), [(m, s) for _, m, s in BYTE_MUTATIONS],
                         ids=[i for i, _, _ in BYTE_MUTATIONS])
def test_an_engine_file_whose_safetensors_header_lies_is_refused_with_an_engine_file_error(
        engine_file, tmp_path: Path, mutate, says: str) -> None:
    meta, tensors = engine_file
    good = tmp_path / "good.engine"
    _write_engine(good, meta, tensors)
    path = tmp_path / "bad.engine"
    path.write_bytes(mutate(good.read_bytes()))
    with pytest.raises(EngineFileError) as info:
        load_engine(path)
    assert repr(str(path)) in str(info.value)
    assert says in str(info.value)


# ------------------------------------------------------------------------- paths that are not files


def _no_hang(call: Callable[[], None], fifo: Path | None = None) -> BaseException | None:
    """Run ``call`` in a thread; if it blocks (on a FIFO), unblock it and fail."""
    caught: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 (handed back to the test)
            caught.append(exc)

    t = Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # lets a blocked open return
        pytest.fail("reading the path blocked")
    return caught[0] if caught else None


def _make(kind: str, tmp_path: Path, suffix: str) -> Path:
    p = tmp_path / f"w{suffix}"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "directory":
        p.mkdir()
    elif kind == "dev-zero":
        p.symlink_to("/dev/zero")
    elif kind == "dev-null":
        p.symlink_to("/dev/null")
    elif kind == "symlink-loop":
        p.symlink_to(p)
    elif kind == "dangling-symlink":
        p.symlink_to(tmp_path / "gone")
    elif kind == "under-a-file":
        (tmp_path / "file").write_text("x")
        p = tmp_path / "file" / f"w{suffix}"
    return p


NOT_FILES = [
    ("fifo", "is a FIFO, not a regular file"),
    ("directory", "is a directory"),
    ("dev-zero", "is a device, not a regular file"),
    ("dev-null", "is a device, not a regular file"),
    ("symlink-loop", "is a symlink loop"),
    ("dangling-symlink", "does not exist (a dangling symlink to"),
    ("under-a-file", "does not exist (a parent is not a directory)"),
]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npz"])
@pytest.mark.parametrize(("kind", "says"), NOT_FILES, ids=[k for k, _ in NOT_FILES])
def test_a_weights_path_that_is_not_a_regular_file_is_refused_saying_what_it_is_without_blocking(
        engine, tmp_path: Path, kind: str, says: str, suffix: str) -> None:
    before = _snapshot(engine)
    path = _make(kind, tmp_path, suffix)
    exc = _no_hang(lambda: engine.stage(path, version=5), path if kind == "fifo" else None)
    assert isinstance(exc, WeightFileError), repr(exc)
    assert f"weights file {str(path)!r} {says}" in str(exc)
    exc = _no_hang(lambda: load_weights(path, expect=MANIFEST), path if kind == "fifo" else None)
    assert isinstance(exc, WeightFileError) and says in str(exc), repr(exc)
    _assert_unchanged(engine, before)


@pytest.mark.parametrize(("kind", "says"), NOT_FILES, ids=[k for k, _ in NOT_FILES])
def test_an_engine_path_that_is_not_a_regular_file_is_refused_saying_what_it_is_without_blocking(
        tmp_path: Path, kind: str, says: str) -> None:
    path = _make(kind, tmp_path, ".engine")
    exc = _no_hang(lambda: load_engine(path), path if kind == "fifo" else None)
    assert isinstance(exc, EngineFileError), repr(exc)
    assert f"engine file {str(path)!r} {says}" in str(exc)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file: nothing to refuse")
def test_an_unreadable_weights_file_is_refused_as_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4)}, str(path))
    path.chmod(0)
    with pytest.raises(WeightFileError, match="cannot be read: permission denied"):
        load_weights(path)


# ------------------------------------------------------------------------- bounded reads


BIG = 256 * MiB  # bytes of zeros each bomb holds


def _npy_member(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], data_bytes: int) -> None:
    """A float32 ``.npy`` member whose header says ``shape``, followed by ``data_bytes`` zeros,
    written in chunks: no array of that size is ever allocated."""
    with zf.open(name + ".npy", "w", force_zip64=True) as out:
        np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": shape})
        chunk = bytes(8 * MiB)
        left = data_bytes
        while left > 0:
            out.write(chunk[:min(left, len(chunk))])
            left -= len(chunk)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("bombs")
    n = BIG // 4
    paths = {}
    for kind, (name, shape, data) in {
        "unknown-name": ("huge", (n,), BIG),
        "wrong-shape": ("a", (n,), BIG),
        "header-smaller-than-data": ("a", (4,), BIG),
    }.items():
        p = root / f"{kind}.npz"
        with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            _npy_member(zf, "b", (8,), 32)
            _npy_member(zf, name, shape, data)
        assert p.stat().st_size < 2 * MiB
        paths[kind] = p
    st = root / "unknown-name.safetensors"  # a sparse file: the zeros take no disk
    header = json.dumps({"huge": {"dtype": "F32", "shape": [n], "data_offsets": [0, BIG]}}).encode()
    with open(st, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.truncate(8 + len(header) + BIG)
    paths["safetensors-unknown-name"] = st
    pt = root / "wrong-shape.pt"
    torch.save({"a": torch.zeros(n)}, pt)
    paths["pt-wrong-shape"] = pt
    yield paths


# (bomb, name mapping, expected error, the weight it names)
BOMBS = [
    ("unknown-name", {}, UnknownWeightError, "huge"),
    ("wrong-shape", {}, ShapeMismatchError, "a"),
    ("wrong-shape", {"add_prefix": "m."}, UnknownWeightError, "m.b"),  # the first member
    ("unknown-name", {"mapping": {"huge": "a"}}, ShapeMismatchError, "a"),
    ("header-smaller-than-data", {}, WeightFileError, "a"),
    ("safetensors-unknown-name", {}, UnknownWeightError, "huge"),
    ("pt-wrong-shape", {}, ShapeMismatchError, "a"),
]


@pytest.mark.parametrize(("bomb", "names", "error", "named"), BOMBS,
                         ids=[f"{b}-{'-'.join(n) or 'as-is'}" for b, n, _, _ in BOMBS])
def test_a_weights_file_holding_a_huge_wrong_tensor_is_refused_from_its_header_without_reading_it(
        bombs: dict[str, Path], bomb: str, names: dict, error: type, named: str) -> None:
    caught: list[BaseException] = []

    def call() -> None:
        try:
            load_weights(bombs[bomb], expect=MANIFEST, **names)
        except Exception as exc:  # noqa: BLE001 (checked below)
            caught.append(exc)

    growth = _peak_growth(call)
    assert len(caught) == 1 and type(caught[0]) is error, caught
    assert caught[0].name == named and f"weight {named!r}" in str(caught[0])
    assert growth < 32 * MiB, f"peak memory grew by {growth / MiB:.0f} MiB"


def test_engine_stage_refuses_a_decompression_bomb_from_its_header(engine, bombs: dict[str, Path]) -> None:
    before = _snapshot(engine)
    growth = _peak_growth(lambda: pytest.raises(UnknownWeightError, engine.stage, bombs["unknown-name"],
                                                version=5))
    assert growth < 32 * MiB, f"peak memory grew by {growth / MiB:.0f} MiB"
    _assert_unchanged(engine, before)


def test_an_npz_member_larger_than_its_header_is_refused_even_without_expect(bombs: dict[str, Path]) -> None:
    with pytest.raises(WeightFileError, match=r"more than the \d+ its header's shape \(4,\)") as info:
        load_weights(bombs["header-smaller-than-data"])
    assert info.value.name == "a"


def test_an_npz_checked_against_expect_still_loads_its_values(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    fortran = np.asfortranarray(np.arange(8, dtype="<f4").reshape(2, 4))
    np.savez_compressed(path, **{"m.a": np.arange(1, 5, dtype=">f4"), "m.b": fortran})
    with pytest.raises(ShapeMismatchError, match=r"\(2, 4\) != expected \(8,\)"):
        load_weights(path, expect=MANIFEST, strip_prefix="m.")
    got = load_weights(path, expect={**MANIFEST, "b": TensorSpec(shape=(2, 4), dtype="float32")},
                       strip_prefix="m.")
    np.testing.assert_array_equal(got["a"].numpy(), [1, 2, 3, 4])
    np.testing.assert_array_equal(got["b"].numpy(), fortran)


def test_an_npz_with_a_wrong_dtype_is_refused_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    np.savez(path, a=np.zeros(4, np.float64))
    with pytest.raises(DtypeMismatchError, match="dtype float64 != expected float32"):
        load_weights(path, expect=MANIFEST)


def test_an_npz_with_a_pickled_member_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    with zipfile.ZipFile(path, "w") as zf, zf.open("a.npy", "w") as out:
        np.lib.format.write_array(out, np.array([{}, None], dtype=object), allow_pickle=True)
    with pytest.raises(WeightFileError, match="object") as info:
        load_weights(path)
    assert info.value.name == "a"


def test_an_npz_with_a_member_that_is_not_an_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.txt", "hello")
    with pytest.raises(WeightFileError, match="member 'a.txt' is not a .npy array"):
        load_weights(path)


def test_an_npz_whose_members_map_to_one_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    np.savez(path, **{"m.a": np.zeros(4, np.float32), "a": np.zeros(4, np.float32)})
    with pytest.raises(WeightFileError, match="two inputs map to this name"):
        load_weights(path, expect=MANIFEST, strip_prefix="m.")


def test_a_pt_file_is_checked_against_expect_before_its_tensors_are_copied(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"a": torch.ones(1 << 20)[:4], "b": torch.zeros(8)}, path)  # a view of 4 MiB
    got = load_weights(path, expect=MANIFEST)
    assert got["a"].untyped_storage().nbytes() == 16  # copied out of the file, not a view of it
    np.testing.assert_array_equal(got["a"].numpy(), [1, 1, 1, 1])
    with pytest.raises(UnknownWeightError, match="'a'"):
        load_weights(path, expect={"b": MANIFEST["b"]})
    plain = tmp_path / "plain.pt"
    torch.save({"a": torch.arange(1.0, 5.0), "b": torch.zeros(8)}, plain)
    np.testing.assert_array_equal(load_weights(plain, expect=MANIFEST)["a"].numpy(), [1, 2, 3, 4])


def test_a_sparse_tensor_in_a_pt_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"a": torch.ones(4).to_sparse()}, path)
    with pytest.raises(WeightFileError, match="layout torch.sparse_coo") as info:
        load_weights(path, expect=MANIFEST)
    assert info.value.name == "a"


# ------------------------------------------------------------------------- versions


BAD_VERSIONS = [99.5, 5.0, True, False, -1, "7", None, 2**63, np.float64(7.0), np.bool_(True)]


@pytest.mark.parametrize("via", ["stage", "stage_retained", "stage_retained-from"])
@pytest.mark.parametrize("version", BAD_VERSIONS, ids=[repr(v) for v in BAD_VERSIONS])
def test_a_version_that_is_not_a_non_negative_int_is_refused_naming_it(
        engine, via: str, version: Any) -> None:
    before = _snapshot(engine)
    with pytest.raises(InvalidVersionError) as info:
        if via == "stage":
            engine.stage({"a": torch.zeros(4)}, version=version)
        elif via == "stage_retained":
            engine.stage_retained(1, version)
        else:
            engine.stage_retained(version, 10)
    assert isinstance(info.value, VersionOrderError) and isinstance(info.value, ValueError)
    assert repr(version) in str(info.value)
    _assert_unchanged(engine, before)


def test_a_bad_version_is_refused_before_the_weights_file_is_read(engine, tmp_path: Path) -> None:
    with pytest.raises(InvalidVersionError):
        engine.stage(tmp_path / "does-not-exist.safetensors", version=2.5)
    with pytest.raises(VersionOrderError, match="not newer"):
        engine.stage(tmp_path / "does-not-exist.safetensors", version=1)


def test_a_numpy_integer_version_is_accepted_as_a_plain_int(engine) -> None:
    staged = engine.stage({"a": torch.zeros(4)}, version=np.int64(5))
    assert type(staged.version) is int
    assert type(engine.commit(staged)) is int
    assert type(engine.infer(X).version) is int
    assert engine.create_refitter().refit() == 6


def test_weights_of_a_float_version_is_refused_not_matched(engine) -> None:
    with pytest.raises(InvalidVersionError):
        engine.weights(1.0)


def test_a_set_staged_by_another_engine_cannot_be_committed_or_discarded(engine) -> None:
    other = _engine(memory_mode=engine.config.memory_mode.value)  # same ids and versions as engine
    foreign = other.stage({"a": torch.full((4,), 9.0)}, version=5)
    before = _snapshot(engine)
    with pytest.raises(StagedSetError, match="not staged by this engine"):
        engine.commit(foreign)
    with pytest.raises(StagedSetError, match="not staged by this engine"):
        engine.discard(foreign)
    with pytest.raises(StagedSetError, match="got str"):
        engine.commit("v5")
    _assert_unchanged(engine, before)
    assert other.commit(foreign) == 5


# ------------------------------------------------------------------------- errors across processes


def test_a_weight_error_refusing_a_hostile_tensor_survives_pickling_with_its_name() -> None:
    with pytest.raises(WeightFileError) as info:
        load_weights({"w": torch.empty(2, device="meta")})
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is WeightFileError and copy.name == "w" and str(copy) == str(info.value)
