"""`extract_features` (LAVIS's `Blip2Qformer.extract_features`) on the stage-1 layouts: shapes, and each mode's
outputs against what the models' own forward passes compute (ITC logits, ITM logits and joint outputs, stage 1's
`sim_i2t` and positive ITM logits), processor output taken as is, and the errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import blip2_hf
from blip2_hf.retrieval import encode_images, encode_texts, itc_similarity
from blip2_hf.testing_utils import draw_images, make_bert_tokenizer, make_opt_tokenizer, perturb_, tiny_config_dict

NUM_QUERIES, QFORMER_WIDTH, PROJECTION = 4, 32, 24
TEXTS = ["a red circle", "two blue squares on the left of a big green triangle", "a dog"]
ATOL = 1e-5


def save_stage1_folder(folder: Path) -> None:
    """A stage-1 folder as training/stage1.py writes it: `Blip2ForPreTraining` weights and a processor with an
    OPT tokenizer (for stage 2) and the Q-Former's BERT tokenizer."""
    bert = make_bert_tokenizer()
    processor = blip2_hf.Blip2Processor(
        image_processor=blip2_hf.Blip2Processor.default_image_processor(30),
        tokenizer=make_opt_tokenizer(),
        qformer_tokenizer=bert,
        num_query_tokens=NUM_QUERIES,
    )
    config = tiny_config_dict(
        "opt", num_query_tokens=NUM_QUERIES, text_input=True, image_token_index=None, image_text_hidden_size=PROJECTION
    )
    config["qformer_config"].update(
        vocab_size=len(bert), bos_token_id=bert.bos_token_id, eos_token_id=bert.sep_token_id, pad_token_id=0
    )
    torch.manual_seed(0)
    perturb_(blip2_hf.Blip2ForPreTraining(blip2_hf.Blip2Config(**config)), scale=0.2).save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("stage1")
    save_stage1_folder(folder)
    processor = blip2_hf.Blip2Processor.from_pretrained(folder)
    inputs = processor(images=draw_images(len(TEXTS)), text=TEXTS, padding=True, return_tensors="pt")
    return dict(
        pretraining=blip2_hf.Blip2ForPreTraining.from_pretrained(folder).eval(),
        retrieval=blip2_hf.Blip2ForImageTextRetrieval.from_pretrained(folder).eval(),
        inputs=inputs,
        text={"input_ids": inputs["qformer_input_ids"], "attention_mask": inputs["qformer_attention_mask"]},
    )


@pytest.fixture(params=["retrieval", "pretraining"])
def model(request, stage1):
    return stage1[request.param]


def test_shapes_and_fields_per_mode(model, stage1):
    inputs, batch = stage1["inputs"], len(TEXTS)
    length = inputs["qformer_input_ids"].shape[1]
    image = model.extract_features(**inputs, mode="image")
    text = model.extract_features(**inputs, mode="text")
    joint = model.extract_features(**inputs, mode="multimodal")
    assert image.image_embeds.shape == (batch, NUM_QUERIES, QFORMER_WIDTH)
    assert image.image_embeds_proj.shape == (batch, NUM_QUERIES, PROJECTION)
    assert text.text_embeds.shape == (batch, length, QFORMER_WIDTH)
    assert text.text_embeds_proj.shape == (batch, PROJECTION)
    assert joint.multimodal_embeds.shape == (batch, NUM_QUERIES, QFORMER_WIDTH)
    # only the mode's fields, as LAVIS's BlipOutputFeatures
    assert set(image.keys()) == {"image_embeds", "image_embeds_proj"}
    assert set(text.keys()) == {"text_embeds", "text_embeds_proj"}
    assert set(joint.keys()) == {"multimodal_embeds"}
    # the projections are unit vectors
    torch.testing.assert_close(image.image_embeds_proj.norm(dim=-1), torch.ones(batch, NUM_QUERIES))
    torch.testing.assert_close(text.text_embeds_proj.norm(dim=-1), torch.ones(batch))
    assert not image.image_embeds.requires_grad  # no gradients, as LAVIS's @torch.no_grad()


