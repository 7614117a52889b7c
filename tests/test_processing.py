"""Blip2Processor: image-token expansion and padding, Q-Former text, image conversion, errors, save/load."""

from __future__ import annotations

import ast
import json
import os

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import BlipImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from utils import (  # tests/ is on sys.path under pytest (no __init__.py), as for `conftest`
    draw_images,
    make_bert_tokenizer,
    make_llama_tokenizer,
    make_opt_tokenizer,
    make_t5_tokenizer,
)

import blip2_hf.processing_blip2 as module
from blip2_hf.processing_blip2 import Blip2ImageProcessor, Blip2Processor

Q = 4
SHORT, LONG = "a cat", "Question: what color is the circle? Answer:"
SMALL = {"height": 24, "width": 24}  # keeps the image-heavy tests fast


def build(tokenizer=None, qformer=False, num_query_tokens=Q, image_size=24) -> Blip2Processor:
    return Blip2Processor(
        image_processor=Blip2Processor.default_image_processor(image_size),
        tokenizer=tokenizer if tokenizer is not None else make_opt_tokenizer(),
        qformer_tokenizer=make_bert_tokenizer() if qformer else None,
        num_query_tokens=num_query_tokens,
    )


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pixels(processor: Blip2Processor, image) -> torch.Tensor:
    return processor(images=image, return_tensors="pt")["pixel_values"]


# ----------------------------------------------------------------------------------------------- image tokens


def test_image_token_is_added_once_and_exposed():
    tokenizer = make_opt_tokenizer()
    assert len(tokenizer) == 300 and getattr(tokenizer, "image_token", None) is None
    processor = build(tokenizer)
    assert processor.image_token == "<image>"
    assert processor.image_token_id == 300 == tokenizer.convert_tokens_to_ids("<image>")
    assert len(tokenizer) == 301
    # Special: dropped by skip_special_tokens, never split by the tokenizer.
    assert tokenizer("<image>", add_special_tokens=False)["input_ids"] == [300]
    assert processor.decode([300] * Q + tokenizer(SHORT)["input_ids"], skip_special_tokens=True) == SHORT
    # A second processor on the same tokenizer reuses the token instead of adding another one.
    assert build(tokenizer).image_token_id == 300 and len(tokenizer) == 301


def test_expansion_exact_ids_opt():
    processor = build()
    out = processor(text=SHORT)
    tokenizer = processor.tokenizer
    expected = [300] * Q + [tokenizer.bos_token_id] + text_ids(tokenizer, SHORT)
    assert tokenizer.bos_token_id == 2
    assert out["input_ids"] == [expected]
    assert out["attention_mask"] == [[1] * len(expected)]
    assert set(out) == {"input_ids", "attention_mask"}


def test_expansion_t5_and_llama_layouts():
    t5 = build(make_t5_tokenizer())
    assert t5(text=SHORT)["input_ids"] == [[300] * Q + text_ids(t5.tokenizer, SHORT) + [1]]  # no BOS, EOS appended
    llama = build(make_llama_tokenizer())
    assert llama(text=SHORT)["input_ids"] == [[300] * Q + [1] + text_ids(llama.tokenizer, SHORT)]


def test_left_padding_puts_pads_before_image_tokens():
    processor = build()
    tokenizer = processor.tokenizer
    out = processor(text=[SHORT, LONG], padding=True, return_tensors="pt")
    ids, mask = out["input_ids"], out["attention_mask"]
    single_short = processor(text=SHORT, return_tensors="pt")["input_ids"][0]
    single_long = processor(text=LONG, return_tensors="pt")["input_ids"][0]
    n_pad = len(single_long) - len(single_short)
    assert n_pad > 0 and ids.shape == (2, len(single_long))
    # Row 0: [pad x n, <image> x Q, BOS, text] -- the unpadded prompt, shifted.
    assert ids[0, :n_pad].tolist() == [tokenizer.pad_token_id] * n_pad
    assert ids[0, n_pad : n_pad + Q].tolist() == [300] * Q
    assert torch.equal(ids[0, n_pad:], single_short)
    assert mask[0].tolist() == [0] * n_pad + [1] * len(single_short)
    # Row 1 (longest) is unpadded and equals its single-prompt encoding.
    assert torch.equal(ids[1], single_long) and bool(mask[1].all())


def test_llama_left_padding_with_unk_pad():
    processor = build(make_llama_tokenizer())
    out = processor(text=[SHORT, LONG], padding="longest")
    short = processor(text=SHORT)["input_ids"][0]
    n_pad = len(out["input_ids"][1]) - len(short)
    assert out["input_ids"][0] == [0] * n_pad + short  # <unk> (0) is Vicuna's pad
    assert out["attention_mask"][0] == [0] * n_pad + [1] * len(short)


