"""Reference BLIP-2 configs and helpers for tests and benchmarks, as `transformers.testing_utils` is for
transformers: tiny configs (every width 32, vocab 99) and the Salesforce/blip2-* configs at real width with their
depth cut, all as transformers-format dicts (`model_type: "blip-2"`, what a Salesforce config.json holds), so that
both transformers' classes and ours can be built from them; tokenizers trained on the spot with `tokenizers` (on a
built-in corpus, or the caller's) in the special-token layouts of OPT, T5, LLaMA and the Q-Former's BERT (+ `[DEC]`);
and drawn images. Nothing here touches the Hub."""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

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


def salesforce_config_dict(name: str, depth: int = 1) -> dict:
    """The Salesforce/blip2-opt-2.7b and blip2-flan-t5-xl configs (real widths and vocabularies) with every stack cut
    to `depth` layers. Values from the published config.json files (opt-2.7b: vocab 50304, `<image>` 50265, eos "\\n"
    50118; flan-t5-xl: vocab 32128, `<image>` 32100, gelu, bos 1)."""
    vision = dict(
        hidden_size=1408,
        intermediate_size=6144,
        num_hidden_layers=depth,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
    )
    qformer = dict(num_hidden_layers=max(depth, 2), cross_attention_frequency=2)
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


def _wrap(tokenizer: Tokenizer, **kwargs) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kwargs)


@functools.cache
def _opt_tokenizer(vocab_size: int, corpus: tuple[str, ...]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    # OPT's quirk: its BOS is `</s>` (id 2), prepended to every sequence.
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return _wrap(tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", padding_side="left")


@functools.cache
def _t5_tokenizer(vocab_size: int, corpus: tuple[str, ...]) -> PreTrainedTokenizerFast:
    # SentencePiece-style (Metaspace) BPE rather than Unigram: on a corpus this small the Unigram trainer stops far
    # below the requested vocabulary size, BPE reaches it exactly.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    # T5 has no BOS; `</s>` closes every sequence.
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return _wrap(tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", padding_side="right")


@functools.cache
def _llama_tokenizer(vocab_size: int, corpus: tuple[str, ...]) -> PreTrainedTokenizerFast:
    # SentencePiece-style BPE (Metaspace), as in LLaMA-1/2 and Vicuna, without byte fallback (no room for 256
    # byte tokens in a 300-token vocabulary; unknown characters map to `<unk>`).
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    # Vicuna (InstructBLIP) pads with `<unk>` (pad_token_id=0), LLaMA itself ships without a pad token.
    return _wrap(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>", padding_side="left")


@functools.cache
def _bert_tokenizer(vocab_size: int, corpus: tuple[str, ...]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer = _wrap(
        tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        padding_side="right",
    )
    # BLIP-2 stage 1 (LAVIS `init_tokenizer`): `[DEC]` is added as BOS and replaces `[CLS]` for the generative
    # (image-grounded text generation) loss.
    tokenizer.add_special_tokens({"bos_token": AddedToken("[DEC]", special=True, normalized=False)})
    return tokenizer


def make_opt_tokenizer(vocab_size: int = 300, corpus: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """OPT-style byte-level BPE: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3; BOS is `</s>` (prepended), left padding."""
    return copy.deepcopy(_opt_tokenizer(vocab_size, tuple(corpus) if corpus is not None else CORPUS))


def make_t5_tokenizer(vocab_size: int = 300, corpus: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """T5-style Metaspace BPE: `<pad>`=0, `</s>`=1, `<unk>`=2; no BOS, `</s>` appended, right padding."""
    return copy.deepcopy(_t5_tokenizer(vocab_size, tuple(corpus) if corpus is not None else CORPUS))


def make_llama_tokenizer(vocab_size: int = 300, corpus: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """LLaMA-style Metaspace BPE: `<unk>`=0 (also the pad token), `<s>`=1 (prepended), `</s>`=2, left padding."""
    return copy.deepcopy(_llama_tokenizer(vocab_size, tuple(corpus) if corpus is not None else CORPUS))


def make_bert_tokenizer(vocab_size: int = 300, corpus: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """Q-Former BERT WordPiece (lowercase): `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3, `[MASK]`=4, plus `[DEC]` as
    `bos_token` (id = trained vocabulary size, i.e. the last id); `[CLS] $A [SEP]`, right padding."""
    return copy.deepcopy(_bert_tokenizer(vocab_size, tuple(corpus) if corpus is not None else CORPUS))


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
    from .processing_blip2 import Blip2HFProcessor

    tokenizer = make_opt_tokenizer() if text == "opt" else make_t5_tokenizer()
    processor = Blip2HFProcessor(
        image_processor=Blip2HFProcessor.default_image_processor(30),
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
