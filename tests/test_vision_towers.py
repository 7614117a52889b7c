"""Any transformers vision model as BLIP-2's frozen image encoder (issue 19): tiny random towers of each family (EVA,
ours; CLIP, SigLIP, DINOv2, ConvNeXt through `Blip2BackboneVisionModel`). The frozen features equal the standalone
transformers model's on the same pixels, stage 1 and stage 2 run with the backbone frozen, save/reload (also as
remote code) is identical, and bad configs fail naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from transformers import AutoModel, BertConfig, CLIPConfig, SiglipConfig, SiglipModel, ViTConfig

import blip2_hf
from blip2_hf.modeling_blip2 import CheckpointMismatchError
from blip2_hf.testing_utils import (
    IMAGE_TOKEN,
    TINY_VISION_FAMILIES,
    make_tiny_processor,
    perturb_,
    tiny_config_dict,
    tiny_vision_config,
)

FOREIGN = [family for family in TINY_VISION_FAMILIES if family != "eva"]
DEC, SEP = 98, 3
CLASSES = {
    "model": blip2_hf.Blip2Model,
    "generation": blip2_hf.Blip2ForConditionalGeneration,
    "retrieval": blip2_hf.Blip2ForImageTextRetrieval,
    "pretraining": blip2_hf.Blip2ForPreTraining,
}
# which `hidden_states` entry the family default selects (-1: last_hidden_state) and how many tokens it gives at 32 px
DEFAULTS = {"eva": (-1, 17), "clip": (-2, 17), "siglip": (-2, 16), "dinov2": (-1, 17), "convnext": (-1, 16)}


def config_for(family: str, stage1: bool = True, **overrides) -> blip2_hf.Blip2Config:
    config = tiny_config_dict("opt", text_input=stage1, vision_config=tiny_vision_config(family), **overrides)
    if stage1:
        config["qformer_config"].update(bos_token_id=DEC, eos_token_id=SEP)
    return blip2_hf.Blip2Config(**config)


def build(name: str, family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = CLASSES[name](config_for(family, stage1=name in ("retrieval", "pretraining"), **overrides))
    return perturb_(model, seed=seed, scale=0.1).eval()


def pixels(batch_size: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


def text_batch(batch_size: int = 2) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 80, (batch_size, 7), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def standalone(family: str, folder) -> torch.nn.Module:
    """The family's own transformers model, random weights moved off their init, saved to `folder`."""
    torch.manual_seed(1)
    model = perturb_(AutoModel.from_config(tiny_vision_config(family)), seed=1, scale=0.1).eval()
    model.save_pretrained(folder)
    return model


def as_tokens(states: torch.Tensor) -> torch.Tensor:
    return states.flatten(2).transpose(1, 2) if states.dim() == 4 else states


# ---------------------------------------------------------------------------------------------------------------------
# The frozen features are the standalone model's
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FOREIGN)
def test_frozen_features_equal_the_standalone_model(family, tmp_path):
    reference = standalone(family, tmp_path)
    model = build("pretraining", family)
    assert type(model.vision_model) is blip2_hf.Blip2BackboneVisionModel
    assert type(model.vision_model.backbone) is type(reference)
    model.vision_model.load_backbone(tmp_path)
    layer, tokens = DEFAULTS[family]
    images = pixels()
    with torch.no_grad():
        out = reference(pixel_values=images, output_hidden_states=True)
    expected = as_tokens(out.last_hidden_state if layer == -1 else out.hidden_states[layer])
    features = model.encode_image_frozen(images)
    assert features.shape == (2, tokens, 32)
    assert torch.equal(features, expected)
    assert not features.requires_grad
    # the forward: post_layernorm over the same features
    embeds = model.vision_model(images).last_hidden_state
    assert torch.equal(embeds, model.vision_model.post_layernorm(expected))


def test_eva_encode_frozen_is_the_encoders_output():
    model = build("pretraining", "eva")
    images = pixels()
    vision = model.vision_model
    with torch.no_grad():
        expected = vision.encoder(vision.embeddings(images)).last_hidden_state
    assert torch.equal(model.encode_image_frozen(images), expected)
    assert torch.equal(vision.encode_frozen(images), expected)
    assert torch.equal(vision(images).last_hidden_state, vision.post_layernorm(expected))


