"""The batch job's entry point under its older name (``benchmarks/bench_committee.py`` imports
``run_job`` from here); the engine lives in :mod:`pipelines.engine`."""

from pipelines.engine import JobResult, run_job

__all__ = ["JobResult", "run_job"]
