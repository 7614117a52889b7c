"""Generation speed of blip2_hf against transformers' own BLIP-2, same weights, same run.

    python benchmarks/bench_generation.py            # full run (tiny + real-width OPT-2.7b at depth 2), a few minutes
    python benchmarks/bench_generation.py --quick    # smoke run: tiny only, 1 repeat

For each setting, transformers' `Blip2ForConditionalGeneration` is built with a fixed seed, its weights are perturbed
and saved with `save_pretrained`; both models are then loaded from that folder with `from_pretrained`. Image-only
greedy captioning (`generate(pixel_values=..., max_new_tokens=n, min_new_tokens=n)`, so EOS cannot stop a row early)
is timed at n = 1 and n = N, interleaving the two models, and the median over repeats is kept:

    captioning throughput  images/s   = batch / t_N
    decode latency         ms/token   = (t_N - t_1) / (N - 1)      one decode step for the whole batch
    time to first token    ms         = t_1                        vision + Q-Former + LLM prefill + 1 token

The generated tokens must be identical between the two models; if not, the script exits with status 1.
Results are printed as a markdown table and written as JSON to bench_out/generation.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import blip2_hf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment as machine_environment  # noqa: E402
from bench_common import write_json  # noqa: E402

from blip2_hf.testing_utils import perturb_, salesforce_config_dict, tiny_config_dict

OUT_DEFAULT = Path(__file__).resolve().parents[1] / "bench_out" / "generation.json"

# (name, config, batch size, new tokens N, timed repeats); every setting first runs WARMUP untimed rounds
SETTINGS = [
    ("tiny-opt", tiny_config_dict("opt"), 8, 16, 30),
    ("opt-2.7b-width-depth2", salesforce_config_dict("blip2-opt-2.7b", depth=2), 2, 8, 25),
]
WARMUP = 2

# ---------------------------------------------------------------------------------------------------------------------
# Models on identical weights
# ---------------------------------------------------------------------------------------------------------------------


def load_pair(config: dict, folder: str) -> dict[str, torch.nn.Module]:
    """transformers' model built with seed 0 and perturbed, saved to `folder`; both models loaded back from there."""
    torch.manual_seed(0)
    reference = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(**config))
    perturb_(reference)
    reference.save_pretrained(folder)
    del reference
    return {
        "transformers": transformers.Blip2ForConditionalGeneration.from_pretrained(folder).eval(),
        "blip2_hf": blip2_hf.Blip2ForConditionalGeneration.from_pretrained(folder).eval(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------


def timed_generate(model: torch.nn.Module, pixel_values: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Seconds for one greedy image-only `generate` of exactly `new_tokens` tokens, and its output ids."""
    start = time.perf_counter()
    with torch.inference_mode():
        ids = model.generate(
            pixel_values=pixel_values,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
        )
    return time.perf_counter() - start, ids


def bench_setting(name: str, config: dict, batch_size: int, new_tokens: int, repeats: int) -> dict:
    size = config["vision_config"]["image_size"]
    pixel_values = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        models = load_pair(config, folder)
        print(f"[{name}] built, saved and loaded both models in {time.perf_counter() - t0:.1f}s", flush=True)

        lengths = (1, new_tokens)
        times: dict[str, dict[int, list[float]]] = {m: {n: [] for n in lengths} for m in models}
        identical = True
        order = list(models)
        for step in range(WARMUP + repeats):
            for n in lengths:
                outputs = {}
                for model_name in order:
                    seconds, outputs[model_name] = timed_generate(models[model_name], pixel_values, n)
                    if step >= WARMUP:
                        times[model_name][n].append(seconds)
                if not torch.equal(outputs["transformers"], outputs["blip2_hf"]):
                    identical = False
                    print(f"[{name}] MISMATCH at {n} new tokens:\n{outputs['transformers']}\n{outputs['blip2_hf']}")
            order.reverse()  # alternate who goes first, so that drift and cache effects fall on both sides
        print(f"[{name}] generated tokens identical: {identical}", flush=True)
        del models

    medians = {m: {n: statistics.median(ts) for n, ts in by_n.items()} for m, by_n in times.items()}
    # how far the median run sits above the fastest one, worst over the timed calls: large when the CPU was shared
    spread = max(statistics.median(ts) / min(ts) - 1 for by_n in times.values() for ts in by_n.values())
    per_model = {
        m: {
            "captioning throughput (images/s)": batch_size / med[new_tokens],
            "decode latency (ms/token)": 1e3 * (med[new_tokens] - med[1]) / (new_tokens - 1),
            "time to first token (ms)": 1e3 * med[1],
        }
        for m, med in medians.items()
    }
    metrics = {}
    for metric in per_model["transformers"]:
        theirs, ours = per_model["transformers"][metric], per_model["blip2_hf"][metric]
        # ratio > 1.0 means blip2_hf is faster: ours/theirs for a throughput, theirs/ours for a time
        ratio = ours / theirs if "images/s" in metric else theirs / ours
        metrics[metric] = {"transformers": theirs, "blip2_hf": ours, "ratio": ratio}
    return {
        "setting": name,
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "config": config,
        "tokens_identical": identical,
        "spread": spread,
        "metrics": metrics,
        "times_s": {m: {str(n): ts for n, ts in by_n.items()} for m, by_n in times.items()},
    }


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def markdown_table(results: list[dict]) -> str:
    rows = ["| setting | metric | transformers | blip2_hf | ratio |", "|---|---|---:|---:|---:|"]
    for result in results:
        setting = f"{result['setting']} (batch {result['batch_size']}, {result['new_tokens']} tokens)"
        for metric, values in result["metrics"].items():
            rows.append(
                f"| {setting} | {metric} | {values['transformers']:.2f} | {values['blip2_hf']:.2f} "
                f"| {values['ratio']:.3f} |"
            )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny setting only, 1 repeat")
    parser.add_argument("--out", type=Path, default=OUT_DEFAULT, help=f"JSON results (default {OUT_DEFAULT})")
    args = parser.parse_args()

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    environment = machine_environment("cpu")

    start = time.perf_counter()
    settings = SETTINGS[:1] if args.quick else SETTINGS
    results = []
    for name, config, batch_size, new_tokens, repeats in settings:
        results.append(bench_setting(name, config, batch_size, new_tokens, 1 if args.quick else repeats))
    total = time.perf_counter() - start
    environment["load_average_1min_after"] = os.getloadavg()[0]

    print()
    print(markdown_table(results))
    print(
        f"\nratio > 1.0: blip2_hf is faster. torch {environment['torch']}, transformers {environment['transformers']}, "
        f"{environment['threads']} threads, total {total:.0f}s, 1-min load average "
        f"{environment['load_average_1min_before']:.2f} before / {environment['load_average_1min_after']:.2f} after."
    )

    write_json(args.out, {"environment": environment, "quick": args.quick, "total_seconds": total, "results": results})
    for result in results:
        if result["spread"] > 0.2:
            print(
                f"WARNING: [{result['setting']}] the median run of a call is {100 * result['spread']:.0f}% slower "
                "than its fastest: another process was probably using the CPU. Rerun on an idle machine."
            )

    if not all(r["tokens_identical"] for r in results):
        print("FAIL: generated tokens differ between transformers and blip2_hf", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
