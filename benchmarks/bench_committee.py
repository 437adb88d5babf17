"""The shipped committee job, on the project's own splits and seeds, beside the peers.

Runs the default job (``pipelines/configs/default.yaml``: FM + DLRM-L + MiniLM teach DLRM-S by
LD with validation-fitted committee weights and a transfer set) once per split and seed, and
the other methods of ``--methods`` from the same trained teachers (``teachers.<name>.checkpoint``,
no student alone); writes one JSON line per model row of each job (every teacher alone, the
student alone, each distilled student: test MSE and the cold / medium / warm slices), one per
committee prediction (equal mean and fitted weights, valid and test), and the fit seconds of
each model. Lines already in ``--out`` are skipped, so an interrupted run resumes.

The random split changes with the seed (``data.seed`` = ``train.seed`` = seed, as
``benchmarks/bench_peers.py`` does); the temporal split is the same rows for every seed.

Usage::

    OMP_NUM_THREADS=2 nice -n 5 .venv/bin/python benchmarks/bench_committee.py \\
        --splits random temporal --seeds 0 1 2 --methods mt --out docs/results/committee.jsonl
    .venv/bin/python benchmarks/bench_committee.py --report docs/results/committee.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pipelines.config import load_config  # noqa: E402
from pipelines.jobs import run_job  # noqa: E402
from recdistill.models import load_checkpoint  # noqa: E402
from recdistill.training import evaluate  # noqa: E402

SLICES = ("mse_item_cold", "mse_item_medium", "mse_item_warm", "mse_user_medium", "mse_user_warm")


class CommitteeMean(nn.Module):
    """``sum_k w_k teacher_k(batch)``: the committee's prediction, to evaluate like a model."""

    def __init__(self, teachers: list[nn.Module], weights: torch.Tensor):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.weights = weights

    def forward(self, batch):
        return sum(w * t(batch) for w, t in zip(self.weights.tolist(), self.teachers))


class Timer:
    """The job's progress lines, timed: a model's fit runs from its "N parameters" line to its
    "best epoch" line."""

    def __init__(self, quiet: bool):
        self.quiet, self.started, self.seconds = quiet, {}, {}

    def __call__(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)
        name, _, rest = line.strip().partition(": ")
        if rest.endswith("parameters"):
            self.started[name] = time.perf_counter()
        elif rest.startswith("best epoch") and name in self.started:
            self.seconds.setdefault(name, round(time.perf_counter() - self.started.pop(name), 1))


def done_keys(path: Path) -> set[tuple]:
    if not path.is_file():
        return set()
    return {(r["split"], r["seed"], r["job"]) for r in map(json.loads, path.read_text().splitlines())}


def teacher_checkpoint(cfg, folder: Path, name: str) -> str:
    """Where the job's teacher ``name`` is: the checkpoint its config reused, or the one it wrote."""
    source = cfg.teachers.get(name)
    return source.checkpoint if source and source.checkpoint else str(Path(folder) / f"teacher_{name}" / "best.pt")


def committee_rows(folder: Path, cfg, prepared_of, fitted: dict[str, float]) -> list[dict]:
    """The committee's own prediction on valid and test, with equal weights and with the
    weights the job fitted (``fitted``: ``DistillResult.committee_weights``)."""
    prepared = prepared_of(cfg)
    names = list(cfg.distill.teachers)
    teachers = [load_checkpoint(teacher_checkpoint(cfg, folder, n), prepared).eval() for n in names]
    fitted = torch.tensor([fitted[n] for n in names])
    rows = []
    for label, weights in (("equal", torch.full((len(names),), 1 / len(names))), ("valid", fitted)):
        model = CommitteeMean(teachers, weights)
        valid = evaluate(model, prepared.data, "valid", cfg.train.eval_batch_size)
        test = evaluate(model, prepared.data, "test", cfg.train.eval_batch_size)
        rows.append({"model": f"committee ({label} weights)", "role": "committee",
                     "weights": dict(zip(names, [round(w, 4) for w in weights.tolist()])),
                     "valid_mse": valid["mse"], "test_mse": test["mse"],
                     **{f"test_{k}": test[k] for k in SLICES}})  # fmt: skip
    return rows


