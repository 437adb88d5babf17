"""The run tags and metrics a job writes and the champion rule reads, and the model-version
tags the rule writes."""

#: Run tags and metrics the promotion rule reads (written by :meth:`TrackedRun.log_student`).
TAG_PARITY = "export.parity_passed"
METRIC_PARITY_DIFF = "export.max_abs_diff"
TAG_HOLDOUT = "holdout"
#: Run tag naming the local TorchScript file the run exported (its absolute path).
TAG_EXPORT_FILE = "export.file"
#: A run's baseline: metrics ``baseline.<metric>`` and the tag naming what it is
#: (written by :meth:`TrackedRun.log_baseline`).
BASELINE_PREFIX = "baseline."
TAG_BASELINE = "baseline"
#: Model-version tags written by :func:`promote`.
TAG_PROMOTION = "promotion"
TAG_REASON = "promotion_reason"
TAG_MARGIN = "promotion_margin"
#: The data's task, on a job's parent run (written by :meth:`TrackedRun.set_task`): the
#: metric the champion rule compares (``test_<monitor>``, ``valid_<monitor>`` for the baseline)
#: and its direction, unless the ``tracking:`` section names them.
TAG_MONITOR = "task.monitor"
TAG_HIGHER_IS_BETTER = "task.higher_is_better"
