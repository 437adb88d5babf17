"""Time the verbalizer on all of the embedded ML-100K (issue 2: under 1 s on the 2-core machine).

Usage: .venv/bin/python benchmarks/bench_verbalizer.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from features import DataConfig, load_movielens
from features.verbalizer import verbalize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    start = time.perf_counter()
    joined = load_movielens(DataConfig()).joined()
    load_s = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        prompts = verbalize(joined)
        times.append(time.perf_counter() - start)
    print(f"rows: {len(prompts):,}")
    print(f"load + join: {load_s:.3f} s")
    print(
        f"verbalize: median {statistics.median(times):.3f} s, "
        f"min {min(times):.3f} s, max {max(times):.3f} s over {args.repeats} runs"
    )
    print(f"load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
