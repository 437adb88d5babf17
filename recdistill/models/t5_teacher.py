"""The T5 teacher (``t5``): an encoder-decoder reading each prompt, decoding one position.

``T5ForConditionalGeneration`` built from a small ``T5Config`` (no T5 weights exist offline,
so it is trained here), or ``from_pretrained(path)`` when the config names a weights folder.

Stages (DESIGN.md section 1), with one decoding position (the decoder start token):

- ``early(batch) -> h [B, d_model]``: the encoder over the prompt, then decoder block 1 at the
  start position, cross-attending to the encoder states.
- ``middle(h, batch) -> z [B, d_model]``: decoder blocks 2..L from ``h`` (or a question),
  cross-attending to the encoder states, then the decoder's final norm.
- ``head(z) -> [B]``: ``"regression"`` (a ``Linear``, bias starting at the training mean) or
  ``"rating_tokens"`` (the expected value over the LM head's tokens "1".."5").

The decoder blocks are called directly (``T5Block`` in transformers 5.23: with a single
decoding position, self-attention sees one key, and cross-attention takes the encoder mask
built by ``create_bidirectional_mask`` like ``T5Stack`` does); a test pins the stages to the
library's own forward.

**Per-entity encoder states.** The encoder reads the user part and the item part of a prompt
each on its own (T5's positions are relative, so a part's states do not depend on where it
sits), and the decoder cross-attends to both joined. While the encoder trains, each distinct
user and item of a batch is encoded once; once the encoder is frozen (``freeze()``, or
``train_encoder: false`` for a pretrained T5 whose decoder alone is fine-tuned) its states are
cached per entity on disk (:mod:`recdistill.models.entity_cache`) and a step runs only the
decoder.

Tokenizer: the WordPiece vocabulary of the shipped all-MiniLM-L6-v2 (uncased, 30,522 tokens),
not one trained on the training prompts. Measured on ML-100K, a WordPiece or BPE tokenizer
trained on the training prompts (4,096 or 8,192 tokens) shortens prompts only from 38.3 to 37.2
tokens on average (without [CLS]/[SEP]) and adds an artifact every checkpoint would have to
carry; the MiniLM vocabulary already holds whole tokens for most user and item numbers, titles
and genres, and for the rating tokens "1".."5". It also lets both language teachers share one
token table. Its cost, a 30,522-row embedding, is shared by encoder, decoder and LM head.

Example::

    teacher = build_model("t5", prepared, {"d_model": 128})
    y = teacher(batch)                                     # [B] ratings
    teacher.freeze(); z = teacher.middle(question, batch)  # [B, d_model], encoder cached
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from features.batches import Prepared
from recdistill.models.entity_cache import ContextBatch, EntityStates, cache_key, default_cache_dir, encode_unique, weights_digest
from recdistill.models.registry import register_model
from recdistill.models.text import (
    PromptParts, check_model_folder, load_tokenizer, minilm_path, prompt_parts, rating_offset, special_id,
)  # fmt: skip
from recdistill.stages import StagedModule

if TYPE_CHECKING:
    from transformers import T5ForConditionalGeneration

RATINGS = ("1", "2", "3", "4", "5")
HEADS = ("regression", "rating_tokens")


@dataclass
class T5TeacherConfig:
    """The T5 teacher.

    Args:
        path: a T5 weights folder for ``from_pretrained``; empty builds a fresh model from the
            sizes below.
        tokenizer: a ``tokenizer.json`` (or a folder holding one); empty means MiniLM's
            WordPiece tokenizer. With ``path`` set and this empty, ``path``'s own tokenizer.
        d_model: width of the model (and of ``h`` and ``z``).
        d_ff: width of the feed-forward layers.
        num_heads: attention heads (``d_model`` must divide by it).
        num_layers: encoder blocks.
        num_decoder_layers: decoder blocks; block 1 is in ``early``, so at least 2.
        dropout: dropout rate while training.
        max_length: the most tokens of one part (user or item), end token included.
        head: ``"regression"`` or ``"rating_tokens"`` (expected value over "1".."5").
        train_encoder: fine-tune the encoder too (needed from a config); ``false`` keeps a
            pretrained encoder frozen and cached per entity while the decoder trains.
        cache_dir: where frozen encoder states are cached; empty means
            ``$RECDISTILL_CACHE_DIR`` or ``~/.cache/recdistill/entity_states``.
    """

    path: str = ""
    tokenizer: str = ""
    d_model: int = 128
    d_ff: int = 512
    num_heads: int = 4
    num_layers: int = 2
    num_decoder_layers: int = 2
    dropout: float = 0.1
    max_length: int = 48
    head: Literal["regression", "rating_tokens"] = "regression"
    train_encoder: bool = True
    cache_dir: str = ""

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_heads", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if self.num_decoder_layers < 2:
            raise ValueError(
                f"num_decoder_layers must be at least 2 (early uses block 1), got {self.num_decoder_layers}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")


class RatingTokenHead(nn.Module):
    """Expected rating under the LM head's distribution over the tokens "1".."5".

    Args:
        lm_head: the model's (tied) LM head ``Linear(d_model -> vocab)``.
        token_ids: vocabulary ids of "1".."5".
        scale: multiplier of ``z`` before the LM head (T5 scales by ``d_model ** -0.5``).
    """

    def __init__(self, lm_head: nn.Linear, token_ids: list[int], scale: float):
        super().__init__()
        self.lm_head = lm_head
        self.register_buffer("token_ids", torch.tensor(token_ids), persistent=False)
        self.register_buffer("values", torch.arange(1.0, len(token_ids) + 1), persistent=False)
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        weight = self.lm_head.weight[self.token_ids]  # [5, d_model]: only the rating rows
        probs = torch.softmax((z * self.scale) @ weight.t(), dim=-1)  # [B, 5]
        return probs @ self.values  # [B]


class RegressionHead(nn.Module):
    """``Linear(d_model -> 1)`` with its bias at ``offset``: ``[B, d_model] -> [B]``."""

    def __init__(self, width: int, offset: float):
        super().__init__()
        self.linear = nn.Linear(width, 1)
        nn.init.constant_(self.linear.bias, offset)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z).squeeze(-1)


class T5Teacher(StagedModule):
    """T5 over the two parts of a prompt, one decoding position, in three stages.

    Args:
        t5: a ``T5ForConditionalGeneration`` with at least 2 decoder blocks.
        parts: the tokenized user and item parts, in ``t5``'s vocabulary.
        head: ``"regression"`` or ``"rating_tokens"``.
        rating_offset: initial bias of the regression head (the training mean rating).
        rating_token_ids: vocabulary ids of "1".."5" (for ``"rating_tokens"``).
        train_encoder: whether fine-tuning trains the encoder (else it is frozen and cached).
        cache_dir: where frozen encoder states are cached.
    """

    def __init__(
        self,
        t5: "T5ForConditionalGeneration",
        parts: PromptParts,
        head: str = "regression",
        rating_offset: float = 0.0,
        rating_token_ids: list[int] | None = None,
        train_encoder: bool = True,
        cache_dir: str | Path = "",
    ):
        super().__init__()
        if len(t5.decoder.block) < 2:
            raise ValueError(f"the T5 decoder needs at least 2 blocks, has {len(t5.decoder.block)}")
        if parts.vocab_size > t5.config.vocab_size:
            raise ValueError(
                f"tokenizer vocabulary ({parts.vocab_size}) exceeds the model's ({t5.config.vocab_size})"
            )
        self.t5 = t5
        self.parts = parts
        width = t5.config.d_model
        if head == "regression":
            self.rating_head: nn.Module = RegressionHead(width, rating_offset)
        elif head == "rating_tokens":
            if not rating_token_ids or len(rating_token_ids) != len(RATINGS):
                raise ValueError(f"head 'rating_tokens' needs the ids of {RATINGS}, got {rating_token_ids}")
            scale = width**-0.5 if t5.config.scale_decoder_outputs else 1.0
            self.rating_head = RatingTokenHead(t5.lm_head, rating_token_ids, scale)
        else:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        self.early_dim = self.hidden_dim = width
        self.train_encoder = train_encoder
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.frozen = False
        self._states: dict[str, EntityStates] = {}
        if not train_encoder:
            self.t5.encoder.requires_grad_(False)

    # ------------------------------------------------------------------ encoder states

    def encode_part(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder over one part: ``[b, L] -> [b, L, d_model]``."""
        return self.t5.encoder(input_ids=ids, attention_mask=mask).last_hidden_state

    @property
    def encoder_frozen(self) -> bool:
        return self.frozen or not self.train_encoder

    def part_states(self, part: str) -> EntityStates:
        """Cached encoder states of every user or item (only while the encoder is frozen)."""
        if part not in self._states:
            tokens = self.parts.users if part == "user" else self.parts.items
            key = cache_key("t5_encoder", part, weights_digest([self.t5.encoder]), self.parts.digest())
            mode = self.t5.encoder.training
            self.t5.encoder.eval()
            device = self._device()
            try:
                self._states[part] = EntityStates.load_or_build(
                    tokens, lambda ids, mask: self.encode_part(ids.to(device), mask.to(device)),
                    key, self.cache_dir, f"T5 encoder {part}s",
                )  # fmt: skip
            finally:
                self.t5.encoder.train(mode)
        return self._states[part]

    def context(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states of each row's user and item parts, joined: ``[B, L, d]``, ``[B, L]``."""
        if isinstance(batch, ContextBatch) and batch.owner == id(self):
            return batch.states, batch.mask
        device = self._device()
        pieces, masks = [], []
        for part in ("user", "item"):
            index = batch.ids(f"{part}_id").cpu()
            if self.encoder_frozen:
                states, mask = self.part_states(part).gather(index)
            else:
                tokens = self.parts.users if part == "user" else self.parts.items
                states, mask = encode_unique(tokens, index, self.encode_part, device)
            pieces.append(states.to(device))
            masks.append(mask.to(device))
        return torch.cat(pieces, dim=1), torch.cat(masks, dim=1)

    def with_context(self, batch: Any) -> ContextBatch:
        """``batch`` carrying its encoder states, so ``early`` and ``middle`` fetch them once."""
        if isinstance(batch, ContextBatch):
            return batch
        states, mask = self.context(batch)
        return ContextBatch(batch, states, mask, id(self))

    def freeze(self) -> "T5Teacher":
        """Freeze as a committee teacher: eval mode, no gradients, encoder states cached."""
        self.frozen = True
        self.requires_grad_(False)
        return self.train(False)

    def unfreeze(self) -> "T5Teacher":
        """Back to trainable (the encoder only if ``train_encoder``); its cache is dropped."""
        self.frozen = False
        self.requires_grad_(True)
        if self.train_encoder:
            self._states = {}  # the encoder will change: cached states would be stale
        else:
            self.t5.encoder.requires_grad_(False)
        return self.train()

    def train(self, mode: bool = True) -> "T5Teacher":
        # A frozen teacher stays in eval mode even when a module holding it is put in training.
        super().train(mode and not self.frozen)
        if not self.train_encoder:
            self.t5.encoder.eval()
        return self

    def cache_stats(self) -> dict[str, dict[str, Any]]:
        """Per part: entities, file, whether this process built it, and seconds taken."""
        return {
            part: {"entities": len(s.tokens), "path": str(s.path), "built": s.built,
                   "seconds": round(s.seconds, 3), "bytes": s.states.numel() * 2}
            for part, s in self._states.items()
        }  # fmt: skip

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _blocks(self, x: torch.Tensor, blocks, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoder ``blocks`` at the single position ``x [B, 1, d]`` over encoder ``states``."""
        from transformers.masking_utils import create_bidirectional_mask  # lazy: see build_t5

        cross_mask = create_bidirectional_mask(
            config=self.t5.decoder.config, inputs_embeds=x, attention_mask=mask,
            encoder_hidden_states=states,
        )  # fmt: skip
        for block in blocks:
            # One query and one key: no causal mask, and the relative bias cannot matter.
            x = block(x, None, None, states, cross_mask, None)[0]
        return x

    def _decoder_early(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        start = torch.full(
            (states.shape[0], 1), self.t5.config.decoder_start_token_id, dtype=torch.long, device=states.device
        )
        x = self.t5.decoder.dropout(self.t5.decoder.embed_tokens(start))  # [B, 1, d]
        return self._blocks(x, self.t5.decoder.block[:1], states, mask)[:, 0]

    def _decoder_middle(self, h: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self._blocks(h.unsqueeze(1).to(states.dtype), self.t5.decoder.block[1:], states, mask)
        x = self.t5.decoder.dropout(self.t5.decoder.final_layer_norm(x))
        return x[:, 0]

    def early(self, batch: Any) -> torch.Tensor:
        states, mask = self.context(batch)
        return self._decoder_early(states, mask)  # [B, d_model]

    def middle(self, h: torch.Tensor, batch: Any = None) -> torch.Tensor:
        if batch is None:
            raise ValueError("the T5 teacher's middle needs the batch (its encoder states)")
        states, mask = self.context(batch)
        return self._decoder_middle(h, states, mask)  # [B, d_model]

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.rating_head(z)  # [B]

    def forward(self, batch: Any) -> torch.Tensor:
        # head(middle(early(batch))) with the encoder run (or its states fetched) once.
        states, mask = self.context(batch)
        return self.head(self._decoder_middle(self._decoder_early(states, mask), states, mask))


@register_model("t5", T5TeacherConfig, labels=("rating",))
def build_t5(config: T5TeacherConfig, prepared: Prepared) -> T5Teacher:
    offset = rating_offset(prepared, "t5")  # first: a click spec fails before any loading
    from transformers import T5Config, T5ForConditionalGeneration  # here: imports stay light

    if config.tokenizer:
        tokenizer_file = Path(config.tokenizer)
    elif config.path:
        tokenizer_file = Path(config.path)
    else:
        tokenizer_file = minilm_path()
    if tokenizer_file.is_dir():
        tokenizer_file = tokenizer_file / "tokenizer.json"
    tokenizer = load_tokenizer(tokenizer_file)
    pad_id = tokenizer.token_to_id("[PAD]")
    pad_id = tokenizer.token_to_id("<pad>") if pad_id is None else pad_id
    if config.path:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = check_model_folder(Path(config.path), "T5 teacher")
        t5 = T5ForConditionalGeneration.from_pretrained(str(path), dropout_rate=config.dropout)
    else:
        t5 = T5ForConditionalGeneration(
            T5Config(
                vocab_size=tokenizer.get_vocab_size(),
                d_model=config.d_model,
                d_kv=config.d_model // config.num_heads,
                d_ff=config.d_ff,
                num_layers=config.num_layers,
                num_decoder_layers=config.num_decoder_layers,
                num_heads=config.num_heads,
                dropout_rate=config.dropout,
                pad_token_id=0 if pad_id is None else pad_id,
                decoder_start_token_id=0 if pad_id is None else pad_id,
                eos_token_id=tokenizer.token_to_id("[SEP]") or 1,
            )
        )
    rating_ids = [tokenizer.token_to_id(r) for r in RATINGS]
    if config.head == "rating_tokens" and any(i is None for i in rating_ids):
        raise ValueError(f"head 'rating_tokens': the tokenizer {str(tokenizer_file)!r} lacks one of {RATINGS}")
    eos_id = special_id(tokenizer, "</s>", "[SEP]")
    parts = prompt_parts(prepared, tokenizer_file, config.max_length,
                         item_affixes=([], [] if eos_id is None else [eos_id]))  # fmt: skip
    teacher = T5Teacher(t5, parts, config.head, offset, rating_ids,
                        config.train_encoder, config.cache_dir)  # fmt: skip
    teacher.model_name, teacher.config = "t5", config  # what checkpoints record
    return teacher
