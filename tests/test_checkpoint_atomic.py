"""Checkpoints survive a kill at any moment: a folder appears as `checkpoint-N` only once complete,
`--resume_from_checkpoint last` takes the newest complete one (skipping, and naming, partial ones), and the run's
unreadable-image counts are part of the checkpoint and right with data-loader workers."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from transformers import Trainer, TrainerCallback
from utils import draw_images

import blip2_hf
from blip2_hf.data import BadImageTracker, Stage2Collator
from blip2_hf.testing_utils import make_tiny_processor, tiny_config_dict
from blip2_hf.trainer import Blip2Stage2Trainer, Blip2TrainingArguments, last_complete_checkpoint

CAPTIONS = ["a red circle", "a blue square", "two cats", "a dog on the grass", "a green tree", "a yellow sun"]


def processor() -> blip2_hf.Blip2Processor:
    return make_tiny_processor()


def model_for(proc: blip2_hf.Blip2Processor) -> blip2_hf.Blip2ForConditionalGeneration:
    config = tiny_config_dict("opt", image_token_index=proc.image_token_id)
    config["text_config"].update(vocab_size=len(proc.tokenizer) + 4, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    return blip2_hf.Blip2ForConditionalGeneration(blip2_hf.Blip2Config(**config))


def rows(folder, bad: tuple[int, ...] = ()) -> list[dict]:
    """Six image-caption rows; the images at the indices `bad` are files that do not decode."""
    folder.mkdir(exist_ok=True)
    out = []
    for i, image in enumerate(draw_images(len(CAPTIONS), size=(30, 30))):
        path = folder / f"{i}.png"
        if i in bad:
            path.write_bytes(b"not a png at all")
        else:
            image.save(path)
        out.append({"image": str(path), "caption": CAPTIONS[i]})
    return out


def trainer_for(tmp_path, data, collator=None, callbacks=(), **overrides) -> Blip2Stage2Trainer:
    proc = processor()
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="steps",
        save_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        train_sampling_strategy="sequential",
    )
    settings.update(overrides)
    args = Blip2TrainingArguments(**settings)
    collator = collator if collator is not None else Stage2Collator(proc, max_length=16)
    return Blip2Stage2Trainer(
        model=model_for(proc), args=args, train_dataset=data, data_collator=collator, callbacks=list(callbacks)
    )


class StopAfter(TrainerCallback):
    """Ends the run after `step` optimizer steps (its checkpoint written), as a kill right after it would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_last_resumes_from_the_newest_complete_checkpoint(tmp_path, caplog):
    """A kill while checkpoint-3 was written (weights there, no trainer_state.json) and a staging folder left by
    another: `last` resumes from checkpoint-2, says so and names the skipped folder; the run then rewrites
    checkpoint-3 complete."""
    data = rows(tmp_path / "images")
    trainer_for(tmp_path, data, callbacks=[StopAfter(2)]).train()
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["checkpoint-1", "checkpoint-2"]
    partial = out / "checkpoint-3"
    partial.mkdir()
    shutil.copy(out / "checkpoint-2" / "model.safetensors", partial / "model.safetensors")
    (out / ".tmp-checkpoint-4").mkdir()
    assert last_complete_checkpoint(out) == str(out / "checkpoint-2")

    trainer = trainer_for(tmp_path, data)
    with caplog.at_level(logging.INFO, logger="blip2_hf.trainer"):
        trainer.train(resume_from_checkpoint="last")
    assert f"Resuming from {out / 'checkpoint-2'}." in caplog.text
    assert f"Skipping incomplete checkpoint {partial} (no trainer_state.json)" in caplog.text
    assert trainer.state.global_step == 3
    assert not (out / ".tmp-checkpoint-4").exists()  # the interrupted write's leftovers are removed
    state = json.loads((partial / "trainer_state.json").read_text())
    assert state["global_step"] == 3  # the partial folder was replaced by a complete one
    assert last_complete_checkpoint(out) == str(partial)


