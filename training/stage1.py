"""BLIP-2 stage 1: train the Q-Former against a frozen image encoder with ITC + ITM + ITG (paper section 3.2).

    accelerate launch training/stage1.py --config training/configs/stage1_pretrain.yaml
    accelerate launch --multi_gpu --num_processes 8 training/stage1.py --config ... --output_dir runs/stage1
    python training/stage1.py --config training/configs/tiny/stage1.yaml          # CPU, a minute

Arguments: the three dataclasses below plus `Blip2TrainingArguments` (all of `transformers.TrainingArguments`), from a
YAML/JSON `--config` file, overridden by `--name value` on the command line. The model is either a stage-1 folder
(`model_name_or_path`) or built from a `Blip2Config` (`config_name`), with the frozen image encoder's weights from
`vision_model_name_or_path` and the Q-Former initialized from a BERT masked LM (`bert_name_or_path`), as the paper
does. The image encoder is our EVA ViT (a folder with `vision_model.*` keys) or any transformers vision model's own
folder (`CLIPVisionModel`, `SiglipVisionModel`, `Dinov2Model`, `ConvNextModel`, ... `save_pretrained`; a full
`CLIPModel` / `SiglipModel` gives its vision tower): its config replaces `config_name`'s `vision_config`, and its
image processor, saved beside it, with the Q-Former tokenizer of `bert_name_or_path` makes the processor (no
`processor_name_or_path` needed). Data are caption JSONs, image folders with metadata.jsonl or webdataset tar shards (`train_data`, mixed by
`train_data_weights`), or a frozen-feature cache (`feature_cache`, built by `blip2-hf-cache-features`).
A run killed at any point resumes from its last checkpoint with `--resume_from_checkpoint last`.

ITC and ITM take their negatives from each step's global batch (`per_device_train_batch_size` x processes; gradient
accumulation adds none): a global batch of one pair is refused before training starts. A run whose loss or gradients
turn NaN/inf skips those steps; `max_nonfinite_steps` of them in a row stop it with exit status 1, and no non-finite
weights are written.
On GPUs: the frozen towers in half precision (`--frozen_precision auto`: fp16, bf16 for Flan-T5; or `bf16`), the
Q-Former in mixed precision (`--bf16 true`), fused AdamW (the default `optim`), and, opt-in, `--torch_compile_qformer
true` to compile the Q-Former alone (the first steps pay the compilation).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedConfig,
    set_seed,
)

from blip2_hf import Blip2Config, Blip2ForPreTraining, Blip2Processor, Blip2VisionConfig
from blip2_hf.data import BadImageTracker, Stage1Collator
from blip2_hf.hub import write_training_run
from blip2_hf.modeling_blip2 import local_model_folder, read_safetensors_folder
from blip2_hf.trainer import Blip2Stage1Trainer, Blip2TrainingArguments
from blip2_hf.training_scripts import (
    check_processor_matches_model,
    parse_args_with_config,
    train_or_exit,
    training_dataset,
)

logger = logging.getLogger("blip2_hf.training")

# `model_type`s of folders whose weights are in our layout (`vision_model.*` keys, or a `Blip2VisionModel`'s own):
# they load into the config_name's vision encoder as they are. Any other config.json is a transformers model's.
BLIP2_MODEL_TYPES = (Blip2Config.model_type, Blip2VisionConfig.model_type, "blip-2", "blip_2_vision_model")
# The Blip2Config fields that say which of the encoder's outputs feed the Q-Former (contract: family defaults).
FEATURE_FIELDS = ("vision_feature_layer", "vision_feature_select_strategy")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A stage-1 folder to continue from."})
    config_name: str | None = field(default=None, metadata={"help": "Blip2Config (json or folder) for a new model."})
    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The frozen image encoder: a folder with our EVA `vision_model.*` keys, or a transformers vision "
            "model's own folder (CLIPVisionModel, SiglipVisionModel, Dinov2Model, ConvNextModel, ...; a full "
            "CLIPModel / SiglipModel gives its vision tower), whose config then replaces config_name's vision_config."
        },
    )
    bert_name_or_path: str | None = field(
        default=None, metadata={"help": "BERT masked LM to start the Q-Former; its tokenizer is the Q-Former's."}
    )
    processor_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Blip2Processor folder with the image processor and the Q-Former tokenizer. Default: the stage-1 "
            "folder's (model_name_or_path), else the image processor saved beside vision_model_name_or_path (EVA "
            "without one: BLIP-2's, at the encoder's image size) and bert_name_or_path's tokenizer."
        },
    )


@dataclass
class DataArguments:
    train_data: list[str] = field(default_factory=list, metadata={"help": "Caption JSONs, image folders, tar shards."})
    train_data_weights: list[float] | None = field(default=None, metadata={"help": "Sampling weights of the sources."})
    image_root: str | None = field(default=None, metadata={"help": "Root of relative image paths in caption JSONs."})
    feature_cache: str | None = field(default=None, metadata={"help": "Train from cached frozen-encoder outputs."})
    max_length: int = field(default=32, metadata={"help": "Q-Former text length (LAVIS: 32)."})
    augment: bool = field(default=True, metadata={"help": "Random resized crop (0.5-1) and horizontal flip."})
    max_bad_fraction: float = field(default=0.5, metadata={"help": "Stop when more images than this are unreadable."})


def foreign_vision_config(path: str | None) -> PreTrainedConfig | None:
    """The config of a transformers vision model's folder (its own `config.json`; a two-tower model's, CLIP or SigLIP,
    gives its `vision_config`), or None for a folder in our layout (EVA `vision_model.*` keys) or no folder."""
    file = Path(path) / "config.json" if path is not None else None
    if file is None or not file.is_file():
        return None
    if json.loads(file.read_text()).get("model_type") in BLIP2_MODEL_TYPES:
        return None
    config = AutoConfig.from_pretrained(path)
    return getattr(config, "vision_config", None) or config


def _raw_config(config_name: str) -> dict:
    """What the config_name file itself says (before `Blip2Config` fills the defaults)."""
    path = Path(config_name)
    return json.loads((path / "config.json" if path.is_dir() else path).read_text())


def stage1_config(args: ModelArguments) -> Blip2Config:
    """The model's config: the stage-1 folder's, or `config_name`'s with, for a transformers vision model in
    `vision_model_name_or_path`, that model's config as `vision_config`. The feature fields (`FEATURE_FIELDS`) are
    kept where config_name sets them for this encoder family (or sets no vision_config); otherwise they are the
    family's defaults: a layer chosen for EVA means nothing for another encoder."""
    if args.model_name_or_path is not None:
        return Blip2Config.from_pretrained(args.model_name_or_path)
    if args.config_name is None:
        raise ValueError("Give model_name_or_path (a stage-1 folder) or config_name (a Blip2Config for a new model).")
    config = Blip2Config.from_pretrained(args.config_name)
    vision_config = foreign_vision_config(args.vision_model_name_or_path)
    if vision_config is None:
        return config
    raw = _raw_config(args.config_name)
    raw_family = (raw.get("vision_config") or {}).get("model_type")
    values = config.to_dict()
    values["vision_config"] = vision_config.to_dict()
    for name in FEATURE_FIELDS:
        if raw_family not in (None, vision_config.model_type) or raw.get(name) is None:
            values[name] = None  # resolved to the family default
    config = Blip2Config.from_dict(values)
    logger.info(
        "config_name's vision_config replaced by the %s config of %s (width %d); vision_feature_layer=%s, "
        "vision_feature_select_strategy=%s.", vision_config.model_type, args.vision_model_name_or_path,
        config.vision_hidden_size, config.vision_feature_layer, config.vision_feature_select_strategy,
    )  # fmt: skip
    return config


