"""VQA with several questions per image: blip2_hf's grouped path against transformers' BLIP-2 answering one question
per row, same weights, same run.

    python benchmarks/bench_vqa.py                 # full run (tiny + ViT-g / OPT-2.7b widths, depth cut): ~2.5 min
    python benchmarks/bench_vqa.py --quick         # smoke run: tiny only, 1 repeat
    python benchmarks/bench_vqa.py --device cuda   # the same on a GPU
    python benchmarks/bench_vqa.py --num_beams 5 --out bench_out/vqa_beams5.json   # LAVIS's VQA search (5 beams)

Each setting asks 5 questions of different lengths about each image (VQAv2 asks about 5.4), as token ids laid out as
the processor writes them: `[pad..., <image> x 32, BOS, "Question:", question, "Short answer:"]`, left-padded.
transformers' `Blip2ForConditionalGeneration` is built with a fixed seed, perturbed and saved; both models are loaded
from that folder with `from_pretrained` (as bench_generation.py). Then, timed alternately (medians over repeats,
after a warm-up):

- transformers: one question per row, batches of `--batch_size` rows (a user's batch: each row carries its image, so
  an image is encoded once per question);
- blip2_hf: `generate(image_rows=...)`, batches of whole images of about `--batch_size` questions: each image encoded
  once, and the keys/values of the prompt part the questions of an image share (`<image> x 32, BOS, "Question:"`)
  computed once (`share_prefix`, automatic);
- blip2_hf without the prefix sharing (`share_prefix=False`): what the shared prefix itself adds.

All answer greedily (or with `--num_beams` beams, as LAVIS's VQA protocol: 5) with `max_new_tokens` =
`min_new_tokens` (EOS cannot stop a row early). The answer tokens must be
identical for all three before any ratio is printed (exit status 1 if not). Peak memory: on CPU the peak resident set
(`getrusage` max RSS) of a fresh subprocess that loads one model and answers the questions once, and the largest
increase of its RSS over the loaded model's (weights paged in) while answering (sampled every 2 ms); on GPU `max_memory_allocated`
while answering. A markdown table is printed and everything written to bench_out/vqa.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import transformers

import blip2_hf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment as machine_environment  # noqa: E402
from bench_common import write_json  # noqa: E402

from blip2_hf.testing_utils import perturb_, salesforce_config_dict, tiny_config_dict

OUT_DEFAULT = Path(__file__).resolve().parents[1] / "bench_out" / "vqa.json"
QUESTIONS_PER_IMAGE = 5
NUM_BEAMS = 1  # --num_beams
WARMUP = 1
MODELS = ("transformers", "blip2_hf", "blip2_hf_no_prefix_sharing")

# (name, config, images, batch size in rows, new tokens, timed repeats, token ids: question words and the prompt's)
SETTINGS = [
    ("tiny-opt", tiny_config_dict("opt"), 8, 10, 8, 20, dict(low=10, high=90, question=[11, 12], answer=[13, 14, 12])),
    (
        # ViT-g 5 of 39 layers, Q-Former 12 of 12, OPT-2.7b 4 of 32: each tower's share of the time as at full depth
        "vitg-opt2.7b-depth-5-12-4",
        salesforce_config_dict("blip2-opt-2.7b", vision_depth=5, qformer_depth=12, text_depth=4),
        2,
        10,
        8,
        3,
        # OPT's ids of "Question", ":", " Short", " answer"; question words drawn from ordinary tokens
        dict(low=100, high=50000, question=[45641, 35], answer=[7447, 1948, 35]),
    ),
]


# ---------------------------------------------------------------------------------------------------------------------
# Inputs and models
# ---------------------------------------------------------------------------------------------------------------------


def make_inputs(config: dict, num_images: int, ids: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pixel_values [N, 3, H, W]`, `input_ids [N * 5, L]` (left-padded, image by image) and `image_rows [N * 5]`."""
    generator = torch.Generator().manual_seed(0)
    size = config["vision_config"].get("image_size", 224)
    pixel_values = torch.randn(num_images, 3, size, size, generator=generator)
    text = config["text_config"]
    prefix = [config["image_token_index"]] * config["num_query_tokens"] + [text["bos_token_id"], *ids["question"]]
    rows = []
    for _ in range(num_images):
        for question in range(QUESTIONS_PER_IMAGE):
            words = torch.randint(ids["low"], ids["high"], (3 + 2 * question,), generator=generator).tolist()
            rows.append(prefix + words + ids["answer"])
    length = max(map(len, rows))
    input_ids = torch.tensor([[text["pad_token_id"]] * (length - len(row)) + row for row in rows])
    image_rows = torch.arange(num_images).repeat_interleave(QUESTIONS_PER_IMAGE)
    return pixel_values, input_ids, image_rows


