"""Publishing: a model card built from a trained folder and the evaluation scripts' `results.json` files, and one
atomic Hub commit that carries everything a user needs to load the model where `blip2_hf` is not installed.

- `build_model_card(folder, repo_id, results)` renders the Jinja2 template shipped in `blip2_hf/templates/`
  (`model_cards/blip2.md` in the repository is the same file, to copy and edit; pass `template_path=`). Metadata
  (`library_name`, `pipeline_tag`, `base_model`, `datasets`, `tags`, `license`) and the `model-index` come from
  `huggingface_hub.ModelCardData` + `EvalResult`: transformers' own `Trainer` card keeps neither image-to-text nor VQA
  results, nor CIDEr/SPICE.
- `push_folder(folder, repo_id)` creates the repo (`exist_ok`) and publishes the folder in ONE `create_commit`:
  safetensors weights, `config.json` with the complete `auto_map` and `image-to-text` pipeline entry, the remote code,
  processor and tokenizer files (`qformer_tokenizer/` included) and the generated README.md. The Hub applies a commit
  whole or not at all, so a failed push never leaves a half-published model.

A LoRA folder (what `training/stage2.py --lora_r N` writes: the base model with the trained Q-Former, plus
`adapter_config.json` / `adapter_model.safetensors`) is published either merged (`merge_lora=True`: a plain full
checkpoint) or as the adapter whose `base_model_name_or_path` is a Hub repo holding the folder's base model
(`base_models=[REPO_ID]`, published there first with `push_base=True`): peft records `None` or a local path there, and
`from_pretrained(repo_id)` follows it.

`write_training_run(output_dir, ...)` is what the training scripts call to record the run (`training_run.json`: the
script, its arguments, data sources and steps); the card's training section is read from it.

`model.push_to_hub(...)` / `processor.push_to_hub(...)` need nothing from here: our `save_pretrained` adds the remote
code and `auto_map`, and transformers' `PushToHubMixin` saves through it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import transformers
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub import get_token as get_stored_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import get_session, validate_repo_id

from . import __version__, modeling_blip2
from .configuration_blip2 import Blip2Config, Blip2VisionConfig
from .constants import DEFAULT_LICENSE, DEFAULT_TEMPLATE, HUB_TIMEOUT
from .remote_code import REMOTE_CODE_FILES, has_complete_auto_map, set_auto_map

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).parent
# A flat JSON of hyperparameters beside the weights, shown as the card's training recipe when present.
RECIPE_FILE = "training_recipe.json"
# What the training scripts record about their run (`write_training_run`); the card's training section.
TRAINING_RUN_FILE = "training_run.json"
# peft's adapter files: a folder with ADAPTER_CONFIG is a LoRA folder.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin")
PROCESSOR_CODE_FILE = "processing_blip2.py"
# `constants.HUB_TIMEOUT`: seconds every Hub request of a push may wait (huggingface_hub's shared HTTP client waits
# forever by default, so an endpoint that accepts connections and never answers hung `push`).
DEFAULT_HUB_TIMEOUT = HUB_TIMEOUT

# config.json `architectures[0]` -> (the card's kind, the Hub pipeline tag). Stage 1 and retrieval map to zero-shot-image-classification, the task transformers serves Blip2ForImageTextRetrieval
# with (the Hub has no image-text-retrieval pipeline tag).
ARCHITECTURES = {
    "Blip2ForConditionalGeneration": ("stage2", "image-text-to-text"),
    "Blip2Model": ("stage2", "image-text-to-text"),
    "Blip2ForPreTraining": ("stage1", "zero-shot-image-classification"),
    "Blip2ForImageTextRetrieval": ("retrieval", "zero-shot-image-classification"),
}
BASE_TAGS = {
    "stage2": ["blip-2", "blip2-hf", "vision-language", "image-captioning", "visual-question-answering"],
    "stage1": ["blip-2", "blip2-hf", "vision-language", "q-former", "image-text-retrieval", "image-captioning"],
    "retrieval": ["blip-2", "blip2-hf", "vision-language", "image-text-retrieval"],
}

# Files a folder must not publish: pickles can run code when loaded (safetensors only). Training state written by
# `Trainer` is never part of a model repo and is left out rather than refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
TRAINING_STATE = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth")
SKIPPED_DIRS = ("checkpoint-*", "runs", "__pycache__", ".*")
# Weight files a re-push replaces: stale ones are deleted in the same commit so that no loader finds a mix.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")

# ---------------------------------------------------------------------------------------------------------------------
# Evaluation results -> EvalResult (model-index)
# ---------------------------------------------------------------------------------------------------------------------

# results.json `dataset` of a benchmark run -> (dataset name on the card, default split). The evaluation scripts
# record a benchmark only when `--benchmark` checked the official files (see evaluation/common.py); anything else is
# `"dataset": "custom"` with the file's name, and is shown as such.
VQA_DATASETS = {"vqav2": "VQAv2", "okvqa": "OK-VQA", "gqa": "GQA"}
CAPTION_DATASETS = {"coco": ("COCO Karpathy", "test"), "nocaps": ("NoCaps", "validation")}
RETRIEVAL_DATASETS = {"coco": ("COCO Karpathy 5K", "test"), "flickr30k": ("Flickr30K 1K", "test")}
BENCHMARKS = {"vqa": VQA_DATASETS, "caption": CAPTION_DATASETS, "retrieval": RETRIEVAL_DATASETS}
CUSTOM_DATASET = "custom"
# blip2_hf.metrics.coco_caption_scores key -> (model-index metric type, display name); values are its `_x100` keys.
CAPTION_METRICS = {"CIDEr": ("cider", "CIDEr"), "Bleu_4": ("bleu", "BLEU-4"), "SPICE": ("spice", "SPICE")}
RETRIEVAL_METRIC = re.compile(r"^(?P<direction>txt|img)_r(?P<k>\d+)$")


def _score(value: Any) -> float | None:
    """A metric value as the card shows it (2 decimals), None for a metric that was not computed."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return round(float(value), 2)


