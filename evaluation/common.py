"""What the three evaluation scripts share: the command-line options every one of them takes, loading the model and
processor, sharding the work between `accelerate` processes and gathering it back, and writing the results.

Results name a paper benchmark (VQAv2, COCO Karpathy, Flickr30K, ...) only when the run was asked for it with
`--benchmark NAME` and `check_benchmark` found that benchmark's official file, whole (its name and its number of
questions or images, no `--limit`). Everything else is recorded as `"dataset": "custom"` with the file's name:
`blip2-hf push` then puts no benchmark name on the model card.

Each process takes one contiguous slice of the examples (`Accelerator.split_between_processes`), so gathering the
slices in process order (`accelerate.utils.gather_object`) gives the examples back in file order. Only the main
process computes metrics and writes files; the other processes stop once their outputs are gathered.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

import blip2_hf
from blip2_hf import Blip2Config, Blip2Processor
from blip2_hf.modeling_blip2 import FROZEN_PRECISIONS, CheckpointMismatchError, frozen_tower_dtype

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
        processor.image_processor = Blip2Processor.default_image_processor(args.image_size)
    return processor


def interpolate_pos_encoding(args: argparse.Namespace, config: Blip2Config) -> bool:
    return args.image_size is not None and args.image_size != config.vision_config.image_size


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
