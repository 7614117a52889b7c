"""Reference BLIP-2 configs and helpers for tests and benchmarks, as `transformers.testing_utils` is for
transformers: tiny configs (every width 32, vocab 99) and the Salesforce/blip2-* configs at real width with their
depth cut, all as transformers-format dicts (`model_type: "blip-2"`, what a Salesforce config.json holds), so that
both transformers' classes and ours can be built from them; tokenizers trained on the spot (`make_*_tokenizer`: the
builders of `blip2_hf.tokenizer_training` on a built-in corpus, or the caller's) in the special-token layouts of OPT,
T5, LLaMA and the Q-Former's BERT (+ `[DEC]`); and drawn images. Nothing here touches the Hub; library code never
imports this module."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import PreTrainedTokenizerFast

from .tokenizer_training import (
    train_bert_tokenizer,
    train_llama_tokenizer,
    train_opt_tokenizer,
    train_t5_tokenizer,
)

IMAGE_TOKEN = 90  # the `<image>` id of the tiny vocabularies below (vocab 99)

TINY_VISION = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30, patch_size=6
)
TINY_QFORMER = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    cross_attention_frequency=2,
)
TINY_TEXT = {
    "opt": dict(
        model_type="opt",
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=37,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=128,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    ),
    "t5": dict(
        model_type="t5",
        vocab_size=99,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,  # what transformers' Flan-T5 conversion writes (T5 has no BOS; 1 is `</s>`)
        decoder_start_token_id=0,
    ),
    "llama": dict(
        model_type="llama",
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
}
TINY_TEXT["qwen2"] = dict(TINY_TEXT["llama"], model_type="qwen2")  # the same shapes, Qwen2's code


def tiny_config_dict(text: str = "opt", num_query_tokens: int = 4, text_input: bool = False, **overrides) -> dict:
    """A transformers-format BLIP-2 config dict (`model_type` "blip-2", as the Salesforce files) at a tiny size."""
    config = dict(
        model_type="blip-2",
        vision_config=dict(TINY_VISION),
        qformer_config=dict(TINY_QFORMER, use_qformer_text_input=text_input),
        text_config=dict(TINY_TEXT[text]),
        num_query_tokens=num_query_tokens,
        image_token_index=IMAGE_TOKEN,
    )
    config.update(overrides)
    return copy.deepcopy(config)


def salesforce_config_dict(
    name: str,
    depth: int = 1,
    vision_depth: int | None = None,
    qformer_depth: int | None = None,
    text_depth: int | None = None,
) -> dict:
    """The Salesforce/blip2-opt-2.7b and blip2-flan-t5-xl configs (real widths and vocabularies) with every stack cut
    to `depth` layers, or each to its own (`vision_depth` of the ViT's 39, `qformer_depth` of 12, `text_depth` of the
    LLM's 32 / 24): benchmarks cut them in proportion so that each tower's share of the time stays as at full depth.
    Values from the published config.json files (opt-2.7b: vocab 50304, `<image>` 50265, eos "\\n" 50118;
    flan-t5-xl: vocab 32128, `<image>` 32100, gelu, bos 1)."""
    vision_depth = depth if vision_depth is None else vision_depth
    qformer_depth = max(depth, 2) if qformer_depth is None else qformer_depth
    depth = depth if text_depth is None else text_depth
    vision = dict(
        hidden_size=1408,
        intermediate_size=6144,
        num_hidden_layers=vision_depth,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
    )
    qformer = dict(num_hidden_layers=qformer_depth, cross_attention_frequency=2)
    if name == "blip2-opt-2.7b":
        text = dict(
            model_type="opt",
            vocab_size=50304,
            hidden_size=2560,
            ffn_dim=10240,
            num_attention_heads=32,
            num_hidden_layers=depth,
            word_embed_proj_dim=2560,
            max_position_embeddings=2048,
            do_layer_norm_before=True,
            prefix="</s>",
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=50118,
        )
        image_token_index = 50265
    elif name == "blip2-flan-t5-xl":
        text = dict(
            model_type="t5",
            vocab_size=32128,
            d_model=2048,
            d_kv=64,
            d_ff=5120,
            num_heads=32,
            num_layers=depth,
            num_decoder_layers=depth,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu",
            is_gated_act=True,
            layer_norm_epsilon=1e-6,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
            decoder_start_token_id=0,
        )
        image_token_index = 32100
    else:
        raise ValueError(name)
    return dict(
        model_type="blip-2",
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=32,
        image_token_index=image_token_index,
    )


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Move every weight off its init (zero query tokens, unit LayerNorms, ...), so that a parameter loaded into the
    wrong place cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * scale)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers and images
# ---------------------------------------------------------------------------------------------------------------------

CORPUS: tuple[str, ...] = (
    "a photo of a cat sitting on a red sofa",
    "a black dog running in the green grass",
    "two cats sleeping next to each other on a bed",
    "a small white dog playing with a blue ball",
    "a red circle on a white background",
    "a blue square next to a yellow triangle",
    "a green triangle inside a large black square",
    "three red circles and one blue square",
    "a cat looking out of the window",
    "a dog and a cat sitting together on the floor",
    "an orange cat with green eyes",
    "a brown dog with a red collar",
    "a yellow circle above a purple rectangle",
    "a picture of shapes in different colors",
    "the image shows a large blue circle",
    "a close up photo of a dog's face",
    "a kitten playing with a ball of yarn",
    "a puppy sleeping on a soft blanket",
    "a white square with a thin black border",
    "colorful shapes drawn on a gray background",
    "Question: what color is the circle? Answer: red",
    "Question: what animal is in the picture? Answer: a cat",
    "Question: how many dogs are there? Answer: two",
    "Question: what shape is blue? Answer: the square",
    "Question: is the cat sleeping? Answer: yes",
    "Question: what is the dog playing with? Answer: a ball",
    "Question: where is the cat sitting? Answer: on the sofa",
    "Question: what color is the background? Answer: white",
    "Question: how many triangles are in the image? Answer: one",
    "Question: is there a dog in the photo? Answer: no",
    "Question: what is the color of the square? Answer: green",
    "Question: which animal is running? Answer: the dog",
    "Question: what is above the rectangle? Answer: a yellow circle",
    "Question: are the cats awake? Answer: no, they are sleeping",
    "Question: what is inside the square? Answer: a triangle",
    "a photo of",
    "an image of",
    "a picture of a cat and a dog",
    "the cat is black and the dog is white",
    "a large red square and a small green circle",
    "the triangle is yellow",
    "a dog jumping to catch a frisbee in the park",
    "a cat lying in the sun near a window",
    "a group of colorful circles on a dark background",
    "the dog is brown and the ball is blue",
    "a striped cat on a wooden table",
    "a gray dog next to a red door",
    "shapes: circle, square, triangle, rectangle",
    "colors: red, green, blue, yellow, black, white",
    "describe the image in one sentence",
    "Question: describe the image. Answer: a cat on a sofa",
    "Question: What is shown? Answer: Two dogs and a cat.",
)


def make_opt_tokenizer(vocab_size: int = 300, corpus: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """`train_opt_tokenizer` on `corpus` (default: `CORPUS`)."""
    return train_opt_tokenizer(CORPUS if corpus is None else corpus, vocab_size)


def make_t5_tokenizer(vocab_size: int = 300, corpus: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """`train_t5_tokenizer` on `corpus` (default: `CORPUS`)."""
    return train_t5_tokenizer(CORPUS if corpus is None else corpus, vocab_size)


def make_llama_tokenizer(vocab_size: int = 300, corpus: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """`train_llama_tokenizer` on `corpus` (default: `CORPUS`)."""
    return train_llama_tokenizer(CORPUS if corpus is None else corpus, vocab_size)


def make_bert_tokenizer(vocab_size: int = 300, corpus: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """`train_bert_tokenizer` on `corpus` (default: `CORPUS`)."""
    return train_bert_tokenizer(CORPUS if corpus is None else corpus, vocab_size)


def make_tiny_processor(image_size: int = 30, num_query_tokens: int = 4):
    """A `Blip2Processor` for the tiny test models: `image_size` px images, `make_opt_tokenizer` as the LLM's tokenizer,
    `make_bert_tokenizer` as the Q-Former's, `num_query_tokens` image tokens."""
    from .processing_blip2 import Blip2Processor

    return Blip2Processor(
        image_processor=Blip2Processor.default_image_processor(image_size),
        tokenizer=make_opt_tokenizer(),
        qformer_tokenizer=make_bert_tokenizer(),
        num_query_tokens=num_query_tokens,
    )


_COLORS = (
    (220, 20, 60),
    (30, 144, 255),
    (50, 205, 50),
    (255, 215, 0),
    (148, 0, 211),
    (255, 140, 0),
    (0, 206, 209),
    (105, 105, 105),
)


def draw_images(n: int, size: tuple[int, int] = (40, 30), seed: int = 0, mode: str = "RGB") -> list[Image.Image]:
    """Return `n` deterministic images of `size` (width, height) with a few filled shapes each.

    Image `i` depends only on `(i, size, seed)`: its background, shape colours and positions are drawn from a NumPy
    generator seeded with `(seed, i)`, so different indices give different images. The images are drawn in RGB and
    then converted to `mode` with `Image.convert` (e.g. "L", "RGBA", "P").
    """
    width, height = size
    images = []
    for index in range(n):
        rng = np.random.default_rng((seed, index))
        background = tuple(int(c) for c in rng.integers(0, 256, size=3))
        image = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(image)
        for shape in range(3):
            color = _COLORS[int(rng.integers(len(_COLORS)))]
            x0, x1 = sorted(int(v) for v in rng.integers(0, max(width, 2), size=2))
            y0, y1 = sorted(int(v) for v in rng.integers(0, max(height, 2), size=2))
            box = (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))
            kind = (index + shape) % 3
            if kind == 0:
                draw.ellipse(box, fill=color)
            elif kind == 1:
                draw.rectangle(box, fill=color)
            else:
                draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=color)
        images.append(image if mode == "RGB" else image.convert(mode))
    return images


