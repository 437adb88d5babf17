"""How much can a per-row importance gain over fixed committee weights? A stacking probe.

DiverseDistill's importance weighs each teacher per row; LD with ``committee_weights: valid``
weighs them with one number each. Before a distillation run, this measures the ceiling of the
first over the second on the committee's own predictions, fitted where the teachers are honest:
out-of-fold predictions of cross-fitted teachers on the training rows (``importance_fit: oof``,
each row by the fold model that never saw it). Fitted there, each of these is evaluated on the
validation and test splits (the teachers' predictions there: the mean of the fold models, and
the teacher fitted once on every training row):

- ``global``: one convex weight per teacher (what ``committee_weights`` fits, here on the
  out-of-fold rows; and, for reference, on the validation split as the job does);
- ``gate``: per-row convex weights ``softmax(features W)``, the features being what an
  importance could know of a row (log counts of the user's and item's training ratings, the
  teachers' predictions and their spread): the form of an importance score, fitted honestly;
- ``stacker``: an unconstrained small MLP from the same features to the rating: the most a
  target built from these teachers' predictions could give.

Usage (the folders of a ``bench_committee.py`` job with ``--oof K`` and of the first job)::

    .venv/bin/python benchmarks/bench_stacking.py --oof-folder runs/bench_committee/temporal-0-ld@valid[fm,dlrm_l]+oof5/<run> \\
        --full-folder runs/bench_committee/temporal-0/<run> --split temporal --seed 0 --teachers fm dlrm_l
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pipelines.config import load_config  # noqa: E402
from recdistill.distill.crossfit import CrossFitted  # noqa: E402
from recdistill.distill.holdout import fold_rows  # noqa: E402
from recdistill.models import load_checkpoint  # noqa: E402
from recdistill.training.ranks import local_batches  # noqa: E402

STEPS = 1500


def predictions(models: dict[str, nn.Module], data, split: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``({name: [N] predictions}, {"labels", "users", "items", "rows"})`` on ``split``."""
    out: dict[str, list] = {n: [] for n in models}
    extra: dict[str, list] = {"labels": [], "users": [], "items": [], "rows": []}
    with torch.no_grad():
        for _, batch in local_batches(data, split, 8192, shuffle=False, seed=0):
            for name, model in models.items():
                out[name].append(model(batch).float())
            extra["labels"].append(batch.labels.float())
            extra["users"].append(batch.ids("user_id"))
            extra["items"].append(batch.ids("item_id"))
            extra["rows"].append(batch.rows)
    return {n: torch.cat(v) for n, v in out.items()}, {k: torch.cat(v) for k, v in extra.items()}


def features(p: torch.Tensor, info: dict, user_count: torch.Tensor, item_count: torch.Tensor) -> torch.Tensor:
    """``[N, F]``: log1p counts of the user's and item's training ratings, the K predictions
    (centred on 3.5), and their spread."""
    spread = (p.max(1).values - p.min(1).values).unsqueeze(1)
    return torch.cat([torch.log1p(user_count[info["users"]].float()).unsqueeze(1) / 5,
                      torch.log1p(item_count[info["items"]].float()).unsqueeze(1) / 5,
                      p - 3.5, spread], dim=1)  # fmt: skip


def fit(model: nn.Module, forward, labels: torch.Tensor) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(STEPS):
        optimizer.zero_grad()
        (forward() - labels).pow(2).mean().backward()
        optimizer.step()
    return model