@pytest.mark.parametrize("family", ["eva", "clip", "dinov2"])
def test_a_chosen_layer_and_patch_tokens(family):
    model = build("model", family, vision_feature_layer=1, vision_feature_select_strategy="patch")
    images = pixels()
    vision = model.vision_model
    with torch.no_grad():
        if family == "eva":
            states = vision.encoder(vision.embeddings(images), output_hidden_states=True).hidden_states
        else:
            states = vision.backbone(pixel_values=images, output_hidden_states=True).hidden_states
    features = model.encode_image_frozen(images)
    assert torch.equal(features, states[1][:, 1:])  # [CLS] dropped
    output = model.get_image_features(pixel_values=images)
    assert output.last_hidden_state.shape == (2, 16, 32)
    # no [CLS] left: the pooled feature is the mean of the tokens
    torch.testing.assert_close(output.pooler_output, output.last_hidden_state.mean(1))


def test_convnext_layer_width_follows_the_stage():
    config = config_for("convnext", vision_feature_layer=1)  # the first stage: 16 wide, 8x8
    assert config.vision_hidden_size == 16 and config.qformer_config.encoder_hidden_size == 16
    model = blip2_hf.Blip2ForPreTraining(config)
    assert model.encode_image_frozen(pixels()).shape == (2, 64, 16)
    assert config_for("convnext").vision_hidden_size == 32 and config_for("convnext").vision_image_size is None


def test_load_backbone_checks_every_tensor(tmp_path):
    model = build("pretraining", "siglip")
    deeper = tiny_vision_config("siglip")
    deeper.num_hidden_layers = 3
    AutoModel.from_config(deeper).save_pretrained(tmp_path / "deeper")
    with pytest.raises(ValueError, match=r"deeper: not the weights.*unexpected.*layers\.2\."):
        model.vision_model.load_backbone(tmp_path / "deeper")
    shallower = tiny_vision_config("siglip")
    shallower.num_hidden_layers = 1
    AutoModel.from_config(shallower).save_pretrained(tmp_path / "shallower")
    with pytest.raises(ValueError, match=r"missing.*layers\.1\."):
        model.vision_model.load_backbone(tmp_path / "shallower")
    wider = tiny_vision_config("siglip")
    wider.hidden_size, wider.num_attention_heads = 48, 4
    with pytest.raises(ValueError, match="another shape"):
        model.vision_model.load_backbone(AutoModel.from_config(wider))


def test_load_backbone_from_a_two_tower_checkpoint(tmp_path):
    """A `SiglipModel` folder (what google/siglip-* holds): its vision tower loads, the text tower is left out."""
    vision = tiny_vision_config("siglip").to_dict()
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(2)
    two_towers = SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).eval()
    two_towers.save_pretrained(tmp_path)
    model = build("pretraining", "siglip")
    model.vision_model.load_backbone(tmp_path)
    images = pixels()
    with torch.no_grad():
        expected = two_towers.vision_model(pixel_values=images, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(model.encode_image_frozen(images), expected)


# ---------------------------------------------------------------------------------------------------------------------
# Training and generation with a frozen backbone
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_VISION_FAMILIES)
def test_stage1_trains_the_bridge_not_the_backbone(family):
    model = build("pretraining", family)
    model.freeze_towers()
    model.train()
    frozen = model.vision_model.backbone if family != "eva" else model.vision_model.encoder
    assert not frozen.training and model.qformer.training
    output = model(pixel_values=pixels(), **text_batch())
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert all(param.grad is None and not param.requires_grad for param in frozen.parameters())
    assert model.vision_model.post_layernorm.weight.grad is not None
    assert model.qformer.layernorm.weight.grad is not None and model.query_tokens.grad is not None


@pytest.mark.parametrize("family", TINY_VISION_FAMILIES)
def test_stage2_generates_and_takes_cached_features(family):
    model = build("generation", family)
    images = pixels()
    ids = torch.tensor([[IMAGE_TOKEN] * 4 + [2, 7, 8]] * 2)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        from_pixels = model(pixel_values=images, input_ids=ids, attention_mask=mask).logits
        cached = model(frozen_image_states=model.encode_image_frozen(images), input_ids=ids, attention_mask=mask)
    assert torch.equal(from_pixels, cached.logits)
    generated = model.generate(pixel_values=images, max_new_tokens=3)
    assert generated.shape[0] == 2 and generated.shape[1] >= 6  # `<image>` x 4, BOS, new tokens
    soft_prompt = model.get_image_features(pixel_values=images).pooler_output
    assert soft_prompt.shape == (2, 4, 32)


