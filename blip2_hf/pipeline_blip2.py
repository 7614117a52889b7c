"""`image-to-text` for BLIP-2: a caption from an image alone, or an answer to an optional prompt.

transformers 5 removed the `image-to-text` task and redirects it to `image-text-to-text`, which refuses to run
without text. A checkpoint's `config.custom_pipelines` is consulted before that redirect, so our checkpoints name this
class there and `pipeline("image-to-text", model=folder, trust_remote_code=True)(image)` captions with no prompt.
This file is copied into saved checkpoints as remote code: it imports only transformers and torch.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Pipeline


class Blip2ImageToTextPipeline(Pipeline):
    """`pipe(image)` -> `[{"generated_text": caption}]`; `pipe(image, prompt="Question: ... Answer:")` -> the answer.
    `image` is a PIL image, an array, a path, a URL or a `data:` URI, decoded by the processor's
    `Blip2Processor.load_image` whatever the image encoder (16-bit, float, transparency and EXIF orientation as the CLI
    and training read them; never transformers' `load_image`, which turns 16-bit PNGs white and float TIFFs black); a
    list of them gives a list of results. Generation settings come from the model's `generation_config`, overridden by
    `max_new_tokens=...` or `generate_kwargs={...}`. The returned text is the generated continuation only, never the
    prompt.

    The model loads through the strict `from_pretrained` (modeling_blip2.py): a folder with tensors missing, unexpected
    or of another shape raises `CheckpointMismatchError` naming them, rather than `pipeline` falling back to
    transformers' own `Blip2ForConditionalGeneration` with random weights; `model_kwargs={"strict": False}` loads it
    anyway."""

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(
        self,
        prompt: str | None = None,
        max_new_tokens: int | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
        **kwargs,
    ) -> tuple[dict, dict, dict]:
        forward_params = dict(generate_kwargs or {})
        if max_new_tokens is not None:
            forward_params["max_new_tokens"] = max_new_tokens
        return {"prompt": prompt, "timeout": timeout}, forward_params, {}

    def preprocess(self, image, prompt: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        image = self._load_image(image, timeout)
        if prompt is None:  # image only: the model builds `[<image> x Q, BOS]` itself, as LAVIS captions
            return dict(self.processor(images=image, return_tensors="pt"))
        return dict(self.processor(images=image, text=prompt, return_tensors="pt"))

    def _load_image(self, image: Any, timeout: float | None) -> Any:
        """`image` decoded by BLIP-2's image loader, reached through the processor (this file imports only
        transformers and torch): `Blip2Processor.load_image`, whatever encoder's image processor it holds (SigLIP's,
        CLIP's, ...), or a `Blip2ImageProcessor`'s own. A processor without either (transformers' `Blip2Processor`)
        gets decoded images as they are, and a path or URL is refused rather than decoded another way."""
        loader = getattr(self.processor, "load_image", None)
        loader = loader or getattr(self.processor.image_processor, "load_image", None)
        if loader is not None:
            return loader(image) if timeout is None else loader(image, timeout=timeout)
        if isinstance(image, (str, bytes, os.PathLike)):
            raise TypeError(
                f"This pipeline reads image files with blip2-hf's image loader, which this processor "
                f"({type(self.processor).__name__} with a {type(self.processor.image_processor).__name__}) lacks. "
                "Pass decoded images (PIL) instead."
            )
        return image

    def _forward(self, model_inputs: dict[str, Any], **generate_kwargs) -> dict[str, Any]:
        model_inputs["pixel_values"] = model_inputs["pixel_values"].to(self.model.vision_model.dtype)
        generated = self.model.generate(**model_inputs, **generate_kwargs)
        prompt_length = 0
        if self.model.config.use_decoder_only_language_model:  # the output starts with the LLM prompt
            if "input_ids" in model_inputs:
                prompt_length = model_inputs["input_ids"].shape[1]
            else:
                prompt_length = self.model._image_only_input_ids(1, generated.device).shape[1]
        return {"new_tokens": generated[:, prompt_length:]}

    def postprocess(self, model_outputs: dict[str, torch.Tensor]) -> list[dict[str, str]]:
        texts = self.processor.batch_decode(model_outputs["new_tokens"], skip_special_tokens=True)
        return [{"generated_text": text.strip()} for text in texts]