@pytest.mark.parametrize("make, kwargs", [(make_opt_tokenizer, {"padding_side": "right"}), (make_t5_tokenizer, {})])
def test_right_padding_puts_pads_after_text(make, kwargs):
    processor = build(make())
    pad = processor.tokenizer.pad_token_id
    out = processor(text=[SHORT, LONG], padding=True, return_tensors="pt", **kwargs)
    short = processor(text=SHORT)["input_ids"][0]
    n_pad = out["input_ids"].shape[1] - len(short)
    assert n_pad > 0
    assert out["input_ids"][0].tolist() == short + [pad] * n_pad
    assert out["input_ids"][0, :Q].tolist() == [300] * Q
    assert out["attention_mask"][0].tolist() == [1] * len(short) + [0] * n_pad


def test_max_length_padding_and_multiple_of_count_image_tokens():
    processor = build()
    out = processor(text=[SHORT], padding="max_length", max_length=20)
    short = processor(text=SHORT)["input_ids"][0]
    assert len(out["input_ids"][0]) == 20
    assert out["input_ids"][0] == [1] * (20 - len(short)) + short
    out = processor(text=[SHORT, LONG], padding=True, pad_to_multiple_of=8, return_tensors="pt")
    assert out["input_ids"].shape[1] % 8 == 0 and out["input_ids"].shape[1] >= len(
        processor(text=LONG)["input_ids"][0]
    )


def test_no_padding_returns_ragged_lists():
    processor = build()
    out = processor(text=[SHORT, LONG])
    assert [len(row) for row in out["input_ids"]] == [len(processor(text=t)["input_ids"][0]) for t in (SHORT, LONG)]
    assert all(row[:Q] == [300] * Q for row in out["input_ids"])