def build_processor(args: ModelArguments, config: Blip2Config) -> tuple[Blip2Processor, str]:
    """The stage-1 processor and where it came from (for error messages): `processor_name_or_path`, the stage-1
    folder's, or built from the encoder's own image processor and the Q-Former tokenizer of `bert_name_or_path`."""
    path = args.processor_name_or_path or args.model_name_or_path
    if path is not None:
        processor = Blip2Processor.from_pretrained(path)
        if processor.qformer_tokenizer is None:
            raise ValueError(f"{path} has no Q-Former tokenizer (qformer_tokenizer/).")
        return processor, f"the processor of {path}"
    if args.bert_name_or_path is None:
        raise ValueError(
            "Give processor_name_or_path (a Blip2Processor folder with qformer_tokenizer/), or bert_name_or_path "
            "(the Q-Former tokenizer; the image processor then comes from vision_model_name_or_path)."
        )
    image_processor, where = encoder_image_processor(args.vision_model_name_or_path, config)
    qformer_tokenizer = Blip2Processor.qformer_tokenizer_from_bert(args.bert_name_or_path)
    # Stage 1 has no LLM: the language-model slot is never read here (stage 2 puts its LLM's tokenizer there). A
    # separate copy of BERT's tokenizer, so the `<image>` token the processor adds stays out of the Q-Former's.
    tokenizer = AutoTokenizer.from_pretrained(args.bert_name_or_path)
    processor = Blip2Processor(image_processor, tokenizer, qformer_tokenizer, num_query_tokens=config.num_query_tokens)
    return processor, where