def save_weights(config: dict, folder: str) -> None:
    """transformers' model built with seed 0 and perturbed, saved to `folder` (both models load from there)."""
    torch.manual_seed(0)
    reference = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(**config))
    perturb_(reference)
    reference.save_pretrained(folder)


def load(kind: str, folder: str, device: str) -> torch.nn.Module:
    model_class = transformers if kind == "transformers" else blip2_hf
    return model_class.Blip2ForConditionalGeneration.from_pretrained(folder).to(device).eval()


def answer_all(
    kind: str, model: torch.nn.Module, inputs: tuple, batch_size: int, new_tokens: int, device: str
) -> list[torch.Tensor]:
    """Every question answered, batch by batch, the way `kind` runs: the new tokens of each batch."""
    pixel_values, input_ids, image_rows = inputs
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=NUM_BEAMS)
    outputs = []
    with torch.inference_mode():
        if kind == "transformers":  # a user's batch: `batch_size` rows, each with its image
            for start in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[start : start + batch_size].to(device)
                pixels = pixel_values[image_rows[start : start + batch_size]].to(device)
                mask = (ids != model.config.text_config.pad_token_id).long()
                out = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kwargs)
                outputs.append(out[:, ids.shape[1] :].cpu())
            return outputs
        counts = [QUESTIONS_PER_IMAGE] * pixel_values.shape[0]
        for images in blip2_hf.inference.batches_by_image(counts, batch_size):
            rows = torch.isin(image_rows, torch.tensor(images))
            ids = input_ids[rows].to(device)
            mask = (ids != model.config.text_config.pad_token_id).long()
            out = model.generate(
                pixel_values=pixel_values[images].to(device),
                input_ids=ids,
                attention_mask=mask,
                image_rows=(image_rows[rows] - images[0]).to(device),
                share_prefix=None if kind == "blip2_hf" else False,  # None: the default, automatic by LLM size
                **kwargs,
            )
            outputs.append(out[:, ids.shape[1] :].cpu())
    return outputs


def timed(kind: str, model: torch.nn.Module, inputs: tuple, setting: dict, device: str) -> tuple[float, torch.Tensor]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = answer_all(kind, model, inputs, setting["batch_size"], setting["new_tokens"], device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cat(outputs)


# ---------------------------------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(kind: str, folder: str, index: int) -> None:
    """In a fresh process: load one model, answer every question once, print its memory as JSON."""
    name, config, num_images, batch_size, new_tokens, _, ids = SETTINGS[index]
    inputs = make_inputs(config, num_images, ids)
    model = load(kind, folder, "cpu")
    with torch.no_grad():  # page in the weights (safetensors maps them lazily), so that answering adds none of them
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()
    loaded = rss_bytes()
    peak, done = [loaded], threading.Event()

    def sample() -> None:  # ru_maxrss alone would also count a peak while loading
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    answer_all(kind, model, inputs, batch_size, new_tokens, "cpu")
    done.set()
    sampler.join()
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"max_rss_mb": max_rss / 2**20, "answering_increase_mb": (peak[0] - loaded) / 2**20}))


def peak_memory(index: int, folder: str, models: dict, inputs: tuple, device: str) -> dict[str, dict[str, float]]:
    name, _, _, batch_size, new_tokens, _, _ = SETTINGS[index]
    memory = {}
    for kind in MODELS[:2]:  # sharing the prefix or not changes the memory little: not worth another load
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            answer_all(kind, models[kind], inputs, batch_size, new_tokens, device)
            peak = torch.cuda.max_memory_allocated()
            memory[kind] = {"max_allocated_mb": peak / 2**20, "answering_increase_mb": (peak - before) / 2**20}
            continue
        command = [sys.executable, __file__, "--memory_child", kind, folder, str(index), "--num_beams", str(NUM_BEAMS)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"[{name}] memory subprocess for {kind} failed:\n{result.stderr[-3000:]}")
        memory[kind] = json.loads(result.stdout.strip().splitlines()[-1])
    return memory


# ---------------------------------------------------------------------------------------------------------------------
# One setting
# ---------------------------------------------------------------------------------------------------------------------


