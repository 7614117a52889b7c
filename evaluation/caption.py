"""Image captioning with a BLIP-2 `Blip2ForConditionalGeneration` (the paper's Table 3): COCO Karpathy test and
NoCaps (validation; per domain), scored with the COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr, SPICE).

    python evaluation/caption.py --model Salesforce/blip2-opt-2.7b-coco --image_size 364 \\
        --annotations coco_karpathy_test.json --image_dir coco --output_dir results/coco
    python evaluation/caption.py --model Salesforce/blip2-opt-2.7b --annotations nocaps_val_4500_captions.json \\
        --image_dir nocaps/val --output_dir results/nocaps
    accelerate launch --multi_gpu --num_processes 8 evaluation/caption.py ...   # the same, 8 GPUs

Annotation files (`--format auto` tells them apart):
- `lavis`: LAVIS's list `[{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["...", ...]}]`
  (`coco_karpathy_test.json`); the image id is the number ending the file name, as LAVIS derives it.
- `coco`: COCO caption ground truth `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`
  (`coco_karpathy_test_gt.json`, NoCaps' `nocaps_val_4500_captions.json`). Images with a `domain` (NoCaps:
  in-domain / near-domain / out-domain) are also scored per domain.
Images are `--image_dir` / the file's path. Files without captions (NoCaps test) give predictions only.
Results are labelled `custom` (with the file's name) unless `--benchmark coco|nocaps` is given and the file is that
benchmark's official one, whole (see `common.check_benchmark`).

The model continues `--prompt` ("a photo of") by beam search (5 beams, 8 to 30 new tokens); the caption is the
decoded continuation without the prompt, stripped. Metrics: `blip2_hf.metrics.coco_caption_scores` (PTB tokenizer;
SPICE needs Java and Stanford CoreNLP, `--spice` / `--no-spice`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from common import (
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
    loader,
    markdown_table,
    model_name,
    predict_resumable,
    read_json,
    settings,
    shard,
    skipped_list,
    write_outputs,
)
from tqdm.auto import tqdm

from blip2_hf import Blip2ForConditionalGeneration
from blip2_hf.data import load_image
from blip2_hf.metrics import coco_caption_scores

DOMAINS = ("in-domain", "near-domain", "out-domain")

# Table 3 of the paper: NoCaps zero-shot (validation) CIDEr / SPICE per domain and overall, COCO fine-tuned
# (Karpathy test) BLEU@4 / CIDEr; its BLIP-2 rows.
TABLE3_COLUMNS = (
    "NoCaps in C",
    "in S",
    "near C",
    "near S",
    "out C",
    "out S",
    "overall C",
    "overall S",
    "COCO B@4",
    "COCO C",
)
TABLE3_PAPER_ROWS = {
    "BLIP-2 ViT-g OPT2.7B": (123.0, 15.8, 117.8, 15.4, 123.4, 15.1, 119.7, 15.4, 43.7, 145.8),
    "BLIP-2 ViT-g OPT6.7B": (123.7, 15.8, 119.2, 15.3, 124.4, 14.8, 121.0, 15.3, 43.5, 145.2),
    "BLIP-2 ViT-g FlanT5XL": (123.7, 16.3, 120.2, 15.9, 124.8, 15.1, 121.6, 15.8, 42.4, 144.5),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--annotations", required=True, help="LAVIS caption list or COCO caption ground truth.")
    parser.add_argument("--format", default="auto", choices=["auto", "lavis", "coco"])
    parser.add_argument(
        "--dataset",
        default="auto",
        choices=["auto", "coco", "nocaps"],
        help="How the images are scored (nocaps: also per domain), not a label: results are labelled with a "
        "benchmark only with --benchmark. auto: nocaps when the images have a 'domain', else coco.",
    )
    add_benchmark_arg(parser, "caption")
    parser.add_argument("--prompt", default="a photo of", help="Text the caption continues (no placeholder).")
    parser.add_argument(
        "--meteor", action=argparse.BooleanOptionalAction, default=True, help="Compute METEOR (a JVM start per score)."
    )
    parser.add_argument(
        "--spice",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Compute SPICE (default: when it can run here).",
    )
    add_generation_args(parser, num_beams=5, max_new_tokens=30, min_new_tokens=8, length_penalty=1.0)
    args = parser.parse_args(argv)
    check_args(args)
    if args.benchmark and args.dataset not in ("auto", args.benchmark):
        parser.error(f"--benchmark {args.benchmark} sets the scoring: drop --dataset {args.dataset}.")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Annotation files -> rows {"image_id", "image", "references": [...], "domain" (or None)}, one per image
# ---------------------------------------------------------------------------------------------------------------------


def lavis_image_id(path: str) -> int | str:
    """LAVIS's COCO image id: the number after the last `_` of the file name (`COCO_val2014_000000391895.jpg` ->
    391895); the file name itself when that is not a number."""
    stem = os.path.splitext(os.path.basename(path))[0]
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else stem


def load_lavis(data: list, args: argparse.Namespace) -> list[dict]:
    rows: dict[Any, dict] = {}
    for entry in data:
        image_id = entry.get("image_id", lavis_image_id(entry["image"]))
        captions = entry.get("caption", [])
        row = rows.setdefault(
            image_id,
            dict(image_id=image_id, image=image_path(args.image_dir, entry["image"]), references=[], domain=None),
        )
        row["references"] += [captions] if isinstance(captions, str) else list(captions)
    return list(rows.values())


def load_coco(data: dict, args: argparse.Namespace) -> list[dict]:
    references: dict[Any, list[str]] = {}
    for annotation in data.get("annotations", []):
        references.setdefault(annotation["image_id"], []).append(annotation["caption"])
    return [
        dict(
            image_id=image["id"],
            image=image_path(args.image_dir, image["file_name"]),
            references=references.get(image["id"], []),
            domain=image.get("domain"),
        )
        for image in data["images"]
    ]


def load_annotations(args: argparse.Namespace) -> tuple[list[dict], str, str]:
    """The rows (first `--limit` images), the file format and the dataset."""
    data = read_json(args.annotations)
    file_format = args.format
    if file_format == "auto":
        if isinstance(data, list):
            file_format = "lavis"
        elif isinstance(data, dict) and "images" in data:
            file_format = "coco"
        else:
            raise SystemExit(
                f"Cannot tell the format of {args.annotations}: expected a LAVIS list [{{'image', 'caption'}}] or "
                "COCO ground truth {'images': [...], 'annotations': [...]}."
            )
    rows = load_lavis(data, args) if file_format == "lavis" else load_coco(data, args)
    if args.limit is not None:
        rows = rows[: args.limit]
    if not rows:
        raise SystemExit(f"No images in {args.annotations}.")
    dataset = args.benchmark or args.dataset
    if dataset == "auto":
        dataset = "nocaps" if any(row["domain"] for row in rows) else "coco"
    return rows, file_format, dataset


# ---------------------------------------------------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------------------------------------------------


class Collate:
    """Loads a batch's images; every row is `[<image> x Q, BOS, prompt]` (the same length: no padding)."""

    def __init__(self, processor, prompt: str):
        self.processor, self.prompt = processor, prompt

    def __call__(self, rows: list[dict]) -> tuple[list[dict], Any]:
        images = [load_image(row["image"]) for row in rows]
        texts = [self.prompt] * len(rows)
        return rows, self.processor(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt")


@torch.no_grad()
def caption(model, processor, rows: list[dict], args: argparse.Namespace, main: bool) -> Iterator[list[dict]]:
    """The predictions `{image_id, caption, image}` of `rows`, one list per batch as it is captioned."""
    gen_kwargs = generation_kwargs(args)
    interpolate = interpolate_pos_encoding(args, model.config)
    for batch_rows, inputs in tqdm(
        loader(rows, Collate(processor, args.prompt), args), desc="Captioning", unit="batch", disable=not main
    ):
        inputs = inputs.to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.vision_model.dtype)
        output = model.generate(**inputs, interpolate_pos_encoding=interpolate, **gen_kwargs)
        if model.config.use_decoder_only_language_model:
            output = output[:, inputs["input_ids"].shape[1] :]  # drop `<image> x Q, BOS, prompt`
        texts = processor.batch_decode(output, skip_special_tokens=True)
        yield [
            dict(image_id=row["image_id"], caption=text.strip(), image=row["image"])
            for row, text in zip(batch_rows, texts)
        ]


