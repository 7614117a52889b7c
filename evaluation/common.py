"""What the three evaluation scripts share: the command-line options every one of them takes, loading the model and
processor, sharding the work between `accelerate` processes and gathering it back, and writing the results.

Results name a paper benchmark (VQAv2, COCO Karpathy, Flickr30K, ...) only when the run was asked for it with
`--benchmark NAME` and `check_benchmark` found that benchmark's official file, whole (its name and its number of
questions or images, no `--limit`). Everything else is recorded as `"dataset": "custom"` with the file's name:
`blip2-hf push` then puts no benchmark name on the model card.

Each process takes one contiguous slice of the examples (`Accelerator.split_between_processes`), so gathering the
slices in process order (`accelerate.utils.gather_object`) gives the examples back in file order. Only the main
process computes metrics and writes files; the other processes stop once their outputs are gathered.

Nothing is lost to a bad file or a kill:
- every image is decoded once before the model loads (`screen_images`, the data-loader workers in parallel): one
  that does not decode stops the run at once with the list of such files, or with `--skip_bad_images` is left out,
  listed in results.json (`skipped_images`), the metrics being over the rest;
- with `--output_dir`, the generation scripts append each batch's predictions to `predictions.partial.<rank>.jsonl`
  (`PredictionLog`); run the same command again after an interruption and it answers only what is missing, then
  writes results.json as an uninterrupted run does and removes the partial files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

import blip2_hf
from blip2_hf import Blip2Config, Blip2Processor
from blip2_hf.data import load_image
from blip2_hf.modeling_blip2 import FROZEN_PRECISIONS, CheckpointMismatchError, frozen_tower_dtype
from blip2_hf.processing_blip2 import Blip2ImageProcessor
from blip2_hf.training_scripts import processor_output_size

# Tokenizers are used inside DataLoader workers (forked): keep the Rust thread pool out of it (and its warning).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


CUSTOM = "custom"
# task -> benchmark -> official file name -> (split, size: questions for VQA, images otherwise). The names are those
# of the official releases and of LAVIS's annotation files; the sizes those of the splits the paper reports.
BENCHMARK_FILES: dict[str, dict[str, dict[str, tuple[str, int]]]] = {
    "vqa": {
        "vqav2": {
            "v2_OpenEnded_mscoco_val2014_questions.json": ("val", 214354),
            "v2_OpenEnded_mscoco_test-dev2015_questions.json": ("test-dev", 107394),
        },
        "okvqa": {"OpenEnded_mscoco_val2014_questions.json": ("test", 5046), "okvqa_val_eval.json": ("test", 5046)},
        "gqa": {"testdev_balanced_questions.json": ("test-dev", 12578)},
    },
    "caption": {
        "coco": {"coco_karpathy_test.json": ("test", 5000), "coco_karpathy_test_gt.json": ("test", 5000)},
        "nocaps": {"nocaps_val_4500_captions.json": ("validation", 4500), "nocaps_val.json": ("validation", 4500)},
    },
    "retrieval": {
        "coco": {"coco_karpathy_test.json": ("test", 5000), "dataset_coco.json": ("test", 5000)},
        "flickr30k": {"flickr30k_test.json": ("test", 1000), "dataset_flickr30k.json": ("test", 1000)},
    },
}


# Image processor entries that name or place it rather than set how it processes images.
_NOT_SETTINGS = ("image_processor_type", "auto_map", "processor_class", "_processor_class")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Model folder (from_pretrained) or Hub name.")
    parser.add_argument("--processor", default=None, help="Blip2Processor folder (default: --model).")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *FROZEN_PRECISIONS],
        help="Frozen towers' precision (the Q-Former and projections stay fp32). auto: fp32 on CPU; on GPU fp16, "
        "bf16 for encoder-decoder LLMs (Flan-T5), as the paper.",
    )
    parser.add_argument("--image_dir", default=".", help="Root of the relative image paths of the annotations.")
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="Resize images to this square size instead of the processor's (e.g. 364 for the fine-tuned ViT-g "
        "checkpoints); position embeddings are interpolated when it differs from the model's.",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="Examples per forward pass, per process.")
    parser.add_argument("--num_workers", type=int, default=4, help="DataLoader workers (image decoding), per process.")
    parser.add_argument("--limit", type=int, default=None, help="Evaluate the first N examples only.")
    parser.add_argument("--output_dir", default=None, help="Where results.json, predictions.json, results.md go.")
    parser.add_argument("--name", default=None, help="Row label in the results table (default: the model's name).")
    parser.add_argument(
        "--skip_bad_images",
        action="store_true",
        help="Evaluate without the images that do not decode (listed in results.json, the metrics over the rest) "
        "instead of refusing to start. Missing files are always refused (usually a wrong --image_dir).",
    )


def add_generation_args(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """Beam-search options, with the task's defaults."""
    parser.add_argument("--num_beams", type=int, default=defaults["num_beams"])
    parser.add_argument("--max_new_tokens", type=int, default=defaults["max_new_tokens"])
    parser.add_argument("--min_new_tokens", type=int, default=defaults["min_new_tokens"])
    parser.add_argument("--length_penalty", type=float, default=defaults["length_penalty"])
    parser.add_argument("--repetition_penalty", type=float, default=defaults.get("repetition_penalty", 1.0))


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        length_penalty=args.length_penalty,
        repetition_penalty=args.repetition_penalty,
        do_sample=False,
    )


