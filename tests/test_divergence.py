"""Divergence never ends in a NaN model (issue 20): optimizer steps with a non-finite loss or gradient are skipped on
every process with a warning, `max_nonfinite_steps` in a row stop the run (`TrainingDivergedError`, exit 1 from the
training scripts) with nothing non-finite on disk, `save_pretrained` refuses NaN/inf tensors, and stage 1 refuses a
global batch of one pair. Faults are injected with forward / gradient hooks on tiny models."""

from __future__ import annotations

import copy
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import no_dropout, processor, rows
from transformers import TrainerCallback

import blip2_hf
from blip2_hf.data import Stage1Collator
from blip2_hf.testing_utils import perturb_, tiny_config_dict
from blip2_hf.trainer import Blip2Stage1Trainer, Blip2TrainingArguments, TrainingDivergedError

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


def stage1_model() -> blip2_hf.Blip2ForPreTraining:
    proc = processor()
    config = no_dropout(tiny_config_dict("opt", text_input=True, image_token_index=None))
    config["qformer_config"].update(
        vocab_size=len(proc.qformer_tokenizer), bos_token_id=proc.qformer_tokenizer.bos_token_id, eos_token_id=3
    )
    torch.manual_seed(0)
    return perturb_(blip2_hf.Blip2ForPreTraining(blip2_hf.Blip2Config(**config)), scale=0.1)


class Explode:
    """Fault injection on the training forwards numbered in `calls` (1-based). kind "loss": the loss and ITM loss
    become `value` and so do their gradients (a diverged model); "loss_only": the loss value is `value` but its
    gradient stays finite (what one process alone may see); "gradients": the loss stays finite, the gradient of
    `query_tokens` becomes `value`."""

    def __init__(self, model: torch.nn.Module, calls: set[int], kind: str = "loss", value: float = NAN):
        self.calls, self.kind, self.value, self.count = calls, kind, value, 0
        model.register_forward_hook(self.forward_hook)
        model.query_tokens.register_hook(self.gradient_hook)

    def forward_hook(self, module, args, output):
        if not module.training:
            return output
        self.count += 1
        if self.count in self.calls and self.kind == "loss":
            output.loss = output.loss * self.value
            output.loss_itm = output.loss_itm * self.value
        elif self.count in self.calls and self.kind == "loss_only":
            output.loss = output.loss + output.loss.detach() * self.value
        return output

    def gradient_hook(self, grad):
        return grad * self.value if self.kind == "gradients" and self.count in self.calls else grad


