"""Image-text retrieval with the stage-1 Q-Former (`Blip2ForImageTextRetrieval`; the paper's Table 5): Flickr30K
1K test (zero-shot) and COCO 5K test, ranked as LAVIS's BLIP-2 `compute_sim_matrix` does.

    python evaluation/retrieval.py --model runs/blip2-itm-coco --image_size 364 \\
        --annotations flickr30k_test.json --image_dir flickr30k-images --output_dir results/flickr30k
    accelerate launch --multi_gpu --num_processes 8 evaluation/retrieval.py ...   # the same, 8 GPUs

Annotation files (`--format auto` tells them apart):
- `lavis`: LAVIS's retrieval test list `[{"image": "path.jpg", "caption": ["...", x5]}]` (`flickr30k_test.json`,
  `coco_karpathy_test.json`), image paths relative to `--image_dir`.
- `karpathy`: Karpathy's `dataset_flickr30k.json` / `dataset_coco.json` `{"images": [{"filename", "filepath",
  "split", "sentences": [{"raw"}]}]}`, the images of `--split` (test).
Results are labelled `custom` (with the file's name) unless `--benchmark coco|flickr30k` is given and the file is
that benchmark's official one, its whole test split (see `common.check_benchmark`).

The model is a `Blip2ForImageTextRetrieval` folder (a stage-1 folder loads into it); texts are Q-Former (BERT) tokens
from `processor.qformer_tokenizer` or `--tokenizer`, each caption cleaned by LAVIS's `pre_caption` and cut to 35
tokens. Every image and text is encoded once (`blip2_hf.retrieval.encode_images` / `encode_texts`); the ITC
similarity (cosine, max over the queries) picks each image's top-k texts and each text's top-k images (k = 128);
those pairs are scored `ITM match logit + ITC`, the others -100; Recall@1/5/10 in both directions.

With several processes, each encodes a slice of the images and of the texts; the main process computes the ITC
matrix and the candidates; each process runs ITM on the candidate pairs whose image it encoded (the vision outputs
never move between processes), and the main process puts the scores together.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from common import (
    add_benchmark_arg,
    add_common_args,
    check_args,
    check_benchmark,
    check_images_exist,
    custom_table,
    dataset_fields,
    finish,
    fmt,
    gather,
    image_path,
    interpolate_pos_encoding,
    load_model,
    load_processor,
    loader,
    markdown_table,
    model_name,
    read_json,
    screen_images,
    settings,
    shard,
    skipped_list,
    write_outputs,
)
from transformers import AutoTokenizer

from blip2_hf import Blip2ForImageTextRetrieval
from blip2_hf.data import load_image, pre_caption
from blip2_hf.metrics import retrieval_recall
from blip2_hf.retrieval import (
    NO_MATCH_SCORE,
    ImageIndex,
    TextIndex,
    encode_images,
    encode_texts,
    itc_similarity,
    itm_match_logits,
)

TOP_SAVED = 10  # ranked candidates per query kept in predictions.json

# Table 5 of the paper: Flickr30K zero-shot (1K test) and COCO fine-tuned (5K test), image->text (TR) and
# text->image (IR) Recall@K; its BLIP-2 rows.
TABLE5_DATASETS = {"flickr30k": "Flickr30K", "coco": "COCO"}
TABLE5_METRICS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")
TABLE5_PAPER_ROWS = {
    "BLIP-2 ViT-L": (96.9, 100.0, 100.0, 88.6, 97.6, 98.9, 83.5, 96.0, 98.0, 66.3, 86.5, 91.8),
    "BLIP-2 ViT-g": (97.6, 100.0, 100.0, 89.7, 98.1, 98.9, 85.4, 97.0, 98.5, 68.3, 87.7, 92.6),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--annotations", required=True, help="LAVIS retrieval list or Karpathy dataset JSON.")
    parser.add_argument("--format", default="auto", choices=["auto", "lavis", "karpathy"])
    parser.add_argument("--split", default="test", help="Karpathy split to evaluate.")
    parser.add_argument(
        "--dataset",
        default="auto",
        choices=["auto", *TABLE5_DATASETS],
        help="Recorded as the protocol only (both score alike): results are labelled with a benchmark only with "
        "--benchmark. auto: the Karpathy file's 'dataset', else coco when the file name contains 'coco', else "
        "flickr30k.",
    )
    add_benchmark_arg(parser, "retrieval")
    parser.add_argument("--tokenizer", default=None, help="Q-Former tokenizer (default: the processor's).")
    parser.add_argument("--k", type=int, default=128, help="Candidates re-ranked by ITM per query (LAVIS k_test).")
    parser.add_argument("--max_words", type=int, default=50, help="pre_caption's word limit (LAVIS: 50).")
    parser.add_argument("--max_length", type=int, default=35, help="Q-Former text tokens (LAVIS: 35).")
    parser.add_argument("--itm_batch_size", type=int, default=128, help="(image, text) pairs per ITM pass.")
    parser.add_argument("--save_scores", action="store_true", help="Also write the score matrices (scores.pt).")
    args = parser.parse_args(argv)
    check_args(args)
    if args.k < 1 or args.itm_batch_size < 1:
        parser.error("--k and --itm_batch_size must be at least 1.")
    if args.benchmark and (args.dataset not in ("auto", args.benchmark) or args.split != "test"):
        parser.error(f"--benchmark {args.benchmark} is its test split: drop --dataset / --split.")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Annotation files -> image paths, captions, img2txt (caption indices per image), txt2img (image index per caption)
# ---------------------------------------------------------------------------------------------------------------------


def load_annotations(args: argparse.Namespace) -> tuple[list[str], list[str], list[int], str, str]:
    """Image paths, every raw caption, the number of captions of each image (first `--limit` images), the format, the
    dataset."""
    data = read_json(args.annotations)
    file_format = args.format
    if file_format == "auto":
        if isinstance(data, list):
            file_format = "lavis"
        elif isinstance(data, dict) and "images" in data:
            file_format = "karpathy"
        else:
            raise SystemExit(
                f"Cannot tell the format of {args.annotations}: expected a LAVIS list [{{'image', 'caption'}}] or a "
                "Karpathy dataset JSON {'images': [{'filename', 'split', 'sentences'}]}."
            )
    if file_format == "lavis":
        entries = [(entry["image"], entry["caption"]) for entry in data]
    else:
        entries = [
            (os.path.join(image.get("filepath", ""), image["filename"]), [s["raw"] for s in image["sentences"]])
            for image in data["images"]
            if image.get("split") == args.split
        ]
    entries = [(image, [captions] if isinstance(captions, str) else list(captions)) for image, captions in entries]
    if args.limit is not None:
        entries = entries[: args.limit]
    if not entries or not all(captions for _, captions in entries):
        raise SystemExit(f"{args.annotations}: no images (split {args.split!r}?) or an image without captions.")
    dataset = args.benchmark or args.dataset
    if dataset == "auto":
        named = data.get("dataset") if isinstance(data, dict) else None
        dataset = named if named in TABLE5_DATASETS else "coco" if "coco" in args.annotations.lower() else "flickr30k"
    return (
        [image_path(args.image_dir, image) for image, _ in entries],
        [caption for _, captions in entries for caption in captions],
        [len(captions) for _, captions in entries],
        file_format,
        dataset,
    )


def without_images(
    paths: list[str], texts: list[str], counts: list[int], bad: dict[str, str]
) -> tuple[list[str], list[str], list[int]]:
    """`load_annotations`' images, texts and counts without the images in `bad` and their captions (left out of both
    directions with `--skip_bad_images`)."""
    starts = [0, *itertools.accumulate(counts)]
    kept = [i for i, path in enumerate(paths) if path not in bad]
    return (
        [paths[i] for i in kept],
        [texts[t] for i in kept for t in range(starts[i], starts[i + 1])],
        [counts[i] for i in kept],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Encoding, ITC candidates, ITM re-ranking
# ---------------------------------------------------------------------------------------------------------------------


class ImageCollate:
    def __init__(self, processor):
        self.processor = processor

    def __call__(self, paths: list[str]) -> dict[str, torch.Tensor]:
        return self.processor(images=[load_image(path) for path in paths], return_tensors="pt")


def qformer_tokenizer(args: argparse.Namespace, processor) -> Any:
    if args.tokenizer:
        return AutoTokenizer.from_pretrained(args.tokenizer)
    if processor.qformer_tokenizer is not None:
        return processor.qformer_tokenizer
    if getattr(processor.tokenizer, "cls_token", None) is not None:  # transformers' blip2-itm checkpoints: BERT
        return processor.tokenizer
    raise SystemExit("The processor has no Q-Former tokenizer (qformer_tokenizer/): pass --tokenizer.")


def encode(model, processor, tokenizer, paths: list[str], texts: list[str], args, main: bool):
    """This process's slice of images (`ImageIndex`, vision outputs on the CPU) and texts (`TextIndex`)."""
    dim = model.config.image_text_hidden_size
    images = ImageIndex(torch.empty(0, model.config.num_query_tokens, dim), None)
    if paths:
        images = encode_images(
            model,
            loader(paths, ImageCollate(processor), args),
            interpolate_pos_encoding=interpolate_pos_encoding(args, model.config),
            progress=main,
        )
    text_batches = [
        tokenizer(
            texts[start : start + args.batch_size],
            padding="longest",
            truncation=True,
            max_length=args.max_length,
            return_tensors="pt",
        )
        for start in range(0, len(texts), args.batch_size)
    ]
    empty = torch.empty(0, 1, dtype=torch.long)
    text_index = TextIndex(torch.empty(0, dim), empty, empty)
    if text_batches:
        text_index = encode_texts(model, text_batches, progress=main)
    return images, text_index


