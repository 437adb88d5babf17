"""The model registry's champion rule (:func:`promote`).

A registered version gets the champion alias only if its exported student passed the parity
check, it beats the baseline its own run recorded (the student trained alone, on a validation
metric; :meth:`~recdistill.tracking.runs.TrackedRun.log_baseline`) AND it beats the current
champion on the same holdout metric (each by more than ``promotion_margin``, 0 by default:
strictly). The metric and its direction are the data's task's (``test_<monitor>``, the run's
``task.monitor`` tag) unless the ``tracking:`` section names them. Otherwise the champion stays
where it was and the version is tagged with why it lost. Moving the alias is all or nothing: if
any write of a promotion fails, the alias goes back to the old champion, which keeps serving.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from recdistill.tracking.config import TrackingConfig
from recdistill.tracking.server import connect
from recdistill.tracking.tags import (
    BASELINE_PREFIX,
    TAG_BASELINE,
    TAG_HIGHER_IS_BETTER,
    TAG_HOLDOUT,
    TAG_MARGIN,
    TAG_MONITOR,
    TAG_PARITY,
    TAG_PROMOTION,
    TAG_REASON,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger("recdistill.tracking")


class PromotionError(ValueError):
    """A version or run that cannot be promoted at all (not found, wrong model name)."""


@dataclass
class PromotionDecision:
    """What :func:`promote` decided for one registered version, and why."""

    name: str
    version: str
    promoted: bool
    reason: str
    metric: str
    value: float | None
    champion_before: str | None
    champion_value: float | None
    #: What the version's run said it must beat (all ``None`` when it recorded no baseline):
    #: its name, the metric, the baseline's value, the version's value, and the verdict.
    baseline: str | None = None
    baseline_metric: str | None = None
    baseline_value: float | None = None
    value_vs_baseline: float | None = None
    beats_baseline: bool | None = None

    @property
    def champion(self) -> str | None:
        """The champion version after the decision."""
        return self.version if self.promoted else self.champion_before

    @property
    def message(self) -> str:
        verdict = "promoted to champion" if self.promoted else "not promoted"
        return f"{self.name} version {self.version}: {verdict}: {self.reason}"


def _current_champion(client: MlflowClient, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _run_facts(client: MlflowClient, run_id: str | None) -> tuple[dict[str, float], dict[str, str]]:
    """The metrics and tags of ``run_id`` (empty when the version names no run)."""
    if not run_id:
        return {}, {}
    run = client.get_run(run_id)
    return dict(run.data.metrics), dict(run.data.tags)


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.6g}"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def compared(config: TrackingConfig, tags: dict[str, str]) -> tuple[str, str, bool]:
    """``(holdout metric, baseline metric, greater is better)`` a version is judged by: the
    ``tracking:`` section's where it names them, else the task its run recorded
    (``test_<monitor>``, ``valid_<monitor>``, its direction; a run without one: MSE, lower)."""
    monitor = tags.get(TAG_MONITOR, "mse")
    greater = config.greater_is_better
    if greater is None:
        greater = tags.get(TAG_HIGHER_IS_BETTER) == "true"
    return config.holdout_metric or f"test_{monitor}", config.baseline_metric or f"valid_{monitor}", greater


def promote(
    config: TrackingConfig, version: str | int, client: MlflowClient | None = None
) -> PromotionDecision:
    """Give ``version`` the champion alias if it passed parity, beats the baseline its run
    recorded, and beats the champion.

    The holdout metric (:func:`compared`), the baseline and the parity result are read from the version's run
    (logged by :meth:`TrackedRun.log_metrics`, :meth:`TrackedRun.log_baseline` and
    :meth:`TrackedRun.log_student`); a run that recorded no finite baseline skips that rule. The
    decision and its reason are written as version tags (``promotion``, ``promotion_reason``); a
    promoted version also gets the alias, and the previous champion a ``superseded_by`` tag.
    Those three writes are all or nothing (:func:`_move_champion`).

    Raises:
        PromotionError: the registered model or version does not exist.
        MlflowException: the registry failed while promoting; the old champion still has the
            alias.
    """
    from mlflow.exceptions import MlflowException

    client = client or connect(config)
    name, alias = config.registered_model, config.champion_alias
    version = str(version)
    try:
        candidate = client.get_model_version(name, version)
    except MlflowException as err:
        raise PromotionError(f"registered model {name!r} has no version {version}: {err.message}") from err
    metrics, tags = _run_facts(client, candidate.run_id)
    metric, base_metric, greater = compared(config, tags)
    value = metrics.get(metric)
    champion = _current_champion(client, name, alias)
    champ_metrics, champ_tags = ({}, {})
    if champion is not None:
        champ_metrics, champ_tags = _run_facts(client, champion.run_id)
    champ_value = champ_metrics.get(metric)
    margin = config.promotion_margin
    better = (lambda a, b: a > b + margin) if greater else (lambda a, b: a < b - margin)
    word = ">" if greater else "<"
    beyond = f" by more than the promotion margin {_fmt(margin)}" if margin else ""
    parity = tags.get(TAG_PARITY)

    base_value = metrics.get(BASELINE_PREFIX + base_metric)
    baseline = tags.get(TAG_BASELINE, "baseline") if _finite(base_value) else None
    base_own = metrics.get(base_metric) if baseline else None
    beats_baseline = None if baseline is None else _finite(base_own) and better(base_own, base_value)

    promoted = False
    if champion is not None and str(champion.version) == version:
        reason = f"already the {alias}"
        promoted = True
    elif parity != "true":
        reason = (
            "its TorchScript export failed the parity check"
            if parity == "false"
            else "no TorchScript parity check was recorded for its run"
        )
    elif value is None or not math.isfinite(value):
        reason = f"its run has no finite {metric}"
    elif beats_baseline is False:
        reason = (
            f"{base_metric} {_fmt(base_own)} does not beat {_fmt(base_value)} of its baseline "
            f"({baseline}){beyond}"
        )
    elif champion is None:
        promoted, reason = True, f"first {alias} ({metric} {_fmt(value)})"
    elif champ_value is None or not math.isfinite(champ_value):
        reason = f"{alias} version {champion.version} has no {metric} to compare with"
    elif champ_tags.get(TAG_HOLDOUT) != tags.get(TAG_HOLDOUT):
        reason = (
            f"measured on another holdout ({tags.get(TAG_HOLDOUT)!r}) than {alias} version "
            f"{champion.version} ({champ_tags.get(TAG_HOLDOUT)!r})"
        )
    elif better(value, champ_value):
        promoted, reason = True, (
            f"{metric} {_fmt(value)} {word} {_fmt(champ_value)} of {alias} version {champion.version}{beyond}"
        )
    else:
        reason = (
            f"{metric} {_fmt(value)} does not beat {_fmt(champ_value)} of {alias} version "
            f"{champion.version}{beyond}"
        )
    if promoted and beats_baseline:
        reason += f"; {base_metric} {_fmt(base_own)} {word} {_fmt(base_value)} of its baseline ({baseline})"

    decision = PromotionDecision(
        name=name,
        version=version,
        promoted=promoted,
        reason=reason,
        metric=metric,
        value=value,
        champion_before=None if champion is None else str(champion.version),
        champion_value=champ_value,
        baseline=baseline,
        baseline_metric=base_metric if baseline else None,
        baseline_value=base_value if baseline else None,
        value_vs_baseline=base_own,
        beats_baseline=beats_baseline,
    )
    client.set_model_version_tag(name, version, f"holdout.{metric}", _fmt(value))
    client.set_model_version_tag(name, version, TAG_MARGIN, _fmt(margin))
    if baseline:
        client.set_model_version_tag(name, version, f"{BASELINE_PREFIX}{base_metric}", _fmt(base_value))
    if promoted and decision.champion_before != version:
        _move_champion(client, decision, alias)
    else:
        _tag_decision(client, decision)
    log.info(decision.message)
    return decision


def _tag_decision(client: MlflowClient, decision: PromotionDecision) -> None:
    """The ``promotion`` and ``promotion_reason`` tags of the decided version."""
    verdict = "champion" if decision.promoted else "rejected"
    client.set_model_version_tag(decision.name, decision.version, TAG_PROMOTION, verdict)
    client.set_model_version_tag(decision.name, decision.version, TAG_REASON, decision.reason)


def _move_champion(client: MlflowClient, decision: PromotionDecision, alias: str) -> None:
    """Give the alias to the decided version, tag it champion and the old one superseded.

    All or nothing: if any of these writes fails, the alias goes back to the old champion (or
    is removed when there was none), the tags written are removed, and the error is raised.
    """
    from mlflow.exceptions import MlflowException

    name, version, before = decision.name, decision.version, decision.champion_before
    client.set_registered_model_alias(name, alias, version)
    try:
        _tag_decision(client, decision)
        if before is not None:
            client.set_model_version_tag(name, before, "superseded_by", version)
    except Exception:
        if before is None:
            client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, before)
        for tagged, key in ((version, TAG_PROMOTION), (version, TAG_REASON), (before, "superseded_by")):
            try:
                if tagged is not None:
                    client.delete_model_version_tag(name, tagged, key)
            except MlflowException:  # a tag the failure kept from being written
                pass
        raise


def version_of_run(config: TrackingConfig, run_id: str, client: MlflowClient | None = None) -> str:
    """The registered version of the student logged by ``run_id`` (registering it if needed)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = client or connect(config)
    name = config.registered_model
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise PromotionError(f"no MLflow run {run_id!r}: {err.message}") from err
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if found:
        return str(max(int(v.version) for v in found))
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{config.model_name}'",
    )
    if not models:
        raise PromotionError(
            f"run {run_id} logged no model named {config.model_name!r}; nothing to register"
        )
    return str(mlflow.register_model(models[0].model_uri, name).version)
