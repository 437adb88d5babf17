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
library's own forward. The encoder states depend only on the prompt, so a frozen teacher caches
them per row (:mod:`recdistill.models.cache`) and a distillation step runs only decoder blocks.

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
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from features.batches import Batch, Prepared
from recdistill.models.cache import CachedContextTeacher
from recdistill.models.registry import register_model
from recdistill.models.text import TokenTable, check_model_folder, load_tokenizer, minilm_path, prompt_token_table

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
        max_length: prompts are truncated to this many tokens.
        head: ``"regression"`` or ``"rating_tokens"`` (expected value over "1".."5").
        cache_budget_bytes: memory for cached encoder states once frozen (fp16: 2 * d_model
            bytes a token).
    """

    path: str = ""
    tokenizer: str = ""
    d_model: int = 128
    d_ff: int = 512
    num_heads: int = 4
    num_layers: int = 2
    num_decoder_layers: int = 2
    dropout: float = 0.1
    max_length: int = 64
    head: Literal["regression", "rating_tokens"] = "regression"
    cache_budget_bytes: int = 1 << 30

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
        if self.cache_budget_bytes < 0:
            raise ValueError(f"cache_budget_bytes must be >= 0, got {self.cache_budget_bytes}")


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


class T5Teacher(CachedContextTeacher):
    """T5 over the prompt, one decoding position, in three stages.

    Args:
        t5: a ``T5ForConditionalGeneration`` with at least 2 decoder blocks.
        tokens: the token table of every rating row, in ``t5``'s vocabulary.
        head: ``"regression"`` or ``"rating_tokens"``.
        rating_offset: initial bias of the regression head (the training mean rating).
        rating_token_ids: vocabulary ids of "1".."5" (for ``"rating_tokens"``).
        cache_budget_bytes: default memory for the encoder-state cache once frozen.
    """

    def __init__(
        self,
        t5: "T5ForConditionalGeneration",
        tokens: TokenTable,
        head: str = "regression",
        rating_offset: float = 0.0,
        rating_token_ids: list[int] | None = None,
        cache_budget_bytes: int = 1 << 30,
    ):
        super().__init__()
        if len(t5.decoder.block) < 2:
            raise ValueError(f"the T5 decoder needs at least 2 blocks, has {len(t5.decoder.block)}")
        if tokens.vocab_size > t5.config.vocab_size:
            raise ValueError(
                f"tokenizer vocabulary ({tokens.vocab_size}) exceeds the model's ({t5.config.vocab_size})"
            )
        self.t5 = t5
        self.tokens = tokens
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
        self.early_dim = self.hidden_dim = self.context_width = width
        self.default_cache_budget_bytes = cache_budget_bytes

    def compute_context(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder states of the prompt: ``[B, L, d_model]``."""
        return self.t5.encoder(input_ids=ids, attention_mask=mask).last_hidden_state

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

    def early(self, batch: Batch) -> torch.Tensor:
        states, mask = self.context(batch)
        return self._decoder_early(states, mask)  # [B, d_model]

    def middle(self, h: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        if batch is None:
            raise ValueError("the T5 teacher's middle needs the batch (its encoder states)")
        states, mask = self.context(batch)
        return self._decoder_middle(h, states, mask)  # [B, d_model]

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.rating_head(z)  # [B]

    def forward(self, batch: Batch) -> torch.Tensor:
        # head(middle(early(batch))) with the encoder run (or its states fetched) once.
        states, mask = self.context(batch)
        return self.head(self._decoder_middle(self._decoder_early(states, mask), states, mask))


def _train_mean(prepared: Prepared) -> float:
    return float(prepared.data.labels[prepared.data.splits["train"]].mean())


@register_model("t5", T5TeacherConfig)
def build_t5(config: T5TeacherConfig, prepared: Prepared) -> T5Teacher:
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
    tokens = prompt_token_table(prepared, tokenizer_file, config.max_length)
    teacher = T5Teacher(t5, tokens, config.head, _train_mean(prepared), rating_ids, config.cache_budget_bytes)
    teacher.model_name, teacher.config = "t5", config  # what checkpoints record
    return teacher
