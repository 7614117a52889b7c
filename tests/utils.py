"""Offline helpers shared by the test suite: tiny tokenizers trained on the spot and drawn test images.

Nothing here touches the Hugging Face Hub. Every tokenizer is trained with the `tokenizers` library on the small
English corpus below (captions and "Question: ... Answer: ..." prompts), wrapped in a `PreTrainedTokenizerFast`, and
copies the special-token layout of the model family it stands in for (ids for the default `vocab_size=300`):

| builder                | stands in for    | special ids                                                    | added per sequence | padding |
|------------------------|------------------|----------------------------------------------------------------|--------------------|---------|
| `make_opt_tokenizer`   | OPT              | `<s>`=0 `<pad>`=1 `</s>`=2 `<unk>`=3                             | BOS `</s>` first   | left    |
| `make_t5_tokenizer`    | (Flan-)T5        | `<pad>`=0 `</s>`=1 `<unk>`=2                                     | EOS `</s>` last    | right   |
| `make_llama_tokenizer` | LLaMA / Vicuna   | `<unk>`=0 (also pad) `<s>`=1 `</s>`=2                            | BOS `<s>` first    | left    |
| `make_bert_tokenizer`  | Q-Former (BERT)  | `[PAD]`=0 `[UNK]`=1 `[CLS]`=2 `[SEP]`=3 `[MASK]`=4 `[DEC]`=300 (BOS) | `[CLS] ... [SEP]`  | right   |

OPT, T5 and LLaMA have exactly `vocab_size` tokens; BERT has one more (`[DEC]`). Each builder trains once per process
(`functools.cache`) and returns a deep copy, so a test that mutates its tokenizer (a processor adding `<image>`)
cannot leak into another test. Import as `from utils import ...` (pytest puts `tests/` on `sys.path`).
"""

from __future__ import annotations

import copy
import functools

import numpy as np
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

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
def _opt_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    # OPT's quirk: its BOS is `</s>` (id 2), prepended to every sequence.
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return _wrap(tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", padding_side="left")


@functools.cache
def _t5_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    # SentencePiece-style (Metaspace) BPE rather than Unigram: on a corpus this small the Unigram trainer stops far
    # below the requested vocabulary size, BPE reaches it exactly.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    # T5 has no BOS; `</s>` closes every sequence.
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return _wrap(tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", padding_side="right")


@functools.cache
def _llama_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    # SentencePiece-style BPE (Metaspace), as in LLaMA-1/2 and Vicuna, without byte fallback (no room for 256
    # byte tokens in a 300-token vocabulary; unknown characters map to `<unk>`).
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    # Vicuna (InstructBLIP) pads with `<unk>` (pad_token_id=0), LLaMA itself ships without a pad token.
    return _wrap(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>", padding_side="left")


@functools.cache
def _bert_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
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


def make_opt_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """OPT-style byte-level BPE: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3; BOS is `</s>` (prepended), left padding."""
    return copy.deepcopy(_opt_tokenizer(vocab_size))


def make_t5_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """T5-style Metaspace BPE: `<pad>`=0, `</s>`=1, `<unk>`=2; no BOS, `</s>` appended, right padding."""
    return copy.deepcopy(_t5_tokenizer(vocab_size))


def make_llama_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """LLaMA-style Metaspace BPE: `<unk>`=0 (also the pad token), `<s>`=1 (prepended), `</s>`=2, left padding."""
    return copy.deepcopy(_llama_tokenizer(vocab_size))


def make_bert_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Q-Former BERT WordPiece (lowercase): `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3, `[MASK]`=4, plus `[DEC]` as
    `bos_token` (id = trained vocabulary size, i.e. the last id); `[CLS] $A [SEP]`, right padding."""
    return copy.deepcopy(_bert_tokenizer(vocab_size))


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
