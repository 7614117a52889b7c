"""Training-step speed and memory of BLIP-2 from images against from a frozen-feature cache, same model, same run.

    python benchmarks/bench_training.py           # tiny + ViT-g (39 layers) with Q-Former (12): ~4 min on 2 cores
    python benchmarks/bench_training.py --quick   # smoke run: tiny only, 2 repeats, a few seconds
    python benchmarks/bench_training.py --batch-size 8   # the ViT-g setting at batch 8 (default 2)
    python benchmarks/bench_training.py --compare-optim  # fused vs unfused AdamW update, eager vs compiled Q-Former

One training step is forward + backward + AdamW step (fused, as `Blip2TrainingArguments` defaults to) on the trainable
parameters only, after `model.freeze_towers` (the ViT but its `post_layernorm`, and the LLM, get no gradients; the
models' `train()` keeps them in eval mode). It is timed for both stages, fed two ways:

    from images   `pixel_values`: the frozen ViT runs every step (without autograd, as `encode_image_frozen` does)
    from cache    `frozen_image_states`: the frozen ViT's output, computed once with `encode_image_frozen` and stored in fp16
                  (as `blip2-hf-cache-features` stores it), cast to float32 every step (as the collators do)

The two sources alternate (who goes first flips every round) after untimed warm-up steps; medians are kept:

    training throughput   samples/s = batch / median step time
    peak step memory      MiB       = peak allocated during one step above what was allocated when it began
                                      (CUDA: torch.cuda.max_memory_allocated; CPU: the allocation timeline that
                                      torch.profiler records with profile_memory=True)
    training FLOPs        GFLOP/sample, counted by torch.utils.flop_counter (matmuls, convolutions, attention)

Before timing, each model is checked in eval mode: the loss from images must equal the loss from an fp32 cache
exactly (`torch.manual_seed` before each forward, since stage 1 samples ITM negatives), else the script exits with
status 1. The fp16 cache's loss difference is reported. Data loading (decoding images, reading cache shards) is not
timed: both sources start from tensors in memory. Results: a markdown table and JSON in bench_out/training.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import blip2_hf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment as machine_environment  # noqa: E402

from blip2_hf.modeling_blip2 import frozen_tower_dtype
from blip2_hf.testing_utils import perturb_, salesforce_config_dict, tiny_config_dict

OUT_DEFAULT = Path(__file__).resolve().parents[1] / "bench_out" / "training.json"

SOURCES = ("images", "cache")
TEXT_LENGTH = 32  # LAVIS's max_txt_len in both stages
WARMUP = 1  # untimed rounds (both sources) before the timed ones; the first step also allocates AdamW's state
TARGET = 3.0  # the goal: stage-1 steps at least 3x faster from the cache, at a real vision width

# ---------------------------------------------------------------------------------------------------------------------
# Settings: (stage-1 config, stage-2 config) as transformers-format dicts
# ---------------------------------------------------------------------------------------------------------------------

# Stage 1 trains text through the Q-Former: bert-base-uncased's vocabulary plus [DEC] (LAVIS), [SEP] ends a caption.
BERT_QFORMER_TEXT = dict(use_qformer_text_input=True, vocab_size=30523, bos_token_id=30522, eos_token_id=102)
# The stage-2 LLM: OPT at opt-125m's shape (and blip2-opt-2.7b's vocabulary, which holds `<image>`), 2 layers, so that
# the LLM does not dominate the step.
OPT_125M_SHAPE = dict(
    hidden_size=768, ffn_dim=3072, num_attention_heads=12, word_embed_proj_dim=768, num_hidden_layers=2
)


def tiny_configs() -> tuple[dict, dict]:
    """The test suite's tiny configs (every width 32, 30 px, 4 queries); [DEC] 98 and [SEP] 3 as in its stage-1
    tests."""
    stage1 = tiny_config_dict("opt", text_input=True, image_token_index=None)
    stage1["qformer_config"].update(bos_token_id=98, eos_token_id=3)
    return stage1, tiny_config_dict("opt")


def vit_g_configs(vit_layers: int, qformer_layers: int) -> tuple[dict, dict]:
    """ViT-g at real width (1408 wide, 16 heads, 6144 MLP, 224 px, patch 14: 257 tokens) and the Q-Former at BERT-base
    width (768, 32 queries, cross-attention every 2nd layer), from Salesforce/blip2-opt-2.7b's config."""
    stage1 = salesforce_config_dict("blip2-opt-2.7b", depth=vit_layers)
    stage1["qformer_config"].update(num_hidden_layers=qformer_layers, **BERT_QFORMER_TEXT)
    stage2 = salesforce_config_dict("blip2-opt-2.7b", depth=vit_layers)
    stage2["qformer_config"].update(num_hidden_layers=qformer_layers)
    stage2["text_config"].update(OPT_125M_SHAPE)
    return stage1, stage2


