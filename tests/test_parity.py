"""Parity with transformers' BLIP-2, both directions: the same weights give the same logits (1e-5) and the same
greedy and beam generations, token for token. Tiny configs always; the Salesforce blip2-opt-2.7b and blip2-flan-t5-xl
configs (real widths and vocabularies, depth cut to 1-2 layers) in the slow tier."""

from __future__ import annotations

import pytest
import torch
import transformers

import blip2_hf
from blip2_hf.testing_utils import perturb_, salesforce_config_dict, tiny_config_dict

ATOL = 1e-5
CASES = [
    pytest.param("opt", id="tiny-opt"),
    pytest.param("t5", id="tiny-t5"),
    pytest.param("blip2-opt-2.7b", id="blip2-opt-2.7b-depth1", marks=pytest.mark.slow),
    pytest.param("blip2-flan-t5-xl", id="blip2-flan-t5-xl-depth1", marks=pytest.mark.slow),
]


def config_dict(name: str, text_input: bool = False) -> dict:
    if name in ("opt", "t5"):
        return tiny_config_dict(name, text_input=text_input)
    config = salesforce_config_dict(name, depth=1)
    config["qformer_config"]["use_qformer_text_input"] = text_input
    return config


def make_inputs(config: dict, batch_size: int = 2, seed: int = 0) -> dict:
    """A left-padded batch: row 0 has the longer prompt, row 1 is padded on the left (before the image tokens)."""
    generator = torch.Generator().manual_seed(seed)
    text = config["text_config"]
    vision = config["vision_config"]
    num_queries, image_token = config["num_query_tokens"], config["image_token_index"]
    is_t5 = text["model_type"] == "t5"
    pad = text["pad_token_id"]
    rows = []
    lengths = [6, 3][:batch_size]
    for length in lengths:
        words = torch.randint(4, 80, (length,), generator=generator).tolist()
        ids = [image_token] * num_queries + (
            words + [text["eos_token_id"]] if is_t5 else [text["bos_token_id"]] + words
        )
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixel_values = torch.randn(batch_size, 3, vision["image_size"], vision["image_size"], generator=generator)
    labels = input_ids.clone() if not is_t5 else torch.randint(4, 80, (batch_size, 5), generator=generator)
    if not is_t5:
        labels[:, : num_queries + 1] = -100
        labels[attention_mask == 0] = -100
    return dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)


