"""The committee's own prediction from trained teachers: each teacher alone, their plain mean and
the mean with weights fitted on the validation split (``distill.committee_weights: valid``),
valid and test MSE of predictions clipped to the rating range. Reads the teachers' ``best.pt``
in a folder (``recdistill bench paper`` writes ``runs/bench_paper/teachers/NAME/best.pt``).

Usage::

    .venv/bin/python benchmarks/bench_committee_mix.py --config paper \\
        --teachers-dir runs/bench_paper/teachers --teachers minilm mlp_l --also 0.05 0.95
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from pipelines.config import load_config  # noqa: E402
from pipelines.domains import domain_for  # noqa: E402
from recdistill.distill.weights import committee_predictions, fit_committee_weights  # noqa: E402
from recdistill.models import load_checkpoint  # noqa: E402
from recdistill.training.evaluation import label_range  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="paper", help="the job config the teachers were trained under")
    parser.add_argument("--teachers-dir", type=Path, default=Path("runs/bench_paper/teachers"))
    parser.add_argument("--teachers", nargs="+", default=["minilm", "mlp_l"])
    parser.add_argument("--also", nargs="+", type=float, metavar="W",
                        help="one more set of weights to score, one per teacher (e.g. an importance's mean)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    prepared = domain_for(cfg).load(cfg)
    data = prepared.data
    committee = [(name, load_checkpoint(args.teachers_dir / name / "best.pt", prepared)) for name in args.teachers]
    weights = fit_committee_weights(committee, data)
    print("weights fitted on valid: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(args.teachers, weights.tolist())))
    low, high = label_range(data)
    for split in ("valid", "test"):
        predictions, labels = committee_predictions(committee, data, split, 8192)
        mixes = {name: predictions[k] for k, name in enumerate(args.teachers)}
        mixes["plain mean"] = predictions.mean(0)
        mixes["fitted weights"] = (weights.view(-1, 1) * predictions).sum(0)
        if args.also:
            also = torch.tensor(args.also) / sum(args.also)
            mixes[f"weights {' / '.join(f'{w:g}' for w in args.also)}"] = (also.view(-1, 1) * predictions).sum(0)
        for name, mix in mixes.items():
            mse = float(((mix.clamp(low, high) - labels) ** 2).mean())
            print(f"{split} MSE, {name}: {mse:.4f}")


if __name__ == "__main__":
    main()
