"""The demo's BLIP-2 arm retrained with other stage-2 settings, on a finished demo folder's stage-1 checkpoints.

    python benchmarks/screen_stage2.py DEMO_DIR stage2_learning_rate=7e-4 [seeds=0,1,2]

`DEMO_DIR` is a `blip2-hf demo --seeds 3` output (its cache, towers and `runs/seed*/stage1`); each `key=value` replaces
a `DemoSettings` field. Per seed: zero-shot VQA along stage 2 (validation images, as the demo's `VQACurve`) and
the demo's evaluation of the final model on the test split (VQA, captions wholly right, CIDEr, shape and side). The
Trainer's numerics depend on the thread count (not on the load): run it on the demo's 2 threads to compare with it.
Stage 2 takes about 95 s a seed on 2 CPU cores. Results: benchmarks/README.md, "Training choices"."""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from transformers.utils import logging as hf_logging

from blip2_hf.demo import run
from blip2_hf.demo.towers import demo_processor
from blip2_hf.modeling_blip2 import Blip2ForConditionalGeneration


def _value(text: str) -> float | int:
    return float(text) if any(mark in text for mark in ".e") else int(text)


def main(argv: list[str]) -> None:
    demo, pairs = Path(argv[0]), dict(arg.split("=", 1) for arg in argv[1:])
    seeds = [int(seed) for seed in pairs.pop("seeds", "0,1,2").split(",")]
    settings = dataclasses.replace(run.DemoSettings(), **{key: _value(value) for key, value in pairs.items()})
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    processor = demo_processor(demo / "pretrained", settings.num_query_tokens)
    stage2_processor = processor.without_qformer_tokenizer()
    test = json.loads((demo / "data" / "test" / "annotations.json").read_text())
    test_images = run.load_images(demo / "data" / "test", test)
    validation = json.loads((demo / "data" / "validation" / "annotations.json").read_text())
    validation = validation[: settings.vqa_curve_images]
    validation_images = run.load_images(demo / "data" / "validation", validation)
    for seed in seeds:
        curve = run.VQACurve(
            stage2_processor, validation, validation_images, settings.stage2_steps, settings.vqa_curve_points
        )
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            stage1 = demo / "runs" / f"seed{seed}" / "stage1"
            run.train_stage2(Path(folder), demo / "pretrained", demo / "feature_cache", processor, settings, seed,
                             stage1, curve)  # fmt: skip
            model = Blip2ForConditionalGeneration.from_pretrained(folder)
        r = run.evaluate_generation(model, stage2_processor, test, test_images, settings)
        print(
            f"seed {seed} ({time.perf_counter() - start:.0f} s): VQA along stage 2 "
            f"{[round(point['VQA'], 1) for point in curve.curve]}; test VQA {r['VQA']:.1f}, wholly right "
            f"{r['caption_wholly_right']:.1f}, CIDEr {r['CIDEr']:.1f}, shape {r['caption_shape']:.1f}, side "
            f"{r['caption_side']:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