@pytest.mark.parametrize("family", ["siglip", "convnext"])
def test_image_features_and_pooling_shapes(family):
    tokens = DEFAULTS[family][1]
    images = pixels()
    base = build("model", family)
    output = base.get_image_features(pixel_values=images)
    assert output.last_hidden_state.shape == (2, tokens, 32) and output.pooler_output.shape == (2, 32)
    torch.testing.assert_close(output.pooler_output, output.last_hidden_state.mean(1))  # no [CLS]: the mean
    cached = base.get_image_features(frozen_image_states=base.encode_image_frozen(images))
    assert torch.equal(cached.pooler_output, output.pooler_output)
    retrieval = build("retrieval", family)
    features = retrieval.get_image_features(images)
    assert features.last_hidden_state.shape == (2, tokens, 32) and features.pooler_output.shape == (2, 4, 256)


def test_clip_pools_its_cls_position():
    output = build("model", "clip").get_image_features(pixel_values=pixels())
    assert torch.equal(output.pooler_output, output.last_hidden_state[:, 0])


def test_freeze_towers_covers_the_backbone():
    model = build("generation", "dinov2")
    assert "vision_model.backbone" in model.frozen_towers
    model.freeze_towers(torch.bfloat16)
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in model.vision_model.backbone.parameters())
    assert model.vision_model.post_layernorm.weight.requires_grad
    assert model.vision_model.post_layernorm.weight.dtype == torch.float32
    model.train()
    assert not model.vision_model.backbone.training
    stage1 = build("pretraining", "clip")  # stage 1 freezes its encoder on construction
    assert not any(p.requires_grad for p in stage1.vision_model.backbone.parameters())


def test_interpolate_pos_encoding():
    siglip = build("model", "siglip")
    with pytest.raises(ValueError, match=r"48x48.*32x32.*interpolate_pos_encoding=True"):
        siglip.encode_image_frozen(pixels(size=48))
    assert siglip.encode_image_frozen(pixels(size=48), interpolate_pos_encoding=True).shape == (2, 36, 32)
    convnext = build("model", "convnext")
    with pytest.raises(ValueError, match="ConvNextModel has no such option"):
        convnext.encode_image_frozen(pixels(), interpolate_pos_encoding=True)
    assert convnext.encode_image_frozen(pixels(size=64)).shape == (2, 64, 32)


# ---------------------------------------------------------------------------------------------------------------------
# Save and load
# ---------------------------------------------------------------------------------------------------------------------


def outputs_of(model: torch.nn.Module, name: str) -> list[torch.Tensor]:
    images = pixels()
    with torch.no_grad():
        if name == "pretraining":
            out = model(pixel_values=images, **text_batch())
            return [out.loss_itc, model.get_image_features(images).pooler_output]
        if name == "retrieval":
            return [model(pixel_values=images, **text_batch()).logits_per_image]
        ids = torch.tensor([[IMAGE_TOKEN] * 4 + [2, 7, 8]] * 2)
        return [model(pixel_values=images, input_ids=ids, attention_mask=torch.ones_like(ids)).logits]


@pytest.mark.parametrize("family", TINY_VISION_FAMILIES)
@pytest.mark.parametrize("name", list(CLASSES))
def test_save_and_reload_identical(name, family, tmp_path):
    model = build(name, family)
    model.save_pretrained(tmp_path)
    loaded = CLASSES[name].from_pretrained(tmp_path).eval()
    assert type(loaded.config.vision_config) is type(model.config.vision_config)
    assert loaded.config.vision_feature_layer == model.config.vision_feature_layer
    for expected, got in zip(outputs_of(model, name), outputs_of(loaded, name), strict=True):
        assert torch.equal(expected, got)


@pytest.mark.parametrize("family", TINY_VISION_FAMILIES)
def test_config_round_trip(family, tmp_path):
    config = config_for(family, vision_feature_layer=-1, vision_feature_select_strategy="patch")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["vision_feature_layer"] == -1 and saved["vision_feature_select_strategy"] == "patch"
    loaded = blip2_hf.Blip2Config.from_pretrained(tmp_path)
    assert type(loaded.vision_config) is type(config.vision_config)
    assert loaded.vision_config.to_dict() == config.vision_config.to_dict()
    assert loaded.to_dict() == config.to_dict()
    assert blip2_hf.Blip2Config(**config.to_dict()).to_dict() == config.to_dict()