def test_explicit_incomplete_checkpoint_is_refused_by_name(tmp_path):
    """Weights without trainer_state.json (a write killed half-way, by an older version): one message naming the
    folder and what it lacks, before any weights load."""
    data = rows(tmp_path / "images")
    trainer_for(tmp_path, data, callbacks=[StopAfter(1)]).train()
    partial = tmp_path / "out" / "checkpoint-1"
    (partial / "trainer_state.json").unlink()
    trainer = trainer_for(tmp_path, data)
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-1: no trainer_state.json\.$"):
        trainer.train(resume_from_checkpoint=str(partial))
    (partial / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"checkpoint-1: no trainer_state.json, no weights \(model.safetensors"):
        trainer.train(resume_from_checkpoint=str(partial))


def test_checkpoint_is_invisible_until_complete(tmp_path, monkeypatch):
    """While a checkpoint is being written (here: while the RNG state, a late part, is saved) no checkpoint-N
    exists; a write that dies there leaves no checkpoint-N at all, so `last` cannot pick it."""
    data = rows(tmp_path / "images")
    out = tmp_path / "out"
    seen_during_write = []
    original = Trainer._save_rng_state

    def watched(self, output_dir):
        seen_during_write.append(sorted(name for name in os.listdir(out) if name.startswith("checkpoint-")))
        assert os.path.isfile(os.path.join(output_dir, "model.safetensors"))  # the weights are already written
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", watched)
    trainer_for(tmp_path, data, save_total_limit=1).train()
    # checkpoint-1 and -2 existed (then rotated) before the writes of -2 and -3; the one being written never did
    assert seen_during_write == [[], ["checkpoint-1"], ["checkpoint-2"]]
    assert os.listdir(out) == ["checkpoint-3"]  # rotation kept the newest; no staging folder remains

    def dies(self, output_dir):
        raise OSError("disk full (simulated) while writing the checkpoint")

    monkeypatch.setattr(Trainer, "_save_rng_state", dies)
    shutil.rmtree(out)
    with pytest.raises(OSError, match="simulated"):
        trainer_for(tmp_path, data).train()
    assert not any(name.startswith("checkpoint-") for name in os.listdir(out))
    assert last_complete_checkpoint(out) is None


def test_bad_image_counts_with_workers_and_after_resume(tmp_path):
    """Two of six images do not decode. With a data-loader worker the counts live in the worker's collator; the
    Trainer still ends with the run's counts in the collator's tracker (what the training scripts print). A run
    stopped after step 2 saves its counts in the checkpoint, and the resumed run ends with the whole run's."""
    data = rows(tmp_path / "images", bad=(1, 4))

    def collator() -> Stage2Collator:
        return Stage2Collator(processor(), max_length=16, tracker=BadImageTracker(max_bad_fraction=1.0))

    whole = collator()
    trainer_for(tmp_path / "whole", data, whole, dataloader_num_workers=1).train()
    assert (whole.tracker.num_bad, whole.tracker.num_seen) == (2, 6)

    first = collator()
    trainer_for(tmp_path, data, first, callbacks=[StopAfter(2)], dataloader_num_workers=1).train()
    assert (first.tracker.num_bad, first.tracker.num_seen) == (1, 4)
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / "bad_images.json").read_text())
    assert saved == {"num_seen": 4, "num_bad": 1}

    resumed = collator()
    trainer_for(tmp_path, data, resumed, dataloader_num_workers=1).train(resume_from_checkpoint="last")
    assert (resumed.tracker.num_bad, resumed.tracker.num_seen) == (2, 6)
    assert json.loads((tmp_path / "out" / "checkpoint-3" / "bad_images.json").read_text()) == saved | {
        "num_seen": 6,
        "num_bad": 2,
    }


def test_collator_adds_counts_only_when_asked(tmp_path):
    """Outside the Trainer a batch is model inputs only; with `report_counts` it carries `[B, 2]` counts."""
    data = rows(tmp_path / "images", bad=(1,))
    collator = Stage2Collator(processor(), max_length=16)
    assert "bad_image_counts" not in collator(data[:3])
    collator.report_counts = True
    counts = collator(data[:3])["bad_image_counts"]
    assert counts.tolist() == [[3, 1], [0, 0]]
