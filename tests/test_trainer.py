"""The Trainer subclasses in process: gradient accumulation equals the bigger batch (token-normalized LM loss),
stage-1 batch-mean losses are divided by the accumulation steps, and what gets frozen."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainerCallback
from utils import draw_images

import blip2_hf
from blip2_hf.data import Stage1Collator, Stage2Collator
from blip2_hf.testing_utils import make_tiny_processor, perturb_, tiny_config_dict
from blip2_hf.trainer import Blip2Stage1Trainer, Blip2Stage2Trainer, Blip2TrainingArguments

CAPTIONS = ["a red circle", "a large blue square on the left", "two cats", "a dog running in the green grass"]


class GradientGrabber(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def processor() -> blip2_hf.Blip2Processor:
    return make_tiny_processor()


def rows(tmp_path) -> list[dict]:
    paths = []
    for i, image in enumerate(draw_images(4, size=(30, 30))):
        image.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    return [{"image": path, "caption": caption} for path, caption in zip(paths, CAPTIONS)]


def no_dropout(config: dict) -> dict:
    config["qformer_config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config["text_config"].update(dropout=0.0, attention_dropout=0.0)
    return config


def train_one_step(trainer_class, model, collator, data, tmp_path, batch_size, accumulation):
    grabber = GradientGrabber()
    args = Blip2TrainingArguments(
        output_dir=str(tmp_path / f"run_{batch_size}_{accumulation}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        train_sampling_strategy="sequential",  # the same micro-batches in every run
    )
    model = copy.deepcopy(model)  # each run starts from the same weights
    trainer = trainer_class(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[grabber])
    trainer.train()
    return grabber.grads


def test_stage2_accumulation_equals_the_bigger_batch(tmp_path):
    proc = processor()
    config = no_dropout(tiny_config_dict("opt", image_token_index=proc.image_token_id))
    config["text_config"].update(vocab_size=len(proc.tokenizer) + 4, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    model = perturb_(blip2_hf.Blip2ForConditionalGeneration(blip2_hf.Blip2Config(**config)), scale=0.1)
    data = rows(tmp_path)
    collator = Stage2Collator(proc, max_length=16)
    big = train_one_step(Blip2Stage2Trainer, model, collator, data, tmp_path, 4, 1)
    accumulated = train_one_step(Blip2Stage2Trainer, model, collator, data, tmp_path, 2, 2)
    assert set(big) == set(accumulated) and "language_projection.weight" in big
    for name in big:  # captions of different lengths: equal only with the token-count normalization
        assert torch.allclose(big[name], accumulated[name], atol=1e-6, rtol=1e-4), name
    assert not any(n.startswith("language_model.") for n in big)  # the LLM is frozen
    assert not any(n.startswith(("vision_model.encoder", "vision_model.embeddings")) for n in big)


def test_stage1_accumulation_divides_batch_means(tmp_path):
    proc = processor()
    config = no_dropout(tiny_config_dict("opt", text_input=True, image_token_index=None))
    config["qformer_config"].update(
        vocab_size=len(proc.qformer_tokenizer), bos_token_id=proc.qformer_tokenizer.bos_token_id, eos_token_id=3
    )
    torch.manual_seed(0)
    model = perturb_(blip2_hf.Blip2ForPreTraining(blip2_hf.Blip2Config(**config)), scale=0.1)
    data = rows(tmp_path)[:2] * 2  # the same two pairs twice: both micro-batches equal the first half
    collator = Stage1Collator(proc, max_length=16)
    single = train_one_step(Blip2Stage1Trainer, model, collator, data[:2], tmp_path, 2, 1)
    accumulated = train_one_step(Blip2Stage1Trainer, model, collator, data, tmp_path, 2, 2)
    # two micro-batches of the same pairs (in either order) averaged: the gradient of one (up to ITM sampling)
    name = "itm_head.weight"
    assert accumulated[name].norm() == pytest.approx(single[name].norm().item(), rel=0.3)
    assert accumulated["temp"].item() == pytest.approx(single["temp"].item(), rel=1e-4, abs=1e-6)


def test_resume_checks_the_checkpoint_keys(tmp_path):
    from safetensors.torch import save_file

    proc = processor()
    config = no_dropout(tiny_config_dict("opt", image_token_index=proc.image_token_id))
    config["text_config"].update(vocab_size=len(proc.tokenizer) + 4, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    model = blip2_hf.Blip2ForConditionalGeneration(blip2_hf.Blip2Config(**config))
    args = Blip2TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    trainer = Blip2Stage2Trainer(
        model=model, args=args, train_dataset=rows(tmp_path), data_collator=Stage2Collator(proc)
    )
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    broken = {n: t for n, t in trained.items() if n != "query_tokens"}
    broken["language_model.lm_head.weight"] = torch.zeros(1)  # a frozen weight has no place in a checkpoint
    save_file(broken, str(checkpoint / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing \['query_tokens'\], unexpected \['language_model.lm_head.weight'\]"
    ):
        trainer._load_from_checkpoint(str(checkpoint))
    save_file(trained, str(checkpoint / "model.safetensors"))
    trainer._load_from_checkpoint(str(checkpoint))  # the right keys load
