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
The optimizer (AdamW, betas from `TrainingArguments`, no weight decay on biases and norms; fused, the default, where
torch has the kernel for every trained parameter, else the unfused one) and the schedule (linear warmup, then cosine
to `min_lr`: `lr_scheduler_type="cosine_with_min_lr"`) are the Trainer's own. `torch_compile_qformer` compiles the
Q-Former alone.

Divergence never ends in a NaN model: an optimizer step whose loss or gradients are not finite on any process is
skipped on all of them (no update) with a warning naming it; `max_nonfinite_steps` consecutive ones stop the run with
`TrainingDivergedError`, and weights that are not finite are never checkpointed or returned to the script.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import safetensors.torch
import torch
from accelerate.utils import DistributedType
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
from .modeling_blip2 import frozen_tower_dtype, name_some, nonfinite_tensor_names

logger = logging.get_logger(__name__)
_SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)

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


def fused_adamw_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel can update every tensor of `params`: floating point, on a device type that
    has the kernel (CUDA, and the CPU too in torch >= 2.4). On the CPU it is also the fastest: one AdamW update of
    the 187M parameters of stage 1's Q-Former takes about 0.5 s fused against 2-6 s with `foreach`
    (benchmarks/bench_training.py --compare-optim)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch without the helper: the device types it had a kernel for
        devices = {"cuda", "cpu"}
    return all(param.device.type in devices and torch.is_floating_point(param) for param in params)


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

    torch_compile_qformer: bool = field(
        default=False,
        metadata={
            "help": "Compile the Q-Former alone with torch.compile (inductor; `torch_compile_mode` is not read, as it "
            "would compile the whole model): the trained module, where the step's time goes when the frozen towers "
            "are cached or in half precision. Off by default: the first steps pay the compilation (minutes)."
        },
    )

    max_nonfinite_steps: int = field(
        default=3,
        metadata={
            "help": "Optimizer steps whose loss or gradients are NaN/inf (on any process) are skipped: no update, a "
            "warning naming the step and the loss components, `nonfinite_steps` in the next log. This many "
            "consecutive ones stop the run (TrainingDivergedError; the training scripts exit with status 1) before "
            "any non-finite weight is written. 1: stop at the first."
        },
    )

    def __post_init__(self):
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps={self.max_nonfinite_steps}: it must be at least 1.")
        compiles_model = self.torch_compile or self.torch_compile_backend is not None or self.torch_compile_mode
        if self.torch_compile_qformer and compiles_model:
            raise ValueError(
                "torch_compile_qformer=True compiles the Q-Former alone, torch_compile (or torch_compile_backend / "
                "torch_compile_mode) the whole model: pass one of them."
            )
        if self.lr_scheduler_type in ("cosine_with_min_lr", "SchedulerType.COSINE_WITH_MIN_LR"):
            self.lr_scheduler_kwargs = {"min_lr": self.min_learning_rate, **(self.lr_scheduler_kwargs or {})}
        super().__post_init__()


class TrainingDivergedError(RuntimeError):
    """Training stopped because it diverged: `max_nonfinite_steps` consecutive optimizer steps had a non-finite loss
    or gradient, or the weights became non-finite. Raised on every process at the same step; nothing non-finite was
    written, so the newest checkpoint holds the last finite weights. The message is one line."""


class _CollatorEpoch(TrainerCallback):
    """Tells the collator the seed and the epoch, which seed each sample's augmentation: a sample's randomness then
    depends on nothing that ran before it, so a resumed run (or one with more workers) draws what an uninterrupted run
    draws. (Global RNG streams cannot promise that: the data loader collates one batch ahead of the step.)"""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.seed = args.seed
        self.collator.epoch = int(math.floor(state.epoch + 1e-6)) if state.epoch else 0


