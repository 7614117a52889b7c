"""Evaluation metrics for the BLIP-2 benchmarks, as plain functions (what tests and `Trainer.compute_metrics` call;
the `evaluate` modules under `evaluation/metrics/` are thin wrappers around them):

- `vqa_accuracy`: VQAv2 accuracy with the official VQA normalization (default), LAVIS's variant of its flow, GQA
  exact match and OK-VQA (lemmatized predictions).
- `coco_caption_scores`: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D) and, when it can run, SPICE, through `pycocoevalcap`
  exactly as `COCOEvalCap.evaluate` computes them (COCO captions, NoCaps).
- `retrieval_recall`: Recall@K for image-text retrieval (`blip2_hf.retrieval.recall_at_k`, LAVIS's keys).

Everything runs offline: no `evaluate.load("<hub name>")`, no downloads (SPICE's CoreNLP jars are used only when
already present).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import re
import shutil
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .retrieval import recall_at_k

__all__ = [
    "VQA_ARTICLES",
    "VQA_CONTRACTIONS",
    "VQA_NUMBER_WORDS",
    "VQA_PUNCTUATION",
    "coco_caption_scores",
    "lemmatize_answers",
    "normalize_vqa_answer",
    "process_digit_article",
    "process_punctuation",
    "retrieval_recall",
    "vqa_accuracy",
]

# =====================================================================================================================
# VQA: the official normalization (GT-Vision-Lab/VQA `vqaEval.py`; LAVIS's `vqa_eval.py` has the same two functions)
# =====================================================================================================================

# Replaced by a space or deleted by `process_punctuation`. Not in the list (so kept): ' : . % # & * ~ |
VQA_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# Number words up to ten (not "eleven"); "none" counts as 0, so "none of the above" becomes "0 of above".
VQA_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

VQA_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The official contractions table, entry for entry, quirks included: the keys with capitals ("Im", "Ive", "Id've",
# "I'dve") never match because words are lowercased first, and "somebody'd" maps the wrong way round (to
# "somebodyd"). Reproducing them keeps scores identical to the official tool.
VQA_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a botched look-behind (a look-ahead for the
# literal "<=" at a position that holds "."), which always passes, so it is exactly "a period not followed by a
# digit".
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official call is `periodStrip.sub("", text, re.UNICODE)`: `re.UNICODE` (= 32) lands in `count`, so at most 32
# periods are removed.
_MAX_PERIODS_STRIPPED = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official `processPunctuation`.

    Each character of `VQA_PUNCTUATION` is deleted when the *original* text has it next to a space ("p " or " p"),
    or when the original text has a digit,digit anywhere ("1,000": then every listed character is deleted);
    otherwise it is replaced by a space. Then periods not followed by a digit are removed, at most 32 of them.
    """
    # Both tests look at the input, not at the text as rewritten so far: that is what the official loop does.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in VQA_PUNCTUATION:
        if delete_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_STRIPPED)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lowercase, split on whitespace, number words "none"/"zero".."ten" to
    digits, drop the articles a/an/the, expand `VQA_CONTRACTIONS` ("dont" -> "don't"), join with single spaces."""
    words = [VQA_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(word, word) for word in words if word not in VQA_ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """`process_digit_article(process_punctuation(text))`, the official normalization of an answer.

    >>> normalize_vqa_answer("Two dogs."), normalize_vqa_answer("1,000"), normalize_vqa_answer("t-shirt")
    ('2 dogs', '1000', 't shirt')
    """
    return process_digit_article(process_punctuation(text))


def _strip_answer(text: str) -> str:
    # The official evaluate() does this to every answer and prediction before anything else.
    return text.replace("\n", " ").replace("\t", " ").strip()


# =====================================================================================================================
# VQA accuracy
# =====================================================================================================================

VqaMode = Literal["vqa", "lavis", "gqa", "okvqa"]


def _leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the positions i of min(1, #(answers other than the i-th equal to the prediction) / 3).

    The official code drops the i-th answer *by position* (its answer dicts differ by `answer_id`), so duplicated
    answers are not removed together. With 10 answers of which k match: 0, 0.3, 0.6, 0.9, 1 for k = 0..>=4.
    """
    matches = [answer == prediction for answer in answers]
    total = sum(matches)
    return sum(min(1.0, (total - match) / 3.0) for match in matches) / len(matches)