@pytest.fixture(scope="module", params=CASES)
def generation_pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its checkpoint, loading info, config dict)."""
    config = config_dict(request.param)
    torch.manual_seed(0)
    reference = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(**config))
    perturb_(reference)
    folder = tmp_path_factory.mktemp("hf_checkpoint")
    reference.save_pretrained(folder)
    ours, info = blip2_hf.Blip2ForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    return reference, ours.eval(), info, config, folder, request.param


def test_transformers_checkpoint_loads_with_no_missing_or_unexpected_keys(generation_pair):
    _, ours, info, _, _, _ = generation_pair
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert ours.config.model_type == "blip2_hf"
    assert isinstance(ours.config, blip2_hf.Blip2Config)


def test_logits_and_loss_equal(generation_pair, record_parity):
    reference, ours, _, config, _, case = generation_pair
    inputs = make_inputs(config)
    with torch.no_grad():
        expected, actual = reference(**inputs), ours(**inputs)
    assert record_parity(f"{case} logits", expected.logits, actual.logits) <= ATOL
    assert record_parity(f"{case} loss", expected.loss, actual.loss) <= ATOL
    assert record_parity(f"{case} query output", expected.qformer_outputs[0], actual.qformer_outputs[0]) <= ATOL


def test_greedy_and_beam_generation_equal(generation_pair):
    reference, ours, _, config, _, _ = generation_pair
    inputs = make_inputs(config)
    inputs.pop("labels")
    for kwargs in (dict(max_new_tokens=6, do_sample=False), dict(max_new_tokens=5, num_beams=3, do_sample=False)):
        expected = reference.generate(**inputs, **kwargs)
        actual = ours.generate(**inputs, **kwargs)
        assert torch.equal(expected, actual), (kwargs, expected, actual)
    # image-only captioning
    expected = reference.generate(pixel_values=inputs["pixel_values"], max_new_tokens=6)
    actual = ours.generate(pixel_values=inputs["pixel_values"], max_new_tokens=6)
    assert torch.equal(expected, actual)


def test_our_checkpoint_loads_into_transformers_with_same_outputs(generation_pair, tmp_path, record_parity):
    _, ours, _, config, _, case = generation_pair
    ours.save_pretrained(tmp_path)
    reference, info = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = make_inputs(config, seed=1)
    with torch.no_grad():
        expected, actual = reference.eval()(**inputs), ours(**inputs)
    assert record_parity(f"{case} logits (ours -> transformers)", expected.logits, actual.logits) <= ATOL
    inputs.pop("labels")
    assert torch.equal(reference.generate(**inputs, max_new_tokens=5), ours.generate(**inputs, max_new_tokens=5))


def test_blip2_model_parity(generation_pair, record_parity):
    _, _, _, config, folder, case = generation_pair
    reference = transformers.Blip2Model.from_pretrained(folder).eval()
    ours, info = blip2_hf.Blip2Model.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = make_inputs(config, seed=2)
    with torch.no_grad():
        expected, actual = reference(**inputs), ours.eval()(**inputs)
        assert record_parity(f"{case} Blip2Model logits", expected.logits, actual.logits) <= ATOL
        pixel_values = inputs["pixel_values"]
        assert (
            record_parity(
                f"{case} Blip2Model qformer features",
                reference.get_qformer_features(pixel_values),
                ours.get_qformer_features(pixel_values),
            )
            <= ATOL
        )
        assert (
            record_parity(
                f"{case} Blip2Model image embeds",
                reference.get_image_features(pixel_values).last_hidden_state,
                ours.get_image_features(pixel_values).last_hidden_state,
            )
            <= ATOL
        )


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval (ITC and ITM)
# ---------------------------------------------------------------------------------------------------------------------

RETRIEVAL_CASES = [
    pytest.param("opt", id="tiny"),
    pytest.param("blip2-opt-2.7b", id="itm-vit-g-depth1", marks=pytest.mark.slow),
]


def retrieval_inputs(config: dict, seed: int = 0) -> dict:
    """Q-Former (BERT) text with the processor's image tokens in front, right-padded, 3 images x 3 texts."""
    generator = torch.Generator().manual_seed(seed)
    num_queries, image_token = config["num_query_tokens"], config["image_token_index"]
    vocab = config["qformer_config"].get("vocab_size", 30522)
    text = torch.randint(5, min(vocab, 80), (3, 7), generator=generator)
    text[:, 0] = 1  # [CLS]-like
    mask = torch.ones_like(text)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    text[mask == 0] = 0
    if image_token is not None:
        text = torch.cat([torch.full((3, num_queries), image_token), text], dim=1)
        mask = torch.cat([torch.ones(3, num_queries, dtype=torch.long), mask], dim=1)
    size = config["vision_config"]["image_size"]
    return dict(pixel_values=torch.randn(3, 3, size, size, generator=generator), input_ids=text, attention_mask=mask)


@pytest.fixture(scope="module", params=RETRIEVAL_CASES)
def retrieval_pair(request, tmp_path_factory):
    config = config_dict(request.param, text_input=True)
    if request.param != "opt":  # blip2-itm-vit-g: BERT vocabulary + [DEC], no image placeholder
        config["qformer_config"]["vocab_size"] = 30523
        config["image_token_index"] = None
    torch.manual_seed(0)
    reference = perturb_(transformers.Blip2ForImageTextRetrieval(transformers.Blip2Config(**config)))
    folder = tmp_path_factory.mktemp("hf_retrieval")
    reference.save_pretrained(folder)
    ours, info = blip2_hf.Blip2ForImageTextRetrieval.from_pretrained(folder, output_loading_info=True)
    return reference, ours.eval(), info, config, request.param


def test_retrieval_loads_and_matches(retrieval_pair, tmp_path, record_parity):
    reference, ours, info, config, case = retrieval_pair
    # the learnable temperature is ours alone: initialized from the config, not left as uninitialized memory
    assert info["missing_keys"] == {"temp"} and not info["unexpected_keys"], info
    assert ours.temp.item() == pytest.approx(0.07)
    inputs = retrieval_inputs(config)
    with torch.no_grad():
        for itm in (False, True):
            expected = reference(**inputs, use_image_text_matching_head=itm)
            actual = ours(**inputs, use_image_text_matching_head=itm)
            name = f"{case} retrieval {'ITM' if itm else 'ITC'} logits"
            assert expected.logits_per_image.shape == actual.logits_per_image.shape
            assert record_parity(name, expected.logits_per_image, actual.logits_per_image) <= ATOL

    ours.save_pretrained(tmp_path)
    back, info = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp_path, output_loading_info=True)
    assert info["unexpected_keys"] == {"temp"} and not info["missing_keys"], info
    with torch.no_grad():
        for itm in (False, True):
            expected = back.eval()(**inputs, use_image_text_matching_head=itm).logits_per_image
            actual = ours(**inputs, use_image_text_matching_head=itm).logits_per_image
            assert record_parity(f"{case} retrieval (ours -> transformers)", expected, actual) <= ATOL
