"""Frozen-feature cache: run BLIP-2's frozen image encoder once per image, store its output, train from the store.

In both BLIP-2 stages the image encoder (our EVA ViT, or any transformers vision model: CLIP, SigLIP, DINOv2,
ConvNeXt, ...) is frozen, so its output for a given image never changes during training. `build_feature_cache` computes
it once per distinct image of a caption dataset (`model.encode_image_frozen`: `[B, T, Dv]`, the tokens the Q-Former
reads, e.g. `T = 1 + P` for a ViT with a CLS token, *before* the trainable `post_layernorm`), and
`load_feature_cache` gives it back as a `datasets.Dataset` whose rows feed `forward(frozen_image_states=...)`
directly.

The trade-off: every image is preprocessed once, in eval mode (resize + normalize, no random crop or flip), so
training from the cache sees the same view of each image every epoch instead of LAVIS's `RandomResizedCrop` +
horizontal flip. In exchange, the frozen encoder (ViT-g: ~1B parameters, most of a stage-1 step) never runs.

Storage format (one directory):

- `features-00000.safetensors`, `features-00001.safetensors`, ...: each holds one tensor `frozen_image_states`
  `[n, T, Dv]` in the cache dtype (fp16 by default), one row per distinct image, `shard_size` rows per shard
  (the last shard may be shorter). Read by memory map, row by row. Caches written before the rename name the
  tensor `image_embeds`; they load the same way.
- `index.json`: `format`/`version`; `dtype`; `embed_shape` (`[T, Dv]`); `image_size` (`[H, W]` the images were
  resized to); `vision_config` (the architecture fields of the encoder that it has, and which of its outputs feed the
  Q-Former: `vision_feature_layer`, `vision_feature_select_strategy`); `vision_weights_sample` (a few weights of the
  encoder, to tell two checkpoints of the same shape apart); `image_processor` (its settings); `source` (the
  dataset's description) and `counts`; `shards` (`file`, `num_images`, `bytes` each); `skipped` (unreadable images
  and why); `rows`, column-wise, one entry per kept caption row in dataset order: `shard`, `row` (within the shard),
  `caption`, `image` (the image's key: its absolute path, or `sha256:<hex>` of its bytes), `source_row` (the row's
  index in the source dataset).

A cache is written to a hidden temporary directory beside `output_dir` and renamed into place only when complete,
so a killed run never leaves a directory that looks like a cache (only a `.<name>.partial-*` directory to delete).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .data import load_image, load_training_data
from .modeling_blip2 import Blip2BackboneVisionModel, Blip2VisionModel, frozen_tower_dtype

FORMAT = "blip2_hf.feature_cache"
VERSION = 1
INDEX_FILE = "index.json"
SHARD_FILE = "features-{:05d}.safetensors"
TENSOR_NAME = "frozen_image_states"  # the shards' tensor, and the loaded dataset's column
# What older caches named the tensor. Renamed because transformers' `image_embeds` is the vision output *after*
# `post_layernorm`; still read.
LEGACY_TENSOR_NAMES = ("image_embeds",)
DEFAULT_SHARD_SIZE = 1024  # images per shard: ~0.74 GB for ViT-g at 224 px in fp16 (257 x 1408 x 2 bytes per image)

# What must agree between a model and a cache for the cached features to be that model's: the encoder family, its
# shape, and which of its outputs are cached (the layer and the tokens).
CHECKED_FIELDS = (
    "model_type", "hidden_size", "hidden_sizes", "image_size", "patch_size", "num_hidden_layers", "depths",
    "vision_feature_layer", "vision_feature_select_strategy",
)  # fmt: skip
# The vision config fields recorded in index.json, those of them the encoder's config has (the architecture, not the
# generic PretrainedConfig fields: ConvNeXt has `hidden_sizes` and `depths` where a ViT has `hidden_size`).
VISION_FIELDS = (
    "model_type", "hidden_size", "hidden_sizes", "intermediate_size", "num_hidden_layers", "depths",
    "num_attention_heads", "image_size", "patch_size", "hidden_act", "layer_norm_eps", "qkv_bias",
)  # fmt: skip
# Which of the encoder's outputs the cache holds (`Blip2Config`'s fields), recorded beside VISION_FIELDS; caches made
# before they were recorded hold our EVA encoder's last hidden state, every token.
FEATURE_FIELDS = {"vision_feature_layer": -1, "vision_feature_select_strategy": "full"}
# Backbone tensors `vision_weights_sample` reads (evenly spaced in the backbone's order, first and last included).
_SAMPLED_BACKBONE_TENSORS = 8
DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
_SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
_SAMPLES_PER_TENSOR = 16
_MAX_SKIPPED_LISTED = 1000

NO_AUGMENTATION_NOTE = (
    "feature cache: each image is encoded once with eval-mode preprocessing only (resize to {size} + normalize): "
    "training from this cache sees the same view of every image each epoch, without the random resized crop and "
    "horizontal flip LAVIS trains with. That is the price of never running the frozen image encoder again."
)


# ---------------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------------


def _unwrap(value: Any) -> Any:
    """A `datasets.Image(decode=False)` cell `{"bytes", "path"}` -> its bytes if any, else its path."""
    if isinstance(value, Mapping):
        data = value.get("bytes")
        return data if data is not None else value.get("path")
    return value


def image_key(value: Any) -> str:
    """The identity of a row's image, for encoding each image once: the absolute path for a path, `sha256:<hex>` of
    the encoded bytes for bytes (or of mode, size and pixels for a decoded PIL image)."""
    value = _unwrap(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "sha256:" + hashlib.sha256(value).hexdigest()
    if isinstance(value, (str, os.PathLike)):
        return os.path.abspath(os.fspath(value))
    if isinstance(value, Image.Image):
        digest = hashlib.sha256(f"{value.mode}{value.size}".encode())
        digest.update(value.tobytes())
        return "sha256:" + digest.hexdigest()
    raise TypeError(f"the `image` column holds a {type(value).__name__}; expected a path, bytes or PIL image")


class _DistinctImages(torch.utils.data.Dataset):
    """Item `i` = the `i`-th distinct image, decoded and preprocessed: `(i, pixel_values [3, H, W] or None, error or
    None)`. Decoding and preprocessing failures are returned, not raised, so that DataLoader workers survive them."""

    def __init__(self, images: datasets.Dataset, first_rows: list[int], processor: Any, loader: Callable):
        self.images, self.first_rows, self.processor, self.loader = images, first_rows, processor, loader

    def __len__(self) -> int:
        return len(self.first_rows)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = self.loader(_unwrap(self.images[self.first_rows[index]]["image"]))
            pixel_values = self.processor(images=[image], return_tensors="pt")["pixel_values"][0]
        except Exception as error:  # any unreadable image is skipped and reported, whatever the decoder raised
            return index, None, f"{type(error).__name__}: {error}"
        return index, pixel_values, None


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> dict[str, Any]:
    good = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    return {
        "indices": [index for index, _ in good],
        "pixel_values": torch.stack([pixels for _, pixels in good]) if good else None,
        "errors": {index: error for index, pixels, error in items if pixels is None},
    }


# ---------------------------------------------------------------------------------------------------------------------
# The model's side
# ---------------------------------------------------------------------------------------------------------------------


def _vision_tower(model: torch.nn.Module) -> Blip2VisionModel | Blip2BackboneVisionModel:
    """The vision model (`Blip2VisionModel`, EVA, or `Blip2BackboneVisionModel`, any other family) of any of our
    models, or the model itself when it is one."""
    if isinstance(model, (Blip2VisionModel, Blip2BackboneVisionModel)):
        return model
    vision = getattr(model, "vision_model", None)
    if vision is None:
        raise TypeError(f"{type(model).__name__} has no vision_model: pass a BLIP-2 model with an image encoder")
    return vision


def _frozen_encoder(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """`pixel_values [B, 3, H, W] -> [B, T, Dv]`, the frozen encoder's output before `post_layernorm`."""
    if isinstance(model, (Blip2VisionModel, Blip2BackboneVisionModel)):
        return model.encode_frozen
    return model.encode_image_frozen


