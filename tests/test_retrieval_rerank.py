"""`blip2_hf.retrieval.itm_rerank` batched over queries, each image's cross-attention keys/values projected once:
its scores against a plain loop of `model.image_text_matching`, one (image, text) pair at a time, as LAVIS's
`compute_sim_matrix` scores them (image embeddings given to every pass, texts at their own length)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blip2_hf
from blip2_hf.retrieval import (
    NO_MATCH_SCORE,
    TextIndex,
    encode_images,
    encode_texts,
    itc_similarity,
    itm_match_logits,
    itm_rerank,
)
from blip2_hf.testing_utils import IMAGE_TOKEN, perturb_, tiny_config_dict

NUM_IMAGES, NUM_TEXTS = 7, 11
LENGTHS = [3, 14, 5, 8, 2, 9, 4, 12, 6, 10, 7]  # right-padded to 14 ([PAD] = 0)
ATOL = 1e-5


@pytest.fixture(scope="module")
def gallery():
    config = blip2_hf.Blip2Config(**tiny_config_dict("opt", text_input=True, image_token_index=None))
    torch.manual_seed(0)
    model = perturb_(blip2_hf.Blip2ForImageTextRetrieval(config)).eval()
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(NUM_IMAGES, 3, 30, 30, generator=generator)
    input_ids = torch.zeros(NUM_TEXTS, max(LENGTHS), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(LENGTHS):
        ids = torch.randint(5, 99, (length,), generator=generator)
        input_ids[row, :length] = ids.masked_fill(ids == IMAGE_TOKEN, 91)
        attention_mask[row, :length] = 1
    images = encode_images(model, [pixel_values[:4], pixel_values[4:]], progress=False)
    texts = encode_texts(model, [(input_ids, attention_mask)], progress=False)
    itc = itc_similarity(images.image_feats, texts.text_feats)
    with torch.no_grad():  # the plain reference: every (image, text) pair in its own ITM pass
        itm = torch.tensor(
            [
                [
                    model.image_text_matching(
                        images.image_embeds[[i]], input_ids[[t], : LENGTHS[t]], attention_mask[[t], : LENGTHS[t]]
                    )[0][0, 1]
                    for t in range(NUM_TEXTS)
                ]
                for i in range(NUM_IMAGES)
            ]
        )
    return dict(model=model, images=images, texts=texts, itc=itc, itm=itm)


def plain_scores(gallery, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LAVIS's matrices from the per-pair reference: ITM match logit + ITC on each query's top-k, -100 elsewhere."""
    itc, total = gallery["itc"], gallery["itm"] + gallery["itc"]
    score_i2t = torch.full_like(itc, NO_MATCH_SCORE)
    top = itc.topk(min(k, NUM_TEXTS), dim=1).indices
    score_i2t.scatter_(1, top, total.gather(1, top))
    score_t2i = torch.full_like(itc.t(), NO_MATCH_SCORE)
    top = itc.t().topk(min(k, NUM_IMAGES), dim=1).indices
    score_t2i.scatter_(1, top, total.t().gather(1, top))
    return score_i2t, score_t2i