def encoder_image_processor(vision_path: str | None, config: Blip2Config) -> tuple[object, str]:
    """The image encoder's own image processor (`preprocessor_config.json` beside its weights: its size, resampling,
    mean/std) or, for our EVA encoder without one, BLIP-2's (LAVIS `blip_image_eval`) at the encoder's image size."""
    if vision_path is not None and (Path(vision_path) / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(vision_path), f"the image processor of {vision_path}"
    if not isinstance(config.vision_config, Blip2VisionConfig):
        raise ValueError(
            f"{vision_path or 'vision_model_name_or_path'} has no preprocessor_config.json: the "
            f"{config.vision_config.model_type} encoder's own image processor (its size, mean/std) is unknown. "
            "Save it beside the weights (`image_processor.save_pretrained`) or pass processor_name_or_path."
        )
    size = config.vision_config.image_size
    logger.info("No image processor given: BLIP-2's (%s px, bicubic, CLIP mean/std) for the EVA encoder.", size)
    return Blip2Processor.default_image_processor(size), "BLIP-2's default image processor"


def build_model(args: ModelArguments, config: Blip2Config) -> Blip2ForPreTraining:
    """The stage-1 folder to continue from, or a new model from `config`: the Q-Former from BERT, the frozen
    image encoder's weights from `vision_model_name_or_path` (every tensor required)."""
    if args.model_name_or_path is not None:
        return Blip2ForPreTraining.from_pretrained(args.model_name_or_path)
    if args.bert_name_or_path is not None:
        model = Blip2ForPreTraining.from_bert(args.bert_name_or_path, config)
    else:
        model = Blip2ForPreTraining(config)
    path = args.vision_model_name_or_path
    if path is None:
        logger.warning("No vision_model_name_or_path: the frozen image encoder keeps its random initialization.")
    elif foreign_vision_config(path) is not None:
        model.vision_model.load_backbone(path)  # a two-tower folder (CLIP, SigLIP): its vision tower
    else:
        # a full BLIP-2 folder has `vision_model.*` keys; a `Blip2VisionModel` folder has them without the prefix
        weights = read_safetensors_folder(path)
        vision = {k[len("vision_model.") :]: v for k, v in weights.items() if k.startswith("vision_model.")} or weights
        missing, unexpected = model.vision_model.load_state_dict(vision, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: vision weights do not match the config: missing {missing}, unexpected {unexpected}"
            )
    return model


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, Blip2TrainingArguments))
    model_args, data_args, training_args = parse_args_with_config(parser, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    if model_args.vision_model_name_or_path is not None:  # a Hub id is downloaded: the folder is read file by file
        model_args.vision_model_name_or_path = str(
            local_model_folder(model_args.vision_model_name_or_path, "--vision_model_name_or_path")
        )
    config = stage1_config(model_args)
    processor, processor_source = build_processor(model_args, config)
    check_processor_matches_model(processor, config, f"training/stage1.py: {processor_source}")
    model = build_model(model_args, config)

    train_dataset, image_transform = training_dataset(
        model,
        data_args.train_data,
        data_args.train_data_weights,
        image_root=data_args.image_root,
        feature_cache=data_args.feature_cache,
        augment=data_args.augment,
        seed=training_args.seed,
        processor=processor,
    )
    collator = Stage1Collator(
        processor,
        max_length=data_args.max_length,
        image_transform=image_transform,
        tracker=BadImageTracker(max_bad_fraction=data_args.max_bad_fraction),
    )

    trainer = Blip2Stage1Trainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=collator)
    # "last": the newest checkpoint, if any. A diverged run exits here with status 1, writing nothing.
    train_or_exit(trainer, training_args.resume_from_checkpoint, "stage1.py")
    trainer.save_model(training_args.output_dir)  # the full model: from_pretrained / AutoModelForPreTraining load it
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
        # what the model card's training section reads: arguments, data sources, steps
        args = (model_args, data_args, training_args)
        write_training_run(
            training_args.output_dir, "training/stage1.py", args, trainer.state, training_args.world_size
        )
        tracker = collator.tracker
        logger.info(f"Done. Unreadable images skipped: {tracker.num_bad} of {tracker.num_seen}.")
    trainer.end_training()


if __name__ == "__main__":
    main()