def _encoder_parameter(vision: torch.nn.Module) -> torch.nn.Parameter:
    """A weight of the frozen encoder (not of the trainable `post_layernorm`): its device and dtype are the encoder's."""
    if isinstance(vision, Blip2BackboneVisionModel):
        return next(vision.backbone.parameters())
    return vision.embeddings.patch_embedding.weight


def vision_config_dict(model: torch.nn.Module) -> dict[str, Any]:
    """The architecture fields the model's image encoder config has (`VISION_FIELDS`) and which of the encoder's
    outputs it feeds the Q-Former (`FEATURE_FIELDS`: the vision model's `feature_layer` and `select_strategy`, set
    from `Blip2Config.vision_feature_layer` / `vision_feature_select_strategy`)."""
    vision = _vision_tower(model)
    record = {field: getattr(vision.config, field) for field in VISION_FIELDS if hasattr(vision.config, field)}
    record["vision_feature_layer"] = vision.feature_layer
    record["vision_feature_select_strategy"] = vision.select_strategy
    return record


def vision_weights_sample(model: torch.nn.Module) -> dict[str, list[float]]:
    """A few evenly spaced values per tensor of some of the encoder's weights (EVA: its embeddings and last block;
    another family: `_SAMPLED_BACKBONE_TENSORS` backbone tensors evenly spaced in its order): enough to tell two
    checkpoints of the same architecture apart, robust to the dtype the weights were loaded in."""
    vision = _vision_tower(model)
    if isinstance(vision, Blip2BackboneVisionModel):
        tensors = list(vision.backbone.named_parameters(prefix="backbone"))
        picks = torch.linspace(0, len(tensors) - 1, min(_SAMPLED_BACKBONE_TENSORS, len(tensors))).round().long()
        named = dict(tensors[int(i)] for i in picks)
    else:
        named = dict(vision.embeddings.named_parameters(prefix="embeddings"))
        if len(vision.encoder.layers):
            last = len(vision.encoder.layers) - 1
            named.update(vision.encoder.layers[last].named_parameters(prefix=f"encoder.layers.{last}"))
    sample = {}
    for name in sorted(named):
        flat = named[name].detach().reshape(-1)
        positions = torch.linspace(0, flat.numel() - 1, min(_SAMPLES_PER_TENSOR, flat.numel())).round().long()
        sample[name] = flat[positions.to(flat.device)].float().cpu().tolist()
    return sample