class Gate(nn.Module):
    """Per-row convex weights of the K predictions: ``softmax(x W + b)``."""

    def __init__(self, width: int, teachers: int, per_row: bool = True):
        super().__init__()
        self.linear = nn.Linear(width, teachers) if per_row else None
        self.bias = nn.Parameter(torch.zeros(teachers))

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        logits = self.bias.expand(len(p), -1) + (self.linear(x) if self.linear is not None else 0)
        return (torch.softmax(logits, 1) * p).sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--oof-folder", required=True)
    parser.add_argument("--full-folder", required=True)
    parser.add_argument("--split", default="temporal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teachers", nargs="+", default=["fm", "dlrm_l"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", default="docs/results/stacking.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    from features.batches import prepare

    cfg = load_config("default", [f"data.split={args.split}", f"data.seed={args.seed}"])
    prepared = prepare(cfg.data)
    data = prepared.data
    train = data.splits["train"]
    folds = fold_rows(train, args.folds, cfg.distill.holdout_seed)
    crossfit = {n: CrossFitted([load_checkpoint(Path(args.oof_folder) / f"teacher_{n}" / f"fold{j}" / "best.pt", prepared)
                                for j in range(args.folds)], folds).eval() for n in args.teachers}  # fmt: skip
    full = {n: load_checkpoint(Path(args.full_folder) / f"teacher_{n}" / "best.pt", prepared).eval() for n in args.teachers}

    cache = Path(args.oof_folder) / "stacking_predictions.pt"  # the teachers' predictions, once
    if cache.is_file():
        oof, info_train, evaluated_raw = torch.load(cache)
    else:
        oof, info_train = predictions(crossfit, data, "train")
        evaluated_raw = {split: (predictions(crossfit, data, split), predictions(full, data, split)[0])
                         for split in ("valid", "test")}  # fmt: skip
        torch.save((oof, info_train, evaluated_raw), cache)
    users, items = info_train["users"], info_train["items"]
    user_count = torch.bincount(users, minlength=int(users.max()) + 1)
    item_count = torch.bincount(items, minlength=int(items.max()) + 1)
    size = max(len(user_count), len(item_count)) + 10_000
    user_count = torch.cat([user_count, user_count.new_zeros(size - len(user_count))])
    item_count = torch.cat([item_count, item_count.new_zeros(size - len(item_count))])

    names = args.teachers
    p_train = torch.stack([oof[n] for n in names], 1)
    y_train = info_train["labels"]
    x_train = features(p_train, info_train, user_count, item_count)
    evaluated = {}
    for split, ((bagged, info), single) in evaluated_raw.items():
        for source, preds in (("bagged", bagged), ("single", single)):
            p = torch.stack([preds[n] for n in names], 1)
            evaluated[(split, source)] = (p, features(p, info, user_count, item_count), info["labels"])

    def mse(fn, split, source):
        p, x, y = evaluated[(split, source)]
        with torch.no_grad():
            return round(float((fn(x, p).clamp(1, 5) - y).pow(2).mean()), 5)

    rows = []
    for name_k, k in zip(names, range(len(names))):
        rows.append({"model": f"{name_k} alone", "fn": lambda x, p, k=k: p[:, k]})
    glob = Gate(x_train.shape[1], len(names), per_row=False)
    fit(glob, lambda: glob(x_train, p_train), y_train)
    rows.append({"model": "global weights (fitted out of fold)", "fn": glob,
                 "weights": torch.softmax(glob.bias, 0).tolist()})  # fmt: skip
    valid_p, valid_x, valid_y = evaluated[("valid", "single")]
    glob_valid = Gate(x_train.shape[1], len(names), per_row=False)
    fit(glob_valid, lambda: glob_valid(valid_x, valid_p), valid_y)
    rows.append({"model": "global weights (fitted on valid, single teachers)", "fn": glob_valid,
                 "weights": torch.softmax(glob_valid.bias, 0).tolist()})  # fmt: skip
    gate = Gate(x_train.shape[1], len(names))
    fit(gate, lambda: gate(x_train, p_train), y_train)
    rows.append({"model": "per-row gate (fitted out of fold)", "fn": gate})
    stacker = nn.Sequential(nn.Linear(x_train.shape[1], 32), nn.ReLU(), nn.Linear(32, 1))
    fit(stacker, lambda: stacker(x_train).squeeze(1) + 3.5, y_train)
    rows.append({"model": "MLP stacker (fitted out of fold)", "fn": lambda x, p: stacker(x).squeeze(1) + 3.5})
    out = Path(args.out)
    with out.open("a") as f:
        for row in rows:
            fn = row.pop("fn")
            row.update({f"{split}_{source}": mse(fn, split, source) for split, source in evaluated})
            row.update({"split": args.split, "seed": args.seed, "teachers": names})
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