def _dataset_of(data: dict[str, Any], path: Path) -> tuple[str, str, str | None]:
    """`(dataset_type, dataset_name, split)` of one results.json for the model-index. A benchmark only when the
    evaluation recorded that it ran the benchmark (`"benchmark"`, written by `--benchmark`); otherwise `custom`,
    named by the evaluated file, and no split (a custom file's split is not a benchmark's)."""
    task, dataset, benchmark = data.get("task"), data.get("dataset"), data.get("benchmark")
    settings = data.get("settings") or {}
    known = BENCHMARKS[task]
    if benchmark is not None:
        if benchmark != dataset or benchmark not in known:
            raise ValueError(
                f"{path}: benchmark {benchmark!r} with dataset {dataset!r}; expected one of {sorted(known)} for "
                f"{task} (as evaluation/{task}.py --benchmark writes it)."
            )
        name = known[benchmark] if task == "vqa" else known[benchmark][0]
        default_split = None if task == "vqa" else known[benchmark][1]
        return str(benchmark), name, data.get("split") or settings.get("split") or default_split
    if dataset in known:  # a results.json written before benchmarks were checked: it cannot prove it ran one
        logger.warning(
            "%s labels its data %r but does not record a benchmark run (`benchmark`): shown as custom data. "
            "Re-run the evaluation with --benchmark %s on the official files to publish it as that benchmark.",
            path,
            dataset,
            dataset,
        )
    file = data.get("dataset_file") or settings.get("questions") or settings.get("annotations")
    return CUSTOM_DATASET, Path(str(file)).name if file else "custom data", None


def _caption_results(
    metrics: dict[str, Any], dataset_type: str, name: str, config: str | None, split: str | None
) -> list[EvalResult]:
    """Caption CIDEr / BLEU-4 / SPICE (x100) entries: overall and, for NoCaps-style results, per domain."""
    results = []
    # {"overall": scores, "<domain>": scores} (NoCaps adds its domains); a flat dict of scores is the overall.
    parts = metrics if isinstance(metrics.get("overall"), dict) else {"overall": metrics}
    for part, scores in parts.items():
        if not isinstance(scores, dict):
            continue
        for key, (metric_type, metric_name) in CAPTION_METRICS.items():
            raw = scores.get(key)
            value = _score(scores.get(f"{key}_x100", None if raw is None else 100.0 * raw))
            if value is None:  # SPICE skipped, METEOR off, ...
                continue
            results.append(
                EvalResult(
                    task_type="image-to-text",
                    task_name="Image Captioning",
                    dataset_type=dataset_type,
                    dataset_name=name if part == "overall" else f"{name} ({part})",
                    dataset_config=config if part == "overall" else ", ".join(filter(None, (config, part))),
                    dataset_split=split,
                    metric_type=metric_type,
                    metric_name=metric_name,
                    metric_value=value,
                )
            )
    return results


