"""A job or bench stopped by SIGTERM (``kill``, a scheduler's stop) ends like one stopped by
Ctrl-C: Python's default for SIGTERM ends the process at once, so no ``finally`` block runs and
the job's MLflow runs stay RUNNING forever; turned into ``SystemExit`` they end as KILLED
(:func:`recdistill.tracking.start_run`) and every checkpoint already written stays."""

from __future__ import annotations

import signal
from typing import Any


def stop_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit(128 + 15)`` so ``finally`` blocks run (the main thread only)."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