# (name, (stage-1 config, stage-2 config), batch size, timed repeats). ViT-g keeps its real 39 layers and the Q-Former
# LAVIS's 12: on 2 idle CPU cores a stage-1 step from images at batch 2 takes about 8.5 s (4.3 s in the ViT forward),
# well under the ~20 s past which both depths would be cut (keeping 39:12), and the whole run stays near 4 minutes.
# `--batch-size` sets the ViT-g batch; the table and the JSON say which batch each setting ran at.
VIT_G_BATCH = 2
SETTINGS = [
    ("tiny", tiny_configs(), 8, 20),
    ("vit-g", vit_g_configs(39, 12), VIT_G_BATCH, 5),
]

# ---------------------------------------------------------------------------------------------------------------------
# Models, optimizer and data
# ---------------------------------------------------------------------------------------------------------------------


def build_model(stage: int, config: dict, device: torch.device) -> torch.nn.Module:
    """Stage 1 `Blip2ForPreTraining` or stage 2 `Blip2ForConditionalGeneration`, seed 0, every weight perturbed (the
    ViT's init is ~1e-10, `initializer_range` as transformers': its output would be ~0 and no loss would depend on
    the image), frozen by the Trainer's own `_freeze` ("auto": frozen towers in fp32 on CPU, fp16 on CUDA)."""
    torch.manual_seed(0)
    model_class = blip2_hf.Blip2ForPreTraining if stage == 1 else blip2_hf.Blip2ForConditionalGeneration
    model = perturb_(model_class(blip2_hf.Blip2Config(**config)))
    model.freeze_towers(frozen_tower_dtype("auto", model.config))
    return model.to(device).train()


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters with `Blip2TrainingArguments`' defaults: fused, betas (0.9, 0.98), weight
    decay 0.05 on matrices and embeddings (the Trainer's rule also spares biases and norms, which are the 1-d ones)."""
    trainable = [param for param in model.parameters() if param.requires_grad]
    groups = [
        {"params": [param for param in trainable if param.ndim >= 2], "weight_decay": 0.05},
        {"params": [param for param in trainable if param.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.98), fused=True)


def make_batch(stage: int, config: dict, batch_size: int) -> dict[str, torch.Tensor]:
    """Random images and `TEXT_LENGTH`-token captions, on the CPU, as a collator hands them over. Stage 1: Q-Former
    (BERT) ids below [DEC]. Stage 2: `num_query_tokens` `<image>` placeholders, then BOS and caption ids; labels
    ignore the placeholders and BOS."""
    generator = torch.Generator().manual_seed(0)
    size = config["vision_config"]["image_size"]
    batch = {"pixel_values": torch.randn(batch_size, 3, size, size, generator=generator)}
    if stage == 1:
        dec = config["qformer_config"]["bos_token_id"]
        batch["input_ids"] = torch.randint(5, dec, (batch_size, TEXT_LENGTH), generator=generator)
    else:
        image_token, num_queries = config["image_token_index"], config["num_query_tokens"]
        caption = torch.randint(4, image_token, (batch_size, TEXT_LENGTH), generator=generator)
        caption[:, 0] = config["text_config"]["bos_token_id"]
        placeholders = torch.full((batch_size, num_queries), image_token)
        batch["input_ids"] = torch.cat([placeholders, caption], dim=1)
        batch["labels"] = batch["input_ids"].clone()
        batch["labels"][:, : num_queries + 1] = -100
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch


def step_inputs(
    batch: dict[str, torch.Tensor], cache: torch.Tensor | None, source: str, device: torch.device
) -> dict[str, torch.Tensor]:
    """The model's inputs for one step, moved to `device`: the text, plus the images or the cached features (fp16 in
    the cache, float32 to the model, as the collator casts them)."""
    inputs = {name: tensor.to(device) for name, tensor in batch.items() if name != "pixel_values"}
    if source == "images":
        inputs["pixel_values"] = batch["pixel_values"].to(device)
    else:
        inputs["frozen_image_states"] = cache.to(device, torch.float32)
    return inputs


# ---------------------------------------------------------------------------------------------------------------------
# The exactness check: a cache changes nothing but where the frozen features come from
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def first_step_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> dict:
    """Eval-mode losses of the untrained model from images, from an fp32 cache and from an fp16 one, each forward
    seeded alike (stage 1 draws its ITM negatives at random)."""
    model.eval()
    pixel_values = batch["pixel_values"].to(device)
    embeds = model.encode_image_frozen(pixel_values).float()
    losses = {}
    for name, cache in (("images", None), ("fp32 cache", embeds), ("fp16 cache", embeds.half())):
        torch.manual_seed(0)
        losses[name] = model(**step_inputs(batch, cache, "images" if cache is None else "cache", device)).loss.item()
    model.train()
    return losses


# ---------------------------------------------------------------------------------------------------------------------
# One step: timed, or inspected for memory and FLOPs
# ---------------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: dict) -> None:
    model(**inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    cache: torch.Tensor,
    source: str,
    device: torch.device,
) -> float:
    """Seconds for one training step, the inputs' transfer and cast included."""
    synchronize(device)
    start = time.perf_counter()
    train_step(model, optimizer, step_inputs(batch, cache, source, device))
    synchronize(device)
    return time.perf_counter() - start


def inspected_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    cache: torch.Tensor,
    source: str,
    device: torch.device,
) -> tuple[int, int]:
    """One training step, untimed; returns (peak bytes allocated above the step's start, FLOPs)."""
    flop_counter = FlopCounterMode(display=False)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        with flop_counter:
            train_step(model, optimizer, step_inputs(batch, cache, source, device))
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start, flop_counter.get_total_flops()
    # CPU: replay the allocator's events (+bytes on allocation, -bytes on free) that the profiler recorded, in order.
    # They are read from the raw `kineto_results`: the public `events()` folds allocations into the ops they ran in.
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler, flop_counter:
        train_step(model, optimizer, step_inputs(batch, cache, source, device))
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    allocated = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        allocated += event.nbytes()
        peak = max(peak, allocated)
    return peak, flop_counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------------------------
# One setting, one stage
# ---------------------------------------------------------------------------------------------------------------------


def bench_stage(name: str, stage: int, config: dict, batch_size: int, repeats: int, device: torch.device) -> dict:
    tag = f"[{name} stage {stage}, batch {batch_size}]"
    start = time.perf_counter()
    model = build_model(stage, config, device)
    optimizer = make_optimizer(model)
    batch = make_batch(stage, config, batch_size)
    frozen_vit_bytes = sum(
        param.numel() * param.element_size()
        for module in (model.vision_model.embeddings, model.vision_model.encoder)
        for param in module.parameters()
    )
    trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
    print(
        f"{tag} built in {time.perf_counter() - start:.1f}s, {trainable / 1e6:.1f}M trainable parameters", flush=True
    )

    losses = first_step_losses(model, batch, device)
    exact = losses["images"] == losses["fp32 cache"]
    print(
        f"{tag} first-step loss: images {losses['images']:.8f}, fp32 cache {losses['fp32 cache']:.8f} "
        f"({'identical' if exact else 'DIFFERENT'}), fp16 cache {losses['fp16 cache']:.8f} "
        f"(|diff| {abs(losses['fp16 cache'] - losses['images']):.2e})",
        flush=True,
    )

    # The cache, made once: the frozen encoder's output, stored in fp16 on the CPU as the cache shards hold it.
    synchronize(device)
    cache_start = time.perf_counter()
    cache = model.encode_image_frozen(batch["pixel_values"].to(device)).to("cpu", torch.float16)
    synchronize(device)
    cache_seconds = time.perf_counter() - cache_start

    times: dict[str, list[float]] = {source: [] for source in SOURCES}
    order = list(SOURCES)
    for round_index in range(WARMUP + repeats):
        for source in order:
            seconds = timed_step(model, optimizer, batch, cache, source, device)
            if round_index >= WARMUP:
                times[source].append(seconds)
        order.reverse()  # alternate who goes first, so that drift and cache effects fall on both sides
    peak_bytes, flops = {}, {}
    for source in SOURCES:
        peak_bytes[source], flops[source] = inspected_step(model, optimizer, batch, cache, source, device)
    load_average = os.getloadavg()[0]  # our threads count too: above threads + 0.5, another process was running
    del model, optimizer
    print(
        f"{tag} done in {time.perf_counter() - start:.1f}s (the cache took {cache_seconds / batch_size:.2f} s/image)",
        flush=True,
    )

    medians = {source: statistics.median(ts) for source, ts in times.items()}
    # how far the median step sits above the fastest one, worst of the two: large when the CPU was shared
    spread = max(statistics.median(ts) / min(ts) - 1 for ts in times.values())
    per_source = {
        source: {
            "training throughput (samples/s)": batch_size / medians[source],
            "peak step memory (MiB)": peak_bytes[source] / 2**20,
            "training GFLOP/sample": flops[source] / batch_size / 1e9,
        }
        for source in SOURCES
    }
    metrics = {}
    for metric in per_source["images"]:
        images, cached = per_source["images"][metric], per_source["cache"][metric]
        # ratio > 1.0 means the cache does better: cache/images for a throughput, images/cache for a cost
        ratio = cached / images if "samples/s" in metric else (images / cached if cached else float("inf"))
        metrics[metric] = {"images": images, "cache": cached, "ratio": ratio}
    return {
        "setting": name,
        "stage": stage,
        "batch_size": batch_size,
        "repeats": repeats,
        "config": config,
        "trainable_parameters": trainable,
        "frozen_vit_weights_mib": frozen_vit_bytes / 2**20,
        "first_step_losses": losses,
        "fp32_cache_loss_identical": exact,
        "cache_build_seconds_per_image": cache_seconds / batch_size,
        "spread": spread,
        "load_average_1min_after": load_average,
        "metrics": metrics,
        "times_s": times,
    }


# ---------------------------------------------------------------------------------------------------------------------
# --compare-optim: the fused AdamW update against the unfused one, the compiled Q-Former against the eager one
# ---------------------------------------------------------------------------------------------------------------------

OPTIM_REPEATS = 5
# The ViT's depth does not change what is trained (the Q-Former, its heads, the ViT's post_layernorm): one layer keeps
# the model small, and the compile rows time steps from the cache, which skip the ViT anyway.
COMPARE_SETTINGS = [("tiny", tiny_configs()[0], 8), ("vit-g", vit_g_configs(1, 12)[0], VIT_G_BATCH)]


def adamw(model: torch.nn.Module, fused: bool) -> torch.optim.Optimizer:
    """`make_optimizer`'s AdamW, fused or the unfused `foreach` one (torch's default where fused is not asked for)."""
    optimizer = make_optimizer(model)
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = fused, not fused
    return optimizer


def compare_optimizers(name: str, config: dict, batch_size: int, repeats: int, device: torch.device) -> dict:
    """One AdamW update of stage 1's trained parameters, fused against unfused: first both from the same weights and
    gradients (the real ones of a step from the cache), which must agree within float tolerance, then timed
    alternately (the weights drift, the work does not)."""
    model = build_model(1, config, device)
    batch = make_batch(1, config, batch_size)
    cache = model.encode_image_frozen(batch["pixel_values"].to(device)).to("cpu", torch.float16)
    model(**step_inputs(batch, cache, "cache", device)).loss.backward()
    trained = [param for param in model.parameters() if param.requires_grad]
    start = [param.detach().clone() for param in trained]
    optimizers, after = {"fused": adamw(model, True), "unfused": adamw(model, False)}, {}
    for kind, optimizer in optimizers.items():  # the first step also allocates each optimizer's moments
        optimizer.step()
        after[kind] = [param.detach().clone() for param in trained]
        with torch.no_grad():
            for param, original in zip(trained, start):
                param.copy_(original)
    difference = max((a - b).abs().max().item() for a, b in zip(after["fused"], after["unfused"]))
    close = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(after["fused"], after["unfused"]))
    moved = max((a - b).abs().max().item() for a, b in zip(after["fused"], start))
    del start, after
    times: dict[str, list[float]] = {kind: [] for kind in optimizers}
    order = list(optimizers)
    for round_index in range(WARMUP + repeats):
        for kind in order:
            synchronize(device)
            began = time.perf_counter()
            optimizers[kind].step()
            synchronize(device)
            if round_index >= WARMUP:
                times[kind].append(time.perf_counter() - began)
        order.reverse()
    medians = {kind: statistics.median(ts) for kind, ts in times.items()}
    print(
        f"[{name}] AdamW over {sum(p.numel() for p in trained) / 1e6:.1f}M parameters: fused {medians['fused']:.3f}s, "
        f"unfused {medians['unfused']:.3f}s; first update max |fused - unfused| {difference:.2e} (the update moved "
        f"weights by up to {moved:.2e}): {'equal within tolerance' if close else 'DIFFERENT'}",
        flush=True,
    )
    return {
        "setting": name,
        "what": "AdamW update (s)",
        "rows": {"unfused (foreach)": medians["unfused"], "fused": medians["fused"]},
        "ratio": medians["unfused"] / medians["fused"],
        "identical": close,
        "max_abs_difference": difference,
        "times_s": times,
        "spread": max(statistics.median(ts) / min(ts) - 1 for ts in times.values()),
        "trainable_parameters": sum(param.numel() for param in trained),
    }