def save_tiny_generation_checkpoint(folder, text: str = "opt", num_query_tokens: int = 4) -> torch.nn.Module:
    """Save a tiny stage-2 folder (`Blip2ForConditionalGeneration` + `Blip2Processor`, 30 px images) whose vocabulary
    fits the processor's OPT- or T5-style tokenizer, its weights moved well off their initialization (`perturb_`,
    scale 0.2) so that generations differ per image; returns the model."""
    from .configuration_blip2 import Blip2Config
    from .modeling_blip2 import Blip2ForConditionalGeneration
    from .processing_blip2 import Blip2Processor

    tokenizer = make_opt_tokenizer() if text == "opt" else make_t5_tokenizer()
    processor = Blip2Processor(
        image_processor=Blip2Processor.default_image_processor(30),
        tokenizer=tokenizer,
        num_query_tokens=num_query_tokens,
    )
    config = tiny_config_dict(text, num_query_tokens=num_query_tokens, image_token_index=processor.image_token_id)
    config["text_config"]["vocab_size"] = len(processor.tokenizer) + 4
    if text == "opt":  # the tokenizer's ids: `</s>` 2 is BOS and EOS, `<pad>` 1
        config["text_config"].update(bos_token_id=2, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    model = perturb_(Blip2ForConditionalGeneration(Blip2Config(**config)), scale=0.2)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


TINY_VISION_FAMILIES = ("eva", "clip", "siglip", "dinov2", "convnext")


def tiny_vision_config(family: str):
    """A tiny random-weight vision config of `family` ("eva": ours, "clip", "siglip", "dinov2", "convnext"), each
    32 wide (ConvNeXt: its last stage), 2 layers (ConvNeXt: 2 stages), for 32-px images with 16 patch tokens (patch
    8; ConvNeXt: a patch-4 stem, then one 2x downsampling -> a 4x4 map). Returns the `PreTrainedConfig`."""
    from transformers import CLIPVisionConfig, ConvNextConfig, Dinov2Config, SiglipVisionConfig

    from .configuration_blip2 import Blip2VisionConfig

    vit = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32)
    if family == "eva":
        return Blip2VisionConfig(**vit, patch_size=8)
    if family == "clip":
        return CLIPVisionConfig(**vit, patch_size=8, projection_dim=32)
    if family == "siglip":
        return SiglipVisionConfig(**vit, patch_size=8)
    if family == "dinov2":
        vit.pop("intermediate_size")  # DINOv2 sizes its MLP by `mlp_ratio`
        return Dinov2Config(**vit, patch_size=8, mlp_ratio=2)
    if family == "convnext":
        return ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], patch_size=4, image_size=32)
    raise ValueError(f"tiny_vision_config: family={family!r}: expected one of {TINY_VISION_FAMILIES}.")


