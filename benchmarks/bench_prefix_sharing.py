"""Where `generate(share_prefix=...)` pays: the shortcut against the plain path at several LLM sizes.

    python benchmarks/bench_prefix_sharing.py      # about 1.5 min on 2 CPU cores

`generate` computes the LLM keys/values of what several rows share (an image's questions: `<image> x 32, BOS,
"Question:"`; a row's beams: its whole prompt) once, at the cost of one or two extra forward calls and cache copies.
This times both paths (`share_prefix=True` / `False`, same model, same inputs as bench_vqa.py: 2 images x 5 questions,
8 new tokens) for OPT-style LLMs of growing size (a 1-layer ViT-g and a 2-layer Q-Former in front: only the LLM part
differs), greedy and with 5 beams, checks the tokens are identical, and prints the plain path's CPU time over the
shortcut's (> 1: the shortcut is faster). `SHARE_PREFIX_MIN_LLM_PARAMETERS` (the default `share_prefix=None`) is set
from this table.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import blip2_hf
from blip2_hf.testing_utils import perturb_, salesforce_config_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vqa  # noqa: E402  (the same inputs)

# (width, layers) of the LLM, OPT-2.7b's vocabulary; 768 x 12 is OPT-125m's shape
SIZES = [(128, 4), (256, 4), (768, 4), (768, 12), (1024, 6)]
REPEATS = 3


def config(width: int, layers: int) -> dict:
    config = salesforce_config_dict("blip2-opt-2.7b", vision_depth=1, qformer_depth=2, text_depth=layers)
    config["text_config"].update(
        hidden_size=width, ffn_dim=4 * width, num_attention_heads=max(1, width // 64), word_embed_proj_dim=width
    )
    return config


def cpu_seconds(model: torch.nn.Module, inputs: dict, **kwargs) -> tuple[float, torch.Tensor]:
    start = time.process_time()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, **kwargs)
    return time.process_time() - start, output


def main() -> int:
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    ids = dict(low=100, high=50000, question=[45641, 35], answer=[7447, 1948, 35])
    print("| LLM (width x layers) | parameters | search | shortcut (s) | plain (s) | plain / shortcut |")
    print("|---|---:|---|---:|---:|---:|")
    identical = True
    for width, layers in SIZES:
        torch.manual_seed(0)
        reference = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(**config(width, layers)))
        perturb_(reference)
        with tempfile.TemporaryDirectory() as folder:
            reference.save_pretrained(folder)
            model = blip2_hf.Blip2ForConditionalGeneration.from_pretrained(folder).eval()
        pixel_values, input_ids, image_rows = bench_vqa.make_inputs(config(width, layers), 2, ids)
        inputs = dict(pixel_values=pixel_values, input_ids=input_ids, image_rows=image_rows)
        inputs["attention_mask"] = (input_ids != model.config.text_config.pad_token_id).long()
        parameters = sum(parameter.numel() for parameter in model.language_model.parameters())
        for beams in (1, 5):
            times: dict[bool, list[float]] = {True: [], False: []}
            outputs = {}
            for _ in range(REPEATS):
                for share in (True, False):
                    seconds, outputs[share] = cpu_seconds(model, inputs, share_prefix=share, num_beams=beams)
                    times[share].append(seconds)
            identical &= torch.equal(outputs[True], outputs[False])
            shortcut, plain = statistics.median(times[True]), statistics.median(times[False])
            search = "greedy" if beams == 1 else f"{beams} beams"
            print(
                f"| {width} x {layers} | {parameters / 1e6:.1f}M | {search} | {shortcut:.3f} | {plain:.3f} "
                f"| {plain / shortcut:.2f} |",
                flush=True,
            )
    print(f"\ntokens identical in every setting: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
