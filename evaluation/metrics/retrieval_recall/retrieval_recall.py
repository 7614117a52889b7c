"""Image-text retrieval Recall@K as an `evaluate` metric: a wrapper of `blip2_hf.metrics.retrieval_recall`.

Load it by path (works offline, with HF_HUB_OFFLINE=1 HF_EVALUATE_OFFLINE=1):

    metric = evaluate.load("evaluation/metrics/retrieval_recall")
    metric.compute(predictions=score_i2t.tolist(), references=img2txt, score_t2i=score_t2i.tolist())
"""

import datasets
import evaluate
import numpy as np

from blip2_hf.metrics import retrieval_recall

_DESCRIPTION = """\
Recall@K for image-text retrieval, as LAVIS's RetrievalTask._report_metrics (COCO 5k, Flickr30K 1k): text retrieval
(txt_r@K: an image's rank is that of its best-ranked ground-truth caption) and image retrieval (img_r@K), in percent.

How a score matrix travels through evaluate's features: one example per IMAGE.
- predictions: the image's row of score_i2t, i.e. its score against every text in the gallery (all rows the same
  length, N_txt);
- references: the gallery indices of the image's ground-truth texts (img2txt[i]).
Batches of image rows can be added with add_batch. The text-to-image scores are not an image-indexed feature, so they
are a compute() argument: score_t2i ([N_txt, N_img]; default: the transpose of score_i2t, right for a single
similarity matrix, NOT for BLIP-2's ITM re-ranking, whose two directions re-rank different top-k sets). txt2img is
derived from references (each text belongs to exactly one image) unless given. For full-size galleries (COCO: 25k x
5k) calling blip2_hf.metrics.retrieval_recall directly avoids the Arrow round trip.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): score_i2t, one row [N_txt] per image.
    references (`list` of `list` of `int`): img2txt, the ground-truth text indices of each image.
    score_t2i (`list` of `list` of `float` or array [N_txt, N_img], optional): defaults to the transpose of
        score_i2t.
    txt2img (`list` of `int`, optional): the image of each text; defaults to the inverse of `references`.
    ks (`tuple` of `int`, default (1, 5, 10)).
    ties (`str`, default "pessimistic"): a candidate tied with the ground truth counts as ranked ahead of it
        ("pessimistic") or behind it ("optimistic").
Returns:
    txt_r1, txt_r5, txt_r10, txt_r_mean, img_r1, img_r5, img_r10, img_r_mean, r_mean, agg_metrics (= txt_r_mean):
    `float`, in percent.
Examples:
    >>> metric = evaluate.load("evaluation/metrics/retrieval_recall")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[[0], [1]], ks=(1,))["txt_r1"]
    100.0
"""

_CITATION = """\
@inproceedings{li2023blip2,
  title={{BLIP-2}: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large Language Models},
  author={Li, Junnan and Li, Dongxu and Savarese, Silvio and Hoi, Steven},
  booktitle={ICML},
  year={2023}
}
"""


def _invert(img2txt, num_texts):
    """txt2img from img2txt, when every text belongs to exactly one image."""
    txt2img = [-1] * num_texts
    for image, texts in enumerate(img2txt):
        for text in texts:
            if not 0 <= text < num_texts:
                raise ValueError(f"Text index {text} of image {image} is outside [0, {num_texts}).")
            if txt2img[text] != -1:
                raise ValueError(f"Text {text} is listed under images {txt2img[text]} and {image}: pass txt2img.")
            txt2img[text] = image
    if -1 in txt2img:
        raise ValueError(f"Text {txt2img.index(-1)} belongs to no image: pass txt2img.")
    return txt2img


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
            reference_urls=["https://github.com/salesforce/LAVIS"],
        )

    def _compute(self, predictions, references, score_t2i=None, txt2img=None, ks=(1, 5, 10), ties="pessimistic"):
        if len({len(row) for row in predictions}) > 1:
            raise ValueError("Every score row (prediction) must have one score per text in the gallery.")
        score_i2t = np.asarray(predictions, dtype=np.float64)
        img2txt = [[int(text) for text in texts] for texts in references]
        score_t2i = np.ascontiguousarray(score_i2t.T) if score_t2i is None else np.asarray(score_t2i)
        if txt2img is None:
            txt2img = _invert(img2txt, score_i2t.shape[1])
        return retrieval_recall(score_i2t, score_t2i, img2txt, list(txt2img), ks=tuple(ks), ties=ties)
