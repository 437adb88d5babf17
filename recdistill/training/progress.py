"""Progress of a training run: a tqdm bar on a terminal (or a notebook), plain lines elsewhere.

In CI logs and under schedulers stderr is a file, where a bar turns into thousands of
carriage-return redraws. There :class:`Progress` writes one line every
``train.progress_every_steps`` steps (default: every 10% of an epoch) and one per epoch, each
with the epoch's mean losses so far and its rows per second.

Example (stderr not a terminal)::

    mlp_s epoch 1/20 step 8/79: train_loss 1.2345; 35,210 rows/s
    mlp_s epoch 1/20: train_loss 0.9876, valid_mse 0.9123; 34,980 rows/s, 2.3 s
"""

from __future__ import annotations

import math
import sys
from typing import Mapping, TextIO

from tqdm.auto import tqdm

from recdistill.training.config import TrainConfig

#: Plain lines per epoch when ``train.progress_every_steps`` is not set.
LINES_PER_EPOCH = 10


class Progress:
    """Reports one run's progress to ``stream`` (default: stderr), or nothing when not ``enabled``.

    Args:
        cfg: ``progress_every_steps`` and ``epochs`` (for the ``epoch 3/20`` label).
        steps_per_epoch: steps in a full epoch.
        desc: what is trained (the label of every line).
        enabled: ``cfg.progress`` on rank 0.
        stream: where to write; a terminal gets a bar, anything else plain lines.
    """

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int, desc: str = "", enabled: bool = True,
                 stream: TextIO | None = None):  # fmt: skip
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.draws_bar = enabled and _shows_a_bar(self.stream)
        self.epochs = cfg.epochs
        self.steps_per_epoch = steps_per_epoch
        self.every = cfg.progress_every_steps or max(1, math.ceil(steps_per_epoch / LINES_PER_EPOCH))
        self.label = f"{desc} " if desc else ""
        self._bar: tqdm | None = None

    def start_epoch(self, epoch: int, steps_done: int = 0) -> None:
        """An epoch begins (or resumes after ``steps_done`` steps)."""
        self.epoch = epoch
        if self.draws_bar:
            self._bar = tqdm(total=self.steps_per_epoch, initial=steps_done, leave=False,
                             desc=f"{self.label}epoch {epoch}", file=self.stream)  # fmt: skip

    def step(self, number: int, means: Mapping[str, float], rows_per_s: float) -> None:
        """Step ``number`` of the epoch is done; ``means``: the epoch's mean losses so far."""
        if self._bar is not None:
            self._bar.update()
            first = next(iter(means))
            self._bar.set_postfix({first: f"{means[first]:.4f}"})
        elif self.enabled and number % self.every == 0 and number < self.steps_per_epoch:
            self._write(f"{self.label}epoch {self.epoch}/{self.epochs} step {number}/"
                        f"{self.steps_per_epoch}: {_values(means)}; {rows_per_s:,.0f} rows/s")  # fmt: skip

    def end_epoch(self, losses: Mapping[str, float], valid: Mapping[str, float], rows_per_s: float,
                  seconds: float) -> None:  # fmt: skip
        """The epoch is done: its mean losses, validation metric (``{"valid_mse": ...}``), speed
        and duration."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled:
            shown = _values({**losses, **valid})
            self._write(f"{self.label}epoch {self.epoch}/{self.epochs}: {shown}; "
                        f"{rows_per_s:,.0f} rows/s, {seconds:.1f} s")  # fmt: skip

    def close(self) -> None:
        """Close a bar left open (a run stopped mid-epoch by an error)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


def _shows_a_bar(stream: TextIO) -> bool:
    """A terminal, or a Jupyter kernel's stderr (where ``tqdm.auto`` draws a widget)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) or (stream is sys.stderr and "ipykernel" in sys.modules)


def _values(values: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in values.items())
