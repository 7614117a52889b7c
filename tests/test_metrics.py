"""Evaluation metrics: the official VQA normalization and flow (and LAVIS's, GQA's, OK-VQA's), pycocoevalcap's caption
scores (hand-computed BLEU / ROUGE-L / CIDEr, SPICE's graceful absence), Recall@K, and the `evaluate` wrappers loaded
by path, offline, in a subprocess."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

import blip2_hf.metrics as metrics
from blip2_hf.metrics import (
    coco_caption_scores,
    lemmatize_answers,
    normalize_vqa_answer,
    process_digit_article,
    process_punctuation,
    retrieval_recall,
    vqa_accuracy,
)
from blip2_hf.retrieval import recall_at_k

REPO = Path(__file__).resolve().parents[1]
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer / METEOR need Java")
# Pure-Python scorers only: no PTBTokenizer (inputs already tokenized), no METEOR / SPICE (Java).
PURE = {"spice": False, "meteor": False, "tokenize": False}

# ---------------------------------------------------------------------------------------------------------------------
# VQA normalization: the official functions' input -> output pairs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("Two", "2"),
        ("two dogs", "2 dogs"),
        ("A Dog", "dog"),
        ("none", "0"),
        ("zero", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # the number words stop at ten
        ("None of the above", "0 of above"),
        ("an apple", "apple"),
        ("the", ""),
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),
        ("10,000 feet", "10000 feet"),
        ("end.", "end"),
        ("a.m.", "am"),
        ("St. Louis", "st louis"),
        ("Dont know", "don't know"),
        ("it's", "it's"),
        ("oclock", "o'clock"),
        ("yall", "y'all"),
        ("Im", "im"),  # the table's capitalized keys can never match: words are lowercased first
        ("somebody'd", "somebodyd"),  # the table's reversed entry, kept
        ("red/white", "red white"),
        ("red / white", "red white"),
        ("black-and-white", "black and white"),
        ("(left)", "left"),
        ("t-shirt", "t shirt"),
        ("hello , world", "hello world"),
        ("50%", "50%"),  # % : ' are not in the punctuation list
        ("1:30", "1:30"),
        ("x" + "." * 40, "x" + "." * 8),  # at most 32 periods are stripped (re.UNICODE passed as `count`)
    ],
)
def test_normalize_vqa_answer_official_vectors(text, expected):
    assert normalize_vqa_answer(text) == expected


def test_process_punctuation_rules():
    # Delete vs space is decided on the ORIGINAL text: "/" becomes a space first, which puts a space before "-", but
    # "-" is still replaced by a space (not deleted) because the original "a/-b" has no " -" / "- ".
    assert process_punctuation("a/-b") == "a  b"
    assert process_punctuation("a, b-c") == "a b c"  # ", " deletes the comma; the hyphen becomes a space
    # A digit,digit anywhere deletes every listed character instead of spacing it.
    assert process_punctuation("a-b 1,2") == "ab 12"
    assert process_punctuation("(1,000)") == "1000"
    # Periods: removed unless a digit follows; at most 32.
    assert process_punctuation("1.5.") == "1.5"
    assert process_punctuation("." * 33 + "5") == ".5"
    assert process_punctuation("." * 34) == ".."
    assert process_digit_article("The  Two\tDogs") == "2 dogs"


# ---------------------------------------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 30.0), (2, 60.0), (3, 90.0), (4, 100.0), (10, 100.0)])
def test_vqa_accuracy_ladder(matches, expected):
    # Leave-one-out BY POSITION: with 3 matches, the 3 subsets missing a match see 2 (2/3), the 7 others see 3 (1):
    # 0.9. (Dropping by value would remove all three together.)
    answers = ["red"] * matches + ["blue"] * (10 - matches)
    assert vqa_accuracy(["red"], [answers]) == {"accuracy": expected, "num_questions": 1}


def test_vqa_accuracy_mean_and_rounding():
    refs = [["red"] * k + ["blue"] * (10 - k) for k in range(5)]
    assert vqa_accuracy(["red"] * 5, refs)["accuracy"] == 56.0  # (0 + 30 + 60 + 90 + 100) / 5
    assert vqa_accuracy(["yes", "no", "no"], [["yes"] * 10] * 3)["accuracy"] == 33.33


def test_vqa_accuracy_unanimous_answers_are_not_normalized():
    """Officially both sides are normalized only when the answers disagree; LAVIS always normalizes the prediction
    and only punctuation-processes the answers."""
    cases = [
        ("Yes", ["yes"] * 10, 0.0, 100.0),
        ("two", ["2"] * 10, 0.0, 100.0),
        ("two", ["two"] * 4 + ["three"] * 6, 100.0, 0.0),  # official: both -> "2"; LAVIS: answers stay "two"
        ("Yes", ["yes"] * 9 + ["no"], 100.0, 100.0),
    ]
    for pred, answers, official, lavis in cases:
        assert vqa_accuracy([pred], [answers])["accuracy"] == official, (pred, answers)
        assert vqa_accuracy([pred], [answers], mode="vqa")["accuracy"] == official
        assert vqa_accuracy([pred], [answers], mode="lavis")["accuracy"] == lavis, (pred, answers)
    # The "\n" / "\t" / strip clean-up happens before the unanimity test, on both sides.
    assert vqa_accuracy([" yes\n"], [["yes\t"] * 10])["accuracy"] == 100.0


def test_vqa_accuracy_per_type():
    result = vqa_accuracy(
        ["yes", "2", "cat"],
        [["yes"] * 10, ["2"] * 3 + ["3"] * 7, ["dog"] * 10],
        answer_types=["yes/no", "number", "other"],
        question_types=["is the", "how many", "what"],
    )
    assert result["accuracy"] == round(100 * (1 + 0.9 + 0) / 3, 2)
    assert result["per_answer_type"] == {"yes/no": 100.0, "number": 90.0, "other": 0.0}
    assert result["per_question_type"] == {"is the": 100.0, "how many": 90.0, "what": 0.0}


def test_vqa_accuracy_gqa_mode():
    result = vqa_accuracy(["The Dog.", "dogs", "Two", "left"], [["dog"], ["dog"], "2", ["left"]], mode="gqa")
    assert result == {"accuracy": 75.0, "num_questions": 4}
    with pytest.raises(ValueError, match="exactly one"):
        vqa_accuracy(["dog"], [["dog", "cat"]], mode="gqa")


def test_vqa_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="mode"):
        vqa_accuracy(["a"], [["a"]], mode="official")
    with pytest.raises(ValueError, match="predictions"):
        vqa_accuracy(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="No questions"):
        vqa_accuracy([], [])
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy(["a"], [[]])


@pytest.fixture
def spacy_module(monkeypatch):
    """Install `module` as `spacy` (None: spaCy not importable) with the model cache cleared around the test."""

    def install(module):
        monkeypatch.setitem(sys.modules, "spacy", module)
        metrics._spacy_en_core_web_sm.cache_clear()

    yield install
    metrics._spacy_en_core_web_sm.cache_clear()


def test_okvqa_without_spacy_warns_and_flags(spacy_module):
    spacy_module(None)  # `import spacy` raises ImportError
    refs = [["dog"] * 6 + ["puppy"] * 4]
    with pytest.warns(UserWarning, match="NOT lemmatized"):
        result = vqa_accuracy(["dogs"], refs, mode="okvqa")
    assert result == {"accuracy": 0.0, "num_questions": 1, "lemmatized": False}


def test_okvqa_without_model_warns(spacy_module):
    def load(name):
        raise OSError(f"[E050] Can't find model '{name}'.")

    spacy_module(types.SimpleNamespace(load=load))
    with pytest.warns(UserWarning, match="en_core_web_sm"):
        assert lemmatize_answers(["dogs"]) == (["dogs"], False)


def test_okvqa_lemmatizes_nouns_and_verbs(spacy_module):
    lemmas = {"dogs": ("NOUN", "dog"), "running": ("VERB", "run"), "quickly": ("ADV", "quick")}

    def nlp(text):
        return [
            types.SimpleNamespace(text=w, pos_=lemmas.get(w, ("X", w))[0], lemma_=lemmas.get(w, ("X", w))[1])
            for w in text.split()
        ]

    spacy_module(types.SimpleNamespace(load=lambda name: nlp))
    assert lemmatize_answers(["dogs running quickly"]) == (["dog run quickly"], True)
    result = vqa_accuracy(["dogs"], [["dog"] * 6 + ["puppy"] * 4], mode="okvqa")
    assert result == {"accuracy": 100.0, "num_questions": 1, "lemmatized": True}


# ---------------------------------------------------------------------------------------------------------------------
# Caption metrics (pycocoevalcap)
# ---------------------------------------------------------------------------------------------------------------------


def test_bleu_hand_computed():
    scores = coco_caption_scores(["a b c x"], [["a b c d"]], **PURE)
    # Clipped n-gram precisions 3/4, 2/3, 1/2, 0/1; same length so no brevity penalty; pycocoevalcap's smoothing
    # (+1e-15 / +1e-9) keeps BLEU-4 just above 0.
    assert scores["Bleu_1"] == pytest.approx(0.75, abs=1e-8)
    assert scores["Bleu_2"] == pytest.approx(math.sqrt(0.75 * 2 / 3), abs=1e-8)
    assert scores["Bleu_3"] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3), abs=1e-8)
    assert 0 < scores["Bleu_4"] < 1e-3
    assert scores["Bleu_1_x100"] == pytest.approx(75.0, abs=1e-6)
    # Brevity penalty exp(1 - r/c), with r the reference length closest to the hypothesis ("closest").
    assert coco_caption_scores(["a b"], [["a b c d"]], **PURE)["Bleu_2"] == pytest.approx(math.exp(-1), abs=1e-8)
    two_refs = coco_caption_scores(["a b"], [["a b c d", "a b x"]], **PURE)
    assert two_refs["Bleu_1"] == pytest.approx(math.exp(1 - 3 / 2), abs=1e-8)
    # Corpus-level, not a mean of per-image scores: the counts are pooled (p1 = 4/4 + BP over 4 vs 6 words).
    pooled = coco_caption_scores(["a b", "c d"], [["a b"], ["c d e f"]], **PURE)
    assert pooled["Bleu_1"] == pytest.approx(math.exp(1 - 6 / 4), abs=1e-8)


def test_rouge_l_hand_computed():
    assert coco_caption_scores(["a b c x"], [["a b c d"]], **PURE)["ROUGE_L"] == pytest.approx(0.75)
    # LCS 2: P = 1, R = 1/2, F_beta with beta = 1.2: (1 + b^2) P R / (R + b^2 P).
    expected = (1 + 1.44) * 1 * 0.5 / (0.5 + 1.44 * 1)
    assert coco_caption_scores(["a b"], [["a b c d"]], **PURE)["ROUGE_L"] == pytest.approx(expected)
    # pycocoevalcap takes the best precision and the best recall over the references separately.
    assert coco_caption_scores(["a b"], [["a b c d", "a"]], **PURE)["ROUGE_L"] == pytest.approx(1.0)


def test_cider_depends_on_the_corpus():
    """CIDEr-D's IDF comes from the references of the images scored together: the same image scores differently when
    another image is added, and a 1-image corpus scores 0 (every IDF is log(1) - log(1) = 0)."""
    image_a = ("a b", ["a c"])  # one unigram of two matches; no bigram matches
    image_b = ("c d", ["c d"])  # a perfect caption that shares "c" with image_a's reference
    image_c = ("e f", ["e f"])  # a perfect caption with its own vocabulary

    def cider(*images):
        return coco_caption_scores([hyp for hyp, _ in images], [refs for _, refs in images], **PURE)["CIDEr"]

    # Per image: 10 * mean over n = 1..4 of the tf-idf cosine (bigram-length penalty 1 here). A perfect caption with
    # nonzero weights scores 10 * (1 + 1 + 0 + 0) / 4 = 5 (no 3- or 4-grams).
    # Two images: idf(a) = idf(b) = log 2 (df 1, and 0 -> 1), idf(c) = log 2 - log 2 = 0, so image_a's unigram
    # cosine is wa^2 / (sqrt(2) wa * wa) = 1/sqrt(2).
    a_in_two = 10 / 4 / math.sqrt(2)
    assert cider(image_a, image_b) == pytest.approx((a_in_two + 5) / 2, rel=1e-12)
    # Three images: idf(a) = idf(b) = log 3, idf(c) = log 3 - log 2.
    log2, log3 = math.log(2), math.log(3)
    a_in_three = 10 / 4 * log3 / (math.sqrt(2) * math.sqrt(log3**2 + (log3 - log2) ** 2))
    assert cider(image_a, image_b, image_c) == pytest.approx((a_in_three + 5 + 5) / 3, rel=1e-12)
    assert a_in_three == pytest.approx(1.6584224, abs=1e-6) and a_in_two == pytest.approx(1.7677670, abs=1e-6)
    assert cider(image_a) == 0.0
    assert cider(image_b) == 0.0  # even a perfect caption


def test_caption_result_layout():
    result = coco_caption_scores(["c d", "e f"], [["c d"], ["e f"]], **PURE)
    assert result["CIDEr"] == pytest.approx(5.0) and result["CIDEr_x100"] == pytest.approx(500.0)
    assert result["agg_metrics"] == pytest.approx(result["CIDEr"] + result["Bleu_4"])
    assert result["METEOR"] is None and result["METEOR_x100"] is None and result["SPICE"] is None
    assert result["num_images"] == 2 and len(result["notes"]) == 2
    for key in metrics.CAPTION_METRICS:
        assert key in result and f"{key}_x100" in result


def test_caption_rejects_bad_input():
    with pytest.raises(ValueError, match="predictions"):
        coco_caption_scores(["a"], [["a"], ["b"]], **PURE)
    with pytest.raises(ValueError, match="at least one"):
        coco_caption_scores(["a"], [[]], **PURE)
    with pytest.raises(ValueError, match="at least one"):
        coco_caption_scores(["a"], ["a"], **PURE)  # a bare string, not a list of captions
    with pytest.raises(ValueError, match="No captions"):
        coco_caption_scores([], [], **PURE)


def test_caption_needs_java_for_ptb(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="tokenize=False"):
        coco_caption_scores(["a dog"], [["a dog"]], spice=False, meteor=False)


@needs_java
def test_ptb_tokenization_and_line_breaks():
    # PTBTokenizer lowercases and drops punctuation tokens, as COCOEvalCap does before scoring.
    tokenized = coco_caption_scores(["A Dog, running."], [["a dog running"]], spice=False, meteor=False)
    raw = coco_caption_scores(["A Dog, running."], [["a dog running"]], **PURE)
    assert tokenized["Bleu_3"] == pytest.approx(1.0, abs=1e-8) and raw["Bleu_1"] < 0.5
    # A line break inside a caption would split it into two PTB lines and shift every later caption onto the wrong
    # image; captions are put on one line first.
    preds, refs = ["a\rred car", "a blue\u2028bus", "two dogs"], [["a red car"], ["a blue bus"], ["two dogs"]]
    broken = coco_caption_scores(preds, refs, spice=False, meteor=False)
    clean = coco_caption_scores([" ".join(p.split()) for p in preds], refs, spice=False, meteor=False)
    assert broken == clean


@pytest.fixture
def no_spice_jars(monkeypatch):
    """SPICE's CoreNLP jars absent, whatever is installed; constructing `Spice` (which would download them) fails."""
    import pycocoevalcap.spice.spice as spice_module

    class MustNotRun:
        def __init__(self):
            raise AssertionError("Spice() must not be constructed without its jars (it downloads them).")

    monkeypatch.setattr(metrics, "SPICE_CORENLP_JARS", ("no-such-stanford-corenlp-3.6.0.jar",))
    monkeypatch.setattr(spice_module, "Spice", MustNotRun)


