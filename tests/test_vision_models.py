"""The vision models in the stage API: ViT classifier (student/teacher), CLIP teacher, export."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch

from vision_ext.models import (
    CLIPSpec,
    CLIPTeacher,
    ImageContext,
    ServedViT,
    ViTClassifier,
    ViTSpec,
    build_vision_model,
)

TINY = dict(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_layers=4, num_heads=2)
CLASSES = ["zero", "one", "two", "three"]


@dataclass
class Images:
    """The batch protocol the models read: images, labels, rows."""

    images: torch.Tensor  # [B, 1, 28, 28]
    labels: torch.Tensor  # [B]
    rows: torch.Tensor  # [B]

    def __len__(self) -> int:
        return len(self.labels)


def images(size: int = 6, seed: int = 0) -> Images:
    g = torch.Generator().manual_seed(seed)
    return Images(torch.rand(size, 1, 28, 28, generator=g), torch.randint(0, 4, (size,), generator=g),
                  torch.arange(size))  # fmt: skip


@pytest.fixture(scope="module")
def vit() -> ViTClassifier:
    torch.manual_seed(0)
    return ViTClassifier(len(CLASSES), ViTSpec(**TINY)).eval()


@pytest.fixture(scope="module")
def clip() -> CLIPTeacher:
    """Built once: constructing it runs the real MiniLM over the class prompts."""
    torch.manual_seed(0)
    return CLIPTeacher(CLASSES, CLIPSpec(**TINY)).eval()


@pytest.fixture(params=["vit", "clip"])
def model(request, vit, clip):
    return {"vit": vit, "clip": clip}[request.param]


def test_vit_stages_compose_to_the_transformers_vit_forward(vit):
    batch = images()
    whole = vit.classifier(vit.vit(batch.images).last_hidden_state[:, 0])  # ViTModel end to end
    staged = vit.head(vit.middle(vit.early(batch), batch))
    assert staged.shape == (6, len(CLASSES))
    torch.testing.assert_close(staged, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(vit(batch), whole, atol=1e-6, rtol=0)


def test_clip_stages_compose_to_the_transformers_clip_image_features(clip):
    batch = images()
    embedding = clip.projection(clip.vision(batch.images).pooler_output)  # CLIP get_image_features
    z = clip.middle(clip.early(batch), batch)
    assert z.shape == (6, 384) and clip.hidden_dim == 384 and clip.early_dim == 32
    torch.testing.assert_close(z, embedding, atol=1e-6, rtol=0)
    torch.testing.assert_close(clip(batch), clip.head(embedding), atol=1e-6, rtol=0)


def test_stages_through_a_context_equal_forward(model):
    batch = images()
    ctx = model.with_context(batch)
    torch.testing.assert_close(model.head(model.middle(model.early(ctx), ctx)), model(batch), atol=1e-6, rtol=0)


def test_a_context_is_computed_once_and_reads_through_to_the_batch(vit, monkeypatch):
    batch = images()
    ctx = vit.with_context(batch)
    assert isinstance(ctx, ImageContext) and len(ctx) == 6
    assert ctx.labels is batch.labels and ctx.rows is batch.rows and ctx.images is batch.images
    calls = []
    monkeypatch.setattr(vit, "lower", lambda x: calls.append(x) or torch.zeros(()))
    assert vit.with_context(ctx) is ctx
    assert torch.equal(vit.early(ctx), ctx.tokens[:, 0])
    vit.middle(vit.early(ctx), ctx)
    assert calls == []


def test_another_models_context_is_not_reused(vit, clip):
    batch = images()
    ctx = vit.with_context(batch)
    torch.testing.assert_close(clip.early(ctx), clip.early(batch), atol=0, rtol=0)


def test_a_question_replaces_the_cls_token(model):
    batch, other = images(seed=0), images(seed=1)
    ctx = model.with_context(batch)
    own = model.early(ctx)
    question = torch.randn_like(own)
    asked = model.middle(question, ctx)
    assert not torch.allclose(asked, model.middle(own, ctx), atol=1e-4)
    # the rest of the tokens are the batch's own patches: other images give other answers
    assert not torch.allclose(asked, model.middle(question, model.with_context(other)), atol=1e-4)
    # a raw batch gives the same answer as its context
    torch.testing.assert_close(model.middle(question, batch), asked, atol=1e-6, rtol=0)


def test_a_question_to_a_frozen_teacher_gets_gradients_and_the_teacher_none(model):
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        batch = images()
        with torch.no_grad():
            ctx = model.with_context(batch)
        question = torch.randn(6, model.early_dim, requires_grad=True)
        torch.nn.functional.cross_entropy(model.head(model.middle(question, ctx)), batch.labels).backward()
        assert question.grad is not None and question.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.parameters())
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def test_the_split_does_not_change_forward():
    torch.manual_seed(0)
    low = ViTClassifier(4, ViTSpec(**TINY, question_layer=1)).eval()
    high = ViTClassifier(4, ViTSpec(**TINY, question_layer=3)).eval()
    high.load_state_dict(low.state_dict())
    assert (low.question_layer, high.question_layer) == (1, 3)
    assert ViTClassifier(4, ViTSpec(**TINY)).question_layer == 2  # default: num_layers // 2
    batch = images()
    torch.testing.assert_close(low(batch), high(batch), atol=1e-5, rtol=0)
    assert not torch.allclose(low.early(batch), high.early(batch), atol=1e-4)


def test_stage_attributes(vit, clip):
    assert (vit.early_dim, vit.hidden_dim, vit.hidden_activation) == (32, 32, None)
    assert (clip.early_dim, clip.hidden_dim, clip.hidden_activation) == (32, 384, None)
    assert vit.model_name == "vit" and vit.config.hidden_size == 32
    assert clip.model_name == "clip" and clip.config.prompt_template == "a photo of a {}."


def test_middle_rejects_a_missing_batch_and_a_question_of_the_wrong_width(vit):
    with pytest.raises(ValueError, match="needs the batch"):
        vit.middle(torch.zeros(6, 32))
    with pytest.raises(ValueError, match="early_dim=32"):
        vit.middle(torch.zeros(6, 31), images())


def test_clip_class_embeddings_are_the_minilm_sentence_embeddings(clip):
    from transformers import AutoModel, AutoTokenizer

    from recdistill.models.text import minilm_path

    # an independent computation: the transformers tokenizer, padding, mean pooling, L2 norm
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    minilm = AutoModel.from_pretrained(str(minilm_path())).eval()
    inputs = tokenizer([f"a photo of a {c}." for c in CLASSES], padding=True, return_tensors="pt")
    with torch.no_grad():
        states = minilm(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)

    table = clip.class_embeddings  # [C, 384]
    assert table.shape == (4, 384) and not table.requires_grad
    torch.testing.assert_close(table.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(table, expected, atol=1e-5, rtol=0)
    similarity = table @ table.T
    assert (similarity - torch.eye(4)).abs().max() < 0.99  # distinct rows
    assert "class_embeddings" in clip.state_dict()
    assert not any(name.startswith("text") for name, _ in clip.named_modules())  # MiniLM not kept


def test_identical_class_names_get_identical_rows():
    teacher = CLIPTeacher(["cat", "dog", "cat"], CLIPSpec(**{**TINY, "num_layers": 2}))
    table = teacher.class_embeddings
    assert torch.equal(table[0], table[2]) and not torch.allclose(table[0], table[1])


def test_clip_head_is_scaled_cosine_similarity_with_clips_initial_temperature(clip):
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    z = torch.randn(3, 384)
    logits = clip.head(z)
    cosine = torch.nn.functional.cosine_similarity(z[:, None], clip.class_embeddings[None], dim=-1)
    torch.testing.assert_close(logits, cosine / 0.07, atol=1e-4, rtol=0)
    torch.testing.assert_close(clip.head(5 * z), logits)  # only the direction counts


def test_build_vision_model_by_kind():
    vit = build_vision_model("vit", CLASSES, dict(TINY))
    assert isinstance(vit, ViTClassifier) and vit.num_classes == 4 and vit.config == ViTSpec(**TINY)
    assert build_vision_model("vit", 7, dict(TINY)).classifier.out_features == 7


def test_build_vision_model_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="'resnet'.*clip, vit"):
        build_vision_model("resnet", 4, {})


def test_build_vision_model_rejects_an_unknown_spec_key_by_name():
    with pytest.raises(ValueError, match="'hidden'"):
        build_vision_model("vit", 4, {"hidden": 32})
    with pytest.raises(ValueError, match="'prompt_template'"):
        build_vision_model("vit", 4, {"prompt_template": "{}"})  # a CLIP key, not a ViT one


def test_build_vision_model_needs_class_names_for_clip():
    with pytest.raises(ValueError, match="class names"):
        build_vision_model("clip", 4, dict(TINY))


@pytest.mark.parametrize(
    "bad, field",
    [({"patch_size": 5}, "patch_size"), ({"num_heads": 3}, "num_heads"),
     ({"dropout": 1.0}, "dropout"), ({"question_layer": 4}, "question_layer")],
)  # fmt: skip
def test_bad_spec_values_are_named(bad, field):
    with pytest.raises(ValueError, match=field):
        build_vision_model("vit", 4, {**TINY, **bad})


def test_pretrained_vit_folder_loads_its_weights(vit, tmp_path):
    vit.vit.save_pretrained(tmp_path)
    loaded = ViTClassifier(4, ViTSpec(pretrained_path=str(tmp_path))).eval()
    loaded.classifier.load_state_dict(vit.classifier.state_dict())
    assert loaded.model_name == f"vit:{tmp_path}" and loaded.question_layer == 2
    torch.testing.assert_close(loaded(images()), vit(images()), atol=1e-6, rtol=0)


def test_traced_student_saves_loads_and_matches(vit, tmp_path):
    example = images(size=4).images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: shape checks baked in for 28x28
        traced = torch.jit.trace(ServedViT(vit), example)
    traced.save(str(tmp_path / "vit.pt"))
    served = torch.jit.load(str(tmp_path / "vit.pt"))
    for batch in (images(size=4, seed=3), images(size=9, seed=4)):  # another batch size too
        with torch.no_grad():
            torch.testing.assert_close(served(batch.images), vit(batch), atol=1e-5, rtol=0)


def test_a_pretrained_clip_folder_brings_its_own_text_tower(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "a", "photo", "of", "cat", "dog", "."]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(tmp_path)
    text = dict(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, eos_token_id=7, pad_token_id=0, bos_token_id=0)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=28, patch_size=7, num_channels=1)  # fmt: skip
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    clip.save_pretrained(tmp_path)

    teacher = CLIPTeacher(["cat", "dog"], CLIPSpec(pretrained_path=str(tmp_path))).eval()
    batch = images(size=3)
    prompts = torch.tensor([[2, 3, 4, 2, 5, 7], [2, 3, 4, 2, 6, 7]])  # "a photo of a cat|dog ."
    expected = clip(input_ids=prompts, pixel_values=batch.images).logits_per_image  # [3, 2]
    assert teacher.hidden_dim == 24 and teacher.class_embeddings.shape == (2, 24)
    torch.testing.assert_close(teacher(batch), expected, atol=1e-5, rtol=0)


def test_a_missing_pretrained_folder_is_named():
    with pytest.raises(FileNotFoundError, match="/no/such/folder"):
        build_vision_model("clip", ["cat"], {"pretrained_path": "/no/such/folder"})