@pytest.mark.parametrize("make", [make_opt_tokenizer, make_t5_tokenizer])
def test_truncation_never_cuts_image_tokens(make):
    processor = build(make())
    tokenizer = processor.tokenizer
    max_length = Q + 5
    out = processor(text=[SHORT, LONG], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    assert out["input_ids"].shape == (2, max_length)
    long_row = out["input_ids"][1].tolist()
    assert long_row[:Q] == [300] * Q
    # The text part is exactly what the tokenizer itself keeps with the remaining budget of 5 tokens.
    assert long_row[Q:] == tokenizer(LONG, truncation=True, max_length=5)["input_ids"]
    # A short row is untouched by truncation.
    short = processor(text=SHORT)["input_ids"][0]
    assert [t for t, m in zip(out["input_ids"][0].tolist(), out["attention_mask"][0].tolist()) if m] == short


def test_truncation_budget_too_small_raises():
    with pytest.raises(ValueError, match=r"max_length=4 leaves no room for text after the 4 image tokens"):
        build()(text=LONG, truncation=True, max_length=Q)


def test_legacy_mode_without_num_query_tokens_is_plain_tokenizer():
    processor = build(num_query_tokens=None)
    tokenizer = processor.tokenizer
    out = processor(text=[SHORT, LONG], padding=True, return_tensors="pt")
    expected = tokenizer([SHORT, LONG], padding=True, return_tensors="pt")
    assert torch.equal(out["input_ids"], expected["input_ids"])
    assert torch.equal(out["attention_mask"], expected["attention_mask"])
    assert (out["input_ids"] != 300).all()


def test_unsupported_tokenizer_outputs_raise():
    with pytest.raises(ValueError, match="return_offsets_mapping"):
        build()(text=SHORT, return_offsets_mapping=True)


# ----------------------------------------------------------------------------------------------- Q-Former text


def test_qformer_outputs():
    processor = build(qformer=True)
    bert = processor.qformer_tokenizer
    out = processor(images=draw_images(2), text=[SHORT, LONG], padding=True, return_tensors="pt")
    assert set(out) == {"pixel_values", "input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask"}
    expected = bert([SHORT, LONG], padding=True, return_tensors="pt")
    assert torch.equal(out["qformer_input_ids"], expected["input_ids"])
    assert torch.equal(out["qformer_attention_mask"], expected["attention_mask"])
    # [CLS] first, no image tokens, and right padding although the LLM tokenizer pads on the left.
    assert (out["qformer_input_ids"][:, 0] == bert.cls_token_id).all()
    assert not (out["qformer_input_ids"] == bert.convert_tokens_to_ids("[DEC]")).any()
    assert out["qformer_attention_mask"][0, -1] == 0 and out["attention_mask"][0, 0] == 0
    # LLM ids are unaffected by the Q-Former tokenizer.
    assert torch.equal(out["input_ids"], build()(text=[SHORT, LONG], padding=True, return_tensors="pt")["input_ids"])
    assert processor.model_input_names == [
        "input_ids",
        "attention_mask",
        "pixel_values",
        "qformer_input_ids",
        "qformer_attention_mask",
    ]


def test_qformer_truncation_uses_full_max_length():
    out = build(qformer=True)(text=LONG, truncation=True, max_length=8)
    assert len(out["qformer_input_ids"][0]) == 8 and len(out["input_ids"][0]) == 8
    assert out["qformer_input_ids"][0][-1] == 3  # [SEP] kept by BERT truncation


# ----------------------------------------------------------------------------------------------- outputs and sizes


def test_images_only_and_text_only_outputs():
    processor = build(qformer=True)
    out = processor(images=draw_images(3), return_tensors="pt")
    assert list(out) == ["pixel_values"]
    assert out["pixel_values"].shape == (3, 3, 24, 24) and out["pixel_values"].dtype == torch.float32
    out = processor(text=[SHORT, LONG], padding=True, return_tensors="pt")
    assert "pixel_values" not in out and out["input_ids"].shape[0] == 2
    # Without return_tensors the pixels are still one stacked float32 array.
    out = processor(images=draw_images(2))
    assert isinstance(out["pixel_values"], np.ndarray) and out["pixel_values"].shape == (2, 3, 24, 24)


def test_images_and_text_together():
    out = build()(images=draw_images(2), text=[SHORT, LONG], padding=True, return_tensors="pt")
    assert out["pixel_values"].shape[0] == out["input_ids"].shape[0] == 2
    assert (out["input_ids"] == 300).sum(dim=1).tolist() == [Q, Q]


@pytest.mark.parametrize("size", [224, 364])
def test_default_image_processor_sizes(size):
    image_processor = Blip2Processor.default_image_processor(size)
    assert image_processor.resample == PILImageResampling.BICUBIC
    assert tuple(image_processor.image_mean) == tuple(OPENAI_CLIP_MEAN)
    assert tuple(image_processor.image_std) == tuple(OPENAI_CLIP_STD)
    assert image_processor.rescale_factor == pytest.approx(1 / 255) and image_processor.do_convert_rgb
    processor = Blip2Processor(image_processor, make_opt_tokenizer(), num_query_tokens=Q)
    assert pixels(processor, draw_images(1)[0]).shape == (1, 3, size, size)


def test_default_processor_is_224_and_size_can_be_overridden_per_call():
    processor = Blip2Processor(tokenizer=make_opt_tokenizer(), num_query_tokens=Q)
    image = draw_images(1)[0]
    assert pixels(processor, image).shape == (1, 3, 224, 224)
    out = processor(images=image, size={"height": 364, "width": 364}, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 364, 364)


def test_pixel_values_match_transformers_blip_image_processor():
    reference = BlipImageProcessorPil(
        size={"height": 224, "width": 224},
        resample=PILImageResampling.BICUBIC,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        do_convert_rgb=True,
    )
    images = draw_images(3, size=(57, 41))
    expected = reference(images, return_tensors="pt")["pixel_values"]
    actual = build(image_size=224)(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(actual, expected)


# ----------------------------------------------------------------------------------------------- image conversion


def _white(mode: str, size=(20, 16)) -> Image.Image:
    width, height = size
    if mode in ("I;16", "I;16B"):
        dtype = "<u2" if mode == "I;16" else ">u2"
        return Image.frombytes(mode, size, np.full((height, width), 65535, dtype=dtype).tobytes())
    value = {
        "RGB": (255, 255, 255),
        "I": 65535,
        "F": 1.0,
        "1": 1,
        "CMYK": (0, 0, 0, 0),
        "LA": (255, 255),
        "RGBA": (255, 255, 255, 255),
    }
    return Image.new(mode, size, value.get(mode, 255))


def _unusual(mode: str) -> Image.Image:
    base = draw_images(1, size=(20, 16))[0]
    if mode == "P+transparency":
        image = base.convert("P")
        image.info["transparency"] = 0
        return image
    if mode in ("I;16", "I;16B", "I"):
        grey = np.asarray(base.convert("L")).astype(np.uint32) * 257
        if mode == "I":
            return Image.fromarray(grey.astype(np.int32))
        return Image.frombytes(mode, base.size, grey.astype("<u2" if mode == "I;16" else ">u2").tobytes())
    if mode == "F":
        return Image.fromarray(np.asarray(base.convert("L")).astype(np.float32) / 255)
    return base.convert(mode)


UNUSUAL_MODES = ["L", "LA", "1", "P", "P+transparency", "RGBA", "CMYK", "I;16", "I;16B", "I", "F"]


@pytest.mark.parametrize("mode", UNUSUAL_MODES)
def test_unusual_pil_modes(mode):
    processor = build()
    image = _unusual(mode)
    assert image.mode == mode.split("+")[0]
    values = pixels(processor, image)
    assert values.shape == (1, 3, 24, 24) and torch.isfinite(values).all()
    if mode in ("L", "I;16", "I;16B", "I", "F"):
        # Every grey encoding of the same picture gives the pixels of its 8-bit version (16-bit = 8-bit * 257).
        assert torch.equal(values, pixels(processor, _unusual("L")))


@pytest.mark.parametrize("mode", ["L", "1", "I;16", "I;16B", "I", "F", "CMYK", "LA", "RGBA"])
def test_white_in_any_mode_matches_white_rgb(mode):
    processor = build()
    assert torch.equal(pixels(processor, _white(mode)), pixels(processor, _white("RGB")))


def test_sixteen_bit_is_scaled_not_clipped():
    processor = build()
    mid_grey = Image.frombytes("I;16", (8, 8), np.full((8, 8), 128 * 257, dtype="<u2").tobytes())
    assert torch.equal(pixels(processor, mid_grey), pixels(processor, Image.new("RGB", (8, 8), (128, 128, 128))))
    # Pillow's own convert("RGB") would clip this to 255; we must not.
    assert not torch.equal(pixels(processor, mid_grey), pixels(processor, _white("RGB", (8, 8))))


def test_alpha_is_composited_on_white():
    processor = build()
    transparent = Image.new("RGBA", (10, 10), (10, 20, 30, 0))
    assert torch.equal(pixels(processor, transparent), pixels(processor, _white("RGB", (10, 10))))
    half = Image.new("RGBA", (10, 10), (10, 20, 30, 128))  # 10 * 128/255 + 255 * 127/255 = 132.0
    assert torch.equal(pixels(processor, half), pixels(processor, Image.new("RGB", (10, 10), (132, 137, 142))))
    # the same pixels from an RGBA array as from the PIL image
    assert torch.equal(pixels(processor, np.array(half)), pixels(processor, half))
    palette = _unusual("P+transparency")
    expected = np.array(palette.convert("RGB"))
    expected[np.array(palette) == 0] = 255  # palette entry 0 is the transparent one
    assert torch.equal(pixels(processor, palette), pixels(processor, Image.fromarray(expected)))


def test_numpy_and_torch_inputs_match_pil():
    processor = build()
    images = draw_images(2)
    reference = processor(images=images, return_tensors="pt")["pixel_values"]
    arrays = [np.array(image) for image in images]
    tensors = [torch.from_numpy(array).permute(2, 0, 1) for array in arrays]
    equivalents = {
        "numpy HWC uint8": arrays,
        "numpy HWC float [0,1]": [array.astype(np.float32) / 255 for array in arrays],
        "numpy HWC float [0,255]": [array.astype(np.float64) for array in arrays],
        "numpy CHW uint8": [array.transpose(2, 0, 1) for array in arrays],
        "numpy HWC RGBA opaque": [np.concatenate([a, np.full_like(a[..., :1], 255)], axis=-1) for a in arrays],
        "numpy batch BHWC": np.stack(arrays),
        "torch CHW uint8": tensors,
        "torch CHW float [0,1]": [tensor.float() / 255 for tensor in tensors],
        "torch CHW bfloat16-safe float64": [tensor.double() / 255 for tensor in tensors],
        "torch batch BCHW": torch.stack(tensors),
    }
    for name, value in equivalents.items():
        assert torch.equal(processor(images=value, return_tensors="pt")["pixel_values"], reference), name


def test_grey_numpy_torch_and_uint16_inputs():
    processor = build()
    grey = np.array(draw_images(1)[0].convert("L"))
    reference = pixels(processor, Image.fromarray(grey))
    for value in (
        grey,
        grey[..., None],
        torch.from_numpy(grey),
        torch.from_numpy(grey)[None],
        grey.astype(np.uint16) * 257,
    ):
        assert torch.equal(pixels(processor, value), reference)


def _grey() -> np.ndarray:
    return np.asarray(draw_images(1, size=(23, 17))[0].convert("L"))


def _image_files(folder) -> dict[str, Image.Image]:
    """Images as they come off disk in the modes the decoding rules are for, re-opened from the saved files."""
    base = draw_images(1, size=(23, 17))[0]
    grey = _grey()
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray((grey // 2).astype(np.uint8)))
    palette = base.convert("P")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees on display (applied, unlike LAVIS: see Blip2ImageProcessor)
    writers = {
        "16-bit.png": lambda path: Image.fromarray(grey.astype(np.uint16) * 257).save(path),
        "float.tiff": lambda path: Image.fromarray(grey.astype(np.float32) / 255).save(path),
        "palette.png": lambda path: palette.save(path, transparency=0),
        "rgba.png": lambda path: rgba.save(path),
        "la.png": lambda path: rgba.convert("LA").save(path),
        "exif.jpg": lambda path: base.save(path, exif=exif, quality=95),
    }
    images = {}
    for name, write in writers.items():
        write(folder / name)
        images[name] = Image.open(folder / name)
    return images


def test_image_processor_alone_gives_the_processors_pixel_values(tmp_path):
    """The decoding rules live in `Blip2ImageProcessor`: on its own it gives the processor's pixel values, which are
    those of transformers' BlipImageProcessorPil applied to the decoded 8-bit RGB images (the processor before)."""
    images = _image_files(tmp_path)
    modes = {name: image.mode for name, image in images.items()}
    assert modes["16-bit.png"] in ("I;16", "I") and modes["float.tiff"] == "F" and modes["palette.png"] == "P"
    assert (modes["rgba.png"], modes["la.png"], modes["exif.jpg"]) == ("RGBA", "LA", "RGB")
    assert images["exif.jpg"].getexif()[0x0112] == 6 and images["exif.jpg"].size == (23, 17)
    processor = build()
    image_processor = Blip2ImageProcessor(size=SMALL)
    assert isinstance(processor.image_processor, Blip2ImageProcessor)
    reference = BlipImageProcessorPil(size=SMALL, resample=PILImageResampling.BICUBIC)
    reference.image_mean, reference.image_std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    for name, image in images.items():
        expected = reference(Blip2ImageProcessor.to_rgb_images(image), return_tensors="pt")["pixel_values"]
        assert torch.equal(image_processor(image, return_tensors="pt")["pixel_values"], expected), name
        assert torch.equal(pixels(processor, image), expected), name
    # 16-bit and float files decode like their 8-bit original; the EXIF rotation is applied
    assert torch.equal(pixels(processor, images["16-bit.png"]), pixels(processor, Image.fromarray(_grey())))
    assert torch.equal(pixels(processor, images["float.tiff"]), pixels(processor, Image.fromarray(_grey())))
    stored = Image.fromarray(np.array(images["exif.jpg"]))  # the stored pixels, without the EXIF block
    upright = stored.transpose(Image.Transpose.ROTATE_270)  # what orientation 6 asks for
    assert torch.equal(pixels(processor, images["exif.jpg"]), pixels(processor, upright))
    assert not torch.equal(pixels(processor, images["exif.jpg"]), pixels(processor, stored))
    # arrays, tensors and batches too, with the processor's errors
    array = np.array(images["rgba.png"])
    for value in (array, torch.from_numpy(array).permute(2, 0, 1), np.stack([array, array])):
        assert torch.equal(image_processor(value, return_tensors="pt")["pixel_values"], pixels(processor, value))
    with pytest.raises(TypeError, match=r"index 1 has type builtins\.str"):
        image_processor([array, "cat.jpg"])


def test_image_processor_defaults_save_and_load_alone(tmp_path):
    default = Blip2ImageProcessor()
    assert default.to_dict() == Blip2Processor.default_image_processor().to_dict()
    assert default.size["height"] == default.size["width"] == 224
    Blip2Processor.default_image_processor(24).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "Blip2ImageProcessor"
    assert config["auto_map"]["AutoImageProcessor"] == "processing_blip2.Blip2ImageProcessor"
    assert (tmp_path / "processing_blip2.py").is_file()  # remote code for where blip2_hf is not installed
    loaded = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is Blip2ImageProcessor and loaded.size["height"] == 24
    # where torchvision is installed (the default backend then), the name still resolves to this class alone
    assert type(transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="torchvision")) is Blip2ImageProcessor


def test_other_image_processors_are_used_as_given():
    clip = transformers.CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size=SMALL)
    processor = Blip2Processor(clip, make_opt_tokenizer(), num_query_tokens=Q)
    assert processor.image_processor is clip
    image = draw_images(1)[0]
    assert torch.equal(pixels(processor, image), clip(image, return_tensors="pt")["pixel_values"])


# ----------------------------------------------------------------------------------------------- errors


def test_wrong_image_type_names_index_type_and_accepted_types():
    with pytest.raises(TypeError, match=r"index 1 has type builtins\.str; accepted types are PIL\.Image\.Image"):
        build()(images=[draw_images(1)[0], "cat.jpg"])
    with pytest.raises(TypeError, match=r"index 0 has type builtins\.list"):
        build()(images=[[draw_images(1)[0]]])


def test_zero_size_images_raise_with_index_and_size():
    processor = build()
    images = draw_images(2) + [Image.new("RGB", (0, 12))]
    with pytest.raises(ValueError, match=r"index 2 has zero size \(width=0, height=12\)"):
        processor(images=images)
    with pytest.raises(ValueError, match=r"index 0 has zero size \(height=5, width=0\)"):
        processor(images=np.zeros((5, 0, 3), dtype=np.uint8))


def test_image_text_count_mismatch_names_both_counts():
    with pytest.raises(ValueError, match=r"Got 2 images and 3 texts"):
        build()(images=draw_images(2), text=[SHORT, LONG, SHORT])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, ValueError, "got neither"),
        ({"images": []}, ValueError, "`images` is empty"),
        ({"text": []}, ValueError, "`text` is an empty list"),
        ({"text": 3}, TypeError, "`text` has type int"),
        ({"text": [SHORT, 5]}, TypeError, r"text\[1\] has type int"),
        ({"images": np.full((4, 4, 3), 300.0)}, ValueError, r"index 0 has values in \[300.0, 300.0\]"),
        ({"images": np.full((4, 4, 3), np.nan)}, ValueError, "index 0 contains NaN"),
        (
            {"images": np.zeros((5, 5, 7), dtype=np.uint8)},
            ValueError,
            r"shape \(5, 5, 7\): expected 1, 3 or 4 channels",
        ),
        ({"images": np.zeros((2, 4, 4, 3, 1), dtype=np.uint8)}, ValueError, "with 5 dimensions"),
    ],
)
def test_bad_inputs_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        build()(**kwargs)


