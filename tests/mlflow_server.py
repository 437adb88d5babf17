"""Helpers for the serving tests: a real ``mlflow server`` (sqlite backend, temp folders, a free
port on 127.0.0.1) and a student trained for a few steps.

Example::

    with MlflowServer(tmp_path) as server:
        cfg = TrackingConfig(tracking_uri=server.uri)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

#: How long the server may take to answer /health (it is slow to start on a busy 2-core box).
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """Start ``mlflow server`` in its own process group; stop the whole group on exit.

    Args:
        root: a temp folder for the database, the artifacts and the server log.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "server.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        cmd = [
            str(mlflow_cli), "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job runner needed
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            cmd, cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # its workers share our group id: one killpg stops them all
        )  # fmt: skip
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(
            f"mlflow server not healthy after {START_TIMEOUT_S} s:\n{self.log_path.read_text()[-3000:]}"
        )

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # the group this server leads (start_new_session)
        for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # workers that outlived the server process
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()
        self.proc = None


def train_student(prepared, steps: int = 20, seed: int = 0, lr: float = 0.05):
    """An MLP-S student trained for a few Adagrad steps on the real training split (eval mode)."""
    import torch

    from recdistill.models import build_model

    torch.manual_seed(seed)
    student = build_model("mlp_s", prepared)
    opt = torch.optim.Adagrad(student.parameters(), lr=lr)
    for step, batch in enumerate(prepared.data.batches("train", 1024, shuffle=True, seed=seed)):
        if step == steps:
            break
        loss = torch.nn.functional.mse_loss(student(batch), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student.eval()
