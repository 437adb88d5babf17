"""The one job engine: ratings, clicks and images through the same stages.

``recdistill run`` and ``recdistill vision run`` are :func:`run_job`; ``recdistill train`` and
``recdistill distill`` run some of its stages over a :class:`JobContext`. Rooms, one job each:

- :mod:`~pipelines.engine.context`: what the stages share (:class:`JobContext`), a model's
  nested run, results rows, per-epoch logging.
- :mod:`~pipelines.engine.teachers`: training one model, and the committee (trained, reused,
  cross-fitted, logged scores).
- :mod:`~pipelines.engine.stages`: prepare, the student alone, distil, the gap closed, export,
  register and promote.
- :mod:`~pipelines.engine.results`: :class:`JobResult`, the results table's columns, the
  distillation verdict, a version's description.
- :mod:`~pipelines.engine.folders`: run folders, ``latest``, ``champion.pt``, ``--resume``.
- :mod:`~pipelines.engine.run`: the whole job.

What differs between ratings, clicks and images is a domain adapter (:mod:`pipelines.domains`);
what a results table shows and a promotion compares is the data's task.

Example::

    result = run_job(load_config("quick"))                # ratings
    result = run_job(load_vision_config("vision_quick"))  # images, the same stages
    result.rows, result.version, result.decision.message
"""

from pipelines.engine.context import JobContext, NullRun
from pipelines.engine.folders import CHAMPION_FILE, FINISHED, LATEST, folder_to_resume, publish_champion
from pipelines.engine.results import JobResult, distillation_verdict, gap_closed, results_columns, version_description
from pipelines.engine.run import run_job

__all__ = ["CHAMPION_FILE", "FINISHED", "LATEST", "JobContext", "JobResult", "NullRun", "distillation_verdict",
           "folder_to_resume", "gap_closed", "publish_champion", "results_columns", "run_job",
           "version_description"]  # fmt: skip
