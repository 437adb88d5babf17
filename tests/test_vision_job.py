"""The vision job end to end on real Fashion-MNIST, through the one job engine of
``recdistill run`` (resume after a kill, MLflow parent and nested runs, registration and
promotion on validation accuracy), and one distillation loop for images and ratings."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vision_ext.data import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"Fashion-MNIST is not in {FASHION_MNIST_DIR} (make setup installs dataset-fashion-mnist as root)",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from pipelines.engine import run_job
    from pipelines.vision_config import load_vision_config

    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST is not in {FASHION_MNIST_DIR}")
    out = tmp_path_factory.mktemp("vision")
    cfg = load_vision_config("vision_quick")
    return run_job(cfg, tracking_uri=f"sqlite:///{out}/mlflow.db", output_dir=out / "runs",
                   say=lambda line: None), out  # fmt: skip


@needs_fashion_mnist
def test_vision_quick_trains_both_teachers_the_student_alone_and_distilled(quick_run):
    result, _ = quick_run
    assert [(r["model"], r["role"]) for r in result.rows] == [
        ("vit_l", "teacher"), ("clip", "teacher"), ("student", "student alone"),
        ("student", "distilled (diverse_distill)")]  # fmt: skip
    assert all(0.1 <= r["test_accuracy"] <= 1.0 for r in result.rows)  # 10 classes: chance is 0.1
    assert result.rows[-1]["params"] == result.rows[2]["params"] < result.rows[0]["params"]
    distilled = result.tests["distilled (diverse_distill) student"]
    assert {k.removeprefix("accuracy_") for k in distilled if k.startswith("accuracy_")} == {
        "t_shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"}
    assert "Test accuracy per class" in (result.output_dir / "results.md").read_text()


@needs_fashion_mnist
def test_the_exported_student_loads_with_torch_alone_and_gives_the_models_logits(quick_run):
    result, _ = quick_run
    assert result.export.passed and result.export.max_abs_diff < 1e-4
    code = ("import sys, torch; m = torch.jit.load(sys.argv[1]); y = m(torch.zeros(3, 1, 28, 28)); "
            "print(tuple(y.shape), sorted({n.split('.')[0] for n in sys.modules} & {'transformers', 'recdistill', 'vision_ext'}))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(result.export.path)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "(3, 10) []"


@needs_fashion_mnist
def test_mlflow_holds_a_parent_run_with_a_nested_run_per_model_and_the_student_file(quick_run):
    from mlflow.tracking import MlflowClient

    result, out = quick_run
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    parent = client.get_run(result.run_id)
    assert parent.data.metrics["export_parity"] < 1e-4
    assert parent.data.tags["task.monitor"] == "accuracy" and parent.data.tags["task.higher_is_better"] == "true"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.run_id}'")  # fmt: skip
    roles = sorted(c.data.tags["role"] for c in children)
    assert roles == ["distilled", "student alone", "teacher", "teacher"]
    for child in children:
        assert 0.0 < child.data.metrics["test_accuracy"] <= 1.0
        assert "test_accuracy_ankle_boot" in child.data.metrics
    assert [a.path for a in client.list_artifacts(result.run_id, "export")] == ["export/student.pt"]


@needs_fashion_mnist
def test_a_vision_student_that_does_not_beat_its_student_alone_on_valid_accuracy_is_not_promoted(quick_run):
    """The quick job's distilled student is below its student alone on valid accuracy: it is
    registered, and the champion rule (the task's accuracy, higher is better) keeps it out."""
    result, _ = quick_run
    assert result.distill.valid["accuracy"] < result.student_alone_valid["accuracy"]
    assert result.version == "1" and not result.decision.promoted
    assert result.decision.metric == "test_accuracy" and result.decision.baseline_metric == "valid_accuracy"
    assert result.decision.beats_baseline is False and result.champion_file is None
    assert "valid_accuracy" in result.decision.reason and "baseline" in result.decision.reason


#: The unfinished run folder a planted student alone lies in.
PLANTED = "20260101-000000"


@needs_fashion_mnist
@pytest.mark.filterwarnings("ignore:'torch.load' received a zip file:UserWarning")  # mlflow's load of TorchScript
def test_a_vision_student_that_beats_its_student_alone_on_valid_accuracy_is_promoted(quick_run):
    """Against a student alone that answers one class for every image (accuracy 0.1), planted
    where ``--resume`` finds it, the distilled student beats its baseline on valid accuracy and
    becomes the champion: its file is the job's ``champion.pt`` and the registry serves it."""
    import mlflow

    from pipelines.domains.images import ImagesDomain
    from pipelines.engine import run_job
    from pipelines.vision_config import load_vision_config
    from recdistill.training import save_checkpoint

    first, out = quick_run
    teachers = [f"teachers.{name}.checkpoint={first.output_dir / f'teacher_{name}'}" for name in ("vit_l", "clip")]
    cfg = load_vision_config("vision_quick", teachers)
    domain = ImagesDomain(cfg)
    student = domain.build("student", domain.load(cfg))
    for parameter in student.parameters():
        parameter.data.zero_()  # equal logits: every image is class 0
    save_checkpoint(out / "runs" / cfg.name / PLANTED / "student_alone" / "best.pt", student,
                    student.model_name, student.config)  # fmt: skip
    result = run_job(cfg, tracking_uri=f"sqlite:///{out}/mlflow.db", resume=PLANTED,
                     output_dir=out / "runs", say=lambda line: None)  # fmt: skip
    assert result.student_alone_valid["accuracy"] == pytest.approx(0.1, abs=0.05)
    assert result.distill.valid["accuracy"] > result.student_alone_valid["accuracy"]
    assert result.decision.promoted and result.decision.beats_baseline and result.version == "2"
    assert result.champion_file.read_bytes() == result.export.path.read_bytes()
    served = mlflow.pytorch.load_model(f"models:/{cfg.tracking.registered_model}@champion")
    images = torch.zeros(2, 1, 28, 28)
    torch.testing.assert_close(served(images), torch.jit.load(str(result.export.path))(images), rtol=0, atol=0)


# ---------------------------------------------------------------- a real SIGKILL, then --resume


def vision_job(output: Path, *more: str) -> subprocess.Popen:
    """``recdistill vision run vision_quick`` in a process of one thread, without MLflow nor the
    student alone, from the CLIP teacher alone, 8 steps a model, saving its state every 2 steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    settings = ["tracking.enabled=false", "student_alone=false", "distill.teachers=[clip]",
                "train.max_steps_per_epoch=8", "train.checkpoint_every_steps=2"]  # fmt: skip
    cmd = [sys.executable, "-m", "pipelines.cli", "vision", "run", "vision_quick", "--output", str(output),
           *(arg for setting in settings for arg in ("--set", setting)), *more]  # fmt: skip
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]


def outcome(output: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The finished run's results table and its distilled student's weights."""
    run = output / "vision_quick" / "latest"
    return (run / "results.md").read_text(), torch.load(run / "student" / "best.pt", weights_only=False)["state_dict"]


@pytest.mark.slow
@needs_fashion_mnist
def test_a_vision_job_killed_with_sigkill_mid_distillation_and_resumed_ends_as_the_uninterrupted_one(tmp_path):
    finish(vision_job(tmp_path / "whole"))

    killed = vision_job(tmp_path / "killed")
    resume = None
    while killed.poll() is None:  # the distilled student's state, written mid-epoch
        found = list((tmp_path / "killed").glob("vision_quick/*/student/resume.pt"))
        if found:
            resume = found[0]
            break
        time.sleep(0.005)
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL and resume is not None, "the job finished before it was killed"
    assert not (resume.parent.parent / "results.md").exists()

    finish(vision_job(tmp_path / "killed", "--resume"))
    table, weights = outcome(tmp_path / "killed")
    expected_table, expected_weights = outcome(tmp_path / "whole")
    assert table == expected_table
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[k], expected_weights[k]) for k in weights)  # bitwise


