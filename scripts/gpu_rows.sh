#!/usr/bin/env bash
# Issue 12's GPU rows in one run, on a lent CUDA machine (the `device` tool; it has torch and CUDA but
# no Ray). Prepare here, once:   ../shared/gpu/make-ray-bundle.sh      (fills the git-ignored .carry/)
# Then run, naming .carry in the call's carry:   bash scripts/gpu_rows.sh
# It unpacks the Ray bundle, records the card, and runs bench_refit on cuda: 1 and 4 GiB, 1 and 4
# replicas on fractions of one GPU, each with host_to_device pinned and pageable, against the pinned
# host-to-device speed measured in the same run (checkpoints without fsync: the disk is not what these
# rows measure). Results land in $OUT (or ./gpu-rows-out): the JSON (rewritten after each row),
# the log and nvidia-smi's view. Plan for 6-8 minutes of the run's 10; SIZES, REPLICAS and COUNTS
# change it (COUNTS replaces the refit counts, e.g. COUNTS="--quick --warm 1 --settled 1 --refits 2").
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-rows-out}
mkdir -p "$out" /tmp/site
if ! python3 -c "import ray" 2>/dev/null; then
  tar xJf .carry/ray-slim.tar.xz -C /tmp/site 2>/dev/null || python3 -m tarfile -e .carry/ray-slim.tar.xz /tmp/site
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
python3 -c "import torch, ray; print('torch', torch.__version__, 'ray', ray.__version__, torch.cuda.get_device_name(0))" \
  | tee "$out/versions.txt"
# shellcheck disable=SC2086
python3 scripts/bench_refit.py --device cuda --sizes-mib ${SIZES:-1024 4096} --replicas ${REPLICAS:-1 4} \
  --host-to-device pinned pageable --no-fsync ${COUNTS:---quick --warmup 1 --warm 2 --settled 2 --refits 4 --idle-s 1} \
  --json "$out/gpu-rows.json" 2>&1 | tee "$out/gpu-rows.log"
