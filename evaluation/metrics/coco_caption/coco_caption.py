"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) as an `evaluate` metric: a wrapper of
`blip2_hf.metrics.coco_caption_scores` (pycocoevalcap, as COCOEvalCap computes them).

Load it by path (works offline, with HF_HUB_OFFLINE=1 HF_EVALUATE_OFFLINE=1):

    metric = evaluate.load("evaluation/metrics/coco_caption")
    metric.compute(predictions=["a dog runs"], references=[["a dog is running", "a brown dog runs on grass"]])
"""

import datasets
import evaluate

from blip2_hf.metrics import coco_caption_scores

_DESCRIPTION = """\
Corpus-level image captioning metrics exactly as pycocoevalcap's COCOEvalCap computes them: both sides are tokenized
with its PTBTokenizer (Java), then Bleu(4), Meteor (Java), Rouge (ROUGE-L) and Cider (CIDEr-D; its IDF comes from the
references of the images scored together, so scores depend on the whole corpus). SPICE runs only when the Stanford
CoreNLP 3.6.0 jars are present in pycocoevalcap/spice/lib; otherwise "SPICE" is None and "notes" says why.
Scores use pycocoevalcap's scale (fractions) under its key names, and the papers' x100 convention under "<key>_x100".
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): one generated caption per image (one entry per image: de-duplicate first).
    references (`list` of `list` of `str`): the reference captions of each image.
    spice (`bool` or `None`, default None): None runs SPICE when its jars are present, True also warns when it cannot
        run, False skips it.
    meteor (`bool`, default True): False skips METEOR (a JVM start, several seconds).
    tokenize (`bool`, default True): False skips PTBTokenizer (captions already tokenized).
Returns:
    Bleu_1, Bleu_2, Bleu_3, Bleu_4, METEOR, ROUGE_L, CIDEr, SPICE (`float` or None): pycocoevalcap's values.
    <key>_x100 (`float` or None): the same x100, as papers report them (e.g. CIDEr 145.8).
    agg_metrics (`float`): CIDEr + Bleu_4 (LAVIS's model-selection metric).
    num_images (`int`), notes (`list` of `str`): why a metric is None.
Examples:
    >>> metric = evaluate.load("evaluation/metrics/coco_caption")
    >>> round(metric.compute(predictions=["a dog"], references=[["a dog"]], meteor=False)["Bleu_1"], 6)
    1.0
"""

_CITATION = """\
@article{chen2015microsoft,
  title={Microsoft {COCO} Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and
          Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoCaption(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://github.com/salaniz/pycocoevalcap", "https://github.com/tylin/coco-caption"],
        )

    def _compute(self, predictions, references, spice=None, meteor=True, tokenize=True):
        return coco_caption_scores(predictions, references, spice=spice, meteor=meteor, tokenize=tokenize)