def test_constructor_errors():
    with pytest.raises(TypeError, match=r"integer 32 as `qformer_tokenizer`; pass it as `num_query_tokens=32`"):
        Blip2Processor(Blip2Processor.default_image_processor(), make_opt_tokenizer(), 32)
    with pytest.raises(ValueError, match="positive int or None, got 0"):
        Blip2Processor(tokenizer=make_opt_tokenizer(), num_query_tokens=0)
    with pytest.raises(ValueError, match="needs a `tokenizer`"):
        Blip2Processor()


# ----------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("qformer", [False, True])
def test_save_load_round_trip(tmp_path, qformer):
    processor = build(qformer=qformer, image_size=364)
    processor.save_pretrained(tmp_path)
    assert os.path.isdir(tmp_path / "qformer_tokenizer") == qformer
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["num_query_tokens"] == Q and "qformer_tokenizer" not in config

    loaded = Blip2Processor.from_pretrained(tmp_path)
    assert loaded.num_query_tokens == Q
    assert loaded.image_token_id == processor.image_token_id == 300 and len(loaded.tokenizer) == 301
    assert loaded.tokenizer.padding_side == "left"
    assert (loaded.qformer_tokenizer is not None) == qformer
    if qformer:
        assert loaded.qformer_tokenizer.bos_token == "[DEC]" and loaded.qformer_tokenizer.padding_side == "right"
    inputs = {"images": draw_images(2), "text": [SHORT, LONG], "padding": True, "return_tensors": "pt"}
    expected, actual = processor(**inputs), loaded(**inputs)
    assert set(actual) == set(expected)
    assert actual["pixel_values"].shape[-1] == 364
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_saved_folders_name_no_processor_class(tmp_path):
    """`AutoProcessor` resolves a saved `processor_class` among transformers' classes first: "Blip2Processor" there
    would load transformers' processor. So no file names one; the `auto_map` names this class for remote code."""
    build(qformer=True).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert "processor_class" not in config
    assert config["auto_map"]["AutoProcessor"] == "processing_blip2.Blip2Processor"
    for tokenizer_config in (tmp_path / "tokenizer_config.json", tmp_path / "qformer_tokenizer" / "tokenizer_config.json"):
        assert "processor_class" not in json.loads(tokenizer_config.read_text()), tokenizer_config


