"""Resuming a run from ``resume.pt``: it ends exactly as the run that was never stopped.

In process, a run is "killed" right after one of its mid-epoch resume checkpoints is written
(the writer raises), then continued by fresh objects; across processes, a real SIGKILL. Small
models (the sizes of ``tests/test_distill_trainer.py``) and short epochs keep each run to a
second or two.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recdistill.distill import DistillConfig
from recdistill.distill.config import GatingConfig
from recdistill.distill.trainer import distill
from recdistill.models import build_model
from recdistill.training import TrainConfig, read_resume, train_supervised
from recdistill.training import loop as loop_module

STUDENT = {"id_embedding_dim": 16, "side_embedding_dim": 4, "hidden": [32, 16], "dropout": 0.1}
TEACHER = {"id_embedding_dim": 24, "side_embedding_dim": 8, "hidden": [64, 40]}
#: 3 epochs of 5 steps, resume.pt every 3 global steps: written at epoch 1 step 3, end of epoch
#: 1, epoch 2 step 1, epoch 2 step 4, end of epoch 2, epoch 3 step 2, end of epoch 3.
CFG = TrainConfig(epochs=3, batch_size=512, max_steps_per_epoch=5, checkpoint_every_steps=3,
                  patience=3, progress=False)  # fmt: skip
#: Timings differ between runs; everything else must not.
TIMINGS = ("seconds", "examples_per_s")


class Killed(Exception):
    """Stands for the process dying."""


def die_after_resume_writes(monkeypatch, writes: int) -> None:
    """Let the loop write ``resume.pt`` ``writes`` times, then "kill" the run right after."""
    write = loop_module.write_atomically
    done = []

    def writer(payload, path):
        write(payload, path)
        done.append(path)
        if len(done) == writes:
            raise Killed

    monkeypatch.setattr(loop_module, "write_atomically", writer)


def comparable(history: list[dict[str, float]]) -> list[dict[str, float | None]]:
    """The history without timings, NaN (an empty slice) as None so that == compares bitwise."""
    return [{k: None if v != v else v for k, v in epoch.items() if k not in TIMINGS}
            for epoch in history]  # fmt: skip


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def assert_same_metrics(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for key in a:  # bitwise: == on floats, NaN (an empty slice) only against NaN
        assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key


def student(prepared) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mlp_s", prepared, STUDENT)


# ---------------------------------------------------------------- in process


def supervised(prepared, checkpoint_dir, resume_from=None):
    model = student(prepared)
    cfg = TrainConfig(**{**CFG.__dict__, "checkpoint_dir": str(checkpoint_dir)})
    return model, train_supervised(model, prepared, cfg, resume_from=resume_from)


def test_a_supervised_run_resumed_mid_epoch_ends_bitwise_as_the_uninterrupted_one(
    prepared, tmp_path, monkeypatch
):  # fmt: skip
    whole_model, whole = supervised(prepared, tmp_path / "whole")
    die_after_resume_writes(monkeypatch, 3)
    with pytest.raises(Killed):
        supervised(prepared, tmp_path / "killed")
    monkeypatch.undo()
    resume = tmp_path / "killed" / "resume.pt"
    position = read_resume(resume, CFG)["position"]
    assert (position["epoch"], position["step"], position["rows"]) == (2, 1, CFG.batch_size)
    resumed_model, resumed = supervised(prepared, tmp_path / "killed", resume_from=resume)
    assert_same_weights(whole_model, resumed_model)
    assert comparable(resumed.history) == comparable(whole.history)
    assert_same_metrics(resumed.valid, whole.valid)
    assert_same_metrics(resumed.test, whole.test)
    assert resumed.best_epoch == whole.best_epoch


def distilled(prepared, teacher, config, checkpoint_dir, resume_from=None):
    train = TrainConfig(**{**CFG.__dict__, "checkpoint_dir": str(checkpoint_dir)})
    return distill(student(prepared), [("t", teacher)], prepared, config, train,
                   resume_from=resume_from)  # fmt: skip


@pytest.fixture(scope="module")
def teacher(prepared):
    torch.manual_seed(1)
    return build_model("mlp_l", prepared, TEACHER).eval()


@pytest.mark.parametrize("config", [
    # a learned module, and a gate that draws explored rows from its own generator from step 2
    DistillConfig(method="diverse_distill", gating=GatingConfig(enabled=True, threshold=0.5,
                                                                warmup_steps=2, explore=0.3)),
    DistillConfig(method="ld"),  # the teacher-output cache, rebuilt after the resume
    DistillConfig(method="autoskd"),  # a reward still to collect, the draws' generator
    DistillConfig(method="sckd"),  # the counts of steps that used the KD term
], ids=["diverse_distill", "ld", "autoskd", "sckd"])  # fmt: skip
def test_a_distillation_resumed_mid_epoch_ends_bitwise_as_the_uninterrupted_one(
    prepared, teacher, config, tmp_path, monkeypatch
):  # fmt: skip
    whole = distilled(prepared, teacher, config, tmp_path / "whole")
    die_after_resume_writes(monkeypatch, 3)
    with pytest.raises(Killed):
        distilled(prepared, teacher, config, tmp_path / "killed")
    monkeypatch.undo()
    resumed = distilled(prepared, teacher, config, tmp_path / "killed",
                        resume_from=tmp_path / "killed" / "resume.pt")  # fmt: skip
    assert_same_weights(whole.student, resumed.student)
    assert_same_weights(whole.distiller, resumed.distiller)  # the module too
    assert comparable(resumed.history) == comparable(whole.history)
    assert_same_metrics(resumed.valid, whole.valid)
    assert_same_metrics(resumed.test, whole.test)
    assert resumed.teacher_passes == whole.teacher_passes and resumed.steps == whole.steps
    if config.method == "diverse_distill":
        assert whole.teacher_passes["all"]["saved"] > 0  # the gate drew rows


def test_resuming_a_finished_run_gives_its_result_again(prepared, tmp_path):
    model, first = supervised(prepared, tmp_path)
    again_model, again = supervised(prepared, tmp_path, resume_from=tmp_path / "resume.pt")
    assert_same_weights(model, again_model)
    assert comparable(again.history) == comparable(first.history)
    assert_same_metrics(again.test, first.test)


def test_a_resume_checkpoint_of_other_batches_is_refused_naming_the_field(prepared, tmp_path):
    supervised(prepared, tmp_path)
    other = TrainConfig(**{**CFG.__dict__, "batch_size": 256})
    with pytest.raises(ValueError, match=r"train\.batch_size = 512, now 256"):
        train_supervised(student(prepared), prepared, other, resume_from=tmp_path / "resume.pt")


# ---------------------------------------------------------------- a real SIGKILL

CHILD = """
import json, sys
import torch
torch.set_num_threads(1)
from features.batches import prepare
from recdistill.models import build_model
from recdistill.training import TrainConfig, train_supervised
checkpoint_dir, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "resume"
prepared = prepare()
torch.manual_seed(0)
model = build_model("mlp_s", prepared, %(student)r)
cfg = TrainConfig(epochs=2, batch_size=256, max_steps_per_epoch=40, checkpoint_every_steps=5,
                  progress=False, checkpoint_dir=checkpoint_dir)