class _NonFiniteGuard(TrainerCallback):
    """Calls the trainer's divergence checks where the Trainer's loop allows it: before each optimizer step, before
    each checkpoint (`control.should_save` is set by the flow callback, which runs before this one) and at the end of
    training, before the script saves the model."""

    def __init__(self, trainer: Blip2Trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._check_step_finite()

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.trainer._check_weights_finite(f"before writing the checkpoint of step {state.global_step}")

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.trainer._check_weights_finite(f"before writing the checkpoint of step {state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._check_weights_finite("at the end of training")  # before the script saves them


class Blip2Trainer(Trainer):
    """Shared by both stages; `loss_components` names the output fields logged besides `loss`."""

    loss_components: tuple[str, ...] = ()

    def __init__(self, model=None, args: TrainingArguments | None = None, **kwargs):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
        # the model's one freezing contract, at the precision the arguments ask for on the device it trains on
        device = args.device if args is not None else None
        base.freeze_towers(frozen_tower_dtype(getattr(args, "frozen_precision", "auto"), base.config, device))
        if getattr(args, "torch_compile_qformer", False):
            # in place (`Module.compile`): the parameter names, hence checkpoints, stay those of the plain model
            base.qformer.compile()
        super().__init__(model=model, args=args, **kwargs)
        if hasattr(self.data_collator, "epoch"):
            self.add_callback(_CollatorEpoch(self.data_collator))
        self.add_callback(_NonFiniteGuard(self))
        # the logging window: loss and components, each summed over the micro-batches where it is finite, and
        # how many those were (0-dim tensors on the device), and the steps it skipped
        self._component_sums: dict[str, torch.Tensor] = {}
        self._component_counts: dict[str, torch.Tensor] = {}
        self._nonfinite_in_window = 0
        # the current optimizer step's micro-batches, kept until the step is known to be finite
        self._pending: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._nonfinite_streak = 0
        self._grads_nonfinite: torch.Tensor | None = None
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

    def get_optimizer_cls_and_kwargs(self, args: TrainingArguments, model: torch.nn.Module | None = None) -> tuple:
        """The Trainer's optimizer, with fused AdamW (`adamw_torch_fused`, the default) kept only where the kernel
        can update every trained parameter (`fused_adamw_supported`); elsewhere the `foreach` AdamW, same update,
        with a message saying so, rather than an error at the first step."""
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if optimizer_kwargs.get("fused") and model is not None:
            trained = [param for param in model.parameters() if param.requires_grad]
            if not fused_adamw_supported(trained):
                where = sorted({f"{param.device.type} {param.dtype}" for param in trained})
                logger.info(f"Fused AdamW has no kernel for parameters on {', '.join(where)}: using foreach AdamW.")
                optimizer_kwargs = {**optimizer_kwargs, "fused": False}
        return optimizer_cls, optimizer_kwargs

    def end_training(self) -> None:
        """Call last in a training script: every process waits for the others (rank 0 may still be writing the final
        folder), the distributed wrappers are released, then the process group is destroyed. A rank that simply exits
        first aborts in gloo's destructor ("terminate called without an active exception", SIGABRT), and torchrun
        then kills rank 0 mid-write. The DDP wrapper (its reducer holds the group and its pending work) is freed
        here, while the interpreter is whole, not during interpreter finalization, where destroying gloo's objects
        can abort the same way."""
        self.accelerator.wait_for_everyone()
        self.model_wrapped = self.model
        self.optimizer = self.lr_scheduler = None
        self.accelerator.free_memory()  # drops its references to the wrapped model, optimizer, data loaders; gc
        self.accelerator.end_training()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs)
        if model.training:  # kept until the optimizer step (`_check_step_finite`)
            for name in self.loss_components:
                if outputs.get(name) is not None:  # an objective the config leaves out is not logged
                    self._pending[name].append(outputs[name].detach().float())
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def training_step(
        self, model: torch.nn.Module, inputs: dict, num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """`Trainer.training_step`; after the last micro-batch of an optimizer step it notes whether the gradients
        are finite, before the Trainer clips them (clipping by an infinite norm would hide an overflow)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        # what this micro-batch adds to the step's loss, times the micro-batches: on the scale of a step's loss
        self._pending["loss"].append(loss.detach().float() * getattr(self, "current_gradient_accumulation_steps", 1))
        if self.accelerator.sync_gradients:  # the step's last micro-batch: its gradients are complete, not clipped yet
            self._grads_nonfinite = self._gradients_nonfinite()
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log
            self._log_window(logs)
        super().log(logs, start_time)

    def _log_window(self, logs: dict[str, float]) -> None:
        """Adds the logging window's loss components and, when it skipped steps, `nonfinite_steps` and its own
        `loss`: each averaged over the micro-batches (of all processes) where it is finite, NaN where none was. The
        Trainer's `loss` would count a NaN step as the mean of the steps before it, or 0 when there were none
        (`logging_nan_inf_filter`), which made a diverged run log 0."""
        names = [name for name in self.loss_components if name in self._component_sums]
        if self._nonfinite_in_window:
            logs["nonfinite_steps"] = self._nonfinite_in_window
            names = ["loss", *names] if "loss" in self._component_sums else names
        if names:  # the same names on every process (they run the same steps): the collective is safe
            sums = torch.stack([self._component_sums[name] for name in names])
            counts = torch.stack([self._component_counts[name] for name in names])
            totals = self.accelerator.reduce(torch.cat([sums, counts]).to(self.args.device), reduction="sum")
            sums, counts = totals.split(len(names))
            means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
            logs.update({name: round(value, 4) for name, value in zip(names, means.tolist())})
        self._component_sums.clear()
        self._component_counts.clear()
        self._nonfinite_in_window = 0

    def _add_to_window(self, pending: dict[str, list[torch.Tensor]]) -> None:
        """The optimizer step's micro-batch losses, each where it is finite, into the logging window."""
        device = self.args.device
        for name, values in pending.items():
            stacked = torch.stack(values).to(device)
            finite = torch.isfinite(stacked)
            zero = torch.zeros((), device=device)
            self._component_sums[name] = self._component_sums.get(name, zero) + torch.where(finite, stacked, 0).sum()
            self._component_counts[name] = self._component_counts.get(name, zero) + finite.sum()

    # --- divergence: non-finite steps skipped on every process, then a stop ------------------------------------------

    def _check_step_finite(self) -> None:
        """Before each optimizer step: the step is skipped on every process when any process saw a non-finite loss
        or gradient (noted by `training_step` before clipping). One all-reduce of two flags (`reduce` returns them
        as they are without a process group), so all processes decide alike. The step's finite losses join the
        logging window either way."""
        pending, self._pending = self._pending, defaultdict(list)
        device = self.args.device
        losses = torch.stack(pending["loss"]).to(device) if pending["loss"] else torch.zeros(1, device=device)
        grads_bad, self._grads_nonfinite = self._grads_nonfinite, None
        grads_bad = self._gradients_nonfinite() if grads_bad is None else grads_bad
        flags = torch.stack([~torch.isfinite(losses).all(), grads_bad]).float()
        loss_bad, grads_bad = (self.accelerator.reduce(flags, reduction="sum") > 0).tolist()
        self._add_to_window(pending)
        if loss_bad or grads_bad:
            self._skip_step(pending, loss_bad, grads_bad)
        else:
            self._nonfinite_streak = 0

    def _gradients_nonfinite(self) -> torch.Tensor:
        """Whether the gradients' global norm (the one the Trainer clips with) is NaN/inf: a NaN/inf gradient, or
        one so large that the norm overflows, which clipping turns into NaN or zero gradients. A 0-dim bool tensor
        (no sync). Not judged under a GradScaler (fp16 mixed precision), which skips overflowing steps itself while
        it calibrates its scale, nor for sharded gradients (FSDP, DeepSpeed); their losses are still checked."""
        false = torch.zeros((), dtype=torch.bool, device=self.args.device)
        if self.accelerator.scaler is not None or self.accelerator.distributed_type in _SHARDED:
            return false
        norms = [
            torch.linalg.vector_norm(p.grad).to(false.device) for p in self.model.parameters() if p.grad is not None
        ]
        return ~torch.isfinite(torch.linalg.vector_norm(torch.stack(norms))) if norms else false

    def _skip_step(self, pending: dict[str, list[torch.Tensor]], loss_bad: bool, grads_bad: bool) -> None:
        """No update from this step: gradients set to None, which optimizers skip (no moment update, no weight decay,
        no step count; a GradScaler has already recorded them). Warns, naming the step and its losses averaged
        across processes; raises `TrainingDivergedError` at `max_nonfinite_steps` consecutive ones."""
        self.model.zero_grad(set_to_none=True)
        self._nonfinite_streak += 1
        self._nonfinite_in_window += 1
        names = [name for name in ("loss", *self.loss_components) if pending.get(name)]
        values = ""
        if names:  # every process is here (the decision is shared): the collective is safe
            means = torch.stack([torch.stack(pending[name]).mean() for name in names]).to(self.args.device)
            means = self.accelerator.reduce(means, reduction="mean").tolist()
            values = " (" + ", ".join(f"{name}={value:.4g}" for name, value in zip(names, means)) + ")"
        what = " and ".join(word for word, bad in (("loss", loss_bad), ("gradients", grads_bad)) if bad)
        limit = self.args.max_nonfinite_steps
        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED  # its engine has stepped already
        step = self.state.global_step + 1
        message = f"step {step}: non-finite {what}{values}"
        if self.accelerator.is_main_process:
            logger.warning(f"Skipped {message}: no update ({self._nonfinite_streak} consecutive of at most {limit}).")
        if self._nonfinite_streak >= limit or deepspeed:
            raise TrainingDivergedError(
                f"training diverged: {self._nonfinite_streak} consecutive optimizer steps had a non-finite loss or "
                f"gradients, the last {message}{'; DeepSpeed steps cannot be skipped' if deepspeed else ''}. "
                f"Stopped without saving the model; the newest checkpoint in {self.args.output_dir}, if any, holds "
                f"finite weights. Lower the learning rate (now {self.args.learning_rate:g}) or check the data; "
                f"--max_nonfinite_steps sets how many such steps in a row are skipped."
            )

    def _check_weights_finite(self, when: str) -> None:
        """Raises `TrainingDivergedError` on every process when a trained weight is NaN/inf (an update that
        overflowed: non-finite gradients never reach the optimizer), before anything holding it is written."""
        model = self.accelerator.unwrap_model(self.model)
        bad = nonfinite_tensor_names({name: p.detach() for name, p in model.named_parameters() if p.requires_grad})
        flag = torch.tensor(float(len(bad)), device=self.args.device)
        if self.accelerator.reduce(flag, reduction="sum").item() > 0:
            raise TrainingDivergedError(
                f"training diverged: trained weights are not finite {when} (step {self.state.global_step})"
                f"{': ' + name_some(bad) if bad else ' on another process'}. Nothing was written; the newest "
                f"checkpoint in {self.args.output_dir}, if any, holds finite weights. Lower the learning rate (now "
                f"{self.args.learning_rate:g}) or check the data."
            )

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
    gradient accumulation divides them by the number of accumulation steps (no `num_items_in_batch`).

    ITC contrasts each image with the other captions of the step's global batch (per-device batch x processes: the
    model gathers across processes; gradient accumulation adds none) and ITM draws its hard negatives there. A
    global batch of one pair has no negative (ITC loss 0, ITM learns "always match"): refused here, before training;
    a dataset whose last batch would hold one pair gets a warning."""

    loss_components = ("loss_itc", "loss_itm", "loss_itg")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self._check_negatives()

    def _check_negatives(self) -> None:
        per_device, world = self.args.per_device_train_batch_size, self.args.world_size
        if per_device * world < 2:
            raise ValueError(
                f"Stage 1 needs at least 2 image-text pairs per step: per_device_train_batch_size={per_device} x "
                f'{world} process(es) = 1 pair, which has no negative (ITC loss 0, ITM learns "always match"). '
                f"Raise per_device_train_batch_size (gradient accumulation adds no negatives: they come from one "
                f"step's batch across processes)."
            )
        size = len(self.train_dataset) if hasattr(self.train_dataset, "__len__") else None
        # several processes pad the last batch with samples from the start (accelerate's even_batches): no lone pair
        if size is not None and world == 1 and size % per_device == 1 and not self.args.dataloader_drop_last:
            logger.warning(
                f"The last batch of each epoch holds 1 pair ({size} pairs, batches of {per_device}): that step has "
                f"no negative (ITC loss 0, ITM sees only a match). Pass --dataloader_drop_last true to drop it."
            )


class Blip2Stage2Trainer(Blip2Trainer):
    """Stage 2 (`Blip2ForConditionalGeneration`): the LM loss. For decoder-only LLMs it is normalized by the number
    of target tokens over the whole accumulated batch (`num_items_in_batch`), so accumulation equals a bigger batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # T5's own loss is a batch mean: accumulation divides it instead
        self.model_accepts_loss_kwargs = bool(base.config.use_decoder_only_language_model)
