"""Zero-shot visual question answering with a BLIP-2 `Blip2ForConditionalGeneration` (the paper's Table 2): VQAv2,
OK-VQA and GQA, scored as LAVIS does.

    python evaluation/vqa.py --model Salesforce/blip2-opt-2.7b \\
        --questions v2_OpenEnded_mscoco_val2014_questions.json --annotations v2_mscoco_val2014_annotations.json \\
        --image_dir coco/val2014 --output_dir results/vqav2
    accelerate launch --multi_gpu --num_processes 8 evaluation/vqa.py ...   # the same, 8 GPUs

Question files (`--format auto` tells them apart):
- `vqa`: the official VQAv2 / OK-VQA questions JSON `{"data_subtype": "val2014", "questions": [{"image_id", "question",
  "question_id"}]}`, answers from `--annotations` (`{"annotations": [{"question_id", "answers": [{"answer"}],
  "answer_type"}]}`; without it only predictions are written, e.g. for test-dev). Images are `--image_dir` /
  `--image_template`, by default COCO's `COCO_{split}_{image_id:012d}.jpg` (`{split}` = the file's
  `data_subtype`, test2015 for test-dev2015, or `--coco_split`), also looked for in an `{split}/` subfolder.
- `gqa`: GQA balanced questions `{qid: {"imageId", "question", "answer", ...}}`, images `{image_id}.jpg`.
- `lavis`: LAVIS's list `[{"question_id", "question", "image", "answer": [...] or "..."}]`, images relative to
  `--image_dir`.

Each question is cleaned as LAVIS's `blip_question` processor does, put into `--prompt` at `{}`, and answered by beam
search (5 beams, 1 to 10 new tokens, length penalty -1). The answer is the decoded new tokens, stripped. Questions are
answered grouped by image: each batch holds whole images' questions (about `--batch_size` questions), each image is
decoded and encoded once for all of its questions (`generate(image_rows=...)`, see `blip2_hf.inference`), and with
several processes each image's questions stay in one process. The answers are the tokens one question per row gives.

Metric: `blip2_hf.metrics.vqa_accuracy` in the dataset's mode (`vqa`: the official VQAv2 accuracy; `okvqa`; `gqa`:
exact match after VQA normalization).

Results are labelled `custom` (with the question file's name) unless `--benchmark vqav2|okvqa|gqa` is given and the
file is that benchmark's official one, whole (see `common.check_benchmark`): only then do `results.json` and the model
card `blip2-hf push` writes name the benchmark.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from common import (
    CUSTOM,
    PredictionLog,
    add_benchmark_arg,
    add_common_args,
    add_generation_args,
    check_args,
    check_benchmark,
    custom_table,
    dataset_fields,
    drop_bad_images,
    finish,
    fmt,
    gather,
    generation_kwargs,
    image_path,
    interpolate_pos_encoding,
    load_model,
    load_processor,
    markdown_table,
    model_name,
    predict_resumable,
    read_json,
    settings,
    shard,
    skipped_list,
    write_outputs,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from blip2_hf import VQA_PROMPT, Blip2ForConditionalGeneration
from blip2_hf.data import load_image
from blip2_hf.inference import batches_by_image, decode_answers, grouped_inputs
from blip2_hf.metrics import vqa_accuracy

METRIC_MODES = {"vqav2": "vqa", "okvqa": "okvqa", "gqa": "gqa"}

# Table 2 of the paper: its columns and its BLIP-2 rows (zero-shot accuracy, %).
TABLE2_COLUMNS = {
    ("vqav2", "val"): "VQAv2 val",
    ("vqav2", "test-dev"): "VQAv2 test-dev",
    ("okvqa", "test"): "OK-VQA test",
    ("gqa", "test-dev"): "GQA test-dev",
}
TABLE2_PAPER_ROWS = {
    "BLIP-2 ViT-L OPT2.7B": (50.1, 49.7, 30.2, 33.9),
    "BLIP-2 ViT-g OPT2.7B": (53.5, 52.3, 31.7, 34.6),
    "BLIP-2 ViT-g OPT6.7B": (54.3, 52.6, 36.4, 36.4),
    "BLIP-2 ViT-L FlanT5XL": (62.6, 62.3, 39.4, 44.4),
    "BLIP-2 ViT-g FlanT5XL": (63.1, 63.0, 40.7, 44.2),
    "BLIP-2 ViT-g FlanT5XXL": (65.2, 65.0, 45.9, 44.7),
}

_QUESTION_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--questions", required=True, help="Questions: official VQA, GQA or LAVIS JSON.")
    parser.add_argument("--annotations", default=None, help="Official VQA annotations (answers) for --format vqa.")
    parser.add_argument("--format", default="auto", choices=["auto", "vqa", "gqa", "lavis"])
    parser.add_argument(
        "--dataset",
        default="auto",
        choices=["auto", *METRIC_MODES],
        help="How answers are scored (the metric's mode), not a label: results are labelled with a benchmark only "
        "with --benchmark. auto: gqa for GQA files and LAVIS files with one answer per question, okvqa when a file "
        "name contains 'okvqa', else vqav2.",
    )
    add_benchmark_arg(parser, "vqa")
    parser.add_argument(
        "--split",
        default=None,
        choices=["val", "test-dev", "test"],
        help="The split recorded for custom data (with --benchmark: the official file's split).",
    )
    parser.add_argument(
        "--metric_mode",
        default=None,
        choices=["vqa", "lavis", "gqa", "okvqa"],
        help="vqa_accuracy mode (default: the dataset's; 'lavis' scores VQAv2 as LAVIS's VQAEval).",
    )
    parser.add_argument(
        "--image_template",
        default=None,
        help="Image file name with {image_id} (and {split} for COCO), relative to --image_dir. Default: "
        "COCO_{split}_{image_id:012d}.jpg (vqa), {image_id}.jpg (gqa).",
    )
    parser.add_argument("--coco_split", default=None, help="{split} of COCO image names (default: data_subtype).")
    parser.add_argument(
        "--prompt",
        default=None,
        help=f"Template with {{}} for the question. Default: {VQA_PROMPT!r} (LAVIS's zero-shot VQA configs, every "
        "LLM; `blip2-hf ask`'s too); the paper's OPT rows used 'Question: {} Answer:'.",
    )
    parser.add_argument(
        "--use_chat_template",
        action="store_true",
        help="Put the filled-in --prompt into the LLM tokenizer's chat template as a user turn (chat / instruct "
        "LLMs; default: the plain prompt).",
    )
    parser.add_argument("--max_words", type=int, default=50, help="Words kept per question (LAVIS: 50).")
    add_generation_args(parser, num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)
    args = parser.parse_args(argv)
    check_args(args)
    if args.benchmark and (args.dataset not in ("auto", args.benchmark) or args.split):
        parser.error(f"--benchmark {args.benchmark} sets the scoring and the split: drop --dataset / --split.")
    if args.prompt is not None and "{}" not in args.prompt:
        parser.error("--prompt needs {} where the question goes.")
    return args


def pre_question(question: str, max_words: int = 50) -> str:
    """LAVIS's `BlipQuestionProcessor`: lowercase, delete `. ! " ( ) * # : ; ~` (apostrophes, commas and `?` stay),
    strip trailing spaces, keep the first `max_words` words."""
    question = _QUESTION_PUNCTUATION.sub("", question.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


# ---------------------------------------------------------------------------------------------------------------------
# Question files -> rows {"question_id", "question", "image", "answers" (list or None), "answer_type",
# "question_type" (or None)}
# ---------------------------------------------------------------------------------------------------------------------


def detect_format(data: Any) -> str:
    if isinstance(data, list):
        return "lavis"
    if isinstance(data, dict) and "questions" in data:
        return "vqa"
    if isinstance(data, dict) and data:
        sample = list(itertools.islice(data.values(), 10))
        if all(isinstance(value, dict) and "imageId" in value for value in sample):
            return "gqa"
    raise ValueError(
        "Cannot tell the question file's format: expected an official VQA questions file ({'questions': [...]}), "
        "GQA questions ({qid: {'imageId', ...}}) or a LAVIS list ([{'question_id', 'question', 'image'}])."
    )


def load_vqa(data: dict, args: argparse.Namespace) -> list[dict]:
    answers = {}
    if args.annotations:
        answers = {ann["question_id"]: ann for ann in read_json(args.annotations)["annotations"]}
    split = args.coco_split or data.get("data_subtype")
    if split and not args.coco_split:
        split = split.replace("test-dev", "test")  # test-dev2015 questions are about test2015 images
    template = args.image_template or "COCO_{split}_{image_id:012d}.jpg"
    if "{split" in template and split is None:
        raise SystemExit("The questions file has no data_subtype: pass --coco_split (e.g. val2014).")
    rows = []
    for question in data["questions"]:
        name = template.format(image_id=question["image_id"], split=split)
        path = image_path(args.image_dir, name)
        if split and not os.path.isfile(path) and os.path.isfile(image_path(args.image_dir, f"{split}/{name}")):
            path = image_path(args.image_dir, f"{split}/{name}")  # COCO unpacked as val2014/COCO_val2014_...jpg
        annotation = answers.get(question["question_id"])
        if args.annotations and annotation is None:
            raise SystemExit(f"Question {question['question_id']} has no annotation in {args.annotations}.")
        rows.append(
            dict(
                question_id=question["question_id"],
                question=question["question"],
                image=path,
                answers=[answer["answer"] for answer in annotation["answers"]] if annotation else None,
                answer_type=annotation.get("answer_type") if annotation else None,
                question_type=annotation.get("question_type") if annotation else None,
            )
        )
    return rows


def load_gqa(data: dict, args: argparse.Namespace) -> list[dict]:
    template = args.image_template or "{image_id}.jpg"
    return [
        dict(
            question_id=question_id,
            question=entry["question"],
            image=image_path(args.image_dir, template.format(image_id=entry["imageId"])),
            answers=[entry["answer"]] if "answer" in entry else None,
            answer_type=None,
            question_type=None,
        )
        for question_id, entry in data.items()
    ]


def load_lavis(data: list, args: argparse.Namespace) -> list[dict]:
    rows = []
    for index, entry in enumerate(data):
        answers = entry.get("answer", entry.get("answers"))
        rows.append(
            dict(
                question_id=entry.get("question_id", index),
                question=entry["question"],
                image=image_path(args.image_dir, entry["image"]),
                answers=[answers] if isinstance(answers, str) else answers,
                answer_type=entry.get("answer_type"),
                question_type=entry.get("question_type"),
            )
        )
    return rows


def load_questions(args: argparse.Namespace) -> tuple[list[dict], str, str]:
    """The rows (first `--limit`), the file format and the dataset."""
    data = read_json(args.questions)
    file_format = detect_format(data) if args.format == "auto" else args.format
    rows = {"vqa": load_vqa, "gqa": load_gqa, "lavis": load_lavis}[file_format](data, args)
    if args.limit is not None:
        rows = rows[: args.limit]
    if not rows:
        raise SystemExit(f"No questions in {args.questions}.")
    dataset = args.benchmark or args.dataset
    if dataset == "auto":
        names = f"{args.questions} {args.annotations or ''}".lower()
        single_answer = file_format == "lavis" and isinstance(data[0].get("answer"), str)
        if file_format == "gqa" or single_answer or "gqa" in names:
            dataset = "gqa"
        else:
            dataset = "okvqa" if "okvqa" in names else "vqav2"
    return rows, file_format, dataset


# ---------------------------------------------------------------------------------------------------------------------
# Answering
# ---------------------------------------------------------------------------------------------------------------------


def by_image(rows: list[dict]) -> list[list[dict]]:
    """`rows` grouped by image, the images in order of their first question, each image's questions in file order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["image"], []).append(row)
    return list(groups.values())


