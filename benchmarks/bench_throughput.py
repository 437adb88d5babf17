"""Training throughput of the student: TorchRec EBC path vs the same network on plain nn.EmbeddingBag.

Both sides train MLP-S (same weights, same optimizers: Adagrad for the tables, Adam for the
rest) on the same real ML-100K rows at batch 1024; each includes building its own inputs from
the encoded tensors (a KeyedJaggedTensor for TorchRec; index tensors and offsets for plain).
Rounds alternate TorchRec / plain back to back; the ratio is taken within each pair and its median
reported (beside the median examples/s and the load average), since on a shared machine the load
changes from round to round.

Usage::

    .venv/bin/python benchmarks/bench_throughput.py [--steps 40] [--rounds 5] [--model mlp_s]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from features.batches import RatingsData, prepare  # noqa: E402
from recdistill.models import build_model  # noqa: E402
from recdistill.training import TrainConfig, build_optimizer, seed_everything  # noqa: E402


class PlainRecommender(nn.Module):
    """MLP-S with one ``nn.EmbeddingBag`` per feature, weights copied from a TorchRec model."""

    def __init__(self, torchrec_model: nn.Module):
        super().__init__()
        bags = torchrec_model.sparse_arch.ebc.embedding_bags
        self.features = list(torchrec_model.sparse_arch.features)  # KJT order: genres last
        self.bags = nn.ModuleList(
            nn.EmbeddingBag.from_pretrained(bags[f"t_{f}"].weight.detach().clone(), freeze=False, mode="sum")
            for f in self.features
        )
        self.tower = copy.deepcopy(torchrec_model.tower.layers)  # plain Linear / ReLU layers
        self.rating_head = copy.deepcopy(torchrec_model.rating_head)

    def forward(self, single: torch.Tensor, genres: torch.Tensor, genre_offsets: torch.Tensor) -> torch.Tensor:
        pooled = []
        for feature, bag in zip(self.features, self.bags):
            if feature == "genres":
                pooled.append(bag(genres, genre_offsets))
            else:
                pooled.append(bag(single[:, self.features.index(feature)].unsqueeze(1)))
        return self.rating_head(self.tower(torch.cat(pooled, dim=1))).squeeze(-1)


def plain_inputs(data: RatingsData, rows: torch.Tensor):
    lengths = data.multi["genres"].lengths[rows]
    padded = data.multi["genres"].padded[rows]
    mask = torch.arange(padded.shape[1]) < lengths.unsqueeze(1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]])
    return data.single[rows], padded[mask], offsets, data.labels[rows]


def plain_optimizer(model: PlainRecommender, cfg: TrainConfig):
    tables = list(model.bags.parameters())
    dense = [p for n, p in model.named_parameters() if not n.startswith("bags.")]
    return [torch.optim.Adagrad(tables, lr=cfg.embedding_lr, eps=1e-8), torch.optim.Adam(dense, lr=cfg.dense_lr)]


def time_torchrec(model, optimizer, data, batches) -> float:
    """Rows per second of one pass over ``batches`` (row ids; each batch built inside the step)."""
    start = time.perf_counter()
    for rows in batches:
        batch = data.batch(rows)
        loss = nn.functional.mse_loss(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return sum(len(r) for r in batches) / (time.perf_counter() - start)


def time_plain(model, optimizers, data, batches) -> float:
    start = time.perf_counter()
    for rows in batches:
        single, genres, offsets, labels = plain_inputs(data, rows)
        loss = nn.functional.mse_loss(model(single, genres, offsets), labels)
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
    return sum(len(r) for r in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp_s")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    prepared = prepare()
    data = prepared.data
    cfg = TrainConfig(batch_size=args.batch_size)
    seed_everything(0)
    torchrec_model = build_model(args.model, prepared)
    plain_model = PlainRecommender(torchrec_model)
    check = data.splits["valid"][:256]
    with torch.no_grad():  # same network, same weights: same predictions
        a = torchrec_model.eval()(data.batch(check))
        b = plain_model.eval()(*plain_inputs(data, check)[:3])
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    torchrec_model.train(), plain_model.train()
    trec_opt, plain_opts = build_optimizer(torchrec_model, cfg), plain_optimizer(plain_model, cfg)

    rows = data.splits["train"][torch.randperm(len(data.splits["train"]), generator=torch.Generator().manual_seed(0))]
    batches = list(rows.split(args.batch_size))[: args.steps]
    time_torchrec(torchrec_model, trec_opt, data, batches[:5])  # warm-up
    time_plain(plain_model, plain_opts, data, batches[:5])
    trec, plain = [], []
    for _ in range(args.rounds):
        trec.append(time_torchrec(torchrec_model, trec_opt, data, batches))
        plain.append(time_plain(plain_model, plain_opts, data, batches))
    report = {
        "model": args.model,
        "batch_size": args.batch_size,
        "steps_per_round": len(batches),
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "torchrec_examples_per_s": statistics.median(trec),
        "plain_examples_per_s": statistics.median(plain),
        "torchrec_rounds": [round(x) for x in trec],
        "plain_rounds": [round(x) for x in plain],
    }
    # Paired per round: the load of a shared machine changes between rounds, not within a pair.
    report["plain_over_torchrec_per_round"] = [round(p / t, 3) for p, t in zip(plain, trec)]
    report["plain_over_torchrec"] = statistics.median(p / t for p, t in zip(plain, trec))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