# ---------------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CacheReport:
    """What `build_feature_cache` wrote. Sizes in bytes; `embed_shape` is `[1 + P, Dv]` per image."""

    output_dir: Path
    num_rows: int
    num_rows_cached: int
    num_images: int
    num_images_cached: int
    skipped: dict[str, str]
    num_shards: int
    total_bytes: int
    embed_shape: tuple[int, int]
    image_size: tuple[int, int]
    dtype: str
    seconds: float

    @property
    def num_images_skipped(self) -> int:
        return len(self.skipped)

    @property
    def num_rows_skipped(self) -> int:
        return self.num_rows - self.num_rows_cached

    @property
    def bytes_per_image(self) -> float:
        return self.total_bytes / max(self.num_images_cached, 1)

    def summary(self) -> str:
        shape = "x".join(str(d) for d in self.embed_shape)
        lines = [
            f"feature cache {self.output_dir}: {self.num_images_cached} images ({self.num_rows_cached} caption rows) "
            f"in {self.num_shards} shard(s), {_human(self.total_bytes)} ({self.total_bytes} bytes) on disk = "
            f"{_human(self.bytes_per_image)} per image ([{shape}] {self.dtype}); {self.seconds:.1f} s"
        ]
        lines.append(NO_AUGMENTATION_NOTE.format(size="x".join(str(d) for d in self.image_size)))
        if self.skipped:
            lines.append(
                f"skipped {self.num_images_skipped} unreadable image(s) and their {self.num_rows_skipped} caption "
                f"row(s), e.g. {next(iter(self.skipped.items()))}"
            )
        return "\n".join(lines)


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} TiB"


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"cache dtype must be float16, bfloat16 or float32, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _describe_dataset(dataset: datasets.Dataset, source: Any) -> dict[str, Any]:
    info = dataset.info
    return _json_safe(
        {
            "source": source,
            "description": info.description or None,
            "dataset_name": info.dataset_name,
            "config_name": info.config_name,
            "split": str(dataset.split) if dataset.split is not None else None,
            "fingerprint": getattr(dataset, "_fingerprint", None),
            "num_rows": len(dataset),
            "columns": dataset.column_names,
        }
    )


def _image_processor_settings(processor: Any) -> dict[str, Any] | None:
    image_processor = getattr(processor, "image_processor", processor)
    try:
        return json.loads(image_processor.to_json_string())
    except Exception:  # only documentation: a processor that cannot describe itself is still usable
        return None


def _as_dataset(dataset: Any) -> datasets.Dataset:
    if isinstance(dataset, datasets.IterableDataset):
        raise TypeError("build_feature_cache needs a map-style datasets.Dataset (random access), not a streaming one")
    if not isinstance(dataset, datasets.Dataset):
        dataset = datasets.Dataset.from_list([dict(row) for row in dataset])
    missing = {"image", "caption"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"the dataset needs columns `image` and `caption`; it has {dataset.column_names}")
    feature = dataset.features.get("image")
    if isinstance(feature, datasets.Image) and feature.decode:
        dataset = dataset.cast_column("image", datasets.Image(decode=False))  # keys from paths/bytes, decode once
    return dataset