def test_loads_folder_saved_under_the_old_class_name(tmp_path):
    """Folders saved before the class was renamed name `Blip2HFProcessor` (`processor_class`, `auto_map`, the
    tokenizer configs); they carry their own processing_blip2.py for remote code, and load here unchanged."""
    processor = build(qformer=True)
    processor.save_pretrained(tmp_path)
    for path in (tmp_path / "processor_config.json", tmp_path / "tokenizer_config.json"):
        config = json.loads(path.read_text())
        config["processor_class"] = "Blip2HFProcessor"
        config["auto_map"] = {"AutoProcessor": "processing_blip2.Blip2HFProcessor"}
        path.write_text(json.dumps(config))
    loaded = Blip2Processor.from_pretrained(tmp_path)
    assert type(loaded) is Blip2Processor and loaded.qformer_tokenizer is not None
    inputs = {"images": draw_images(2), "text": [SHORT, LONG], "padding": True, "return_tensors": "pt"}
    expected, actual = processor(**inputs), loaded(**inputs)
    assert set(actual) == set(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


@pytest.mark.parametrize("layout", ["processor_config.json", "preprocessor_config.json"])
def test_loads_folder_whose_image_processor_is_named_by_the_old_class(tmp_path, layout):
    """Folders saved before `Blip2ImageProcessor` existed name transformers' `BlipImageProcessor` (inside
    processor_config.json, or in preprocessor_config.json for older transformers): they load with the BLIP-2 decoding
    rules and the same settings, so a 16-bit image gives the pixel values it gives a freshly built processor."""
    processor = build(image_size=28)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    old = config.pop("image_processor")
    old["image_processor_type"] = "BlipImageProcessor"
    old["auto_map"] = {"AutoProcessor": "processing_blip2.Blip2Processor"}
    if layout == "processor_config.json":
        config["image_processor"] = old
    else:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(old))
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    loaded = Blip2Processor.from_pretrained(tmp_path)
    assert type(loaded.image_processor) is Blip2ImageProcessor
    settings = {key: value for key, value in processor.image_processor.to_dict().items() if key != "auto_map"}
    assert {key: value for key, value in loaded.image_processor.to_dict().items() if key != "auto_map"} == settings
    images = list(_image_files(tmp_path).values())
    assert torch.equal(pixels(loaded, images), pixels(processor, images))
    assert pixels(loaded, images).shape == (len(images), 3, 28, 28)


