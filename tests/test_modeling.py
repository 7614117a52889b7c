"""Behaviour of the model core beyond parity: configs, other LLMs, padding, the Q-Former masks and cache, precision,
attention implementations, generation settings and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import blip2_hf
from blip2_hf import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerModel, Blip2VisionConfig
from blip2_hf.testing_utils import IMAGE_TOKEN, perturb_, tiny_config_dict

# The Salesforce/blip2-opt-2.7b config.json as published (written by transformers 4.47), legacy keys included.
SALESFORCE_OPT_CONFIG = {
    "architectures": ["Blip2ForConditionalGeneration"],
    "image_text_hidden_size": 256,
    "image_token_index": 50265,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "model_type": "blip-2",
    "num_query_tokens": 32,
    "qformer_config": {"classifier_dropout": None, "model_type": "blip_2_qformer"},
    "text_config": {
        "_name_or_path": "facebook/opt-2.7b",
        "activation_dropout": 0.0,
        "architectures": ["OPTForCausalLM"],
        "eos_token_id": 50118,
        "ffn_dim": 10240,
        "hidden_size": 2560,
        "model_type": "opt",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "prefix": "</s>",
        "torch_dtype": "float16",
        "vocab_size": 50304,
        "word_embed_proj_dim": 2560,
    },
    "torch_dtype": "float32",
    "transformers_version": "4.47.0.dev0",
    "use_decoder_only_language_model": True,
    "vision_config": {
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "model_type": "blip_2_vision_model",
        "num_channels": 3,
        "projection_dim": 512,
    },
}


def tiny_model(text: str = "opt", seed: int = 0, **overrides) -> Blip2ForConditionalGeneration:
    torch.manual_seed(seed)
    config = Blip2Config(**tiny_config_dict(text, **overrides))
    return perturb_(Blip2ForConditionalGeneration(config), seed=seed)


def prompt_ids(model, words: list[int]) -> list[int]:
    text = model.config.text_config
    image = [IMAGE_TOKEN] * model.config.num_query_tokens
    if model.config.use_decoder_only_language_model:
        return image + [text.bos_token_id] + words
    return image + words + [text.eos_token_id]


def pixels(batch_size: int = 1, seed: int = 0, size: int = 30) -> torch.Tensor:
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------


def test_salesforce_config_json_loads_as_ours(tmp_path, caplog):
    (tmp_path / "config.json").write_text(json.dumps(SALESFORCE_OPT_CONFIG))
    with caplog.at_level("WARNING"):
        config = Blip2Config.from_pretrained(tmp_path)
    assert "to instantiate a model of type" not in caplog.text
    assert config.model_type == "blip2_hf"
    assert config.vision_config.model_type == "blip2_hf_vision_model"
    assert config.qformer_config.model_type == "blip2_hf_qformer"
    assert config.text_config.model_type == "opt" and config.text_config.vocab_size == 50304
    assert config.image_token_index == config.image_token_id == 50265
    assert config.vision_config.num_hidden_layers == 39 and config.vision_config.hidden_size == 1408
    assert config.qformer_config.encoder_hidden_size == 1408
    assert config.use_decoder_only_language_model and not config.is_encoder_decoder
    config.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "blip2_hf" and saved["vision_config"]["model_type"] == "blip2_hf_vision_model"
    assert Blip2Config.from_pretrained(tmp_path / "ours").to_dict() == config.to_dict()


def test_text_config_families():
    for text, decoder_only in (("opt", True), ("t5", False), ("llama", True), ("qwen2", True)):
        config = Blip2Config(**tiny_config_dict(text))
        assert config.use_decoder_only_language_model is decoder_only
        assert config.is_encoder_decoder is (not decoder_only)


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: Blip2VisionConfig(hidden_size=30, num_attention_heads=4), "hidden_size"),
        (lambda: Blip2VisionConfig(image_size=30, patch_size=7), "image_size"),
        (lambda: Blip2VisionConfig(hidden_act="swishy"), "hidden_act"),
        (lambda: blip2_hf.Blip2QFormerConfig(cross_attention_frequency=0), "cross_attention_frequency"),
        (lambda: blip2_hf.Blip2QFormerConfig(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
        (lambda: Blip2Config(num_query_tokens=0), "num_query_tokens"),
        (lambda: Blip2Config(**tiny_config_dict("opt", image_token_index=500)), "image_token_index"),
        (lambda: Blip2Config(text_config={"model_type": "clip_vision_model"}), "text_config"),
        (lambda: Blip2Config(initial_temperature=-1.0), "initial_temperature"),
    ],
)
def test_invalid_config_values_name_the_field(build, field):
    with pytest.raises(Exception, match=rf"\.{field} = .* invalid: expected"):
        build()


# ---------------------------------------------------------------------------------------------------------------------
# Language models
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["llama", "qwen2"])
def test_other_decoder_llms_train_and_generate(text):
    model = tiny_model(text)
    input_ids = torch.tensor([prompt_ids(model, [5, 6, 7, 8])])
    labels = input_ids.clone()
    labels[:, : model.config.num_query_tokens + 1] = -100
    model.train()
    loss = model(pixel_values=pixels(), input_ids=input_ids, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert model.query_tokens.grad.abs().sum() > 0
    assert model.qformer.encoder.layer[0].crossattention.attention.key.weight.grad.abs().sum() > 0
    model.eval()
    out = model.generate(pixel_values=pixels(), input_ids=input_ids, max_new_tokens=4)
    assert out.shape == (1, input_ids.shape[1] + 4)
    assert torch.equal(out[:, : input_ids.shape[1]], input_ids)  # decoder-only: the output starts with the prompt
    assert model.generate(pixel_values=pixels(2), max_new_tokens=3).shape == (2, model.config.num_query_tokens + 4)


@pytest.mark.parametrize("text", ["opt", "llama", "qwen2", "t5"])
def test_left_padded_batch_equals_each_prompt_alone(text):
    model = tiny_model(text)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    images = pixels(3, seed=3)
    pad = model.config.text_config.pad_token_id
    rows = [prompt_ids(model, p) for p in prompts]
    width = max(map(len, rows))
    batch = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    for kwargs in (dict(max_new_tokens=5), dict(max_new_tokens=4, num_beams=3)):
        together = model.generate(pixel_values=images, input_ids=batch, attention_mask=mask, **kwargs)
        for i, row in enumerate(rows):
            alone = model.generate(pixel_values=images[i : i + 1], input_ids=torch.tensor([row]), **kwargs)
            new_alone = alone[0, len(row) :] if model.config.use_decoder_only_language_model else alone[0]
            new_together = together[i, width:] if model.config.use_decoder_only_language_model else together[i]
            n = min(len(new_alone), len(new_together))
            assert torch.equal(new_alone[:n], new_together[:n]), (text, kwargs, i, alone, together)


def test_t5_image_only_generation_without_bos_token():
    config = tiny_config_dict("t5")
    del config["text_config"]["bos_token_id"]
    torch.manual_seed(0)
    model = perturb_(Blip2ForConditionalGeneration(Blip2Config(**config)))
    ids = model._image_only_input_ids(2, torch.device("cpu"))
    assert ids[0].tolist() == [IMAGE_TOKEN] * 4 + [1]  # image tokens then `</s>`, as T5 tokenizes an empty prompt
    out = model.generate(pixel_values=pixels(2), max_new_tokens=3)
    assert out.shape[0] == 2 and out[0, 0].item() == 0  # decoder output only, starting at decoder_start_token_id


def test_generation_config_is_honoured(tmp_path):
    model = tiny_model("opt")
    model.generation_config.max_new_tokens = 3
    model.generation_config.eos_token_id = None  # no early stop: the length is the setting's
    model.save_pretrained(tmp_path)
    loaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.generation_config.max_new_tokens == 3
    input_ids = torch.tensor([prompt_ids(loaded, [5, 6])])
    assert loaded.generate(pixel_values=pixels(), input_ids=input_ids).shape[1] == input_ids.shape[1] + 3
    assert (
        loaded.generate(pixel_values=pixels(), input_ids=input_ids, max_new_tokens=5).shape[1]
        == input_ids.shape[1] + 5
    )
    assert loaded.generation_config.max_new_tokens == 3  # a call's arguments do not leak into the model's settings


def test_labels_give_the_causal_lm_loss_over_text_only():
    model = tiny_model("opt")
    input_ids = torch.tensor([prompt_ids(model, [5, 6, 7, 8])])
    labels = input_ids.clone()
    labels[:, :5] = -100
    out = model(pixel_values=pixels(), input_ids=input_ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    # labels that cover only the text after the image tokens give the same loss
    short = model(pixel_values=pixels(), input_ids=input_ids, labels=labels[:, 4:]).loss
    assert torch.allclose(short, out.loss, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Q-Former masks and cache
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qformer_setup():
    torch.manual_seed(0)
    config = Blip2Config(**tiny_config_dict("opt", text_input=True))
    model = perturb_(blip2_hf.Blip2ForImageTextRetrieval(config))
    generator = torch.Generator().manual_seed(1)
    image_embeds = torch.randn(2, 26, 32, generator=generator)
    text_ids = torch.randint(5, 80, (2, 6), generator=generator)
    queries = model.query_tokens.expand(2, -1, -1).detach()
    return model, image_embeds, queries, text_ids


def run_qformer(model, queries, text_ids, image_embeds, mask, **kwargs):
    with torch.no_grad():
        return model.qformer(
            query_embeds=queries,
            text_embeds=None if text_ids is None else model.embeddings(text_ids),
            encoder_hidden_states=image_embeds,
            self_attention_mask=mask,
            **kwargs,
        ).last_hidden_state


def test_bidirectional_mask_lets_queries_see_text(qformer_setup):
    model, image, queries, text = qformer_setup
    changed = text.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 80
    a = run_qformer(model, queries, text, image, "bidirectional")
    b = run_qformer(model, queries, changed, image, "bidirectional")
    assert not torch.allclose(a[:, :4], b[:, :4])  # queries see the last text token
    assert not torch.allclose(a[:, 4], b[:, 4])  # and so does the first text token


def test_unimodal_mask_equals_separate_passes(qformer_setup):
    model, image, queries, text = qformer_setup
    joint = run_qformer(model, queries, text, image, "unimodal")
    queries_alone = run_qformer(model, queries, None, image, "bidirectional")
    with torch.no_grad():
        text_alone = model.qformer(text_embeds=model.embeddings(text)).last_hidden_state
    assert torch.allclose(joint[:, :4], queries_alone, atol=1e-6)
    assert torch.allclose(joint[:, 4:], text_alone, atol=1e-6)
    changed_queries = run_qformer(model, queries + 1.0, text, image, "unimodal")
    assert torch.allclose(changed_queries[:, 4:], joint[:, 4:], atol=1e-6)  # text never sees the queries


def test_multimodal_causal_mask(qformer_setup):
    model, image, queries, text = qformer_setup
    joint = run_qformer(model, queries, text, image, "multimodal_causal")
    queries_alone = run_qformer(model, queries, None, image, "bidirectional")
    assert torch.allclose(joint[:, :4], queries_alone, atol=1e-6)  # queries never see text
    for k in range(text.shape[1]):
        changed = text.clone()
        changed[:, k] = (changed[:, k] + 7) % 80
        other = run_qformer(model, queries, changed, image, "multimodal_causal")
        assert torch.allclose(other[:, : 4 + k], joint[:, : 4 + k], atol=1e-6)  # nothing before token k moves
        assert not torch.allclose(other[:, 4 + k], joint[:, 4 + k])  # token k itself does
    other_image = run_qformer(model, queries, text, image + 1.0, "multimodal_causal")
    assert not torch.allclose(other_image[:, 4:], joint[:, 4:])  # text sees the image through the queries


def test_query_cache_reuse_equals_joint_causal_pass(qformer_setup):
    model, image, queries, text = qformer_setup
    joint = run_qformer(model, queries, text, image, "multimodal_causal")
    with torch.no_grad():
        query_pass = model.qformer(query_embeds=queries, encoder_hidden_states=image, use_cache=True)
        cache = query_pass.cache
        assert cache.get_seq_length() == 4
        # whole text at once against the cached queries
        text_pass = model.qformer(
            text_embeds=model.embeddings(text), self_attention_mask="multimodal_causal", cache=cache
        )
        assert torch.allclose(text_pass.last_hidden_state, joint[:, 4:], atol=1e-5)
        # token by token (generation): positions continue after the text already cached
        cache = model.qformer(query_embeds=queries, encoder_hidden_states=image, use_cache=True).cache
        for k in range(text.shape[1]):
            step = model.qformer(
                text_embeds=model.embeddings(text[:, k : k + 1], past_text_length=k),
                self_attention_mask="multimodal_causal",
                cache=cache,
                use_cache=True,
            )
            assert torch.allclose(step.last_hidden_state[:, 0], joint[:, 4 + k], atol=1e-5)
        assert cache.get_seq_length() == 4 + text.shape[1]


def test_text_padding_is_ignored(qformer_setup):
    model, image, queries, text = qformer_setup
    mask = torch.ones_like(text)
    mask[:, 4:] = 0
    padded = run_qformer(model, queries, text, image, "bidirectional", attention_mask=mask)
    other = text.clone()
    other[:, 4:] = 3
    repadded = run_qformer(model, queries, other, image, "bidirectional", attention_mask=mask)
    short = run_qformer(model, queries, text[:, :4], image, "bidirectional")
    assert torch.allclose(padded[:, :8], repadded[:, :8], atol=1e-6)
    assert torch.allclose(padded[:, :8], short, atol=1e-5)


def test_qformer_errors(qformer_setup):
    model, image, queries, text = qformer_setup
    with pytest.raises(ValueError, match="'bidirectional', 'unimodal' or 'multimodal_causal'"):
        run_qformer(model, queries, text, image, "causal")
    cache = model.qformer(query_embeds=queries, encoder_hidden_states=image, use_cache=True).cache
    with pytest.raises(ValueError, match="cannot be used with a cache"):
        model.qformer(text_embeds=model.embeddings(text), self_attention_mask="unimodal", cache=cache)
    with pytest.raises(ValueError, match="attention_mask has 3 columns; expected 6"):
        run_qformer(model, queries, text, image, "bidirectional", attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model.qformer(query_embeds=queries)
    stage2 = Blip2QFormerModel(
        blip2_hf.Blip2QFormerConfig(**tiny_config_dict("opt")["qformer_config"], encoder_hidden_size=32)
    )
    with pytest.raises(ValueError, match="use_qformer_text_input=True"):
        stage2(query_embeds=queries, text_embeds=torch.zeros(2, 3, 32), encoder_hidden_states=image)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model.embeddings(torch.zeros(1, 65, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------------
# Inputs, precision, attention implementations, training utilities
# ---------------------------------------------------------------------------------------------------------------------


def test_bad_inputs_get_clear_errors():
    model = tiny_model("opt")
    ids = torch.tensor([prompt_ids(model, [5, 6])])
    with pytest.raises(ValueError, match=r"has 3 image tokens \(id 90\) but .*num_query_tokens=4"):
        model(pixel_values=pixels(), input_ids=ids[:, 1:])
    with pytest.raises(ValueError, match="has 0 image tokens"):
        model(pixel_values=pixels(), input_ids=torch.tensor([[2, 5, 6]]))
    with pytest.raises(ValueError, match="pixel_values are 40x40 .* 30x30 .*interpolate_pos_encoding=True"):
        model(pixel_values=pixels(size=40), input_ids=ids)
    with pytest.raises(ValueError, match=r"shape \[batch, 3, height, width\], got \(1, 30, 30\)"):
        model(pixel_values=torch.zeros(1, 30, 30), input_ids=ids)


def test_position_interpolation_matches_transformers_at_a_larger_size(tmp_path):
    # 30 px / patch 6 = 5x5 positions trained; run at 42 px = 7x7, as a 224 px encoder runs at 364 px (16x16 -> 26x26)
    torch.manual_seed(0)
    config = tiny_config_dict("opt")
    reference = perturb_(transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(**config)))
    reference.save_pretrained(tmp_path)
    ours = Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids = torch.tensor([prompt_ids(ours, [5, 6])])
    big = pixels(size=42)
    with torch.no_grad():
        expected = reference(pixel_values=big, input_ids=ids, interpolate_pos_encoding=True).logits
        actual = ours(pixel_values=big, input_ids=ids, interpolate_pos_encoding=True).logits
    assert torch.allclose(expected, actual, atol=1e-5)
    assert ours.vision_model(big, interpolate_pos_encoding=True).last_hidden_state.shape == (1, 50, 32)


def test_query_tokens_are_initialized_like_lavis_not_zero():
    model = Blip2ForConditionalGeneration(Blip2Config(**tiny_config_dict("opt", num_query_tokens=32)))
    std = model.query_tokens.std().item()
    assert 0.015 < std < 0.025
    retrieval = blip2_hf.Blip2ForImageTextRetrieval(Blip2Config(**tiny_config_dict("opt", text_input=True)))
    assert retrieval.temp.item() == pytest.approx(0.07)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_the_bridge_in_fp32(tmp_path, dtype):
    tiny_model("opt").save_pretrained(tmp_path)
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype).eval()
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == dtype
    assert model.language_model.lm_head.weight.dtype == dtype
    assert model.query_tokens.dtype == torch.float32
    assert model.qformer.encoder.layer[0].attention.attention.query.weight.dtype == torch.float32
    assert model.language_projection.weight.dtype == torch.float32
    ids = torch.tensor([prompt_ids(model, [5, 6])])
    if dtype == torch.bfloat16:  # fp16 matmuls are not implemented for every op on CPU
        out = model(pixel_values=pixels(), input_ids=ids)
        assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()
        assert out.qformer_outputs.last_hidden_state.dtype == torch.float32
        assert model.generate(pixel_values=pixels(), input_ids=ids, max_new_tokens=2).shape[1] == ids.shape[1] + 2


def test_eager_and_sdpa_agree_and_can_be_switched(tmp_path):
    tiny_model("opt").save_pretrained(tmp_path)
    sdpa = Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    eager = Blip2ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert sdpa.config.vision_config._attn_implementation == "sdpa"
    assert eager.config.qformer_config._attn_implementation == "eager"
    ids = torch.tensor([prompt_ids(sdpa, [5, 6, 7])])
    with torch.no_grad():
        a = sdpa(pixel_values=pixels(), input_ids=ids).logits
        b = eager(pixel_values=pixels(), input_ids=ids).logits
        sdpa.set_attn_implementation("eager")
        c = sdpa(pixel_values=pixels(), input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5) and torch.equal(b, c)
    assert sdpa.config.qformer_config._attn_implementation == "eager"
    out = eager(pixel_values=pixels(), input_ids=ids, output_attentions=True)
    assert out.vision_outputs.attentions[0].shape == (1, 4, 26, 26)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model("opt")
    ids = torch.tensor([prompt_ids(model, [5, 6, 7])])

    def grads():
        torch.manual_seed(0)  # the same dropout masks (checkpointing replays the RNG state)
        model.zero_grad()
        model.train()
        model(pixel_values=pixels(), input_ids=ids, labels=ids).loss.backward()
        return model.query_tokens.grad.clone(), model.vision_model.embeddings.patch_embedding.weight.grad.clone()

    plain = grads()
    model.activation_checkpointing_enable()
    assert model.qformer.encoder.layer[0].gradient_checkpointing
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, atol=1e-6)


def test_device_map_never_splits_a_layer():
    from transformers.integrations.accelerate import infer_auto_device_map

    model = tiny_model("opt")
    assert {"Blip2EncoderLayer", "Blip2QFormerLayer", "OPTDecoderLayer"} <= set(model._no_split_modules)
    # a first device too small for the model: the map must cut between whole layers
    device_map = infer_auto_device_map(
        model, max_memory={"cpu": 60_000, "disk": 10**9}, no_split_module_classes=model._no_split_modules
    )
    assert set(device_map.values()) == {"cpu", "disk"}
    for name in device_map:
        parts = name.split(".")
        for stack in ("layers", "layer"):
            if stack in parts:  # a layer is placed whole: the key ends at the layer index
                assert parts.index(stack) == len(parts) - 2, name


def test_tuple_outputs():
    model = tiny_model("opt")
    ids = torch.tensor([prompt_ids(model, [5, 6])])
    with torch.no_grad():
        as_tuple = model(pixel_values=pixels(), input_ids=ids, return_dict=False)
        as_dict = model(pixel_values=pixels(), input_ids=ids)
    assert torch.equal(as_tuple[0], as_dict.logits)


def test_cached_frozen_image_states_and_frozen_towers():
    model = tiny_model("opt")
    ids = torch.tensor([prompt_ids(model, [5, 6])] * 2)
    images = pixels(2)
    with torch.no_grad():
        frozen = model.encode_image_frozen(images)  # what a frozen-feature cache stores (before post_layernorm)
        a = model(pixel_values=images, input_ids=ids).logits
        b = model(frozen_image_states=frozen, input_ids=ids).logits
    assert torch.equal(a, b)
    assert torch.equal(
        model.generate(pixel_values=images, input_ids=ids, max_new_tokens=3),
        model.generate(frozen_image_states=frozen, input_ids=ids, max_new_tokens=3),
    )
    with pytest.raises(ValueError, match="not both"):
        model(pixel_values=images, frozen_image_states=frozen, input_ids=ids)
    # the old name is refused, not swallowed by **kwargs: transformers' `image_embeds` is after post_layernorm
    for call in (model, model.generate, model.get_image_features):
        with pytest.raises(TypeError, match="as `frozen_image_states`"):
            call(image_embeds=frozen, input_ids=ids)
    model.freeze_vision_encoder()
    model.freeze_language_model()
    model.train()
    assert not model.vision_model.encoder.training and not model.language_model.training
    assert model.qformer.training and model.vision_model.post_layernorm.training
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {
        "vision_model",
        "query_tokens",
        "qformer",
        "language_projection",
    }


def _stem_config(**overrides) -> Blip2VisionConfig:
    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32)
    return Blip2VisionConfig(**{**values, "patch_size": 8, "conv_stem_channels": [4, 8, 16], **overrides})


def test_conv_stem_replaces_the_patch_convolution(tmp_path):
    """`conv_stem_channels`: three 3x3 stride-2 convolutions (GroupNorm, GELU) and a 1x1 projection give the same
    token grid as one 8x8 patch convolution; the weights save and load under `embeddings.patch_embedding.*`."""
    torch.manual_seed(0)
    model = blip2_hf.Blip2VisionModel(_stem_config()).eval()
    stem = model.embeddings.patch_embedding
    pixel_values = torch.randn(2, 3, 32, 32)
    hidden = pixel_values
    for conv, norm in zip(stem.convs, stem.norms):  # the stem by hand
        assert conv.stride == (2, 2) and conv.kernel_size == (3, 3)
        hidden = torch.nn.functional.gelu(torch.nn.functional.group_norm(conv(hidden), 1, norm.weight, norm.bias))
    expected = stem.proj(hidden).flatten(2).transpose(1, 2)
    tokens = model.embeddings(pixel_values)
    assert tokens.shape == (2, 1 + 16, 32)
    torch.testing.assert_close(tokens[:, 1:] - model.embeddings.position_embedding[:, 1:], expected)

    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["conv_stem_channels"] == [4, 8, 16]
    loaded = blip2_hf.Blip2VisionModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(pixel_values).last_hidden_state, model(pixel_values).last_hidden_state)
    half = blip2_hf.Blip2VisionModel.from_pretrained(tmp_path, dtype=torch.float16)
    assert half(pixel_values).last_hidden_state.dtype == torch.float16


@pytest.mark.parametrize(
    "overrides, field", [({"patch_size": 4}, "patch_size"), ({"conv_stem_channels": []}, "conv_stem_channels"),
                         ({"conv_stem_channels": [4, 0, 8]}, "conv_stem_channels")],
)  # fmt: skip
def test_conv_stem_config_is_validated(overrides, field):
    with pytest.raises(Exception, match=field):
        _stem_config(**overrides)
