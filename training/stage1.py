"""BLIP-2 stage 1: train the Q-Former against a frozen image encoder with ITC + ITM + ITG (paper section 3.2).

    accelerate launch training/stage1.py --config training/configs/stage1_pretrain.yaml
    accelerate launch --multi_gpu --num_processes 8 training/stage1.py --config ... --output_dir runs/stage1
    python training/stage1.py --config training/configs/tiny/stage1.yaml          # CPU, a minute

Arguments: the three dataclasses below plus `Blip2TrainingArguments` (all of `transformers.TrainingArguments`), from a
YAML/JSON `--config` file, overridden by `--name value` on the command line. The model is either a stage-1 folder
(`model_name_or_path`) or built from a `Blip2Config` (`config_name`), with the frozen image encoder's weights from
`vision_model_name_or_path` and the Q-Former initialized from a BERT masked LM (`bert_name_or_path`), as the paper
does. Data are caption JSONs, image folders with metadata.jsonl or webdataset tar shards (`train_data`, mixed by
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

import logging
from dataclasses import dataclass, field

from transformers import HfArgumentParser, set_seed

from blip2_hf import Blip2Config, Blip2ForPreTraining, Blip2Processor
from blip2_hf.data import BadImageTracker, Stage1Collator
from blip2_hf.hub import write_training_run
from blip2_hf.modeling_blip2 import read_safetensors_folder
from blip2_hf.trainer import Blip2Stage1Trainer, Blip2TrainingArguments
from blip2_hf.training_scripts import parse_args_with_config, train_or_exit, training_dataset

logger = logging.getLogger("blip2_hf.training")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A stage-1 folder to continue from."})
    config_name: str | None = field(default=None, metadata={"help": "Blip2Config (json or folder) for a new model."})
    vision_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Frozen image encoder weights: any folder with `vision_model.*` keys."}
    )
    bert_name_or_path: str | None = field(default=None, metadata={"help": "BERT masked LM to start the Q-Former."})
    processor_name_or_path: str = field(
        default=None, metadata={"help": "Blip2Processor folder with the image processor and the Q-Former tokenizer."}
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


def build_model(args: ModelArguments) -> Blip2ForPreTraining:
    if args.model_name_or_path is not None:
        return Blip2ForPreTraining.from_pretrained(args.model_name_or_path)
    if args.config_name is None:
        raise ValueError("Give model_name_or_path (a stage-1 folder) or config_name (a Blip2Config for a new model).")
    config = Blip2Config.from_pretrained(args.config_name)
    if args.bert_name_or_path is not None:
        model = Blip2ForPreTraining.from_bert(args.bert_name_or_path, config)
    else:
        model = Blip2ForPreTraining(config)
    if args.vision_model_name_or_path is not None:
        # a full BLIP-2 folder has `vision_model.*` keys; a `Blip2VisionModel` folder has them without the prefix
        weights = read_safetensors_folder(args.vision_model_name_or_path)
        vision = {k[len("vision_model.") :]: v for k, v in weights.items() if k.startswith("vision_model.")} or weights
        missing, unexpected = model.vision_model.load_state_dict(vision, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{args.vision_model_name_or_path}: vision weights do not match the config: missing {missing}, "
                f"unexpected {unexpected}"
            )
    else:
        logger.warning("No vision_model_name_or_path: the frozen image encoder keeps its random initialization.")
    return model


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, Blip2TrainingArguments))
    model_args, data_args, training_args = parse_args_with_config(parser, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    processor = Blip2Processor.from_pretrained(model_args.processor_name_or_path)
    if processor.qformer_tokenizer is None:
        raise ValueError(f"{model_args.processor_name_or_path} has no Q-Former tokenizer (qformer_tokenizer/).")
    model = build_model(model_args)

    train_dataset, image_transform = training_dataset(
        model,
        data_args.train_data,
        data_args.train_data_weights,
        image_root=data_args.image_root,
        feature_cache=data_args.feature_cache,
        augment=data_args.augment,
        seed=training_args.seed,
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