def test_strict_load_refuses_a_folder_without_the_backbone(tmp_path):
    model = build("generation", "siglip")
    state = {key: value for key, value in model.state_dict().items() if ".backbone." not in key}
    model.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(CheckpointMismatchError, match=r"missing.*vision_model\.backbone\."):
        blip2_hf.Blip2ForConditionalGeneration.from_pretrained(tmp_path)


def test_half_precision_load_keeps_the_backbone_in_its_dtype(tmp_path):
    """The stage-1 bridge stays fp32, but DINOv2's own `embeddings.position_embeddings` / `cls_token` (names our
    fp32 entries would match anywhere) take the frozen tower's dtype."""
    build("pretraining", "dinov2").save_pretrained(tmp_path)
    model = blip2_hf.Blip2ForPreTraining.from_pretrained(tmp_path, dtype=torch.bfloat16)
    backbone = model.vision_model.backbone
    assert backbone.embeddings.position_embeddings.dtype == torch.bfloat16
    assert backbone.embeddings.cls_token.dtype == torch.bfloat16
    assert (
        model.query_tokens.dtype == torch.float32
        and model.embeddings.position_embeddings.weight.dtype == torch.float32
    )
    assert torch.isfinite(model(pixel_values=pixels(), **text_batch()).loss)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["blip2_hf"] = None  # everything must come from the checkpoint
    import torch
    from transformers import AutoModelForImageTextToText

    folder = sys.argv[1]
    inputs = torch.load(folder + "/inputs.pt")
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    print("RESULT" + json.dumps({"class": type(model.vision_model).__name__, "logits": logits.tolist()}))
    """
)


def test_remote_code_loads_a_siglip_model(tmp_path):
    model = build("generation", "siglip")
    model.save_pretrained(tmp_path)
    # a stage-2 folder holds its processor (and its code, which the model code's lazy import needs)
    make_tiny_processor(image_size=32).without_qformer_tokenizer().save_pretrained(tmp_path)
    ids = torch.tensor([[IMAGE_TOKEN] * 4 + [2, 7, 8]] * 2)
    inputs = dict(pixel_values=pixels(), input_ids=ids, attention_mask=torch.ones_like(ids))
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(**inputs).logits
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["class"] == "Blip2BackboneVisionModel"
    assert torch.equal(torch.tensor(result["logits"]), expected)


# ---------------------------------------------------------------------------------------------------------------------
# Bad configs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [BertConfig(), CLIPConfig(), {"model_type": "bert"}, {"model_type": "clip"}])
def test_not_a_vision_model(bad):
    with pytest.raises(ValueError, match=r"Blip2Config\.vision_config = <\w+ with model_type='(bert|clip)'>"):
        blip2_hf.Blip2Config(vision_config=bad)


@pytest.mark.parametrize(
    "family, overrides, message",
    [
        ("clip", dict(vision_feature_layer=3), r"vision_feature_layer = 3 is invalid.*2-block.*\[-3, 2\]"),
        ("convnext", dict(vision_feature_layer=-4), r"vision_feature_layer = -4 is invalid.*\[-3, 2\]"),
        ("eva", dict(vision_feature_layer=5), r"vision_feature_layer = 5 is invalid"),
        ("siglip", dict(vision_feature_select_strategy="cls"), r"vision_feature_select_strategy = 'cls' is invalid"),
    ],
)
def test_bad_feature_fields_name_the_field(family, overrides, message):
    with pytest.raises(Exception, match=message):
        config_for(family, **overrides)


def test_patch_strategy_needs_a_known_layout():
    config_for("siglip", vision_feature_select_strategy="patch")  # no [CLS]: the same as "full"
    vit = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32)
    assert blip2_hf.Blip2Config(vision_config=vit).vision_feature_layer == -1  # any vision model, generic defaults
    with pytest.raises(Exception, match=r"vision_feature_select_strategy = 'patch' is invalid.*'vit'"):
        blip2_hf.Blip2Config(vision_config=vit, vision_feature_select_strategy="patch")


def test_transformers_blip2_vision_config_is_ours():
    theirs = transformers.Blip2VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    config = blip2_hf.Blip2Config(vision_config=theirs)
    assert type(config.vision_config) is blip2_hf.Blip2VisionConfig and config.vision_feature_layer == -1