def eval_results_from_json(path: str | os.PathLike) -> list[EvalResult]:
    """The model-index entries of one evaluation `results.json` (`evaluation/{vqa,caption,retrieval}.py`; a folder
    means its `results.json`). VQA accuracy -> visual-question-answering; caption CIDEr / BLEU-4 / SPICE (x100, as
    the paper prints them) -> image-to-text, NoCaps also per domain; retrieval TR@K / IR@K -> image-text-retrieval.
    The dataset is a benchmark (VQAv2, COCO Karpathy, ...) only when the evaluation recorded running it
    (`"benchmark"`); any other data is `custom`, named by its file. A run without scores (predictions only) gives
    none."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results file (write one with evaluation/vqa.py, caption.py, ...).")
    data = json.loads(path.read_text(encoding="utf-8"))
    task, metrics = data.get("task"), data.get("metrics")
    if task not in ("vqa", "caption", "retrieval"):
        raise ValueError(
            f"{path}: unknown task {task!r}; expected a results.json of evaluation/vqa.py, caption.py or "
            "retrieval.py ('task': 'vqa' | 'caption' | 'retrieval')."
        )
    if not metrics:
        logger.warning("%s has no scores (%s run without references): nothing for the model card.", path, task)
        return []
    dataset_type, name, split = _dataset_of(data, path)
    # The model-index groups entries by (task, dataset type, config, split): two custom files would merge under one
    # name unless the file is also the config.
    config = name if dataset_type == CUSTOM_DATASET else None
    results: list[EvalResult] = []

    if task == "vqa":
        accuracy = _score(metrics.get("accuracy"))
        if accuracy is not None:
            results.append(
                EvalResult(
                    task_type="visual-question-answering",
                    task_name="Visual Question Answering",
                    dataset_type=dataset_type,
                    dataset_name=name,
                    dataset_config=config,
                    dataset_split=split,
                    metric_type="accuracy",
                    metric_name="Accuracy (exact match)" if dataset_type == "gqa" else "VQA accuracy",
                    metric_value=accuracy,
                )
            )
    elif task == "caption":
        results += _caption_results(metrics, dataset_type, name, config, split)
    else:  # retrieval
        for key, raw in metrics.items():
            match, value = RETRIEVAL_METRIC.match(key), _score(raw)
            if match is None or value is None:
                continue
            direction = "TR" if match["direction"] == "txt" else "IR"  # image->text (text retrieval) / text->image
            results.append(
                EvalResult(
                    task_type="image-text-retrieval",
                    task_name="Image-Text Retrieval",
                    dataset_type=dataset_type,
                    dataset_name=name,
                    dataset_config=config,
                    dataset_split=split,
                    metric_type="recall",
                    metric_name=f"{direction}@{match['k']}",
                    metric_config=key,
                    metric_value=value,
                )
            )
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Reading a folder
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class FolderInfo:
    """What the card and the push need to know about a saved folder, read from its config.json alone."""

    folder: Path
    config: dict[str, Any]
    architecture: str
    kind: str  # "stage2" | "stage1" | "retrieval"
    pipeline_tag: str
    recorded_base_models: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, folder: str | os.PathLike) -> FolderInfo:
        folder = Path(folder)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise PushError(f"{folder} has no config.json: save the model with `save_pretrained(folder)` first.")
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("model_type") not in ("blip2_hf", "blip-2"):
            raise PushError(f"{folder} is not a BLIP-2 folder (model_type {config.get('model_type')!r}).")
        architecture = (config.get("architectures") or ["Blip2ForConditionalGeneration"])[0]
        if architecture not in ARCHITECTURES:
            raise PushError(
                f"{folder}: unsupported architecture {architecture!r} (expected one of {list(ARCHITECTURES)})."
            )
        kind, pipeline_tag = ARCHITECTURES[architecture]
        # Sub-configs keep the `_name_or_path` of the checkpoint they came from (stage 2 takes the LLM's config):
        # a Hub id there is a base model; a local path is not publishable and is skipped.
        recorded = [
            (config.get(sub) or {}).get("_name_or_path") for sub in ("vision_config", "text_config", "qformer_config")
        ]
        return cls(folder, config, architecture, kind, pipeline_tag, [n for n in recorded if _is_hub_id(n)])


def _is_hub_id(name: Any) -> bool:
    if not isinstance(name, str) or "/" not in name or os.path.exists(name) or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# How the card names the image encoder families (by `vision_config.model_type`); others by their model_type.
VISION_FAMILY_NAMES = {
    "clip_vision_model": "CLIP", "siglip_vision_model": "SigLIP", "siglip2_vision_model": "SigLIP 2",
    "dinov2": "DINOv2", "dinov2_with_registers": "DINOv2 with registers", "convnext": "ConvNeXt",
    "convnextv2": "ConvNeXt V2",
}  # fmt: skip


def _describe_vision(config: Blip2Config) -> str:
    """The card's image encoder line: our EVA ViT as before; another family by its name, depth, width, image size
    and which of its outputs the Q-Former reads."""
    vision = config.vision_config
    if vision.model_type == Blip2VisionConfig.model_type:
        return (
            f"ViT, {vision.num_hidden_layers} layers, width {vision.hidden_size}, "
            f"{vision.image_size}px images in {vision.patch_size}px patches"
        )
    family = VISION_FAMILY_NAMES.get(vision.model_type, vision.model_type)
    depths = getattr(vision, "depths", None)
    depth = f"{len(depths)} stages" if depths else f"{vision.num_hidden_layers} layers"
    image_size = config.vision_image_size
    images = f"{image_size[0]}x{image_size[1]}px images" if image_size else "images of any size"
    patch = f" in {vision.patch_size}px patches" if getattr(vision, "patch_size", None) else ""
    layer = "last hidden state" if config.vision_feature_layer == -1 else f"hidden state {config.vision_feature_layer}"
    return (
        f"{family} ({vision.model_type}), {depth}, width {config.vision_hidden_size}, {images}{patch}; the Q-Former "
        f"reads its {layer}, {config.vision_feature_select_strategy} tokens"
    )


def _describe_towers(config: Blip2Config, kind: str) -> dict[str, str]:
    """One line per tower for the card; the LLM only for stage 2 (a stage-1 config keeps an unused text_config)."""
    qformer = config.qformer_config
    text = config.text_config if kind == "stage2" else None
    towers = {
        "vision": _describe_vision(config),
        "qformer": f"{qformer.num_hidden_layers} layers, width {qformer.hidden_size}, "
        f"{config.num_query_tokens} learned queries, cross-attention every {qformer.cross_attention_frequency} layers",
    }
    if text is not None:
        layers = getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers", None)
        width = getattr(text, "hidden_size", None) or getattr(text, "d_model", None)
        towers["llm"] = f"{text.model_type}, {layers} layers, width {width}, vocabulary {text.vocab_size}"
    return towers


# TrainingArguments a run record keeps (the rest are logging and I/O settings, not the recipe).
RECORDED_TRAINING_ARGS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "num_train_epochs", "seed", "bf16",
    "fp16", "max_grad_norm",
)  # fmt: skip
# Model arguments of the training scripts that name a model to start from (recorded with whether they were local).
MODEL_SOURCE_ARGS = (
    "model_name_or_path", "stage1_name_or_path", "language_model_name_or_path", "config_name",
    "vision_model_name_or_path", "bert_name_or_path",
)  # fmt: skip


def write_training_run(
    output_dir: str | os.PathLike,
    script: str,
    arguments: Sequence[Any],
    state: Any,
    num_processes: int = 1,
) -> Path:
    """Record a finished training run as `output_dir/training_run.json`, which the model card's training section is
    built from: the script, its model and data arguments (dataclasses), the recipe's `TrainingArguments`, the data
    sources, where each starting model came from (a local path or a Hub id), and the steps, epochs and last loss of
    the Trainer's `state` (`transformers.TrainerState`)."""
    args: dict[str, Any] = {}
    for group in arguments:
        values = group.to_dict() if hasattr(group, "to_dict") else dataclasses.asdict(group)
        if "per_device_train_batch_size" in values:  # TrainingArguments: the recipe only
            values = {k: values[k] for k in RECORDED_TRAINING_ARGS if k in values}
        args.update(values)
    weights = args.get("train_data_weights") or [None] * len(args.get("train_data") or [])
    data = [{"source": str(source), "weight": weight} for source, weight in zip(args.get("train_data") or [], weights)]
    if args.get("feature_cache"):
        data.append({"source": str(args["feature_cache"]), "weight": None, "feature_cache": True})
    models = {
        key: {"name": str(args[key]), "local": os.path.exists(str(args[key]))}
        for key in MODEL_SOURCE_ARGS
        if args.get(key)
    }
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    record = {
        "script": script,
        "arguments": args,
        "data": data,
        "models": models,
        "num_processes": num_processes,
        "global_batch_size": (args.get("per_device_train_batch_size") or 0)
        * (args.get("gradient_accumulation_steps") or 1)
        * num_processes,
        "steps": state.global_step,
        "epochs": state.epoch,
        "last_logged_loss": losses[-1] if losses else None,
        # the Trainer's closing entry: the mean loss over the run (logged even when no step was)
        "mean_train_loss": next((e["train_loss"] for e in state.log_history if "train_loss" in e), None),
    }
    path = Path(output_dir) / TRAINING_RUN_FILE
    path.write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    return path


def _read_training_run(folder: Path) -> dict[str, Any] | None:
    path = folder / TRAINING_RUN_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or not isinstance(record.get("arguments"), dict):
        raise ValueError(f"{path}: not a training record (expected {{'script', 'arguments', ...}} as written by "
                         "blip2_hf.hub.write_training_run).")  # fmt: skip
    return record


def _local_model_names(record: dict[str, Any] | None) -> set[str]:
    """The starting models the run loaded from local paths: never a card's `base_model`, even where a relative path
    looks like a Hub id (`tiny_work/opt`)."""
    return {entry["name"] for entry in ((record or {}).get("models") or {}).values() if entry.get("local")}