def test_loads_folder_saved_by_transformers_blip2_processor(tmp_path):
    tokenizer = make_opt_tokenizer()
    theirs = transformers.Blip2Processor(BlipImageProcessorPil(size=SMALL), tokenizer, num_query_tokens=Q)
    theirs.save_pretrained(tmp_path)
    ours = Blip2Processor.from_pretrained(tmp_path)
    assert ours.num_query_tokens == Q and ours.qformer_tokenizer is None
    assert ours.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == 300
    images = draw_images(2)
    assert torch.equal(
        ours(images=images, return_tensors="pt")["pixel_values"],
        theirs(images=images, return_tensors="pt")["pixel_values"],
    )
    # Unpadded prompts are identical; only where left padding goes differs (theirs: after the image tokens).
    assert ours(images=images[:1], text=SHORT)["input_ids"] == theirs(images=images[:1], text=SHORT)["input_ids"]
    ours_ids = ours(images=images, text=[SHORT, LONG], padding=True)["input_ids"][0]
    theirs_ids = theirs(images=images, text=[SHORT, LONG], padding=True)["input_ids"][0]
    assert sorted(ours_ids) == sorted(theirs_ids) and ours_ids[0] == 1 and theirs_ids[:Q] == [300] * Q


def test_loads_legacy_hub_layout(tmp_path):
    # The layout of the Salesforce/blip2-* repositories: preprocessor_config.json + a slim processor_config.json.
    BlipImageProcessorPil(size=SMALL).save_pretrained(tmp_path)
    make_opt_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(
        json.dumps({"num_query_tokens": Q, "processor_class": "Blip2Processor"})
    )
    assert (tmp_path / "preprocessor_config.json").exists()
    processor = Blip2Processor.from_pretrained(tmp_path)
    assert processor.num_query_tokens == Q and processor.image_processor.size["height"] == 24
    assert processor(text=SHORT)["input_ids"][0][: Q + 1] == [300] * Q + [2]