def compare_compiled(name: str, config: dict, batch_size: int, repeats: int, device: torch.device) -> dict:
    """A training step from the cache with the Q-Former eager and compiled (`torch_compile_qformer`: in place,
    inductor), two copies of one model, fused AdamW each: the first eval-mode losses must agree within float
    tolerance (compiled kernels may reorder sums); compilation happens in the untimed warm-up and is reported."""
    eager = build_model(1, config, device)
    compiled = copy.deepcopy(eager)
    compiled.qformer.compile()
    batch = make_batch(1, config, batch_size)
    cache = eager.encode_image_frozen(batch["pixel_values"].to(device)).to("cpu", torch.float16)
    inputs = step_inputs(batch, cache, "cache", device)
    losses = {}
    began = time.perf_counter()
    for kind, model in (("eager", eager), ("compiled", compiled)):
        model.eval()
        torch.manual_seed(0)
        with torch.no_grad():
            losses[kind] = model(**inputs).loss.item()
        model.train()
    models = {"eager": eager, "compiled": compiled}
    optimizers = {kind: make_optimizer(model) for kind, model in models.items()}
    times: dict[str, list[float]] = {kind: [] for kind in models}
    compile_seconds, order = 0.0, list(models)
    for round_index in range(WARMUP + repeats):
        for kind in order:
            synchronize(device)
            step_began = time.perf_counter()
            train_step(models[kind], optimizers[kind], step_inputs(batch, cache, "cache", device))
            synchronize(device)
            if round_index >= WARMUP:
                times[kind].append(time.perf_counter() - step_began)
            elif kind == "compiled":
                compile_seconds = time.perf_counter() - step_began
        order.reverse()
    difference = abs(losses["compiled"] - losses["eager"])
    close = difference <= 1e-4 * max(1.0, abs(losses["eager"]))
    medians = {kind: statistics.median(ts) for kind, ts in times.items()}
    print(
        f"[{name}] step from the cache at batch {batch_size}: eager {medians['eager']:.3f}s, compiled Q-Former "
        f"{medians['compiled']:.3f}s (its first step, compiling, {compile_seconds:.0f}s; all {time.perf_counter() - began:.0f}s);"
        f" first loss {losses['eager']:.8f} vs {losses['compiled']:.8f}: {'equal within tolerance' if close else 'DIFFERENT'}",
        flush=True,
    )
    return {
        "setting": name,
        "what": f"stage-1 step from the cache, batch {batch_size} (s)",
        "rows": {"eager Q-Former": medians["eager"], "compiled Q-Former": medians["compiled"]},
        "ratio": medians["eager"] / medians["compiled"],
        "identical": close,
        "max_abs_difference": difference,
        "first_losses": losses,
        "first_compiled_step_seconds": compile_seconds,
        "times_s": times,
        "spread": max(statistics.median(ts) / min(ts) - 1 for ts in times.values()),
    }


