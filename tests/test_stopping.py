"""A job stopped with SIGTERM (``kill``, a scheduler's stop) ends its MLflow runs as KILLED
(issue 20): a real ``recdistill run`` in a subprocess, a real signal, the real local store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_a_job_stopped_with_sigterm_ends_its_mlflow_runs_killed(tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlflow"
    overrides = ["teachers={}", "distill.teachers=[mlp_l]", "distill.method=ld", "train.epochs=50",
                 "train.max_steps_per_epoch=10000", "train.patience=50", f"tracking.local_dir={store}",
                 "tracking.experiment=stopped"]  # fmt: skip
    command = [str(Path(sys.executable).with_name("recdistill")), "run", "quick", "--output", str(tmp_path / "runs")]
    command += [arg for value in overrides for arg in ("--set", value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in job.stdout:  # until the teacher trains (its nested run is open)
        seen.append(line)
        if "mlp_l:" in line and "parameters" in line:
            break
    time.sleep(2.0)
    assert job.poll() is None, "".join(seen)[-3000:]
    job.send_signal(signal.SIGTERM)
    rest, _ = job.communicate(timeout=120)
    assert job.returncode == 128 + signal.SIGTERM, "".join(seen)[-2000:] + rest[-2000:]

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("stopped")
    runs = {run.info.run_name: run.info.status for run in client.search_runs([experiment.experiment_id])}
    assert runs and set(runs.values()) == {"KILLED"}, runs
    assert any("mlp_l" in name for name in runs) and "quick" in runs
