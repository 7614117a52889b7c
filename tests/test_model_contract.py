"""The contract every transformers model keeps, checked on each of our model classes at tiny size: the output
switches (keyword, else config), the `get_*_features` outputs, the output fields, `_keep_in_fp32_modules_strict`,
weight initialization, state-dict round trips, gradient checkpointing, sdpa against eager, batching, embedding
resizing and the train/eval modes of frozen towers. Our own tests of transformers' conventions (see issue 18)."""

from __future__ import annotations

import dataclasses
import io
import re

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling, BaseModelOutputWithPoolingAndCrossAttentions
from transformers.models.blip_2 import modeling_blip_2 as reference

import blip2_hf
from blip2_hf import modeling_blip2 as ours
from blip2_hf.testing_utils import IMAGE_TOKEN, tiny_config_dict

BATCH, QUERIES, TEXT_LENGTH, PATCHES = 3, 4, 6, 1 + (30 // 6) ** 2
VISION_LAYERS, QFORMER_LAYERS, LLM_LAYERS = 2, 3, 2
CLASSES = ("vision", "qformer", "model", "generation", "retrieval", "pretraining")


def tiny_config(text: str = "opt", stage1: bool = False) -> blip2_hf.Blip2Config:
    """Tiny config without dropout, so that train-mode passes are deterministic."""
    config = tiny_config_dict(text, num_query_tokens=QUERIES, text_input=stage1)
    config["qformer_config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if text == "t5":
        config["text_config"].update(dropout_rate=0.0)
    else:
        config["text_config"].update(dropout=0.0, attention_dropout=0.0)
    if stage1:  # Q-Former text: [DEC] and [SEP] ids of the tiny vocabulary
        config.update(image_token_index=None)
        config["qformer_config"].update(bos_token_id=97, eos_token_id=98, pad_token_id=0)
    return blip2_hf.Blip2Config(**config)


def build(name: str, seed: int = 0, text: str = "opt") -> torch.nn.Module:
    torch.manual_seed(seed)
    stage1 = name in ("retrieval", "pretraining", "qformer")
    config = tiny_config(text, stage1)
    if name == "vision":
        return blip2_hf.Blip2VisionModel(config.vision_config)
    if name == "qformer":
        return blip2_hf.Blip2QFormerModel(config.qformer_config)
    cls = {
        "model": blip2_hf.Blip2Model,
        "generation": blip2_hf.Blip2ForConditionalGeneration,
        "retrieval": blip2_hf.Blip2ForImageTextRetrieval,
        "pretraining": blip2_hf.Blip2ForPreTraining,
    }[name]
    return cls(config)


def inputs_for(name: str, batch: int = BATCH, seed: int = 0) -> dict:
    """Model inputs of `batch` rows; the rows differ from each other."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, 30, 30, generator=generator)
    words = torch.randint(4, 89, (batch, TEXT_LENGTH), generator=generator)
    if name == "vision":
        return {"pixel_values": pixel_values}
    if name == "qformer":
        return {
            "query_embeds": torch.randn(batch, QUERIES, 32, generator=generator),
            "text_embeds": torch.randn(batch, TEXT_LENGTH, 32, generator=generator),
            "encoder_hidden_states": torch.randn(batch, PATCHES, 32, generator=generator),
        }
    if name in ("model", "generation"):  # LLM prompt: image placeholders, BOS, words
        prefix = torch.tensor([IMAGE_TOKEN] * QUERIES + [2]).expand(batch, -1)
        input_ids = torch.cat([prefix, words], dim=1)
        return {"pixel_values": pixel_values, "input_ids": input_ids, "labels": input_ids.clone()}
    words[:, 0] = 5  # stands for [CLS]
    return {"pixel_values": pixel_values, "input_ids": words, "attention_mask": torch.ones_like(words)}


def main_output(name: str, output) -> torch.Tensor:
    if name in ("vision", "qformer"):
        return output.last_hidden_state
    if name == "retrieval":
        return output.logits_per_image
    if name == "pretraining":
        return output.loss
    return output.logits


def eager(model: torch.nn.Module) -> torch.nn.Module:
    model.set_attn_implementation("eager")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Output switches: the keyword when given, else the config
# ---------------------------------------------------------------------------------------------------------------------


def recorded(name: str, output) -> dict[str, list]:
    """Per tower, its recorded hidden states and attentions (None where not recorded)."""
    if name in ("vision", "qformer"):
        return {name: [output.hidden_states, output.attentions]}
    if name == "retrieval":
        towers = {"vision": output.vision_model_output, "qformer": output.text_model_output}
    else:
        towers = {
            "vision": output.vision_outputs,
            "qformer": output.qformer_outputs,
            "llm": output.language_model_outputs,
        }
    return {tower: [out.hidden_states, out.attentions] for tower, out in towers.items()}


@pytest.mark.parametrize("name", ["vision", "qformer", "model", "generation", "retrieval"])
def test_config_output_switches_are_honoured(name):
    model = eager(build(name))
    inputs = inputs_for(name, batch=1)
    with torch.no_grad():
        plain = model(**inputs)
        assert all(value is None for pair in recorded(name, plain).values() for value in pair)
        model.config.output_hidden_states = True
        model.config.output_attentions = True
        switched = model(**inputs)
        for tower, (hidden_states, attentions) in recorded(name, switched).items():
            assert hidden_states is not None and attentions is not None, tower
        # a keyword wins over the config
        overridden = model(**inputs, output_hidden_states=False, output_attentions=False)
        assert all(value is None for pair in recorded(name, overridden).values() for value in pair)
        model.config.return_dict = False
        as_tuple = model(**inputs, output_hidden_states=False, output_attentions=False)
        as_dict = model(**inputs, return_dict=True)
    assert isinstance(as_tuple, tuple) and isinstance(as_dict, dict)
    torch.testing.assert_close(as_tuple[0], as_dict[0])  # the first field set: loss, logits or last_hidden_state


def test_pretraining_return_dict_follows_the_config():
    model = build("pretraining").eval()
    inputs = inputs_for("pretraining")
    model.config.return_dict = False
    with torch.no_grad():
        torch.manual_seed(0)
        as_tuple = model(**inputs)
        torch.manual_seed(0)
        as_dict = model(**inputs, return_dict=True)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)


# ---------------------------------------------------------------------------------------------------------------------
# get_*_features
# ---------------------------------------------------------------------------------------------------------------------

# (model, method, layers of the tower whose hidden states / attentions the output carries)
FEATURE_METHODS = [
    ("model", "get_image_features", VISION_LAYERS),
    ("generation", "get_image_features", VISION_LAYERS),
    ("model", "get_text_features", LLM_LAYERS),
    ("retrieval", "get_image_features", VISION_LAYERS),
    ("retrieval", "get_text_features", QFORMER_LAYERS),
    ("pretraining", "get_image_features", VISION_LAYERS),
    ("pretraining", "get_text_features", QFORMER_LAYERS),
]


def feature_inputs(name: str, method: str) -> dict:
    inputs = inputs_for(name, batch=2)
    if method == "get_image_features":
        return {"pixel_values": inputs["pixel_values"]}
    if name == "model":
        return {"input_ids": inputs["input_ids"][:, QUERIES:]}  # the LLM's text, without placeholders
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


@pytest.mark.parametrize("name, method, layers", FEATURE_METHODS)
def test_get_features_contract(name, method, layers):
    model = eager(build(name))
    get_features = getattr(model, method)
    inputs = feature_inputs(name, method)
    with torch.no_grad():
        plain = get_features(**inputs)
        assert isinstance(plain, BaseModelOutputWithPooling)
        assert plain.hidden_states is None and plain.attentions is None
        recorded = get_features(**inputs, output_hidden_states=True, output_attentions=True)
        assert len(recorded.hidden_states) == layers + 1 and len(recorded.attentions) == layers
        as_tuple = get_features(**inputs, return_dict=False)
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], plain.last_hidden_state)
        # the config's switches when no keyword is given
        model.config.output_hidden_states = True
        model.config.return_dict = False
        from_config = get_features(**inputs)
        with_hidden_states = get_features(**inputs, output_hidden_states=True, return_dict=True)
    assert isinstance(from_config, tuple) and with_hidden_states.hidden_states is not None
    assert len(from_config) == len(with_hidden_states.to_tuple()) == len(plain.to_tuple()) + 1


def test_stage1_features_are_the_retrieval_scores():
    """`pooler_output` of the stage-1 feature methods are the ITC features the retrieval model scores with."""
    model = build("retrieval").eval()
    inputs = inputs_for("retrieval")
    with torch.no_grad():
        image = model.get_image_features(inputs["pixel_values"])
        text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        scores = model(**inputs).logits_per_image
    assert image.pooler_output.shape == (BATCH, QUERIES, model.config.image_text_hidden_size)
    assert image.last_hidden_state.shape == (BATCH, PATCHES, 32)
    assert text.pooler_output.shape == (BATCH, model.config.image_text_hidden_size)
    torch.testing.assert_close(torch.linalg.vector_norm(text.pooler_output, dim=-1), torch.ones(BATCH))
    expected = torch.einsum("iqe,te->iqt", image.pooler_output, text.pooler_output).max(dim=1).values
    torch.testing.assert_close(scores, expected)


def test_image_features_of_blip2_model_are_the_vision_output():
    """transformers 5's `Blip2Model.get_image_features`: the vision model's output (`pooler_output [B, Dv]`), not the
    soft prompt, which only `Blip2ForConditionalGeneration.get_image_features` returns (as there)."""
    model = eager(build("model"))
    inputs = inputs_for("model", batch=2)
    pixel_values = inputs["pixel_values"]
    with torch.no_grad():
        features = model.get_image_features(pixel_values, output_attentions=True)
        vision = model.vision_model(pixel_values, output_attentions=True)
        frozen = model.get_image_features(frozen_image_states=model.encode_image_frozen(pixel_values))
        output = model(**inputs)
        # its features go back in as transformers' pre-encoded images: the Q-Former runs on them
        reused = model(input_ids=inputs["input_ids"], mm_encoder_outputs={"image": features})
    assert type(features) is BaseModelOutputWithPooling
    assert features.pooler_output.shape == (2, 32)
    for key in ("last_hidden_state", "pooler_output"):
        torch.testing.assert_close(features[key], vision[key], rtol=0, atol=0)
        torch.testing.assert_close(frozen[key], vision[key])
    assert len(features.attentions) == VISION_LAYERS
    torch.testing.assert_close(reused.logits, output.logits)
    with torch.no_grad():
        generation = build("generation").eval().get_image_features(pixel_values)
    assert generation.pooler_output.shape == (2, QUERIES, model.config.text_config.hidden_size)
    torch.testing.assert_close(generation.pooler_output, output.image_outputs.pooler_output)


@pytest.mark.parametrize("name", ["model", "generation"])
def test_image_features_equal_transformers(name, tmp_path):
    """Both classes' `get_image_features` against transformers' own on the same weights: the vision output
    (`Blip2Model`), the soft prompt (`Blip2ForConditionalGeneration`)."""
    ours_model = build("generation").eval()
    ours_model.save_pretrained(tmp_path)
    if name == "model":
        ours_model = blip2_hf.Blip2Model.from_pretrained(tmp_path).eval()
    reference_class = reference.Blip2Model if name == "model" else reference.Blip2ForConditionalGeneration
    theirs = reference_class.from_pretrained(tmp_path).eval()
    pixel_values = inputs_for(name, batch=2)["pixel_values"]
    with torch.no_grad():
        expected = theirs.get_image_features(pixel_values, output_hidden_states=True)
        actual = ours_model.get_image_features(pixel_values, output_hidden_states=True)
    assert actual.pooler_output.shape == expected.pooler_output.shape
    for key in ("last_hidden_state", "pooler_output"):
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6)
    assert len(actual.hidden_states) == len(expected.hidden_states) == VISION_LAYERS + 1


def test_image_features_of_the_generation_model():
    model = build("generation").eval()
    inputs = inputs_for("generation", batch=2)
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], output_hidden_states=True)
        output = model(**inputs)
        reused = model(input_ids=inputs["input_ids"], mm_encoder_outputs={"image": features})
    assert features.pooler_output.shape == (2, QUERIES, model.config.text_config.hidden_size)
    assert features.hidden_states is features.vision_outputs.hidden_states
    torch.testing.assert_close(reused.logits, output.logits)
    with pytest.raises(ValueError, match="not both"):
        model(**inputs, mm_encoder_outputs={"image": features})


# ---------------------------------------------------------------------------------------------------------------------
# Output classes: transformers' fields, in transformers' order
# ---------------------------------------------------------------------------------------------------------------------


def field_names(cls) -> list[str]:
    return [field.name for field in dataclasses.fields(cls)]


def test_output_fields_are_transformers():
    # ours adds `image_outputs` (newer transformers VLM outputs carry it), last: the other tuple positions stay
    assert field_names(ours.Blip2ForConditionalGenerationModelOutput) == [
        *field_names(reference.Blip2ForConditionalGenerationModelOutput),
        "image_outputs",
    ]
    assert field_names(ours.Blip2ImageFeaturesOutput) == field_names(reference.BaseModelOutputWithVisionQformerOutputs)
    # ours adds the ITC temperature, last, so the tuple positions of the others stay transformers'
    assert field_names(ours.Blip2ImageTextMatchingModelOutput) == [
        *field_names(reference.Blip2ImageTextMatchingModelOutput),
        "temperature",
    ]
    assert field_names(ours.Blip2QFormerModelOutput) == field_names(BaseModelOutputWithPoolingAndCrossAttentions)


@pytest.mark.parametrize("name", ["model", "generation"])
@pytest.mark.parametrize("switch", ["keyword", "config"])
def test_forward_output_carries_image_outputs(name, switch):
    """`image_outputs` as newer transformers VLMs fill it: what `get_image_features` of the generation model returns
    (the image side as the LLM receives it), with the vision encoder's attentions and hidden states, reusable as
    `mm_encoder_outputs={"image": ...}`."""
    model = eager(build(name))
    inputs = inputs_for(name, batch=2)
    if switch == "config":
        model.config.output_attentions = model.config.output_hidden_states = True
    else:
        inputs.update(output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        output = model(**inputs)
        reused = model(
            input_ids=inputs["input_ids"], labels=inputs["labels"], mm_encoder_outputs={"image": output.image_outputs}
        )
        as_tuple = model(**inputs, return_dict=False)
    image = output.image_outputs
    assert isinstance(image, ours.Blip2ImageFeaturesOutput)
    assert image.pooler_output.shape == (2, QUERIES, model.config.text_config.hidden_size)
    assert len(image.attentions) == VISION_LAYERS and len(image.hidden_states) == VISION_LAYERS + 1
    assert image.vision_outputs is output.vision_outputs and image.qformer_outputs is output.qformer_outputs
    assert image.attentions is output.vision_outputs.attentions
    torch.testing.assert_close(reused.logits, output.logits, rtol=0, atol=0)
    # the tuple: transformers' positions first, then image_outputs as a tuple
    torch.testing.assert_close(as_tuple[1], output.logits)
    assert isinstance(as_tuple[-1], tuple)
    torch.testing.assert_close(as_tuple[-1][1], image.pooler_output)


@pytest.mark.parametrize("itm", [False, True])
def test_retrieval_output_fields_are_filled_as_transformers(itm):
    model = build("retrieval").eval()
    inputs = inputs_for("retrieval")
    with torch.no_grad():
        output = model(**inputs, use_image_text_matching_head=itm)
        as_tuple = model(**inputs, use_image_text_matching_head=itm, return_dict=False)
    assert output.vision_model_output.last_hidden_state.shape == (BATCH, PATCHES, 32)
    assert output.text_model_output is not None
    if itm:  # transformers: the image embeddings; the joint pass's outputs
        assert output.image_embeds is output.vision_model_output.last_hidden_state
        assert output.text_embeds is output.text_model_output.last_hidden_state
    else:
        assert output.image_embeds.shape == (BATCH, QUERIES, model.config.image_text_hidden_size)
    # transformers' tuple: logits_per_image, logits_per_text, text_embeds, image_embeds, text / vision outputs
    assert len(as_tuple) == 7
    for position, name in enumerate(["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"]):
        torch.testing.assert_close(as_tuple[position], output[name])
    torch.testing.assert_close(as_tuple[5][0], output.vision_model_output.last_hidden_state)


# ---------------------------------------------------------------------------------------------------------------------
# _keep_in_fp32_modules_strict
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLASSES)
def test_keep_in_fp32_entries_name_the_class_own_modules(name):
    """transformers matches each entry as a pattern anywhere in a weight's name (`re.search`): an entry must name a
    module or parameter of this class, and catch nothing outside it (a frozen tower's weights would stay fp32)."""
    model = build(name)
    names = {module_name for module_name, _ in model.named_modules()} | {
        param_name for param_name, _ in model.named_parameters()
    }
    keys = list(model.state_dict())
    for entries in (type(model)._keep_in_fp32_modules_strict, model._keep_in_fp32_modules_strict):
        for entry in entries:
            assert entry in names, f"{type(model).__name__}: {entry!r} is not a module or parameter"
            caught = [key for key in keys if re.search(entry, key)]
            assert caught and all(key == entry or key.startswith(f"{entry}.") for key in caught), (entry, caught)


def strict_fp32_keys(model: torch.nn.Module) -> list[str]:
    entries = type(model)._keep_in_fp32_modules_strict
    return [key for key in model.state_dict() if any(key == entry or key.startswith(f"{entry}.") for entry in entries)]


@pytest.mark.parametrize("name", ["model", "generation", "retrieval", "pretraining"])
def test_keep_in_fp32_entries_are_built_in_fp32(name):
    """transformers applies `_keep_in_fp32_modules_strict` only when it loads weights: a model built under another
    default dtype (`torch.set_default_dtype`, `from_config(dtype=...)`) must still build those entries in fp32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        model = build(name)
    finally:
        torch.set_default_dtype(previous)
    keys = strict_fp32_keys(model)
    assert keys and "query_tokens" in keys
    state_dict = model.state_dict()
    half = [key for key in keys if state_dict[key].is_floating_point() and state_dict[key].dtype != torch.float32]
    assert not half, half
    # the rest (the frozen towers) takes the default dtype, as transformers builds it
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float16
    if name in ("model", "generation"):
        assert model.get_input_embeddings().weight.dtype == torch.float16
        assert model.language_projection.weight.dtype == torch.float32


def test_from_config_in_half_precision_keeps_the_bridge_fp32_and_runs():
    config = tiny_config()
    model = blip2_hf.Blip2ForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    assert torch.get_default_dtype() == torch.float32
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert {param.dtype for param in model.qformer.parameters()} == {torch.float32}
    assert model.query_tokens.dtype == model.language_projection.weight.dtype == torch.float32
    inputs = inputs_for("generation", batch=2)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        output = model(**inputs)
    assert torch.isfinite(output.loss)


def test_stage1_model_loads_in_bf16_with_an_fp32_bridge(tmp_path):
    build("pretraining").save_pretrained(tmp_path)
    model = blip2_hf.Blip2ForPreTraining.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    for name in ("qformer", "cls", "itm_head", "embeddings", "vision_projection"):
        assert {param.dtype for param in model.get_submodule(name).parameters()} == {torch.float32}, name
    assert model.query_tokens.dtype == model.temp.dtype == torch.float32
    inputs = inputs_for("pretraining")
    output = model(**inputs)  # ITG runs the fp32 LM head on the fp32 Q-Former
    assert torch.isfinite(output.loss) and output.logits_itg.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# Weights: initialization and state-dict round trips
# ---------------------------------------------------------------------------------------------------------------------

SENTINEL = 7.25


def fill_with_sentinel_(model: torch.nn.Module) -> None:
    """Overwrite every parameter and buffer, and forget that anything was initialized."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(SENTINEL if tensor.is_floating_point() else -1)
            if hasattr(tensor, "_is_hf_initialized"):
                del tensor._is_hf_initialized
    for module in model.modules():
        if hasattr(module, "_is_hf_initialized"):
            del module._is_hf_initialized


@pytest.mark.parametrize("name", [*CLASSES, "conv_stem"])
def test_init_weights_covers_every_parameter_and_buffer(name):
    if name == "conv_stem":
        config = tiny_config().vision_config
        config.conv_stem_channels, config.patch_size = [8], 2
        model = blip2_hf.Blip2VisionModel(config)
    else:
        model = build(name)
    fill_with_sentinel_(model)
    model.initialize_weights()
    for tensor_name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        untouched = (tensor == SENTINEL) if tensor.is_floating_point() else (tensor == -1)
        assert not bool(untouched.any()), f"{type(model).__name__}.{tensor_name} is not initialized by _init_weights"
    if hasattr(model, "query_tokens"):  # LAVIS's normal(0, 0.02), not zeros
        assert 0 < float(model.query_tokens.std()) < 0.1
    if hasattr(model, "temp"):
        assert model.temp.item() == pytest.approx(model.config.initial_temperature)


@pytest.mark.parametrize("name", CLASSES)
def test_state_dict_round_trips_through_torch_save(name):
    model = build(name, seed=0).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state_dict = torch.load(buffer, weights_only=True)
    other = build(name, seed=1).eval()
    assert other.load_state_dict(state_dict, strict=True)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, other.state_dict()[key]), key
    inputs = inputs_for(name)
    with torch.no_grad():
        torch.manual_seed(0)
        expected = main_output(name, model(**inputs))
        torch.manual_seed(0)
        torch.testing.assert_close(main_output(name, other(**inputs)), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing, attention implementations, batching
# ---------------------------------------------------------------------------------------------------------------------


def loss_and_grads(model: torch.nn.Module, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    model.train()
    torch.manual_seed(0)  # the same hard negatives in stage 1
    inputs = inputs_for(name)
    if name == "qformer":
        inputs["query_embeds"].requires_grad_(True)  # a reentrant checkpoint needs an input that wants gradients
    output = main_output(name, model(**inputs))
    loss = output.float().pow(2).mean() if output.ndim else output
    loss.backward()
    grads = {key: param.grad.clone() for key, param in model.named_parameters() if param.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(name, reentrant):
    model = build(name)
    loss, grads = loss_and_grads(model, name)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    layers = [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]
    assert layers and all(module.gradient_checkpointing for module in layers)
    checkpointed_loss, checkpointed_grads = loss_and_grads(model, name)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-5, atol=1e-6)
    assert checkpointed_grads.keys() == grads.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", CLASSES)
def test_sdpa_and_eager_agree(name):
    model = build(name).eval()
    inputs = inputs_for(name)
    with torch.no_grad():
        outputs = {}
        for implementation in ("sdpa", "eager"):
            model.set_attn_implementation(implementation)
            torch.manual_seed(0)
            outputs[implementation] = main_output(name, model(**inputs))
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], rtol=0, atol=1e-5)


def rows(inputs: dict, index: int) -> dict:
    return {key: value[index : index + 1] for key, value in inputs.items()}


@pytest.mark.parametrize("name", ["vision", "qformer", "model", "generation", "retrieval", "retrieval_itm"])
def test_a_batch_row_equals_that_row_alone(name):
    itm = name == "retrieval_itm"
    name = "retrieval" if itm else name
    model = build(name).eval()
    inputs = inputs_for(name)
    with torch.no_grad():
        batch = main_output(name, model(**inputs, use_image_text_matching_head=itm) if itm else model(**inputs))
        for index in range(BATCH):
            alone = rows(inputs, index)
            if name == "retrieval" and not itm:  # ITC: one image against every text
                alone["input_ids"], alone["attention_mask"] = inputs["input_ids"], inputs["attention_mask"]
            output = model(**alone, use_image_text_matching_head=itm) if itm else model(**alone)
            torch.testing.assert_close(main_output(name, output)[0], batch[index], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Embedding resizing and train / eval modes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model", "generation"])
@pytest.mark.parametrize("text", ["opt", "t5"])
def test_resize_token_embeddings_of_the_language_model(name, text, tmp_path):
    model = build(name, text=text).eval()
    old_size = model.config.text_config.vocab_size
    new_size = old_size + 13
    model.resize_token_embeddings(new_size)
    assert model.get_input_embeddings().weight.shape[0] == new_size
    assert model.get_output_embeddings().weight.shape[0] == new_size
    assert model.config.text_config.vocab_size == new_size
    inputs = inputs_for(name, batch=2)
    inputs["input_ids"][:, -1] = new_size - 1  # a new token, in the prompt and the labels
    if text == "t5":  # the target side is given as labels
        inputs["labels"] = inputs["input_ids"][:, QUERIES:].clone()
    inputs["labels"][:, -1] = new_size - 1
    with torch.no_grad():
        output = model(**inputs)
    assert output.logits.shape[-1] == new_size and torch.isfinite(output.loss)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert reloaded.get_input_embeddings().weight.shape[0] == new_size
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, output.logits)


def test_train_keeps_frozen_towers_in_eval_mode():
    model = build("generation")
    model.train()
    assert all(module.training for module in model.modules())  # nothing frozen: everything trains
    model.freeze_vision_encoder()
    model.freeze_language_model()
    model.train()
    assert model.training and model.qformer.training and model.language_projection.training
    assert model.vision_model.post_layernorm.training  # LAVIS's trainable `ln_vision`
    for tower in (model.vision_model.embeddings, model.vision_model.encoder, model.language_model):
        assert not any(module.training for module in tower.modules())
    model.eval()
    assert not any(module.training for module in model.modules())
    # a tower with a trainable parameter again (e.g. an adapter) trains
    next(model.language_model.parameters()).requires_grad_(True)
    model.train()
    assert model.language_model.training


def test_stage1_model_trains_with_its_vision_encoder_frozen():
    model = build("pretraining").train()
    assert not any(param.requires_grad for param in model.vision_model.encoder.parameters())
    assert not model.vision_model.encoder.training and not model.vision_model.embeddings.training
    assert model.qformer.training and model.vision_model.post_layernorm.training
    assert all(param.requires_grad for param in model.qformer.parameters())
    model.eval()
    assert not any(module.training for module in model.modules())


# ---------------------------------------------------------------------------------------------------------------------
# One freezing contract: which towers, in which dtype (Trainer, evaluation and feature cache use the same)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "precision, text, device, expected",
    [
        ("auto", "opt", "cpu", torch.float32),
        ("auto", "opt", "cuda", torch.float16),
        ("auto", "t5", "cuda", torch.bfloat16),  # Flan-T5 overflows in fp16
        ("auto", None, "cuda", torch.float16),  # stage 1 / retrieval: no LLM
        ("bf16", "opt", "cpu", torch.bfloat16),
        ("fp32", "t5", "cuda", torch.float32),
    ],
)
def test_frozen_tower_dtype(precision, text, device, expected):
    config = tiny_config(text) if text else tiny_config(stage1=True)
    assert ours.frozen_tower_dtype(precision, config, device) is expected


def test_frozen_tower_dtype_rejects_unknown_precisions():
    with pytest.raises(ValueError, match="'half'.*expected one of auto, fp16, bf16, fp32"):
        ours.frozen_tower_dtype("half", tiny_config(), "cpu")


def test_freeze_towers_freezes_casts_and_spares_adapters():
    model = build("generation")
    llm_linear = next(m for m in model.language_model.modules() if isinstance(m, torch.nn.Linear))
    llm_linear.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(2, llm_linear.in_features)))
    model.freeze_towers(torch.bfloat16)
    frozen = ("vision_model.embeddings.", "vision_model.encoder.", "language_model.")
    for name, param in model.named_parameters():
        if name.endswith("lora_A"):
            assert param.requires_grad and param.dtype == torch.float32, name  # adapters keep training
        elif name.startswith(frozen):
            assert not param.requires_grad and param.dtype == torch.bfloat16, name
        else:  # the bridge: post_layernorm (LAVIS's ln_vision), queries, Q-Former, projection
            assert param.requires_grad and param.dtype == torch.float32, name
    model.train()
    assert model.qformer.training and model.vision_model.post_layernorm.training
    assert not model.vision_model.encoder.training
    assert model.language_model.training  # it holds a trainable adapter


def test_stage1_models_freeze_their_vision_encoder_only():
    model = build("pretraining")
    model.freeze_towers()
    trainable = {name.split(".")[0] for name, param in model.named_parameters() if param.requires_grad}
    assert "vision_model" in trainable  # post_layernorm
    assert not any(p.requires_grad for p in model.vision_model.encoder.parameters())
    assert not hasattr(blip2_hf.Blip2VisionModel, "freeze_towers")  # only models that hold an encoder freeze one


def test_feature_cache_loads_the_frozen_towers_dtype(tmp_path):
    from blip2_hf import feature_cache

    build("generation").save_pretrained(tmp_path)
    assert (
        feature_cache.load_model_for_cache(tmp_path, "auto", "cpu").vision_model.encoder.layers[0].mlp.fc1.weight.dtype
        == torch.float32
    )
    assert (
        feature_cache.load_model_for_cache(tmp_path, "bf16").vision_model.encoder.layers[0].mlp.fc1.weight.dtype
        == torch.bfloat16
    )
