"""Everything the tiny configs (`training/configs/tiny/`) need, built offline in a few seconds:

- a synthetic captioned image set (colored shapes: one caption per image says what and where, another how big);
- tokenizers trained on its captions: the Q-Former's BERT WordPiece (+ `[DEC]`), an OPT-style byte-level BPE and a
  T5-style one, and a `Blip2Processor` for each LLM;
- small random "off-the-shelf" towers standing in for EVA ViT-g, bert-base-uncased, OPT and Flan-T5, saved with
  `save_pretrained`, plus the stage-1 `Blip2Config`.

    python training/tiny_setup.py --output tiny_work
    python training/stage1.py --config training/configs/tiny/stage1.yaml
    python training/stage2.py --config training/configs/tiny/stage2_opt.yaml   # or stage2_t5.yaml

The towers are random: the tiny run shows the pipeline and its losses falling (stage 1's ITC and ITM below their
priors, `tests/test_training.py`), not a useful model.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import BertConfig, BertForMaskedLM, OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

from blip2_hf import Blip2Config, Blip2Processor, Blip2VisionConfig, Blip2VisionModel
from blip2_hf.tokenizer_training import train_bert_tokenizer, train_opt_tokenizer, train_t5_tokenizer

IMAGE_SIZE, NUM_QUERY_TOKENS, WIDTH = 32, 8, 64
COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 80, 220), "yellow": (240, 210, 30)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"left": 0.3, "right": 0.7}
SIZES = {"small": 0.18, "large": 0.32}


def draw(shape: str, color: str, place: str, size: str) -> Image.Image:
    image = Image.new("RGB", (64, 64), (245, 245, 245))
    center, radius = PLACES[place] * 64, SIZES[size] * 64
    box = (center - radius, 32 - radius, center + radius, 32 + radius)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        pen.rectangle(box, fill=COLORS[color])
    else:
        pen.polygon([(box[0], box[3]), (center, box[1]), (box[2], box[3])], fill=COLORS[color])
    return image


def make_data(folder: Path, num_images: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records, captions = [], []
    for index in range(num_images):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        place, size = rng.choice(list(PLACES)), rng.choice(list(SIZES))
        path = f"images/{index:04d}.png"
        draw(shape, color, place, size).save(folder / path)
        texts = [f"a {color} {shape} on the {place}", f"a {size} {color} {shape}"]
        records.append({"image": path, "caption": texts})
        captions += texts
    (folder / "train.json").write_text(json.dumps(records, indent=1))
    return captions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="tiny_work")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.output)
    torch.manual_seed(args.seed)

    captions = make_data(out / "data", args.num_images, args.seed)
    corpus = captions + ["\n"]
    image_processor = Blip2Processor.default_image_processor(IMAGE_SIZE)
    qformer_tokenizer = train_bert_tokenizer(corpus, vocab_size=120)
    for name, tokenizer in (("opt", train_opt_tokenizer(corpus, 320)), ("t5", train_t5_tokenizer(corpus, 160))):
        processor = Blip2Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            qformer_tokenizer=qformer_tokenizer,
            num_query_tokens=NUM_QUERY_TOKENS,
        )
        processor.save_pretrained(out / f"processor_{name}")
        vocab = len(processor.tokenizer)  # `<image>` included
        if name == "opt":
            llm = OPTForCausalLM(
                OPTConfig(
                    vocab_size=vocab,
                    hidden_size=WIDTH,
                    word_embed_proj_dim=WIDTH,
                    ffn_dim=2 * WIDTH,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    max_position_embeddings=128,
                    pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            )
        else:
            llm = T5ForConditionalGeneration(
                T5Config(
                    vocab_size=vocab,
                    d_model=WIDTH,
                    d_kv=16,
                    d_ff=2 * WIDTH,
                    num_layers=2,
                    num_heads=4,
                    feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    decoder_start_token_id=tokenizer.pad_token_id,
                )
            )
        llm.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)

    vision_config = Blip2VisionConfig(
        hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=8, initializer_range=0.02,
    )  # fmt: skip
    Blip2VisionModel(vision_config).save_pretrained(out / "vision")
    bert_vocab = len(qformer_tokenizer) - 1  # BERT without `[DEC]`, which from_bert adds
    BertForMaskedLM(
        BertConfig(
            vocab_size=bert_vocab,
            hidden_size=WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=2 * WIDTH,
            max_position_embeddings=64,
        )
    ).save_pretrained(out / "bert")
    Blip2Config(
        vision_config=vision_config.to_dict(),
        qformer_config=dict(
            vocab_size=len(qformer_tokenizer),
            hidden_size=WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=2 * WIDTH,
            max_position_embeddings=64,
            use_qformer_text_input=True,
            # No dropout: at this scale LAVIS's 0.1 (meant for bert-base on 129M images) holds ITC at its chance
            # level, ln(batch), through a short run, as in the demo (benchmarks/README.md, "Training choices").
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            bos_token_id=qformer_tokenizer.bos_token_id,
            eos_token_id=qformer_tokenizer.sep_token_id,
        ),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_text_hidden_size=32,
    ).save_pretrained(out / "stage1_config")
    print(f"tiny setup written to {out}: {args.num_images} images, {len(captions)} captions")


if __name__ == "__main__":
    main()
