"""What the training scripts (`training/stage1.py`, `training/stage2.py`) share: their arguments, read from a YAML/JSON
config file with command-line overrides (`parse_args_with_config`), their training data, from caption sources or a
frozen-feature cache (`training_dataset`), the check that the processor writes the images the encoder expects
(`check_processor_matches_model`), and how a diverged run ends (`train_or_exit`). Library code does not import this
module."""

from __future__ import annotations

import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

import torch
from transformers import HfArgumentParser

from .data import RandomResizedCropFlip, load_training_data, share_naming_sides
from .feature_cache import check_cache_matches, load_feature_cache
from .trainer import Blip2Trainer, TrainingDivergedError

logger = logging.getLogger(__name__)

# How many captions `training_dataset` reads to decide whether flips would contradict them, and the share of
# side-naming captions from which it warns.
SIDE_CHECK_ROWS, SIDE_WARNING_SHARE = 2000, 0.05
# Two blank images (width, height) of different shapes that `processor_output_size` feeds the image processor: one
# output shape for both means a fixed output size.
PROBE_IMAGE_SIZES = ((97, 61), (53, 131))
# Image processor settings that decide its output size, quoted in errors (they are spelt differently per family).
SIZE_SETTINGS = ("size", "crop_size", "do_resize", "do_center_crop", "crop_pct")


def processor_output_size(image_processor: Any) -> tuple[int, int] | None:
    """`(height, width)` of the `pixel_values` the image processor writes, or None when it depends on the input image
    (no resize, or a shortest-edge resize without a crop). Read from the processor's output on two blank images of
    different shapes (`PROBE_IMAGE_SIZES`): image processors spell their size differently (`size` height/width,
    `shortest_edge` then `crop_size`, ConvNeXt's `crop_pct`), their output is what the encoder gets."""
    from PIL import Image

    shapes = set()
    for width, height in PROBE_IMAGE_SIZES:
        pixels = image_processor(Image.new("RGB", (width, height)), return_tensors="np")["pixel_values"]
        shapes.add(tuple(int(d) for d in pixels.shape[-2:]))
    return shapes.pop() if len(shapes) == 1 else None


def _size_settings(image_processor: Any) -> str:
    """The image processor's class and its size settings, e.g. `SiglipImageProcessorPil(size={'height': 224, ...})`."""
    settings = image_processor.to_dict()
    shown = [f"{name}={settings[name]}" for name in SIZE_SETTINGS if settings.get(name) is not None]
    return f"{type(image_processor).__name__}({', '.join(shown)})"


def check_processor_matches_model(processor: Any, config: Any, where: str) -> None:
    """Raise `ValueError` unless `processor` (a `Blip2Processor`) writes images of the size the image encoder of
    `config` (a `Blip2Config`) expects, `config.vision_image_size` (None: the encoder takes any size, as ConvNeXt).
    `where` names the processor's source in the message, which quotes its size settings and `vision_config.image_size`."""
    expected = config.vision_image_size
    if expected is None:
        return
    expected = tuple(int(d) for d in expected)
    actual = processor_output_size(processor.image_processor)
    if actual == expected:
        return
    written = "images whose size depends on the input" if actual is None else f"{actual[0]}x{actual[1]} images"
    raise ValueError(
        f"{where}: the image processor {_size_settings(processor.image_processor)} writes {written}, but the "
        f"{config.vision_config.model_type} image encoder expects {expected[0]}x{expected[1]} "
        f"(vision_config.image_size={config.vision_config.image_size}). Use the encoder's own image processor (saved "
        "beside its weights) or set the processor's size to the encoder's image size."
    )


def training_dataset(
    model: torch.nn.Module,
    sources: Sequence[str],
    weights: Sequence[float] | None = None,
    image_root: str | None = None,
    feature_cache: str | None = None,
    augment: bool = True,
    seed: int = 42,
    processor: Any | None = None,
) -> tuple[Any, RandomResizedCropFlip | None]:
    """The training scripts' data: `(dataset, image_transform)`. From a frozen-feature cache (checked against the
    model's vision encoder; no augmentation: the cache holds one view of each image) or from `sources` (mixed by
    `weights`) with LAVIS's random resized crop and flip at the size the `processor`'s image processor writes (without
    a processor: the size the encoder expects), so that its resize leaves the crop as it is."""
    if feature_cache is not None:
        check_cache_matches(model, feature_cache)
        return load_feature_cache(feature_cache), None
    dataset = load_training_data(list(sources), list(weights) if weights else None, image_root=image_root, seed=seed)
    transform = RandomResizedCropFlip(_augmentation_size(model, processor)) if augment else None
    from datasets import Dataset

    if transform is not None and isinstance(dataset, Dataset):  # a streamed source is not read ahead
        share = share_naming_sides(dataset["caption"][:SIDE_CHECK_ROWS])
        if share >= SIDE_WARNING_SHARE:
            logger.warning(
                "%.0f%% of the first captions name a side (left / right): the training augmentation flips half of "
                "the images horizontally, which makes those captions false. Pass --augment false to keep the "
                "images as they are.", 100 * share,
            )  # fmt: skip
    return dataset, transform


