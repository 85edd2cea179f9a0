"""Sample 4 (the seed's multi_thread): one thread infers in a loop while another refits.

The inference thread infers all-ones inputs in a loop and prints ``result: N`` (in the C++
sample's block) each time the result changes, with the number of inferences so far; unlike the
C++ sample it does not print every inference, which would be megabytes of log. The refit thread
sets the kernel to all 1, all 2, ... all 9, one step per --interval seconds, so the results go
0, 9, 18, ..., 81. At the end a summary line is printed; the exit status is 1 if any result was
not a multiple of 9, did not match the version the engine named, or ever decreased.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from _conv import DEFAULT_ENGINE, WEIGHT_NAME, data_info, example_input, kernel, load_or_build

STEPS = 9
SEPARATOR = "-------------------------"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Prints a result block only when the result changes (plus the inference count), "
               "not on every inference.")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between refits (default: %(default)s)")
    parser.add_argument("--engine", type=Path, default=DEFAULT_ENGINE,
                        help="engine file (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or mlu[:N] (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.interval < 0:
        parser.error("--interval must be >= 0")

    engine = load_or_build(args.engine, args.device)
    base_version = engine.version
    x = example_input()
    inp = x.flatten().tolist()
    refits_done = threading.Event()
    stats = {"inferences": 0, "errors": [], "seen": []}

    def infer_loop() -> None:
        last = None
        while True:
            final = refits_done.is_set()  # one more inference after the last refit, then stop
            r = engine.infer(x)
            value = float(r.outputs[0].flatten()[0])
            stats["inferences"] += 1
            expected = 9.0 * (r.version - base_version)
            if value % 9 != 0 or value != expected:
                stats["errors"].append(f"result {value:g} at version {r.version} (expected {expected:g})")
            if last is not None and value < last:
                stats["errors"].append(f"result decreased: {last:g} -> {value:g}")
            if value != last:
                stats["seen"].append(value)
                print(f"{SEPARATOR} (inference {stats['inferences']}, version {r.version})")
                print(data_info(inp, None, value), flush=True)
                last = value
            if final:
                return

    def refit_loop() -> None:
        try:
            for step in range(1, STEPS + 1):
                if refits_done.wait(args.interval):
                    return
                fit = engine.create_refitter()
                fit.set_named_weights(WEIGHT_NAME, kernel(step))
                fit.refit()
        finally:
            refits_done.set()

    reader = threading.Thread(target=infer_loop, name="infer")
    refitter = threading.Thread(target=refit_loop, name="refit")
    reader.start()
    refitter.start()
    refitter.join()
    reader.join()

    seen = " ".join(f"{v:g}" for v in stats["seen"])
    status = "ok" if not stats["errors"] else f"{len(stats['errors'])} bad result(s)"
    print(f"summary: {stats['inferences']} inferences, {engine.version - base_version} refits, "
          f"results seen: {seen}; {status}")
    for err in stats["errors"][:10]:
        print(f"error: {err}")
    return 1 if stats["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
