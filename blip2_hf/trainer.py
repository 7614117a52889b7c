"""`transformers.Trainer` for BLIP-2's two stages.

What BLIP-2 needs beyond the stock Trainer, and nothing else:
- freezing what the paper freezes (the image encoder but its `post_layernorm`, and the LLM): no gradients, eval mode
  (the models' `train()` keeps frozen towers in eval), optionally half precision;
- each loss component (ITC / ITM / ITG in stage 1) logged next to the total, averaged over the logging window and
  across processes;
- checkpoints holding only the trained weights (the frozen ViT-g and LLM are most of the bytes and never change), with
  an explicit key check on resume; the final `save_model` writes the full model, which `from_pretrained` loads.
The optimizer (AdamW, betas from `TrainingArguments`, no weight decay on biases and norms) and the schedule (linear
warmup, then cosine to `min_lr`: `lr_scheduler_type="cosine_with_min_lr"`) are the Trainer's own.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field

import safetensors.torch
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .modeling_blip2 import frozen_tower_dtype

logger = logging.get_logger(__name__)


@dataclass
class Blip2TrainingArguments(TrainingArguments):
    """`TrainingArguments` with BLIP-2's defaults (paper + LAVIS): AdamW betas (0.9, 0.98), weight decay 0.05, linear
    warmup then cosine to a minimum learning rate, raw columns kept for the collators."""

    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2 (0.98 in the BLIP-2 paper)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (none on biases and norms)."})
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata={"help": "Warmup, then cosine."})
    min_learning_rate: float = field(
        default=1e-5, metadata={"help": "Where the cosine ends (stage 1: 1e-5, stage 2: 5e-5 in the paper)."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "The collators read raw columns."})
    frozen_precision: str = field(
        default="auto",
        metadata={
            "help": "dtype of the frozen image encoder and LLM: fp16, bf16, fp32, or auto (fp16 on CUDA, bf16 for "
            "T5-family LLMs, which overflow in fp16; fp32 on CPU)."
        },
    )

    def __post_init__(self):
        if self.lr_scheduler_type in ("cosine_with_min_lr", "SchedulerType.COSINE_WITH_MIN_LR"):
            self.lr_scheduler_kwargs = {"min_lr": self.min_learning_rate, **(self.lr_scheduler_kwargs or {})}
        super().__post_init__()


class _CollatorEpoch(TrainerCallback):
    """Tells the collator the seed and the epoch, which seed each sample's augmentation: a sample's randomness then
    depends on nothing that ran before it, so a resumed run (or one with more workers) draws what an uninterrupted run
    draws. (Global RNG streams cannot promise that: the data loader collates one batch ahead of the step.)"""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.seed = args.seed
        self.collator.epoch = int(math.floor(state.epoch + 1e-6)) if state.epoch else 0


class Blip2Trainer(Trainer):
    """Shared by both stages; `loss_components` names the output fields logged besides `loss`."""

    loss_components: tuple[str, ...] = ()

    def __init__(self, model=None, args: TrainingArguments | None = None, **kwargs):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
        # the model's one freezing contract, at the precision the arguments ask for on the device it trains on
        device = args.device if args is not None else None
        base.freeze_towers(frozen_tower_dtype(getattr(args, "frozen_precision", "auto"), base.config, device))
        super().__init__(model=model, args=args, **kwargs)
        if hasattr(self.data_collator, "epoch"):
            self.add_callback(_CollatorEpoch(self.data_collator))
        self._component_sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(()))
        self._component_count = 0
        self._saving_checkpoint = False

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint="last"` resumes from the newest checkpoint in `output_dir` when
        there is one and starts afresh otherwise, so one command both starts a run and continues a killed one."""
        if resume_from_checkpoint == "last":
            from transformers.trainer_utils import get_last_checkpoint

            output_dir = self.args.output_dir
            resume_from_checkpoint = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def end_training(self) -> None:
        """Call last in a training script: every process waits for the others (rank 0 may still be writing the final
        folder), then the process group is destroyed. A rank that simply exits first aborts in gloo's destructor
        ("terminate called without an active exception", SIGABRT), and torchrun then kills rank 0 mid-write."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs)
        if model.training:
            for name in self.loss_components:
                if outputs.get(name) is not None:  # an objective the config leaves out is not logged
                    self._component_sums[name] = self._component_sums[name] + outputs[name].detach().float().cpu()
            self._component_count += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._component_count:  # a training log: add the components, averaged
            for name in self.loss_components:
                if name not in self._component_sums:
                    continue
                mean = (self._component_sums[name] / self._component_count).to(self.args.device)
                logs[name] = round(self.accelerator.reduce(mean, reduction="mean").item(), 4)
            self._component_sums.clear()
            self._component_count = 0
        super().log(logs, start_time)

    # --- checkpoints: trained weights only, checked on resume --------------------------------------------------------

    def _trainable_names(self) -> set[str]:
        model = self.accelerator.unwrap_model(self.model)
        return {name for name, param in model.named_parameters() if param.requires_grad}

    def _save_checkpoint(self, model, trial) -> None:
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self._saving_checkpoint:  # the final model: everything, as `save_pretrained` writes it
            return super()._save(output_dir, state_dict=state_dict)
        # a checkpoint: the trained tensors only (LoRA adapters included), written atomically
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        full = model.state_dict() if state_dict is None else state_dict
        trainable = self._trainable_names()
        tensors = {name: tensor.detach().contiguous() for name, tensor in full.items() if name in trainable}
        path = os.path.join(output_dir, "model.safetensors")
        safetensors.torch.save_file(tensors, path + ".tmp", metadata={"format": "pt"})
        os.replace(path + ".tmp", path)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        weights = os.path.join(resume_from_checkpoint, "model.safetensors")
        if not os.path.isfile(weights):
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        state_dict = safetensors.torch.load_file(weights)
        trainable = self._trainable_names()
        missing, unexpected = sorted(trainable - set(state_dict)), sorted(set(state_dict) - trainable)
        if missing or unexpected:
            raise ValueError(
                f"Checkpoint {weights} does not match the weights this run trains: missing {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                f"{' ...' if len(unexpected) > 10 else ''}. Resume with the same model and freezing settings."
            )
        own = model.state_dict()
        for name, tensor in state_dict.items():
            if own[name].shape != tensor.shape:
                raise ValueError(
                    f"{weights}: {name} has shape {tuple(tensor.shape)}, the model {tuple(own[name].shape)}"
                )
        model.load_state_dict(state_dict, strict=False)
        logger.info(f"Resumed {len(state_dict)} trained tensors from {weights}")


class Blip2Stage1Trainer(Blip2Trainer):
    """Stage 1 (`Blip2ForPreTraining`): logs `loss_itc`, `loss_itm`, `loss_itg`. Its losses are batch means, so
    gradient accumulation divides them by the number of accumulation steps (no `num_items_in_batch`)."""

    loss_components = ("loss_itc", "loss_itm", "loss_itg")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False


class Blip2Stage2Trainer(Blip2Trainer):
    """Stage 2 (`Blip2ForConditionalGeneration`): the LM loss. For decoder-only LLMs it is normalized by the number
    of target tokens over the whole accumulated batch (`num_items_in_batch`), so accumulation equals a bigger batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # T5's own loss is a batch mean: accumulation divides it instead
        self.model_accepts_loss_kwargs = bool(base.config.use_decoder_only_language_model)
