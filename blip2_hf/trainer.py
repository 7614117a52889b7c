"""`transformers.Trainer` for BLIP-2's two stages.

What BLIP-2 needs beyond the stock Trainer, and nothing else:
- freezing what the paper freezes (the image encoder but its `post_layernorm`, and the LLM): no gradients, eval mode
  (the models' `train()` keeps frozen towers in eval), optionally half precision;
- each loss component (ITC / ITM / ITG in stage 1) logged next to the total, averaged over the logging window and
  across processes;
- checkpoints holding only the trained weights (the frozen ViT-g and LLM are most of the bytes and never change), with
  an explicit key check on resume; the final `save_model` writes the full model, which `from_pretrained` loads;
- checkpoints that appear only once complete (written as `.tmp-checkpoint-N`, then renamed), and a
  `resume_from_checkpoint="last"` that takes the newest complete one, so a kill at any moment loses at most the steps
  since the last checkpoint;
- the run's unreadable-image counts (`BadImageTracker`), carried from the data-loader workers in each batch, saved in
  each checkpoint (`bad_images.json`) and restored on resume.
The optimizer (AdamW, betas from `TrainingArguments`, no weight decay on biases and norms) and the schedule (linear
warmup, then cosine to `min_lr`: `lr_scheduler_type="cosine_with_min_lr"`) are the Trainer's own.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass, field

import safetensors.torch
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    logging,
)

from .data import BAD_IMAGE_COUNTS_KEY, BadImageTracker
from .modeling_blip2 import frozen_tower_dtype

logger = logging.get_logger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
BAD_IMAGES_NAME = "bad_images.json"
"""The run's unreadable-image counts in a checkpoint: `{"num_seen": int, "num_bad": int}` over every process."""
STAGING_PREFIX = ".tmp-"
"""A checkpoint is written as `.tmp-checkpoint-N` and renamed `checkpoint-N` once complete: neither
`get_last_checkpoint` (`^checkpoint-N$`) nor the rotation (`checkpoint-*`) sees the temporary name."""
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_WEIGHTS_NAMES = (
    SAFE_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
)