class WeightRecorder(TrainerCallback):
    """The trained weights after every optimizer step."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.weights[state.global_step] = trained


def make_trainer(tmp_path, model, max_steps: int, **overrides) -> Blip2Stage1Trainer:
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=max_steps,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    values.update(overrides)
    data = rows(tmp_path)
    return Blip2Stage1Trainer(
        model=model,
        args=Blip2TrainingArguments(**values),
        train_dataset=data,
        data_collator=Stage1Collator(processor(), max_length=16),
        callbacks=[WeightRecorder()],
    )


def recorder(trainer) -> WeightRecorder:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, WeightRecorder))


def all_finite(folder: Path) -> tuple[int, list[str]]:
    """How many safetensors files `folder` holds, and the non-finite tensors in them."""
    files = sorted(folder.rglob("*.safetensors"))
    bad = [f"{path}:{name}" for path in files for name, t in load_file(path).items() if not torch.isfinite(t).all()]
    return len(files), bad


def test_consecutive_nonfinite_steps_are_skipped_then_training_stops(tmp_path, caplog):
    model = stage1_model()
    Explode(model, calls={3, 4, 5, 6, 7})
    trainer = make_trainer(tmp_path, model, max_steps=8, save_strategy="steps", save_steps=2)
    with caplog.at_level(logging.WARNING, logger="blip2_hf"), pytest.raises(TrainingDivergedError) as error:
        trainer.train()
    message = str(error.value)
    assert "\n" not in message and "3 consecutive" in message and "step 5" in message, message
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipped step")]
    assert [w.split(":")[0] for w in warnings] == ["Skipped step 3", "Skipped step 4", "Skipped step 5"]
    assert "loss_itm=nan" in warnings[0] and "loss_itc=" in warnings[0] and "loss_itg=" in warnings[0]
    # the skipped steps did not update anything; the run stopped at the third one (no step 5 completed)
    weights = recorder(trainer).weights
    assert sorted(weights) == [1, 2, 3, 4]
    for name, tensor in weights[2].items():
        assert torch.equal(weights[3][name], tensor) and torch.equal(weights[4][name], tensor), name
    assert not torch.equal(weights[1]["query_tokens"], weights[2]["query_tokens"])  # finite steps did train
    # nothing non-finite on disk: the checkpoint after the skipped steps holds the last finite weights, Adam's
    # moments never saw the bad gradients
    count, bad = all_finite(tmp_path / "out")
    assert count == 2 and not bad, bad
    saved = load_file(tmp_path / "out" / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(saved[n], t) for n, t in weights[2].items())
    optimizer = torch.load(tmp_path / "out" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    moments = [t for state in optimizer["state"].values() for t in state.values() if torch.is_tensor(t)]
    assert moments and all(torch.isfinite(t).all() for t in moments)


@pytest.mark.parametrize("kind, value", [("loss", NAN), ("gradients", math.inf)])
def test_a_transient_nonfinite_step_is_skipped_and_training_goes_on(tmp_path, caplog, kind, value):
    model = stage1_model()
    Explode(model, calls={3}, kind=kind, value=value)
    trainer = make_trainer(tmp_path, model, max_steps=5)
    with caplog.at_level(logging.WARNING, logger="blip2_hf"):
        trainer.train()
    assert trainer.state.global_step == 5
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipped step")]
    assert len(warnings) == 1 and warnings[0].startswith(f"Skipped step 3: non-finite {kind}"), warnings
    weights = recorder(trainer).weights
    assert all(torch.equal(weights[3][n], t) for n, t in weights[2].items())  # no update from step 3
    assert not torch.equal(weights[4]["query_tokens"], weights[3]["query_tokens"])  # later steps train
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the logs say so: the skipped step is counted and its losses are as they were (the Trainer alone logs a NaN
    # loss as 0 or as the previous mean); the other steps are as before
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4, 5]
    assert logged[2]["nonfinite_steps"] == 1 and math.isfinite(logged[2]["loss_itc"])
    if kind == "loss":
        assert math.isnan(logged[2]["loss"]) and math.isnan(logged[2]["loss_itm"])
    else:  # the loss itself was finite, only its gradients were not
        assert math.isfinite(logged[2]["loss"]) and math.isfinite(logged[2]["loss_itm"])
    for entry in logged[:2] + logged[3:]:
        assert "nonfinite_steps" not in entry and math.isfinite(entry["loss"]) and math.isfinite(entry["loss_itc"])


def test_max_nonfinite_steps_is_configurable(tmp_path):
    model = stage1_model()
    Explode(model, calls={2})
    trainer = make_trainer(tmp_path, model, max_steps=4, max_nonfinite_steps=1)
    with pytest.raises(TrainingDivergedError, match="1 consecutive optimizer steps .* step 2"):
        trainer.train()
    with pytest.raises(ValueError, match="max_nonfinite_steps=0"):
        Blip2TrainingArguments(output_dir=str(tmp_path / "x"), max_nonfinite_steps=0, use_cpu=True)


def test_save_pretrained_refuses_nonfinite_tensors(tmp_path):
    model = stage1_model()
    with torch.no_grad():
        model.query_tokens[0, 0, 0] = NAN
        model.itm_head.weight[0, 0] = math.inf
    with pytest.raises(ValueError, match=r"2 tensor\(s\) hold NaN or inf values: query_tokens, itm_head.weight"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with torch.no_grad():
        model.query_tokens[0, 0, 0] = 0.0
        model.itm_head.weight[0, 0] = 0.0
    model.save_pretrained(tmp_path / "out")  # finite again: saved
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_push_refuses_a_folder_with_nonfinite_weights(tmp_path, monkeypatch):
    """`blip2-hf push` publishes a folder's files as they are (it does not go through `save_pretrained`): a folder
    written otherwise (an older version, by hand) with a NaN tensor is refused before any Hub request."""
    from safetensors.torch import save_file

    from blip2_hf import hub

    folder = tmp_path / "model"
    stage1_model().save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    weights["query_tokens"][0, 0, 0] = NAN
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(hub, "_hub_api", lambda *args: pytest.fail("the Hub was contacted"))
    with pytest.raises(
        hub.PushError, match=r"1 tensor\(s\) hold NaN or inf values \(model.safetensors:query_tokens\)"
    ):
        hub.push_folder(folder, "someone/diverged", token="hf_test")


def test_stage1_refuses_a_global_batch_of_one(tmp_path, monkeypatch, caplog):
    with pytest.raises(ValueError, match=r"at least 2 image-text pairs per step.*=1 x 1 process"):
        make_trainer(tmp_path, stage1_model(), max_steps=1, per_device_train_batch_size=1)
    # negatives come from the step's batch across processes: one pair on each of two processes is enough
    monkeypatch.setattr(Blip2TrainingArguments, "world_size", property(lambda self: 2))
    make_trainer(tmp_path, stage1_model(), max_steps=1, per_device_train_batch_size=1)
    monkeypatch.undo()
    # one process, 4 pairs in batches of 3: the last batch of each epoch holds one pair, which is said
    with caplog.at_level(logging.WARNING, logger="blip2_hf"):
        make_trainer(tmp_path, stage1_model(), max_steps=1, per_device_train_batch_size=3)
    assert any("--dataloader_drop_last" in r.getMessage() for r in caplog.records)


# --- two processes: the same decision on both -----------------------------------------------------------------------


def ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    results = {}
    for name, calls, max_steps in (("transient", {2}, 3), ("persistent", {1, 2, 3}, 4)):
        model = stage1_model()
        # only rank 1 sees a NaN loss, and its gradients stay finite: only the shared decision skips rank 0's step
        Explode(model, calls=calls if rank == 1 else set(), kind="loss_only")
        work = Path(out_dir) / f"{name}_{rank}"
        work.mkdir()
        trainer = make_trainer(work, model, max_steps=max_steps, max_nonfinite_steps=2)
        try:
            trainer.train()
            results[name] = "finished"
        except TrainingDivergedError as error:
            results[name] = str(error)
        results[f"{name}_weights"] = recorder(trainer).weights
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_skip_and_stop_together(tmp_path):
    import torch.multiprocessing as mp
    from test_pretraining_distributed import free_port

    context = mp.spawn(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not context.join(timeout=2):  # a process that decided alone leaves the other waiting in a collective
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two processes did not finish together: one is waiting for the other")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [r["transient"] for r in ranks] == ["finished", "finished"]
    for rank in ranks:  # both skipped step 2: no update there, and the same weights on both after every step
        weights = rank["transient_weights"]
        assert all(torch.equal(weights[2][n], t) for n, t in weights[1].items())
    for step, tensors in ranks[0]["transient_weights"].items():
        assert all(torch.equal(ranks[1]["transient_weights"][step][n], t) for n, t in tensors.items()), step
    for rank in ranks:  # both stopped at the same step, neither hung
        assert "2 consecutive" in rank["persistent"] and "step 2" in rank["persistent"], rank["persistent"]


# --- the training scripts -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tiny")
    command = [sys.executable, str(ROOT / "training" / "tiny_setup.py"), "--output", "tiny_work"]
    subprocess.run(command, cwd=work, check=True, capture_output=True)
    return work


def stage1_script(work: Path, *overrides: str) -> subprocess.CompletedProcess:
    config = ROOT / "training" / "configs" / "tiny" / "stage1.yaml"
    command = [sys.executable, str(ROOT / "training" / "stage1.py"), "--config", str(config), *overrides]
    return subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_stage1_script_with_a_huge_learning_rate_exits_1_and_writes_no_nan(tiny: Path):
    output = tiny / "tiny_work" / "diverged"
    proc = stage1_script(
        tiny, "--learning_rate", "1000", "--max_steps", "40", "--save_steps", "2", "--logging_steps", "1",
        "--output_dir", str(output),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("stage1.py: error: training diverged: 3 consecutive optimizer steps"), last
    assert "Traceback" not in proc.stderr and "Done." not in proc.stderr
    assert proc.stderr.count("WARNING blip2_hf.trainer: Skipped step") == 3
    assert not (output / "model.safetensors").exists() and not (output / "training_run.json").exists()
    count, bad = all_finite(output)
    assert count >= 1 and not bad, bad  # the checkpoints written before the stop are finite


@pytest.mark.slow
def test_stage1_script_refuses_a_batch_of_one(tiny: Path):
    proc = stage1_script(tiny, "--per_device_train_batch_size", "1", "--output_dir", "tiny_work/batch_of_one")
    assert proc.returncode != 0 and "at least 2 image-text pairs per step" in proc.stderr, proc.stderr[-3000:]
    assert not (tiny / "tiny_work" / "batch_of_one").exists() or not any((tiny / "tiny_work/batch_of_one").iterdir())


def test_weights_are_checked_before_a_checkpoint_and_at_the_end(tmp_path):
    """The last line of defence: weights that became non-finite in an update (no non-finite loss or gradient first)
    stop the run before the checkpoint that would hold them."""
    model = stage1_model()

    class Overflow(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:  # the second update
                with torch.no_grad():
                    model.query_tokens.fill_(math.inf)

    trainer = make_trainer(tmp_path, copy.deepcopy(model), max_steps=4, save_strategy="steps", save_steps=2)
    trainer.add_callback(Overflow())
    with pytest.raises(TrainingDivergedError, match=r"not finite before writing the checkpoint of step 2.*query_tok"):
        trainer.train()
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    # no checkpoint on the way: `train()` itself refuses to return them to the script that would save them
    trainer = make_trainer(tmp_path, copy.deepcopy(model), max_steps=2)
    trainer.add_callback(Overflow())
    with pytest.raises(TrainingDivergedError, match=r"not finite at the end of training \(step 2\): query_tokens"):
        trainer.train()
