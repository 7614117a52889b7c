"""BLIP-2 stage 2: connect the stage-1 Q-Former to a frozen LLM through `language_projection` and train with the
language-modeling loss (paper section 3.3): plain LM for decoder-only LLMs (OPT, Llama, ...: caption + "\\n" as EOS,
prompt masked), prefix LM for encoder-decoder LLMs (Flan-T5: each caption split at a random point into an encoder
prefix and a decoder suffix).

    accelerate launch training/stage2.py --config training/configs/stage2_opt2.7b.yaml
    python training/stage2.py --config training/configs/tiny/stage2_opt.yaml          # CPU, a minute

The model is a stage-1 folder (`stage1_name_or_path`: vision encoder, query tokens, Q-Former) plus any causal or
encoder-decoder LLM name or path (`language_model_name_or_path`: OPT, Llama, Qwen2, Mistral, Gemma, T5, mT5, ...), or a
stage-2 folder to continue from (`model_name_or_path`). `stage1_name_or_path` may also be a stage-2
(`Blip2ForConditionalGeneration`) folder, ours or transformers' (a Salesforce/blip2-* checkpoint): its image side and
Q-Former re-bootstrapped onto the new LLM, with a new `language_projection` and the processor built from its image
processor and the new LLM's tokenizer. A tokenizer without a pad token (Llama, Mistral) needs `--pad_token`, e.g. its
eos token; `--use_chat_template` puts `prompt` into the LLM's chat template as a user turn (the labels stay on the
caption). `lora_r > 0` adds LoRA adapters (peft) to the LLM (its family's query/value projections,
`--lora_target_modules all-linear` or a list) and, with `lora_qformer`, to the Q-Former; they are saved next to the
model and `PeftModel.from_pretrained(Blip2ForConditionalGeneration.from_pretrained(out), out)` reloads them.
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
from typing import Any

import torch
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

# LoRA targets per LLM family, by the LLM config's `model_type`: the attention's query and value projections, as the
# LoRA paper (and peft's own defaults) choose them. A family not listed needs `--lora_target_modules`.
_QV_PROJ = ("q_proj", "v_proj")
LORA_TARGETS = {
    **dict.fromkeys(("opt", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi"), _QV_PROJ),
    **dict.fromkeys(("t5", "mt5", "umt5"), ("q", "v")),
}
ALL_LINEAR = "all-linear"


@dataclass
class ModelArguments:
    stage1_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Where the image side comes from: a stage-1 folder (Blip2ForPreTraining), or a "
            "Blip2ForConditionalGeneration folder (ours, or transformers' layout as the Salesforce/blip2-* "
            "checkpoints) whose LLM is replaced by language_model_name_or_path."
        },
    )
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
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "LLM module names to put LoRA on. Default: the query/value projections of the LLM's family "
            f"(LORA_TARGETS); `{ALL_LINEAR}`: every linear layer of the LLM but its output head."
        },
    )
    lora_qformer: bool = field(default=False, metadata={"help": "Also LoRA on the Q-Former's query/value."})
    pad_token: str | None = field(
        default=None,
        metadata={
            "help": "The LLM tokenizer's pad token, for tokenizers that ship without one (Llama, Mistral): a token "
            "of its vocabulary, e.g. its eos or unk token. Padding is masked out of attention and loss."
        },
    )


@dataclass
class DataArguments:
    train_data: list[str] = field(default_factory=list, metadata={"help": "Caption JSONs, image folders, tar shards."})
    train_data_weights: list[float] | None = field(default=None, metadata={"help": "Sampling weights of the sources."})
    image_root: str | None = field(default=None, metadata={"help": "Root of relative image paths in caption JSONs."})
    feature_cache: str | None = field(default=None, metadata={"help": "Train from cached frozen-encoder outputs."})
    max_length: int = field(default=32, metadata={"help": "Text tokens after the image tokens (LAVIS: 32)."})
    prompt: str = field(default="", metadata={"help": 'Text before each caption, e.g. "a photo of ".'})
    use_chat_template: bool = field(
        default=False,
        metadata={
            "help": "Put `prompt` into the LLM tokenizer's chat template as a user turn, the caption as the "
            "assistant's answer (default: BLIP-2's plain prompt)."
        },
    )
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


def set_pad_token(model: Blip2ForConditionalGeneration, processor: Blip2Processor, pad_token: str | None) -> None:
    """Give the tokenizer (and the LLM's config, where it has none) `pad_token`, an existing token; without one, a
    tokenizer that has no pad token is an error now rather than at the first batch (the collator pads)."""
    tokenizer = processor.tokenizer
    if pad_token is not None:
        token_id = tokenizer.convert_tokens_to_ids(pad_token)
        if token_id is None or (token_id == tokenizer.unk_token_id and pad_token != tokenizer.unk_token):
            raise ValueError(
                f"--pad_token {pad_token!r} is not a token of the LLM's tokenizer; give one it has, e.g. its eos "
                f"token {tokenizer.eos_token!r} or unk token {tokenizer.unk_token!r}."
            )
        tokenizer.pad_token = pad_token
        for config in (model.config.text_config, model.generation_config):
            if getattr(config, "pad_token_id", None) is None:
                config.pad_token_id = token_id
    if tokenizer.pad_token is None:
        raise ValueError(
            f"The LLM's tokenizer has no pad token (tokenizer.pad_token is None), and stage 2 pads its batches: pass "
            f"--pad_token TOKEN, e.g. its eos token {tokenizer.eos_token!r}."
        )


def lora_targets(model: Blip2ForConditionalGeneration, requested: list[str] | None) -> tuple[str, ...]:
    """The LLM module names LoRA goes on: `requested` as given, `["all-linear"]` for every linear layer of the LLM
    but its output head, or by default the query/value projections of its family (`LORA_TARGETS`)."""
    if requested == [ALL_LINEAR]:
        head = model.language_model.get_output_embeddings()
        return tuple(
            sorted(
                {
                    name.rsplit(".", 1)[-1]
                    for name, module in model.language_model.named_modules()
                    if isinstance(module, torch.nn.Linear) and module is not head
                }
            )
        )
    if requested:
        return tuple(requested)
    model_type = model.config.text_config.model_type
    if model_type not in LORA_TARGETS:
        raise ValueError(
            f"No default LoRA targets for an LLM of model_type {model_type!r} (known: {', '.join(sorted(LORA_TARGETS))})"
            f": pass --lora_target_modules, e.g. its attention's query and value projection names, or {ALL_LINEAR}."
        )
    return LORA_TARGETS[model_type]


def add_lora(model: Blip2ForConditionalGeneration, args: ModelArguments):
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, args.lora_target_modules)
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


def make_collator(
    processor: Blip2Processor, data_args: DataArguments, decoder_only: bool, image_transform: Any = None
) -> Stage2Collator:
    """The batches of stage 2: `prompt` before each caption, as it is or (`use_chat_template`) as a user turn of the
    LLM's chat template; the labels cover the caption (and its end) only."""
    prompt = processor.chat_prompt(data_args.prompt) if data_args.use_chat_template else data_args.prompt
    collator = Stage2Collator(
        processor,
        max_length=data_args.max_length,
        prompt=prompt,
        is_encoder_decoder=not decoder_only,
        image_transform=image_transform,
        tracker=BadImageTracker(max_bad_fraction=data_args.max_bad_fraction),
    )
    if data_args.use_chat_template:
        # The whole chat prompt is masked out of the labels: the collator strips a plain prompt's trailing space
        # before counting its tokens, but a chat prompt's trailing newline ("<|im_start|>assistant\n") is its own.
        collator.prompt_length = len(processor.tokenizer(prompt)["input_ids"])
    if decoder_only and collator.prompt_length >= data_args.max_length:
        # Every caption would be cut off after the prompt: all labels masked, a NaN loss from the first step.
        raise ValueError(
            f"max_length={data_args.max_length} leaves no text token for the captions: the prompt {prompt!r} "
            f"is {collator.prompt_length} tokens of the LLM's tokenizer on its own. Raise --max_length above "
            f"{collator.prompt_length} (the prompt plus the caption) or shorten --prompt."
        )
    return collator


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, Blip2TrainingArguments))
    model_args, data_args, training_args = parse_args_with_config(parser, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    model, processor = build_model(model_args)
    set_pad_token(model, processor, model_args.pad_token)
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
    collator = make_collator(processor, data_args, decoder_only, image_transform)

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