def comparison_table(results: list[dict]) -> str:
    rows = ["| setting | what | baseline | faster path | ratio | checked equal |", "|---|---|---:|---:|---:|---|"]
    for result in results:
        (base_name, base), (fast_name, fast) = result["rows"].items()
        rows.append(
            f"| {result['setting']} | {result['what']} | {base_name} {base:.4g} | {fast_name} {fast:.4g} "
            f"| {result['ratio']:.2f} | {'yes' if result['identical'] else 'NO'} (max diff {result['max_abs_difference']:.1e}) |"
        )
    return "\n".join(rows)


def run_comparisons(args: argparse.Namespace, device: torch.device, environment: dict) -> int:
    """`--compare-optim`: the optimizer rows, and with `--compile` the compiled-Q-Former rows; table, JSON, exit 1
    when a faster path's result is not equal to the baseline's within tolerance."""
    started = time.perf_counter()
    settings = COMPARE_SETTINGS[:1] if args.quick else COMPARE_SETTINGS
    repeats = 2 if args.quick else OPTIM_REPEATS
    results = []
    for name, config, batch_size in settings:
        batch_size = args.batch_size if args.batch_size is not None and name == "vit-g" else batch_size
        results.append(compare_optimizers(name, config, batch_size, repeats, device))
        if args.compile:
            results.append(compare_compiled(name, config, batch_size, repeats, device))
    environment["load_average_1min_after"] = os.getloadavg()[0]
    print()
    print(comparison_table(results))
    print(
        f"\nratio > 1.0: the faster path is faster (baseline time / its time). Device {environment['device']}, torch "
        f"{environment['torch']}, {environment['threads']} threads, total {time.perf_counter() - started:.0f}s, 1-min "
        f"load average {environment['load_average_1min_before']:.2f} before / "
        f"{environment['load_average_1min_after']:.2f} after."
    )
    out = args.out if args.out != OUT_DEFAULT else OUT_DEFAULT.with_name("training_optim.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment, "quick": args.quick, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    for result in results:
        if result["spread"] > 0.2:
            print(
                f"WARNING: [{result['setting']}] {result['what']}: the median is {100 * result['spread']:.0f}% above "
                "the fastest run: another process was probably using the CPU. Rerun on an idle machine."
            )
    if not all(result["identical"] for result in results):
        print("FAIL: a faster path's result differs from the baseline's beyond float tolerance", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def describe(result: dict) -> tuple[str, str]:
    """Table labels: the setting with its widths x depths and batch, and the stage with its model (and LLM)."""
    config = blip2_hf.Blip2Config(**result["config"])
    vision, qformer, text = config.vision_config, config.qformer_config, config.text_config
    setting = (
        f"{result['setting']} (ViT {vision.hidden_size}x{vision.num_hidden_layers}, Q-Former "
        f"{qformer.hidden_size}x{qformer.num_hidden_layers}, batch {result['batch_size']})"
    )
    if result["stage"] == 1:
        return setting, "1 (Blip2ForPreTraining)"
    return setting, f"2 (Blip2ForConditionalGeneration, OPT {text.hidden_size}x{text.num_hidden_layers})"


def markdown_table(results: list[dict]) -> str:
    rows = ["| setting | stage | metric | from images | from cache | ratio |", "|---|---|---|---:|---:|---:|"]
    for result in results:
        setting, stage = describe(result)
        for metric, values in result["metrics"].items():
            rows.append(
                f"| {setting} | {stage} | {metric} | {values['images']:.4g} | {values['cache']:.4g} "
                f"| {values['ratio']:.2f} |"
            )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny setting only, 2 repeats")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"batch of the vit-g setting (default {VIT_G_BATCH}); the tiny setting keeps its own",
    )
    parser.add_argument(
        "--compare-optim",
        action="store_true",
        help="instead of images vs cache: the fused vs unfused AdamW update of stage 1 (tiny and ViT-g's Q-Former)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="with --compare-optim: also a stage-1 step with the Q-Former compiled (torch_compile_qformer) vs eager",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=OUT_DEFAULT, help=f"JSON results (default {OUT_DEFAULT})")
    args = parser.parse_args()
    if args.batch_size is not None and (args.quick or args.batch_size < 1):
        parser.error("--batch-size sets the vit-g setting's batch (>= 1), which --quick does not run")
    if args.compile and not args.compare_optim:
        parser.error("--compile adds rows to --compare-optim")

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    environment = machine_environment(
        device,
        memory_measured_with="torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "torch.profiler allocation timeline",
    )
    if args.compare_optim:
        return run_comparisons(args, device, environment)

    start = time.perf_counter()
    settings = (
        [(name, configs, batch_size, 2) for name, configs, batch_size, _ in SETTINGS[:1]] if args.quick else SETTINGS
    )
    if args.batch_size is not None:
        settings = [
            (name, configs, args.batch_size if name == "vit-g" else batch_size, repeats)
            for name, configs, batch_size, repeats in settings
        ]
    results = []
    for name, configs, batch_size, repeats in settings:
        for stage, config in enumerate(configs, start=1):
            results.append(bench_stage(name, stage, config, batch_size, repeats, device))
    total = time.perf_counter() - start
    environment["load_average_1min_after"] = os.getloadavg()[0]

    print()
    print(markdown_table(results))
    print(
        f"\nratio > 1.0: the cache does better (cache/images for throughput, images/cache for memory and FLOPs). "
        f"Device {environment['device']}, peak memory from the {environment['memory_measured_with']}; torch "
        f"{environment['torch']}, {environment['threads']} threads, total {total:.0f}s, 1-min load average "
        f"{environment['load_average_1min_before']:.2f} before / {environment['load_average_1min_after']:.2f} after."
    )
    for result in results:
        if result["stage"] == 1 and result["setting"] != "tiny":
            ratio = result["metrics"]["training throughput (samples/s)"]["ratio"]
            flop_ratio = result["metrics"]["training GFLOP/sample"]["ratio"]
            print(
                f"target: stage-1 step >= {TARGET:.0f}x faster from the cache at ViT-g width: "
                f"{'MET' if ratio >= TARGET else 'NOT MET'} ({ratio:.2f}x measured on {environment['device']} at "
                f"batch {result['batch_size']}; the cache removes {flop_ratio:.2f}x of the FLOPs, the ceiling where "
                "every FLOP costs the same)"
            )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment, "quick": args.quick, "total_seconds": total, "results": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    for result in results:
        tag = f"[{result['setting']} stage {result['stage']}, batch {result['batch_size']}]"
        if result["spread"] > 0.2:
            print(
                f"WARNING: {tag} the median step is {100 * result['spread']:.0f}% slower than the fastest: another "
                "process was probably using the CPU. Rerun on an idle machine."
            )
        if device.type == "cpu" and result["load_average_1min_after"] > environment["threads"] + 0.5:
            print(
                f"WARNING: {tag} the 1-min load average reached {result['load_average_1min_after']:.2f} with "
                f"{environment['threads']} threads of ours: other processes shared the CPU. Rerun on an idle machine."
            )

    if not all(result["fp32_cache_loss_identical"] for result in results):
        print("FAIL: the loss from an fp32 cache differs from the loss from images", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