# ---------------------------------------------------------------------------------------------------------------------
# Scoring and reporting
# ---------------------------------------------------------------------------------------------------------------------


def score(predictions: list[dict], rows: list[dict], dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """COCO caption metrics over all images; for NoCaps also per domain (each domain scored as its own corpus, as
    the NoCaps evaluation server does: CIDEr's document frequencies come from the scored set)."""

    def scores(indices: list[int]) -> dict[str, Any]:
        return coco_caption_scores(
            [predictions[i]["caption"] for i in indices],
            [rows[i]["references"] for i in indices],
            spice=args.spice,
            meteor=args.meteor,
        )

    metrics: dict[str, Any] = {"overall": scores(list(range(len(rows))))}
    if dataset == "nocaps":
        for domain in DOMAINS:
            indices = [i for i, row in enumerate(rows) if row["domain"] == domain]
            if indices:
                metrics[domain] = scores(indices)
    return metrics


def percent(metrics: dict[str, Any] | None, name: str) -> float | None:
    """A metric as the paper prints it (x100), None when not computed."""
    return (metrics or {}).get(f"{name}_x100")


def table3(name: str, dataset: str, metrics: dict[str, Any] | None) -> str:
    metrics = metrics or {}
    if dataset == "nocaps":
        ours = []
        for part in (*DOMAINS, "overall"):
            ours += [percent(metrics.get(part), "CIDEr"), percent(metrics.get(part), "SPICE")]
        ours += [None, None]
    else:
        ours = [None] * 8 + [percent(metrics.get("overall"), "Bleu_4"), percent(metrics.get("overall"), "CIDEr")]
    rows = [[f"{model} (paper)", *map(fmt, values)] for model, values in TABLE3_PAPER_ROWS.items()]
    rows.append([f"**{name}**", *map(fmt, ours)])
    title = (
        "Image captioning, as Table 3 of the BLIP-2 paper: NoCaps zero-shot (validation) CIDEr (C) and SPICE (S) "
        "per domain and overall; COCO Karpathy test BLEU@4 and CIDEr."
    )
    return title + "\n\n" + markdown_table(["Models", *TABLE3_COLUMNS], rows)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    accelerator = Accelerator()
    rows, file_format, dataset = load_annotations(args)
    if args.benchmark:
        check_benchmark("caption", args, args.annotations, len(rows), "images")
    rows, bad = drop_bad_images(accelerator, rows, args)  # every image decoded before the model: nothing fails late
    has_references = all(row["references"] for row in rows)
    local_rows = shard(accelerator, rows)
    log = PredictionLog(args.output_dir, "image_id", args, accelerator) if args.output_dir else None

    processor = load_processor(args)
    model, dtype = load_model(Blip2ForConditionalGeneration, args, accelerator)
    main = accelerator.is_main_process
    if main:
        print(f"{dataset} ({file_format} format): {len(rows)} images, {accelerator.num_processes} process(es)")
        print(f"prompt {args.prompt!r}, generation {generation_kwargs(args)}")

    def predict(todo: list[dict]) -> Iterator[list[dict]]:
        return caption(model, processor, todo, args, main)

    predictions = gather(accelerator, predict_resumable(local_rows, "image_id", log, predict, main))
    if not accelerator.is_main_process:
        finish(accelerator)
        return None
    assert [p["image_id"] for p in predictions] == [row["image_id"] for row in rows], "gathered out of order"

    metrics = None
    if has_references:
        metrics = score(predictions, rows, dataset, args)
    else:
        print("Some images have no reference captions: predictions only, nothing scored.")
    results = dict(
        task="caption",
        **dataset_fields(args, args.annotations, dataset),
        metrics=metrics,
        settings=settings(
            args,
            accelerator,
            dtype,
            format=file_format,
            generation=generation_kwargs(args),
            num_images=len(rows),
            num_references=sum(len(row["references"]) for row in rows),
            num_images_per_domain={domain: sum(row["domain"] == domain for row in rows) for domain in DOMAINS}
            if dataset == "nocaps"
            else None,
            num_predictions=len(predictions),
        ),
        skipped_images=skipped_list(bad),
    )
    if args.benchmark:
        table = table3(model_name(args), dataset, metrics)
    else:
        overall = (metrics or {}).get("overall")
        values = [percent(overall, key) for key in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")]
        header = ["B@4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"]
        table = custom_table(model_name(args), os.path.basename(args.annotations), header, values)
    write_outputs(args.output_dir, results, predictions, table)
    if log is not None:
        log.remove()  # predictions.json holds them all now
    finish(accelerator)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