# Tiny LLM configs of every family BLIP-2 is tested with (`tiny_text_config`): the widths of `TINY_TEXT`, each
# family's own switches set so that its distinctive code runs (Mistral's sliding window shorter than a prompt with its
# image tokens, Gemma's scaled embeddings and explicit head_dim, mT5's untied head).
_TINY_FAMILIES = {
    "opt": TINY_TEXT["opt"],
    "llama": TINY_TEXT["llama"],
    "qwen2": TINY_TEXT["qwen2"],
    "mistral": dict(TINY_TEXT["llama"], model_type="mistral", sliding_window=8),
    "gemma": dict(TINY_TEXT["llama"], model_type="gemma", head_dim=8, hidden_activation="gelu_pytorch_tanh"),
    "t5": TINY_TEXT["t5"],
    "mt5": dict(TINY_TEXT["t5"], model_type="mt5"),
}


def tiny_text_config(family: str, **overrides) -> dict:
    """A tiny LLM config dict (`model_type` set) of `family`: "opt", "llama", "qwen2", "mistral", "gemma" (decoder-only)
    or "t5", "mt5" (encoder-decoder; Flan-T5 is T5), widths 32 and vocab 99 unless `overrides` say otherwise."""
    if family not in _TINY_FAMILIES:
        raise ValueError(f"tiny_text_config: unknown family {family!r}; expected one of {sorted(_TINY_FAMILIES)}.")
    return copy.deepcopy(dict(_TINY_FAMILIES[family], **overrides))
