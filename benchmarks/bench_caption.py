"""Captioning a folder of JPEGs: blip2_hf's streamed `caption_images` (what `blip2-hf caption DIR` runs) against
transformers' `pipeline("image-to-text", batch_size=...)` with transformers' `Blip2ForConditionalGeneration`.

    python benchmarks/bench_caption.py                  # real widths, depth cut (see SETTINGS), a few minutes on CPU
    python benchmarks/bench_caption.py --quick          # smoke run: tiny model, 8 images, 1 repeat
    python benchmarks/bench_caption.py --device cuda    # the same on a GPU (float32 on both sides)

A folder of 640x480 JPEGs (shapes over noise, quality 90) is written to a temporary folder. transformers' model is
built with a fixed seed, perturbed (`blip2_hf.testing_utils.perturb_`), saved, and both models are loaded from that
folder; the processors share one tokenizer and the same image settings (transformers' `BlipImageProcessorPil`, the
backend blip2_hf's image processor builds on, so both see the same pixels). Both caption the whole folder by beam
search with `max_new_tokens == min_new_tokens` (no row stops early), in batches of the same size:

    ours    caption_images(model, processor, paths, batch_size=B, num_workers=W)   DataLoader workers decode
    peer    pipeline("image-to-text", model=..., processor=..., batch_size=B)({"images": path, "text": ""} for ...)

transformers 5 turns "image-to-text" into "image-text-to-text", which needs a text per image: "" is BLIP-2's
image-only captioning prompt. Captions must be identical (the pipeline's text stripped, as ours) before any ratio is
printed; then images/s (median over interleaved repeats; the identity pass is the warm-up) and peak memory (CUDA: max allocated; CPU:
peak resident memory above the start of the call: this process's RSS plus its DataLoader workers' own
(unique) memory, sampled every 5 ms).
Results: a markdown table and bench_out/caption.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import transformers
from PIL import Image, ImageFilter

import blip2_hf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment as machine_environment  # noqa: E402

from blip2_hf.batch_inference import caption_images, default_num_workers
from blip2_hf.testing_utils import draw_images, make_opt_tokenizer, perturb_, salesforce_config_dict, tiny_config_dict

OUT_DEFAULT = Path(__file__).resolve().parents[1] / "bench_out" / "caption.json"
# (name, config, image size, images, batch size, beams, new tokens, timed repeats)
SETTINGS = {
    "tiny-opt": (tiny_config_dict("opt"), 30, 8, 4, 3, 4, 5),
    # ViT-g + OPT-2.7b widths; depths cut in proportion (ViT 5 of 39, Q-Former 12 of 12, OPT 4 of 32)
    "opt-2.7b-width-vit5-qformer12-opt4": (
        salesforce_config_dict("blip2-opt-2.7b", vision_depth=5, qformer_depth=12, text_depth=4),
        224,
        16,
        8,
        3,
        4,
        2,
    ),
}


def write_jpegs(folder: Path, count: int, size: tuple[int, int] = (640, 480)) -> list[Path]:
    """`count` photo-sized JPEGs: drawn shapes, blurred, plus noise (so they compress like photos, not flat art)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index, image in enumerate(draw_images(count, size=size, seed=11)):
        pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(3)), dtype=np.int16)
        pixels = np.clip(pixels + rng.integers(-20, 21, pixels.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{index:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def load_models(config: dict, image_size: int, folder: str, device: torch.device) -> dict:
    """Both models and processors on the same saved weights. The LLM's embedding rows of every id but the tokenizer's
    multi-character tokens are zeroed (OPT ties its LM head to them), so beam search picks tokens that decode to
    distinct text: the captions then compare as text. The LM head still multiplies the full vocabulary."""
    tokenizer = make_opt_tokenizer()
    ours_processor = blip2_hf.Blip2Processor(
        image_processor=blip2_hf.Blip2Processor.default_image_processor(image_size),
        tokenizer=tokenizer,
        num_query_tokens=config["num_query_tokens"],
    )
    config = dict(config, image_token_index=ours_processor.image_token_id)
    text = config["text_config"]
    vocab_size = max(text["vocab_size"], len(tokenizer) + 4)  # the tiny config's 99 ids cannot hold the tokenizer's
    config["text_config"] = dict(text, vocab_size=vocab_size, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    reference = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(**config))
    perturb_(reference, scale=0.2 if config["vision_config"]["hidden_size"] < 256 else 0.02)  # tiny: as the tests
    # Only the tokenizer's multi-character tokens stay possible: random single bytes decode to "\ufffd" in both, which
    # would make equal captions a weak check.
    words = [index for token, index in tokenizer.get_vocab().items() if len(token) > 1 and index > 3]
    dead = torch.ones(config["text_config"]["vocab_size"], dtype=torch.bool)
    dead[words] = False
    dead[ours_processor.image_token_id] = True
    with torch.no_grad():
        for embedding in (reference.get_input_embeddings(), reference.get_output_embeddings()):
            embedding.weight[dead] = 0
    reference.save_pretrained(folder)
    del reference
    image_processor = transformers.BlipImageProcessorPil(**ours_processor.image_processor.to_dict())
    peer_processor = transformers.Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=config["num_query_tokens"]
    )
    theirs = transformers.Blip2ForConditionalGeneration.from_pretrained(folder).to(device).eval()
    pipe = transformers.pipeline("image-to-text", model=theirs, processor=peer_processor, device=device)
    ours = blip2_hf.Blip2ForConditionalGeneration.from_pretrained(folder).to(device).eval()
    return {"ours": (ours, ours_processor), "pipeline": pipe}


class PeakMemory:
    """Peak memory of a block: CUDA max allocated, else peak RSS (this process and its children) above the start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def _rss(self) -> int:
        process = psutil.Process()
        total = process.memory_info().rss
        for child in process.children(recursive=True):
            try:  # a forked worker shares the parent's pages: count only its own (USS)
                total += child.memory_full_info().uss
            except psutil.Error:
                pass
        return total

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.start = self._rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self._rss() - self.start)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.stop.set()
            self.thread.join()


def run_ours(models: dict, paths: list[Path], batch: int, workers: int, generate_kwargs: dict) -> list[str]:
    model, processor = models["ours"]
    captions = []
    with torch.inference_mode():
        for records in caption_images(model, processor, paths, "", batch, workers, **generate_kwargs):
            captions.extend(record["caption"] for record in records)
    return captions


def run_pipeline(models: dict, paths: list[Path], batch: int, workers: int, generate_kwargs: dict) -> list[str]:
    # A generator, as the pipeline docs stream data: a list of dicts would be read as one chat.
    inputs = ({"images": str(path), "text": ""} for path in paths)
    outputs = models["pipeline"](inputs, batch_size=batch, num_workers=workers, generate_kwargs=generate_kwargs)
    return [output[0]["generated_text"].strip() for output in outputs]


def bench_setting(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    config, image_size, count, batch, beams, new_tokens, repeats = SETTINGS[name]
    repeats = 1 if args.quick else repeats
    generate_kwargs = {"num_beams": beams, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    runners = {"ours": (run_ours, args.workers), "pipeline": (run_pipeline, args.peer_workers)}
    with tempfile.TemporaryDirectory() as folder:
        paths = write_jpegs(Path(folder) / "images", count)
        t0 = time.perf_counter()
        models = load_models(config, image_size, str(Path(folder) / "model"), device)
        print(
            f"[{name}] {count} JPEGs 640x480, models built and loaded in {time.perf_counter() - t0:.1f}s", flush=True
        )
        captions = {
            side: runner(models, paths, batch, workers, generate_kwargs) for side, (runner, workers) in runners.items()
        }
        identical = captions["ours"] == captions["pipeline"]
        distinct = len(set(captions["ours"]))  # the check means little if every image got the same caption
        print(
            f"[{name}] captions identical: {identical} ({distinct} distinct of {count}, e.g. {captions['ours'][0]!r})",
            flush=True,
        )
        if not identical:
            for index, (ours, theirs) in enumerate(zip(captions["ours"], captions["pipeline"])):
                if ours != theirs:
                    print(f"  image {index}: ours {ours!r} pipeline {theirs!r}")
        times: dict[str, list[float]] = {side: [] for side in runners}
        peaks: dict[str, int] = dict.fromkeys(runners, 0)
        order = list(runners)
        # The identity pass above was the warm-up of both.
        for _ in range(repeats if identical else 0):
            for side in order:
                runner, workers = runners[side]
                start = time.perf_counter()
                with PeakMemory(device) as memory:
                    runner(models, paths, batch, workers, generate_kwargs)
                times[side].append(time.perf_counter() - start)
                peaks[side] = max(peaks[side], memory.peak)
            order.reverse()  # alternate who goes first: drift falls on both
        del models
    if not identical:
        return {"setting": name, "captions_identical": False}
    throughput = {side: count / statistics.median(ts) for side, ts in times.items()}
    return {
        "setting": name,
        "images": count,
        "batch_size": batch,
        "num_beams": beams,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "workers": {"ours": args.workers, "pipeline": args.peer_workers},
        "config": config,
        "captions_identical": True,
        "distinct_captions": distinct,
        "images_per_s": throughput,
        "ratio": throughput["ours"] / throughput["pipeline"],
        "peak_memory_mib": {side: peak / 2**20 for side, peak in peaks.items()},
        "spread": max(statistics.median(ts) / min(ts) - 1 for ts in times.values()),
        "times_s": times,
    }


def markdown_table(results: list[dict]) -> str:
    rows = [
        "| setting | images/s pipeline | images/s blip2_hf | ratio | peak MiB pipeline | peak MiB blip2_hf |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        setting = f"{r['setting']} ({r['images']} images, batch {r['batch_size']}, {r['num_beams']} beams, {r['new_tokens']} tokens)"
        rows.append(
            f"| {setting} | {r['images_per_s']['pipeline']:.2f} | {r['images_per_s']['ours']:.2f} | {r['ratio']:.3f} "
            f"| {r['peak_memory_mib']['pipeline']:.0f} | {r['peak_memory_mib']['ours']:.0f} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny setting only, 1 repeat")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--workers", type=int, default=None, help="blip2_hf's DataLoader workers (default: the CLI's for --device)"
    )
    parser.add_argument("--peer-workers", type=int, default=0, help="the pipeline's num_workers (default: its own, 0)")
    parser.add_argument("--out", type=Path, default=OUT_DEFAULT, help=f"JSON results (default {OUT_DEFAULT})")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    device = torch.device(args.device)
    args.workers = default_num_workers(device) if args.workers is None else args.workers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    environment = machine_environment(device, cpu_cores=os.cpu_count())
    start = time.perf_counter()
    names = ["tiny-opt"] if args.quick else list(SETTINGS)
    results = [bench_setting(name, args, device) for name in names]
    total = time.perf_counter() - start
    environment["load_average_1min_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment, "quick": args.quick, "total_seconds": total, "results": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not all(r["captions_identical"] for r in results):
        print(f"FAIL: captions differ between transformers' pipeline and blip2_hf (wrote {args.out})", file=sys.stderr)
        return 1
    print()
    print(markdown_table(results))
    print(
        f"\nratio > 1.0: blip2_hf is faster. {environment['device']}, torch {environment['torch']}, transformers "
        f"{environment['transformers']}, {environment['threads']} threads, workers: blip2_hf {args.workers}, pipeline "
        f"{args.peer_workers}; total {total:.0f}s; 1-min load average {environment['load_average_1min_before']:.2f} "
        f"before / {environment['load_average_1min_after']:.2f} after.\nwrote {args.out}"
    )
    for result in results:
        if result["spread"] > 0.2:
            print(
                f"WARNING: [{result['setting']}] the median run is {100 * result['spread']:.0f}% slower than the "
                "fastest: another process was probably using the CPU. Rerun on an idle machine."
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