class Collate:
    """Loads a batch's images, once each, and builds the `generate(image_rows=...)` inputs of their questions
    (`blip2_hf.inference.grouped_inputs`: `[pad..., <image> x Q, BOS, prompt]` rows, padded on the left)."""

    def __init__(self, processor, prompt: str, max_words: int, use_chat_template: bool = False):
        self.processor, self.prompt, self.max_words = processor, prompt, max_words
        self.use_chat_template = use_chat_template

    def __call__(self, groups: list[list[dict]]) -> tuple[list[dict], Any]:
        texts = [
            [self.prompt.replace("{}", pre_question(row["question"], self.max_words)) for row in g] for g in groups
        ]
        if self.use_chat_template:
            texts = [[self.processor.chat_prompt(text) for text in group] for group in texts]
        images = [load_image(group[0]["image"]) for group in groups]
        inputs = grouped_inputs(self.processor, images, texts)
        return [row for group in groups for row in group], inputs


@torch.no_grad()
def answer(
    model, processor, rows: list[dict], args: argparse.Namespace, prompt: str, main: bool
) -> Iterator[list[dict]]:
    """The predictions `{question_id, answer, question, image}` of `rows`, one list per batch as it is answered.

    Each batch holds whole images' questions (about `--batch_size` questions; an image with more is a batch of its
    own), so that every image is decoded and encoded once (`generate(image_rows=...)`); the answers are the tokens one
    question per row would give."""
    gen_kwargs = generation_kwargs(args)
    interpolate = interpolate_pos_encoding(args, model.config)
    groups = by_image(rows)
    batches = [[groups[i] for i in batch] for batch in batches_by_image([len(g) for g in groups], args.batch_size)]
    # batch_size=None: each item already is a batch (the images of one generate call)
    loader = DataLoader(
        batches,
        batch_size=None,
        shuffle=False,
        num_workers=args.num_workers,
        collate_fn=Collate(processor, prompt, args.max_words, args.use_chat_template),
    )
    for batch_rows, inputs in tqdm(loader, desc="Answering", unit="batch", disable=not main):
        inputs = inputs.to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.vision_model.dtype)
        output = model.generate(**inputs, interpolate_pos_encoding=interpolate, **gen_kwargs)
        texts = decode_answers(model, processor, output, inputs["input_ids"].shape[1])
        yield [
            dict(question_id=row["question_id"], answer=text, question=row["question"], image=row["image"])
            for row, text in zip(batch_rows, texts)
        ]


