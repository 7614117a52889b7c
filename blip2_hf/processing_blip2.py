"""Processor for BLIP-2: an image processor, the language-model tokenizer and, optionally, the Q-Former tokenizer.

This file is copied next to saved checkpoints as remote code, so it only imports the standard library, NumPy, PIL,
torch and transformers.
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import AutoTokenizer, BlipImageProcessorPil
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import AddedToken, PreTrainedTokenizerBase
from transformers.utils import PaddingStrategy

SingleImage = Image.Image | np.ndarray | torch.Tensor
ImagesInput = SingleImage | Sequence[SingleImage]
# What `load_image` reads: a decoded image, a path, an http(s) URL or `data:` URI, encoded bytes, or the
# `{"path", "bytes"}` dict of `datasets.Image(decode=False)`.
ImageSource = SingleImage | str | os.PathLike | bytes | bytearray | memoryview | Mapping[str, Any]

# Seconds `load_image` waits for an image URL to answer (connection and each read), unless told otherwise.
DEFAULT_URL_TIMEOUT = 60.0
# The EXIF tag that says how to turn the stored pixels to show the picture upright (1 = as stored).
_EXIF_ORIENTATION = 0x0112

_ACCEPTED_IMAGE_TYPES = "PIL.Image.Image, numpy.ndarray (HWC or HW) or torch.Tensor (CHW or HW)"
# 16-bit PIL modes. `np.asarray` gives uint16 (or a byte-swapped uint16) for all of them.
_PIL_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# transformers' BLIP image processors (PIL and torchvision backends, and the v4 "Fast" name) that
# `Blip2Processor` replaces by a `Blip2ImageProcessor` with the same settings.
_BLIP_IMAGE_PROCESSORS = ("BlipImageProcessor", "BlipImageProcessorPil", "BlipImageProcessorFast")
# Entries of an image processor's `to_dict` that name or place it rather than set how it processes images.
_NOT_SETTINGS = ("image_processor_type", "auto_map", "processor_class", "_processor_class")
# Per-token outputs that `tokenizer.pad` knows how to pad; the image-token prefix is prepended to each of them.
_PREFIX_VALUES = {"attention_mask": 1, "token_type_ids": 0, "special_tokens_mask": 1}
# `push_to_hub` arguments that `save_pretrained(..., push_to_hub=True)` passes on.
_PUSH_KWARGS = ("commit_message", "commit_description", "token", "private", "revision", "create_pr", "tags")
# Tokenizer outputs that have no meaning once image tokens are prepended and the rows re-padded.
_UNSUPPORTED_WITH_EXPANSION = ("return_overflowing_tokens", "return_offsets_mapping", "return_length")
# Tokenizer arguments forwarded to the Q-Former tokenizer. `padding_side` is deliberately not among them: the merged
# text kwargs carry the *language-model* tokenizer's side (often "left"), and the Q-Former (BERT) pads on the right.
_QFORMER_TEXT_KWARGS = ("add_special_tokens", "padding", "truncation", "max_length", "pad_to_multiple_of")


class Blip2ImageProcessor(BlipImageProcessorPil):
    r"""
    The BLIP-2 image processor: decodes every image to an 8-bit RGB `PIL.Image`, then resizes (bicubic, PIL),
    rescales by 1/255 and normalises with the CLIP mean/std, as LAVIS' `blip_image_eval` does. Defaults to 224 px, the
    size of the released checkpoints. The resizing and normalisation are those of transformers' `BlipImageProcessorPil`
    (the PIL/NumPy backend: no torchvision needed); only the decoding rules are BLIP-2's own:

    - The EXIF orientation is applied first: the image is turned the way every viewer shows it (what a caption or a
      question about "the left" refers to). LAVIS' `Image.open(path).convert("RGB")` does not; this differs from it
      only for files whose orientation tag is not 1 (phone photos, rarely benchmark images).
    - Transparency (`RGBA`, `LA`, `PA`, `P` or `L` with a `transparency` entry, 4-channel arrays) is composited on
      *white*, as transformers' `convert_to_rgb` and web pages do. Not on black, and not dropped as LAVIS'
      `convert("RGB")` does: fully transparent pixels are usually stored as black, so black glyphs or a dark logo on a
      transparent background would become a uniformly black image; on white they stay visible.
    - Other PIL modes (`L`, `1`, `P`, `CMYK`, `YCbCr`, ...) go through `Image.convert("RGB")`.
    - 16-bit modes (`I;16`, `I;16B`, ...) are scaled by 255/65535 (65535 -> 255), not clipped at 255 as
      `Image.convert` would. Mode `I` (32-bit integer) is read as 16-bit data when its values fit in [0, 65535], which
      is how 16-bit PNG/TIFF content usually ends up in that mode, and as 31-bit data otherwise (negatives -> 0).
    - Mode `F` (32-bit float) and float arrays/tensors are read as [0, 1] when all values lie in that range, and as
      [0, 255] otherwise; 8-bit values are rounded, not truncated.
    - NumPy arrays are `(H, W, C)` or `(H, W)`; torch tensors are `(C, H, W)` or `(H, W)` (the other layout is also
      recognised when unambiguous). A 4-channel array/tensor is RGBA (composited on white), a 1-channel one grey.
    - A 4D array `(B, H, W, C)` or tensor `(B, C, H, W)` is a batch of `B` images.

    Files, URLs and bytes are read by [`Blip2ImageProcessor.load_image`] (also `blip2_hf.load_image`), which applies
    the same rules: the pipeline, the CLI, the training collators and the evaluation scripts all decode through it.

    Its settings are saved (`preprocessor_config.json`, or the `image_processor` entry of a processor's
    `processor_config.json`) under `image_processor_type: "Blip2ImageProcessor"`.
    """

    size = {"height": 224, "width": 224}

    def preprocess(self, images: ImagesInput, *args: Any, **kwargs: Any) -> BatchFeature:
        """
        Decode `images` (see the class docstring), then resize and normalise them like `BlipImageProcessorPil`.

        Returns:
            `BatchFeature` with `pixel_values`: `(B, 3, height, width)` float32 (a list of `(3, height, width)`
            arrays without `return_tensors`).

        Raises:
            TypeError / ValueError: see [`Blip2ImageProcessor.to_rgb_images`].
        """
        return super().preprocess(self.to_rgb_images(images), *args, **kwargs)

    @classmethod
    def from_blip_image_processor(cls, image_processor: BaseImageProcessor) -> Blip2ImageProcessor:
        """
        This class with the settings of transformers' `BlipImageProcessor` / `BlipImageProcessorPil`: what a folder
        saved before this class existed (or by transformers' `Blip2Processor`) holds. Both give the same pixel values
        on 8-bit RGB images; this one adds the decoding rules.
        """
        settings = {key: value for key, value in image_processor.to_dict().items() if key not in _NOT_SETTINGS}
        return cls(**settings)

    @classmethod
    def load_image(cls, image: ImageSource, timeout: float | None = DEFAULT_URL_TIMEOUT) -> Image.Image:
        """
        Read and fully decode one image as an 8-bit RGB `PIL.Image`, by the rules of the class docstring (EXIF
        orientation, transparency on white, 16-bit and float scaling). Every entry point that reads image files
        calls this, so a file gives the same pixels through the pipeline, the CLI, training and evaluation.

        Args:
            image: a path (`str` / `os.PathLike`); an `http://` / `https://` URL; a `data:image/...;base64,...` URI;
                encoded bytes (`bytes`, `bytearray`, `memoryview`); a `{"path", "bytes"}` dict as
                `datasets.Image(decode=False)` stores it (bytes win when both are set); or an already decoded
                `PIL.Image.Image`, NumPy array `(H, W[, C])` or torch tensor `(C, H, W)` / `(H, W)`.
            timeout: seconds to wait for a URL's server (connection and each read); None waits forever.

        The pixels are decoded here (`Image.load()`), so a truncated or corrupt file raises now, not later in the
        image processor.

        Raises:
            FileNotFoundError: the path does not exist. IsADirectoryError: it is a folder.
            OSError: not an image, truncated, or a URL that fails or does not answer within `timeout` (names it).
            ValueError: None, an empty dict, a malformed `data:` URI, or pixels the rules refuse (NaN, ...).
            TypeError: an unsupported type.
        """
        if isinstance(image, Mapping):
            if image.get("bytes") is not None:
                image = image["bytes"]
            elif image.get("path") is not None:
                image = image["path"]
            else:
                raise ValueError(f"Image entry {dict(image)!r} has neither bytes nor a path.")
        if image is None:
            raise ValueError("The sample has no image.")
        if isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
            if isinstance(image, Image.Image):
                image.load()
            return cls._to_rgb(image, 0)
        with Image.open(_image_file(image, timeout)) as opened:
            opened.load()
            return cls._to_rgb(opened, 0)

    @classmethod
    def to_rgb_images(cls, images: ImagesInput) -> list[Image.Image]:
        """
        Turn `images` (one image, a list, or a 4D batch array/tensor) into a list of 8-bit RGB `PIL.Image`s, following
        the conversion rules of the class docstring.

        Raises:
            TypeError: an element is not a PIL image, NumPy array or torch tensor (names its index and type).
            ValueError: an empty batch, a zero-size image, an unsupported shape, dtype or value range (names the index).
        """
        if isinstance(images, (list, tuple)):
            items = list(images)
        elif isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            items = list(images)
        else:
            items = [images]
        if not items:
            raise ValueError("`images` is empty; pass at least one image.")
        return [cls._to_rgb(item, index) for index, item in enumerate(items)]

    @classmethod
    def _to_rgb(cls, image: Any, index: int) -> Image.Image:
        if isinstance(image, Image.Image):
            return cls._pil_to_rgb(image, index)
        if isinstance(image, torch.Tensor):
            array = image.detach().cpu()
            if array.is_floating_point() and array.dtype != torch.float64:
                array = array.float()  # NumPy has no bfloat16
            return cls._array_to_rgb(array.numpy(), index, channels_first=True)
        if isinstance(image, np.ndarray):
            return cls._array_to_rgb(image, index, channels_first=False)
        raise TypeError(
            f"Image at index {index} has type {type(image).__module__}.{type(image).__qualname__}; "
            f"accepted types are {_ACCEPTED_IMAGE_TYPES}."
        )

    @staticmethod
    def _pil_to_rgb(image: Image.Image, index: int) -> Image.Image:
        width, height = image.size
        if width == 0 or height == 0:
            raise ValueError(f"Image at index {index} has zero size (width={width}, height={height}).")
        if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
        mode = image.mode
        if mode == "RGB":
            return image
        if mode in _PIL_16BIT_MODES or mode in ("I", "F"):
            values = np.asarray(image).astype(np.float64)
            if mode in _PIL_16BIT_MODES:
                scale = 255.0 / 65535.0
            elif mode == "I":
                # 32-bit container: 16-bit PNG/TIFF data usually lives here, full-range data is rare.
                values = np.clip(values, 0, None)
                scale = 255.0 / 65535.0 if values.max() <= 65535 else 255.0 / (2**31 - 1)
            else:  # "F"
                if not np.isfinite(values).all():
                    raise ValueError(f"Image at index {index} (PIL mode 'F') contains NaN or infinite values.")
                scale = 255.0 if values.min() >= 0 and values.max() <= 1 else 1.0
            grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
            return Image.fromarray(grey).convert("RGB")
        if {"A", "a"} & set(image.getbands()) or "transparency" in image.info:
            # One compositing for PIL images and arrays (`_composite_on_white`), so both give the same pixels.
            return Image.fromarray(_composite_on_white(np.asarray(image.convert("RGBA"))))
        try:
            return image.convert("RGB")
        except (ValueError, OSError) as error:
            raise ValueError(
                f"Image at index {index} has PIL mode {mode!r}, which cannot be converted to RGB."
            ) from error

    @staticmethod
    def _array_to_rgb(array: np.ndarray, index: int, channels_first: bool) -> Image.Image:
        kind = "tensor" if channels_first else "array"
        if array.ndim == 3:
            first, last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
            # The documented layout wins when both axes could hold channels (e.g. a 3x3x3 array).
            is_channels_first = first if channels_first else first and not last
            if is_channels_first:
                array = np.moveaxis(array, 0, -1)
            elif not last:
                raise ValueError(
                    f"Image at index {index} is a {kind} of shape {tuple(array.shape)}: expected 1, 3 or 4 channels "
                    f"({'(C, H, W)' if channels_first else '(H, W, C)'})."
                )
        elif array.ndim != 2:
            raise ValueError(
                f"Image at index {index} is a {kind} with {array.ndim} dimensions (shape {tuple(array.shape)}); "
                "expected (H, W) or an image with a channel axis."
            )
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise ValueError(
                f"Image at index {index} has zero size (height={array.shape[0]}, width={array.shape[1]})."
            )

        if array.dtype == np.uint8:
            pixels = array
        elif array.dtype == np.bool_:
            pixels = array.astype(np.uint8) * 255
        elif array.dtype == np.uint16:
            pixels = np.rint(array.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
        elif np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating):
            values = array.astype(np.float64)
            if not np.isfinite(values).all():
                raise ValueError(f"Image at index {index} contains NaN or infinite values.")
            low, high = values.min(), values.max()
            if low < 0 or high > 255:
                raise ValueError(
                    f"Image at index {index} has values in [{low}, {high}]; expected [0, 1] (float) or [0, 255]."
                )
            is_unit_float = np.issubdtype(array.dtype, np.floating) and high <= 1
            pixels = np.rint(values * 255.0 if is_unit_float else values).astype(np.uint8)
        else:
            raise ValueError(f"Image at index {index} has unsupported dtype {array.dtype}.")

        if pixels.ndim == 3:
            channels = pixels.shape[-1]
            # 4 channels: RGBA, composited on white as the PIL path does.
            pixels = pixels[..., 0] if channels == 1 else _composite_on_white(pixels) if channels == 4 else pixels
        pixels = np.ascontiguousarray(pixels)
        return Image.fromarray(pixels).convert("RGB")  # 2D uint8 -> "L", (H, W, 3) -> "RGB"


class _PresentSubProcessors:
    """Stand-in for `ProcessorMixin.get_attributes` that knows about optional sub-processors.

    `ProcessorMixin` treats every tokenizer-like `__init__` argument as mandatory: `__init__` counts them and
    `save_pretrained` calls `save_pretrained` on each one. Looked up on the class (as `from_pretrained` and `to_dict`
    do) this returns every declared sub-processor, so loading still looks for `qformer_tokenizer/`. Looked up on an
    instance it leaves out the optional sub-processors that were given as `None`, so a processor without a Q-Former
    tokenizer initialises, prints and saves exactly like a two-part processor.
    """

    def __init__(self, optional: tuple[str, ...]):
        self.optional = optional

    def __get__(self, instance: Any, owner: type) -> Any:
        declared = ProcessorMixin.get_attributes.__func__(owner)
        if instance is None:
            return lambda: list(declared)
        absent = {name for name in self.optional if name in instance.__dict__ and instance.__dict__[name] is None}
        return lambda: [name for name in declared if name not in absent]


class Blip2Processor(ProcessorMixin):
    r"""
    Builds BLIP-2 inputs: `pixel_values` from images, language-model `input_ids` / `attention_mask` from text (with
    the image placeholder tokens in front), and, for stage-1 (Q-Former) training, `qformer_input_ids` /
    `qformer_attention_mask` from the same text.

    Image placeholders. If the tokenizer has no `image_token`, `"<image>"` is added to it as a special token (the
    tokenizer is modified in place). `processor.image_token_id` is its id, and the model's `config.image_token_index`
    must equal it. When `num_query_tokens` is set, every tokenized text gets `num_query_tokens` image tokens *before*
    its BOS token (text-only calls too, so a prompt can be tokenized before its image is at hand); the model replaces
    them with the Q-Former outputs. Padding is true padding around the whole
    sequence: with `padding_side="left"` a row reads `[pad, ..., pad, <image> x Q, BOS, text]`, with right padding
    `[<image> x Q, BOS, text, pad, ..., pad]`. (transformers' own `Blip2Processor` left-pads between the image tokens
    and BOS instead; keeping pads outside means a padded row is the unpadded prompt shifted, which is what language
    models that derive positions from the attention mask *or* from `arange` both expect.) With
    `num_query_tokens=None` text is tokenized as is (legacy behaviour, for models that do not look for placeholders).

    Images go to the image processor as given: [`Blip2ImageProcessor`] (the default) decodes them (16-bit, float,
    palettes, alpha, arrays and tensors) before resizing and normalising.

    Args:
        image_processor (`BaseImageProcessor`, *optional*):
            Decodes, resizes and normalises the images. Defaults to [`Blip2Processor.default_image_processor`] (a
            [`Blip2ImageProcessor`]: 224 px, bicubic, CLIP mean/std), the preprocessing of the original BLIP-2
            checkpoints. transformers' `BlipImageProcessor` / `BlipImageProcessorPil` (what older folders and
            transformers' `Blip2Processor` hold) is replaced by a `Blip2ImageProcessor` with the same settings; any
            other image processor is used as given, with its own image decoding.
        tokenizer (`PreTrainedTokenizerBase`):
            The language-model tokenizer (OPT, Flan-T5, LLaMA/Vicuna, ...). Gets `"<image>"` added if it has no
            `image_token`.
        qformer_tokenizer (`PreTrainedTokenizerBase`, *optional*):
            BERT tokenizer of the Q-Former (with `[DEC]` as BOS, as in LAVIS), needed for stage-1 training. Saved in
            the `qformer_tokenizer/` subfolder, like InstructBLIP's processor.
        num_query_tokens (`int`, *optional*):
            Number of Q-Former query tokens (`config.num_query_tokens`): how many image tokens each text gets.
        chat_template (`str`, *optional*):
            Jinja chat template, kept for API compatibility (BLIP-2 checkpoints have none).

    Example:

    ```python
    >>> processor = Blip2Processor(tokenizer=opt_tokenizer, num_query_tokens=32)  # default 224 px image processor
    >>> inputs = processor(images=[image_a, image_b], text=["a photo of", "Question: what is it? Answer:"],
    ...                    padding=True, return_tensors="pt")
    >>> inputs["pixel_values"].shape, inputs["input_ids"][:, -1].tolist()  # left padding: last column is real text
    (torch.Size([2, 3, 224, 224]), [...])
    ```
    """

    # Lowest-priority defaults that `ProcessorMixin._merge_kwargs` puts under every call: BLIP-2 language models take
    # no token type ids.
    text_kwargs = {"return_token_type_ids": False}
    get_attributes = _PresentSubProcessors(optional=("qformer_tokenizer",))

    def __init__(
        self,
        image_processor: BaseImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        qformer_tokenizer: PreTrainedTokenizerBase | None = None,
        num_query_tokens: int | None = None,
        chat_template: str | None = None,
    ):
        if tokenizer is None:
            raise ValueError("Blip2Processor needs a `tokenizer` (the language-model tokenizer); got None.")
        if isinstance(qformer_tokenizer, int) and not isinstance(qformer_tokenizer, bool):
            # transformers' Blip2Processor takes `num_query_tokens` third; here the third slot is the Q-Former
            # tokenizer (sub-processors must come first for `from_pretrained`).
            raise TypeError(
                f"Got the integer {qformer_tokenizer} as `qformer_tokenizer`; pass it as `num_query_tokens="
                f"{qformer_tokenizer}` (keyword) instead."
            )
        if num_query_tokens is not None and (
            isinstance(num_query_tokens, bool) or not isinstance(num_query_tokens, int) or num_query_tokens < 1
        ):
            raise ValueError(f"`num_query_tokens` must be a positive int or None, got {num_query_tokens!r}.")
        if image_processor is None:
            image_processor = self.default_image_processor()
        elif _is_transformers_blip_image_processor(image_processor):
            # What folders saved before `Blip2ImageProcessor` existed, or by transformers' Blip2Processor, load as.
            image_processor = Blip2ImageProcessor.from_blip_image_processor(image_processor)

        image_token = getattr(tokenizer, "image_token", None)
        if image_token is None:
            # Adding an existing token is a no-op, so a tokenizer saved with "<image>" keeps its id on reload.
            tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
            image_token = "<image>"
        self.image_token = str(image_token)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or (
            self.image_token_id == tokenizer.unk_token_id and self.image_token != tokenizer.unk_token
        ):
            raise ValueError(f"The tokenizer's image token {self.image_token!r} is not in its vocabulary.")
        self.num_query_tokens = num_query_tokens

        sub_processors = {"image_processor": image_processor, "tokenizer": tokenizer}
        # Set before `super().__init__`, which asks `get_attributes` which sub-processors to expect.
        self.qformer_tokenizer = qformer_tokenizer
        if qformer_tokenizer is not None:
            sub_processors["qformer_tokenizer"] = qformer_tokenizer
        super().__init__(**sub_processors, chat_template=chat_template)

    def without_qformer_tokenizer(self) -> Blip2Processor:
        """
        This processor without its Q-Former tokenizer: what a model whose Q-Former reads no text consumes (stage 2,
        `Blip2ForConditionalGeneration` with `qformer_config.use_qformer_text_input=False`, like the Salesforce/blip2-*
        processors). It shares this processor's image processor and language-model tokenizer (not copies) and keeps
        `num_query_tokens` and the chat template; calling it returns no `qformer_input_ids` / `qformer_attention_mask`.
        """
        return type(self)(
            image_processor=self.image_processor,
            tokenizer=self.tokenizer,
            num_query_tokens=self.num_query_tokens,
            chat_template=self.chat_template,
        )

    @staticmethod
    def qformer_tokenizer_from_bert(
        bert_name_or_path: str | os.PathLike, decoder_token: str = "[DEC]", **kwargs: Any
    ) -> PreTrainedTokenizerBase:
        """
        The Q-Former tokenizer of stage 1, as LAVIS's `Blip2Base.init_tokenizer` builds it: BERT's tokenizer (e.g.
        `bert-base-uncased`) with `decoder_token` added as its BOS token (`[DEC]`, id 30522 for bert-base-uncased, so
        the Q-Former vocabulary is 30523). `[DEC]` replaces `[CLS]` to start image-grounded text generation; set
        `qformer_config.bos_token_id` to `tokenizer.bos_token_id` and `eos_token_id` to `tokenizer.sep_token_id`.
        Padding is on the right (`[CLS]` first). `kwargs` go to `AutoTokenizer.from_pretrained`.
        """
        tokenizer = AutoTokenizer.from_pretrained(bert_name_or_path, **kwargs)
        if tokenizer.bos_token is not None and tokenizer.bos_token != decoder_token:
            raise ValueError(
                f"{bert_name_or_path}: the tokenizer already has the BOS token {tokenizer.bos_token!r}; expected a BERT "
                f"tokenizer without one (or with {decoder_token!r})."
            )
        tokenizer.add_special_tokens({"bos_token": AddedToken(decoder_token, special=True, normalized=False)})
        tokenizer.padding_side = "right"
        return tokenizer

    @staticmethod
    def default_image_processor(image_size: int | tuple[int, int] = 224) -> Blip2ImageProcessor:
        """
        The BLIP-2 image preprocessing (LAVIS `blip_image_eval`), a [`Blip2ImageProcessor`]: resize to `image_size`
        (224 for the released checkpoints, 364 for the ViT-g fine-tuned ones; an int for a square or
        `(height, width)`) with bicubic resampling, rescale by 1/255, normalise with the CLIP mean/std, convert to RGB.

        It builds on the PIL/NumPy backend of transformers' `BlipImageProcessor`: it needs no torchvision, and it
        resizes with PIL exactly like LAVIS' torchvision `Resize` on PIL images does.
        """
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        return Blip2ImageProcessor(
            do_resize=True,
            size={"height": height, "width": width},
            resample=PILImageResampling.BICUBIC,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
            do_convert_rgb=True,
        )

    def __call__(
        self,
        images: ImagesInput | None = None,
        text: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """
        Prepare images and/or texts for the model.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                One image or a batch of `B` images, given to the image processor as is ([`Blip2ImageProcessor`]
                documents the accepted layouts and modes; a 4D array `(B, H, W, C)` or tensor `(B, C, H, W)` is a
                batch).
            text (`str` or `list[str]`, *optional*):
                One text or `B` texts; with images, exactly one text per image.
            **kwargs:
                Tokenizer arguments (`padding`, `truncation`, `max_length`, `pad_to_multiple_of`, `padding_side`,
                `add_special_tokens`, `return_attention_mask`, ...), image processor arguments (`size`, ...) and
                `return_tensors` (`"pt"`, `"np"` or None for lists). With `num_query_tokens` set, `max_length`
                counts the image tokens and truncation only ever removes text tokens.

        Returns:
            [`BatchFeature`] with, depending on the inputs:
            - `pixel_values`: float32 `(B, 3, H, W)` (only with `images`).
            - `input_ids`, `attention_mask`: `(B, L)`; `L` includes `num_query_tokens` image tokens (only with `text`).
            - `qformer_input_ids`, `qformer_attention_mask`: `(B, L_q)`, no image tokens (with `text` and a
              Q-Former tokenizer).
        """
        if images is None and text is None:
            raise ValueError("Blip2Processor needs `images`, `text` or both; got neither.")
        output_kwargs = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs = output_kwargs["text_kwargs"]
        images_kwargs = output_kwargs["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)

        data: dict[str, Any] = {}
        if images is not None:
            # "np" even when lists are asked for: the batch is always one stacked float32 array.
            data["pixel_values"] = self.image_processor(images, return_tensors="np", **images_kwargs)["pixel_values"]
        texts = self._as_text_list(text) if text is not None else None
        if images is not None and texts is not None and len(data["pixel_values"]) != len(texts):
            raise ValueError(
                f"Got {len(data['pixel_values'])} images and {len(texts)} texts; BLIP-2 takes exactly one text per "
                "image."
            )
        if texts is not None:
            if self.qformer_tokenizer is not None:
                qformer_kwargs = {key: text_kwargs[key] for key in _QFORMER_TEXT_KWARGS if key in text_kwargs}
                qformer_encoding = self.qformer_tokenizer(texts, return_attention_mask=True, **qformer_kwargs)
                data["qformer_input_ids"] = qformer_encoding["input_ids"]
                data["qformer_attention_mask"] = qformer_encoding["attention_mask"]
            data.update(self._encode_text(texts, text_kwargs))
        return BatchFeature(data, tensor_type=return_tensors)

    def _encode_text(self, texts: list[str], text_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Tokenize `texts`, prepend `num_query_tokens` image tokens to every row, then pad the full rows."""
        if self.num_query_tokens is None:
            return dict(self.tokenizer(texts, **text_kwargs))

        num_query_tokens = self.num_query_tokens
        for key in _UNSUPPORTED_WITH_EXPANSION:
            if text_kwargs.get(key):
                raise ValueError(f"`{key}=True` is not supported when the processor adds image tokens.")
        padding = text_kwargs.pop("padding", False)
        truncation = text_kwargs.pop("truncation", None)
        max_length = text_kwargs.pop("max_length", None)
        pad_to_multiple_of = text_kwargs.pop("pad_to_multiple_of", None)
        padding_side = text_kwargs.pop("padding_side", None)
        return_attention_mask = text_kwargs.pop("return_attention_mask", None)

        if truncation not in (None, False, "do_not_truncate"):
            # The image tokens are not the tokenizer's business: truncate the text to what is left of the budget.
            budget = max_length
            if budget is None and self.tokenizer.model_max_length < int(1e12):
                budget = self.tokenizer.model_max_length
            if budget is not None:
                if budget <= num_query_tokens:
                    raise ValueError(
                        f"max_length={budget} leaves no room for text after the {num_query_tokens} image tokens."
                    )
                text_kwargs["max_length"] = budget - num_query_tokens
            text_kwargs["truncation"] = truncation

        # Unpadded first: padding must go around `[<image> x Q, BOS, text]`, not between image tokens and BOS.
        encoding = self.tokenizer(texts, padding=False, return_attention_mask=return_attention_mask, **text_kwargs)
        rows = {"input_ids": [[self.image_token_id] * num_query_tokens + list(ids) for ids in encoding["input_ids"]]}
        for key, value in _PREFIX_VALUES.items():
            if key in encoding:
                rows[key] = [[value] * num_query_tokens + list(row) for row in encoding[key]]
        strategy = PaddingStrategy.LONGEST if padding is True else PaddingStrategy(padding or "do_not_pad")
        if strategy == PaddingStrategy.DO_NOT_PAD:
            return rows
        self._check_pad_token()
        padded = self.tokenizer.pad(
            rows,
            padding=strategy,
            # Only meaningful for "max_length" (truncation already happened); passing it otherwise only warns.
            max_length=max_length if strategy == PaddingStrategy.MAX_LENGTH else None,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
        )
        return dict(padded)

    def _check_pad_token(self) -> None:
        """Padding needs `tokenizer.pad_token`; Llama, Mistral and others ship without one."""
        if self.tokenizer.pad_token is None:
            raise ValueError(
                f"Blip2Processor: padding needs tokenizer.pad_token, but this {type(self.tokenizer).__name__} has none "
                "(Llama and Mistral tokenizers ship without one). Set one that is in its vocabulary, e.g. "
                "`processor.tokenizer.pad_token = processor.tokenizer.eos_token` (or the unk token), and save the "
                "processor; training/stage2.py takes `--pad_token TOKEN`."
            )

    @staticmethod
    def load_image(image: ImageSource, timeout: float | None = DEFAULT_URL_TIMEOUT) -> Image.Image:
        """
        One image decoded by BLIP-2's rules ([`Blip2ImageProcessor.load_image`], which documents the arguments and
        errors) whatever this processor's image processor is: decoding a file is the same for every encoder, only
        the resizing and normalization after it are the encoder's (SigLIP's, CLIP's, ...). The pipeline reads files
        through this, as the CLI, training and evaluation do.
        """
        return Blip2ImageProcessor.load_image(image, timeout=timeout)

    def chat_prompt(self, text: str) -> str:
        """
        `text` as one user turn of the language model's chat template, ready for the assistant's answer
        (`tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)`), as a
        string to pass as this processor's `text` (the image tokens still go in front). A template that writes the
        BOS token itself (Llama-2, Gemma) has it removed here when the tokenizer adds BOS on its own, so that the
        tokenized prompt holds one BOS, not two.

        Raises:
            ValueError: the tokenizer has no chat template (`tokenizer.chat_template` is None), e.g. a base model's.
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"A chat-template prompt was asked for, but the language model's tokenizer has no chat template "
                f"(tokenizer.chat_template is None for this {type(self.tokenizer).__name__}): use a chat or instruct "
                "model's tokenizer, set tokenizer.chat_template, or leave the chat template off (BLIP-2's plain "
                "prompt)."
            )
        prompt = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        bos = self.tokenizer.bos_token
        if bos and prompt.startswith(bos):
            adds_bos = self.tokenizer("", add_special_tokens=True)["input_ids"][:1] == [self.tokenizer.bos_token_id]
            if adds_bos:
                prompt = prompt[len(bos) :]
        return prompt

    @staticmethod
    def _as_text_list(text: Any) -> list[str]:
        if isinstance(text, str):
            return [text]
        if isinstance(text, (list, tuple)):
            if len(text) == 0:
                raise ValueError("`text` is an empty list; pass at least one string.")
            for index, item in enumerate(text):
                if not isinstance(item, str):
                    raise TypeError(
                        f"text[{index}] has type {type(item).__name__}; `text` must be a str or a list of str."
                    )
            return list(text)
        raise TypeError(f"`text` has type {type(text).__name__}; expected a str or a list of str.")

    @classmethod
    def _load_tokenizer_from_pretrained(
        cls, sub_processor_type: str, pretrained_model_name_or_path: str | os.PathLike, subfolder: str = "", **kwargs
    ) -> PreTrainedTokenizerBase | None:
        if sub_processor_type != "qformer_tokenizer":
            return super()._load_tokenizer_from_pretrained(
                sub_processor_type, pretrained_model_name_or_path, subfolder=subfolder, **kwargs
            )
        # Optional: a checkpoint without `qformer_tokenizer/` (e.g. saved by transformers' Blip2Processor) has none.
        # ProcessorMixin would fall back to the root tokenizer, i.e. silently use the LLM tokenizer for the Q-Former.
        folder = os.path.join(subfolder, sub_processor_type) if subfolder else sub_processor_type
        if os.path.isdir(pretrained_model_name_or_path):
            if not os.path.isdir(os.path.join(pretrained_model_name_or_path, folder)):
                return None
            return AutoTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=folder, **kwargs)
        try:
            return AutoTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=folder, **kwargs)
        except (OSError, ValueError):
            return None

    # No `processor_class` is saved (neither in processor_config.json nor in the tokenizers' configs): `AutoProcessor`
    # resolves that name among transformers' classes first, so "Blip2Processor" would load transformers' own
    # processor. Without it, `AutoProcessor` finds this class through the model's config (`AutoProcessor.register` in
    # blip2_hf/__init__.py) or, where blip2_hf is not installed, through the `auto_map` and this file.
    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("processor_class", None)
        return output

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> list:
        """`ProcessorMixin.save_pretrained` without the `processor_class` entries; `push_to_hub=True` uploads through
        `push_to_hub` (which saves through this method), so the Hub never holds them either."""
        if push_to_hub:
            hub_kwargs = {key: kwargs.pop(key) for key in _PUSH_KWARGS if key in kwargs}
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            files = self.save_pretrained(save_directory, **kwargs)
            self.push_to_hub(repo_id, **hub_kwargs)
            return files
        files = super().save_pretrained(save_directory, **kwargs)
        for name in self.get_attributes():
            tokenizer = getattr(self, name)
            if isinstance(tokenizer, PreTrainedTokenizerBase):
                tokenizer._processor_class = None  # stamped by `ProcessorMixin.save_pretrained`
                folder = save_directory if name == "tokenizer" else os.path.join(save_directory, name)
                _drop_processor_class(os.path.join(folder, "tokenizer_config.json"))
        return files

    @property
    def model_input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask", *self.image_processor.model_input_names]
        if self.qformer_tokenizer is not None:
            names += ["qformer_input_ids", "qformer_attention_mask"]
        return names

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """Forwards to the language-model tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """Forwards to the language-model tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)


def load_image(image: ImageSource, timeout: float | None = DEFAULT_URL_TIMEOUT) -> Image.Image:
    """
    One image (a path, URL, `data:` URI, bytes, `{"path", "bytes"}` dict, PIL image, array or tensor) as an 8-bit
    RGB `PIL.Image`, decoded by BLIP-2's rules: [`Blip2ImageProcessor.load_image`], which documents the arguments
    and errors.
    """
    return Blip2ImageProcessor.load_image(image, timeout=timeout)


def _image_file(source: Any, timeout: float | None) -> Any:
    """What `Image.open` reads for `source`: a checked path, or the bytes of bytes / a URL / a `data:` URI."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=timeout) as response:
                return io.BytesIO(response.read())
        except OSError as error:  # URLError, HTTPError and socket timeouts are all OSErrors
            reason = getattr(error, "reason", error)
            raise OSError(f"Could not download the image {source} (timeout {timeout} s): {reason}") from None
    if isinstance(source, str) and source.startswith("data:"):
        header, _, payload = source.partition(",")
        if not header.endswith(";base64") or not payload:
            raise ValueError(f"Image data URI {source[:40]!r}... is not of the form 'data:image/...;base64,<data>'.")
        try:
            return io.BytesIO(base64.b64decode(payload, validate=True))
        except ValueError as error:
            raise ValueError(f"Image data URI {source[:40]!r}... does not hold valid base64: {error}") from None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"Cannot load an image from a {type(source).__module__}.{type(source).__qualname__}; expected a path, "
            f"URL, data URI, bytes, a {{'path', 'bytes'}} dict or {_ACCEPTED_IMAGE_TYPES}."
        )
    path = os.fspath(source)
    if os.path.isdir(path):
        raise IsADirectoryError(f"Image path {path!r} is a folder; expected an image file.")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Image file {path!r} does not exist.")
    return path


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """`(H, W, 4)` uint8 RGBA -> `(H, W, 3)` uint8 RGB over an opaque white background (alpha 0 = white)."""
    alpha = rgba[..., 3:].astype(np.float64) / 255.0
    return np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def _is_transformers_blip_image_processor(image_processor: Any) -> bool:
    """Whether `image_processor` is transformers' own BLIP image processor (either backend), not a subclass of it."""
    cls = type(image_processor)
    return cls.__module__.startswith("transformers.models.blip.") and cls.__name__ in _BLIP_IMAGE_PROCESSORS


def _drop_processor_class(path: str | os.PathLike) -> None:
    """Remove the `processor_class` entry of a saved tokenizer_config.json (see `Blip2Processor.to_dict`)."""
    with open(path, encoding="utf-8") as file:
        config = json.load(file)
    if config.pop("processor_class", None) is not None:
        with open(path, "w", encoding="utf-8") as file:
            file.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


__all__ = ["Blip2ImageProcessor", "Blip2Processor", "load_image"]
