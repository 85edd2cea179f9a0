"""The architectures people deploy, built from ``transformers`` configs with random init (no
download): exported with dynamic shapes, served, refit from checkpoints saved the way their
ecosystems save them (``save_pretrained``, sharded safetensors with an index, a wrapped ``.pt``
state dict) and compared with the eager model. Half-precision engines through the fleet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
from fleet_models import converged, fleet_config, serving_again, wait_for
from torch.export import Dim

from engines import BuilderConfig, WeightFileError, build_engine, load_engine

transformers = pytest.importorskip("transformers",
                                   reason="transformers is a test extra: pip install -e .[test]")

TOL = 1e-5  # max |served - eager| in float32


def _max_diff(served: np.ndarray, eager: torch.Tensor) -> float:
    return float(np.abs(served - eager.detach().numpy()).max())


class Encoder(torch.nn.Module):
    """Served modules wrap the model (their weight names gain ``m.``) and return one tensor."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class Decoder(Encoder):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.m(input_ids=input_ids, use_cache=False).logits


class Vision(Encoder):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.m(pixel_values=pixel_values).logits


def _bert(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def _gpt2(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _resnet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    num_labels=5)
    model = transformers.ResNetForImageClassification(cfg).eval()
    for bn in model.modules():  # statistics as training leaves them, not the init's 0 and 1
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model


def _tokens(batch: int, seq: int, padded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 120, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.int64)
    if padded and batch > 1:
        mask[1, seq // 2:] = 0  # a padded row: the attention mask matters
    return ids, mask


def _lm_engine(served: torch.nn.Module, tmp_path: Path) -> Any:
    """Built with a dynamic batch and sequence length, saved and loaded back (what a fleet serves)."""
    batch, seq = Dim("batch", min=1, max=16), Dim("seq", min=2, max=64)
    examples = list(_tokens(2, 8)) if not isinstance(served, Decoder) else [_tokens(2, 8)[0]]
    names = ["input_ids", "attention_mask"][:len(examples)]
    path = tmp_path / f"{type(served).__name__}.engine"
    build_engine(served, examples, BuilderConfig(enable_refit=True),
                 dynamic_shapes={n: {0: batch, 1: seq} for n in names}).save(path)
    return load_engine(path)


def test_a_bert_encoder_serves_any_batch_and_length_and_refits_from_save_pretrained(tmp_path: Path) -> None:
    engine = _lm_engine(Encoder(_bert(0)), tmp_path)
    assert [s.describe() for s in engine.input_specs()] == ["int64[batch[1..16], seq[2..64]]"] * 2
    trained = _bert(1)
    trained.save_pretrained(tmp_path / "ckpt")  # model.safetensors + config.json, no "m." prefix
    engine.refit_now(tmp_path / "ckpt", add_prefix="m.")
    eager = Encoder(trained)
    for batch, seq in [(1, 5), (3, 11), (16, 64)]:
        ids, mask = _tokens(batch, seq)
        out = engine.infer(ids.numpy(), mask.numpy())
        assert out.version == 1 and _max_diff(out.outputs[0], eager(ids, mask)) <= TOL


def test_a_gpt2_decoder_refits_from_a_sharded_checkpoint_and_its_tied_head_follows(tmp_path: Path) -> None:
    engine = _lm_engine(Decoder(_gpt2(0)), tmp_path)
    assert ["m.transformer.wte.weight", "m.lm_head.weight"] in engine.tied_weights()
    trained = _gpt2(1)
    trained.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and "lm_head.weight" not in index["weight_map"]
    engine.refit_now(tmp_path / "ckpt", add_prefix="m.")  # lm_head.weight is tied to wte: not saved
    eager = Decoder(trained)
    for batch, seq in [(1, 3), (4, 17)]:
        ids, _ = _tokens(batch, seq)
        assert _max_diff(engine.infer(ids.numpy()).outputs[0], eager(ids)) <= TOL


def test_tied_weights_given_together_must_agree(tmp_path: Path) -> None:
    engine = _lm_engine(Decoder(_gpt2(0)), tmp_path)
    before = engine.weights()["m.lm_head.weight"].clone()
    wte = torch.randn(120, 32)
    with pytest.raises(WeightFileError, match="'m.lm_head.weight': the model ties it to 'm.transformer.wte"):
        engine.refit_now({"m.transformer.wte.weight": wte, "m.lm_head.weight": wte + 1})
    assert engine.version == 0 and torch.equal(engine.weights()["m.lm_head.weight"], before)


def test_a_resnet_refits_its_batchnorm_running_statistics_too(tmp_path: Path) -> None:
    served = Vision(_resnet(0))
    engine = build_engine(served, [torch.randn(2, 3, 32, 32)], BuilderConfig(enable_refit=True,
                                                                            dynamic_batch=(1, 16)))
    stats = [n for n in engine.manifest() if n.endswith(("running_mean", "running_var"))]
    assert len(stats) >= 10
    trained = _resnet(1)
    trained.save_pretrained(tmp_path / "ckpt")
    engine.refit_now(tmp_path / "ckpt", add_prefix="m.")
    live = engine.weights()
    assert all(torch.equal(live[n], trained.state_dict()[n[2:]]) for n in stats)
    x = torch.randn(5, 3, 32, 32)
    assert _max_diff(engine.infer(x.numpy()).outputs[0], Vision(trained)(x)) <= TOL


class Recommender(torch.nn.Module):
    """Large EmbeddingBag tables (one bag of ids per row and table) and small dense layers."""

    def __init__(self, rows: int = 50_000, dim: int = 32, tables: int = 2) -> None:
        super().__init__()
        self.tables = torch.nn.ModuleList(torch.nn.EmbeddingBag(rows, dim, mode="sum") for _ in range(tables))
        self.dense = torch.nn.Sequential(torch.nn.Linear(tables * dim + 8, 16), torch.nn.ReLU(),
                                         torch.nn.Linear(16, 1))

    def forward(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        pooled = [table(ids[:, t, :]) for t, table in enumerate(self.tables)]
        return self.dense(torch.cat([*pooled, features], dim=1))


def test_a_recommender_refits_only_its_tables_at_the_cost_of_the_tables(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Recommender().eval()
    ids, features = torch.randint(0, 50_000, (3, 2, 4)), torch.randn(3, 8)
    engine = build_engine(model, [ids, features], BuilderConfig(enable_refit=True, dynamic_batch=(1, 64)))
    trained = Recommender().eval()
    trained.dense.load_state_dict(model.dense.state_dict())
    # the training job saved its tables from a DistributedDataParallel wrapper: "module." prefixes
    torch.save({f"module.{k}": v for k, v in trained.state_dict().items() if k.startswith("tables.")},
               tmp_path / "tables.pt")
    staged = engine.stage(tmp_path / "tables.pt", version=1, strip_prefix="module.")
    table_bytes = sum(t.numel() * t.element_size() for t in trained.tables.state_dict().values())
    assert engine.memory().staged_bytes == table_bytes  # nothing for the dense layers
    engine.commit(staged)
    ids, features = torch.randint(0, 50_000, (7, 2, 4)), torch.randn(7, 8)
    assert _max_diff(engine.infer(ids.numpy(), features.numpy()).outputs[0], trained(ids, features)) <= TOL


def test_a_checkpoint_directory_is_checked_against_its_index_before_any_tensor_is_read(
        tmp_path: Path) -> None:
    engine = _lm_engine(Decoder(_gpt2(0)), tmp_path)
    _gpt2(1).save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    index_path = tmp_path / "ckpt" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name, shard = next(iter(index["weight_map"].items()))
    index["weight_map"][name] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightFileError, match=f"weight '{name}' names shard '../elsewhere.safetensors'"):
        engine.refit_now(tmp_path / "ckpt", add_prefix="m.")
    index["weight_map"][name] = next(s for s in index["weight_map"].values() if s != shard)
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightFileError, match=f"'{name}'"):
        engine.refit_now(tmp_path / "ckpt", add_prefix="m.")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightFileError, match="is a directory holding no checkpoint"):
        engine.refit_now(tmp_path / "empty")
    assert engine.version == 0


# ----------------------------------------------------------------------------- through the fleet


@pytest.fixture(scope="module")
def gpt2_fleet(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from cluster import Fleet

    root = tmp_path_factory.mktemp("gpt2")
    _lm_engine(Decoder(_gpt2(0)), root)
    fleet = Fleet.launch(fleet_config(root / "Decoder.engine", root, bucket_bytes=1 << 20, prefetch=True))
    yield fleet
    fleet.shutdown()


def test_a_fleet_refits_from_a_sharded_checkpoint_directory_and_serves_the_eager_models_outputs(
        gpt2_fleet: Any, tmp_path: Path) -> None:
    trained = _gpt2(2)
    trained.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    res = gpt2_fleet.refit(tmp_path / "ckpt", add_prefix="m.", complete=True)  # the tied head follows
    st = converged(gpt2_fleet)
    assert st["version"] == res.version
    # prefetch: each replica copied buckets as they were put, shard by shard, ahead of the PREPARE
    assert all(r["prefetch"]["prefetched"] > 0 for r in st["replicas"]), st["replicas"]
    assert all(r["prefetch"]["buckets"] == 0 for r in st["replicas"])  # the PREPARE took them all
    ids, _ = _tokens(3, 9)
    eager = Decoder(trained)(ids)
    for _ in range(4):
        r = gpt2_fleet.infer(ids.numpy())
        assert r.version == res.version and _max_diff(r.outputs[0], eager) <= TOL


def test_a_publication_refused_part_way_frees_what_the_replicas_prefetched(gpt2_fleet: Any,
                                                                          tmp_path: Path) -> None:
    """prefetch: the shards before a refused one were announced; the refusal withdraws them, so
    no replica keeps their copies until the next refit."""
    from safetensors.torch import load_file, save_file

    from engines.errors import NonFiniteWeightError

    _gpt2(5).save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    last = tmp_path / "ckpt" / sorted(set(index["weight_map"].values()))[-1]  # read last
    shard = load_file(last)
    name = sorted(shard)[0]
    shard[name] = shard[name].clone()
    shard[name].view(-1)[0] = float("nan")
    save_file(shard, last, metadata={"format": "pt"})
    before = gpt2_fleet.status()
    seen = {r["id"]: r["prefetch"]["prefetched"] + r["prefetch"]["skipped"] for r in before["replicas"]}
    with pytest.raises(NonFiniteWeightError, match=name):
        gpt2_fleet.refit(tmp_path / "ckpt", add_prefix="m.", complete=True)

    def freed() -> dict[str, Any] | None:  # announced buckets arrived, and nothing is held
        st = gpt2_fleet.status()
        return st if all(r["prefetch"]["tag"] is None and r["prefetch"]["bytes"] == 0
                         and r["prefetch"]["prefetched"] + r["prefetch"]["skipped"] > seen[r["id"]]
                         for r in st["replicas"]) else None

    st = wait_for(freed, 20, "the replicas to free the withdrawn buckets")
    assert st["version"] == before["version"] and all(r["staged_bytes"] == 0 for r in st["replicas"])


def test_a_sharded_checkpoint_is_published_one_shard_at_a_time(gpt2_fleet: Any, tmp_path: Path) -> None:
    from cluster.publish import publish

    _gpt2(3).save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    pub = publish(tmp_path / "ckpt", gpt2_fleet.manifest(), add_prefix="m.", complete=True,
                  bucket_bytes=1 << 20)
    assert pub.timings["shards"] == len(shards) > 2
    assert pub.timings["shards_held_at_most"] == 1
    assert set(pub.specs) == set(gpt2_fleet.manifest())  # the tied head included


def test_a_batching_fleet_serves_a_bert_encoder_to_concurrent_clients_of_any_shape_through_a_refit(
        ray_session: None, tmp_path: Path) -> None:
    """Requests of other lengths are never joined; each answer matches the eager model of the
    version it names, before and after a refit from a save_pretrained directory."""
    from concurrent.futures import ThreadPoolExecutor

    from cluster import Fleet

    models = {0: Encoder(_bert(0))}
    _lm_engine(models[0], tmp_path)
    fleet = Fleet.launch(fleet_config(tmp_path / "Encoder.engine", tmp_path,
                                      batching={"max_batch_size": 8, "max_wait_ms": 20}))
    try:
        shapes = [(1 + k % 3, 5 + 3 * (k % 4)) for k in range(12)]
        requests = [_tokens(b, s) for b, s in shapes]

        def check_all(version: int) -> None:
            with ThreadPoolExecutor(len(requests)) as pool:
                answers = list(pool.map(lambda r: fleet.infer(r[0].numpy(), r[1].numpy()), requests))
            for (ids, mask), answer in zip(requests, answers, strict=True):
                assert answer.version == version
                assert _max_diff(answer.outputs[0], models[version](ids, mask)) <= TOL

        check_all(0)
        models[1] = Encoder(_bert(1))
        models[1].m.save_pretrained(tmp_path / "ckpt")
        res = fleet.refit(tmp_path / "ckpt", add_prefix="m.", complete=True)
        assert res.version == 1
        check_all(1)
        stats = [r["batching"] for r in fleet.status()["replicas"]]
        assert sum(s["requests"] for s in stats) >= 2 * len(requests)
    finally:
        fleet.shutdown()


class HalfProbe(torch.nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(64, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.w.dtype) * self.w).to(torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_engines_refit_catch_up_and_roll_back_through_the_fleet(
        ray_session: None, tmp_path: Path, dtype: torch.dtype) -> None:
    from cluster import Fleet

    build_engine(HalfProbe(dtype), [torch.ones(1, 64)],
                 BuilderConfig(enable_refit=True, dynamic_batch=(1, 8))).save(tmp_path / "half.engine")
    fleet = Fleet.launch(fleet_config(tmp_path / "half.engine", tmp_path, replicas=2,
                                      timeouts={"prepare_s": 20, "commit_s": 10, "activate_s": 10,
                                                "request_s": 20, "launch_s": 60, "lease_s": 2}))
    try:
        def values() -> set[float]:
            return {float(fleet.infer(np.ones((1, 64), np.float32)).outputs[0][0, 0]) for _ in range(6)}

        first = fleet.refit({"w": torch.full((64,), 1.5, dtype=dtype)})
        handles = ray.get(fleet._coord.member_handles.remote())
        ray.get(handles["r1"].arm_failpoint.remote("replica.before_commit", "exit"))
        second = fleet.refit({"w": torch.full((64,), 2.25, dtype=dtype)})  # r1 dies; it catches up
        serving_again(handles["r1"], "r1")
        assert converged(fleet)["version"] == second.version and values() == {2.25}
        back = fleet.rollback()  # to the stored half-precision weights of the first refit
        assert back.version > second.version and converged(fleet)["version"] == back.version
        assert values() == {1.5} and first.version < back.version
    finally:
        fleet.shutdown()