def test_batch_decode_and_decode_forward_to_tokenizer():
    processor = build()
    ids = processor(text=[SHORT, LONG], padding=True)["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == [SHORT, LONG]
    assert processor.decode(ids[1], skip_special_tokens=True) == LONG
    assert processor.model_input_names == ["input_ids", "attention_mask", "pixel_values"]


# ----------------------------------------------------------------------------------------------- remote code


def test_module_imports_only_remote_code_safe_packages():
    # The file is copied next to checkpoints and imported by `trust_remote_code`: no imports of this package.
    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 or node.module is None or not node.module.startswith("blip2_hf")
            roots.add(node.module.split(".")[0] if node.level == 0 else ".")
    allowed = {"__future__", "base64", "io", "json", "os", "urllib", "collections", "typing", "numpy", "PIL", "torch"}
    assert roots <= allowed | {"transformers"}, roots


def test_helper_tokenizers_have_the_documented_special_ids():
    opt, t5, llama, bert = make_opt_tokenizer(), make_t5_tokenizer(), make_llama_tokenizer(), make_bert_tokenizer()
    assert opt.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert (opt.bos_token_id, opt.eos_token_id, opt.pad_token_id, opt.padding_side) == (2, 2, 1, "left")
    assert opt("a cat")["input_ids"][0] == 2
    assert t5.convert_tokens_to_ids(["<pad>", "</s>", "<unk>"]) == [0, 1, 2]
    assert (t5.bos_token_id, t5.eos_token_id, t5.pad_token_id, t5.padding_side) == (None, 1, 0, "right")
    assert t5("a cat")["input_ids"][-1] == 1
    assert llama.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert (llama.bos_token_id, llama.eos_token_id, llama.pad_token_id, llama.padding_side) == (1, 2, 0, "left")
    assert bert.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]) == [0, 1, 2, 3, 4, 300]
    assert (bert.bos_token, bert.padding_side) == ("[DEC]", "right")
    assert bert("A Cat")["input_ids"] == [2, *bert("a cat", add_special_tokens=False)["input_ids"], 3]
    assert all(len(tok) == 300 for tok in (opt, t5, llama)) and len(bert) == 301
    # Copies: mutating one does not leak into the next call.
    opt.add_tokens(["<extra>"])
    assert len(make_opt_tokenizer()) == 300


def test_draw_images_is_deterministic_and_varied():
    first, again = draw_images(3, size=(40, 30), seed=1), draw_images(3, size=(40, 30), seed=1)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, again))
    assert len({image.tobytes() for image in first}) == 3
    assert draw_images(1, seed=2)[0].tobytes() != draw_images(1, seed=1)[0].tobytes()
    assert first[0].size == (40, 30) and first[0].mode == "RGB" and draw_images(1, mode="L")[0].mode == "L"