def run(args) -> None:
    from features.batches import prepare

    out = Path(args.out)
    done = done_keys(out)
    runs = Path(args.runs)
    for split in args.splits:
        for seed in args.seeds:
            base = [f"data.split={split}", f"data.seed={seed}", f"train.seed={seed}",
                    "train.progress=false", f"tracking.local_dir={runs / 'mlflow'}", *args.overrides]  # fmt: skip
            cfg = load_config("default", base)
            folder = None
            if (split, seed, cfg.distill.method) not in done:
                timer = Timer(args.quiet)
                result = run_job(cfg, output_dir=runs / f"{split}-{seed}", say=timer)
                folder = result.output_dir
                rows = [dict(r) for r in result.rows]
                for row in rows:
                    row["fit_seconds"] = timer.seconds.get(row["model"]) if row["role"] != "distilled" else None
                rows[-1]["valid_mse"] = result.distill.valid["mse"]
                rows[-1]["committee_weights"] = result.distill.committee_weights
                rows[-1]["fit_seconds"] = round(sum(h.get("seconds", 0) for h in result.distill.history), 1)
                rows += committee_rows(folder, cfg, lambda c: prepare(c.data), result.distill.committee_weights)
                write(out, split, seed, cfg.distill.method, rows, str(folder))
            folder = folder or latest_folder(out, split, seed, cfg.distill.method)
            for spec in args.methods:
                method, _, variant = spec.partition(":")  # diverse_distill:tied
                teachers = args.teachers or list(cfg.distill.teachers)
                job = spec if args.weights == "equal" else f"{spec}@{args.weights}"  # ld@valid
                job = job if not args.teachers else f"{job}[{','.join(teachers)}]"
                job = job if args.holdout is None else f"{job}+holdout{args.holdout:g}"
                job = job if args.oof is None else f"{job}+oof{args.oof}"
                job = job if args.tag is None else f"{job}+{args.tag}"
                if (split, seed, job) in done:
                    continue
                reuse = ["teachers={}"] if args.teachers else []  # the job's sections of teachers left out go
                if args.holdout is not None:  # teachers fitted without the held-out rows, in the method's own job
                    reuse += ["distill.importance_fit=holdout", f"distill.holdout_share={args.holdout}"]
                elif args.oof is not None:  # each teacher fitted once per fold, in the method's own job
                    reuse += ["distill.importance_fit=oof", f"distill.oof_folds={args.oof}"]
                else:
                    if not Path(folder).is_dir():  # runs/ is not kept: refit the first job's teachers
                        folder = rebuild(cfg, base, teachers, out, split, seed, runs, args.quiet)
                    reuse += [f"teachers.{n}.checkpoint={teacher_checkpoint(cfg, folder, n)}" for n in teachers]
                other = load_config("default", base + reuse + [f"distill.method={method}", "student_alone=false",
                                                               f"distill.committee_weights={args.weights}",
                                                               f"distill.teachers=[{','.join(teachers)}]",
                                                               *([f"distill.variant={variant}"] if variant else [])])  # fmt: skip
                timer = Timer(args.quiet)
                job_root = runs / f"{split}-{seed}-{job}"
                planted = plant_folds(out, split, seed, args.oof, teachers, job_root / other.name) if args.oof else None
                result = run_job(other, output_dir=job_root, say=timer, resume=planted or False)
                rows = [dict(r) for r in result.rows if r["role"].startswith("distilled")]
                rows[-1]["valid_mse"] = result.distill.valid["mse"]
                rows[-1]["fit_seconds"] = round(sum(h.get("seconds", 0) for h in result.distill.history), 1)
                rows[-1]["teachers"] = teachers
                if variant:
                    rows[-1]["role"] = f"{rows[-1]['role']} {variant}"
                if args.weights != "equal":
                    rows[-1]["role"] = f"{rows[-1]['role']} @{args.weights} weights"
                    rows[-1]["committee_weights"] = result.distill.committee_weights
                if args.teachers:
                    rows[-1]["role"] = f"{rows[-1]['role']} [{'+'.join(teachers)}]"
                if args.tag:
                    rows[-1]["role"] = f"{rows[-1]['role']} +{args.tag}"
                    rows[-1]["overrides"] = args.overrides
                if args.holdout is not None or args.oof is not None:
                    fit = f"holdout {args.holdout:g}" if args.holdout is not None else f"oof x{args.oof}"
                    rows[-1]["role"] = f"{rows[-1]['role']} {fit}"
                    rows[-1]["teacher_rows"] = {r["model"]: r["test_mse"] for r in result.rows
                                                if r["role"].startswith("teacher")}  # fmt: skip
                importance = {k: v for k, v in result.distill.history[-1].items() if k.startswith("importance_")}
                if importance:
                    rows[-1]["importance_last_epoch"] = importance
                rows[-1]["teacher_passes"] = result.distill.teacher_passes.get("all")
                write(out, split, seed, job, rows, str(result.output_dir))