@needs_fashion_mnist
def test_one_distillation_loop_takes_a_step_on_real_images_and_on_movielens(prepared):
    """The same ``distill`` (DiverseDistill, gating on) on a Fashion-MNIST batch with ViT models
    and on an ML-100K batch with TorchRec models."""
    from recdistill.distill import DistillConfig
    from recdistill.distill.trainer import distill
    from recdistill.models import build_model
    from recdistill.training import TrainConfig, seed_everything
    from vision_ext.data import VisionDataConfig, load_vision_data
    from vision_ext.models import build_vision_model

    one_step = TrainConfig(epochs=1, batch_size=32, eval_batch_size=4096, max_steps_per_epoch=1, progress=False)
    config = DistillConfig(method="diverse_distill", teachers=["big"])
    seed_everything(0)
    images = load_vision_data(VisionDataConfig(train_limit=64, valid_fraction=0.01))
    tiny = {"patch_size": 7, "hidden_size": 16, "num_layers": 2, "num_heads": 2}
    on_images = distill(build_vision_model("vit", 10, tiny), [("big", build_vision_model("vit", 10, tiny))],
                        images, config, one_step)  # fmt: skip
    on_ratings = distill(build_model("mlp_s", prepared), [("big", build_model("mlp_m", prepared))],
                         prepared, config, one_step)  # fmt: skip
    assert on_images.steps == on_ratings.steps == 1
    assert "valid_accuracy" in on_images.history[0] and "valid_mse" in on_ratings.history[0]
    for result in (on_images, on_ratings):
        losses = {k: v for k, v in result.history[0].items() if k.startswith("loss_")}
        assert {"loss_task", "loss_kd", "loss_reg_teacher"} <= set(losses)
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