def _official_question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official flow: both sides are normalized only when the (stripped) answers are not all identical; with a
    unanimous answer nothing is normalized, not even lowercased ("Yes" against 10 x "yes" scores 0)."""
    answers = [_strip_answer(answer) for answer in answers]
    prediction = _strip_answer(prediction)
    if len(set(answers)) > 1:
        answers = [normalize_vqa_answer(answer) for answer in answers]
        prediction = normalize_vqa_answer(prediction)
    return _leave_one_out_accuracy(prediction, answers)


def _lavis_question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """LAVIS's `VQAEval.evaluate`: the prediction is always stripped and fully normalized; the answers are not
    stripped and get only `process_punctuation` (no lowercasing, number words or articles), and only when they are
    not all identical."""
    prediction = normalize_vqa_answer(_strip_answer(prediction))
    if len(set(answers)) > 1:
        answers = [process_punctuation(answer) for answer in answers]
    return _leave_one_out_accuracy(prediction, answers)


def _gqa_question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """LAVIS's `GQATask._report_metrics`: exact match after the full normalization of both sides, without the
    newline/tab clean-up (the official GQA `eval.py` compares the strings as they are)."""
    if len(answers) != 1:
        raise ValueError(f"mode='gqa' takes exactly one reference answer per question, got {len(answers)}.")
    return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(answers[0]))


_QUESTION_ACCURACY = {
    "vqa": _official_question_accuracy,
    "okvqa": _official_question_accuracy,
    "lavis": _lavis_question_accuracy,
    "gqa": _gqa_question_accuracy,
}


@functools.lru_cache(maxsize=1)
def _spacy_en_core_web_sm() -> tuple[Any, str | None]:
    """spaCy's `en_core_web_sm` pipeline (loaded once), or `(None, why not)`. Neither spaCy's model nor a download
    is available offline, so a missing model is an expected state, not an error."""
    try:
        import spacy
    except ImportError:
        return None, "spaCy is not installed"
    try:
        return spacy.load("en_core_web_sm"), None
    except OSError as err:  # spaCy raises OSError [E050] when the model package is absent
        return None, f"spaCy's en_core_web_sm model could not be loaded ({err})"


def lemmatize_answers(answers: Sequence[str]) -> tuple[list[str], bool]:
    """LAVIS's OK-VQA post-processing (`Blip2T5._lemmatize`, `apply_lemmatizer: True`): run spaCy `en_core_web_sm`
    on each answer, replace NOUN and VERB tokens by their lemma, keep the other tokens' text, join with spaces.

    Returns `(answers, lemmatized)`. Without spaCy or its model (it is not on PyPI: `python -m spacy download
    en_core_web_sm`), warns and returns the answers unchanged with `lemmatized=False`.
    """
    nlp, why_not = _spacy_en_core_web_sm()
    if nlp is None:
        warnings.warn(
            f"OK-VQA predictions are NOT lemmatized: {why_not}. Install spaCy and en_core_web_sm to reproduce LAVIS's "
            "OK-VQA numbers; without it plural/inflected answers ('dogs', 'running') are scored as written.",
            UserWarning,
            stacklevel=2,
        )
        return list(answers), False
    lemmatized = []
    for answer in answers:
        lemmatized.append(
            " ".join(token.lemma_ if token.pos_ in ("NOUN", "VERB") else token.text for token in nlp(answer))
        )
    return lemmatized, True


def _rounded_mean_percent(values: Sequence[float]) -> float:
    # The official setAccuracy: round(100 * mean, 2), computed from the unrounded per-question accuracies.
    return round(100.0 * sum(values) / len(values), 2)


def _per_group(groups: Sequence[str], accuracies: Sequence[float], name: str) -> dict[str, float]:
    if len(groups) != len(accuracies):
        raise ValueError(f"{name} has {len(groups)} entries for {len(accuracies)} questions.")
    by_group: dict[str, list[float]] = defaultdict(list)
    for group, accuracy in zip(groups, accuracies):
        by_group[group].append(accuracy)
    return {group: _rounded_mean_percent(values) for group, values in by_group.items()}


def vqa_accuracy(
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    mode: VqaMode = "vqa",
    answer_types: Sequence[str] | None = None,
    question_types: Sequence[str] | None = None,
) -> dict[str, Any]:
    """VQA accuracy in percent.

    Args:
        predictions: one answer per question.
        references: the ground-truth answers of each question (VQAv2 / OK-VQA: 10; GQA: 1). A bare string counts as
            one answer.
        mode:
            - `"vqa"` (default): the OFFICIAL VQA evaluation (`vqaEval.py`). Per question: strip "\\n"/"\\t";
              normalize the answers and the prediction (`normalize_vqa_answer`) only when the answers are not all
              identical; accuracy = mean over the leave-one-out-by-position subsets of min(1, #matches / 3).
            - `"lavis"`: LAVIS's `VQAEval` (what LAVIS reports for BLIP-2): the prediction is always normalized, the
              answers get only `process_punctuation`, and only when not unanimous. The two flows differ e.g. for
              "Yes" vs 10 x "yes" (official 0, LAVIS 100) and "two" vs 4 x "two" + 6 x "three" (official 100,
              LAVIS 0); on VQAv2's mostly normalized answers they rarely differ.
            - `"gqa"`: LAVIS's GQA metric, exact match after normalizing both sides; one reference per question.
            - `"okvqa"`: predictions lemmatized as LAVIS does for OK-VQA (`lemmatize_answers`, spaCy
              `en_core_web_sm`), then the official flow. Without spaCy: a warning, unlemmatized predictions and
              `"lemmatized": False` in the result. (LAVIS's own OK-VQA number is the lemmatization followed by its
              `"lavis"` flow: `vqa_accuracy(lemmatize_answers(preds)[0], refs, mode="lavis")`.)
        answer_types / question_types: optional, one per question (e.g. VQAv2's "yes/no", "number", "other"); add
            the accuracy per type, as the official tool reports it.

    Returns:
        `{"accuracy": float, "num_questions": int}`, accuracy = round(100 * mean, 2) as the official tool rounds;
        plus `"per_answer_type"` / `"per_question_type"` (`{type: accuracy}`) when the types are given, and
        `"lemmatized": bool` in `"okvqa"` mode.
    """
    if mode not in _QUESTION_ACCURACY:
        raise ValueError(f"mode must be one of {sorted(_QUESTION_ACCURACY)}, got {mode!r}.")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists.")
    if not predictions:
        raise ValueError("No questions to score.")
    references = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    if any(not answers for answers in references):
        raise ValueError("Every question needs at least one reference answer.")

    result: dict[str, Any] = {}
    predictions = list(predictions)
    if mode == "okvqa":
        predictions, result["lemmatized"] = lemmatize_answers(predictions)
    question_accuracy = _QUESTION_ACCURACY[mode]
    accuracies = [question_accuracy(pred, answers) for pred, answers in zip(predictions, references)]

    result = {"accuracy": _rounded_mean_percent(accuracies), "num_questions": len(accuracies), **result}
    if answer_types is not None:
        result["per_answer_type"] = _per_group(answer_types, accuracies, "answer_types")
    if question_types is not None:
        result["per_question_type"] = _per_group(question_types, accuracies, "question_types")
    return result


# =====================================================================================================================
# COCO caption metrics (pycocoevalcap)
# =====================================================================================================================

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
# SPICE's manifest class path needs these two; pycocoevalcap's wheel does not ship them (~400 MB, from
# stanford-corenlp-full-2015-12-09.zip) and `Spice()` would try to download them.
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
# SPICE's serialization reflects into java.lang.String, which Java >= 16 refuses unless the module is opened.
# JDK_JAVA_OPTIONS is read by the `java` launcher of Java 9+ (and ignored by Java 8, which needs no flag).
_SPICE_JAVA_OPTIONS = "--add-opens java.base/java.lang=ALL-UNNAMED"
# Line breaks for Java's line reader: in a caption they would split it into two lines of PTBTokenizer's
# `-preserveLines` input and shift every later caption onto the wrong image (COCOEvalCap silently misaligns).
_JAVA_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\u2028\u2029]")


def _pycocoevalcap_dir(module: str) -> Path:
    """The folder of a pycocoevalcap module (its folders are namespace packages, without `__file__`)."""
    return Path(importlib.import_module(f"pycocoevalcap.{module}").__file__).resolve().parent


def _require_java(what: str) -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            f"{what} needs Java (`java` on PATH). Install a JRE, or pass tokenize=False (captions already "
            "PTB-tokenized: lowercase, punctuation removed, single spaces) and meteor=False."
        )


def _ptb_tokenize(captions: Mapping[int, list[str]]) -> dict[int, list[str]]:
    """pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, lowercased, punctuation tokens dropped), as
    COCOEvalCap runs it on both the references and the predictions."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _require_java("PTBTokenizer")
    # PTBTokenizer writes its input to a temporary file inside the installed package folder.
    folder = _pycocoevalcap_dir("tokenizer.ptbtokenizer")
    if not os.access(folder, os.W_OK):
        raise RuntimeError(f"PTBTokenizer writes its temporary file into {folder}, which is not writable.")
    tokenized = PTBTokenizer().tokenize(
        {
            key: [{"caption": _JAVA_LINE_BREAKS.sub(" ", caption)} for caption in values]
            for key, values in captions.items()
        }
    )
    if {key: len(values) for key, values in tokenized.items()} != {
        key: len(values) for key, values in captions.items()
    }:
        raise RuntimeError("PTBTokenizer returned a different number of captions than it was given.")
    return tokenized


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """Append `value` to the environment variable `name` for the duration (pycocoevalcap's Java subprocesses
    inherit `os.environ`)."""
    old = os.environ.get(name)
    os.environ[name] = f"{old} {value}" if old else value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _spice_missing_jars() -> list[str]:
    lib = _pycocoevalcap_dir("spice.spice") / "lib"
    return [str(lib / jar) for jar in SPICE_CORENLP_JARS if not (lib / jar).is_file()]


def _spice_score(gts: Mapping[int, list[str]], res: Mapping[int, list[str]]) -> tuple[float | None, str | None]:
    """`(SPICE, None)`, or `(None, why not)`: never raises, SPICE being an optional extra."""
    missing = _spice_missing_jars()
    if missing:
        return None, (
            f"SPICE skipped: Stanford CoreNLP 3.6.0 jars missing ({', '.join(missing)}). pycocoevalcap does not ship "
            "them and would download stanford-corenlp-full-2015-12-09.zip; copy the two jars from that zip into "
            "that folder to enable SPICE (it also needs `java` and ~8 GB of heap, and on Java >= 16 "
            f"`{_SPICE_JAVA_OPTIONS}`, which is passed automatically)."
        )
    if shutil.which("java") is None:
        return None, "SPICE skipped: `java` is not on PATH."
    try:
        from pycocoevalcap.spice.spice import Spice

        # SPICE writes its input, output and parse cache under <pycocoevalcap>/spice/{tmp,cache}.
        with _environ("JDK_JAVA_OPTIONS", _SPICE_JAVA_OPTIONS):
            score, _ = Spice().compute_score(gts, res)
    except Exception as err:  # any failure: an optional metric must not lose the other scores
        return None, f"SPICE failed and was skipped: {type(err).__name__}: {err}"
    score = float(score)
    if not math.isfinite(score):
        return None, f"SPICE returned {score} and was skipped."
    return score, None


def _meteor_score(gts: Mapping[int, list[str]], res: Mapping[int, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    _require_java("METEOR")
    meteor = Meteor()  # starts a JVM (meteor-1.5.jar, -Xmx2G), a few seconds
    try:
        score, _ = meteor.compute_score(gts, res)
    finally:
        # Stop the JVM now rather than whenever the object is garbage collected (its __del__ repeats this safely).
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
    return float(score)


def coco_caption_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    spice: bool | None = None,
    *,
    meteor: bool = True,
    tokenize: bool = True,
) -> dict[str, Any]:
    """Corpus-level caption metrics exactly as pycocoevalcap's `COCOEvalCap.evaluate` computes them.

    Both sides go through pycocoevalcap's `PTBTokenizer`, then `Bleu(4)` (corpus BLEU, `option="closest"`),
    `Meteor` (meteor-1.5, `-l en -norm`), `Rouge` (ROUGE-L, beta 1.2, mean over images), `Cider` (CIDEr-D, sigma 6;
    its IDF comes from the references of the images scored together, so an image's score depends on the rest of
    the corpus and a 1-image corpus scores 0) and optionally `Spice`.

    Args:
        predictions: one caption per image.
        references: the reference captions of each image (at least one). The caller de-duplicates images (LAVIS keeps
            one result per `image_id`).
        spice: `None` (default): SPICE when its Stanford CoreNLP 3.6.0 jars are present in
            `<pycocoevalcap>/spice/lib/`; `True`: the same, but warn when it cannot run; `False`: skip. A SPICE that
            cannot run never raises: `"SPICE"` is `None` and `"notes"` says why.
        meteor: `False` skips METEOR (a JVM start, several seconds); `"METEOR"` is then `None`.
        tokenize: `False` skips PTBTokenizer, for captions that are already tokenized (lowercase, no punctuation,
            single spaces); numbers comparable with published ones need `True`.

    Returns:
        - `"Bleu_1"`..`"Bleu_4"`, `"METEOR"`, `"ROUGE_L"`, `"CIDEr"`, `"SPICE"`: pycocoevalcap's own scale
          (fractions; CIDEr can exceed 1), under COCOEvalCap's key names.
        - the same keys suffixed `"_x100"`: the papers' convention (BLIP-2 reports "CIDEr 145.8", "BLEU@4 43.7").
        - `"agg_metrics"`: CIDEr + Bleu_4 (fractions), LAVIS's model-selection metric.
        - `"num_images"`, and `"notes"`: a list of strings saying why a metric is `None` (empty when none is).

    Java is needed for PTBTokenizer, METEOR and SPICE. PTBTokenizer and SPICE write temporary files inside the
    installed pycocoevalcap package folder (as upstream does), so that folder must be writable. Captions are put
    on one line each before tokenizing ("\\n", "\\r", "\\v", "\\f", U+2028/9 become spaces): upstream would split
    such a caption in two and misalign every later image.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_caption_inputs(predictions, references)

    # COCOEvalCap's layout: {image id: [captions]}, exactly one prediction per image.
    gts = {index: [str(ref) for ref in refs] for index, refs in enumerate(references)}
    res = {index: [str(pred)] for index, pred in enumerate(predictions)}
    if tokenize:
        gts, res = _ptb_tokenize(gts), _ptb_tokenize(res)

    notes: list[str] = []
    scores: dict[str, float | None] = dict.fromkeys(CAPTION_METRICS)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        scores[f"Bleu_{n}"] = float(value)
    if meteor:
        scores["METEOR"] = _meteor_score(gts, res)
    else:
        notes.append("METEOR skipped (meteor=False).")
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice is False:
        notes.append("SPICE skipped (spice=False).")
    else:
        scores["SPICE"], why_not = _spice_score(gts, res)
        if why_not is not None:
            notes.append(why_not)
            if spice:
                warnings.warn(why_not, UserWarning, stacklevel=2)

    return _caption_result(scores, len(predictions), notes)


def _check_caption_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raise `ValueError` unless there is one non-empty list of references per prediction, and at least one."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists.")
    if not predictions:
        raise ValueError("No captions to score.")
    if any(isinstance(refs, str) or not refs for refs in references):
        raise ValueError("Every image needs a list of at least one reference caption.")


def _caption_result(scores: Mapping[str, float | None], num_images: int, notes: list[str]) -> dict[str, Any]:
    """`coco_caption_scores`'s return value: the scores, the same x100, `agg_metrics`, `num_images` and `notes`."""
    result: dict[str, Any] = dict(scores)
    result.update({f"{key}_x100": None if value is None else 100.0 * value for key, value in scores.items()})
    result["agg_metrics"] = scores["CIDEr"] + scores["Bleu_4"]
    result["num_images"] = num_images
    result["notes"] = notes
    return result


# =====================================================================================================================
# Retrieval
# =====================================================================================================================


def retrieval_recall(
    score_i2t: Any,
    score_t2i: Any,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    ties: Literal["pessimistic", "optimistic"] = "pessimistic",
) -> dict[str, float]:
    """Recall@K in percent as LAVIS's `RetrievalTask._report_metrics`; see `blip2_hf.retrieval.recall_at_k`.

    `score_i2t [N_img, N_txt]` and `score_t2i [N_txt, N_img]` are separate because BLIP-2 re-ranks the top-k of each
    direction with ITM (for a single similarity matrix pass it and its transpose). Returns `txt_r{k}` (text
    retrieval: an image's rank is that of its best-ranked caption), `img_r{k}`, `txt_r_mean`, `img_r_mean`, `r_mean`
    and `agg_metrics` (= `txt_r_mean`).
    """
    return recall_at_k(score_i2t, score_t2i, img2txt, txt2img, ks=ks, ties=ties)