def add_benchmark_arg(parser: argparse.ArgumentParser, task: str) -> None:
    names = list(BENCHMARK_FILES[task])
    parser.add_argument(
        "--benchmark",
        default=None,
        choices=names,
        help="Run this benchmark's protocol on its official file and label the results with its name (the file must "
        "be the whole official split: "
        + "; ".join(f"{name}: {', '.join(files)}" for name, files in BENCHMARK_FILES[task].items())
        + "). Without it the results are labelled custom, with the file's name.",
    )


def check_benchmark(task: str, args: argparse.Namespace, path: str, count: int, unit: str) -> str:
    """The split of `--benchmark` after checking that `path` is its official file, whole: `count` (questions or
    images read from it) must be the benchmark's size. Exits with a message naming the problem otherwise."""
    benchmark, name = args.benchmark, os.path.basename(path)
    files = BENCHMARK_FILES[task][benchmark]
    custom = "Evaluate your own data without --benchmark: its results are then labelled custom."
    if args.limit is not None:
        raise SystemExit(f"--benchmark {benchmark} evaluates the whole benchmark: drop --limit. {custom}")
    if name not in files:
        raise SystemExit(
            f"--benchmark {benchmark}: {path} is not one of its official files ({', '.join(files)}). {custom}"
        )
    split, size = files[name]
    if count != size:
        raise SystemExit(
            f"--benchmark {benchmark}: {name} has {count} {unit}, the official {benchmark} {split} has {size}: not the "
            f"official file, or not all of it. {custom}"
        )
    return split


def dataset_fields(args: argparse.Namespace, path: str, protocol: str) -> dict[str, Any]:
    """results.json's data label: `dataset` is the benchmark only when `--benchmark` was checked, else `custom`;
    `dataset_file` the evaluated file's name; `protocol` how it was scored (the metric's dataset mode)."""
    return dict(
        dataset=args.benchmark or CUSTOM,
        benchmark=args.benchmark,
        dataset_file=os.path.basename(path),
        protocol=protocol,
    )


def custom_table(name: str, file: str, header: Sequence[str], values: Sequence[float | None]) -> str:
    """Our row alone, for custom data: the paper's rows measure other data and are left out."""
    title = f"Results on custom data ({file}): not a benchmark, not comparable with the BLIP-2 paper's tables."
    return title + "\n\n" + markdown_table(["Models", *header], [[f"**{name}**", *map(fmt, values)]])


def check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise SystemExit("--batch_size must be at least 1.")
    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be at least 1.")


def load_processor(args: argparse.Namespace) -> Blip2Processor:
    processor = Blip2Processor.from_pretrained(args.processor or args.model)
    if args.image_size is not None:
        processor.image_processor = resized_image_processor(processor.image_processor, args.image_size)
    return processor


