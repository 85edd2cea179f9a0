"""An engine file's flat graph (``engines.program_graph``): a CPU engine loaded from it serves
what the program serves, before and after a refit, without importing ``torch.export``'s
deserializer or ``torch._dynamo``; a program outside the graph's reach loads as before; a program
that writes its weights or inputs is refused at build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.export import Dim

from engines import BuilderConfig, EngineError, build_engine, load_engine
from engines.program_graph import encode_graph, flat_program_of

REPO = Path(__file__).resolve().parent.parent


class _Constants(torch.nn.Module):
    """A weight, a non-persistent buffer and a tensor constant: one of each kind of slot."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.register_buffer("scale", torch.tensor([1.0, 2.0, 3.0]), persistent=False)
        self.shift = torch.tensor([0.5, -0.5, 0.25])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x)) * self.scale + self.shift


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids)).softmax(-1)


class _Branches(torch.nn.Module):
    """``torch.cond``: a higher-order operator, outside the graph's reach."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda t: self.lin(t), lambda t: -self.lin(t), (x,))


class _Counter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.lin(x)


def _gpt2() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers",
                                       reason="transformers is a test extra: pip install -e .[test]")

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)
            self.m = transformers.GPT2LMHeadModel(cfg).eval()

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, use_cache=False).logits

    return Decoder()


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata())


def _without_graph(path: Path, out: Path) -> Path:
    """The same engine file as one written before graphs were: its program alone."""
    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    meta.pop("graph")
    save_file(tensors, str(out), metadata=meta)
    return out


def _new_weights(engine) -> dict[str, torch.Tensor]:
    """New values, one tensor again for the names the model ties."""
    torch.manual_seed(1)
    new = {n: torch.randn_like(t) for n, t in engine.weights().items()}
    for first, *rest in engine.tied_weights():
        new.update({n: new[first] for n in rest})
    return new


CASES = {
    "conv": (lambda: torch.nn.Conv2d(1, 1, 3, bias=False), [torch.ones(1, 1, 3, 3)], None),
    "constants": (_Constants, [torch.randn(2, 3)], None),
    "tied": (_Tied, [torch.tensor([[1, 2, 3]])], None),
    "gpt2-dynamic": (_gpt2, [torch.randint(0, 64, (2, 8))],
                     ({0: Dim("batch", min=1, max=4), 1: Dim("seq", min=2, max=16)},)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_engine_loaded_from_its_graph_serves_what_its_program_serves_before_and_after_a_refit(
        case: str, tmp_path: Path) -> None:
    make, examples, dynamic = CASES[case]
    model = make().eval()
    built = build_engine(model, examples, BuilderConfig(enable_refit=True), dynamic_shapes=dynamic)
    path = tmp_path / "m.engine"
    built.save(path)
    assert "graph" in _metadata(path)
    from_graph = load_engine(path)
    from_program = load_engine(_without_graph(path, tmp_path / "old.engine"))
    inputs = [[x.numpy() for x in examples]]
    if dynamic:
        inputs.append([torch.randint(0, 64, (3, 5)).numpy()])
    for _ in range(2):
        for args in inputs:
            got, want = from_graph.infer(args), from_program.infer(args)
            assert got.version == want.version
            for g, w in zip(got.outputs, want.outputs, strict=True):
                np.testing.assert_array_equal(g, w)
        new = _new_weights(from_graph)
        assert from_graph.refit_now(new) == from_program.refit_now(new) == 1 + got.version


def test_a_cpu_engine_loads_from_its_graph_without_torch_exports_deserializer_or_dynamo(
        tmp_path: Path) -> None:
    """In a fresh process, as a replica loads its engine; the same file without its graph, as
    written before graphs were, still imports both."""
    build_engine(torch.nn.Conv2d(1, 1, 3, bias=False), [torch.ones(1, 1, 3, 3)],
                 BuilderConfig(enable_refit=True)).save(tmp_path / "conv.engine")
    _without_graph(tmp_path / "conv.engine", tmp_path / "old.engine")
    code = (
        "import json, sys\n"
        "import numpy as np, torch\n"
        "from engines import load_engine\n"
        "e = load_engine(sys.argv[1])\n"
        "out = e.infer([np.ones((1, 1, 3, 3), np.float32)])\n"
        "e.refit_now({n: torch.ones_like(t) for n, t in e.weights().items()})\n"
        "again = e.infer([np.ones((1, 1, 3, 3), np.float32)])\n"
        "print(json.dumps({'values': [float(out.outputs[0].sum()), float(again.outputs[0].sum())],\n"
        "                  'imported': [m for m in ('torch._export.serde.serialize', 'torch._dynamo')\n"
        "                               if m in sys.modules]}))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    seen = {}
    for name in ("conv.engine", "old.engine"):
        run = subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], capture_output=True,
                             text=True, env=env, timeout=300, check=True)
        seen[name] = json.loads(run.stdout.splitlines()[-1])
    assert seen["conv.engine"]["imported"] == []
    assert seen["old.engine"]["imported"] == ["torch._export.serde.serialize", "torch._dynamo"]
    assert seen["conv.engine"]["values"] == seen["old.engine"]["values"]
    assert seen["conv.engine"]["values"][1] == 9.0


def test_an_engine_file_written_before_graphs_gains_one_when_loaded_and_saved_again(tmp_path: Path) -> None:
    build_engine(_Constants().eval(), [torch.randn(2, 3)], BuilderConfig(enable_refit=True)).save(
        tmp_path / "new.engine")
    old = load_engine(_without_graph(tmp_path / "new.engine", tmp_path / "old.engine"))
    old.save(tmp_path / "again.engine")
    assert _metadata(tmp_path / "again.engine")["graph"] == _metadata(tmp_path / "new.engine")["graph"]


def test_a_program_outside_the_graphs_reach_is_saved_without_one_and_loads_from_its_program(
        tmp_path: Path) -> None:
    model = _Branches().eval()
    x = torch.randn(2, 3)
    build_engine(model, [x], BuilderConfig(enable_refit=True)).save(tmp_path / "cond.engine")
    assert "graph" not in _metadata(tmp_path / "cond.engine")
    engine = load_engine(tmp_path / "cond.engine")
    for sample in (x, -x.abs() - 1):
        np.testing.assert_allclose(engine.infer([sample.numpy()]).outputs[0], model(sample).detach().numpy(),
                                   rtol=1e-6)


def test_a_functional_program_that_writes_a_buffer_is_refused_naming_it() -> None:
    """``torch.export`` leaves an in-place write in the graph, as the module had it; a program
    made functional (decomposed) returns the buffer's new value instead, which no weight set takes."""
    program = torch.export.export(_Counter().eval(), (torch.ones(1, 3),)).run_decompositions()
    with pytest.raises(EngineError, match="writes 'calls' \\(BUFFER_MUTATION\\)"):
        flat_program_of(program)
    assert encode_graph(program, b"{}") is None
