"""Training any staged model: one loop, many steps.

The trainer knows nothing about a model beyond ``model(batch) -> [B]`` predicted ratings, so it
trains the TorchRec recommenders and the language teachers alike, in one process or, once
:mod:`recdistill.sharding` has wrapped the model in TorchRec's ``DistributedModelParallel``, in
several (each rank then takes its slice of every global batch). Rooms, one job each:

- :mod:`~recdistill.training.config`: the ``train:`` section, ``TrainResult``, ``TrainingError``.
- :mod:`~recdistill.training.optim`: Adagrad for the tables, Adam for the rest.
- :mod:`~recdistill.training.evaluation`: MSE / RMSE / MAE, clipped, and by cold / warm slice.
- :mod:`~recdistill.training.checkpoints`: ``best.pt`` / ``last.pt``, written atomically, and
  rebuilt by a builder the model layer hands in (this layer imports no model).
- :mod:`~recdistill.training.resume`: ``resume.pt``, the loop's whole state, to continue a
  killed run exactly where it stopped.
- :mod:`~recdistill.training.progress`: a bar on a terminal, plain lines in logs.
- :mod:`~recdistill.training.loop`: the one epoch loop (``fit``) and the ``TrainStep`` it runs.
- :mod:`~recdistill.training.supervised`: ``train_supervised``, the MSE step.
- :mod:`~recdistill.training.ranks`, :mod:`~recdistill.training.seeding`: ranks and seeds.

The distillation trainer (:mod:`recdistill.distill.trainer`) is the other user of the loop.

Example::

    prepared = prepare()
    seed_everything(0)
    model = build_model("mlp_s", prepared)
    result = train_supervised(model, prepared, TrainConfig(epochs=5), model_name="mlp_s")
    print(result.test["rmse"], result.test["mse_item_cold"])
"""

from recdistill.training.checkpoints import (
    EpochCheckpoints,
    portable_state_dict,
    read_checkpoint,
    rebuild,
    save_checkpoint,
    write_atomically,
)
from recdistill.training.config import TrainConfig, TrainingError, TrainResult
from recdistill.training.evaluation import (
    DEFAULT_SLICE_EDGES,
    SLICE_ENTITIES,
    SLICE_NAMES,
    evaluate,
    label_range,
    training_counts,
)
from recdistill.training.loop import EarlyStopping, TrainStep, backward_sum, fit, steps_in_epoch
from recdistill.training.optim import (
    ADAGRAD_EPS,
    EMBEDDING_OPTIMIZERS,
    OPTIMIZER_NAMES,
    CombinedOptimizer,
    EmbeddingTables,
    build_optimizer,
    embedding_parameters,
    embedding_tables,
    make_optimizer,
    optimizer_class,
    optimizer_kwargs,
    register_optimizer,
    register_tables,
)
from recdistill.training.progress import Progress
from recdistill.training.ranks import _device, _global_batches, _local_rows, _world
from recdistill.training.resume import Position, read_resume
from recdistill.training.seeding import seed_everything
from recdistill.training.supervised import mse_losses, train_supervised

__all__ = [
    "ADAGRAD_EPS",
    "DEFAULT_SLICE_EDGES",
    "EMBEDDING_OPTIMIZERS",
    "OPTIMIZER_NAMES",
    "Position",
    "Progress",
    "SLICE_ENTITIES",
    "SLICE_NAMES",
    "CombinedOptimizer",
    "EarlyStopping",
    "EmbeddingTables",
    "EpochCheckpoints",
    "TrainConfig",
    "TrainResult",
    "TrainStep",
    "TrainingError",
    "backward_sum",
    "build_optimizer",
    "embedding_parameters",
    "embedding_tables",
    "evaluate",
    "fit",
    "label_range",
    "make_optimizer",
    "mse_losses",
    "optimizer_class",
    "optimizer_kwargs",
    "portable_state_dict",
    "read_checkpoint",
    "read_resume",
    "rebuild",
    "register_optimizer",
    "register_tables",
    "save_checkpoint",
    "seed_everything",
    "steps_in_epoch",
    "train_supervised",
    "training_counts",
    "write_atomically",
]
