"""Training data for BLIP-2: image-caption sources, LAVIS caption cleaning, augmentation and the stage-1/2 collators.

The pipeline keeps images undecoded until the very end:

1. A *source* (`load_caption_json`, `load_image_folder`, `load_webdataset`, or `load_training_data` to infer and mix
   several) is a `datasets.Dataset` / `IterableDataset` with exactly two columns, `image` (a path `str`, raw `bytes`
   for tar shards, or a `{"path", "bytes"}` dict when sources of both kinds are mixed) and `caption` (`str`).
2. A *collator* (`Stage1Collator`, `Stage2Collator`) decodes the images of one batch with `load_image`, applies the
   training augmentation (`RandomResizedCropFlip`) and the processor, and tokenizes the LAVIS-cleaned captions
   (`pre_caption`). Rows whose image cannot be read are skipped and reported to a `BadImageTracker`, so one broken
   file among millions costs a sample, not the run, while a wrong `image_root` (every file missing) stops at once.

With `transformers.Trainer`, pass a collator as `data_collator` and set `remove_unused_columns=False` (the `image` and
`caption` columns are not model arguments; the Trainer would drop them before the collator sees them).

Randomness (crop, flip, the T5 prefix split) comes from Python's `random` module: the Trainer saves and restores its
state in checkpoints, and `torch.utils.data.DataLoader` seeds it in every worker, so a resumed run draws the same
augmentations. With `num_workers > 0` each worker holds its own copy of a collator and of its tracker; a collator
whose `report_counts` is set (the Trainers set it) adds each batch's counts under `BAD_IMAGE_COUNTS_KEY`, which is how
the run's totals reach the main process.

`datasets` is imported inside the functions that need it, so importing this module stays cheap.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .processing_blip2 import Blip2Processor, load_image  # load_image: the one image loader, re-exported here

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

logger = logging.getLogger("blip2_hf.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Image fields read from WebDataset samples, in order of preference."""
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
"""Files that make a folder an `imagefolder` source (the `datasets` convention)."""
BAD_IMAGE_COUNTS_KEY = "bad_image_counts"
"""The batch entry of a collator with `report_counts=True`: int64 `[B, 2]`, row 0 = (samples seen, samples whose image
could not be read) in that batch, other rows 0. One row per sample, so that `accelerate`'s batch dispatching (which
concatenates and slices along dim 0) keeps every count once; `Blip2Trainer` removes it before the model sees it."""

# ---------------------------------------------------------------------------------------------------------------------
# Caption cleaning
# ---------------------------------------------------------------------------------------------------------------------

# LAVIS `BlipCaptionProcessor.pre_caption`: these characters become spaces; runs of 2+ whitespace become one space.
_CAPTION_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_CAPTION_WHITESPACE_RUN = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """Clean a caption exactly as LAVIS `BlipCaptionProcessor.pre_caption` does.

    Lowercase; replace each of `. ! " ( ) * # : ; ~` by a space; replace every run of two or more whitespace
    characters by one space (a single tab or newline is kept, as in LAVIS); strip trailing newlines, then spaces at
    both ends; keep the first `max_words` space-separated words. Commas, apostrophes, `?`, `-` and `/` are kept.

    >>> pre_caption("A man (left) riding a horse!!")
    'a man left riding a horse'
    """
    caption = _CAPTION_PUNCTUATION.sub(" ", caption.lower())
    caption = _CAPTION_WHITESPACE_RUN.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


# ---------------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------------


def _string_features() -> Any:
    from datasets import Features, Value

    return Features({"image": Value("string"), "caption": Value("string")})


def _binary_features() -> Any:
    from datasets import Features, Value

    return Features({"image": Value("binary"), "caption": Value("string")})


def _explode_captions(
    images: Sequence[Any], captions: Sequence[Any], where: str, names: Sequence[str] | None = None
) -> tuple[list[Any], list[str]]:
    """One row per caption: a list of captions repeats its image. `where` names the source in errors, `names` its
    entries (default: their index). Captions that `pre_caption` cleans to nothing ("", "...", "!!") are skipped with
    one warning naming `where` and the entries: trained on, they would teach the model to stop at once."""
    out_images: list[Any] = []
    out_captions: list[str] = []
    empty: list[str] = []
    for index, (image, caption) in enumerate(zip(images, captions)):
        name = names[index] if names is not None else f"entry {index}"
        if isinstance(caption, str):
            caption = [caption]
            numbered = [name]
        elif isinstance(caption, (list, tuple)) and all(isinstance(c, str) for c in caption):
            numbered = [f"{name}[{position}]" for position in range(len(caption))]
        else:
            raise ValueError(
                f"{where}: {name} has caption {caption!r} ({type(caption).__name__}); "
                "expected a string or a list of strings."
            )
        for text, name in zip(caption, numbered):
            if pre_caption(text):
                out_images.append(image)
                out_captions.append(text)
            else:
                empty.append(name)
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        logger.warning("%s: skipped %d caption(s) that are empty after cleaning: %s.", where, len(empty), shown)
    return out_images, out_captions


