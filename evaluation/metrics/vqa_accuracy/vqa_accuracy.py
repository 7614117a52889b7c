"""VQA accuracy as an `evaluate` metric: a wrapper of `blip2_hf.metrics.vqa_accuracy`.

Load it by path (works offline, with HF_HUB_OFFLINE=1 HF_EVALUATE_OFFLINE=1):

    metric = evaluate.load("evaluation/metrics/vqa_accuracy")
    metric.compute(predictions=["2", "yes"], references=[["2"] * 10, ["yes"] * 9 + ["no"]])
"""

import datasets
import evaluate

from blip2_hf.metrics import vqa_accuracy

_DESCRIPTION = """\
VQA accuracy (Antol et al., 2015; VQAv2): per question, the mean over the 10 leave-one-out subsets of the ground-truth
answers of min(1, #answers equal to the prediction / 3), in percent. The default mode is the OFFICIAL VQA evaluation
(GT-Vision-Lab/VQA vqaEval.py): answers and prediction are normalized (punctuation, number words, articles,
contractions) only when the answers are not all identical. Other modes: "lavis" (LAVIS's variant: prediction always
normalized, answers only punctuation-processed), "gqa" (exact match after normalizing both sides, one answer per
question), "okvqa" (predictions lemmatized with spaCy en_core_web_sm when installed, then the official flow).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): one predicted answer per question.
    references (`list` of `list` of `str`): the ground-truth answers of each question (10 for VQAv2 / OK-VQA, 1 for
        GQA).
    mode (`str`, default "vqa"): "vqa" (official), "lavis", "gqa" or "okvqa".
    answer_types (`list` of `str`, optional): one per question (all questions, in order, also after `add_batch`);
        adds "per_answer_type".
    question_types (`list` of `str`, optional): likewise; adds "per_question_type".
Returns:
    accuracy (`float`): percent, rounded to 2 decimals as the official tool does.
    num_questions (`int`).
    per_answer_type / per_question_type (`dict`): when the types are given.
    lemmatized (`bool`): in "okvqa" mode, whether spaCy lemmatization was applied.
Examples:
    >>> metric = evaluate.load("evaluation/metrics/vqa_accuracy")
    >>> metric.compute(predictions=["red"], references=[["red"] * 2 + ["blue"] * 8])
    {'accuracy': 60.0, 'num_questions': 1}
"""

_CITATION = """\
@inproceedings{antol2015vqa,
  title={{VQA}: Visual Question Answering},
  author={Antol, Stanislaw and Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and Batra, Dhruv and
          Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={ICCV},
  year={2015}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
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
            reference_urls=["https://visualqa.org/evaluation.html", "https://github.com/GT-Vision-Lab/VQA"],
        )

    def _compute(self, predictions, references, mode="vqa", answer_types=None, question_types=None):
        return vqa_accuracy(
            predictions, references, mode=mode, answer_types=answer_types, question_types=question_types
        )