def _run_rows(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The card's rows for a `training_run.json`: what the run started from, its data and recipe, and its steps."""
    args = record["arguments"]
    rows = [("script", f"`{record.get('script')}`")]
    for key, entry in (record.get("models") or {}).items():
        name = entry["name"]
        rows.append((key, f"a local folder (`{Path(name).name}`)" if entry.get("local") else f"`{name}`"))
    sources = [
        f"`{Path(d['source']).name}`" + (" (frozen-feature cache)" if d.get("feature_cache") else "")
        + (f" (weight {d['weight']})" if d.get("weight") is not None else "")
        for d in record.get("data") or []
    ]  # fmt: skip
    rows.append(("training data", ", ".join(sources) or "not recorded"))
    if args.get("lora_r"):
        targets = args.get("lora_target_modules") or "the LLM's q/v projections"
        qformer = ", and the Q-Former's query/value" if args.get("lora_qformer") else ""
        rows.append(("LoRA", f"r={args['lora_r']}, alpha={args.get('lora_alpha')} on {targets}{qformer}"))
    by_steps = (args.get("max_steps") or -1) > 0  # max_steps overrides num_train_epochs (TrainingArguments)
    for key in ("prompt", "max_length", "augment", *RECORDED_TRAINING_ARGS):
        value = args.get(key)
        if value in (None, "") or key == ("num_train_epochs" if by_steps else "max_steps"):
            continue
        rows.append((key, f"`{value}`" if isinstance(value, str) else json.dumps(value)))
    loss, mean = record.get("last_logged_loss"), record.get("mean_train_loss")
    for key, value in (
        ("processes", record.get("num_processes")),
        ("global batch size", record.get("global_batch_size")),
        ("optimizer steps", record.get("steps")),
        ("epochs", _score(record.get("epochs"))),
        ("last logged training loss", None if loss is None else f"{loss:.4f}"),
        ("mean training loss", None if mean is None else f"{mean:.4f}"),
    ):
        if value is not None:
            rows.append((key, str(value)))
    return rows


def _training_recipe(folder: Path) -> tuple[list[tuple[str, str]], str | None]:
    """`(rows, source)` of the training shown on the card: the run's `training_run.json` (written by the training
    scripts), else `training_recipe.json` (any flat JSON of hyperparameters) and/or a `trainer_state.json` (the
    folder's, else its latest `checkpoint-*`'s). Never `training_args.bin`: unpickling runs arbitrary code."""
    record = _read_training_run(folder)
    if record is not None:
        return _run_rows(record), TRAINING_RUN_FILE
    rows: list[tuple[str, str]] = []
    sources = []
    recipe_file = folder / RECIPE_FILE
    if recipe_file.is_file():
        recipe = json.loads(recipe_file.read_text(encoding="utf-8"))
        if isinstance(recipe, dict):
            rows += [(str(k), v if isinstance(v, str) else json.dumps(v)) for k, v in recipe.items()]
            sources.append(RECIPE_FILE)
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        checkpoints = sorted(folder.glob("checkpoint-*/trainer_state.json"), key=lambda p: _step(p.parent.name))
        state_file = checkpoints[-1] if checkpoints else state_file
    if state_file.is_file():
        state = json.loads(state_file.read_text(encoding="utf-8"))
        history = state.get("log_history") or []
        losses = [entry["loss"] for entry in history if "loss" in entry]
        rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
        for key, value in (
            ("optimizer steps", state.get("global_step")),
            ("epochs", _score(state.get("epoch"))),
            ("batch size per device", state.get("train_batch_size")),
            ("peak learning rate (logged)", f"{max(rates):.3g}" if rates else None),
            ("last logged training loss", f"{losses[-1]:.4f}" if losses else None),
        ):
            if value is not None:
                rows.append((key, str(value)))
        sources.append(str(state_file.relative_to(folder)))
    return rows, ", ".join(sources) or None


def _step(name: str) -> int:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


# ---------------------------------------------------------------------------------------------------------------------
# The card
# ---------------------------------------------------------------------------------------------------------------------


def build_model_card(
    folder: str | os.PathLike,
    repo_id: str,
    results: Sequence[str | os.PathLike] | None = None,
    *,
    license: str = DEFAULT_LICENSE,
    datasets: Sequence[str] | None = None,
    base_models: Sequence[str] | None = None,
    tags: Sequence[str] | None = None,
    language: str | None = "en",
    model_name: str | None = None,
    template_path: str | os.PathLike | None = None,
    adapter_base: str | None = None,
) -> ModelCard:
    """The model card of a saved BLIP-2 folder, to publish as `repo_id`.

    Args:
        folder: a `save_pretrained` folder (stage 2 `Blip2ForConditionalGeneration`, stage 1 `Blip2ForPreTraining`
            or `Blip2ForImageTextRetrieval`); its config.json gives the pipeline tag, the towers and the base models
            it records, its `training_run.json` (else `training_recipe.json` / `trainer_state.json`) the training.
        repo_id: where it is published (`namespace/name`), used in the usage snippets.
        results: evaluation `results.json` files (or folders holding one) -> the `model-index`. None or no scores:
            no model-index, and the card says that nothing was evaluated.
        license: a Hub license id.
        datasets: Hub ids of the training datasets.
        base_models: Hub ids of the vision encoder / LLM / stage-1 model, added to those the config records (minus
            the models the training run loaded from local paths).
        tags: more tags, after the BLIP-2 ones.
        language: the text language(s).
        model_name: the `model-index` name and the card title (default: the repo name).
        template_path: a Jinja2 template to use instead of the shipped one (see `model_cards/README.md`).
        adapter_base: the card of a LoRA adapter repo: the Hub repo of the base model it applies to, its only
            `base_model`.
    """
    info = FolderInfo.read(folder)
    config = Blip2Config.from_pretrained(info.folder)
    eval_results = [entry for path in results or () for entry in eval_results_from_json(path)]
    name = model_name or repo_id.split("/")[-1]
    local = _local_model_names(_read_training_run(info.folder))
    if adapter_base is not None:
        base = [adapter_base]
    else:
        base = [m for m in dict.fromkeys([*info.recorded_base_models, *(base_models or ())]) if m not in local]
    for model_id in base:
        if not _is_hub_id(model_id):
            raise ValueError(f"base model {model_id!r} is not a Hub repo id (namespace/name).")
    card_data = ModelCardData(
        # model-index needs a model name; without results the card carries none (no empty model-index).
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
        library_name="peft" if adapter_base else "transformers",
        pipeline_tag=info.pipeline_tag,
        base_model=(base[0] if len(base) == 1 else base) or None,
        datasets=list(datasets) if datasets else None,
        tags=[*BASE_TAGS[info.kind], *(("lora", "peft") if adapter_base else ()), *(tags or ())],
        license=license,
        language=language,
    )
    recipe, recipe_source = _training_recipe(info.folder)
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path or DEFAULT_TEMPLATE),
        title=name,
        repo_id=repo_id,
        kind=info.kind,
        architecture=info.architecture,
        towers=_describe_towers(config, info.kind),
        num_query_tokens=config.num_query_tokens,
        decoder_only=bool(info.kind == "stage2" and config.use_decoder_only_language_model),
        base_models=base,
        adapter_base=adapter_base,
        results=eval_results,
        custom_results=any(r.dataset_type == CUSTOM_DATASET for r in eval_results),
        recipe=recipe,
        recipe_source=recipe_source,
        lora_trained=adapter_base is not None or any(key == "LoRA" for key, _ in recipe),
        blip2_hf_version=__version__,
        transformers_version=transformers.__version__,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------------------------------------


