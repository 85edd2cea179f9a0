"""Publish a weights file to a running fleet: the script for ``ray job submit``.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python scripts/refit_job.py --fleet local-cpu --weights out/new.safetensors

Connects by name (the job runs inside the cluster, so RAY_ADDRESS is set for it), validates and
checksums the file in this process, puts it into the object store once and refits every replica.
Prints one JSON line with the outcome. Exit codes: 0 committed (or no-op), 2 aborted, 1 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from cluster import Fleet, RefitAborted
from engines import EngineError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", required=True, help="fleet name (the config's `name`)")
    parser.add_argument("--namespace", default="weight-refit")
    parser.add_argument("--weights", required=True, help=".safetensors, .pt (tensors only) or .npz file")
    parser.add_argument("--key", default=None, help="idempotency key: a retry returns the first outcome")
    parser.add_argument("--strip-prefix", default=None, help="drop this prefix from the file's names")
    args = parser.parse_args(argv)
    fleet = Fleet.connect(args.fleet, args.namespace)
    try:
        res = fleet.refit(args.weights, key=args.key, strip_prefix=args.strip_prefix)
    except RefitAborted as exc:
        print(json.dumps({"status": "aborted", "reason": exc.reason, "votes": exc.votes, "txn": exc.txn}))
        return 2
    except EngineError as exc:
        print(json.dumps({"status": "refused", "reason": str(exc)}))
        return 1
    print(json.dumps({"status": "noop" if res.noop else "committed", "version": res.version,
                      "txn": res.txn, "duration_s": round(res.duration_s, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
