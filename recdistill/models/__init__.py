"""Students and teachers, each a :class:`recdistill.stages.StagedModule`, registered by name."""

from recdistill.models import tables  # noqa: F401  (tells the optimizers TorchRec's tables)
from recdistill.models import recommender  # noqa: F401  (registers mlp_s, mlp_m, mlp_l)
from recdistill.models import dlrm  # noqa: F401  (registers dlrm_s, dlrm_m, dlrm_l)
from recdistill.models import encoder_lm  # noqa: F401  (registers minilm)
from recdistill.models import fm  # noqa: F401  (registers fm: myFM is needed to fit it, not to import it)
from recdistill.models import t5_teacher  # noqa: F401  (registers t5)
from recdistill.models.checkpoints import load_checkpoint
from recdistill.models.registry import MODELS, build_model, count_parameters, model_config

__all__ = ["MODELS", "build_model", "count_parameters", "load_checkpoint", "model_config"]