class PushError(RuntimeError):
    """Publishing failed; the message says why and what to do. Never contains the token."""


class HubAuthError(PushError, PermissionError):
    """No token, a token the Hub refuses (401), or one without the right to write the repo (403)."""


@contextmanager
def hub_timeout(seconds: float | None) -> Iterator[None]:
    """Within the block, every request of huggingface_hub's shared HTTP client (`get_session()`) waits at most
    `seconds` to connect and for each read or write (None: forever, the client's default); restored afterwards. A
    slow upload that keeps moving is not cut: the limit is per wait, not on the whole transfer. Xet uploads go
    through hf_xet, which has its own timeouts."""
    session = get_session()
    saved = session.timeout
    session.timeout = seconds  # the client's setter accepts a number (one limit for connect, read, write, pool)
    try:
        yield
    finally:
        session.timeout = saved


def _http_library() -> Any:
    """The module of huggingface_hub's HTTP client (`httpx`, or its `httpx2` fork from huggingface_hub 2 on), whose
    `TransportError` / `TimeoutException` are what a refused connection or a silent server raise."""
    return importlib.import_module(type(get_session()).__module__.split(".")[0])


def _network_failure(repo_id: str, step: str, err: Exception) -> str:
    """One line for a request that got no HTTP answer: the endpoint, the request, and what to check."""
    try:
        request = f" ({err.request.method} {err.request.url.path})"
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError when the error carries no request
        request = ""
    endpoint = huggingface_hub.constants.ENDPOINT
    if isinstance(err, _http_library().TimeoutException):
        limit = get_session().timeout.read
        what = f"the Hub at {endpoint} did not answer within {limit:g} s" if limit else f"timeout at {endpoint}"
    else:
        what = f"cannot reach the Hub at {endpoint}: {type(err).__name__}: {err}"
    return (
        f"Could not {step} {repo_id}: {what}{request}. Check the network and HF_ENDPOINT (or raise --timeout / "
        "`timeout=`)."
    )


@contextmanager
def _explained_hub_errors(repo_id: str, step: str) -> Iterator[None]:
    """Turn the Hub's HTTP errors into messages that name the repo and the missing right. The token is never part
    of them: huggingface_hub's errors carry the URL and the server's message, not the request headers."""
    try:
        yield
    except PushError:
        raise
    except Exception as err:
        if isinstance(err, _http_library().TransportError):  # refused, reset, timed out: no HTTP answer at all
            raise PushError(_network_failure(repo_id, step, err)) from None
        if not isinstance(err, HfHubHTTPError):
            raise
        status = err.response.status_code if err.response is not None else None
        server = err.response.headers.get("X-Error-Message") if err.response is not None else None
        said = f" The Hub said: {server}" if server else ""
        if status == 401:
            raise HubAuthError(
                f"The Hub refused the token while trying to {step} {repo_id} (401 Unauthorized): it is invalid, "
                f"expired or revoked. Log in again with `hf auth login` or set HF_TOKEN to a valid token with write "
                f"access.{said}"
            ) from None
        if status == 403:
            namespace = repo_id.split("/")[0] if "/" in repo_id else "your namespace"
            raise HubAuthError(
                f"The token may not {step} {repo_id} (403 Forbidden): it lacks write access to the namespace "
                f"{namespace!r}. Use a token with the 'write' role, or a fine-grained token allowed to write repos "
                f"of {namespace!r} (and be a member of that organization with write rights).{said}"
            ) from None
        raise PushError(
            f"Could not {step} {repo_id}: {type(err).__name__} (HTTP {status}).{said} Nothing was published by this "
            f"step: a commit is applied whole or not at all."
        ) from err


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch(name, pattern) for pattern in patterns)


def _folder_files(folder: Path, allow_pickle: bool) -> dict[str, Path]:
    """`{path in repo: local path}` of what the folder publishes. Checkpoints, logs, hidden files, a README.md (the
    card replaces it) and Trainer state are left out; any other pickle is refused unless `allow_pickle`."""
    files, skipped, pickles = {}, [], []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(_matches(part, SKIPPED_DIRS) for part in relative.parts[:-1]) or not path.is_file():
            continue
        name = relative.as_posix()
        if name == "README.md" or relative.name.startswith("."):
            continue
        if _matches(relative.name, TRAINING_STATE):
            skipped.append(name)
        elif relative.name.endswith(PICKLE_SUFFIXES) and not allow_pickle:
            pickles.append(name)
        else:
            files[name] = path
    if skipped:
        logger.info("Not published (training state, not part of the model): %s", ", ".join(skipped))
    if pickles:
        raise PushError(
            f"{folder} holds pickled files: {', '.join(pickles)}. Only safetensors are published (a pickle runs code "
            f"when loaded). Re-save the model with `save_pretrained` (safetensors by default) and remove them, or "
            f"pass allow_pickle=True (`--allow-pickle`) to publish them anyway."
        )
    if not any(_matches(name, WEIGHT_PATTERNS) for name in files):
        raise PushError(f"{folder} has no safetensors weights (model.safetensors or an index with shards).")
    _refuse_nonfinite_weights(folder, files)
    return files


