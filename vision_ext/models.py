"""Vision models in three stages: a ViT classifier (student or teacher) and a CLIP teacher.

Both are a stack of transformer layers over ``[CLS] + patch`` tokens, split at the question
layer ``Q`` (default ``num_layers // 2``), DESIGN.md section 1:

- ``early(batch) -> h [B, W]``: patch embedding, [CLS] and positions, layers ``0..Q-1``; the
  [CLS] state.
- ``middle(h, batch) -> z [B, hidden_dim]``: the same tokens with the [CLS] slot replaced by
  ``h`` (or a question), layers ``Q..L-1``, the final norm on [CLS] (and, for CLIP, the
  projection into the text space).
- ``head(z)``: class logits ``[B, C]``.

**Shared context.** The patch tokens after layer ``Q-1`` do not depend on the question, so
``with_context(batch)`` computes the lower layers once and returns an :class:`ImageContext`
that both ``early`` and ``middle`` read; ``middle`` on a plain batch computes them itself.

Batches are anything with ``.images`` ``[B, C, H, W]`` float (``vision_ext.data.ImageBatch``:
``images``, ``labels``, ``rows``). Models are built from a small spec, or from a pretrained
folder (``pretrained_path``), always offline.

Example::

    student = build_vision_model("vit", 10, {"hidden_size": 64, "num_layers": 4, "patch_size": 4})
    teacher = build_vision_model("clip", ["zero", "one", ...], {"hidden_size": 128})
    ctx = teacher.with_context(batch)
    z = teacher.middle(question, ctx)                    # [B, 384]
    served = torch.jit.trace(ServedViT(student).eval(), batch.images)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recdistill.stages import StagedModule
from recdistill.training.checkpoints import BEST, read_checkpoint, rebuild

#: How each class name becomes a sentence for the text tower (CLIP's zero-shot prompt).
DEFAULT_PROMPT = "a photo of a {}."


@dataclass
class ViTSpec:
    """A small vision transformer, or where to load a pretrained one.

    Args:
        image_size: height = width of the input images, in pixels.
        patch_size: side of a square patch; must divide ``image_size``.
        num_channels: channels of the input images (1 for MNIST-like, 3 for RGB).
        hidden_size: width ``W`` of every token state.
        num_layers: transformer layers ``L``.
        num_heads: attention heads; must divide ``hidden_size``.
        mlp_ratio: feed-forward width as a multiple of ``hidden_size`` (when
            ``intermediate_size`` is not given).
        intermediate_size: feed-forward width; ``None`` means ``mlp_ratio * hidden_size``.
        dropout: hidden and attention dropout while training.
        question_layer: ``Q``, the layer whose input [CLS] a question replaces, in
            ``[0, L)``; ``None`` means ``L // 2``.
        pretrained_path: a ``transformers`` model folder; when given, the architecture comes
            from its ``config.json`` and the fields above except ``dropout`` and
            ``question_layer`` are ignored.
    """

    image_size: int = 28
    patch_size: int = 7
    num_channels: int = 1
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    intermediate_size: int | None = None
    dropout: float = 0.0
    question_layer: int | None = None
    pretrained_path: str = ""

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} must divide hidden_size {self.hidden_size}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ValueError(f"intermediate_size must be >= 1, got {self.intermediate_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def feed_forward(self) -> int:
        """The feed-forward width of a layer."""
        return self.intermediate_size or int(round(self.mlp_ratio * self.hidden_size))


@dataclass
class CLIPSpec(ViTSpec):
    """A CLIP image tower (:class:`ViTSpec` fields) and the locked text tower it is scored against.

    Args:
        prompt_template: the sentence each class name is put in; ``{}`` marks the name.
        text_path: a BERT-style sentence encoder folder (``config.json``, weights,
            ``tokenizer.json``); empty means the shipped all-MiniLM-L6-v2. Ignored when
            ``pretrained_path`` names a full CLIP, whose own text tower is used.
    """

    prompt_template: str = DEFAULT_PROMPT
    text_path: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if "{}" not in self.prompt_template:
            raise ValueError(
                f"prompt_template must contain '{{}}' for the class name, got {self.prompt_template!r}"
            )


@dataclass
class ImageContext:
    """A batch with the token states before the question layer, computed once by ``owner``.

    Attributes:
        batch: the batch it was computed from (``labels``, ``rows``... are read through).
        tokens: ``[B, 1 + N, W]`` states entering layer ``Q``; position 0 is [CLS].
        owner: ``id()`` of the model that computed it; another model recomputes its own.
    """

    batch: Any
    tokens: torch.Tensor
    owner: int

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getattr__(self, name: str) -> Any:  # images, labels, rows, select_rows, to ...
        if name.startswith("__") or name in ("batch", "tokens", "owner"):
            raise AttributeError(name)  # not yet set (copy, pickle): no recursion
        return getattr(self.batch, name)


class SplitTower(StagedModule):
    """The stage logic both models share: transformer ``layers`` split at ``question_layer``.

    Subclasses provide ``embed(images) -> [B, 1 + N, W]`` (tokens entering layer 0) and
    ``finish(cls [B, W]) -> z [B, hidden_dim]``, and set ``layers``, ``question_layer`` and
    ``hidden_dim``.
    """

    layers: nn.ModuleList
    question_layer: int

    def embed(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def finish(self, cls: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def lower(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, C, H, W] -> tokens [B, 1 + N, W]`` entering layer ``Q``."""
        x = self.embed(images)
        for layer in self.layers[: self.question_layer]:
            x = layer(x, None)  # no attention mask: every image has all its patches
        return x

    def upper(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, 1 + N, W]`` entering layer ``Q`` ``-> z [B, hidden_dim]``."""
        for layer in self.layers[self.question_layer :]:
            tokens = layer(tokens, None)
        return self.finish(tokens[:, 0])

    def with_context(self, batch: Any) -> ImageContext:
        """``batch`` with its tokens entering layer ``Q``, computed once (or ``batch`` itself
        when it already is this model's context)."""
        if isinstance(batch, ImageContext) and batch.owner == id(self):
            return batch
        return ImageContext(batch, self.lower(images_of(batch)), id(self))

    def early(self, batch: Any) -> torch.Tensor:
        """The [CLS] state entering layer ``Q``: ``[B, W]``."""
        return self.with_context(batch).tokens[:, 0]

    def middle(self, h: torch.Tensor, batch: Any = None) -> torch.Tensor:
        """Layers ``Q..L-1`` with ``h`` ``[B, W]`` in the [CLS] slot, over ``batch``'s patch tokens.

        Raises:
            ValueError: ``batch`` is missing, or ``h`` is not ``[B, early_dim]``.
        """
        if batch is None:
            raise ValueError(f"{type(self).__name__}.middle needs the batch: h replaces only [CLS]")
        tokens = self.with_context(batch).tokens  # [B, 1 + N, W]
        if h.dim() != 2 or h.shape[0] != tokens.shape[0] or h.shape[1] != self.early_dim:
            raise ValueError(
                f"h must be [B={tokens.shape[0]}, early_dim={self.early_dim}], got {list(h.shape)}"
            )
        return self.upper(torch.cat([h.unsqueeze(1).to(tokens.dtype), tokens[:, 1:]], dim=1))


def images_of(batch: Any) -> torch.Tensor:
    """``batch.images`` ``[B, C, H, W]``; ``ValueError`` when the batch has none."""
    images = getattr(batch, "images", None)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(
            f"batch must carry images [B, C, H, W] as .images, got {type(batch).__name__} "
            f"with images={None if images is None else getattr(images, 'shape', type(images))}"
        )
    return images


def check_question_layer(question_layer: int | None, num_layers: int) -> int:
    """``question_layer`` (``None`` means ``num_layers // 2``), checked to lie in ``[0, L)``."""
    q = num_layers // 2 if question_layer is None else question_layer
    if not 0 <= q < num_layers:
        raise ValueError(f"question_layer must be in [0, {num_layers}) for {num_layers} layers, got {q}")
    return q


def check_pretrained(path: str) -> str:
    """``path``, or ``FileNotFoundError`` naming it when it is not a local model folder."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"pretrained_path {path!r} is not a model folder with a config.json")
    return path


def quiet_from_pretrained(cls: Any, path: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, **kwargs)`` offline, without the unused-weights report."""
    from transformers.utils import logging as transformers_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_pretrained(path)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return cls.from_pretrained(path, **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)


class ViTClassifier(SplitTower):
    """A ViT (``transformers.ViTModel``, no pooler) with a linear classifier on [CLS].

    Stages: ``early`` = embeddings + layers ``0..Q-1`` -> [CLS] ``[B, W]``; ``middle`` = layers
    ``Q..L-1`` + final LayerNorm -> [CLS] ``[B, W]``; ``head`` = ``Linear(W -> C)`` -> ``[B, C]``.
    The student of the vision experiments, and a teacher when bigger. :class:`ServedViT`
    wraps it for TorchScript.

    Args:
        num_classes: ``C``.
        spec: the architecture (or ``spec.pretrained_path``).

    Example::

        model = ViTClassifier(10, ViTSpec(image_size=28, patch_size=4, hidden_size=64))
        logits = model(batch)                                   # [B, 10]
        ctx = model.with_context(batch)
        assert torch.equal(model.head(model.middle(model.early(ctx), ctx)), logits)
    """

    hidden_activation = None

    def __init__(self, num_classes: int, spec: ViTSpec | None = None) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel  # lazy: importing vision_ext stays light

        spec = spec or ViTSpec()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        drop = {"hidden_dropout_prob": spec.dropout, "attention_probs_dropout_prob": spec.dropout}
        if spec.pretrained_path:
            self.vit = quiet_from_pretrained(ViTModel, spec.pretrained_path, add_pooling_layer=False, **drop)
            self.model_name = f"vit:{spec.pretrained_path}"
        else:
            config = ViTConfig(
                image_size=spec.image_size, patch_size=spec.patch_size, num_channels=spec.num_channels,
                hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                num_attention_heads=spec.num_heads, intermediate_size=spec.feed_forward, **drop,
            )  # fmt: skip
            self.vit = ViTModel(config, add_pooling_layer=False)
            self.model_name = "vit"
        self.config = spec
        self.layers = self.vit.layers
        self.question_layer = check_question_layer(spec.question_layer, len(self.layers))
        width = self.vit.config.hidden_size
        self.early_dim = self.hidden_dim = width
        self.num_classes = num_classes
        self.classifier = nn.Linear(width, num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self.vit.embeddings.patch_embeddings.projection.weight.dtype
        return self.vit.embeddings(images.to(dtype))  # [B, 1 + N, W]: [CLS] + patches + positions

    def finish(self, cls: torch.Tensor) -> torch.Tensor:
        return self.vit.layernorm(cls)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """``z [B, W] -> logits [B, C]``."""
        return self.classifier(z)


class CLIPTeacher(SplitTower):
    """A CLIP image tower scored against fixed text embeddings of the class names.

    The text side is locked: each class name, put in ``spec.prompt_template``, is embedded
    once at construction into the buffer ``class_embeddings`` ``[C, D]`` (rows L2-normalized)
    and the text model is not kept. By default the text tower is the shipped all-MiniLM-L6-v2
    (mean pooling over real tokens, then L2 norm: its sentence embedding, ``D = 384``) and the
    image tower is built from the spec with a projection ``Linear(W -> 384, bias=False)``
    (CLIP's ``visual_projection``). With ``spec.pretrained_path`` naming a full CLIP folder,
    its image tower, projection and ``logit_scale`` are loaded and its own text tower embeds
    the prompts (``D = projection_dim``).

    ``head(z) = exp(logit_scale) * normalize(z) @ class_embeddings.T``, so cross-entropy on
    these logits is CLIP's image-to-text contrastive loss against a locked text tower with
    the class prompts as the candidate texts (the mirror image of LiT, which locks the image
    tower): training the teacher with the task loss aligns its image embeddings to MiniLM's.

    Stages: ``early`` = embeddings + ``pre_layrnorm`` + layers ``0..Q-1`` -> [CLS] ``[B, W]``;
    ``middle`` = layers ``Q..L-1`` + ``post_layernorm`` on [CLS] + projection -> ``[B, D]``;
    ``head`` -> ``[B, C]``. ``hidden_dim = D``.

    Args:
        class_names: the ``C`` class names, in label order.
        spec: the image tower, prompt template and text tower.

    Example::

        teacher = CLIPTeacher([str(d) for d in range(10)], CLIPSpec(hidden_size=128))
        image_embedding = teacher.middle(teacher.early(batch), batch)  # [B, 384]
        logits = teacher.head(image_embedding)                          # [B, 10]
    """

    hidden_activation = None

    def __init__(self, class_names: Sequence[str], spec: CLIPSpec | None = None) -> None:
        super().__init__()
        from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel  # lazy

        spec = spec or CLIPSpec()
        names = [str(name) for name in class_names]
        if not names:
            raise ValueError("class_names must name at least one class")
        prompts = [spec.prompt_template.format(name) for name in names]
        if spec.pretrained_path:
            config = CLIPConfig.from_pretrained(check_pretrained(spec.pretrained_path))
            config.vision_config.attention_dropout = spec.dropout  # a composite config takes no kwargs
            clip = quiet_from_pretrained(CLIPModel, spec.pretrained_path, config=config)
            self.vision = clip.vision_model
            self.projection = clip.visual_projection
            self.logit_scale = clip.logit_scale
            text = clip_text_embeddings(clip, spec.pretrained_path, prompts)
            self.model_name = f"clip:{spec.pretrained_path}"
        else:
            config = CLIPVisionConfig(
                image_size=spec.image_size, patch_size=spec.patch_size, num_channels=spec.num_channels,
                hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                num_attention_heads=spec.num_heads, intermediate_size=spec.feed_forward,
                attention_dropout=spec.dropout,
            )  # fmt: skip
            self.vision = CLIPVisionModel(config)
            text = sentence_embeddings(prompts, spec.text_path)
            self.projection = nn.Linear(config.hidden_size, text.shape[1], bias=False)
            nn.init.normal_(self.projection.weight, std=config.hidden_size**-0.5)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's init
            self.model_name = "clip"
        self.register_buffer("class_embeddings", F.normalize(text.float(), dim=-1))  # [C, D]
        self.config = spec
        self.class_names = names
        self.layers = self.vision.encoder.layers
        self.question_layer = check_question_layer(spec.question_layer, len(self.layers))
        self.early_dim = self.vision.config.hidden_size
        self.hidden_dim = int(self.class_embeddings.shape[1])
        self.num_classes = len(names)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision.pre_layrnorm(self.vision.embeddings(images))  # [B, 1 + N, W]

    def finish(self, cls: torch.Tensor) -> torch.Tensor:
        return self.projection(self.vision.post_layernorm(cls))  # [B, D]

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """``z [B, D] -> logits [B, C]``: scaled cosine similarity to each class's text."""
        return self.logit_scale.exp() * F.normalize(z, dim=-1) @ self.class_embeddings.T


@torch.no_grad()
def sentence_embeddings(texts: Sequence[str], path: str | Path = "") -> torch.Tensor:
    """L2-normalized mean-pooled sentence embeddings ``[N, D]`` of ``texts``, offline.

    Args:
        texts: the sentences.
        path: a BERT-style encoder folder with a ``tokenizer.json``; empty means the shipped
            all-MiniLM-L6-v2 (then these are its sentence-transformers embeddings).
    """
    from recdistill.models.encoder_lm import load_encoder  # lazy: only the CLIP teacher needs it
    from recdistill.models.text import load_tokenizer, minilm_path

    folder = Path(path) if path else minilm_path()
    encoder = load_encoder(folder).eval()
    tokenizer = load_tokenizer(folder)
    encodings = tokenizer.encode_batch(list(texts))  # [CLS] ... [SEP] from the file's template
    width = max(len(e.ids) for e in encodings)
    ids = torch.zeros(len(texts), width, dtype=torch.long)
    mask = torch.zeros(len(texts), width, dtype=torch.long)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = torch.tensor(encoding.ids)
        mask[row, : len(encoding.ids)] = 1
    states = encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [N, L, D]
    weights = mask.unsqueeze(-1).to(states.dtype)
    pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def clip_text_embeddings(clip: nn.Module, path: str, texts: Sequence[str]) -> torch.Tensor:
    """A full CLIP's projected text embeddings ``[N, projection_dim]`` of ``texts``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer(list(texts), padding=True, return_tensors="pt")
    clip.eval()
    features = clip.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    features = getattr(features, "pooler_output", features)  # an output object in transformers 5
    return F.normalize(features, dim=-1)


class ServedViT(nn.Module):
    """A :class:`ViTClassifier` taking a plain image tensor, for ``torch.jit.trace``.

    Args:
        model: the trained classifier (its weights are shared, not copied).

    Example::

        served = torch.jit.trace(ServedViT(model).eval(), images)   # images [B, C, H, W]
        served.save("vit.pt"); torch.jit.load("vit.pt")(images)     # logits [B, C]
    """

    def __init__(self, model: ViTClassifier) -> None:
        super().__init__()
        if not isinstance(model, ViTClassifier):
            raise ValueError(f"model must be a ViTClassifier, got {type(model).__name__}")
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, C, H, W] -> logits [B, C]``."""
        return self.model.head(self.model.upper(self.model.lower(images)))


#: kind -> (model class, its spec class)
VISION_MODELS: dict[str, tuple[type[SplitTower], type[ViTSpec]]] = {
    "vit": (ViTClassifier, ViTSpec),
    "clip": (CLIPTeacher, CLIPSpec),
}


def unknown_spec_keys(kind: str, spec: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(unknown keys of spec, allowed keys)`` for a model of ``kind`` (a key of
    ``VISION_MODELS``): the one check :func:`build_vision_model` and config validation share."""
    allowed = [f.name for f in fields(VISION_MODELS[kind][1])]
    return sorted(set(spec) - set(allowed)), allowed


def build_vision_model(kind: str, classes: int | Sequence[str], spec: dict[str, Any] | None = None) -> SplitTower:
    """A vision model by name, from a plain dict (a YAML section).

    Args:
        kind: ``"vit"`` (:class:`ViTClassifier`) or ``"clip"`` (:class:`CLIPTeacher`).
        classes: the class names in label order, or (``"vit"`` only) their number.
        spec: fields of :class:`ViTSpec` (``"vit"``) or :class:`CLIPSpec` (``"clip"``).

    Raises:
        ValueError: an unknown ``kind``, an unknown key in ``spec``, or a class count for CLIP.

    Example::

        model = build_vision_model("vit", 10, {"hidden_size": 64, "patch_size": 4})
    """
    if kind not in VISION_MODELS:
        raise ValueError(f"unknown vision model kind {kind!r}; expected one of {', '.join(sorted(VISION_MODELS))}")
    model_cls, spec_cls = VISION_MODELS[kind]
    spec = dict(spec or {})
    unknown, allowed = unknown_spec_keys(kind, spec)
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in the {kind!r} spec; allowed: {', '.join(allowed)}"
        )
    parsed = spec_cls(**spec)
    if kind == "clip":
        if isinstance(classes, int):
            raise ValueError("classes must be the class names for 'clip' (its head embeds them), got a count")
        return CLIPTeacher(classes, parsed)
    return ViTClassifier(classes if isinstance(classes, int) else len(classes), parsed)


def load_vision_checkpoint(
    path: str | Path, classes: Sequence[str], payload: dict[str, Any] | None = None
) -> SplitTower:
    """A model's ``best.pt`` (or the folder holding it) written by a vision job or bench, rebuilt
    from its own kind and spec for the data set's ``classes`` (eval mode).

    Args:
        path: the checkpoint, or its folder.
        classes: the class names in label order.
        payload: the checkpoint already read (``read_checkpoint``), so it is not read twice.

    Raises:
        ValueError: not a checkpoint, or weights that do not fit a model of that spec.
    """
    path = Path(path)
    if path.is_dir():
        path = path / BEST
    payload = read_checkpoint(path) if payload is None else payload
    return rebuild(payload, path, lambda name, spec: build_vision_model(name.split(":")[0], classes, spec))
