"""Measure the language teachers on the embedded ML-100K (issues 3 and 4.5).

Parts (each prints one JSON line, with the load average next to every time):

- ``tokens``: verbalize and tokenize all 100K rating rows into the token table.
- ``epoch``: seconds per training step of a teacher (plain Adam, MSE), after warm-up,
  extrapolated to one epoch of the 80K training rows.
- ``cache``: speed of a frozen teacher's ``middle(question, batch)`` with its context cache
  (warm) against recomputing the context (cache off), on the same batches; and the largest
  difference between the two answers.
- ``train``: ``recdistill.training.train_supervised`` with the given budget; valid and test
  MSE/RMSE, and the checkpoint path (``<checkpoint-dir>/best.pt``, loadable with
  ``recdistill.training.load_checkpoint(path, prepared)``).

Usage::

    .venv/bin/python benchmarks/bench_language_teachers.py tokens
    .venv/bin/python benchmarks/bench_language_teachers.py epoch --teacher t5 --steps 40
    .venv/bin/python benchmarks/bench_language_teachers.py cache --teacher t5 --batches 10
    .venv/bin/python benchmarks/bench_language_teachers.py train --teacher t5 --epochs 2 \\
        --lr 1e-3 --checkpoint-dir checkpoints/t5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import torch  # noqa: E402

from features.batches import RatingsData, prepare  # noqa: E402
from recdistill.models import build_model, count_parameters  # noqa: E402
from recdistill.models.text import minilm_path, prompt_token_table  # noqa: E402


def load() -> float:
    return round(os.getloadavg()[0], 2)


def emit(**fields) -> None:
    print(json.dumps({**fields, "load_avg_1m": load(), "threads": torch.get_num_threads()}), flush=True)


def teacher_options(args) -> dict:
    return json.loads(args.options) if args.options else {}


def bench_tokens(args) -> None:
    prepared = prepare()
    start = time.perf_counter()
    table = prompt_token_table(prepared, minilm_path() / "tokenizer.json", 64)
    seconds = time.perf_counter() - start
    emit(part="tokens", rows=len(table), seconds=round(seconds, 2), max_length=table.max_length,
         mean_tokens=round(float(table.lengths.float().mean()), 1))  # fmt: skip


def bench_epoch(args) -> None:
    prepared = prepare()
    torch.manual_seed(0)
    model = build_model(args.teacher, prepared, teacher_options(args)).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    batches = prepared.data.batches("train", args.batch_size, shuffle=True, seed=0)
    times = []
    for step, batch in zip(range(args.steps + args.warmup), batches):
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    per_step = sum(times) / len(times)
    steps_per_epoch = prepared.data.num_batches("train", args.batch_size)
    emit(part="epoch", teacher=args.teacher, options=teacher_options(args), params=count_parameters(model),
         batch_size=args.batch_size, steps_timed=len(times), s_per_step=round(per_step, 4),
         rows_per_s=round(args.batch_size / per_step, 1),
         epoch_minutes_extrapolated=round(per_step * steps_per_epoch / 60, 1))  # fmt: skip


def bench_cache(args) -> None:
    prepared = prepare()
    torch.manual_seed(0)
    model = build_model(args.teacher, prepared, teacher_options(args)).freeze()
    batches = list(zip(range(args.batches), prepared.data.batches("train", args.batch_size, seed=0)))
    questions = [torch.randn(len(b), model.early_dim) for _, b in batches]

    def run() -> tuple[float, list[torch.Tensor]]:
        outs = []
        start = time.perf_counter()
        with torch.no_grad():
            for (_, batch), q in zip(batches, questions):
                outs.append(model.middle(q, batch))
        return time.perf_counter() - start, outs

    fill_s, _ = run()  # first pass: misses, the cache fills
    warm = model.context_cache
    cached, fresh = [], []
    for _ in range(args.repeats):  # alternate, so both modes see the same machine load
        model.context_cache = warm
        cached.append(run())
        model.context_cache = None  # the same frozen teacher, recomputing its context
        fresh.append(run())
    stats = warm.stats()
    budget = warm.budget_bytes
    cached_s = min(t for t, _ in cached)
    fresh_s = min(t for t, _ in fresh)
    diff = max((a - b).abs().max().item() for a, b in zip(cached[0][1], fresh[0][1]))
    rows = args.batches * args.batch_size
    emit(part="cache", teacher=args.teacher, options=teacher_options(args), batch_size=args.batch_size,
         batches=args.batches, fill_s=round(fill_s, 3), cached_s=round(cached_s, 3),
         recompute_s=round(fresh_s, 3), speedup=round(fresh_s / cached_s, 2),
         max_abs_diff=diff, cache_bytes=stats["bytes_used"], budget_bytes=budget,
         bytes_per_row=round(stats["bytes_used"] / rows), hits=stats["hits"], misses=stats["misses"])  # fmt: skip


def subsample(prepared, eval_rows: int | None):
    """The same data with valid and test cut to ``eval_rows`` random rows each (seed 0).

    For teachers too slow to score 10K rows per split on a shared CPU; the training split and
    the tensors are untouched.
    """
    if not eval_rows:
        return prepared
    data = prepared.data
    gen = torch.Generator().manual_seed(0)
    splits = dict(data.splits)
    for name in ("valid", "test"):
        rows = splits[name]
        splits[name] = rows[torch.randperm(len(rows), generator=gen)[:eval_rows]]
    cut = RatingsData(data.single, data.genres, data.genre_lengths, data.labels, splits, data.sizes)
    return dataclasses.replace(prepared, data=cut)


def bench_train(args) -> None:
    from recdistill.training import TrainConfig, seed_everything, train_supervised

    prepared = prepare()
    seed_everything(args.seed)
    model = build_model(args.teacher, prepared, teacher_options(args))
    prepared = subsample(prepared, args.eval_rows)
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        dense_lr=args.lr, patience=args.patience, seed=args.seed, checkpoint_dir=args.checkpoint_dir,
        max_steps_per_epoch=args.max_steps, progress=False,
    )  # fmt: skip
    start = time.perf_counter()
    result = train_supervised(
        model, prepared, cfg,
        on_epoch=lambda epoch, m: emit(part="train_epoch", teacher=args.teacher, epoch=epoch,
                                       **{k: round(v, 4) for k, v in m.items()}),
    )  # fmt: skip
    emit(part="train", teacher=args.teacher, options=teacher_options(args), params=count_parameters(model),
         epochs=args.epochs, max_steps=args.max_steps, eval_rows=args.eval_rows or "all", batch_size=args.batch_size, lr=args.lr,
         best_epoch=result.best_epoch, valid=result.valid, test=result.test,
         minutes=round((time.perf_counter() - start) / 60, 1),
         checkpoint=str(result.checkpoint) if result.checkpoint else None)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["tokens", "epoch", "cache", "train"])
    parser.add_argument("--teacher", choices=["t5", "minilm"], default="t5")
    parser.add_argument("--options", default="", help='model config overrides as JSON, e.g. {"d_model": 256}')
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--eval-batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=30, help="epoch: timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="epoch: untimed first steps")
    parser.add_argument("--batches", type=int, default=10, help="cache: batches per pass")
    parser.add_argument("--repeats", type=int, default=3, help="cache: passes per mode (min taken)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="train: steps per epoch cap")
    parser.add_argument("--eval-rows", type=int, default=None,
                        help="train: score a random subset of this many valid and test rows")
    parser.add_argument("--patience", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine, 2 threads spin-wait)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"tokens": bench_tokens, "epoch": bench_epoch, "cache": bench_cache, "train": bench_train}[args.part](args)


if __name__ == "__main__":
    main()
