"""Measure the language teachers on the embedded ML-100K (issue 9: per-entity cache).

Parts (each prints one JSON line, with the load average next to every time):

- ``cache``: build the per-entity cache of a teacher's frozen part in a fresh folder (users and
  items, once each), then time the same frozen layers run per rating row, as the old per-row
  cache had to (on ``--rows`` training rows, extrapolated to the whole data set), and load the
  built cache again (a later job).
- ``epoch``: seconds per training step of a teacher (the job's optimizers: Adam for the upper
  layers and head at ``--lr``, Adagrad for the id vectors), after warm-up, extrapolated to one
  epoch of the 80K training rows; with ``--full`` a whole epoch is run and timed instead.
- ``middle``: a frozen teacher's ``middle(question, batch)`` forward + backward to the question
  (what a distillation step asks of it), rows per second.

Training a teacher to convergence is ``benchmarks/bench_distill.py teacher --model minilm``.

Usage::

    B=".venv/bin/python benchmarks/bench_language_teachers.py"
    $B cache --teacher minilm --threads 2
    $B epoch --teacher minilm --steps 20 --threads 2
    $B middle --teacher minilm --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import torch  # noqa: E402

from features.batches import prepare  # noqa: E402
from recdistill.models import build_model, count_parameters  # noqa: E402


def load() -> float:
    return round(os.getloadavg()[0], 2)


def emit(**fields) -> None:
    print(json.dumps({**fields, "load_avg_1m": load(), "threads": torch.get_num_threads()}), flush=True)


def options(args) -> dict:
    return json.loads(args.options) if args.options else {}


def bench_cache(args) -> None:
    prepared = prepare()
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = build_model(args.teacher, prepared, {**options(args), "cache_dir": folder}).freeze()
        parts = {}
        for part in ("user", "item"):
            states = model.part_states(part)
            tokens = model.parts.users if part == "user" else model.parts.items
            parts[part] = {"entities": len(tokens), "seconds": round(states.seconds, 2),
                           "mean_tokens": round(float(tokens.lengths.float().mean()), 1),
                           "mib": round(states.states.numel() * 2 / 2**20, 1)}  # fmt: skip
        build_s = sum(p["seconds"] for p in parts.values())
        # The same frozen layers once per rating row (both parts of each row), as a per-row
        # cache must: timed on a sample of training rows and extrapolated to every row.
        rows = prepared.data.splits["train"][: args.rows]
        batch_size = 256
        start = time.perf_counter()
        with torch.no_grad():
            for chunk in rows.split(batch_size):
                batch = prepared.data.batch(chunk)
                for part, tokens in (("user", model.parts.users), ("item", model.parts.items)):
                    ids, mask = tokens.lookup(batch.ids(f"{part}_id"))
                    if args.teacher == "minilm":
                        model.encode_part(ids, mask, model.first_position(part))
                    else:
                        model.encode_part(ids, mask)
        per_row_s = (time.perf_counter() - start) / len(rows)
        all_rows = len(prepared.data)
        start = time.perf_counter()
        again = build_model(args.teacher, prepared, {**options(args), "cache_dir": folder})
        again.load_state_dict(model.state_dict())  # the same weights: a later job's teacher
        again.freeze()
        reload_s = sum(again.part_states(p).seconds for p in ("user", "item"))
        assert not any(again.part_states(p).built for p in ("user", "item"))
    entities = sum(p["entities"] for p in parts.values())
    emit(part="cache", teacher=args.teacher, options=options(args), parts=parts,
         entities=entities, build_s=round(build_s, 2), s_per_entity=round(build_s / entities, 5),
         per_row_s=round(per_row_s, 5), rows=all_rows,
         per_row_all_rows_s=round(per_row_s * all_rows, 1),
         per_row_over_per_entity=round(per_row_s * all_rows / build_s, 1),
         reload_s=round(reload_s, 3), reload_build_model_s=round(time.perf_counter() - start, 2))  # fmt: skip


def _optimizer(model, lr: float):
    from recdistill.training import TrainConfig, build_optimizer

    return build_optimizer(model, TrainConfig(dense_lr=lr))


def bench_epoch(args) -> None:
    prepared = prepare()
    torch.manual_seed(0)
    model = build_model(args.teacher, prepared, options(args)).train()
    optimizer = _optimizer(model, args.lr)
    with torch.no_grad():  # the frozen part's cache is built (or loaded) before timing
        model(prepared.data.batch(prepared.data.splits["train"][:8]))
    steps_per_epoch = prepared.data.num_batches("train", args.batch_size)
    batches = prepared.data.batches("train", args.batch_size, shuffle=True, seed=0)
    timed = steps_per_epoch if args.full else args.steps
    times = []
    for step, batch in zip(range(timed + args.warmup), batches):
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= args.warmup or args.full:
            times.append(time.perf_counter() - start)
    per_step = sum(times) / len(times)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    emit(part="epoch", teacher=args.teacher, options=options(args), params=count_parameters(model),
         trainable=trainable, batch_size=args.batch_size, steps_timed=len(times),
         s_per_step=round(per_step, 4), rows_per_s=round(args.batch_size / per_step, 1),
         epoch_minutes=round(per_step * steps_per_epoch / 60, 2), full_epoch=bool(args.full))  # fmt: skip


def bench_middle(args) -> None:
    prepared = prepare()
    torch.manual_seed(0)
    model = build_model(args.teacher, prepared, options(args)).freeze()
    batches = [prepared.data.batch(rows) for rows in
               prepared.data.splits["train"][: args.batch_size * (args.steps + args.warmup)].split(args.batch_size)]  # fmt: skip
    times = []
    for step, batch in enumerate(batches):
        question = torch.randn(len(batch), model.early_dim, requires_grad=True)
        start = time.perf_counter()
        model.head(model.middle(question, batch)).sum().backward()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    per_step = sum(times) / len(times)
    emit(part="middle", teacher=args.teacher, options=options(args), batch_size=args.batch_size,
         steps_timed=len(times), s_per_step=round(per_step, 4),
         rows_per_s=round(args.batch_size / per_step, 1),
         epoch_seconds=round(per_step * prepared.data.num_batches("train", args.batch_size), 1))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["cache", "epoch", "middle"])
    parser.add_argument("--teacher", choices=["t5", "minilm"], default="minilm")
    parser.add_argument("--options", default="", help='model config overrides as JSON, e.g. {"frozen_layers": 4}')
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=20, help="epoch/middle: timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="epoch/middle: untimed first steps")
    parser.add_argument("--full", action="store_true", help="epoch: run and time a whole epoch")
    parser.add_argument("--rows", type=int, default=2048, help="cache: rows timed per row")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"cache": bench_cache, "epoch": bench_epoch, "middle": bench_middle}[args.part](args)


if __name__ == "__main__":
    main()