def resized_image_processor(image_processor: Any, image_size: int) -> Any:
    """`image_processor` writing `image_size` px squares: BLIP-2's own (LAVIS `blip_image_eval`) at that size, or
    another encoder's image processor (CLIP, SigLIP, DINOv2, ConvNeXt, ...) with its resampling and normalization
    kept and only its size settings changed (`size` height/width or shortest edge, and `crop_size`)."""
    if isinstance(image_processor, Blip2ImageProcessor):
        return Blip2Processor.default_image_processor(image_size)
    settings = {key: value for key, value in image_processor.to_dict().items() if key not in _NOT_SETTINGS}
    size = settings.get("size") or {}
    settings["size"] = (
        {"shortest_edge": image_size} if size.get("shortest_edge") else {"height": image_size, "width": image_size}
    )
    if settings.get("crop_size"):
        settings["crop_size"] = {"height": image_size, "width": image_size}
    resized = type(image_processor)(**settings)
    written = processor_output_size(resized)
    if written != (image_size, image_size):
        raise SystemExit(
            f"--image_size {image_size}: {type(image_processor).__name__} (size={size}) set to it writes images of "
            f"{written or 'a size that depends on the input'}, not {image_size}x{image_size}; save an image processor "
            "of that size and pass it with --processor instead."
        )
    return resized


def interpolate_pos_encoding(args: argparse.Namespace, config: Blip2Config) -> bool:
    """Whether the encoder must interpolate its position embeddings: `--image_size` differs from the size it expects
    (an encoder that takes any size, ConvNeXt, never must)."""
    expected = config.vision_image_size
    return args.image_size is not None and expected is not None and (args.image_size,) * 2 != tuple(expected)


def load_model(model_class: type, args: argparse.Namespace, accelerator: Accelerator) -> tuple[torch.nn.Module, str]:
    """`model_class.from_pretrained(--model)` in the `--dtype` precision, in eval mode on this process's device. A
    checkpoint that does not fit the class (tensors missing, unexpected or of another shape: the strict
    `from_pretrained`) or whose weights do not read stops the run with one line naming them, before any work."""
    config = Blip2Config.from_pretrained(args.model)
    dtype = frozen_tower_dtype(args.dtype, config, accelerator.device)  # the frozen towers' dtype, as training's
    try:
        model = model_class.from_pretrained(args.model, dtype=dtype)
    except (CheckpointMismatchError, OSError) as error:
        raise SystemExit(f"Cannot load the model to evaluate: {error}") from error
    return model.to(accelerator.device).eval(), str(dtype).removeprefix("torch.")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def image_path(image_dir: str, name: str) -> str:
    return name if os.path.isabs(name) else os.path.join(image_dir, name)


def check_images_exist(paths: Sequence[str]) -> None:
    """Fail before any model work when images are missing, naming a few."""
    missing = [path for path in dict.fromkeys(paths) if not os.path.isfile(path)]
    if missing:
        shown = "\n  ".join(missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} image(s) not found (check --image_dir / --image_template), e.g.:\n  {shown}"
        )


def _decode_errors(paths: list[str]) -> list[tuple[str, str]]:
    """(path, error) of each of `paths` that `load_image` cannot decode (a DataLoader collate: runs in workers)."""
    errors = []
    for path in paths:
        try:
            load_image(path)
        except Exception as error:  # whatever the decoder raises (PIL raises many kinds), the image is bad
            errors.append((path, f"{type(error).__name__}: {error}"))
    return errors


def screen_images(accelerator: Accelerator, paths: Sequence[str], args: argparse.Namespace) -> dict[str, str]:
    """Decode every distinct image of `paths` (all processes' together, each process a slice) before any model work,
    as the evaluation will (`blip2_hf.data.load_image`): one that does not decode would otherwise stop the run late.

    Returns `{path: error}` of the bad images, the same on every process, when `--skip_bad_images` allows them (and
    says so); otherwise exits with their list. A benchmark is never scored without some of its images."""
    unique = list(dict.fromkeys(paths))
    local = shard(accelerator, unique)
    batches = DataLoader(local, batch_size=16, num_workers=args.num_workers, collate_fn=_decode_errors)
    local_bad = [error for batch in batches for error in batch]
    bad = dict(error for part in gather(accelerator, [local_bad]) for error in part)
    if not bad:
        return bad
    shown = "\n  ".join(f"{path} ({error})" for path, error in list(bad.items())[:20])
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    listing = f"{len(bad)} of {len(unique)} image(s) do not decode:\n  {shown}{more}"
    if not args.skip_bad_images:
        raise SystemExit(
            f"{listing}\nNothing was evaluated. Replace or remove them, or pass --skip_bad_images to evaluate the "
            "rest (they are then listed in results.json)."
        )
    if len(bad) == len(unique):
        raise SystemExit(f"{listing}\nNone is left to evaluate.")
    if getattr(args, "benchmark", None):
        raise SystemExit(
            f"{listing}\n--benchmark {args.benchmark} is scored on all of its images: drop --benchmark to evaluate the "
            "rest as custom data."
        )
    if accelerator.is_main_process:
        print(f"--skip_bad_images: leaving out {listing}")
    return bad