def bench_setting(index: int, repeats: int, device: str) -> dict:
    name, config, num_images, batch_size, new_tokens, _, ids = SETTINGS[index]
    setting = {"batch_size": batch_size, "new_tokens": new_tokens}
    inputs = make_inputs(config, num_images, ids)
    num_questions = inputs[1].shape[0]
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        save_weights(config, folder)
        models = {"transformers": load("transformers", folder, device), "blip2_hf": load("blip2_hf", folder, device)}
        models["blip2_hf_no_prefix_sharing"] = models["blip2_hf"]  # the same model, share_prefix=False
        print(f"[{name}] built, saved and loaded both models in {time.perf_counter() - t0:.1f}s", flush=True)

        times: dict[str, list[float]] = {kind: [] for kind in MODELS}
        identical, order = True, list(MODELS)
        for step in range(WARMUP + repeats):
            outputs = {}
            for kind in order:
                seconds, outputs[kind] = timed(kind, models[kind], inputs, setting, device)
                if step >= WARMUP:
                    times[kind].append(seconds)
            for kind in MODELS[1:]:
                if not torch.equal(outputs["transformers"], outputs[kind]):
                    identical = False
                    print(f"[{name}] MISMATCH transformers vs {kind}:\n{outputs['transformers']}\n{outputs[kind]}")
            order.reverse()  # alternate who goes first, so that drift and cache effects fall on all
        print(f"[{name}] answer tokens identical: {identical}", flush=True)
        memory = peak_memory(index, folder, models, inputs, device)
        del models

    medians = {kind: statistics.median(ts) for kind, ts in times.items()}
    spread = max(statistics.median(ts) / min(ts) - 1 for ts in times.values())
    throughput = {kind: num_questions / seconds for kind, seconds in medians.items()}
    return {
        "setting": name,
        "images": num_images,
        "questions": num_questions,
        "batch_size_rows": batch_size,
        "new_tokens": new_tokens,
        "num_beams": NUM_BEAMS,
        "repeats": repeats,
        "config": config,
        "tokens_identical": identical,
        "spread": spread,
        "questions_per_s": throughput,
        "ratio": throughput["blip2_hf"] / throughput["transformers"],
        "ratio_prefix_sharing": throughput["blip2_hf"] / throughput["blip2_hf_no_prefix_sharing"],
        "memory": memory,
        "times_s": times,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def markdown_table(results: list[dict], device: str) -> str:
    unit = "peak allocated MB" if device.startswith("cuda") else "max RSS MB"
    key = "max_allocated_mb" if device.startswith("cuda") else "max_rss_mb"
    rows = [
        f"| setting | questions/s transformers (1 per row) | blip2_hf no prefix sharing | blip2_hf | ratio "
        f"| prefix sharing's share | {unit} transformers / blip2_hf | MB while answering transformers / blip2_hf |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        q, m = r["questions_per_s"], r["memory"]
        setting = (
            f"{r['setting']} ({r['images']} images x {QUESTIONS_PER_IMAGE} questions, batch {r['batch_size_rows']} "
            f"rows, {r['new_tokens']} tokens, {'greedy' if r['num_beams'] == 1 else str(r['num_beams']) + ' beams'})"
        )
        rows.append(
            f"| {setting} | {q['transformers']:.2f} | {q['blip2_hf_no_prefix_sharing']:.2f} | {q['blip2_hf']:.2f} "
            f"| {r['ratio']:.2f} | {r['ratio_prefix_sharing']:.2f} "
            f"| {m['transformers'][key]:.0f} / {m['blip2_hf'][key]:.0f} "
            f"| {m['transformers']['answering_increase_mb']:.0f} / {m['blip2_hf']['answering_increase_mb']:.0f} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny setting only, 1 repeat")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=OUT_DEFAULT, help=f"JSON results (default {OUT_DEFAULT})")
    parser.add_argument("--num_beams", type=int, default=1, help="beam width (default 1: greedy)")
    parser.add_argument("--memory_child", nargs=3, metavar=("MODEL", "FOLDER", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global NUM_BEAMS
    NUM_BEAMS = args.num_beams
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.memory_child:
        kind, folder, index = args.memory_child
        memory_child(kind, folder, int(index))
        return 0

    environment = machine_environment(args.device)
    start = time.perf_counter()
    results = []
    for index in range(1 if args.quick else len(SETTINGS)):
        results.append(bench_setting(index, 1 if args.quick else SETTINGS[index][5], args.device))
    total = time.perf_counter() - start
    environment["load_average_1min_after"] = os.getloadavg()[0]

    print()
    print(markdown_table(results, args.device))
    print(
        f"\nratio = blip2_hf questions/s / transformers questions/s (> 1: blip2_hf is faster); prefix sharing's share = "
        f"blip2_hf / blip2_hf without it. {environment['device']}, torch {environment['torch']}, transformers "
        f"{environment['transformers']}, {environment['threads']} threads, total {total:.0f}s, 1-min load average "
        f"{environment['load_average_1min_before']:.2f} before / {environment['load_average_1min_after']:.2f} after."
    )
    write_json(args.out, {"environment": environment, "quick": args.quick, "total_seconds": total, "results": results})
    for result in results:
        if result["spread"] > 0.2:
            print(
                f"WARNING: [{result['setting']}] the median run is {100 * result['spread']:.0f}% slower than the "
                "fastest: another process was probably using the CPU. Rerun on an idle machine."
            )
    if not all(r["tokens_identical"] for r in results):
        print("FAIL: answer tokens differ between transformers and blip2_hf", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