def test_spice_absent_is_reported_not_raised(no_spice_jars, recwarn):
    result = coco_caption_scores(["a dog"], [["a dog"]], **PURE | {"spice": None})
    assert result["SPICE"] is None and result["SPICE_x100"] is None
    (note,) = [n for n in result["notes"] if "SPICE" in n]
    assert "stanford-corenlp-3.6.0" in note and "--add-opens" in note
    assert not [w for w in recwarn if "SPICE" in str(w.message)]  # auto mode: a note, no warning
    with pytest.warns(UserWarning, match="SPICE skipped"):
        assert coco_caption_scores(["a dog"], [["a dog"]], **PURE | {"spice": True})["SPICE"] is None
    assert "SPICE skipped (spice=False)." in coco_caption_scores(["a dog"], [["a dog"]], **PURE)["notes"]


def test_spice_failure_is_reported_not_raised(monkeypatch):
    import pycocoevalcap.spice.spice as spice_module

    seen = {}

    class FailingSpice:
        def compute_score(self, gts, res):
            seen["JDK_JAVA_OPTIONS"] = os.environ.get("JDK_JAVA_OPTIONS")
            raise subprocess.CalledProcessError(1, ["java", "-jar", "spice-1.0.jar"])

    before = os.environ.get("JDK_JAVA_OPTIONS")
    monkeypatch.setattr(metrics, "_spice_missing_jars", lambda: [])
    monkeypatch.setattr(metrics.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(spice_module, "Spice", FailingSpice)
    result = coco_caption_scores(["a dog"], [["a dog"]], spice=None, meteor=False, tokenize=False)
    assert result["SPICE"] is None and any("SPICE failed" in note for note in result["notes"])
    assert result["Bleu_1"] == pytest.approx(1.0, abs=1e-8)  # the other scores survive
    # Java >= 16 needs --add-opens for SPICE; it is passed through the environment, then restored.
    assert "--add-opens java.base/java.lang=ALL-UNNAMED" in seen["JDK_JAVA_OPTIONS"]
    assert os.environ.get("JDK_JAVA_OPTIONS") == before


@pytest.mark.slow
@needs_java
def test_caption_scores_equal_cocoevalcap(monkeypatch):
    """The whole pipeline (PTBTokenizer, BLEU, METEOR, ROUGE-L, CIDEr) equals COCOEvalCap.evaluate to the last bit
    (its SPICE is replaced by a stub: without the CoreNLP jars it would try to download them)."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    class StubSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", StubSpice)
    preds = ["A man riding a horse on the beach.", "Two dogs play in the snow", "a red car parked on the street"]
    refs = [
        ["A man rides a horse along the beach.", "a person on a horse at the shore", "Man riding horse."],
        ["Two dogs playing in snow.", "dogs run through the snow"],
        ["A red car is parked on a street.", "a parked red car", "red automobile by the curb"],
    ]
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i} for i in range(len(refs))],
        "annotations": [
            {"image_id": i, "caption": c, "id": 100 * i + j} for i, caps in enumerate(refs) for j, c in enumerate(caps)
        ],
    }
    coco.createIndex()
    evaluator = coco_eval.COCOEvalCap(coco, coco.loadRes([{"image_id": i, "caption": p} for i, p in enumerate(preds)]))
    evaluator.evaluate()

    ours = coco_caption_scores(preds, refs, spice=False)
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert ours[key] == evaluator.eval[key], key
    assert 0 < ours["METEOR"] < 1


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval Recall@K
# ---------------------------------------------------------------------------------------------------------------------


def _ranked_rows(orders: list[list[int]]) -> np.ndarray:
    """Score rows that rank the columns in the given orders (first = best)."""
    rows = np.zeros((len(orders), len(orders[0])))
    for row, order in enumerate(orders):
        rows[row, order] = -np.arange(len(order), dtype=float)
    return rows


# 4 images x 8 captions (2 each). Best-ranked ground-truth caption per image: 0th, 1st, 2nd, 5th.
IMG2TXT = [[0, 1], [2, 3], [4, 5], [6, 7]]
TXT2IMG = [0, 0, 1, 1, 2, 2, 3, 3]
SCORE_I2T = _ranked_rows(
    [[0, 1, 2, 3, 4, 5, 6, 7], [5, 2, 0, 1, 3, 4, 6, 7], [0, 1, 4, 2, 3, 5, 6, 7], [0, 1, 2, 3, 4, 6, 5, 7]]
)
# Rank of each caption's image: 0, 0, 1, 1, 0, 3, 0, 1.
SCORE_T2I = _ranked_rows(
    [[0, 1, 2, 3], [0, 2, 1, 3], [0, 1, 2, 3], [2, 1, 0, 3], [2, 0, 1, 3], [0, 1, 3, 2], [3, 0, 1, 2], [0, 3, 1, 2]]
)


def test_retrieval_recall_constructed_matrix():
    result = retrieval_recall(SCORE_I2T, SCORE_T2I, IMG2TXT, TXT2IMG)
    txt = {"txt_r1": 25.0, "txt_r5": 75.0, "txt_r10": 100.0}
    img = {"img_r1": 50.0, "img_r5": 100.0, "img_r10": 100.0}
    assert {k: result[k] for k in txt} == txt and {k: result[k] for k in img} == img
    assert result["txt_r_mean"] == pytest.approx(200 / 3) and result["img_r_mean"] == pytest.approx(250 / 3)
    assert result["r_mean"] == pytest.approx(75.0) and result["agg_metrics"] == result["txt_r_mean"]
    assert result == recall_at_k(SCORE_I2T, SCORE_T2I, IMG2TXT, TXT2IMG)
    small_k = retrieval_recall(SCORE_I2T, SCORE_T2I, IMG2TXT, TXT2IMG, ks=(1, 2, 3))
    assert (small_k["txt_r2"], small_k["txt_r3"], small_k["img_r2"], small_k["img_r3"]) == (50.0, 75.0, 87.5, 87.5)


# ---------------------------------------------------------------------------------------------------------------------
# The `evaluate` modules, loaded by path, offline, with an empty HF cache
# ---------------------------------------------------------------------------------------------------------------------

_EVALUATE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import evaluate
    import numpy as np

    root, score_i2t, score_t2i, img2txt = sys.argv[1], *(json.loads(arg) for arg in sys.argv[2:5])
    out = {}
    vqa = evaluate.load(f"{root}/evaluation/metrics/vqa_accuracy")
    out["vqa_name"] = vqa.name
    out["vqa"] = vqa.compute(predictions=["red", "Yes"], references=[["red"] * 3 + ["blue"] * 7, ["yes"] * 10])
    vqa.add_batch(predictions=["Yes"], references=[["yes"] * 10])
    vqa.add_batch(predictions=["two"], references=[["two"] * 4 + ["three"] * 6])
    out["vqa_lavis"] = vqa.compute(mode="lavis", answer_types=["yes/no", "number"])
    out["gqa"] = vqa.compute(predictions=["The dog"], references=[["dog"]], mode="gqa")
    caption = evaluate.load(f"{root}/evaluation/metrics/coco_caption")
    out["caption_name"] = caption.name
    out["caption"] = caption.compute(
        predictions=["a b", "c d"], references=[["a c"], ["c d"]], spice=False, meteor=False, tokenize=False
    )
    recall = evaluate.load(f"{root}/evaluation/metrics/retrieval_recall")
    out["recall_name"] = recall.name
    recall.add_batch(predictions=score_i2t[:2], references=img2txt[:2])
    recall.add_batch(predictions=np.array(score_i2t[2:]), references=img2txt[2:])
    out["recall"] = recall.compute(score_t2i=score_t2i)
    out["recall_transposed"] = recall.compute(predictions=score_i2t, references=img2txt)
    print("RESULT " + json.dumps(out))
    """
)