def load_caption_json(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Dataset:
    """Load a LAVIS / BLIP caption annotation file.

    The file is a JSON list `[{"image": "val2014/x.jpg", "caption": "a man ..." | ["c1", ..., "c5"], ...}, ...]` (the
    format of `coco_karpathy_{train,val,test}.json`, `vg_caption.json`, ...); other keys are ignored. A list of
    captions becomes one row per caption. Relative image paths are joined to `image_root` (default: the folder of
    the JSON file); absolute paths are kept. Image files are not opened here: a missing or broken file is a bad
    sample for the collator, not an error of the whole source. Captions that are empty after `pre_caption` are
    skipped with a warning naming the entries (an error when nothing is left).

    The file is read with `json` rather than `load_dataset("json")`: LAVIS files mix `str` and `list` captions and
    `str` / `int` ids across entries, which Arrow type inference rejects, and every row needs its path joined anyway.

    Returns:
        `datasets.Dataset` with columns `image` (`str`, a path) and `caption` (`str`).

    Raises:
        FileNotFoundError: no such file. ValueError: not JSON (names the file, line and column), not a list of
            entries, an entry without `image` / `caption`, or no caption left.
    """
    from datasets import Dataset

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Caption JSON {path!r} does not exist.")
    with open(path, encoding="utf-8") as file:
        try:
            entries = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"Caption JSON {path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})."
            ) from None
        except UnicodeDecodeError as error:
            raise ValueError(f"Caption JSON {path}: not UTF-8 text ({error.reason} at byte {error.start}).") from None
    if not isinstance(entries, list):
        raise ValueError(
            f"Caption JSON {path!r} holds a {type(entries).__name__}; expected a list of "
            '{"image": path, "caption": str | list[str]} entries (LAVIS format).'
        )
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    images, captions = [], []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or "image" not in entry or "caption" not in entry:
            raise ValueError(
                f"Caption JSON {path!r}: entry {index} needs the keys 'image' and 'caption'; got {entry!r}."
            )
        if not isinstance(entry["image"], str):
            raise ValueError(f"Caption JSON {path!r}: entry {index} has a non-string image {entry['image']!r}.")
        images.append(os.path.join(root, entry["image"]))  # an absolute entry["image"] wins over `root`
        captions.append(entry["caption"])
    names = [f"entry {index}" for index in range(len(images))]
    images, captions = _explode_captions(images, captions, f"Caption JSON {path!r}", names)
    if not captions:
        raise ValueError(f"Caption JSON {path!r} has no caption left to train on (none, or all empty after cleaning).")
    return Dataset.from_dict({"image": images, "caption": captions}, features=_string_features())


def _folder_image_path(value: Any) -> str:
    # `Image(decode=False)` cells of an imagefolder are {"bytes": None, "path": absolute path}.
    path = value.get("path") if isinstance(value, Mapping) else value
    if not isinstance(path, str):
        raise ValueError(f"imagefolder gave an image without a path: {value!r}")
    return path


