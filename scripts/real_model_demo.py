"""A small transformer served by a 2-replica fleet with batching, refit from sharded checkpoints.

Builds a GPT-2-style decoder from a ``transformers`` config with random init (no download; the
test extra installs ``transformers``), exports it with a dynamic batch and sequence length, and
launches a fleet of 2 CPU replicas that batch concurrent requests. Client threads send requests
of 1 to 4 sequences while the driver refits the fleet from sharded checkpoint directories
(``save_pretrained(max_shard_size=...)``: ``model.safetensors.index.json`` plus shards) of newly
initialised models. Prints each version, the throughput, and, at each version, that the fleet's
outputs match the eager model's. Exits 1 on any mismatch, failed request, or a client whose
versions went backwards.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOL = 1e-5


def _model(seed: int) -> object:
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _served(model: object) -> object:
    import torch

    class Decoder(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, use_cache=False).logits

    return Decoder(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4, help="client threads (default: %(default)s)")
    parser.add_argument("--versions", type=int, default=3, help="refits (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=16, help="tokens per sequence (default: %(default)s)")
    args = parser.parse_args(argv)

    import torch
    from torch.export import Dim

    from cluster import Fleet, FleetConfig
    from engines import BuilderConfig, build_engine

    work = Path(tempfile.mkdtemp(prefix="real-model-demo-"))
    t = time.perf_counter()
    batch, seq = Dim("batch", min=1, max=32), Dim("seq", min=2, max=128)
    ids = torch.randint(0, 512, (2, 8))
    build_engine(_served(_model(0)), [ids], BuilderConfig(enable_refit=True),
                 dynamic_shapes={"input_ids": {0: batch, 1: seq}}).save(work / "gpt2.engine")
    print(f"exported a GPT-2-style decoder with dynamic batch and length in {time.perf_counter() - t:.1f}s")
    cfg = FleetConfig(name="real-model-demo", engine=str(work / "gpt2.engine"), replicas=2,
                      state_dir=str(work / "state"), torch_threads=1,
                      batching={"max_batch_size": 16, "max_wait_ms": 5})
    fleet = Fleet.launch(cfg)
    print(f"fleet of {cfg.replicas} replicas serving, batching up to 16 sequences, version "
          f"{fleet.status()['version']}")

    stop = threading.Event()
    failures: list[str] = []
    served = [0]
    lock = threading.Lock()

    def client(k: int) -> None:
        handle = Fleet.connect(cfg.name)
        rng = np.random.default_rng(k)
        last = 0
        while not stop.is_set():
            x = rng.integers(0, 512, (1 + k % 4, args.seq), dtype=np.int64)
            try:
                r = handle.infer(x)
            except Exception as exc:  # noqa: BLE001  (every failure is reported)
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if r.version < last:
                failures.append(f"client {k}: versions went backwards {last} -> {r.version}")
            last = r.version
            with lock:
                served[0] += x.shape[0]

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
    for th in threads:
        th.start()
    probe = np.random.default_rng(99).integers(0, 512, (3, args.seq), dtype=np.int64)
    mismatches = 0
    t0 = time.perf_counter()
    try:
        for step in range(1, args.versions + 1):
            model = _model(step)
            ckpt = work / f"ckpt-{step}"
            model.save_pretrained(ckpt, max_shard_size="200KB")
            shards = len(list(ckpt.glob("model-*.safetensors")))
            res = fleet.refit(ckpt, add_prefix="m.", complete=True)
            eager = _served(model)(torch.from_numpy(probe)).detach().numpy()
            diffs = [float(np.abs(fleet.infer(probe).outputs[0] - eager).max()) for _ in range(4)]
            ok = max(diffs) <= TOL
            mismatches += not ok
            print(f"v{res.version}: refit from {shards} shards in {res.duration_s * 1000:.0f} ms; fleet vs "
                  f"eager max |diff| {max(diffs):.1e} ({'match' if ok else 'MISMATCH'})")
            time.sleep(1.0)  # let the clients run on this version
    finally:
        stop.set()
        for th in threads:
            th.join(30)
        elapsed = time.perf_counter() - t0
    stats = [r.get("batching") or {} for r in fleet.status()["replicas"]]
    fleet.shutdown()
    batches = sum(s.get("batches", 0) for s in stats)
    requests = sum(s.get("requests", 0) for s in stats)
    print(f"{served[0]} sequences served in {elapsed:.1f}s ({served[0] / elapsed:.0f}/s) by {args.clients} "
          f"clients; {requests} requests ran in {batches} batches; failures: {len(failures)}")
    for f in failures[:5]:
        print(f"  {f}")
    return 1 if failures or mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