def assert_same_scores_and_rankings(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert torch.equal(
        got.argsort(dim=1, descending=True, stable=True), want.argsort(dim=1, descending=True, stable=True)
    )


# k below both gallery sizes, between them (below the texts, above the images), and above both.
@pytest.mark.parametrize("k", [2, 9, 128])
@pytest.mark.parametrize("batch_size", [3, 128])
def test_batched_scores_equal_plain_per_pair_scores(gallery, k, batch_size):
    score_i2t, score_t2i = itm_rerank(
        gallery["model"], gallery["images"], gallery["texts"], gallery["itc"], k=k, batch_size=batch_size,
        progress=False,
    )  # fmt: skip
    want_i2t, want_t2i = plain_scores(gallery, k)
    assert ((score_i2t != NO_MATCH_SCORE).sum(1) == min(k, NUM_TEXTS)).all()
    assert ((score_t2i != NO_MATCH_SCORE).sum(1) == min(k, NUM_IMAGES)).all()
    assert_same_scores_and_rankings(score_i2t, want_i2t)
    assert_same_scores_and_rankings(score_t2i, want_t2i)


@pytest.mark.parametrize("image_chunk_size", [1, 2, 3, 7, 100])
def test_chunked_run_equals_unchunked(gallery, image_chunk_size):
    args = (gallery["model"], gallery["images"], gallery["texts"], gallery["itc"])
    unchunked = itm_rerank(*args, k=4, batch_size=5, progress=False)
    chunked = itm_rerank(*args, k=4, batch_size=5, image_chunk_size=image_chunk_size, progress=False)
    for got, want in zip(chunked, unchunked, strict=True):
        assert_same_scores_and_rankings(got, want)
    for got, want in zip(chunked, plain_scores(gallery, 4), strict=True):
        assert_same_scores_and_rankings(got, want)


def test_each_image_is_projected_once(gallery, monkeypatch):
    """The whole re-ranking projects each image's keys/values once (in chunks), whatever the number of its pairs, and
    no Q-Former pass projects image states itself."""
    model = gallery["model"]
    projected_images, project_image = [], model.qformer.project_image

    def counting_project_image(states, *args, **kwargs):
        projected_images.append(states.shape[0])
        return project_image(states, *args, **kwargs)

    cross = next(layer.crossattention.attention for layer in model.qformer.encoder.layer if layer.has_cross_attention)
    rows_projected, project_key_value = [], cross.project_key_value

    def counting_project_key_value(states):
        rows_projected.append(states.shape[0])
        return project_key_value(states)

    monkeypatch.setattr(model.qformer, "project_image", counting_project_image)
    monkeypatch.setattr(cross, "project_key_value", counting_project_key_value)
    args = (model, gallery["images"], gallery["texts"], gallery["itc"])
    itm_rerank(*args, k=128, batch_size=4, image_chunk_size=3, progress=False)  # 77 pairs in 20 passes
    assert projected_images == [3, 3, 1]
    assert rows_projected == [3, 3, 1]


def test_batches_are_cut_to_their_longest_text(gallery, monkeypatch):
    """Pairs run sorted by text length, so that a batch of short texts is not padded to the gallery's longest."""
    model, widths = gallery["model"], []
    image_text_matching = model.image_text_matching

    def recording(image, input_ids, attention_mask):
        widths.append(input_ids.shape[1])
        assert bool(attention_mask[:, -1].any())  # no column that is padding in every row
        return image_text_matching(image, input_ids, attention_mask)

    monkeypatch.setattr(model, "image_text_matching", recording)
    # the texts padded further than their longest: the extra columns never reach the model
    texts = gallery["texts"]
    padded = TextIndex(
        texts.text_feats,
        torch.nn.functional.pad(texts.input_ids, (0, 6)),
        torch.nn.functional.pad(texts.attention_mask, (0, 6)),
    )
    # k=128: every text is paired with all 7 images, so batches of 7 hold one text length each
    itm_rerank(model, gallery["images"], padded, gallery["itc"], k=128, batch_size=NUM_IMAGES, progress=False)
    assert widths == sorted(LENGTHS)


def test_itm_match_logits_of_any_pairs(gallery):
    """Pairs in any order, repeated, on a slice of the images (as a process of `evaluation/retrieval.py` has them)."""
    model, images, texts = gallery["model"], gallery["images"], gallery["texts"]
    image_ids = torch.tensor([4, 0, 4, 2, 0, 3, 1, 4])
    text_ids = torch.tensor([10, 3, 10, 0, 7, 5, 1, 2])
    logits = itm_match_logits(model, images.image_embeds[2:], texts, image_ids, text_ids, batch_size=3, progress=False)
    torch.testing.assert_close(logits, gallery["itm"][image_ids + 2, text_ids], atol=ATOL, rtol=0)
    empty = torch.empty(0, dtype=torch.long)
    assert itm_match_logits(model, images.image_embeds, texts, empty, empty, progress=False).shape == (0,)


def test_bad_arguments(gallery):
    with pytest.raises(ValueError, match="image_chunk_size must be positive"):
        itm_rerank(gallery["model"], gallery["images"], gallery["texts"], gallery["itc"], image_chunk_size=0)
    with pytest.raises(ValueError, match=r"must be \[N_pairs\]"):
        itm_match_logits(
            gallery["model"], gallery["images"].image_embeds, gallery["texts"], torch.zeros(3, dtype=torch.long),
            torch.zeros(2, dtype=torch.long),
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"image_ids must lie in \[0, 5\)"):
        itm_match_logits(
            gallery["model"], gallery["images"].image_embeds[2:], gallery["texts"], torch.tensor([0, 5]),
            torch.tensor([0, 1]),
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# benchmarks/bench_retrieval.py: its LAVIS baseline is right, and the script runs
# ---------------------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_retrieval", ROOT / "benchmarks" / "bench_retrieval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("k", [2, 5])
def test_benchmark_lavis_baseline_equals_plain_per_pair_scores(gallery, k, monkeypatch):
    """The baseline the benchmark times is LAVIS's scoring, also when its calls group several queries."""
    bench = load_benchmark()
    monkeypatch.setattr(bench, "LAVIS_CALL_PAIRS", 8)  # 4 queries per call at k=2, 1 at k=5: both paths
    scores = bench.lavis_rerank(gallery["model"], gallery["images"], gallery["texts"], gallery["itc"], k)
    for got, want in zip(scores, plain_scores(gallery, k), strict=True):
        assert_same_scores_and_rankings(got, want)


@pytest.mark.slow
def test_retrieval_benchmark_quick_run(tmp_path):
    out = tmp_path / "retrieval.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_retrieval.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| seconds |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["check"]["identical"] and result["distinct_pairs"] <= result["lavis_pairs"]
