"""Answering several questions per image: each image through the vision encoder, Q-Former and projection once, its
questions answered together (`Blip2ForConditionalGeneration.generate(image_rows=...)`).

A VQA dataset asks about 5 questions per image (VQAv2: 214k questions, 40k images). Answering one question per row,
as a plain `generate` batch does, encodes each image once per question; grouping the rows by image encodes it once,
and for decoder-only LLMs (OPT) also computes the keys/values of the prompt part an image's questions share
(`<image> x Q`, BOS, the prompt's words before the question) once. The answers are the same tokens.

    from blip2_hf import Blip2ForConditionalGeneration, Blip2Processor, answer_questions

    model = Blip2ForConditionalGeneration.from_pretrained("path/to/blip2-opt-2.7b").eval()
    processor = Blip2Processor.from_pretrained("path/to/blip2-opt-2.7b")
    answers = answer_questions(
        model,
        processor,
        ["kitchen.jpg", "street.jpg"],
        [["what color is the kettle?", "is the light on?"], ["how many cars are there?"]],
        num_beams=5,
        max_new_tokens=10,
    )
    # [["silver", "yes"], ["3"]]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import BatchFeature

from .constants import VQA_PROMPT
from .processing_blip2 import ImageSource, load_image

__all__ = ["answer_questions", "batches_by_image", "decode_answers", "grouped_inputs"]


def batches_by_image(counts: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Batches of whole images for `counts[i]` questions of image `i`: consecutive image indices, as many as fit in
    `batch_size` questions (an image with more questions than that makes a batch of its own: its questions are never
    split, so that it is encoded once)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    batch: list[int] = []
    rows = 0
    for index, count in enumerate(counts):
        if batch and rows + count > batch_size:
            yield batch
            batch, rows = [], 0
        batch.append(index)
        rows += count
    if batch:
        yield batch


def grouped_inputs(
    processor: Any, images: Sequence[ImageSource], texts: Sequence[Sequence[str]], **image_kwargs: Any
) -> BatchFeature:
    """The `generate(image_rows=...)` inputs of N images and, per image, its prompts (already filled in).

    Returns `pixel_values [N, 3, H, W]`, `input_ids` / `attention_mask [B, L]` (the B = sum of the prompt counts rows,
    image by image, each `[pad..., <image> x Q, BOS, prompt]`: left padding, as decoder-only generation needs) and
    `image_rows [B]` (the image of each row). `image_kwargs` go to the image processor (e.g. `size`)."""
    if len(images) != len(texts):
        raise ValueError(f"Got {len(images)} images and {len(texts)} lists of prompts; expected one list per image.")
    empty = [index for index, prompts in enumerate(texts) if len(prompts) == 0]
    if empty:
        raise ValueError(f"Image {empty[0]} has no prompts: every image needs at least one question.")
    flat = [text for prompts in texts for text in prompts]
    encoding = processor(text=flat, padding=True, padding_side="left", return_tensors="pt")
    pixels = processor(images=[load_image(image) for image in images], return_tensors="pt", **image_kwargs)
    image_rows = torch.repeat_interleave(torch.arange(len(images)), torch.tensor([len(p) for p in texts]))
    return BatchFeature(
        {
            "pixel_values": pixels["pixel_values"],
            "input_ids": encoding["input_ids"],
            "attention_mask": encoding["attention_mask"],
            "image_rows": image_rows,
        }
    )


def decode_answers(model: Any, processor: Any, output: torch.LongTensor, prompt_length: int) -> list[str]:
    """`generate`'s output `[B, L_out]` as stripped texts: decoder-only LLMs return prompt + new tokens (the prompt,
    `prompt_length` columns, is cut off), encoder-decoder ones only the decoder's tokens."""
    if model.config.use_decoder_only_language_model:
        output = output[:, prompt_length:]
    return [text.strip() for text in processor.batch_decode(output, skip_special_tokens=True)]


@torch.no_grad()
def answer_questions(
    model: Any,
    processor: Any,
    images: Sequence[ImageSource],
    questions: Sequence[Sequence[str]],
    prompt: str = VQA_PROMPT,
    batch_size: int = 32,
    use_chat_template: bool = False,
    **generate_kwargs: Any,
) -> list[list[str]]:
    """Answer `questions[i]` (a list) about `images[i]`, for every image; each image is encoded once.

    Args:
        model: a `Blip2ForConditionalGeneration`.
        processor: its `Blip2Processor`.
        images: N images: paths, URLs, PIL images, ... (anything `load_image` reads).
        questions: N lists of questions, one list per image (at least one question each).
        prompt: the template, `{}` where the question goes (default: LAVIS's zero-shot VQA prompt).
        batch_size: about how many questions per `generate` call: whole images are packed until the next would
            exceed it (an image with more questions is a batch of its own).
        use_chat_template: put each filled-in prompt into the LLM tokenizer's chat template as a user turn
            (`processor.chat_prompt`), for chat / instruct LLMs; the default is BLIP-2's plain prompt.
        generate_kwargs: for `generate` (`num_beams`, `max_new_tokens`, ...), over `model.generation_config`.
    Returns:
        N lists: the answers to `questions[i]`, in order, stripped.
    """
    if "{}" not in prompt:
        raise ValueError(f"prompt needs {{}} where the question goes; got {prompt!r}.")
    if len(images) != len(questions):
        raise ValueError(f"Got {len(images)} images and {len(questions)} lists of questions; expected one per image.")
    answers: list[list[str]] = []
    for batch in batches_by_image([len(q) for q in questions], batch_size):
        texts = [[prompt.replace("{}", question) for question in questions[index]] for index in batch]
        if use_chat_template:
            texts = [[processor.chat_prompt(text) for text in texts_of_image] for texts_of_image in texts]
        inputs = grouped_inputs(processor, [images[index] for index in batch], texts).to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.vision_model.dtype)
        output = model.generate(**inputs, **generate_kwargs)
        if output.shape[0] != inputs["input_ids"].shape[0]:
            raise ValueError("answer_questions gives one answer per question: leave num_return_sequences at 1.")
        flat = iter(decode_answers(model, processor, output, inputs["input_ids"].shape[1]))
        answers.extend([next(flat) for _ in texts_of_image] for texts_of_image in texts)
    return answers