# ---------------------------------------------------------------------------------------------------------------------
# What a model consumes: the stage-2 processor, the stage-1 Q-Former tokenizer
# ---------------------------------------------------------------------------------------------------------------------


def test_without_qformer_tokenizer_returns_what_stage2_consumes(tmp_path):
    stage1 = build(qformer=True)
    stage2 = stage1.without_qformer_tokenizer()
    assert stage2.qformer_tokenizer is None and stage1.qformer_tokenizer is not None  # the original is untouched
    assert stage2.tokenizer is stage1.tokenizer and stage2.image_processor is stage1.image_processor
    assert (stage2.num_query_tokens, stage2.image_token_id) == (stage1.num_query_tokens, stage1.image_token_id)
    inputs = {"images": draw_images(2), "text": [SHORT, LONG], "padding": True, "return_tensors": "pt"}
    expected, actual = stage1(**inputs), stage2(**inputs)
    assert set(actual) == {"input_ids", "attention_mask", "pixel_values"} == set(stage2.model_input_names)
    for key in actual:
        assert torch.equal(actual[key], expected[key]), key
    stage2.save_pretrained(tmp_path)
    assert not (tmp_path / "qformer_tokenizer").exists()
    assert Blip2Processor.from_pretrained(tmp_path).qformer_tokenizer is None


def save_bert_tokenizer_folder(folder) -> None:
    """A bert-base-uncased-like folder (WordPiece vocabulary, no BOS): what `bert-base-uncased` holds."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "red", "circle", "##s"]
    vocab = {word: index for index, word in enumerate(words)}
    transformers.BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(folder)


def test_qformer_tokenizer_from_bert_adds_dec_as_lavis(tmp_path):
    save_bert_tokenizer_folder(tmp_path / "bert")
    tokenizer = Blip2Processor.qformer_tokenizer_from_bert(tmp_path / "bert")
    # LAVIS's init_tokenizer: [DEC] is BOS, the next id after BERT's vocabulary (30522 for bert-base-uncased)
    assert (tokenizer.bos_token, tokenizer.bos_token_id, len(tokenizer)) == ("[DEC]", 11, 12)
    assert tokenizer.padding_side == "right"
    assert tokenizer("a red cat").input_ids == [2, 5, 8, 6, 3]  # [CLS] ... [SEP]: [DEC] only replaces [CLS] for ITG
    assert tokenizer.tokenize("[DEC] a") == ["[DEC]", "a"]  # one special token, not split into word pieces
    # a tokenizer that already has a BOS of another kind is not a BERT tokenizer to extend
    make_opt_tokenizer().save_pretrained(tmp_path / "opt")
    with pytest.raises(ValueError, match="already has the BOS token"):
        Blip2Processor.qformer_tokenizer_from_bert(tmp_path / "opt")
    # a tokenizer that has [DEC] already is kept as is
    tokenizer.save_pretrained(tmp_path / "with_dec")
    assert len(Blip2Processor.qformer_tokenizer_from_bert(tmp_path / "with_dec")) == 12


@pytest.mark.parametrize("text", ["opt", "t5"])
def test_stage2_model_takes_a_stage1_processors_output(tmp_path, text):
    """A stage-2 folder saved (by older training/stage2.py) with the stage-1 processor: its `qformer_input_ids` are
    ignored, because the config says the Q-Former reads no text, and the outputs are those without them."""
    from blip2_hf import Blip2ForConditionalGeneration
    from blip2_hf.testing_utils import save_tiny_generation_checkpoint

    save_tiny_generation_checkpoint(tmp_path, text)
    stage2 = Blip2Processor.from_pretrained(tmp_path)
    Blip2Processor(
        image_processor=stage2.image_processor,
        tokenizer=stage2.tokenizer,
        qformer_tokenizer=make_bert_tokenizer(),
        num_query_tokens=stage2.num_query_tokens,
    ).save_pretrained(tmp_path)
    processor = Blip2Processor.from_pretrained(tmp_path)
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    inputs = processor(images=draw_images(2), text=[SHORT, LONG], padding=True, return_tensors="pt")
    assert "qformer_input_ids" in inputs
    clean = {key: value for key, value in inputs.items() if not key.startswith("qformer_")}
    generated = model.generate(**inputs, max_new_tokens=4)
    assert torch.equal(generated, model.generate(**clean, max_new_tokens=4))
    decoder = {"decoder_input_ids": torch.zeros(2, 1, dtype=torch.long)} if text == "t5" else {}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, **decoder).logits, model(**clean, **decoder).logits, atol=0, rtol=0)

    model.config.qformer_config.use_qformer_text_input = True  # the config promises text the model never reads
    with pytest.raises(ValueError, match="without_qformer_tokenizer"):
        model.generate(**inputs, max_new_tokens=4)