def _augmentation_size(model: torch.nn.Module, processor: Any | None) -> tuple[int, int]:
    """`(height, width)` of the augmentation's crops: the processor's output size, else the encoder's image size."""
    size = processor_output_size(processor.image_processor) if processor is not None else None
    size = size or model.config.vision_image_size
    if size is None:
        raise ValueError(
            "The random resized crop needs a fixed output size: the image processor's output size depends on the "
            "input image and the image encoder takes any size. Give the image processor a fixed size (e.g. "
            "do_center_crop with crop_size) or pass --augment false."
        )
    return tuple(int(d) for d in size)


def train_or_exit(trainer: Blip2Trainer, resume_from_checkpoint: str | bool | None, script: str) -> None:
    """`trainer.train(resume_from_checkpoint=...)`, and a run that diverged (`TrainingDivergedError`, raised on every
    process at the same step) ends with its one-line message on stderr and exit status 1, after the processes close
    their group together, before the script would save anything."""
    try:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    except TrainingDivergedError as error:
        if trainer.is_world_process_zero():
            print(f"{script}: error: {error}", file=sys.stderr, flush=True)
        trainer.end_training()
        raise SystemExit(1) from None


def parse_args_with_config(parser: HfArgumentParser, argv: Sequence[str] | None = None) -> tuple:
    """The training scripts' arguments: `--config FILE` (YAML or JSON: a flat mapping of argument names to values)
    then `--name value` overrides from the command line (values read as YAML, so `--max_steps 10` is an int and
    `--train_data a.json b.json` a list; one value for a list field, `--train_data a.json`, is a one-item list).
    Unknown names are errors (`HfArgumentParser.parse_dict`)."""
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    values: dict = {}
    if "--config" in argv:
        index = argv.index("--config")
        path = argv[index + 1]
        del argv[index : index + 2]
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    key, items = None, []
    for token in argv + ["--"]:
        if token.startswith("--"):
            if key is not None:
                values[key] = True if not items else items[0] if len(items) == 1 else items
            key, items = (token[2:].split("=", 1)[0], []) if token != "--" else (None, [])
            if key and "=" in token:
                items.append(yaml.safe_load(token.split("=", 1)[1]))
        elif key is None:
            raise ValueError(f"Unexpected argument {token!r}: use --config FILE and --name value pairs.")
        else:
            items.append(yaml.safe_load(token))
    for dataclass_type in parser.dataclass_types:
        hints = typing.get_type_hints(dataclass_type)
        for field_ in dataclasses.fields(dataclass_type):
            if field_.name in values:
                values[field_.name] = _typed(values[field_.name], hints.get(field_.name))
    return parser.parse_dict(values)


def _list_item_type(hint: Any) -> Any | None:
    """The item type of a `list[X]` or `list[X] | None` hint; None for any other hint (`list[str] | str`, as some
    `TrainingArguments` fields are, takes a bare string as it is)."""
    candidates = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    candidates = [candidate for candidate in candidates if candidate is not type(None)]
    if len(candidates) == 1 and typing.get_origin(candidates[0]) is list:
        return (typing.get_args(candidates[0]) or (Any,))[0]
    return None


def _typed(value: Any, hint: Any) -> Any:
    """`value` (from YAML or the command line) fitted to a field's type `hint`: one value given to a list field is a
    one-item list (`--train_data a.json` once; a bare string would otherwise be read as a list of characters), and
    YAML's strings for floats (it reads 1e-4 as a string, wanting 1.0e-4) become floats."""
    item_type = _list_item_type(hint)
    if item_type is not None:
        if value is None:
            return None
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [float(item) if item_type is float and isinstance(item, str) else item for item in items]
    if isinstance(value, str) and hint in (float, float | None):
        return float(value)
    if value is False and hint is not None and not _accepts_bool(hint):
        # YAML 1.1 reads a bare `no` (and `off`) as False: `save_strategy: no` means the strategy "no"
        return "no"
    return value


def _accepts_bool(hint: Any) -> bool:
    candidates = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return any(candidate in (bool, Any) for candidate in candidates)
