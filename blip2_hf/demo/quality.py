"""What the frozen towers can pass on, measured on the demo's world: a linear probe of the image encoder's features
(per attribute the captions name) and the language model alone on the test questions (with the true caption first,
and from the question alone). `blip2-hf demo --build-towers` records these in `towers.json`; the demo measures them
again on its own run for the report."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer, OPTForCausalLM

from ..metrics import vqa_accuracy
from ..modeling_blip2 import Blip2VisionModel
from ..processing_blip2 import Blip2Processor
from . import VQA_PROMPT
from .probe import probe_image_encoder
from .world import IMAGE_SIZE, make_world

# The demo world the checks run on: `DemoSettings()`'s training and test splits (world seed 0).
PROBE_TRAIN, PROBE_TEST = 4000, 200


def first_line(text: str) -> str:
    return text.replace("</s>", "\n").replace("<pad>", "").split("\n")[0].strip()


@torch.inference_mode()
def text_only_vqa(
    llm: OPTForCausalLM, tokenizer: Any, test: Sequence[dict], batch_size: int = 128, per_type: bool = False
) -> dict:
    """The LLM alone on the test questions (`test`: records with "caption" and "questions"): after the image's first
    ground-truth caption (what the image tells, as text: the ceiling for zero-shot VQA through it) and from the
    question alone (its prior: the floor). Exact-match accuracy (%) per setting; with `per_type`, also
    `"with_caption_per_type"`: `{question type: accuracy}` after the caption."""
    questions = [(record, qa) for record in test for qa in record["questions"]]
    newline = tokenizer("\n", add_special_tokens=False).input_ids[0]
    result = {}
    contexts = {"with_caption": lambda r: r["caption"][0] + "\n", "without_context": lambda r: ""}
    for name, context in contexts.items():
        prompts = [context(record) + VQA_PROMPT.format(qa["question"]) for record, qa in questions]
        answers = []
        for start in range(0, len(prompts), batch_size):
            inputs = tokenizer(
                prompts[start : start + batch_size], padding=True, padding_side="left", return_tensors="pt"
            )
            ids = llm.generate(
                **inputs, max_new_tokens=4, do_sample=False, eos_token_id=[newline, tokenizer.eos_token_id],
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            answers += [first_line(text) for text in tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1] :])]
        references = [qa["answer"] for _, qa in questions]
        scores = vqa_accuracy(answers, references, mode="gqa", question_types=[qa["type"] for _, qa in questions])
        result[name] = scores["accuracy"]
        if per_type and name == "with_caption":
            result["with_caption_per_type"] = {
                kind: round(value, 1) for kind, value in scores["per_question_type"].items()
            }
    return result


def probe_on_world(
    vision: Blip2VisionModel,
    image_processor: Any,
    train: Sequence[dict],
    train_images: Sequence[Image.Image],
    test: Sequence[dict],
    test_images: Sequence[Image.Image],
) -> dict[str, dict[str, float]]:
    """`probe_image_encoder` on records (with "scene") and their images, through the image processor."""
    train_pixels = image_processor(images=list(train_images), return_tensors="pt")["pixel_values"]
    test_pixels = image_processor(images=list(test_images), return_tensors="pt")["pixel_values"]
    return probe_image_encoder(
        vision, train_pixels, [r["scene"] for r in train], test_pixels, [r["scene"] for r in test]
    )


def quality_checks(towers: Path) -> dict[str, Any]:
    """The probe (`{attribute: {"accuracy", "majority"}}`, %) and the text-only VQA of the towers in `towers`, on
    the demo world's training / test splits (drawn in memory, not written)."""
    world = make_world(PROBE_TRAIN, 1, PROBE_TEST, seed=0)
    records = {split: [_record(scene) for scene in scenes] for split, scenes in world.items()}
    vision = Blip2VisionModel.from_pretrained(towers / "vision_encoder", dtype=torch.float32)
    image_processor = Blip2Processor.default_image_processor(IMAGE_SIZE)
    probe = probe_on_world(
        vision, image_processor, records["train"], [s.draw() for s in world["train"]],
        records["test"], [s.draw() for s in world["test"]],
    )  # fmt: skip
    llm = OPTForCausalLM.from_pretrained(towers / "language_model", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(towers / "language_model")
    llm_scores = text_only_vqa(llm, tokenizer, records["test"], per_type=True)
    return {"probe": probe, "llm_per_type": llm_scores.pop("with_caption_per_type"), "llm": llm_scores}


def _record(scene: Any) -> dict:
    return {
        "caption": scene.captions(),
        "questions": scene.questions(),
        "scene": [dataclasses.asdict(group) for group in scene.groups],
    }
