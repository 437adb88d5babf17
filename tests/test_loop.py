"""The one training loop: loss logging, NaN checks, early stopping, checkpoints, progress, ranks.

A one-parameter model (a learned constant rating) keeps each run to a fraction of a second,
so every test pins the loop's own behaviour, not a model's.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from recdistill.training import (
    EpochCheckpoints,
    TrainConfig,
    TrainingError,
    TrainStep,
    evaluate,
    fit,
    read_checkpoint,
    read_resume,
)
from recdistill.training.progress import Progress

START = 3.5
QUICK = dict(batch_size=100, max_steps_per_epoch=2, progress=False)


class ConstantRating(nn.Module):
    """Predicts one learned rating for every row; NaN when evaluated once ``poisoned``."""

    def __init__(self, start: float = START):
        super().__init__()
        self.rating = nn.Parameter(torch.tensor(start))
        self.poisoned = False

    def forward(self, batch) -> torch.Tensor:
        if self.poisoned and not self.training:
            return torch.full((len(batch),), math.nan)
        return self.rating.expand(len(batch))


def mse_step(model: nn.Module, lr: float = 0.0) -> TrainStep:
    def losses(batch):
        return {"mse": nn.functional.mse_loss(model(batch), batch.labels)}

    return TrainStep(losses=losses, optimizers=[torch.optim.SGD(model.parameters(), lr=lr)])


def rising_step(model: ConstantRating, lr: float = 0.05) -> TrainStep:
    """Each step raises the rating by ``lr``: validation MSE gets worse every epoch after the first."""
    return TrainStep(losses=lambda batch: {"push": -model.rating},
                     optimizers=[torch.optim.SGD(model.parameters(), lr=lr)])  # fmt: skip


def test_every_loss_entry_is_logged_as_its_epoch_mean(prepared):
    model = ConstantRating()
    step = mse_step(model)  # lr 0: the rating stays at START
    base = step.losses
    step.losses = lambda batch: {**base(batch), "double": 2 * base(batch)["mse"]}
    step.epoch_metrics = lambda: {"custom": 7.0}
    cfg = TrainConfig(epochs=1, **QUICK)
    result = fit(model, prepared.data, cfg, step)
    train = prepared.data.splits["train"]
    shuffled = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + 1))]
    seen = prepared.data.labels[shuffled[: 2 * cfg.batch_size]]
    epoch = result.history[0]
    assert epoch["mse"] == pytest.approx((seen - START).square().mean().item(), rel=1e-6)
    assert epoch["double"] == pytest.approx(2 * epoch["mse"])
    assert epoch["custom"] == 7.0 and epoch["valid_mse"] == result.valid["mse"]
    assert {"seconds", "examples_per_s", "valid_mse_item_cold"} <= set(epoch)
    assert not any(key.startswith("valid_n_") for key in epoch)  # counts describe the split


def test_a_nan_loss_entry_stops_the_run_before_the_update(prepared):
    model = ConstantRating()
    step = rising_step(model)
    calls = []

    def losses(batch):
        calls.append(model.rating.item())
        return {"push": -model.rating, "bad": torch.tensor(math.nan if len(calls) == 3 else 0.0)}

    step.losses = losses
    with pytest.raises(TrainingError, match=r"bad is nan at epoch 2, step 1 \(global step 3\)"):
        fit(model, prepared.data, TrainConfig(epochs=3, **QUICK), step)
    assert model.rating.item() == calls[-1]  # the NaN step changed nothing


def test_a_nan_loss_names_every_loss_term_and_keeps_the_last_good_resume_checkpoint(prepared, tmp_path):
    model = ConstantRating()
    step = rising_step(model)
    calls = []

    def losses(batch):
        calls.append(model.rating.item())
        bad = len(calls) == 4  # epoch 2, step 2
        return {"push": -model.rating, "bad": torch.tensor(math.nan if bad else 0.0),
                "worse": torch.tensor(math.inf if bad else 0.0)}  # fmt: skip

    step.losses = losses
    cfg = TrainConfig(epochs=3, checkpoint_every_steps=1, **QUICK)
    checkpoints = EpochCheckpoints(tmp_path, "constant", {"start": START})
    with pytest.raises(TrainingError) as caught:
        fit(model, prepared.data, cfg, step, checkpoints=checkpoints)
    message = str(caught.value)
    assert message.startswith("bad is nan at epoch 2, step 2 (global step 4)")
    assert f"resume from {checkpoints.resume} (epoch 2, step 1)" in message
    assert message.endswith(f"the loss terms at that step: push {-calls[-1]:.6g}, bad nan, worse inf")
    kept = read_resume(checkpoints.resume, cfg)
    assert (kept["position"]["epoch"], kept["position"]["step"]) == (2, 1)
    assert kept["model"]["rating"].item() == calls[-1]  # the state before the bad step


def test_checkpoint_and_progress_intervals_must_be_positive():
    for name in ("checkpoint_every_steps", "progress_every_steps"):
        with pytest.raises(ValueError, match=f"train.{name} must be at least 1 or null, got 0"):
            TrainConfig(**{name: 0})


def test_a_nan_validation_mse_stops_the_run_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    model = ConstantRating()

    def poison(epoch, metrics):
        model.poisoned = True

    checkpoints = EpochCheckpoints(tmp_path, "constant", {"start": START})
    pattern = (r"validation mse is nan after the last step, at epoch 2, step 2 \(global step 4\); "
               r"last good checkpoint .*last\.pt \(epoch 1\), best .*best\.pt \(epoch 1\)")  # fmt: skip
    with pytest.raises(TrainingError, match=pattern):
        fit(model, prepared.data, TrainConfig(epochs=3, **QUICK), rising_step(model),
            checkpoints=checkpoints, on_epoch=poison)  # fmt: skip
    for path in (checkpoints.best, checkpoints.last):
        payload = read_checkpoint(path)
        assert payload["extra"]["epoch"] == 1 and math.isfinite(payload["extra"]["valid"]["mse"])


def test_patience_stops_the_run_and_restores_the_best_epoch(prepared):
    model = ConstantRating()
    result = fit(model, prepared.data, TrainConfig(epochs=5, patience=2, **QUICK), rising_step(model))
    assert len(result.history) == 3 and result.best_epoch == 1 and result.stopped_early
    assert model.rating.item() == pytest.approx(START + 2 * 0.05)  # epoch 1: two steps of 0.05
    assert result.valid["mse"] == pytest.approx(result.history[0]["valid_mse"])


def test_best_and_last_checkpoints_are_written_after_every_epoch(prepared, tmp_path):
    model = ConstantRating()
    checkpoints = EpochCheckpoints(tmp_path, "constant", {"start": START}, extra={"note": "all"},
                                   last_extra=lambda: {"resume": model.rating.item()})  # fmt: skip
    result = fit(model, prepared.data, TrainConfig(epochs=5, patience=2, **QUICK), rising_step(model),
                 checkpoints=checkpoints)  # fmt: skip
    best, last = read_checkpoint(checkpoints.best), read_checkpoint(checkpoints.last)
    assert result.checkpoint == checkpoints.best
    assert (best["extra"]["epoch"], last["extra"]["epoch"]) == (1, 3)
    assert best["state_dict"]["rating"].item() == pytest.approx(START + 2 * 0.05)
    assert last["extra"]["resume"] == pytest.approx(START + 6 * 0.05) and "resume" not in best["extra"]
    assert best["extra"]["note"] == last["extra"]["note"] == "all"
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, nothing half-done left


# ---------------------------------------------------------------- progress


def test_progress_in_a_log_is_plain_lines_one_per_epoch(prepared, capsys):
    model = ConstantRating()
    cfg = TrainConfig(epochs=3, batch_size=100, max_steps_per_epoch=10, progress=True,
                      progress_every_steps=4)  # fmt: skip
    fit(model, prepared.data, cfg, mse_step(model), desc="constant")
    err = capsys.readouterr().err  # captured: not a terminal
    assert "\r" not in err
    lines = err.splitlines()
    for epoch in (1, 2, 3):
        ends = [line for line in lines if line.startswith(f"constant epoch {epoch}/3:")]
        assert len(ends) == 1 and re.search(r"mse \d+\.\d{4}, valid_mse \d+\.\d{4}; [\d,]+ rows/s", ends[0])
        steps = [line for line in lines if line.startswith(f"constant epoch {epoch}/3 step")]
        assert [line.split()[4] for line in steps] == ["4/10:", "8/10:"]
    assert len(lines) == 3 * 3


def test_progress_on_a_terminal_is_a_bar():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = Progress(TrainConfig(epochs=1), steps_per_epoch=4, desc="m", stream=stream)
    progress.start_epoch(1)
    for number in range(1, 5):
        progress.step(number, {"loss": 1.0}, rows_per_s=10.0)
    progress.end_epoch({"loss": 1.0}, {"valid_mse": 1.0}, rows_per_s=10.0, seconds=1.0)
    assert "\r" in stream.getvalue() and "m epoch 1" in stream.getvalue()


# ---------------------------------------------------------------- two ranks


def _rank_main(rank: int, init_file: str, out: str) -> None:
    """One of two gloo ranks: a 1-epoch fit at lr 0 (ranks keep equal weights) with checkpoints,
    rows recorded; then an attempt to resume."""
    import torch.distributed as dist

    from features.batches import prepare

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    prepared = prepare()
    model = ConstantRating()
    step = mse_step(model)
    rows, base = [], step.losses

    def losses(batch):
        rows.append(batch.rows.tolist())
        return base(batch)

    step.losses = losses
    checkpoints = EpochCheckpoints(Path(out, "checkpoints"), "constant", {"start": START})
    cfg = TrainConfig(epochs=1, checkpoint_every_steps=1, **QUICK)
    result = fit(model, prepared.data, cfg, step, checkpoints=checkpoints)
    try:
        fit(model, prepared.data, cfg, step, resume_from=checkpoints.last)
        refused = ""
    except ValueError as err:
        refused = str(err)
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"rows": rows, "history": result.history, "valid": result.valid, "refused": refused}))  # fmt: skip
    dist.barrier()  # neither rank tears gloo down while the other still uses it
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    torch.multiprocessing.spawn(_rank_main, args=(str(out / "init"), str(out)), nprocs=2)
    return [{**json.loads((out / f"rank{r}.json").read_text()), "out": str(out)} for r in range(2)]


@pytest.mark.slow
def test_two_ranks_split_every_global_batch_between_them(prepared, two_ranks):
    cfg = TrainConfig(epochs=1, **QUICK)
    train = prepared.data.splits["train"]
    shuffled = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + 1))]
    for number, global_rows in enumerate(shuffled.split(cfg.batch_size)[:2]):
        halves = [two_ranks[rank]["rows"][number] for rank in range(2)]
        assert halves[0] + halves[1] == global_rows.tolist()
        assert len(halves[0]) == len(halves[1])


@pytest.mark.slow
def test_two_ranks_report_the_metrics_of_one_process(prepared, two_ranks):
    model = ConstantRating()
    single = fit(model, prepared.data, TrainConfig(epochs=1, **QUICK), mse_step(model))
    for rank in range(2):
        assert two_ranks[rank]["history"][0]["mse"] == pytest.approx(single.history[0]["mse"])
        for key, value in evaluate(model, prepared.data, "valid").items():  # slices included
            assert two_ranks[rank]["valid"][key] == pytest.approx(value, nan_ok=True), key


@pytest.mark.slow
def test_two_ranks_write_the_epoch_checkpoints_and_a_distributed_resume_checkpoint(two_ranks):
    folder = Path(two_ranks[0]["out"], "checkpoints")
    assert (folder / "best.pt").is_file() and (folder / "last.pt").is_file()
    assert not (folder / "resume.pt").exists()  # one file cannot hold every rank's state
    assert (folder / "resume_dcp" / "latest").is_file()  # torch.distributed.checkpoint's folder
    for rank in range(2):  # a single-process file is refused under a process group
        assert two_ranks[rank]["refused"].startswith("resume_from: resuming is single-process only")