def build_feature_cache(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    processor: Any,
    output_dir: str | os.PathLike,
    batch_size: int = 32,
    dtype: torch.dtype | str = torch.float16,
    shard_size: int = DEFAULT_SHARD_SIZE,
    device: str | torch.device | None = None,
    progress: bool = True,
    *,
    num_workers: int = 0,
    overwrite: bool = False,
    interpolate_pos_encoding: bool = False,
    source: Any = None,
) -> CacheReport:
    """Encode every distinct image of `dataset` once with the frozen encoder and write a feature cache.

    Args:
        model: any of our BLIP-2 models with a `vision_model` (or the vision model itself); only its frozen encoder
            runs (in eval mode, restored afterwards), in the dtype its weights have.
        dataset: rows with `image` (a path, encoded bytes, or a `datasets.Image` cell) and `caption`. Rows that share
            an image (same absolute path, or same bytes) share one cached row.
        processor: a `Blip2Processor` (or a bare image processor): `processor(images=[...], return_tensors="pt")`
            gives `pixel_values [B, 3, H, W]`, eval-mode resizing only.
        output_dir: the cache directory; must not exist unless `overwrite=True`.
        batch_size: images per encoder call.
        dtype: stored dtype (`torch.float16` default, `bfloat16`, `float32`, or "fp16"/"bf16"/"fp32").
        shard_size: images per `features-XXXXX.safetensors` shard.
        device: where to run the encoder; when given, the model's `vision_model` is moved there (only the vision
            tower); default: where it already is.
        progress: show a tqdm bar.
        num_workers: DataLoader workers that decode and preprocess images (0: in this process).
        overwrite: replace an existing `output_dir` (after the new cache is complete).
        interpolate_pos_encoding: passed to the encoder, for images larger than `vision_config.image_size`.
        source: free-form description of where the data came from, stored in `index.json` (e.g. file names).

    Returns:
        A `CacheReport` (also printed, with the disk cost and the no-augmentation trade-off).
    """
    started = time.perf_counter()
    dtype = _as_dtype(dtype)
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size} and {shard_size}")
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; pass overwrite=True (--overwrite) to replace it")
    dataset = _as_dataset(dataset)
    vision = _vision_tower(model)
    encode = _frozen_encoder(model)
    if device is not None:
        vision.to(device)
    device = _encoder_parameter(vision).device
    plan = _plan_distinct_images(dataset)

    with _staging_directory(output_dir) as partial, _eval_mode(vision):
        loader = torch.utils.data.DataLoader(
            _DistinctImages(dataset.select_columns(["image"]), plan.first_rows, processor, load_image),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
        )
        encoded = _encode_into_shards(encode, loader, partial, len(plan.first_rows), device, dtype, shard_size,
                                      interpolate_pos_encoding, progress)  # fmt: skip
        if not encoded.slots:
            raise ValueError(
                f"none of the {len(plan.first_rows)} images could be read: {_first(encoded.skipped, plan.keys)}"
            )
        skipped_by_key = {plan.keys[index]: error for index, error in sorted(encoded.skipped.items())}
        index = _cache_index(model, vision, processor, dataset, source, plan, encoded, skipped_by_key, dtype=dtype,
                             shard_size=shard_size, interpolate_pos_encoding=interpolate_pos_encoding)  # fmt: skip
        index_path = partial / INDEX_FILE
        index_path.write_text(json.dumps(_json_safe(index), ensure_ascii=False) + "\n")
        _fsync(index_path)
        _publish(partial, output_dir)
    report = _cache_report(output_dir, index, skipped_by_key, time.perf_counter() - started)
    print(report.summary())
    return report