def checkpoint_problems(folder: str | os.PathLike) -> list[str]:
    """What a checkpoint folder lacks to be resumed from: `trainer_state.json` and the weights (our
    `model.safetensors`, or any weights file the stock Trainer writes); empty when complete."""
    problems = []
    if not os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
        problems.append(f"no {TRAINER_STATE_NAME}")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in _WEIGHTS_NAMES):
        problems.append(f"no weights ({' / '.join(_WEIGHTS_NAMES)})")
    return problems


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` folder of `output_dir` (highest N) that is complete (`checkpoint_problems`), None
    when there is none. Incomplete ones (a kill while an older version wrote them in place, a deleted file) are
    skipped with a warning naming them, as are `.tmp-checkpoint-N` folders left by a write that was interrupted."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return None
    steps = {}
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(path):
            steps[int(match.group(1))] = path
        elif name.startswith(STAGING_PREFIX) and PREFIX_CHECKPOINT_DIR in name and os.path.isdir(path):
            logger.warning(f"Ignoring {path}: a checkpoint whose write was interrupted (incomplete).")
    for step in sorted(steps, reverse=True):
        problems = checkpoint_problems(steps[step])
        if not problems:
            return steps[step]
        logger.warning(f"Skipping incomplete checkpoint {steps[step]} ({', '.join(problems)}): not resumable.")
    return None


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
        self._staging_dir: str | None = None
        if isinstance(getattr(self.data_collator, "report_counts", None), bool):
            # each batch then carries its unreadable-image counts (from whichever worker process collated it)
            self.data_collator.report_counts = True
        # (seen, bad) of the batches this process trained on, on its device (no sync per step); plus, on the main
        # process, the counts restored from a checkpoint (every process's, summed when it was saved)
        self._bad_image_counts: torch.Tensor | None = None
        self._restored_bad_image_counts = (0, 0)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint="last"` (or `True`) resumes from the newest *complete* checkpoint
        in `output_dir` (`last_complete_checkpoint`), saying which, and `"last"` starts afresh when there is none, so
        one command both starts a run and continues a killed one. At the end, the data collator's `tracker` (a
        `BadImageTracker`) holds the whole run's counts, every process and every worker, resumed part included."""
        if resume_from_checkpoint in ("last", True):
            found = last_complete_checkpoint(self.args.output_dir)
            if found is None and resume_from_checkpoint is True:
                raise ValueError(f"No complete checkpoint to resume from in {self.args.output_dir}.")
            logger.info(f"Resuming from {found}." if found else f"No checkpoint in {self.args.output_dir}: starting.")
            resume_from_checkpoint = found
            self._remove_interrupted_writes()
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            problems = checkpoint_problems(resume_from_checkpoint)
            if problems:
                raise ValueError(f"Cannot resume from {resume_from_checkpoint}: {', '.join(problems)}.")
        self._restore_bad_image_counts(resume_from_checkpoint)
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        self._sync_collator_tracker()
        return output

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

    def _get_output_dir(self, trial) -> str:
        # while a checkpoint is written, the stock `_save_checkpoint` puts `checkpoint-N` under the staging folder
        return self._staging_dir if self._staging_dir is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The stock checkpoint (trained weights, optimizer, scheduler, RNG, trainer state) plus `bad_images.json`,
        written under `.tmp-checkpoint-N/checkpoint-N` and moved to `checkpoint-N` once every process has written
        its part: a kill at any moment leaves either the complete folder or no `checkpoint-N` at all."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING_PREFIX + name)
        if self.args.should_save and os.path.isdir(staging):  # left by a write that was killed
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()  # no process writes its RNG state into a folder being removed
        counts = self._total_bad_image_counts()  # collective: every process calls it
        self._saving_checkpoint, self._staging_dir = True, staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint, self._staging_dir = False, None
        self.accelerator.wait_for_everyone()  # every process's files are in the staging folder
        if self.args.should_save:
            self._publish_checkpoint(os.path.join(staging, name), os.path.join(run_dir, name), counts)
            os.rmdir(staging)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()  # no process goes on before checkpoint-N exists

    def _remove_interrupted_writes(self) -> None:
        """Delete the `.tmp-checkpoint-N` folders of writes that a kill interrupted (incomplete by construction)."""
        output_dir = self.args.output_dir
        if self.args.should_save and os.path.isdir(output_dir):
            for name in os.listdir(output_dir):
                if name.startswith(STAGING_PREFIX) and PREFIX_CHECKPOINT_DIR in name:
                    logger.warning(
                        f"Removing {os.path.join(output_dir, name)}, left by an interrupted checkpoint write."
                    )
                    shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _publish_checkpoint(self, written: str, final: str, counts: tuple[int, int]) -> None:
        """Complete the checkpoint at `written` and rename it `final` (replacing an older folder of the same step)."""
        with open(os.path.join(written, BAD_IMAGES_NAME), "w", encoding="utf-8") as file:
            json.dump({"num_seen": counts[0], "num_bad": counts[1]}, file)
        if self.state.best_model_checkpoint == written:  # the stock code named the staging path: name the final one
            self.state.best_model_checkpoint = final
            self.state.save_to_json(os.path.join(written, TRAINER_STATE_NAME))
        if os.path.exists(final):  # the same step saved again (a resumed run): the new one wins
            old = os.path.join(os.path.dirname(final), STAGING_PREFIX + "old-" + os.path.basename(final))
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(written, final)
            shutil.rmtree(old)
        else:
            os.rename(written, final)
        logger.info(f"Saved checkpoint {final}")

    # --- unreadable-image counts: from the batches (any worker), into checkpoints and the collator's tracker ---------

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        for batch in batch_samples:
            counts = batch.pop(BAD_IMAGE_COUNTS_KEY, None) if isinstance(batch, dict) else None
            if counts is not None:  # `[B, 2]` (seen, bad), summed on the device: no host sync per step
                total = counts.sum(0)
                self._bad_image_counts = total if self._bad_image_counts is None else self._bad_image_counts + total
        return batch_samples, num_items_in_batch

    def _prepare_inputs(self, inputs):
        if isinstance(inputs, dict):  # a batch that did not come through `get_batch_samples` (evaluation)
            inputs.pop(BAD_IMAGE_COUNTS_KEY, None)
        return super()._prepare_inputs(inputs)

    def _total_bad_image_counts(self) -> tuple[int, int]:
        """(seen, bad) over the whole run and every process; a collective call (every process must make it)."""
        local = torch.tensor(self._restored_bad_image_counts, dtype=torch.int64)
        if self._bad_image_counts is not None:
            local = local + self._bad_image_counts.detach().to("cpu", torch.int64)
        if self.accelerator.num_processes > 1:
            local = self.accelerator.reduce(local.to(self.args.device), reduction="sum").cpu()
        return int(local[0]), int(local[1])

    def _restore_bad_image_counts(self, checkpoint: str | None) -> None:
        """The counts saved in `checkpoint`, on the main process only (they are every process's, summed)."""
        self._bad_image_counts, self._restored_bad_image_counts = None, (0, 0)
        path = os.path.join(checkpoint, BAD_IMAGES_NAME) if checkpoint else None
        if path is None or not self.accelerator.is_main_process:
            return
        if not os.path.isfile(path):
            logger.warning(f"{checkpoint} has no {BAD_IMAGES_NAME} (an older checkpoint): image counts restart at 0.")
            return
        with open(path, encoding="utf-8") as file:
            saved = json.load(file)
        self._restored_bad_image_counts = (int(saved["num_seen"]), int(saved["num_bad"]))
        logger.info(f"Restored the unreadable-image counts from {path}: {saved['num_bad']} of {saved['num_seen']}.")

    def _sync_collator_tracker(self) -> None:
        """Put the run's totals into the collator's `tracker`, which the training scripts report: with data-loader
        workers the main process's own tracker saw nothing (each worker counts in its copy)."""
        seen, bad = self._total_bad_image_counts()
        tracker = getattr(self.data_collator, "tracker", None)
        if isinstance(tracker, BadImageTracker) and getattr(self.data_collator, "report_counts", False):
            tracker.num_seen, tracker.num_bad = seen, bad

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
