"""BLIP-2 stage 2: connect the stage-1 Q-Former to a frozen LLM through `language_projection` and train with the
language-modeling loss (paper section 3.3): plain LM for decoder-only LLMs (OPT, Llama, ...: caption + "\\n" as EOS,
prompt masked), prefix LM for encoder-decoder LLMs (Flan-T5: each caption split at a random point into an encoder
prefix and a decoder suffix).

    accelerate launch training/stage2.py --config training/configs/stage2_opt2.7b.yaml
    python training/stage2.py --config training/configs/tiny/stage2_opt.yaml          # CPU, a minute

The model is a stage-1 folder (`stage1_name_or_path`: vision encoder, query tokens, Q-Former) plus any LLM name or
path (`language_model_name_or_path`), or a stage-2 folder to continue from (`model_name_or_path`). `lora_r > 0` adds
LoRA adapters (peft) to the LLM and, with `lora_qformer`, to the Q-Former; they are saved next to the model and
`PeftModel.from_pretrained(Blip2ForConditionalGeneration.from_pretrained(out), out)` reloads them.
A run whose loss or gradients turn NaN/inf skips those steps; `max_nonfinite_steps` of them in a row stop it with exit
status 1, and no non-finite weights are written.
On GPUs: the frozen towers in half precision (`--frozen_precision auto`: fp16, bf16 for Flan-T5; or `bf16`), the
Q-Former in mixed precision (`--bf16 true`), fused AdamW (the default `optim`), and, opt-in, `--torch_compile_qformer
true` to compile the Q-Former alone (the first steps pay the compilation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, set_seed

from blip2_hf import Blip2ForConditionalGeneration, Blip2Processor
from blip2_hf.data import BadImageTracker, Stage2Collator
from blip2_hf.hub import write_training_run
from blip2_hf.trainer import Blip2Stage2Trainer, Blip2TrainingArguments
from blip2_hf.training_scripts import (
    check_processor_matches_model,
    parse_args_with_config,
    train_or_exit,
    training_dataset,
)

logger = logging.getLogger("blip2_hf.training")

# LoRA targets per LLM family (the attention's query and value projections, as the LoRA paper)
LORA_TARGETS = {"t5": ("q", "v"), "mt5": ("q", "v")}
DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")


@dataclass
class ModelArguments:
    stage1_name_or_path: str | None = field(default=None, metadata={"help": "A stage-1 folder (Blip2ForPreTraining)."})
    language_model_name_or_path: str | None = field(default=None, metadata={"help": "The frozen LLM."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "A stage-2 folder to continue from."})
    processor_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Blip2Processor folder (image processor + this LLM's tokenizer). Default: the stage-1 "
            "folder's image processor + the LLM's tokenizer, or the stage-2 folder's processor."
        },
    )
    num_query_tokens: int | None = field(default=None, metadata={"help": "Default: the stage-1 model's."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank for the LLM (0: no LoRA, the LLM stays frozen)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Default: the LLM's q/v."})
    lora_qformer: bool = field(default=False, metadata={"help": "Also LoRA on the Q-Former's query/value."})


@dataclass
class DataArguments:
    train_data: list[str] = field(default_factory=list, metadata={"help": "Caption JSONs, image folders, tar shards."})
    train_data_weights: list[float] | None = field(default=None, metadata={"help": "Sampling weights of the sources."})
    image_root: str | None = field(default=None, metadata={"help": "Root of relative image paths in caption JSONs."})
    feature_cache: str | None = field(default=None, metadata={"help": "Train from cached frozen-encoder outputs."})
    max_length: int = field(default=32, metadata={"help": "Text tokens after the image tokens (LAVIS: 32)."})
    prompt: str = field(default="", metadata={"help": 'Text before each caption, e.g. "a photo of ".'})
    augment: bool = field(default=True, metadata={"help": "Random resized crop (0.5-1) and horizontal flip."})
    max_bad_fraction: float = field(default=0.5, metadata={"help": "Stop when more images than this are unreadable."})


def build_model(args: ModelArguments) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """The model to train and the processor that feeds it: a stage-2 folder to continue from, or stage 2 assembled
    from a stage-1 folder and an LLM (`Blip2ForConditionalGeneration.from_stage1`)."""
    processor_path = args.processor_name_or_path
    processor = Blip2Processor.from_pretrained(processor_path) if processor_path else None
    if args.model_name_or_path is None:
        if args.stage1_name_or_path is None or args.language_model_name_or_path is None:
            raise ValueError("Give stage1_name_or_path and language_model_name_or_path, or model_name_or_path.")
        overrides = {"num_query_tokens": args.num_query_tokens} if args.num_query_tokens else {}
        return Blip2ForConditionalGeneration.from_stage1(
            args.stage1_name_or_path, args.language_model_name_or_path, processor, **overrides
        )
    model = Blip2ForConditionalGeneration.from_pretrained(args.model_name_or_path)
    processor_path = processor_path or args.model_name_or_path
    processor = processor or Blip2Processor.from_pretrained(processor_path)
    if processor.qformer_tokenizer is not None and not model.config.qformer_config.use_qformer_text_input:
        # The stage-1 processor tokenizes text for the Q-Former too; this model's Q-Former reads none. Trained and
        # saved without that tokenizer, the folder's processor returns exactly what the model consumes.
        processor = processor.without_qformer_tokenizer()
    if processor.num_query_tokens != model.config.num_query_tokens:
        raise ValueError(
            f"{processor_path}: the processor writes {processor.num_query_tokens} image tokens, the model has "
            f"num_query_tokens={model.config.num_query_tokens}."
        )
    return model, processor


def add_lora(model: Blip2ForConditionalGeneration, args: ModelArguments):
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules or LORA_TARGETS.get(model.config.text_config.model_type, DEFAULT_LORA_TARGETS)
    pattern = rf".*language_model\..*\.({'|'.join(targets)})"
    if args.lora_qformer:
        pattern = rf"({pattern}|.*qformer\..*\.attention\.attention\.(query|value))"
    trained = [name for name, param in model.named_parameters() if param.requires_grad]
    lora = get_peft_model(
        model,
        LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=pattern),
    )
    # get_peft_model freezes every base weight: what stage 2 trains without LoRA trains with it too
    names = {name.removeprefix("base_model.model."): param for name, param in lora.named_parameters()}
    for name in trained:
        if not (args.lora_qformer and name.startswith("qformer.")) and name in names:
            names[name].requires_grad_(True)
    return lora


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, Blip2TrainingArguments))
    model_args, data_args, training_args = parse_args_with_config(parser, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    model, processor = build_model(model_args)
    check_processor_matches_model(processor, model.config, "training/stage2.py: the stage-2 processor")
    decoder_only = model.config.use_decoder_only_language_model
    model.freeze_towers()
    if model_args.lora_r > 0:
        model = add_lora(model, model_args)
        model.print_trainable_parameters()

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
    collator = Stage2Collator(
        processor,
        max_length=data_args.max_length,
        prompt=data_args.prompt,
        is_encoder_decoder=not decoder_only,
        image_transform=image_transform,
        tracker=BadImageTracker(max_bad_fraction=data_args.max_bad_fraction),
    )

    trainer = Blip2Stage2Trainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=collator)
    # "last": the newest checkpoint, if any. A diverged run exits here with status 1, writing nothing.
    train_or_exit(trainer, training_args.resume_from_checkpoint, "stage2.py")

    output_dir = training_args.output_dir
    if model_args.lora_r > 0:
        # the adapters, then the base model (trained Q-Former, original LLM) beside them
        if trainer.is_world_process_zero():
            card = Path(output_dir) / "README.md"
            had_card = card.exists()
            model.save_pretrained(output_dir)
            if not had_card:  # peft's blank template (empty base_model): `blip2-hf card` / `push` write the real one
                card.unlink(missing_ok=True)
            model.unload().save_pretrained(output_dir)
    else:
        trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(output_dir)
        # what the model card's training section reads: arguments, data sources, steps
        args = (model_args, data_args, training_args)
        write_training_run(output_dir, "training/stage2.py", args, trainer.state, training_args.world_size)
        logger.info(f"Done. Unreadable images skipped: {collator.tracker.num_bad} of {collator.tracker.num_seen}.")
    trainer.end_training()


if __name__ == "__main__":
    main()
