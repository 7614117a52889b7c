"""`blip2_hf.retrieval`: ITC / ITM re-ranking scores against the model's own forward, pair by pair, and Recall@K
against a port of LAVIS's `_report_metrics`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import blip2_hf
from blip2_hf.retrieval import (
    NO_MATCH_SCORE,
    encode_images,
    encode_texts,
    itc_similarity,
    itm_rerank,
    recall_at_k,
)
from blip2_hf.testing_utils import IMAGE_TOKEN, draw_images, perturb_, tiny_config_dict

NUM_IMAGES, NUM_TEXTS = 6, 9
ATOL = 1e-5


@pytest.fixture(scope="module")
def setup():
    config = blip2_hf.Blip2Config(**tiny_config_dict("opt", text_input=True, image_token_index=None))
    torch.manual_seed(0)
    model = perturb_(blip2_hf.Blip2ForImageTextRetrieval(config))
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(NUM_IMAGES, 3, 30, 30, generator=generator)
    lengths = [3, 12, 5, 7, 2, 9, 4, 11, 6]  # right-padded to 12 ([PAD] = 0)
    input_ids = torch.zeros(NUM_TEXTS, max(lengths), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        ids = torch.randint(5, 99, (length,), generator=generator)
        input_ids[row, :length] = ids.masked_fill(ids == IMAGE_TOKEN, 91)
        attention_mask[row, :length] = 1
    with torch.no_grad():
        # The model's own scores, pair by pair: ITC for all pairs at once, ITM one (image, text) at a time.
        itc = model(pixel_values, input_ids, attention_mask).logits_per_image
        itm = torch.tensor(
            [
                [
                    model(
                        pixel_values[[i]],
                        input_ids[[t], : lengths[t]],
                        attention_mask[[t], : lengths[t]],
                        use_image_text_matching_head=True,
                    ).logits_per_image[0, 1]
                    for t in range(NUM_TEXTS)
                ]
                for i in range(NUM_IMAGES)
            ]
        )
    return dict(
        model=model, pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
        lengths=lengths, itc=itc, itm=itm,
    )  # fmt: skip


def image_batches(setup, batch_size):
    return [setup["pixel_values"][i : i + batch_size] for i in range(0, NUM_IMAGES, batch_size)]


def text_batches(setup, batch_size):
    """Each batch padded only to its own longest text, as a tokenizer with `padding="longest"` gives."""
    batches = []
    for start in range(0, NUM_TEXTS, batch_size):
        length = max(setup["lengths"][start : start + batch_size])
        rows = slice(start, start + batch_size)
        batches.append((setup["input_ids"][rows, :length], setup["attention_mask"][rows, :length]))
    return batches


def encode(setup, image_batch_size=2, text_batch_size=4):
    model = setup["model"]
    images = encode_images(model, image_batches(setup, image_batch_size), progress=False)
    texts = encode_texts(model, text_batches(setup, text_batch_size), progress=False)
    return images, texts


def expected_scores(setup, k):
    """LAVIS's matrices from the pairwise reference: ITM match logit + ITC on each row's top-k, -100 elsewhere."""
    itc, itm = setup["itc"], setup["itm"]
    i2t = torch.full_like(itc, NO_MATCH_SCORE)
    top = itc.topk(min(k, NUM_TEXTS), dim=1).indices
    i2t.scatter_(1, top, (itm + itc).gather(1, top))
    t2i = torch.full_like(itc.t(), NO_MATCH_SCORE)
    top = itc.t().topk(min(k, NUM_IMAGES), dim=1).indices
    t2i.scatter_(1, top, (itm + itc).t().gather(1, top))
    return i2t, t2i


def test_index_shapes_and_padding(setup):
    images, texts = encode(setup)
    config = setup["model"].config
    num_patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    assert images.image_feats.shape == (NUM_IMAGES, config.num_query_tokens, config.image_text_hidden_size)
    assert images.image_embeds.shape == (NUM_IMAGES, 1 + num_patches, config.vision_config.hidden_size)
    assert texts.text_feats.shape == (NUM_TEXTS, config.image_text_hidden_size)
    # Batches of different lengths are right-padded to the longest.
    assert torch.equal(texts.input_ids, setup["input_ids"])
    assert torch.equal(texts.attention_mask, setup["attention_mask"])
    # Padding does not change a text's features.
    for t, length in enumerate(setup["lengths"]):
        alone = setup["model"].get_text_features(setup["input_ids"][[t], :length]).pooler_output
        torch.testing.assert_close(texts.text_feats[t], alone[0], atol=ATOL, rtol=0)
    # Ordinary tensors (not inference tensors): callers may update them in place.
    for tensor in (*images, *texts):
        assert not tensor.is_inference()


def test_itc_similarity_equals_the_model_forward(setup):
    images, texts = encode(setup)
    itc = itc_similarity(images.image_feats, texts.text_feats)
    assert itc.shape == (NUM_IMAGES, NUM_TEXTS)
    torch.testing.assert_close(itc, setup["itc"], atol=ATOL, rtol=0)
    for chunk_size in (1, 4):
        torch.testing.assert_close(itc_similarity(images.image_feats, texts.text_feats, chunk_size), itc)


@pytest.mark.parametrize("k", [1, 3])
def test_itm_rerank_equals_pairwise_itm_plus_itc(setup, k):
    images, texts = encode(setup)
    itc = itc_similarity(images.image_feats, texts.text_feats)
    score_i2t, score_t2i = itm_rerank(setup["model"], images, texts, itc, k=k, batch_size=4, progress=False)
    expected_i2t, expected_t2i = expected_scores(setup, k)
    assert score_i2t.dtype == score_t2i.dtype == torch.float32
    assert score_i2t.shape == (NUM_IMAGES, NUM_TEXTS) and score_t2i.shape == (NUM_TEXTS, NUM_IMAGES)
    # Exactly k re-ranked entries per row, the rest -100.
    assert ((score_i2t != NO_MATCH_SCORE).sum(1) == k).all()
    assert ((score_t2i != NO_MATCH_SCORE).sum(1) == k).all()
    torch.testing.assert_close(score_i2t, expected_i2t, atol=ATOL, rtol=0)
    torch.testing.assert_close(score_t2i, expected_t2i, atol=ATOL, rtol=0)


def test_k_larger_than_the_candidates(setup):
    images, texts = encode(setup)
    itc = itc_similarity(images.image_feats, texts.text_feats)
    score_i2t, score_t2i = itm_rerank(setup["model"], images, texts, itc, k=128, progress=False)
    assert (score_i2t != NO_MATCH_SCORE).all() and (score_t2i != NO_MATCH_SCORE).all()
    torch.testing.assert_close(score_i2t, setup["itm"] + setup["itc"], atol=ATOL, rtol=0)
    # Each pair is scored once, so both directions agree exactly.
    assert torch.equal(score_t2i, score_i2t.t())


def test_results_do_not_depend_on_batch_sizes(setup):
    model = setup["model"]
    reference = None
    for image_batch_size, text_batch_size, itm_batch_size in [(1, 1, 1), (2, 4, 5), (6, 9, 1000), (4, 2, 7)]:
        images, texts = encode(setup, image_batch_size, text_batch_size)
        itc = itc_similarity(images.image_feats, texts.text_feats)
        scores = (itc, *itm_rerank(model, images, texts, itc, k=4, batch_size=itm_batch_size, progress=False))
        if reference is None:
            reference = scores
        for got, want in zip(scores, reference):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_input_batch_formats(setup):
    model = setup["model"]
    images, texts = encode(setup)
    mappings = [
        {"pixel_values": setup["pixel_values"][:4], "input_ids": torch.zeros(4, 3, dtype=torch.long)},
        {"pixel_values": setup["pixel_values"][4:]},
    ]
    assert torch.equal(encode_images(model, mappings, progress=False).image_feats, images.image_feats)
    # Processor batches: the Q-Former tokens win over the LLM's `input_ids`.
    processor_like = [
        {
            "input_ids": torch.ones(len(ids), 20, dtype=torch.long),
            "qformer_input_ids": ids,
            "qformer_attention_mask": m,
        }
        for ids, m in text_batches(setup, 4)
    ]
    from_mappings = encode_texts(model, processor_like, progress=False)
    torch.testing.assert_close(from_mappings.text_feats, texts.text_feats)
    # Bare ids: no padding, mask of ones (then the shorter batches padded with mask 0).
    full_length = [setup["input_ids"][[t], :length] for t, length in enumerate(setup["lengths"])]
    from_ids = encode_texts(model, full_length, progress=False)
    torch.testing.assert_close(from_ids.text_feats, texts.text_feats, atol=ATOL, rtol=0)
    assert torch.equal(from_ids.attention_mask, setup["attention_mask"])


def test_itc_only_index_and_errors(setup):
    model = setup["model"]
    images = encode_images(model, image_batches(setup, 3), keep_image_embeds=False, progress=False)
    _, texts = encode(setup)
    assert images.image_embeds is None
    itc = itc_similarity(images.image_feats, texts.text_feats)
    torch.testing.assert_close(itc, setup["itc"], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="keep_image_embeds=True"):
        itm_rerank(model, images, texts, itc, progress=False)
    images, _ = encode(setup)
    with pytest.raises(ValueError, match="indexes hold"):
        itm_rerank(model, images, texts, itc[:, :5], progress=False)
    with pytest.raises(ValueError, match="positive"):
        itm_rerank(model, images, texts, itc, k=0, progress=False)
    with pytest.raises(ValueError, match="No image batches"):
        encode_images(model, [], progress=False)


def test_train_eval_flags_are_restored(setup):
    """The passes run in eval mode (dropout off) and leave each module's flag as it was."""
    model = setup["model"]
    model.train()
    model.vision_model.eval()  # e.g. a frozen ViT inside a model being trained
    try:
        images, texts = encode(setup)
        itc = itc_similarity(images.image_feats, texts.text_feats)
        score_i2t, _ = itm_rerank(model, images, texts, itc, k=NUM_TEXTS, progress=False)
        assert model.training and model.qformer.training and not model.vision_model.training
        assert not any(module.training for module in model.vision_model.modules())
    finally:
        model.eval()
    torch.testing.assert_close(itc, setup["itc"], atol=ATOL, rtol=0)
    torch.testing.assert_close(score_i2t, setup["itm"] + setup["itc"], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Recall@K
# ---------------------------------------------------------------------------------------------------------------------


def lavis_report_metrics(scores_i2t, scores_t2i, txt2img, img2txt):
    """LAVIS `RetrievalTask._report_metrics`, verbatim apart from the names."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    tr1, tr5, tr10 = (100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir1, ir5, ir10 = (100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))
    tr_mean, ir_mean = (tr1 + tr5 + tr10) / 3, (ir1 + ir5 + ir10) / 3
    return {
        "txt_r1": tr1, "txt_r5": tr5, "txt_r10": tr10, "txt_r_mean": tr_mean,
        "img_r1": ir1, "img_r5": ir5, "img_r10": ir10, "img_r_mean": ir_mean,
        "r_mean": (tr_mean + ir_mean) / 2, "agg_metrics": tr_mean,
    }  # fmt: skip


IMG2TXT = [[0, 1], [2, 3, 4], [5]]
TXT2IMG = [0, 0, 1, 1, 1, 2]


def test_recall_at_k_hand_made_ranks():
    score_i2t = torch.tensor(
        [
            [0.1, 0.5, 0.9, 0.2, 0.3, 0.0],  # best caption 1 (0.5) behind text 2: rank 1
            [0.9, 0.8, 0.1, 0.7, 0.2, 0.6],  # best caption 3 (0.7) behind texts 0, 1: rank 2
            [0.0, 0.1, 0.2, 0.3, 0.4, 1.0],  # caption 5 first: rank 0
        ]
    )
    score_t2i = torch.tensor(
        [
            [0.3, 0.2, 0.1],  # rank 0
            [0.1, 0.2, 0.3],  # rank 2
            [0.5, 0.4, 0.0],  # rank 1
            [0.0, 1.0, 0.0],  # rank 0
            [0.2, 0.1, 0.3],  # rank 2
            [0.9, 0.8, 0.5],  # rank 2
        ]
    )
    metrics = recall_at_k(score_i2t, score_t2i, IMG2TXT, TXT2IMG, ks=(1, 2, 3))
    expected = {
        "txt_r1": 100 / 3, "txt_r2": 200 / 3, "txt_r3": 100.0, "txt_r_mean": 200 / 3,
        "img_r1": 100 / 3, "img_r2": 50.0, "img_r3": 100.0, "img_r_mean": 550 / 9,
    }  # fmt: skip
    expected["r_mean"] = (expected["txt_r_mean"] + expected["img_r_mean"]) / 2
    expected["agg_metrics"] = expected["txt_r_mean"]
    assert list(metrics) == list(expected)
    assert metrics == pytest.approx(expected)
    # Arrays work as well as tensors; LAVIS agrees where it has no ties (its ks are 1, 5, 10).
    default = recall_at_k(score_i2t.numpy(), score_t2i.numpy(), IMG2TXT, TXT2IMG)
    assert default == pytest.approx(lavis_report_metrics(score_i2t.numpy(), score_t2i.numpy(), TXT2IMG, IMG2TXT))


def test_recall_at_k_ties():
    score_i2t = torch.tensor(
        [
            [0.5, 0.5, 0.1, 0.0, 0.0, 0.0],  # both captions tie first: rank 0 either way
            [0.1, 0.0, 0.4, 0.4, 0.4, 0.4],  # captions 2-4 tie with text 5: rank 1 (pessimistic) or 0
            [0.2, 0.2, 0.3, 0.3, 0.1, 0.3],  # caption 5 ties with texts 2, 3: rank 2 or 0
        ]
    )
    score_t2i = torch.full((6, 3), NO_MATCH_SCORE)  # nothing re-ranked: every candidate ties
    pessimistic = recall_at_k(score_i2t, score_t2i, IMG2TXT, TXT2IMG, ks=(1, 2, 3))
    optimistic = recall_at_k(score_i2t, score_t2i, IMG2TXT, TXT2IMG, ks=(1, 2, 3), ties="optimistic")
    assert [pessimistic[f"txt_r{k}"] for k in (1, 2, 3)] == pytest.approx([100 / 3, 200 / 3, 100.0])
    assert [optimistic[f"txt_r{k}"] for k in (1, 2, 3)] == [100.0] * 3
    # A constant score is no hit unless every candidate is within K.
    assert [pessimistic[f"img_r{k}"] for k in (1, 2, 3)] == [0.0, 0.0, 100.0]
    assert [optimistic[f"img_r{k}"] for k in (1, 2, 3)] == [100.0] * 3


def test_recall_at_k_matches_lavis_on_random_scores():
    """20 images x 5 captions plus one image with 7, captions shuffled; float scores (no ties)."""
    generator = torch.Generator().manual_seed(0)
    captions = torch.randperm(107, generator=generator).tolist()
    img2txt = [captions[5 * i : 5 * i + 5] for i in range(20)] + [captions[100:]]
    txt2img = [0] * 107
    for image, texts in enumerate(img2txt):
        for text in texts:
            txt2img[text] = image
    score_i2t = torch.randn(21, 107, generator=generator)
    # Make one caption the top hit for half the images, so that the recalls are not near 0.
    for image in range(0, 21, 2):
        score_i2t[image, img2txt[image][image % 5]] += 5
    score_t2i = score_i2t.t() + 0.3 * torch.randn(107, 21, generator=generator)
    metrics = recall_at_k(score_i2t, score_t2i, img2txt, txt2img)
    assert metrics == pytest.approx(lavis_report_metrics(score_i2t.numpy(), score_t2i.numpy(), txt2img, img2txt))
    assert metrics["txt_r1"] >= 50


def test_recall_at_k_end_to_end(setup):
    """The pipeline on the tiny model, with several captions per image and `k` below max(ks)."""
    images, texts = encode(setup)
    itc = itc_similarity(images.image_feats, texts.text_feats)
    score_i2t, score_t2i = itm_rerank(setup["model"], images, texts, itc, k=3, progress=False)
    img2txt = [[0, 1], [2], [3, 4], [5], [6, 7], [8]]
    txt2img = [0, 0, 1, 2, 2, 3, 4, 4, 5]
    metrics = recall_at_k(score_i2t, score_t2i, img2txt, txt2img)
    assert set(metrics) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}
    assert metrics["txt_r10"] == metrics["img_r10"] == 100.0  # fewer than 10 candidates
    assert all(0.0 <= value <= 100.0 for value in metrics.values())


def test_recall_at_k_errors():
    scores = torch.zeros(3, 6)
    with pytest.raises(ValueError, match="score_t2i"):
        recall_at_k(scores, scores, IMG2TXT, TXT2IMG)
    with pytest.raises(ValueError, match="entries"):
        recall_at_k(scores, scores.t(), IMG2TXT[:2], TXT2IMG)
    with pytest.raises(ValueError, match="at least one"):
        recall_at_k(scores, scores.t(), [[0, 1], [], [2, 3, 4, 5]], TXT2IMG)
    with pytest.raises(ValueError, match="lie in"):
        recall_at_k(scores, scores.t(), [[0, 1], [2, 3, 4], [6]], TXT2IMG)
    with pytest.raises(ValueError, match="ties"):
        recall_at_k(scores, scores.t(), IMG2TXT, TXT2IMG, ties="random")


# ---------------------------------------------------------------------------------------------------------------------
# Processor output goes in as is
# ---------------------------------------------------------------------------------------------------------------------


def test_processor_output_goes_into_a_stage1_folder_as_is(tmp_path):
    """A stage-1 folder's processor returns LLM `input_ids` (with image placeholders) and the Q-Former's
    `qformer_input_ids`: the retrieval model reads the latter, for ITC and ITM, and equals the `input_ids` API."""
    from test_extract_features import save_stage1_folder

    save_stage1_folder(tmp_path)
    model = blip2_hf.Blip2ForImageTextRetrieval.from_pretrained(tmp_path).eval()
    processor = blip2_hf.Blip2Processor.from_pretrained(tmp_path)
    inputs = processor(images=draw_images(2), text=["a red circle", "a dog"], padding=True, return_tensors="pt")
    qformer = {"input_ids": inputs["qformer_input_ids"], "attention_mask": inputs["qformer_attention_mask"]}
    with torch.no_grad():
        for itm in (False, True):
            expected = model(inputs["pixel_values"], **qformer, use_image_text_matching_head=itm).logits_per_image
            actual = model(**inputs, use_image_text_matching_head=itm).logits_per_image
            torch.testing.assert_close(actual, expected, atol=0, rtol=0)
        # the LLM ids the processor also returns are not the Q-Former's: read as such they give other scores
        wrong = model(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]).logits_per_image
        assert (wrong - model(**inputs).logits_per_image).abs().max() > 1e-4
        with pytest.raises(ValueError, match="pass input_ids \\(or qformer_input_ids\\)"):
            model(pixel_values=inputs["pixel_values"])


def test_qformer_ids_keep_tokens_equal_to_the_image_token_id(setup):
    """Placeholders are stripped from `input_ids` only: `qformer_input_ids` are BERT ids, where the LLM's image token
    id is an ordinary word."""
    model, pixel_values = setup["model"], setup["pixel_values"][:2]
    input_ids = torch.tensor([[2, 17, IMAGE_TOKEN, 40, 3], [2, 55, 61, IMAGE_TOKEN, 3]])
    model.config.image_token_index = IMAGE_TOKEN
    try:
        with torch.no_grad():
            kept = model(pixel_values, qformer_input_ids=input_ids).logits_per_image
            stripped = model(pixel_values, input_ids).logits_per_image
            model.config.image_token_index = None
            unstripped = model(pixel_values, input_ids).logits_per_image
    finally:
        model.config.image_token_index = None
    torch.testing.assert_close(kept, unstripped, atol=0, rtol=0)
    assert (kept - stripped).abs().max() > 1e-4
