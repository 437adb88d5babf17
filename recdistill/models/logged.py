"""A committee member that is a column of the log: another model's logged predictions.

A team distilling into a new student often has a production model whose scores were logged
beside each impression. The spec declares such a column (``logged_scores: [{name, column}]``,
:class:`features.spec.LoggedScoreSpec`) and the job names it in ``distill.teachers`` like any
teacher. It has no embeddings, no hidden state and nothing to train: its "stages" only carry
the logged value through (``early`` looks the row's score up, ``middle`` and ``head`` pass it
on), so the prediction-level methods (LD, MT, AEKD, SCKD, AutoSKD) take it as they take any
teacher's prediction, and the methods that ask a teacher a question or read its hidden state
(DiverseDistill, FD, AMTML) refuse it (``prediction_only``).

Rows are looked up by the batch's ``rows`` (positions in the whole log), so the member covers
exactly the rows that were logged: a transfer set's unrated pairs have no logged score, and a
job is refused at config load when it asks for both.
"""

from __future__ import annotations

import torch

from features.batches import Batch, Prepared
from recdistill.stages import StagedModule

#: A logged click probability is clipped to [floor, 1 - floor] before its logit.
PROBABILITY_FLOOR = 1e-6


class LoggedScores(StagedModule):
    """Another model's logged predictions of the label, as a prediction-only teacher.

    Args:
        name: the member's name (the spec's ``logged_scores[i].name``).
        values: ``[N]`` the logged value of every row of the data (a rating prediction, or a
            click probability).
        clicks: the label is a click: ``head`` gives logits ``[B, 2]`` = ``[0, logit(p)]``, as
            the recommenders' click heads do.

    Attributes:
        prediction_only: methods that need a teacher's stages refuse this member.
    """

    prediction_only = True
    early_dim = 1
    hidden_dim = 1

    def __init__(self, name: str, values: torch.Tensor, clicks: bool = False):
        super().__init__()
        self.name = name
        self.clicks = clicks
        if clicks:
            p = values.double().clamp(PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
            values = torch.log(p / (1 - p))
        self.register_buffer("values", values.float().clone(), persistent=False)

    @classmethod
    def from_prepared(cls, prepared: Prepared, name: str) -> "LoggedScores":
        """The member ``name`` of the prepared data's spec.

        Raises:
            KeyError: the spec declares no logged score ``name`` (naming those it declares).
        """
        logged = prepared.data.logged
        if name not in logged:
            raise KeyError(f"no logged score {name!r} in the data (the spec's logged_scores: "
                           f"{', '.join(logged) or 'none'})")  # fmt: skip
        return cls(name, logged[name], clicks=prepared.vocabs.spec.label.kind == "click")

    def early(self, batch: Batch) -> torch.Tensor:
        rows = batch.rows
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.values.numel()):
            raise IndexError(f"logged score {self.name!r}: rows {int(rows.min())}..{int(rows.max())} "
                             f"are not all in the log ({self.values.numel():,} rows); unrated pairs "
                             "(a transfer set) have no logged score")  # fmt: skip
        return self.values.to(rows.device)[rows].unsqueeze(1)

    def middle(self, h: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return h

    def head(self, z: torch.Tensor) -> torch.Tensor:
        score = z[:, 0]
        if self.clicks:
            return torch.stack([torch.zeros_like(score), score], dim=1)
        return score