def _refuse_nonfinite_weights(folder: Path, files: dict[str, Path]) -> None:
    """A folder whose safetensors (model or adapter) hold a NaN/inf tensor is a diverged model: refused, naming the
    tensors. Read one tensor at a time (never the whole model in memory); pickles are not read."""
    from safetensors import safe_open

    bad = []
    for name, path in files.items():
        if name.endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as weights:
                for key in weights.keys():
                    if modeling_blip2.nonfinite_tensor_names({key: weights.get_tensor(key)}):
                        bad.append(f"{name}:{key}")
    if bad:
        raise PushError(
            f"{folder}: {len(bad)} tensor(s) hold NaN or inf values ({modeling_blip2.name_some(bad)}): the model "
            f"diverged; not published."
        )


def _completed_config(info: FolderInfo) -> bytes | None:
    """config.json with the complete `auto_map` and, for models that generate, the `image-to-text` pipeline entry;
    None when the folder's config already has them. A folder saved by transformers' BLIP-2 (or an older save) is
    completed through our `Blip2Config`, as our `save_pretrained` would have written it."""
    config = info.config
    generates = getattr(modeling_blip2, info.architecture).can_generate()
    if has_complete_auto_map(config, generates):
        return None
    logger.warning(
        "%s/config.json lacks the complete auto_map%s: publishing it completed (the local folder is unchanged).",
        info.folder,
        " or the image-to-text pipeline entry" if generates else "",
    )
    fixed = Blip2Config.from_pretrained(info.folder)
    fixed.architectures = config.get("architectures") or [info.architecture]
    set_auto_map(fixed, generates)
    return fixed.to_json_string().encode("utf-8")


def _processor_files(folder: Path, staging: Path) -> dict[str, Path]:
    """Processor files to publish instead of the folder's when they cannot load as remote code (no `auto_map` or no
    processing_blip2.py): the processor re-saved by our class into `staging`. Empty when nothing needs fixing."""
    processor_config = folder / "processor_config.json"
    if not processor_config.is_file():
        logger.warning(
            "%s has no processor_config.json: AutoProcessor and pipeline() will not load from the repo. Save the "
            "processor into the folder (`processor.save_pretrained(folder)`) to publish it.",
            folder,
        )
        return {}
    auto_map = json.loads(processor_config.read_text(encoding="utf-8")).get("auto_map") or {}
    if "AutoProcessor" in auto_map and (folder / PROCESSOR_CODE_FILE).is_file():
        return {}
    from .processing_blip2 import Blip2Processor

    logger.warning("%s: the processor carries no remote code; publishing it re-saved by Blip2Processor.", folder)
    Blip2Processor.from_pretrained(folder).save_pretrained(staging)
    return {path.relative_to(staging).as_posix(): path for path in staging.rglob("*") if path.is_file()}


# ---------------------------------------------------------------------------------------------------------------------
# LoRA folders: merged, or the adapter with a base model on the Hub
# ---------------------------------------------------------------------------------------------------------------------


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's peft `adapter_config.json`, None when it is not a LoRA folder."""
    path = Path(folder) / ADAPTER_CONFIG
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def lora_base_repo(folder: str | os.PathLike, base_models: Sequence[str] | None) -> str:
    """The Hub repo an adapter push names as `base_model_name_or_path`: the one `base_models` entry. Refuses, naming
    what to do, when there is none, several, or a local path / None (what peft records for our models): a repo
    loaded by id resolves its base from the Hub, so a local path there is a 404 for everyone else."""
    recorded = (read_adapter_config(folder) or {}).get("base_model_name_or_path")
    options = (
        "Publish merged weights instead (`--merge-lora` / merge_lora=True), or name the Hub repo of the base model "
        "with `--base-model NAMESPACE/NAME` (base_models=[...]) and add `--push-base` (push_base=True) to publish "
        "the folder's base model (its trained Q-Former and the LLM without the adapter) there first."
    )
    if not base_models:
        raise PushError(
            f"{folder} is a LoRA folder whose adapter records base_model_name_or_path={recorded!r}, which does not "
            f"resolve on the Hub: loading the pushed adapter by repo id would fail. {options}"
        )
    if len(base_models) != 1:
        raise PushError(f"A LoRA adapter has one base model; got --base-model {list(base_models)}. {options}")
    (base,) = base_models
    if not _is_hub_id(base):
        raise PushError(
            f"--base-model {base!r} is a local path or not a Hub repo id (namespace/name): the adapter's base "
            f"must resolve from the Hub. {options}"
        )
    return base


def merge_lora_folder(folder: str | os.PathLike, output: str | os.PathLike, allow_pickle: bool = False) -> Path:
    """Write the LoRA folder's model with the adapter merged into its weights (peft `merge_and_unload`) to `output`:
    a plain full checkpoint (safetensors, config with the remote code), beside the folder's processor, tokenizer and
    training-record files. Returns `output`."""
    from peft import PeftModel

    folder, output = Path(folder), Path(output)
    info = FolderInfo.read(folder)
    model_class = getattr(modeling_blip2, info.architecture)
    files = _folder_files(folder, allow_pickle)
    model_files = {"config.json", "generation_config.json"}
    with tempfile.TemporaryDirectory() as base_dir:
        # The base alone (no adapter_config.json beside it), or transformers would inject the adapter itself.
        for name, path in files.items():
            if name in model_files or _is_model_weight(name):
                shutil.copy(path, Path(base_dir) / name)
        base = model_class.from_pretrained(base_dir)
        merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    merged.save_pretrained(output)
    skip = (*ADAPTER_FILES, *model_files, *REMOTE_CODE_FILES)
    for name, path in files.items():
        if name not in skip and not _is_model_weight(name):
            (output / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, output / name)
    return output


def _is_model_weight(name: str) -> bool:
    """A weight file of the model itself (`*.safetensors` and their index), not the adapter's."""
    return _matches(name, WEIGHT_PATTERNS) and name not in ADAPTER_FILES