@contextlib.contextmanager
def _staging_directory(output_dir: Path) -> Iterator[Path]:
    """A new hidden `.<name>.partial-<id>` directory beside `output_dir`, deleted if the block raises: a killed or
    failed build never leaves a directory that looks like a cache (`_publish` renames it into place)."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = output_dir.parent / f".{output_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Run the block with `module` in eval mode, then give each submodule back the mode it had."""
    modes = {submodule: submodule.training for submodule in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for submodule, mode in modes.items():
            submodule.training = mode


@dataclasses.dataclass
class _DistinctImagePlan:
    """Pass 1 over a dataset's rows: which rows share an image. Images are numbered in order of first appearance."""

    keys: list[str]  # image number -> its `image_key`
    first_rows: list[int]  # image number -> the first dataset row that has it
    row_images: list[int]  # dataset row -> its image number
    captions: list[Any]  # dataset row -> its caption


def _plan_distinct_images(dataset: datasets.Dataset) -> _DistinctImagePlan:
    """One key per row (`image_key`); each distinct image remembers the first row that has it."""
    key_ids: dict[str, int] = {}
    first_rows: list[int] = []
    row_images: list[int] = []
    captions: list[Any] = []
    columns = dataset.select_columns(["image", "caption"])
    for start, batch in zip(range(0, len(columns), 1024), columns.iter(batch_size=1024)):
        for offset, (value, caption) in enumerate(zip(batch["image"], batch["caption"])):
            key = image_key(value)
            if key not in key_ids:
                key_ids[key] = len(first_rows)
                first_rows.append(start + offset)
            row_images.append(key_ids[key])
            captions.append(caption)
    return _DistinctImagePlan(list(key_ids), first_rows, row_images, captions)


@dataclasses.dataclass
class _EncodedImages:
    """Pass 2: what was written to the shards. `slots`: image number -> its row in the concatenated shards;
    `skipped`: image number -> why it could not be read; `shards`: `index.json`'s shard entries."""

    slots: dict[int, int] = dataclasses.field(default_factory=dict)
    skipped: dict[int, str] = dataclasses.field(default_factory=dict)
    shards: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    image_size: list[int] | None = None  # [H, W] of the preprocessed images
    embed_shape: list[int] | None = None  # [1 + P, Dv]

    @property
    def total_bytes(self) -> int:
        return sum(shard["bytes"] for shard in self.shards)


def _encode_into_shards(
    encode: Callable[..., torch.Tensor],
    loader: torch.utils.data.DataLoader,
    directory: Path,
    num_images: int,
    device: torch.device,
    dtype: torch.dtype,
    shard_size: int,
    interpolate_pos_encoding: bool,
    progress: bool,
) -> _EncodedImages:
    """Encode the distinct images in batches, in order of first appearance; write full shards as we go.

    Raises:
        ValueError: the encoder's output is finite but overflows the cache `dtype`.
    """
    encoded = _EncodedImages()
    pending: list[torch.Tensor] = []
    bar = tqdm(total=num_images, unit="img", desc="encoding images", disable=not progress)
    for batch in loader:
        encoded.skipped.update(batch["errors"])
        if batch["pixel_values"] is not None:
            pixel_values = batch["pixel_values"].to(device)
            if encoded.image_size is None:
                encoded.image_size = list(pixel_values.shape[-2:])
            embeds = encode(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
            stored = embeds.to(dtype)
            if not torch.isfinite(stored).all() and torch.isfinite(embeds).all():
                raise ValueError(
                    f"the encoder's output overflows {_dtype_name(dtype)} (max |x| = {embeds.abs().max():.4g}); "
                    "store the cache in bf16 or fp32"
                )
            encoded.embed_shape = list(stored.shape[1:])
            for index in batch["indices"]:
                encoded.slots[index] = len(encoded.slots)
            pending.append(stored.cpu())
            while sum(len(t) for t in pending) >= shard_size:
                pending = _flush(directory, encoded.shards, pending, shard_size)
        bar.update(len(batch["indices"]) + len(batch["errors"]))
        bar.set_postfix(skipped=len(encoded.skipped), refresh=False)
    bar.close()
    while pending:
        pending = _flush(directory, encoded.shards, pending, shard_size)
    return encoded


def _cache_rows(plan: _DistinctImagePlan, slots: Mapping[int, int], shard_size: int) -> dict[str, list[Any]]:
    """`index.json`'s `rows`, column-wise: one entry per dataset row whose image was cached, in dataset order."""
    rows: dict[str, list[Any]] = {"shard": [], "row": [], "caption": [], "image": [], "source_row": []}
    for source_row, (image, caption) in enumerate(zip(plan.row_images, plan.captions)):
        if image in slots:
            shard, row = divmod(slots[image], shard_size)
            rows["shard"].append(shard)
            rows["row"].append(row)
            rows["caption"].append(caption)
            rows["image"].append(plan.keys[image])
            rows["source_row"].append(source_row)
    return rows


def _cache_index(
    model: torch.nn.Module,
    vision: Blip2VisionModel | Blip2BackboneVisionModel,
    processor: Any,
    dataset: datasets.Dataset,
    source: Any,
    plan: _DistinctImagePlan,
    encoded: _EncodedImages,
    skipped_by_key: dict[str, str],
    *,
    dtype: torch.dtype,
    shard_size: int,
    interpolate_pos_encoding: bool,
) -> dict[str, Any]:
    """The contents of `index.json` (the module docstring lists its fields)."""
    rows = _cache_rows(plan, encoded.slots, shard_size)
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": _dtype_name(dtype),
        "embed_shape": encoded.embed_shape,
        "image_size": encoded.image_size,
        "interpolate_pos_encoding": interpolate_pos_encoding,
        "model": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "model_class": type(model).__name__,
        "encoder_dtype": _dtype_name(_encoder_parameter(vision).dtype),
        "vision_config": vision_config_dict(model),
        "vision_weights_sample": vision_weights_sample(model),
        "image_processor": _image_processor_settings(processor),
        "augmentation": None,
        "source": _describe_dataset(dataset, source),
        "counts": {
            "rows": len(plan.row_images),
            "rows_cached": len(rows["caption"]),
            "rows_skipped": len(plan.row_images) - len(rows["caption"]),
            "images": len(plan.first_rows),
            "images_cached": len(encoded.slots),
            "images_skipped": len(encoded.skipped),
            "bytes": encoded.total_bytes,
        },
        "shard_size": shard_size,
        "shards": encoded.shards,
        "skipped": dict(list(skipped_by_key.items())[:_MAX_SKIPPED_LISTED]),
        "rows": rows,
    }


def _cache_report(output_dir: Path, index: Mapping[str, Any], skipped: dict[str, str], seconds: float) -> CacheReport:
    """The report of a cache from its `index.json` contents; `skipped` lists every unreadable image (the index only
    the first `_MAX_SKIPPED_LISTED`)."""
    counts = index["counts"]
    return CacheReport(
        output_dir=output_dir,
        num_rows=counts["rows"],
        num_rows_cached=counts["rows_cached"],
        num_images=counts["images"],
        num_images_cached=counts["images_cached"],
        skipped=skipped,
        num_shards=len(index["shards"]),
        total_bytes=counts["bytes"],
        embed_shape=tuple(index["embed_shape"]),
        image_size=tuple(index["image_size"]),
        dtype=index["dtype"],
        seconds=seconds,
    )


def _first(skipped: dict[int, str], keys: list[str]) -> str:
    return next((f"{keys[index]}: {error}" for index, error in skipped.items()), "no images")


def _flush(directory: Path, shards: list[dict[str, Any]], pending: list[torch.Tensor], shard_size: int) -> list:
    """Write the first `shard_size` pending rows as the next shard; return the rest."""
    rows = torch.cat(pending)
    name = SHARD_FILE.format(len(shards))
    path = directory / name
    save_file({TENSOR_NAME: rows[:shard_size].contiguous()}, path, metadata={"format": FORMAT})
    _fsync(path)
    shards.append({"file": name, "num_images": min(len(rows), shard_size), "bytes": path.stat().st_size})
    rest = rows[shard_size:]
    return [rest] if len(rest) else []


def _publish(partial: Path, output_dir: Path) -> None:
    """Rename the finished `partial` directory to `output_dir` (replacing an old cache only now)."""
    old = None
    if output_dir.exists():
        old = output_dir.parent / f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(output_dir, old)
    os.rename(partial, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Loading and checking
# ---------------------------------------------------------------------------------------------------------------------


def read_cache_index(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """`index.json` of a cache, validated against its shards: every shard exists, has the recorded size, holds
    `frozen_image_states [num_images, *embed_shape]` (`image_embeds` in older caches) in the recorded dtype; every
    row points inside its shard. Raises `FileNotFoundError` / `ValueError` naming the offending file."""
    cache_dir = Path(cache_dir)
    index_path = cache_dir / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} not found: {cache_dir} is not a (complete) feature cache")
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{index_path} is not valid JSON: {error}") from error
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{index_path} is not a {FORMAT} index")
    if index.get("version") != VERSION:
        raise ValueError(f"{index_path} has format version {index.get('version')}; this code reads {VERSION}")
    dtype_code = _SAFETENSORS_DTYPES.get(index["dtype"])
    embed_shape = list(index["embed_shape"])
    for shard in index["shards"]:
        path = cache_dir / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"feature cache shard {path} is missing (listed in {index_path})")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise ValueError(
                f"feature cache shard {path} has {size} bytes, {index_path} records {shard['bytes']}: the file is "
                "truncated or was modified"
            )
        expected = [shard["num_images"], *embed_shape]
        try:
            with safe_open(path, framework="pt") as handle:
                name = _tensor_name(handle, path)
                tensor = handle.get_slice(name)
                shape, dtype = list(tensor.get_shape()), tensor.get_dtype()
        except ValueError:
            raise
        except Exception as error:  # SafetensorError, OSError: a damaged file
            raise ValueError(f"feature cache shard {path} cannot be read: {error}") from error
        if shape != expected:
            raise ValueError(f"feature cache shard {path} holds {name} {shape}, {index_path} expects {expected}")
        if dtype != dtype_code:
            raise ValueError(f"feature cache shard {path} is {dtype}, {index_path} records {index['dtype']}")
    rows = index["rows"]
    lengths = {name: len(column) for name, column in rows.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{index_path}: the row columns have different lengths {lengths}")
    shard_ids, row_ids = np.asarray(rows["shard"], dtype=np.int64), np.asarray(rows["row"], dtype=np.int64)
    bad_shard = (shard_ids < 0) | (shard_ids >= len(index["shards"]))
    if bad_shard.any():
        at = int(bad_shard.nonzero()[0][0])
        raise ValueError(
            f"{index_path}: row {at} points at shard {shard_ids[at]}, the cache has {len(index['shards'])}"
        )
    sizes = np.asarray([shard["num_images"] for shard in index["shards"]], dtype=np.int64)
    bad_row = (row_ids < 0) | (row_ids >= sizes[shard_ids])
    if bad_row.any():
        at = int(bad_row.nonzero()[0][0])
        shard = index["shards"][shard_ids[at]]
        raise ValueError(
            f"{index_path}: row {at} points at row {row_ids[at]} of {cache_dir / shard['file']}, which holds "
            f"{shard['num_images']} images"
        )
    return index


def _tensor_name(handle: Any, path: Path) -> str:
    """The name of the features tensor in an open shard: `TENSOR_NAME`, or a legacy name in older caches."""
    keys = set(handle.keys())
    for name in (TENSOR_NAME, *LEGACY_TENSOR_NAMES):
        if name in keys:
            return name
    raise ValueError(f"feature cache shard {path} has no tensor {TENSOR_NAME!r} (nor {LEGACY_TENSOR_NAMES[0]!r})")


class _CacheReader:
    """The `datasets` transform of a loaded cache: the `frozen_image_states` column's cache positions -> tensors
    `[1 + P, Dv]`, each read from its memory-mapped shard (`safe_open`, opened on first use in each process)."""

    def __init__(self, cache_dir: Path, files: list[str], offsets: list[int]):
        self.cache_dir, self.files, self.offsets = cache_dir, files, offsets
        self._handles: dict[int, tuple[Any, str]] = {}  # shard -> (open file, its tensor's name)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # open files do not travel to DataLoader workers

    def _handle(self, shard: int) -> tuple[Any, str]:
        if shard not in self._handles:
            path = self.cache_dir / self.files[shard]
            handle = safe_open(path, framework="pt")
            self._handles[shard] = handle, _tensor_name(handle, path)
        return self._handles[shard]

    def read(self, position: int) -> torch.Tensor:
        shard = bisect.bisect_right(self.offsets, position) - 1
        row = position - self.offsets[shard]
        handle, name = self._handle(shard)
        return handle.get_slice(name)[row : row + 1][0]

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        output = dict(batch)
        output[TENSOR_NAME] = [self.read(int(position)) for position in batch[TENSOR_NAME]]
        return output


def load_feature_cache(cache_dir: str | os.PathLike) -> datasets.Dataset:
    """A cache as a `datasets.Dataset` with columns `frozen_image_states` and `caption`, one row per cached caption
    row (older caches too: their `image_embeds` tensors load under this name).

    `dataset[i]["frozen_image_states"]` is a `[1 + P, Dv]` tensor in the cache dtype, read lazily from the memory-mapped
    shards by a `set_transform` (the Arrow column itself holds the row's position in the cache, an int64). The
    transform survives `select`, `shuffle`, `train_test_split`, `filter` and `map` (new columns pass through); with
    `transformers.Trainer` set `remove_unused_columns=False`. `index.json` is checked against the shards first (see
    `read_cache_index`)."""
    cache_dir = Path(cache_dir)
    index = read_cache_index(cache_dir)
    files = [shard["file"] for shard in index["shards"]]
    offsets = np.concatenate([[0], np.cumsum([shard["num_images"] for shard in index["shards"]])]).tolist()
    rows = index["rows"]
    positions = np.asarray(offsets[:-1], dtype=np.int64)[np.asarray(rows["shard"], dtype=np.int64)]
    positions = positions + np.asarray(rows["row"], dtype=np.int64)
    dataset = datasets.Dataset.from_dict(
        {TENSOR_NAME: positions, "caption": rows["caption"]},
        info=datasets.DatasetInfo(description=f"BLIP-2 frozen-feature cache {cache_dir}"),
    )
    dataset.set_transform(_CacheReader(cache_dir, files, offsets[:-1]))
    return dataset


def check_cache_matches(model: torch.nn.Module, cache_dir: str | os.PathLike, check_weights: bool = True) -> None:
    """Raise `ValueError` unless `cache_dir` holds features of this model's image encoder: same family, width, image
    size, patch size, depth and selected layer and tokens (`CHECKED_FIELDS`) and, with `check_weights`, the same
    weights (a sample of them, compared with a 1% tolerance so that fp16/bf16/fp32 copies of one checkpoint agree)."""
    index = read_cache_index(cache_dir)
    ours, theirs = vision_config_dict(model), dict(index["vision_config"])
    for field, legacy in FEATURE_FIELDS.items():  # a cache from before they were recorded: EVA, last state, all tokens
        theirs.setdefault(field, legacy)
    problems = [
        f"{field}: model {_shown(ours.get(field))} != cache {_shown(theirs.get(field))}"
        for field in CHECKED_FIELDS
        if _shown(ours.get(field)) != _shown(theirs.get(field))
    ]
    if not problems and check_weights and index.get("vision_weights_sample") is not None:
        cached = index["vision_weights_sample"]
        current = vision_weights_sample(model)
        if set(cached) != set(current):
            problems.append("the encoder's parameter names differ")
        else:
            differing = [
                name
                for name in sorted(cached)
                if len(cached[name]) != len(current[name])
                or not torch.allclose(torch.tensor(current[name]), torch.tensor(cached[name]), rtol=1e-2, atol=1e-6)
            ]
            if differing:
                problems.append(f"the encoder's weights differ ({', '.join(differing[:3])}, ...)")
    if problems:
        raise ValueError(
            f"the feature cache {cache_dir} was not made by this model's image encoder: " + "; ".join(problems)
        )


def _shown(value: Any) -> Any:
    """A config value as index.json gives it back (tuples become lists), so the two sides compare equal."""
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------------------------------------------------------
# Console command
# ---------------------------------------------------------------------------------------------------------------------


def load_model_for_cache(
    model_dir: str | os.PathLike, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> torch.nn.Module:
    """Any of our BLIP-2 folders (or a transformers-format one), as the class its `config.json` `architectures`
    names (`Blip2ForPreTraining`, `Blip2ForConditionalGeneration`, `Blip2VisionModel`, ...; `Blip2Model` when none).
    The whole checkpoint is loaded; only its vision tower is used. `dtype="auto"` is the frozen towers' dtype that
    training uses on `device` (`frozen_tower_dtype`), so the cache holds what a training step would compute."""
    import blip2_hf

    config = json.loads((Path(model_dir) / "config.json").read_text())
    candidates = [getattr(blip2_hf, name, None) for name in config.get("architectures") or []]
    model_class = next((cls for cls in candidates if cls is not None), None)
    if model_class is None:
        vision_only = config.get("model_type") == blip2_hf.Blip2VisionConfig.model_type
        model_class = blip2_hf.Blip2VisionModel if vision_only else blip2_hf.Blip2Model
    if dtype == "auto":
        dtype = frozen_tower_dtype("auto", model_class.config_class.from_pretrained(model_dir), device)
    kwargs = {} if dtype is None else {"dtype": _as_dtype(dtype)}
    return model_class.from_pretrained(model_dir, **kwargs).eval()


def load_sources(sources: Sequence[str], image_root: str | None = None) -> datasets.Dataset:
    """Every row of every source once, in order: `blip2_hf.data.load_training_data` per source (map-style), then
    concatenated. (`load_training_data` of several sources mixes them by weight, repeating the smaller ones: right
    for sampling a training stream, wrong for a cache, which wants each row exactly once.)"""
    parts = []
    for source in sources:
        try:
            parts.append(load_training_data(source, image_root=image_root, streaming=False))
        except json.JSONDecodeError as err:  # its message names no file
            raise ValueError(f"{source}: not valid JSON ({err})") from err
    if len({repr(part.features["image"]) for part in parts}) > 1:  # paths and bytes: the Image struct holds both
        parts = [part.cast_column("image", datasets.Image(decode=False)) for part in parts]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip2-hf-cache-features",
        description="Encode every distinct image of a caption dataset once with a BLIP-2 model's frozen image encoder "
        "and store the features (safetensors shards + index.json) for training without the encoder. Images get "
        "eval-mode resizing only: no augmentation.",
    )
    parser.add_argument("--model", required=True, help="a BLIP-2 model folder (any stage; only the vision tower runs)")
    parser.add_argument("--processor", help="processor folder (default: --model)")
    parser.add_argument("--data", required=True, nargs="+", help="caption data source(s)")
    parser.add_argument("--image-root", help="folder that relative image paths are relative to")
    parser.add_argument("--output", required=True, help="cache folder to create")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="stored dtype")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard")
    parser.add_argument("--device", help="where the encoder runs (default: cuda when available, else cpu)")
    parser.add_argument(
        "--model-dtype",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="dtype the model is loaded and the encoder run in; auto: the frozen towers' dtype training uses on the "
        "device (fp32 on CPU; fp16 on GPU, as LAVIS runs the frozen ViT)",
    )
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`blip2-hf-cache-features --model DIR --data SOURCE [SOURCE ...] [--image-root DIR] --output DIR
    [--batch-size N] [--dtype fp16|bf16|fp32]` (see `--help` for the rest). Returns 0, or 1 after a one-line error
    on stderr for the usual mistakes (a missing model, data file or image folder, unreadable data, an existing
    --output)."""
    args = _parser().parse_args(argv)
    try:
        _check_paths(args)
        return _run(args)
    except (OSError, ValueError) as err:  # FileNotFoundError, FileExistsError, JSON errors: the user's to fix
        print(f"blip2-hf-cache-features: error: {err}", file=sys.stderr)
        return 1


def _check_paths(args: argparse.Namespace) -> None:
    """Fail before loading anything: the model is a folder, the output free (or --overwrite), the image root a
    folder."""
    for flag, folder in (("--model", args.model), ("--processor", args.processor), ("--image-root", args.image_root)):
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"{flag} {folder}: no such folder")
    if Path(args.output).exists() and not args.overwrite:
        raise FileExistsError(f"--output {args.output} exists; pass --overwrite to replace it")


def _run(args: argparse.Namespace) -> int:
    from .processing_blip2 import Blip2Processor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dataset = load_sources(args.data, image_root=args.image_root)  # the data first: its errors come cheap
    model = load_model_for_cache(args.model, dtype=args.model_dtype, device=device)
    processor = Blip2Processor.from_pretrained(args.processor or args.model)
    build_feature_cache(
        model,
        dataset,
        processor,
        args.output,
        batch_size=args.batch_size,
        dtype=args.dtype,
        shard_size=args.shard_size,
        device=device,
        progress=not args.no_progress,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        source={"data": list(args.data), "image_root": args.image_root, "model": str(args.model)},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