def rebuild(cfg, base: list[str], teachers: list[str], out: Path, split: str, seed: int, runs: Path,
            quiet: bool) -> str:  # fmt: skip
    """Refit the teachers ``teachers`` of the first job of ``(split, seed)`` whose folder is gone
    (``runs/`` lives outside git), so the other methods reuse them: a job of those teachers
    alone (each from its own ``train.seed``, as in the full committee), without the student
    alone; the recorded line is kept, and each refitted teacher's test MSE is compared with it
    (the same seeds give the same teachers)."""
    recorded = {r["model"]: r["test_mse"] for line in map(json.loads, out.read_text().splitlines())
                if (line["split"], line["seed"], line["job"]) == (split, seed, cfg.distill.method)
                for r in line["rows"] if r["role"].startswith("teacher")}  # fmt: skip
    for earlier in sorted((runs / f"{split}-{seed}" / cfg.name).glob("2*"), reverse=True):  # refitted before
        if all((earlier / f"teacher_{n}" / "best.pt").is_file() for n in teachers):
            return str(earlier)
    kept = {name: dataclasses.asdict(source) for name, source in cfg.teachers.items() if name in teachers}
    only = [f"teachers={json.dumps(kept)}", f"distill.teachers=[{','.join(teachers)}]", "student_alone=false"]
    result = run_job(load_config("default", base + only), output_dir=runs / f"{split}-{seed}", say=Timer(quiet))
    for row in result.rows:
        if row["model"] in recorded:
            drift = row["test_mse"] - recorded[row["model"]]
            print(f"refit {split} seed {seed} {row['model']}: test MSE {row['test_mse']:.6f}, "
                  f"recorded {recorded[row['model']]:.6f} ({drift:+.2e})", flush=True)
    return str(result.output_dir)


def plant_folds(out: Path, split: str, seed: int, folds: int, teachers: list[str], root: Path) -> str | None:
    """A new run folder under ``root`` holding the fold models an earlier ``--oof`` job of
    ``(split, seed)`` fitted (the same folds, seeds and data: the job checks each fold's marker),
    so the job reuses them under ``--resume`` instead of fitting ``folds`` models of each teacher
    again; its name, or None when no earlier job left them."""
    for line in map(json.loads, out.read_text().splitlines()) if out.is_file() else []:
        source = Path(line["folder"])
        if ((line["split"], line["seed"]) != (split, seed) or f"+oof{folds}" not in line["job"]
                or not all((source / f"teacher_{n}" / f"fold{j}" / "best.pt").is_file()
                           for n in teachers for j in range(folds))):  # fmt: skip
            continue
        folder = root / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        for n in teachers:
            for j in range(folds):
                (folder / f"teacher_{n}" / f"fold{j}").mkdir(parents=True, exist_ok=True)
                os.link(source / f"teacher_{n}" / f"fold{j}" / "best.pt", folder / f"teacher_{n}" / f"fold{j}" / "best.pt")
        print(f"{split} seed {seed}: the fold models of {source} reused", flush=True)
        return folder.name
    return None


def latest_folder(out: Path, split: str, seed: int, job: str) -> str:
    for r in map(json.loads, out.read_text().splitlines()):
        if (r["split"], r["seed"], r["job"]) == (split, seed, job):
            return r["folder"]
    raise KeyError((split, seed, job))