@needs_fashion_mnist
@pytest.mark.parametrize("method", ["ld", "fd", "diverse_distill"])
def test_a_mixup_transfer_set_adds_each_methods_label_free_terms_on_images_and_counts_the_passes(method):
    """Images take a transfer set of mixed training images, the same for every method: each
    step adds the method's distillation terms on the mixes (no label), and the teacher is
    asked about them too."""
    from recdistill.distill import DistillConfig
    from recdistill.distill.config import TransferConfig
    from recdistill.distill.trainer import distill
    from recdistill.training import TrainConfig, seed_everything
    from vision_ext.data import VisionDataConfig, load_vision_data
    from vision_ext.models import build_vision_model

    train = TrainConfig(epochs=1, batch_size=32, eval_batch_size=4096, max_steps_per_epoch=2, progress=False)
    config = DistillConfig(method=method, teachers=["big"], gating={"enabled": False},
                           transfer=TransferConfig(pairs=500, policy="mixup", batch_ratio=0.5))  # fmt: skip
    seed_everything(0)
    images = load_vision_data(VisionDataConfig(train_limit=128, valid_fraction=0.01))
    tiny = {"patch_size": 7, "hidden_size": 16, "num_layers": 2, "num_heads": 2}
    result = distill(build_vision_model("vit", 10, tiny), [("big", build_vision_model("vit", 10, tiny))],
                     images, config, train)  # fmt: skip
    transfer = {k: v for k, v in result.history[0].items() if k.endswith("_transfer")}
    assert "loss_kd_transfer" in transfer and all(torch.isfinite(torch.tensor(v)) for v in transfer.values())
    assert result.teacher_passes["big"]["full"] == 2 * 32 + 2 * 16
    with pytest.raises(ValueError, match="images take 'mixup', got 'uniform'"):
        distill(build_vision_model("vit", 10, tiny), [("big", build_vision_model("vit", 10, tiny))], images,
                dataclasses.replace(config, transfer=TransferConfig(pairs=10, policy="uniform")), train)  # fmt: skip


def test_a_missing_data_set_stops_the_command_with_how_to_install_it(tmp_path):
    from pipelines.cli import main

    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "vision", "run", "vision_quick",
                           "--set", f"data.path={tmp_path / 'nowhere'}", "--output", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "apt-get install dataset-fashion-mnist" in proc.stderr and "Traceback" not in proc.stderr
    assert main  # the command above is this module's entry point


@pytest.mark.parametrize("override, message", [
    ("models.student.spec.hidden=8", r"models.student.spec: unknown key\(s\) hidden"),
    ("student=clip", "models.clip.kind: the student must be a vit"),
    ("distill.teachers=[vit_l, resnet]", "distill.teachers: 'resnet' is not in models"),
    ("data.dataset=mnist", "data.dataset: expected one of 'fashion_mnist'"),
])  # fmt: skip
def test_a_bad_vision_config_fails_before_any_work_naming_the_key(override, message):
    from pipelines.schema import ConfigError
    from pipelines.vision_config import load_vision_config

    with pytest.raises(ConfigError, match=message):
        load_vision_config("vision_quick", [override])


@needs_fashion_mnist
def test_a_teacher_given_as_a_checkpoint_is_reused_not_retrained(quick_run, tmp_path):
    from pipelines.engine import run_job
    from pipelines.vision_config import load_vision_config

    first, _ = quick_run
    folder = first.output_dir / "teacher_vit_l"
    cfg = load_vision_config("vision_quick", [f"teachers.vit_l.checkpoint={folder}", "student_alone=false",
                                              "tracking.enabled=false"])  # fmt: skip
    again = run_job(cfg, output_dir=tmp_path, say=lambda line: None)
    reused = next(r for r in again.rows if r["model"] == "vit_l")
    assert reused["test_accuracy"] == first.rows[0]["test_accuracy"]
    assert not (again.output_dir / "teacher_vit_l").exists()  # nothing trained for it