def right_pad_cat(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    length = max(tensor.shape[1] for tensor in tensors)
    return torch.cat([F.pad(tensor, (0, length - tensor.shape[1]), value=value) for tensor in tensors])


def candidates(itc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k texts of each image `[N_img, k]` and the top-k images of each text `[N_txt, k]`, by ITC."""
    return itc.topk(min(k, itc.shape[1]), dim=1).indices.cpu(), itc.t().topk(min(k, itc.shape[0]), dim=1).indices.cpu()


def candidate_pairs(top_texts: torch.Tensor, top_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (image, text) pairs of both directions: i2t pairs then t2i pairs, as `[2, n]` (image, text) rows."""
    num_images, num_texts = top_texts.shape[0], top_images.shape[0]
    i2t = torch.stack([torch.arange(num_images).repeat_interleave(top_texts.shape[1]), top_texts.flatten()])
    t2i = torch.stack([top_images.flatten(), torch.arange(num_texts).repeat_interleave(top_images.shape[1])])
    return i2t, t2i


def itm_logits(model, images: ImageIndex, first_image: int, texts: TextIndex, pairs: torch.Tensor, args, main: bool):
    """ITM match logits (fp32, CPU) of `pairs [2, n]` (global image, text indices), all of whose images are in this
    process's slice starting at `first_image`: `itm_match_logits` projects each image's keys/values once."""
    image_ids, text_ids = pairs
    return itm_match_logits(
        model, images.image_embeds, texts, image_ids - first_image, text_ids, args.itm_batch_size, progress=main
    )


def rerank(model, accelerator: Accelerator, images: ImageIndex, first_image: int, texts: TextIndex, itc, args):
    """LAVIS's score matrices `score_i2t [N_img, N_txt]`, `score_t2i [N_txt, N_img]` (on the main process; None
    elsewhere): `ITM + ITC` on each query's top-k candidates, -100 elsewhere."""
    top = candidates(itc, args.k) if accelerator.is_main_process else None
    if accelerator.num_processes > 1:
        top = broadcast_object_list([top])[0]  # every process re-ranks the same candidates
    i2t, t2i = candidate_pairs(*top)
    num_texts = texts.input_ids.shape[0]
    keys = torch.cat([i2t[0] * num_texts + i2t[1], t2i[0] * num_texts + t2i[1]]).unique()  # each pair once, sorted
    first, last = first_image, first_image + (0 if images.image_embeds is None else images.image_embeds.shape[0])
    mine = keys[(keys // num_texts >= first) & (keys // num_texts < last)]
    logits = itm_logits(
        model,
        images,
        first_image,
        texts,
        torch.stack([mine // num_texts, mine % num_texts]),
        args,
        accelerator.is_main_process,
    )
    scored = gather(accelerator, [(mine, logits)])
    if not accelerator.is_main_process:
        return None, None
    keys = torch.cat([pair_keys for pair_keys, _ in scored])
    logits = torch.cat([pair_logits for _, pair_logits in scored])
    order = keys.argsort()
    keys, logits = keys[order], logits[order]
    itc = itc.float().cpu()

    def scores(pairs: torch.Tensor) -> torch.Tensor:
        return logits[torch.searchsorted(keys, pairs[0] * num_texts + pairs[1])] + itc[pairs[0], pairs[1]]

    score_i2t = torch.full(itc.shape, NO_MATCH_SCORE)
    score_i2t[i2t[0], i2t[1]] = scores(i2t)
    score_t2i = torch.full(itc.t().shape, NO_MATCH_SCORE)
    score_t2i[t2i[1], t2i[0]] = scores(t2i)
    return score_i2t, score_t2i


# ---------------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------------


def table5(name: str, dataset: str, metrics: dict[str, float]) -> str:
    header = ["Model"] + [
        f"{TABLE5_DATASETS[data]} {'TR' if metric.startswith('txt') else 'IR'}@{metric.rsplit('r', 1)[1]}"
        for data in TABLE5_DATASETS
        for metric in TABLE5_METRICS
    ]
    rows = [[f"{model} (paper)", *map(fmt, values)] for model, values in TABLE5_PAPER_ROWS.items()]
    rows.append(
        [f"**{name}**"]
        + [fmt(metrics[m] if data == dataset else None) for data in TABLE5_DATASETS for m in TABLE5_METRICS]
    )
    title = (
        "Image-text retrieval Recall@K (%), as Table 5 of the BLIP-2 paper: Flickr30K zero-shot (1K test), COCO "
        "fine-tuned (5K test); TR = image->text, IR = text->image."
    )
    return title + "\n\n" + markdown_table(header, rows)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    accelerator = Accelerator()
    paths, texts, counts, file_format, dataset = load_annotations(args)
    if args.benchmark:
        check_benchmark("retrieval", args, args.annotations, len(paths), "images")
    check_images_exist(paths)
    bad = screen_images(accelerator, paths, args)  # every image decoded before the model: nothing fails late
    paths, texts, counts = without_images(paths, texts, counts, bad)
    img2txt, txt2img, start = [], [], 0
    for image, count in enumerate(counts):
        img2txt.append(list(range(start, start + count)))
        txt2img += [image] * count
        start += count
    local_images = shard(accelerator, list(range(len(paths))))
    local_texts = shard(accelerator, list(range(len(texts))))

    processor = load_processor(args)
    tokenizer = qformer_tokenizer(args, processor)
    model, dtype = load_model(Blip2ForImageTextRetrieval, args, accelerator)
    if accelerator.is_main_process:
        print(f"{dataset} ({file_format} format): {len(paths)} images, {len(texts)} texts, k={args.k}")

    captions = [pre_caption(texts[i], args.max_words) for i in local_texts]
    images, text_index = encode(
        model, processor, tokenizer, [paths[i] for i in local_images], captions, args, accelerator.is_main_process
    )
    # Every process gets every text's tokens (ITM) and the main process every ITC feature.
    gathered = gather(accelerator, [(images.image_feats.cpu(), *(t.cpu() for t in text_index))])
    pad = tokenizer.pad_token_id or 0
    all_texts = TextIndex(
        torch.cat([g[1] for g in gathered]),
        right_pad_cat([g[2] for g in gathered], pad),
        right_pad_cat([g[3] for g in gathered], 0),
    )
    itc = None
    if accelerator.is_main_process:
        image_feats = torch.cat([g[0] for g in gathered]).to(model.device)
        itc = itc_similarity(image_feats, all_texts.text_feats.to(model.device))
    first_image = local_images[0] if local_images else len(paths)
    score_i2t, score_t2i = rerank(model, accelerator, images, first_image, all_texts, itc, args)
    if not accelerator.is_main_process:
        finish(accelerator)
        return None

    metrics = retrieval_recall(score_i2t, score_t2i, img2txt, txt2img)
    predictions = dict(
        images=paths,
        texts=texts,
        img2txt=img2txt,
        txt2img=txt2img,
        i2t_top=score_i2t.topk(min(TOP_SAVED, len(texts)), dim=1).indices.tolist(),
        t2i_top=score_t2i.topk(min(TOP_SAVED, len(paths)), dim=1).indices.tolist(),
    )
    results = dict(
        task="retrieval",
        **dataset_fields(args, args.annotations, dataset),
        metrics=metrics,
        settings=settings(
            args, accelerator, dtype, format=file_format, num_images=len(paths), num_texts=len(texts), k_used=args.k
        ),
        skipped_images=skipped_list(bad),
    )
    if args.benchmark:
        table = table5(model_name(args), dataset, metrics)
    else:
        header = [f"{'TR' if m.startswith('txt') else 'IR'}@{m.rsplit('r', 1)[1]}" for m in TABLE5_METRICS]
        values = [metrics[m] for m in TABLE5_METRICS]
        table = custom_table(model_name(args), os.path.basename(args.annotations), header, values)
    write_outputs(args.output_dir, results, predictions, table)
    if args.save_scores and args.output_dir:
        torch.save(dict(score_i2t=score_i2t, score_t2i=score_t2i), os.path.join(args.output_dir, "scores.pt"))
    finish(accelerator)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