def load_image_folder(
    data_dir: str | os.PathLike,
    split: str = "train",
    streaming: bool = False,
    cache_dir: str | None = None,
) -> Dataset | IterableDataset:
    """Load an image folder with a `metadata.jsonl` (or `metadata.csv`) through `datasets`' `imagefolder` builder.

    Each metadata row names an image with `file_name` (relative to the metadata file) and carries its caption in a
    `caption` column (or, failing that, `text`); a list of captions becomes one row per caption, other columns are
    dropped. The images stay where they are (the Arrow cache stores paths only) and are not decoded.

    Args:
        data_dir: the folder. With `train/`, `test/`, ... subfolders `datasets` makes splits; `split` picks one.
        streaming: return an `IterableDataset` (no Arrow cache is written).
        cache_dir: `datasets` cache folder (default: `HF_DATASETS_CACHE`).

    Returns:
        `Dataset` (or `IterableDataset`) with columns `image` (`str`, an absolute path) and `caption` (`str`).
    """
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"Image folder {data_dir!r} does not exist.")
    if not any(os.path.isfile(os.path.join(data_dir, name)) for name in METADATA_FILES):
        raise FileNotFoundError(f"Image folder {data_dir!r} has no {' or '.join(METADATA_FILES)} with the captions.")
    dataset = load_dataset(
        "imagefolder", data_dir=data_dir, drop_labels=True, split=split, streaming=streaming, cache_dir=cache_dir
    )
    columns = list(dataset.features)
    caption_column = next((name for name in ("caption", "text") if name in columns), None)
    if caption_column is None:
        raise ValueError(
            f"Image folder {data_dir!r}: the metadata has no 'caption' or 'text' column (columns: {columns})."
        )
    dataset = dataset.cast_column("image", ImageFeature(decode=False))

    def to_rows(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        paths = [_folder_image_path(value) for value in batch["image"]]
        names = [os.path.relpath(path, data_dir) for path in paths]  # the metadata's file_name
        images, captions = _explode_captions(paths, batch[caption_column], f"Image folder {data_dir!r}", names)
        return {"image": images, "caption": captions}

    return dataset.map(to_rows, batched=True, remove_columns=columns, features=_string_features())


def _webdataset_features() -> Any:
    # Declared rather than inferred: `datasets` infers a shard set's fields from the first 5 samples of the first
    # shard and rejects shards whose samples differ (a `png` among `jpg`s, `json` captions among `txt` ones). With the
    # features given, missing fields read as None and undeclared ones (`cls`, other `json` keys) are dropped.
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    return Features(
        {
            "__key__": Value("string"),
            "__url__": Value("string"),
            **{extension: ImageFeature(decode=False) for extension in IMAGE_EXTENSIONS},
            "txt": Value("string"),
            "json": {"caption": Value("string")},
        }
    )


def _expand_paths(paths_or_glob: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand glob patterns; every pattern must match and every plain path must exist. Sorted within a pattern."""
    patterns = [paths_or_glob] if isinstance(paths_or_glob, (str, os.PathLike)) else list(paths_or_glob)
    files: list[str] = []
    for pattern in map(os.fspath, patterns):
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise FileNotFoundError(f"No file matches {pattern!r}.")
            files.extend(matches)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise FileNotFoundError(f"Tar shard {pattern!r} does not exist.")
    if not files:
        raise ValueError("No tar shards given.")
    return files


def load_webdataset(
    paths_or_glob: str | os.PathLike | Sequence[str | os.PathLike],
    streaming: bool = True,
    cache_dir: str | None = None,
) -> Dataset | IterableDataset:
    """Load WebDataset tar shards through `datasets`' `webdataset` builder (the `webdataset` package is not needed).

    A sample is the group of files sharing a key (`000123.jpg`, `000123.txt`, `000123.json`): its image is the first
    of the `jpg` / `jpeg` / `png` / `webp` fields present, its caption the `txt` field or else the `caption` key of the
    `json` field. A sample without an image or a caption keeps `None` there and is counted as a bad sample by the
    collator; one whose caption is empty after cleaning is skipped with a warning naming its shard and key. Images
    stay undecoded bytes.

    Args:
        paths_or_glob: a shard path, a glob (`"shards/train-*.tar"`) or a list of them.
        streaming: `True` (default) reads the tars lazily as an `IterableDataset` with one shard per tar (so
            DataLoader workers split by shard); `False` copies everything, image bytes included, into an Arrow cache.
        cache_dir: `datasets` cache folder for `streaming=False`.

    Returns:
        `IterableDataset` (or `Dataset`) with columns `image` (`bytes`) and `caption` (`str`).
    """
    from datasets import load_dataset

    files = _expand_paths(paths_or_glob)
    features = _webdataset_features()
    dataset = load_dataset(
        "webdataset",
        data_files={"train": files},
        split="train",
        streaming=streaming,
        features=features,
        cache_dir=cache_dir,
    )

    def to_rows(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        images, captions, empty = [], [], []
        for index in range(len(batch["__key__"])):
            cell = next((batch[ext][index] for ext in IMAGE_EXTENSIONS if batch[ext][index] is not None), None)
            caption = batch["txt"][index]
            if caption is None and batch["json"][index] is not None:
                caption = batch["json"][index]["caption"]
            if isinstance(caption, str) and not pre_caption(caption):  # see `_explode_captions`
                empty.append(f"{batch['__url__'][index]}:{batch['__key__'][index]}")
                continue
            images.append(cell["bytes"] if cell is not None else None)
            captions.append(caption)
        if empty:
            logger.warning(
                "Skipped %d sample(s) whose caption is empty after cleaning: %s.", len(empty), ", ".join(empty)
            )
        return {"image": images, "caption": captions}

    return dataset.map(to_rows, batched=True, remove_columns=list(features), features=_binary_features())


def _source_kind(source: str) -> tuple[str, Any]:
    """Infer a source's type: `("json", path)`, `("folder", path)` or `("webdataset", [tar files])`."""
    if glob.has_magic(source):
        matches = sorted(glob.glob(source))
        if not matches:
            raise FileNotFoundError(f"Training data source {source!r}: no file matches this pattern.")
        if all(match.endswith(".tar") and os.path.isfile(match) for match in matches):
            return "webdataset", matches
        raise ValueError(
            f"Training data source {source!r}: a pattern must match only .tar shards; it matched {matches[:5]}."
        )
    if not os.path.exists(source):
        raise FileNotFoundError(f"Training data source {source!r} does not exist.")
    if os.path.isdir(source):
        if any(os.path.isfile(os.path.join(source, name)) for name in METADATA_FILES):
            return "folder", source
        tars = sorted(glob.glob(os.path.join(glob.escape(source), "*.tar")))
        if tars:
            return "webdataset", tars
    elif source.endswith(".json"):
        return "json", source
    elif source.endswith(".tar"):
        return "webdataset", [source]
    raise ValueError(
        f"Cannot tell what kind of training data {source!r} is. Accepted: a LAVIS caption .json file, a folder with "
        f"{' or '.join(METADATA_FILES)} (imagefolder), a .tar shard, a glob of .tar shards or a folder of them."
    )


def load_training_data(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    weights: Sequence[float] | None = None,
    image_root: str | None = None,
    seed: int = 42,
    streaming: bool | None = None,
    cache_dir: str | None = None,
) -> Dataset | IterableDataset:
    """Load one or several image-caption sources, inferring each one's type, and mix them by weight.

    Source types: a `.json` file → `load_caption_json` (relative paths joined to `image_root`, default the JSON's
    folder); a folder with `metadata.jsonl` / `metadata.csv` → `load_image_folder`; a `.tar` file, a glob of `.tar`
    files or a folder of `.tar` files → `load_webdataset`.

    Several sources are mixed with `datasets.interleave_datasets(probabilities=weights / sum(weights), seed=seed,
    stopping_strategy="all_exhausted")`: each row is drawn from source `i` with probability `w_i`, and the mix ends
    once every source has been used up at least once (smaller or lighter sources are repeated meanwhile). A single
    source is returned as is (its weight is ignored); the caller shuffles (the Trainer does for a `Dataset`, use
    `.shuffle(seed, buffer_size)` on an `IterableDataset`).

    Args:
        sources: paths or globs, see above.
        weights: one positive weight per source (default: equal).
        image_root: image folder for caption JSON sources.
        seed: seed of the interleaving draws.
        streaming: `None` (default) streams tar shards only and returns an `IterableDataset` as soon as one source
            streams (map-style sources are converted with `to_iterable_dataset()`); `True` streams everything; `False`
            loads everything map-style (tar shards are copied into the Arrow cache).
        cache_dir: `datasets` cache folder.

    Returns:
        `Dataset` or `IterableDataset` with columns `image` and `caption`. `image` is a path `str` or `bytes` when all
        sources agree, else every source is cast to `datasets.Image(decode=False)` and `image` is a
        `{"path", "bytes"}` dict (both are accepted by `load_image`).

    Raises:
        FileNotFoundError: a source, or every match of a pattern, is missing (the message names it).
        ValueError: a source's type cannot be inferred, or the weights do not fit the sources.
    """
    sources, weights = _checked_sources_and_weights(sources, weights)
    kinds = [_source_kind(source) for source in sources]  # every source is checked before any is loaded
    datasets_ = [_load_source(kind, target, image_root, streaming, cache_dir) for kind, target in kinds]
    if len(datasets_) == 1:
        return datasets_[0]
    return _interleave(datasets_, weights, seed)


def _checked_sources_and_weights(
    sources: str | os.PathLike | Sequence[str | os.PathLike], weights: Sequence[float] | None
) -> tuple[list[str], list[float]]:
    """`sources` as a list of path strings and one float weight per source (default: equal); `ValueError` if unfit."""
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    sources = [os.fspath(source) for source in sources]
    if not sources:
        raise ValueError("`sources` is empty; give at least one training data source.")
    if weights is None:
        weights = [1.0] * len(sources)
    weights = [float(weight) for weight in weights]
    if len(weights) != len(sources):
        raise ValueError(f"Got {len(weights)} weights for {len(sources)} sources; give one weight per source.")
    if not all(math.isfinite(weight) and weight > 0 for weight in weights):
        # A zero weight would never exhaust its source, and "all_exhausted" would then never stop.
        raise ValueError(f"Weights must be positive and finite, got {weights}.")
    return sources, weights


def _load_source(
    kind: str, target: Any, image_root: str | None, streaming: bool | None, cache_dir: str | None
) -> Dataset | IterableDataset:
    """Load one source of the type `_source_kind` found, streamed or not as `load_training_data`'s `streaming` says."""
    if kind == "json":
        dataset = load_caption_json(target, image_root=image_root)
        return dataset.to_iterable_dataset() if streaming else dataset
    if kind == "folder":
        return load_image_folder(target, streaming=bool(streaming), cache_dir=cache_dir)
    return load_webdataset(target, streaming=streaming is not False, cache_dir=cache_dir)


def _interleave(
    datasets_: list[Dataset | IterableDataset], weights: Sequence[float], seed: int
) -> Dataset | IterableDataset:
    """Mix several sources by weight until all are exhausted, first bringing them to one kind and one `image` type."""
    from datasets import Dataset, interleave_datasets
    from datasets import Image as ImageFeature

    if not all(isinstance(dataset, Dataset) for dataset in datasets_):
        # interleave_datasets takes datasets of one kind only.
        datasets_ = [d.to_iterable_dataset() if isinstance(d, Dataset) else d for d in datasets_]
    if len({repr(dataset.features["image"]) for dataset in datasets_}) > 1:
        # Paths (string) and bytes (binary) cannot share a column; the Image struct holds either.
        datasets_ = [dataset.cast_column("image", ImageFeature(decode=False)) for dataset in datasets_]
    total = sum(weights)
    return interleave_datasets(
        datasets_,
        probabilities=[weight / total for weight in weights],
        seed=seed,
        stopping_strategy="all_exhausted",
    )


# ---------------------------------------------------------------------------------------------------------------------
# Images: loading, bad-sample accounting, augmentation
# ---------------------------------------------------------------------------------------------------------------------


def describe_image(value: Any, caption: Any = None) -> str:
    """A short name for a sample in logs: its path when it has one, else its size in bytes and its caption."""
    if isinstance(value, Mapping):
        if value.get("path"):
            return str(value["path"])
        value = value.get("bytes")
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes, caption {caption!r}>"
    return f"<{type(value).__name__}, caption {caption!r}>"


class BadImageTracker:
    """Counts samples whose image could not be loaded; stops the run when there are too many.

    The collators call `record_good()` or `record_bad(name, error)` once per sample. A bad sample is logged as a
    warning on the `blip2_hf.data` logger (its name, usually the path, and the exception) and skipped. Once at least
    `min_seen` samples have been seen and more than `max_bad_fraction` of them were bad, `RuntimeError` is raised: at
    that rate the data (or `image_root`) is wrong, and training on the rest would hide it.

    Attributes:
        num_seen: samples reported so far (good and bad).
        num_bad: bad samples so far.
        bad_examples: names of the first `max_examples` bad samples.
    """

    def __init__(self, max_bad_fraction: float = 0.5, min_seen: int = 20, max_examples: int = 10):
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction}.")
        self.max_bad_fraction = max_bad_fraction
        self.min_seen = min_seen
        self.max_examples = max_examples
        self.num_seen = 0
        self.num_bad = 0
        self.bad_examples: list[str] = []
        self._example_errors: list[str] = []

    @property
    def bad_fraction(self) -> float:
        return self.num_bad / self.num_seen if self.num_seen else 0.0

    def record_good(self) -> None:
        self.num_seen += 1
        self.check()

    def record_bad(self, name: str, error: BaseException) -> None:
        """Count, log and remember a bad sample; raise if the bad fraction is now too high."""
        self.num_seen += 1
        self.num_bad += 1
        reason = f"{type(error).__name__}: {error}"
        logger.warning("Skipping sample %s: its image could not be loaded (%s).", name, reason)
        if len(self.bad_examples) < self.max_examples:
            self.bad_examples.append(name)
            self._example_errors.append(reason)
        self.check()

    def check(self) -> None:
        """Raise `RuntimeError` when at least `min_seen` samples were seen and too many of them were bad."""
        if self.num_seen >= self.min_seen and self.bad_fraction > self.max_bad_fraction:
            raise RuntimeError(
                self.summary(f"more than max_bad_fraction={self.max_bad_fraction:g} (checked from {self.min_seen})")
            )

    def summary(self, reason: str) -> str:
        """The error message: counts, fraction, `reason` and a few examples with their errors."""
        examples = "; ".join(
            f"{name} ({error})" for name, error in list(zip(self.bad_examples, self._example_errors))[:5]
        )
        return (
            f"Too many unreadable images: {self.num_bad} of {self.num_seen} samples ({self.bad_fraction:.1%}) failed "
            f"to load, {reason}. Examples: {examples or 'none recorded'}. Check the image paths (`image_root`) and "
            "the files."
        )


def _as_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """`(height, width)` from an int or a pair."""
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


class RandomResizedCropFlip:
    """LAVIS `blip2_image_train` augmentation on PIL images, without torchvision.

    `RandomResizedCrop(image_size, scale, ratio, interpolation=BICUBIC)` followed by `RandomHorizontalFlip(flip_prob)`,
    with torchvision's sampling algorithm: up to 10 attempts at a crop whose area is a uniform fraction in `scale` of
    the image's and whose aspect ratio (w/h) is log-uniform in `ratio`, at a uniform position; if none fits, a center
    crop of the whole image clamped to `ratio`. The crop is resized to `image_size` with bicubic resampling (PIL
    `crop` then `resize`, as torchvision does on PIL images), then flipped left-right with probability `flip_prob`.

    The draws come from the `rng` given to the call (a `random.Random`; Python's `random` module by default). The
    collators give each sample its own generator seeded by (seed, epoch, sample), so a sample's crop does not depend
    on what ran before it: a resumed run, or one with more data-loader workers, crops exactly as an uninterrupted one. Evaluation uses no transform:
    the processor's plain bicubic resize to `image_size` is LAVIS `blip_image_eval`.

    Args:
        image_size: output size, an int (square) or `(height, width)`; use the image processor's size.
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
    ):
        if scale[0] > scale[1] or ratio[0] > ratio[1]:
            raise ValueError(f"scale and ratio must be (min, max); got scale={scale}, ratio={ratio}.")
        self.size = _as_size(image_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_prob = flip_prob

    def get_params(self, width: int, height: int, rng: Any = random) -> tuple[int, int, int, int]:
        """Draw a crop box `(top, left, crop_height, crop_width)` for an image of `width` x `height` pixels."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect_ratio = math.exp(rng.uniform(*log_ratio))
            crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
            crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = rng.randint(0, height - crop_height)
                left = rng.randint(0, width - crop_width)
                return top, left, crop_height, crop_width
        # Fallback: the largest centered crop whose aspect ratio lies in `ratio`.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            crop_width, crop_height = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            crop_width, crop_height = int(round(height * self.ratio[1])), height
        else:
            crop_width, crop_height = width, height
        return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width

    def __call__(self, image: Image.Image, rng: Any = random) -> Image.Image:
        """Crop, resize to `image_size` and maybe flip `image`; returns a new PIL image of that size."""
        top, left, crop_height, crop_width = self.get_params(*image.size, rng=rng)
        height, width = self.size
        image = image.crop((left, top, left + crop_width, top + crop_height)).resize(
            (width, height), Image.Resampling.BICUBIC
        )
        if rng.random() < self.flip_prob:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"flip_prob={self.flip_prob})"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Collators
# ---------------------------------------------------------------------------------------------------------------------


def _as_float32(value: Any) -> torch.Tensor:
    if torch.is_tensor(value):
        return value.detach().to("cpu", torch.float32)
    # Through NumPy: a cache read without a format gives nested lists, and torch.tensor on those is slow.
    return torch.from_numpy(np.asarray(value, dtype=np.float32))


def _frozen_image_states(rows: Sequence[Mapping[str, Any]]) -> torch.Tensor | None:
    """`[B, 1 + P, Dv]` float32 from frozen-feature cache rows (the frozen encoder's output before `post_layernorm`),
    or None when no row carries `frozen_image_states`."""
    has_states = [row.get("frozen_image_states") is not None for row in rows]
    if not any(has_states):
        return None
    if not all(has_states):
        raise ValueError(
            "A batch mixes rows with precomputed `frozen_image_states` and rows with images; use one kind."
        )
    return torch.stack([_as_float32(row["frozen_image_states"]) for row in rows])


class _CollatorBase:
    """Decodes the images of a batch, skipping (and reporting) the ones that fail."""

    def __init__(
        self,
        processor: Blip2Processor,
        image_transform: Callable[[Image.Image], Image.Image] | None,
        tracker: BadImageTracker | None,
        max_words: int,
    ):
        self.processor = processor
        self.image_transform = image_transform
        self.tracker = tracker if tracker is not None else BadImageTracker()
        self.max_words = max_words
        # Randomness per sample (augmentation, prefix split): seeded by (seed, epoch, sample). The Trainer sets both
        # (`blip2_hf.trainer` updates `epoch` at each epoch's start).
        self.seed = 0
        self.epoch = 0
        # Set by `Blip2Trainer`: batches then carry their counts (`BAD_IMAGE_COUNTS_KEY`), the only way the counts of
        # data-loader workers (each with its own copy of this collator) reach the main process.
        self.report_counts = False

    def _rng(self, row: Mapping[str, Any]) -> random.Random:
        image = row.get("image")
        key = hashlib.sha256(image).hexdigest() if isinstance(image, bytes) else repr(image)
        digest = hashlib.sha256(f"{self.seed}|{self.epoch}|{key}|{row.get('caption')!r}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "little"))

    def _load_rows(
        self, rows: Sequence[Mapping[str, Any]]
    ) -> tuple[list[Image.Image], list[str], list[random.Random]]:
        """Images (transformed), cleaned captions and per-sample generators of the rows that load; the others go to
        the tracker."""
        if not rows:
            raise ValueError("Got an empty batch.")
        images, captions, rngs = [], [], []
        for row in rows:
            caption = row.get("caption")
            rng = self._rng(row)
            try:
                if not isinstance(caption, str):
                    raise ValueError(f"the sample has no caption string (got {caption!r})")
                image = load_image(row.get("image"))
                if self.image_transform is not None:
                    image = self.image_transform(image, rng)
            except Exception as error:  # any decoding failure (PIL raises many kinds) costs the sample only
                self.tracker.record_bad(describe_image(row.get("image"), caption), error)
                continue
            self.tracker.record_good()
            images.append(image)
            captions.append(pre_caption(caption, self.max_words))
            rngs.append(rng)
        if not images:
            raise RuntimeError(
                self.tracker.summary(f"and every sample of the last batch ({len(rows)} samples) was bad")
            )
        return images, captions, rngs

    def _with_counts(self, batch: dict[str, torch.Tensor], num_seen: int, num_bad: int) -> dict[str, torch.Tensor]:
        """`batch` plus its counts (`BAD_IMAGE_COUNTS_KEY`) when `report_counts` is set."""
        if self.report_counts:
            counts = torch.zeros(len(next(iter(batch.values()))), 2, dtype=torch.int64)
            counts[0, 0], counts[0, 1] = num_seen, num_bad
            batch[BAD_IMAGE_COUNTS_KEY] = counts
        return batch

    def _cached_captions(self, rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[random.Random]]:
        return [pre_caption(row["caption"], self.max_words) for row in rows], [self._rng(row) for row in rows]

    def _pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]


class Stage1Collator(_CollatorBase):
    """Batches for stage 1 (`Blip2ForPreTraining`): images and Q-Former (BERT) tokens of the cleaned captions.

    Captions are cleaned with `pre_caption` and tokenized by `processor.qformer_tokenizer` as LAVIS
    `Blip2Qformer.forward` does: `[CLS] caption [SEP]`, truncated to `max_length` tokens, padded (right) to the
    longest in the batch.

    Returns (from a list of dataset rows):
        - `pixel_values`: float32 `[B, 3, H, W]`, `image_transform` applied to the PIL image before the processor's
          resize and normalization; or, when the rows carry `frozen_image_states` (frozen-feature cache rows),
        - `frozen_image_states`: float32 `[B, 1 + P, Dv]` instead.
        - `input_ids`, `attention_mask`: int64 `[B, T]`, `T <= max_length`.

        `B` counts the rows whose image loaded: bad rows are skipped (see `BadImageTracker`).
    """

    def __init__(
        self,
        processor: Blip2Processor,
        max_length: int = 32,
        image_transform: Callable[[Image.Image], Image.Image] | None = None,
        tracker: BadImageTracker | None = None,
        max_words: int = 50,
    ):
        if processor.qformer_tokenizer is None:
            raise ValueError("Stage1Collator needs a processor with a `qformer_tokenizer` (the Q-Former's BERT).")
        super().__init__(processor, image_transform, tracker, max_words)
        self.max_length = max_length

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        frozen_image_states = _frozen_image_states(rows)
        if frozen_image_states is not None:
            batch = {"frozen_image_states": frozen_image_states}
            captions, _ = self._cached_captions(rows)
        else:
            images, captions, _ = self._load_rows(rows)
            batch = {"pixel_values": self._pixel_values(images)}
        num_bad = len(rows) - len(captions)
        tokens = self.processor.qformer_tokenizer(
            captions,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            padding_side="right",
            return_tensors="pt",
        )
        batch["input_ids"] = tokens["input_ids"]
        batch["attention_mask"] = tokens["attention_mask"]
        return self._with_counts(batch, len(rows), num_bad)


class Stage2Collator(_CollatorBase):
    """Batches for stage 2 (`Blip2ForConditionalGeneration`): images and language-model tokens with labels.

    Captions are cleaned with `pre_caption` and put after `prompt` (LAVIS `blip_caption(prompt=...)`: `prompt +
    pre_caption(caption)`, so a prompt should end with a space, e.g. `"a photo of "`).

    Decoder-only LLMs (OPT, LLaMA, ...; LAVIS `Blip2OPT.forward`). The text is `prompt + caption + "\\n"`, the newline
    being the end of sequence LAVIS trains with. The processor writes `[<image> x Q][BOS][prompt][caption]["\\n"]`,
    padded on the right, with at most `max_length` text tokens (BOS and "\\n" included; a too long caption loses its
    end and the "\\n", as in LAVIS). `labels` are `input_ids` with -100 on the image tokens, BOS and the prompt (the
    prompt length is that of `prompt.rstrip()` tokenized alone, BOS included, as LAVIS counts its model prompt), and
    on padding; the caption tokens and "\\n" are the targets. The model shifts the labels.

    Encoder-decoder LLMs (Flan-T5), prefix language modelling as in the BLIP-2 paper (LAVIS never shipped it): with
    `split_prefix=True` each caption of `n >= 2` words is split after `k` words, `k` uniform in `[1, max(1, n // 2)]`
    (Python `random`, "from position 1 to the midpoint"); the encoder reads `[<image> x Q] prompt + first k words </s>`
    and the decoder learns `remaining words </s>`. Captions of fewer than 2 words are not split (the target would be
    empty). With `split_prefix=False` (captioning fine-tuning, LAVIS `text_input = prompt`, `text_output = caption`)
    the encoder reads the prompt alone and the whole caption is the target. Both sides hold at most `max_length`
    text tokens.

    Returns (from a list of dataset rows):
        - `pixel_values`: float32 `[B, 3, H, W]` (after `image_transform`), or `frozen_image_states`: float32
          `[B, 1 + P, Dv]` for frozen-feature cache rows.
        - `input_ids`, `attention_mask`: int64 `[B, Q + L]`, `Q = processor.num_query_tokens` image tokens first.
        - `labels`: int64, decoder-only `[B, Q + L]` aligned with `input_ids`; encoder-decoder `[B, T]` target ids
          ending with `</s>`, -100 on padding.
        - `decoder_attention_mask`: int64 `[B, T]`, encoder-decoder only (1 on target tokens, as LAVIS passes it).

        `B` counts the rows whose image loaded: bad rows are skipped (see `BadImageTracker`).
    """

    def __init__(
        self,
        processor: Blip2Processor,
        max_length: int = 32,
        prompt: str = "",
        is_encoder_decoder: bool = False,
        image_transform: Callable[[Image.Image], Image.Image] | None = None,
        tracker: BadImageTracker | None = None,
        split_prefix: bool = True,
        max_words: int = 50,
        prompt_length: int | None = None,
    ):
        super().__init__(processor, image_transform, tracker, max_words)
        self.max_length = max_length
        self.prompt = prompt
        self.is_encoder_decoder = is_encoder_decoder
        self.split_prefix = split_prefix
        self.num_query_tokens = processor.num_query_tokens or 0
        # LAVIS: prompt_length = len(opt_tokenizer(self.prompt).input_ids) with the model prompt "a photo of" (no
        # trailing space) while the text processor writes "a photo of "; rstrip keeps a trailing-space token of
        # byte-level BPE from masking the caption's first word. A chat prompt passes its own count (its trailing
        # newline is a token of its own).
        if prompt_length is None:
            prompt_length = len(processor.tokenizer(prompt.rstrip())["input_ids"])
        self.prompt_length = prompt_length
        if not is_encoder_decoder and prompt_length >= max_length:
            # every label would be masked: a NaN loss on every step, and the run stopped as diverged
            raise ValueError(
                f"The prompt takes {prompt_length} of the max_length={max_length} text tokens (BOS included), leaving "
                f"none for the caption: raise --max_length above {prompt_length} or shorten --prompt. Prompt: "
                f"{prompt!r}"
            )

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        frozen_image_states = _frozen_image_states(rows)
        if frozen_image_states is not None:
            batch = {"frozen_image_states": frozen_image_states}
            captions, rngs = self._cached_captions(rows)
        else:
            images, captions, rngs = self._load_rows(rows)
            batch = {"pixel_values": self._pixel_values(images)}
        if self.is_encoder_decoder:
            batch.update(self._encoder_decoder_text(captions, rngs))
        else:
            batch.update(self._decoder_only_text(captions))
        return self._with_counts(batch, len(rows), len(rows) - len(captions))

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """`[<image> x Q] + tokens`, right-padded, at most `max_length` text tokens."""
        encoding = self.processor(
            text=texts,
            padding="longest",
            truncation=True,
            max_length=self.max_length + self.num_query_tokens,
            padding_side="right",
            return_tensors="pt",
        )
        return {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}

    def _decoder_only_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        batch = self._encode([self.prompt + caption + "\n" for caption in captions])
        input_ids = batch["input_ids"]
        labels = input_ids.masked_fill(batch["attention_mask"] == 0, -100)
        # Right padding: every row starts with its image tokens, then BOS and the prompt.
        labels[:, : self.num_query_tokens + self.prompt_length] = -100
        labels[input_ids == self.processor.image_token_id] = -100
        batch["labels"] = labels
        return batch

    def split_caption(self, caption: str, rng: Any = random) -> tuple[str, str]:
        """`(encoder text, decoder target)` of one cleaned caption for the encoder-decoder prefix LM."""
        words = caption.split()
        if not self.split_prefix or len(words) < 2:
            return self.prompt, caption
        k = rng.randint(1, max(1, len(words) // 2))
        return self.prompt + " ".join(words[:k]), " ".join(words[k:])

    def _encoder_decoder_text(self, captions: list[str], rngs: list[random.Random]) -> dict[str, torch.Tensor]:
        encoder_texts, targets = zip(*(self.split_caption(caption, rng) for caption, rng in zip(captions, rngs)))
        batch = self._encode(list(encoder_texts))
        target_tokens = self.processor.tokenizer(
            list(targets),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            padding_side="right",
            return_tensors="pt",
        )
        batch["labels"] = target_tokens["input_ids"].masked_fill(target_tokens["attention_mask"] == 0, -100)
        batch["decoder_attention_mask"] = target_tokens["attention_mask"]
        return batch


__all__ = [
    "BAD_IMAGE_COUNTS_KEY",
    "BadImageTracker",
    "RandomResizedCropFlip",
    "Stage1Collator",
    "Stage2Collator",
    "describe_image",
    "load_caption_json",
    "load_image",
    "load_image_folder",
    "load_training_data",
    "load_webdataset",
    "pre_caption",
    "share_naming_sides",
]


_SIDE_WORDS = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def share_naming_sides(captions: Sequence[str | Sequence[str]]) -> float:
    """The share of `captions` (a string, or a list of a sample's captions) that say "left" or "right"."""
    if len(captions) == 0:
        return 0.0
    texts = [caption if isinstance(caption, str) else " ".join(caption) for caption in captions]
    return sum(bool(_SIDE_WORDS.search(text)) for text in texts) / len(texts)
