"""recdistill: distil a committee of frozen teachers into a small TorchRec recommender."""

import os

# OpenMP threads that wait by spinning fight other processes for the cores: on a busy 2-core
# machine MLP-S trained at 17,000-20,000 rows/s with torch's 2 spinning threads, 36,000 with one
# thread and 47,600 with 2 passive ones (benchmarks/bench_threads.py, docs/results/scale.md).
# The OpenMP runtime reads this when torch loads, so it is set here, before any torch import of
# ours; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