def write(out: Path, split: str, seed: int, job: str, rows: list[dict], folder: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    load = [round(x, 2) for x in os.getloadavg()]
    with out.open("a") as f:
        f.write(json.dumps({"split": split, "seed": seed, "job": job, "folder": folder, "load": load,
                            "rows": rows}) + "\n")  # fmt: skip


def report(path: Path, peers: Path | None) -> str:
    """Markdown tables: test MSE per model, mean ± spread over seeds, per split; the peers'
    lines beside them."""
    cells: dict[tuple[str, str], dict[int, dict]] = {}
    for line in map(json.loads, path.read_text().splitlines()):
        for row in line["rows"]:
            role = row["role"]
            key = (f"{row['model']} alone" if role == "student alone"
                   else f"{row['model']} <- {role}" if role.startswith("distilled") else row["model"])  # fmt: skip
            cells.setdefault((line["split"], key), {})[line["seed"]] = row
    if peers and peers.is_file():
        for r in map(json.loads, peers.read_text().splitlines()):
            row = {"test_mse": r["test"]["mse"], "valid_mse": r["valid"]["mse"], "fit_seconds": r["fit_seconds"],
                   **{f"test_{k}": r["test"].get(k) for k in SLICES}}  # fmt: skip
            cells.setdefault((r["split"], f"peer: {r['peer']}"), {})[r["seed"]] = row
    lines = []
    for split in ("random", "temporal"):
        keys = [k for (s, k) in cells if s == split]
        if not keys:
            continue
        seeds = sorted({seed for (s, _), by in cells.items() if s == split for seed in by})
        lines += [f"### {split} split", "",
                  "| model | " + " | ".join(f"test MSE seed {s}" for s in seeds) + " | mean ± sd | valid MSE (mean) "
                  "| cold items | fit s (seed 0) |",
                  "|---|" + "---|" * len(seeds) + "---|---|---|---|"]  # fmt: skip
        for key in sorted(keys, key=lambda k: statistics.mean(r["test_mse"] for r in cells[(split, k)].values())):
            lines.append(table_line(key, cells[(split, key)], seeds))
        lines.append("")
    return "\n".join(lines)


def table_line(key: str, by: dict[int, dict], seeds: list[int]) -> str:
    tests = [by[s]["test_mse"] if s in by else None for s in seeds]
    have = [t for t in tests if t is not None]
    spread = f"{statistics.mean(have):.4f} ± {statistics.stdev(have):.4f}" if len(have) > 1 else f"{have[0]:.4f}"
    valids = [r["valid_mse"] for r in by.values() if r.get("valid_mse") is not None]
    colds = [r["test_mse_item_cold"] for r in by.values() if r.get("test_mse_item_cold") is not None]
    fit = by.get(seeds[0], {}).get("fit_seconds")
    cells = [key, *("" if t is None else f"{t:.4f}" for t in tests), spread,
             f"{statistics.mean(valids):.4f}" if valids else "", f"{statistics.mean(colds):.4f}" if colds else "",
             "" if fit is None else str(fit)]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", nargs="+", default=["random"], choices=["random", "temporal"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=["mt"],
                        help="other methods from the same teachers; METHOD:VARIANT sets distill.variant "
                             "(diverse_distill:tied)")  # fmt: skip
    parser.add_argument("--teachers", nargs="*", help="the other methods' committee: a subset of the job's "
                        "teachers (default all of them)")  # fmt: skip
    parser.add_argument("--holdout", type=float, metavar="SHARE",
                        help="the other methods fit DiverseDistill's module on a held-out SHARE of the "
                             "training rows (distill.importance_fit: holdout): each job fits its own "
                             "teachers on the rest instead of reusing the first job's")
    parser.add_argument("--oof", type=int, metavar="K",
                        help="the other methods' teachers cross-fitted in K folds (distill.importance_fit: "
                             "oof): each job fits K models of each teacher instead of reusing the first job's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--tag", help="a name for the --set overrides, appended to the job's name")
    parser.add_argument("--out", default="docs/results/committee.jsonl")
    parser.add_argument("--weights", choices=["equal", "valid"], default="equal",
                        help="the other methods' committee weights (the job itself takes its config's)")
    parser.add_argument("--runs", default="runs/bench_committee", help="where the jobs' folders go")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (1 on a busy machine: two spinning threads per job collapse)")
    parser.add_argument("--report", help="print the markdown tables of this JSONL and exit")
    parser.add_argument("--peers", default="docs/results/peers.jsonl")
    args = parser.parse_args()
    if args.holdout is not None and args.oof is not None:
        parser.error("--holdout and --oof are two ways to fit the teachers: pick one")
    if args.report:
        print(report(Path(args.report), Path(args.peers)))
        return
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