def test_evaluate_modules_load_by_path_offline(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),  # an empty cache: nothing previously downloaded can be used
        "HF_MODULES_CACHE": str(tmp_path / "hf_home" / "modules"),
    }
    args = [json.dumps(x.tolist() if isinstance(x, np.ndarray) else x) for x in (SCORE_I2T, SCORE_T2I, IMG2TXT)]
    proc = subprocess.run(
        [sys.executable, "-c", _EVALUATE_SCRIPT, str(REPO), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])

    assert (out["vqa_name"], out["caption_name"], out["recall_name"]) == (
        "vqa_accuracy",
        "coco_caption",
        "retrieval_recall",
    )
    assert out["vqa"] == {"accuracy": 45.0, "num_questions": 2}  # official: 90 and 0 ("Yes" vs 10 x "yes")
    assert out["vqa_lavis"] == {
        "accuracy": 50.0,
        "num_questions": 2,
        "per_answer_type": {"yes/no": 100.0, "number": 0.0},
    }
    assert out["gqa"] == {"accuracy": 100.0, "num_questions": 1}
    assert out["caption"]["CIDEr"] == pytest.approx((10 / 4 / math.sqrt(2) + 5) / 2, rel=1e-12)
    assert out["caption"]["SPICE"] is None and out["caption"]["notes"]
    assert out["recall"] == retrieval_recall(SCORE_I2T, SCORE_T2I, IMG2TXT, TXT2IMG)
    assert out["recall_transposed"] == retrieval_recall(SCORE_I2T, SCORE_I2T.T, IMG2TXT, TXT2IMG)
    assert (tmp_path / "hf_home").is_dir()  # evaluate's caches went to the temporary HF_HOME