def drop_bad_images(accelerator: Accelerator, rows: list[dict], args: argparse.Namespace) -> tuple[list, dict]:
    """`rows` (dicts with an `image` path) without those whose image is missing (an error) or does not decode (an
    error, or left out with `--skip_bad_images`: `screen_images`), and `{path: error}` of the left-out images."""
    check_images_exist([row["image"] for row in rows])
    bad = screen_images(accelerator, [row["image"] for row in rows], args)
    return [row for row in rows if row["image"] not in bad], bad


def skipped_list(bad: dict[str, str]) -> list[dict[str, str]]:
    """results.json's `skipped_images`: each image left out by `--skip_bad_images`, with its decoding error."""
    return [dict(image=path, error=error) for path, error in bad.items()]


# Options that do not change a prediction: a partial file written under other values of these still resumes.
_RESUME_FREE = {"output_dir", "batch_size", "num_workers", "name", "limit", "skip_bad_images", "benchmark"}
_RESUME_FREE |= {"meteor", "spice", "metric_mode", "dataset", "split"}
PARTIAL_PREFIX = "predictions.partial."


class PredictionLog:
    """Predictions written as they come, so that an interrupted evaluation resumes.

    Each process appends each batch's predictions, one JSON line each, to `output_dir/predictions.partial.<rank>.jsonl`
    (flushed and synced: a kill loses at most the batch being answered), after a first line holding the run's
    settings. A new run in the same `output_dir` reads every such file (any number of processes wrote them: rows are
    matched by `key`, e.g. `question_id`), refuses files written with settings that change predictions (another
    model, prompt, generation...), drops a last line cut by a kill, and answers only the rows left."""

    def __init__(self, output_dir: str, key: str, args: argparse.Namespace, accelerator: Accelerator):
        self.output_dir, self.key = output_dir, key
        self.settings = json.loads(
            json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in _RESUME_FREE}, default=str)
        )
        self.path = os.path.join(output_dir, f"{PARTIAL_PREFIX}{accelerator.process_index}.jsonl")
        os.makedirs(output_dir, exist_ok=True)
        self.done: dict[Any, dict] = {}
        for name in sorted(os.listdir(output_dir)):
            if name.startswith(PARTIAL_PREFIX) and name.endswith(".jsonl"):
                self.done.update(self._read(os.path.join(output_dir, name)))
        accelerator.wait_for_everyone()  # every process has read every file before any appends to its own
        self._start_own_file()

    def _read(self, path: str) -> dict[Any, dict]:
        with open(path, encoding="utf-8") as file:
            lines = file.read().split("\n")
        if not lines[0].strip():
            return {}
        if lines[-1] == "":
            lines.pop()
        elif len(lines) > 1:
            lines.pop()  # a line cut short by a kill: its batch is answered again
        try:
            header = json.loads(lines[0])["settings"]
        except (ValueError, KeyError, TypeError):
            return {}  # a header cut short by a kill: nothing was predicted yet
        if header != self.settings:
            changed = sorted(k for k in {*header, *self.settings} if header.get(k) != self.settings.get(k))
            details = ", ".join(f"--{k} {header.get(k)!r} there, {self.settings.get(k)!r} now" for k in changed)
            raise SystemExit(
                f"{path} holds predictions of a run with other settings ({details}): remove it (and the other "
                f"{PARTIAL_PREFIX}*.jsonl files) or choose another --output_dir."
            )
        predictions = {}
        for number, line in enumerate(lines[1:], start=2):
            try:
                prediction = json.loads(line)
            except ValueError as error:
                raise SystemExit(f"{path}, line {number}: not JSON ({error}); remove it to start afresh.") from None
            if not isinstance(prediction, dict) or self.key not in prediction:
                raise SystemExit(
                    f"{path}, line {number}: not a prediction with a {self.key!r}; remove it to start afresh."
                )
            predictions[prediction[self.key]] = prediction
        return predictions

    def _start_own_file(self) -> None:
        """Keep this process's file up to its last complete line (a kill may have cut one), or start it."""
        if os.path.isfile(self.path):
            with open(self.path, "rb") as file:
                data = file.read()
            if data.count(b"\n") >= 1:
                with open(self.path, "wb") as file:
                    file.write(data[: data.rindex(b"\n") + 1])
                return
        with open(self.path, "w", encoding="utf-8") as file:
            file.write(json.dumps({"settings": self.settings}, ensure_ascii=False) + "\n")

    def append(self, predictions: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            file.write("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
            file.flush()
            os.fsync(file.fileno())

    def remove(self) -> None:
        """Once the final files are written: every process's partial file."""
        for name in os.listdir(self.output_dir):
            if name.startswith(PARTIAL_PREFIX) and name.endswith(".jsonl"):
                os.remove(os.path.join(self.output_dir, name))


def predict_resumable(
    rows: Sequence[dict],
    key: str,
    log: PredictionLog | None,
    predict: Callable[[list[dict]], Iterator[list[dict]]],
    main: bool,
) -> list[dict]:
    """The prediction of each of `rows` (in order): the ones `log` already holds, and `predict(rows left)` (one list
    of predictions per batch, each appended to `log` as it comes) for the others."""
    done = {} if log is None else {row[key]: log.done[row[key]] for row in rows if row[key] in log.done}
    todo = [row for row in rows if row[key] not in done]
    if done and main:
        print(
            f"Resuming: {len(done)} predictions read from {log.output_dir}/{PARTIAL_PREFIX}*.jsonl, {len(todo)} left."
        )
    new = {}
    for predictions in predict(todo):
        if log is not None:
            log.append(predictions)
        new.update((prediction[key], prediction) for prediction in predictions)
    return [done[row[key]] if row[key] in done else new[row[key]] for row in rows]


def loader(rows: Sequence[Any], collate: Callable, args: argparse.Namespace) -> DataLoader:
    """Batches of this process's `rows`, in order; `collate` loads the images and runs the processor."""
    return DataLoader(
        list(rows), batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers, collate_fn=collate
    )


def shard(accelerator: Accelerator, rows: Sequence[Any]) -> list[Any]:
    """This process's contiguous slice of `rows` (all of them with one process)."""
    with accelerator.split_between_processes(list(rows)) as local:
        return list(local)


def gather(accelerator: Accelerator, local: list[Any]) -> list[Any]:
    """Every process's list, concatenated in process order (on every process)."""
    return list(gather_object(local)) if accelerator.num_processes > 1 else local


def finish(accelerator: Accelerator) -> None:
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def model_name(args: argparse.Namespace) -> str:
    return args.name or Path(str(args.model).rstrip("/")).name


def settings(args: argparse.Namespace, accelerator: Accelerator, dtype: str, **extra: Any) -> dict[str, Any]:
    """The run's settings for results.json: every option, plus where and how it ran."""
    import transformers

    return dict(
        vars(args),
        **extra,
        dtype_used=dtype,
        num_processes=accelerator.num_processes,
        device=str(accelerator.device),
        versions=dict(
            blip2_hf=blip2_hf.__version__,
            transformers=transformers.__version__,
            torch=torch.__version__,
            python=platform.python_version(),
        ),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(
    output_dir: str | None, results: dict[str, Any], predictions: Any, markdown: str, **extra_json: Any
) -> None:
    """Print the table; with `output_dir`, write results.json, predictions.json and results.md there (plus
    `extra_json`: name -> JSON-able object)."""
    print(markdown)
    if output_dir is None:
        return
    os.makedirs(output_dir, exist_ok=True)
    files = {"results.json": results, "predictions.json": predictions, **extra_json}
    for name, obj in files.items():
        with open(os.path.join(output_dir, name), "w", encoding="utf-8") as file:
            json.dump(obj, file, indent=1 if name == "results.json" else None, ensure_ascii=False)
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as file:
        file.write(markdown + "\n")
    print(f"Wrote {', '.join([*files, 'results.md'])} to {output_dir}")