def test_unimodal_features_equal_the_retrieval_forward_and_itc_similarity(model, stage1):
    inputs, retrieval = stage1["inputs"], stage1["retrieval"]
    image = model.extract_features(pixel_values=inputs["pixel_values"], mode="image")
    text = model.extract_features(**stage1["text"], mode="text")
    with torch.no_grad():
        itc = retrieval(pixel_values=inputs["pixel_values"], **stage1["text"])
        images = encode_images(retrieval, [inputs["pixel_values"]], progress=False)
        texts = encode_texts(retrieval, [stage1["text"]], progress=False)
    torch.testing.assert_close(image.image_embeds_proj, itc.image_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(text.text_embeds_proj, itc.text_embeds, atol=ATOL, rtol=0)
    similarity = image.similarity(text)
    assert similarity.shape == (len(TEXTS), len(TEXTS))
    torch.testing.assert_close(similarity, itc.logits_per_image, atol=ATOL, rtol=0)
    torch.testing.assert_close(similarity, itc_similarity(images.image_feats, texts.text_feats), atol=ATOL, rtol=0)
    torch.testing.assert_close(text.similarity(image), similarity)  # either side may hold the image
    # `image_embeds` are the query outputs the projection reads
    torch.testing.assert_close(
        torch.nn.functional.normalize(model.vision_projection(image.image_embeds), dim=-1), image.image_embeds_proj
    )


def test_multimodal_features_are_the_itm_pass_query_outputs(model, stage1):
    inputs, retrieval = stage1["inputs"], stage1["retrieval"]
    joint = model.extract_features(**inputs, mode="multimodal")
    with torch.no_grad():
        itm = retrieval(**inputs, use_image_text_matching_head=True)
        logits = model.itm_head(joint.multimodal_embeds).mean(dim=1)
    torch.testing.assert_close(joint.multimodal_embeds, itm.text_embeds[:, :NUM_QUERIES], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, itm.logits_per_image, atol=ATOL, rtol=0)
    # text really enters the queries: another text changes them
    other = model.extract_features(pixel_values=inputs["pixel_values"], **_shifted(stage1["text"]), mode="multimodal")
    assert (other.multimodal_embeds - joint.multimodal_embeds).abs().max() > 1e-3


def _shifted(text: dict) -> dict:
    """The same texts paired with other images (rolled by one)."""
    return {key: value.roll(1, dims=0) for key, value in text.items()}


def test_stage1_forward_computes_the_same_itc_and_itm(stage1):
    """The training forward's ITC logits (`sim_i2t`, divided by `temp`) and its positive pairs' ITM logits are the
    features' similarity and `itm_head` over the multimodal features."""
    model, inputs = stage1["pretraining"], stage1["inputs"]
    with torch.no_grad():
        output = model(**inputs)
        image = model.extract_features(**inputs, mode="image")
        text = model.extract_features(**inputs, mode="text")
        joint = model.extract_features(**inputs, mode="multimodal")
        positives = model.itm_head(joint.multimodal_embeds).mean(dim=1)
    torch.testing.assert_close(image.similarity(text) / model.temp, output.sim_i2t, atol=1e-4, rtol=0)
    torch.testing.assert_close(positives, output.logits_itm[: len(TEXTS)], atol=ATOL, rtol=0)


def test_processor_output_equals_explicit_qformer_tokens_and_cached_frozen_image_states(model, stage1):
    inputs = stage1["inputs"]
    for mode in ("image", "text", "multimodal"):
        from_processor = model.extract_features(**inputs, mode=mode)
        explicit = model.extract_features(pixel_values=inputs["pixel_values"], **stage1["text"], mode=mode)
        for key, value in explicit.items():
            torch.testing.assert_close(from_processor[key], value)
    cached = model.extract_features(frozen_image_states=model.encode_image_frozen(inputs["pixel_values"]), mode="image")
    torch.testing.assert_close(cached.image_embeds, model.extract_features(**inputs, mode="image").image_embeds)


def test_errors_name_the_problem(model, stage1):
    inputs = stage1["inputs"]
    with pytest.raises(ValueError, match="mode must be one of"):
        model.extract_features(**inputs, mode="images")
    with pytest.raises(ValueError, match="mode='image' needs images"):
        model.extract_features(**stage1["text"], mode="image")
    with pytest.raises(ValueError, match="mode='multimodal' needs images"):
        model.extract_features(**stage1["text"])
    with pytest.raises(ValueError, match="mode='text' needs text"):
        model.extract_features(pixel_values=inputs["pixel_values"], mode="text")
    with pytest.raises(ValueError, match="mode='multimodal' needs text"):
        model.extract_features(pixel_values=inputs["pixel_values"], mode="multimodal")
    with pytest.raises(ValueError, match="got 2 images and 3 texts"):
        model.extract_features(pixel_values=inputs["pixel_values"][:2], **stage1["text"], mode="multimodal")
    image = model.extract_features(**inputs, mode="image")
    with pytest.raises(ValueError, match=r"no text \(mode='text'\) features"):
        image.similarity()
    with pytest.raises(ValueError, match=r"no image \(mode='image'\) features"):
        model.extract_features(**inputs, mode="text").similarity()


def test_get_features_names_on_the_stage1_model(stage1):
    """`Blip2ForPreTraining` has the retrieval model's transformers-style feature methods, with the same values."""
    inputs, pretraining, retrieval = stage1["inputs"], stage1["pretraining"], stage1["retrieval"]
    with torch.no_grad():
        features = pretraining.get_image_features(inputs["pixel_values"])
        ours, embeds = features.pooler_output, features.last_hidden_state
        reference = retrieval.get_image_features(inputs["pixel_values"]).pooler_output
        torch.testing.assert_close(ours, reference)
        assert embeds.shape[:2] == (len(TEXTS), 1 + 25)  # [CLS] + (30 / 6)^2 patches
        text = {key: inputs[key] for key in ("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask")}
        # processor output (the Q-Former's ids win over the LLM's) against the Q-Former ids given as input_ids
        torch.testing.assert_close(pretraining.get_text_features(**text), retrieval.get_text_features(**stage1["text"]))