def _file_hashes(path: Path) -> tuple[str, str]:
    """`(git blob sha1, sha256)` of a file: the Hub reports the first for regular files, the second for LFS ones."""
    blob, sha = hashlib.sha1(f"blob {path.stat().st_size}\0".encode()), hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            blob.update(chunk)
            sha.update(chunk)
    return blob.hexdigest(), sha.hexdigest()


def _check_base_repo(api: HfApi, base_repo: str, files: dict[str, Path], folder: Path) -> None:
    """Refuse an adapter push whose `base_repo` does not hold this folder's base weights: stage 2 trains the Q-Former
    beside the adapter, so any other base (the original BLIP-2, an older push) would give other outputs."""
    with _explained_hub_errors(base_repo, "list the files of"):  # HTTP and network errors; PushError passes
        try:
            remote = {e.path: e for e in api.list_repo_tree(base_repo, recursive=True) if isinstance(e, RepoFile)}
        except RepositoryNotFoundError:
            raise PushError(
                f"The base model repo {base_repo} does not exist (or this token cannot read it). Add --push-base "
                f"(push_base=True) to publish {folder}'s base model there first."
            ) from None
    weights = [name for name in files if _is_model_weight(name)]
    for name in weights:
        entry = remote.get(name)
        blob, sha = _file_hashes(files[name])
        if entry is None or (entry.lfs.sha256 != sha if entry.lfs is not None else entry.blob_id != blob):
            raise PushError(
                f"The base model repo {base_repo} does not hold {folder}'s base weights ({name} "
                f"{'missing' if entry is None else 'differs'}): the adapter was trained with this folder's Q-Former "
                "and would give other outputs on another base. Add --push-base (push_base=True) to publish the "
                "folder's base model there."
            )


def _adapter_repo_files(files: dict[str, Path], base_repo: str, staging: Path) -> dict[str, Path]:
    """What an adapter repo publishes: the adapter (its config naming `base_repo`), the processor and tokenizer files
    with the processor's remote code, the training records. Not the base weights or config: loading by repo id takes
    those from `base_repo`."""
    adapter = json.loads(files[ADAPTER_CONFIG].read_text(encoding="utf-8"))
    adapter["base_model_name_or_path"] = base_repo
    # peft's AutoPeftModel would import this (`blip2_hf.modeling_blip2`), which a Hub user need not have.
    adapter["auto_mapping"] = None
    (staging / ADAPTER_CONFIG).write_text(json.dumps(adapter, indent=2), encoding="utf-8")
    kept = {
        name: path
        for name, path in files.items()
        if name in ADAPTER_FILES
        or (name not in ("config.json", "generation_config.json", *REMOTE_CODE_FILES) and not _is_model_weight(name))
    }
    kept[ADAPTER_CONFIG] = staging / ADAPTER_CONFIG
    return kept