result = train_supervised(model, prepared, cfg,
                          resume_from=checkpoint_dir + "/resume.pt" if resume else None)
def plain(metrics):  # NaN (an empty slice) as None, so that equal files mean equal metrics
    return {k: None if v != v else v for k, v in metrics.items()
            if k not in ("seconds", "examples_per_s")}
json.dump({"history": [plain(e) for e in result.history], "test": plain(result.test),
           "valid": plain(result.valid)}, open(out, "w"))
""" % {"student": STUDENT}


def child(checkpoint_dir: Path, out: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(checkpoint_dir), str(out), mode],
                            env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_a_run_killed_with_sigkill_mid_epoch_and_resumed_ends_as_the_uninterrupted_one(tmp_path):
    whole = child(tmp_path / "whole", tmp_path / "whole.json", "fresh")
    finish(whole)

    killed = child(tmp_path / "killed", tmp_path / "unused.json", "fresh")
    resume = tmp_path / "killed" / "resume.pt"
    while not resume.exists() and killed.poll() is None:
        time.sleep(0.005)
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    position = read_resume(resume, TrainConfig(batch_size=256, max_steps_per_epoch=40))["position"]
    assert position["step"] > 0  # the state of a run killed mid-epoch

    finish(child(tmp_path / "killed", tmp_path / "resumed.json", "resume"))
    expected = json.loads((tmp_path / "whole.json").read_text())
    got = json.loads((tmp_path / "resumed.json").read_text())
    assert got == expected  # JSON floats round-trip exactly: equal means bitwise