# ---------------------------------------------------------------------------------------------------------------------
# Scoring and reporting
# ---------------------------------------------------------------------------------------------------------------------


def table2(name: str, column: str, accuracy: float | None) -> str:
    columns = list(TABLE2_COLUMNS.values())
    if column not in columns:
        columns.append(column)
    padding = ["-"] * (len(columns) - len(TABLE2_COLUMNS))
    rows = [[f"{model} (paper)", *map(fmt, values), *padding] for model, values in TABLE2_PAPER_ROWS.items()]
    rows.append([f"**{name}**", *(fmt(accuracy) if col == column else "-" for col in columns)])
    title = "Zero-shot VQA accuracy (%), as Table 2 of the BLIP-2 paper."
    return title + "\n\n" + markdown_table(["Models", *columns], rows)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    accelerator = Accelerator()
    rows, file_format, dataset = load_questions(args)
    if args.benchmark:
        split = check_benchmark("vqa", args, args.questions, len(rows), "questions")
        column = TABLE2_COLUMNS.get((dataset, split), f"{dataset} {split}")
    else:  # custom data: its own column, never a paper benchmark's
        split, column = args.split, f"{CUSTOM}: {os.path.basename(args.questions)}"
    num_questions = len(rows)
    rows, bad = drop_bad_images(accelerator, rows, args)  # every image decoded before the model: nothing fails late
    has_answers = all(row["answers"] for row in rows)
    # sharded by image, so that each image is encoded by one process, once
    local_rows = [row for group in shard(accelerator, by_image(rows)) for row in group]
    log = PredictionLog(args.output_dir, "question_id", args, accelerator) if args.output_dir else None

    processor = load_processor(args)
    if args.use_chat_template:
        processor.chat_prompt("")  # a tokenizer without a chat template fails here, before the model loads
    model, dtype = load_model(Blip2ForConditionalGeneration, args, accelerator)
    prompt = args.prompt or VQA_PROMPT
    main = accelerator.is_main_process
    if main:
        processes = accelerator.num_processes
        print(f"{dataset} ({file_format} format, {split}): {len(rows)} questions, {processes} process(es)")
        print(f"prompt {prompt!r}, generation {generation_kwargs(args)}")

    def predict(todo: list[dict]) -> Iterator[list[dict]]:
        return answer(model, processor, todo, args, prompt, main)

    predictions = gather(accelerator, predict_resumable(local_rows, "question_id", log, predict, main))
    if not accelerator.is_main_process:
        finish(accelerator)
        return None
    # the processes answered images, not file order: back to the file's order
    by_id = {prediction["question_id"]: prediction for prediction in predictions}
    assert len(by_id) == len(predictions) == len(rows), "a question was answered twice or not at all"
    predictions = [by_id[row["question_id"]] for row in rows]

    metric_mode = args.metric_mode or METRIC_MODES[dataset]
    metrics = None
    if has_answers:
        answer_types = [row["answer_type"] for row in rows]
        question_types = [row["question_type"] for row in rows]
        metrics = vqa_accuracy(
            [prediction["answer"] for prediction in predictions],
            [row["answers"] for row in rows],
            mode=metric_mode,
            answer_types=answer_types if all(answer_types) else None,
            question_types=question_types if all(question_types) else None,
        )
    else:
        print("No answers in the question file (and no --annotations): predictions only, nothing scored.")
    results = dict(
        task="vqa",
        **dataset_fields(args, args.questions, dataset),
        split=split,
        table_column=column,
        metrics=metrics,
        settings=settings(
            args,
            accelerator,
            dtype,
            format=file_format,
            prompt_used=prompt,
            metric_mode=metric_mode,
            generation=generation_kwargs(args),
            num_questions=len(rows),
            num_images=len({row["image"] for row in rows}),
            num_predictions=len(predictions),
            num_questions_skipped=num_questions - len(rows),
        ),
        skipped_images=skipped_list(bad),
    )
    accuracy = metrics["accuracy"] if metrics else None
    if args.benchmark:
        table = table2(model_name(args), column, accuracy)
    else:  # the paper's rows measure other data: custom results stand alone (as caption.py and retrieval.py)
        table = custom_table(model_name(args), os.path.basename(args.questions), ["accuracy"], [accuracy])
    write_outputs(args.output_dir, results, predictions, table)
    if log is not None:
        log.remove()  # predictions.json holds them all now
    finish(accelerator)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