def _publish(
    api: HfApi,
    repo_id: str,
    files: dict[str, Path],
    config_bytes: bytes | None,
    card: ModelCard,
    *,
    private: bool | None,
    revision: str | None,
    message: str,
) -> str:
    """One commit: `files`, config.json as `config_bytes` when given, the card; weight and adapter files left from
    an earlier push and absent now are deleted in the same commit (no loader finds a mix)."""
    operations: list[CommitOperationAdd | CommitOperationDelete] = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
        for name, path in files.items()
        if not (name == "config.json" and config_bytes is not None)
    ]
    if config_bytes is not None:
        operations.append(CommitOperationAdd(path_in_repo="config.json", path_or_fileobj=config_bytes))
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    with _explained_hub_errors(repo_id, "create the repo"):
        created = _create_repo(api, repo_id, private)
    try:
        if revision is not None:
            with _explained_hub_errors(repo_id, "create the branch of"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
        with _explained_hub_errors(repo_id, "list the files of"):
            existing = api.list_repo_files(repo_id, revision=revision)
        stale = (*WEIGHT_PATTERNS, *ADAPTER_FILES)
        operations += [
            CommitOperationDelete(path_in_repo=n) for n in existing if _matches(n, stale) and n not in files
        ]
        with _explained_hub_errors(repo_id, "commit to"):
            commit = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    except BaseException as err:  # Ctrl-C too: a repo this push created must not stay behind empty
        if not created:
            raise
        note = _delete_created_repo(api, repo_id)
        if isinstance(err, PushError):
            raise type(err)(f"{err} {note}") from err.__cause__
        logger.error(note)
        raise
    logger.info("Published %s: %s", repo_id, commit.commit_url)
    return commit.commit_url


def _create_repo(api: HfApi, repo_id: str, private: bool | None) -> bool:
    """Create `repo_id` if it does not exist; whether this call created it (then a failed push deletes it)."""
    try:
        api.create_repo(repo_id, private=private, exist_ok=False)
        return True
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 409:  # it exists
            return False
        if status in (401, 402, 403):  # may exist all the same: huggingface_hub's exist_ok path checks, or raises
            api.create_repo(repo_id, private=private, exist_ok=True)
            return False
        raise


def _delete_created_repo(api: HfApi, repo_id: str) -> str:
    """Delete the repo a failed push created (it holds only the Hub's initial commit); a sentence saying so, or
    saying that it could not be deleted and must be by hand."""
    try:
        api.delete_repo(repo_id, missing_ok=True)
    except Exception as err:  # the network that failed the push may fail this too: say so, keep the first error
        return (
            f"The repo {repo_id} that this push created could not be deleted ({type(err).__name__}): it is empty; "
            f"delete it at {huggingface_hub.constants.ENDPOINT}/{repo_id}/settings or push again."
        )
    return f"The repo {repo_id} that this push created was deleted again."


def _hub_api(token: str | None, repo_id: str) -> tuple[HfApi, str]:
    """The client for `token` and the full `namespace/name` of `repo_id`; refuses a missing token."""
    if not token:
        raise HubAuthError(
            f"No Hugging Face token: publishing {repo_id} needs one with write access. Run `hf auth login`, or set "
            "HF_TOKEN=hf_... (tokens: https://huggingface.co/settings/tokens), or pass `token=` in Python."
        )
    api = HfApi(token=token)
    if "/" not in repo_id:  # the Hub creates it in the token's namespace; the card's snippets need the full id
        with _explained_hub_errors(repo_id, "find the namespace for"):
            repo_id = f"{api.whoami()['name']}/{repo_id}"
    return api, repo_id


def _check_lora_options(
    folder: str | os.PathLike, adapter: dict[str, Any] | None, merge_lora: bool, push_base: bool
) -> None:
    """Refuse `merge_lora` / `push_base` for a folder without a LoRA adapter, and both at once."""
    if adapter is None and (merge_lora or push_base):
        raise PushError(
            f"{folder} has no LoRA adapter ({ADAPTER_CONFIG}): --merge-lora and --push-base apply to the folders "
            "training/stage2.py writes with --lora_r N."
        )
    if merge_lora and push_base:
        raise PushError("--merge-lora publishes one full checkpoint, --push-base an adapter and its base: pick one.")


def _add_processor_and_remote_code(files: dict[str, Path], folder: Path, staging: Path) -> None:
    """Add to `files`, in place, the re-saved processor files (`_processor_files`) and the package's remote code
    files the folder lacks."""
    files.update(_processor_files(folder, staging))
    for name in (*REMOTE_CODE_FILES, PROCESSOR_CODE_FILE):
        if name not in files and (PACKAGE_DIR / name).is_file():
            files[name] = PACKAGE_DIR / name


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    results: Sequence[str | os.PathLike] | None = None,
    license: str = DEFAULT_LICENSE,
    datasets: Sequence[str] | None = None,
    base_models: Sequence[str] | None = None,
    tags: Sequence[str] | None = None,
    template_path: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    merge_lora: bool = False,
    push_base: bool = False,
    timeout: float | None = DEFAULT_HUB_TIMEOUT,
) -> str:
    """Publish a saved BLIP-2 folder as `repo_id` in one commit and return the commit's URL.

    The commit holds the folder's files (safetensors weights, config.json completed if its `auto_map` or pipeline
    entry is missing, the remote code, processor/tokenizer files and `qformer_tokenizer/`), the package's remote
    code files the folder lacks, and a README.md from `build_model_card` (`results`, `license`, `datasets`,
    `base_models`, `tags`, `template_path` go there). Weight files left in the repo by an earlier push and absent
    now are deleted in the same commit.

    A LoRA folder (`adapter_config.json`) is published merged (`merge_lora`: a plain checkpoint) or as the adapter
    and processor, its `base_model_name_or_path` the one `base_models` repo, which `push_base` fills with the
    folder's base model first (else it must hold exactly those weights). Both load by repo id.

    Args:
        token: a Hub token with write access; default: `HF_TOKEN` or the token `hf auth login` stored.
        private: create the repo private (ignored when it exists).
        allow_pickle: publish pickled files (`.bin`, `.pt`, ...) too; refused by default.
        revision: the branch to commit to (default `main`).
        timeout: seconds each Hub request may wait to connect and for each read or write (`hub_timeout`); None
            waits forever.

    Raises:
        HubAuthError: no token, a refused token (401) or no write access (403); the message names the repo.
        PushError: a folder that cannot be published (no weights, pickles, not BLIP-2, a LoRA folder without a Hub
            base), a Hub that cannot be reached or does not answer within `timeout` (one line naming the endpoint),
            or a failed commit, after which the repo is as it was before (deleted again if this push created it).
    """
    with hub_timeout(timeout):
        return _push_folder(
            folder, repo_id, token=token, private=private, commit_message=commit_message, results=results,
            license=license, datasets=datasets, base_models=base_models, tags=tags, template_path=template_path,
            allow_pickle=allow_pickle, revision=revision, merge_lora=merge_lora, push_base=push_base,
        )  # fmt: skip


def _push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None,
    private: bool | None,
    commit_message: str | None,
    results: Sequence[str | os.PathLike] | None,
    license: str,
    datasets: Sequence[str] | None,
    base_models: Sequence[str] | None,
    tags: Sequence[str] | None,
    template_path: str | os.PathLike | None,
    allow_pickle: bool,
    revision: str | None,
    merge_lora: bool,
    push_base: bool,
) -> str:
    """`push_folder` within its `hub_timeout`."""
    info = FolderInfo.read(folder)
    adapter = read_adapter_config(info.folder)
    _check_lora_options(folder, adapter, merge_lora, push_base)
    base_repo = lora_base_repo(info.folder, base_models) if adapter is not None and not merge_lora else None
    files = _folder_files(info.folder, allow_pickle)
    token = token or get_stored_token()
    api, repo_id = _hub_api(token, repo_id)
    card_args = dict(license=license, datasets=datasets, tags=tags, template_path=template_path)
    if adapter is not None and merge_lora:
        with tempfile.TemporaryDirectory() as merged:
            merge_lora_folder(info.folder, merged, allow_pickle)
            return _push_folder(
                merged, repo_id, token=token, private=private, commit_message=commit_message, results=results,
                base_models=base_models, allow_pickle=allow_pickle, revision=revision, merge_lora=False,
                push_base=False, **card_args,
            )  # fmt: skip
    # Everything local comes first (results, card, completed config, processor): an error there leaves the Hub as
    # it was, not with an empty repo.
    card = build_model_card(
        info.folder, repo_id, results, base_models=base_models, adapter_base=base_repo, **card_args
    )
    message = commit_message or f"Upload BLIP-2 ({info.architecture}) with blip2-hf {__version__}"
    with tempfile.TemporaryDirectory() as staging:
        _add_processor_and_remote_code(files, info.folder, Path(staging))
        config_bytes = _completed_config(info)
        if base_repo is None:
            return _publish(
                api, repo_id, files, config_bytes, card, private=private, revision=revision, message=message
            )
        if push_base:  # the base first: the adapter repo must never point at a base that is not there
            base_card = build_model_card(info.folder, base_repo, None, **card_args)
            base_files = {name: path for name, path in files.items() if name not in ADAPTER_FILES}
            base_message = f"Base model of the LoRA adapter {repo_id} (blip2-hf {__version__})"
            _publish(api, base_repo, base_files, config_bytes, base_card, private=private, revision=None,
                     message=base_message)  # fmt: skip
        else:
            _check_base_repo(api, base_repo, files, info.folder)
        adapter_files = _adapter_repo_files(files, base_repo, Path(staging))
        return _publish(api, repo_id, adapter_files, None, card, private=private, revision=revision, message=message)
