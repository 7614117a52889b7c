"""The demo's plots and markdown report (`output/plots/*.png`, `output/report.md`)."""

from __future__ import annotations

import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..modeling_blip2 import Blip2ForConditionalGeneration
from ..processing_blip2 import Blip2Processor
from . import ARMS, VQA_PROMPT
from .world import CAPTION_ATTRIBUTES, caption_is_right

ARM_COLORS = {"stage1+2": "tab:blue", "stage2_only": "tab:red"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _series(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in history if key in entry and "train_runtime" not in entry]
    return [step for step, _ in points], [value for _, value in points]


def plot_losses(path: Path, towers: dict, curves: Sequence[dict]) -> None:
    """Pretraining of the towers, stage 1 per objective, stage 2 per arm (one thin line per seed)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for ax, name, title in (
        (axes[0], "vision_encoder", "image encoder: scene tagging (built once)"),
        (axes[1], "language_model", "LLM: next token, text only (built once)"),
    ):
        curve = towers["curves"][name]
        steps, losses = zip(*((entry["step"], entry["loss"]) for entry in curve if "loss" in entry))
        ax.plot(steps, losses, color="black")
        ax.set_title(title, fontsize=10)
        monitored = [entry for entry in curve if "with_caption" in entry]
        if monitored:  # the LLM's text-only VQA on held-out scenes during its training
            twin = ax.twinx()
            twin.plot([e["step"] for e in monitored], [e["with_caption"] for e in monitored], "o-", color="tab:blue")
            twin.set_ylabel("text-only VQA after the caption (%)", color="tab:blue", fontsize=8)
            twin.set_ylim(0, 100)
    for seed, logs in enumerate(curves):
        for key, color in (("loss_itc", "tab:green"), ("loss_itm", "tab:orange"), ("loss_itg", "tab:purple")):
            axes[2].plot(
                *_series(logs["stage1"], key), color=color, alpha=0.8, label=key[5:].upper() if seed == 0 else None
            )
            if key != "loss_itg":  # the ablation's curves, dashed
                axes[2].plot(*_series(logs["stage1_without_itg"], key), color=color, alpha=0.8, linestyle="--",
                             label=f"{key[5:].upper()} (w/o ITG)" if seed == 0 else None)  # fmt: skip
        for arm in ARMS:
            axes[3].plot(
                *_series(logs[arm], "loss"), color=ARM_COLORS[arm], alpha=0.8, label=ARMS[arm] if seed == 0 else None
            )
    axes[2].set_title("stage 1: the three objectives", fontsize=10)
    axes[3].set_title("stage 2: language-modeling loss", fontsize=10)
    axes[2].legend(fontsize=8)
    axes[3].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(path: Path, test: Sequence[dict], images: Sequence[Image.Image], run: dict, count: int = 8) -> None:
    """Test images with both arms' captions and the stage-1+2 model's answers to two questions each, each marked
    right or wrong (a caption is right when it names every group with its right attributes: `caption_is_right`)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, count // 2, figsize=(3.6 * count // 2, 12))
    for index, ax in enumerate(axes.flat):
        record = test[index]
        ax.imshow(images[index].resize((256, 256), Image.NEAREST))
        ax.set_xticks([])
        ax.set_yticks([])
        lines = []
        for arm in ARMS:
            caption = run[arm]["captions"][index]
            mark = "right" if caption_is_right(caption, record["scene"]) else "WRONG"
            lines.append(f"[{mark}] {'BLIP-2' if arm == 'stage1+2' else 'no stage 1'}: {caption}")
        for qa in record["questions"][:: max(1, len(record["questions"]) // 2)][:2]:
            answer = run["stage1+2"]["answers"][f"{index}|{qa['question']}"]
            mark = "right" if answer == qa["answer"] else "WRONG"
            lines.append(f"[{mark}] Q: {qa['question']} A: {answer}")
        ax.set_xlabel("\n".join(textwrap.fill(line, 44) for line in lines), fontsize=8, loc="left")
        ax.set_title(textwrap.fill(f"truth: {record['caption'][0]}", 44), fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.inference_mode()
def plot_cross_attention(
    path: Path,
    model_dir: Path,
    processor: Blip2Processor,
    images: Sequence[Image.Image],
    count: int = 3,
    queries: int = 8,
) -> None:
    """Each query's cross-attention over the image patches (the last cross-attention layer, mean over heads)."""
    plt = _pyplot()
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir).eval()
    model.set_attn_implementation("eager")  # attention probabilities are returned by the eager path only
    pixel_values = processor(images=list(images[:count]), return_tensors="pt")["pixel_values"]
    features = model.get_image_features(pixel_values, output_attentions=True)
    # one entry per Q-Former layer, None where a layer has no cross-attention (every `cross_attention_frequency`-th)
    last = [weights for weights in features.qformer_outputs.cross_attentions if weights is not None][-1]
    attention = last.mean(1)[:, :, 1:]  # [B, Q, P], CLS dropped
    grid = int(attention.shape[-1] ** 0.5)
    queries = min(queries, attention.shape[1])
    fig, axes = plt.subplots(count, queries + 1, figsize=(1.9 * (queries + 1), 2 * count))
    for row in range(count):
        axes[row, 0].imshow(images[row])
        for query in range(queries):
            heat = attention[row, query].reshape(grid, grid).numpy()
            axes[row, query + 1].imshow(images[row], alpha=0.45)
            axes[row, query + 1].imshow(
                heat, cmap="magma", alpha=0.6, extent=(0, images[row].width, images[row].height, 0)
            )
            if row == 0:
                axes[row, query + 1].set_title(f"query {query}", fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_results(path: Path, summary: dict, per_seed: Sequence[dict]) -> None:
    """Both stage-2 arms: bars of the test metrics (mean, std over the seeds) and zero-shot VQA along stage 2 on
    validation images (the paper's Figure 5; a thin line per seed, the mean thick)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    _plot_vqa_curves(axes[3], per_seed)
    for ax, metric in zip(axes, ("VQA", "CIDEr", "caption_wholly_right")):
        for position, arm in enumerate(ARMS):
            mean, std = summary[arm][metric]
            ax.bar(position, mean, yerr=std, color=ARM_COLORS[arm], capsize=6)
        ax.set_xticks(range(len(ARMS)), ["stage 1 + 2", "stage 2 only"])
        ax.set_title({"VQA": "zero-shot VQA accuracy (%)", "caption_wholly_right": "captions wholly right (%)"}.get(
            metric, "caption CIDEr"), fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_vqa_curves(ax: Any, per_seed: Sequence[dict]) -> None:
    for arm in ARMS:
        curves = [run[arm].get("VQA_curve") or [] for run in per_seed]
        for curve in curves:
            ax.plot([p["step"] for p in curve], [p["VQA"] for p in curve], color=ARM_COLORS[arm], alpha=0.35)
        if curves[0] and all(len(curve) == len(curves[0]) for curve in curves):
            mean = [mean_std(points)[0] for points in zip(*([p["VQA"] for p in c] for c in curves))]
            ax.plot([p["step"] for p in curves[0]], mean, "o-", color=ARM_COLORS[arm], linewidth=2.5,
                    label=ARMS[arm])  # fmt: skip
    ax.set_xlabel("stage-2 step")
    ax.set_ylim(0, 100)
    ax.set_title("zero-shot VQA along stage 2 (validation, %)", fontsize=10)
    ax.legend(fontsize=7)


def vqa_curve_table(per_seed: Sequence[dict]) -> str:
    """Zero-shot VQA on validation images along stage 2, per arm: mean ± std over the seeds at each step."""
    steps = [point["step"] for point in per_seed[0]["stage1+2"].get("VQA_curve") or []]
    if not steps:
        return ""
    rows = ["| stage-2 step | " + " | ".join(str(step) for step in steps) + " |", "|---|" + "---:|" * len(steps)]
    for arm in ARMS:
        points = [[p["VQA"] for p in run[arm]["VQA_curve"]] for run in per_seed]
        cells = [_pm(mean_std(values)) for values in zip(*points)]
        rows.append(f"| {ARMS[arm]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(value: Sequence[float], digits: int = 1) -> str:
    mean, std = value
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_table(results: dict) -> str:
    summary = results["summary"]
    rows = [
        "| model | zero-shot VQA acc. (%) | captions wholly right (%) | CIDEr | BLEU-4 | retrieval R@1 text / image (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        metrics = summary[arm]
        retrieval = (
            f"{_pm(metrics['text_R@1'])} / {_pm(metrics['image_R@1'])}" if "text_R@1" in metrics else "– (no stage 1)"
        )
        rows.append(
            f"| {ARMS[arm]} | {_pm(metrics['VQA'])} | {_pm(metrics['caption_wholly_right'])} | "
            f"{_pm(metrics['CIDEr'])} | {_pm(metrics['BLEU-4'])} | {retrieval} |"
        )
    return "\n".join(rows)


def itg_ablation_table(summary: dict) -> str:
    """Stage 1 with and without ITG (the paper's Table 6): retrieval R@1 after ITM re-ranking and from ITC alone."""
    rows = [
        "| stage 1 | text R@1 (%) | image R@1 (%) | text R@1, ITC only (%) | image R@1, ITC only (%) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, metrics in (
        ("ITC + ITM + ITG", summary["stage1+2"]),
        ("ITC + ITM (w/o ITG)", summary["stage1_without_itg"]),
    ):
        rows.append(
            f"| {label} | {_pm(metrics['text_R@1'])} | {_pm(metrics['image_R@1'])} | "
            f"{_pm(metrics['text_R@1_itc_only'])} | {_pm(metrics['image_R@1_itc_only'])} |"
        )  # fmt: skip
    return "\n".join(rows)


def caption_content_table(summary: dict) -> str:
    """What each arm's captions say, attribute by attribute (`caption_content_accuracy`), mean ± std over the seeds."""
    rows = [
        "| model | " + " | ".join(CAPTION_ATTRIBUTES) + " |",
        "|---|" + "---:|" * len(CAPTION_ATTRIBUTES),
    ]
    for arm in ARMS:
        rows.append(
            f"| {ARMS[arm]} | " + " | ".join(_pm(summary[arm][f"caption_{a}"]) for a in CAPTION_ATTRIBUTES) + " |"
        )
    return "\n".join(rows)


def _verdict(summary: dict, seeds: int) -> str:
    """The paper's claims in miniature: Figure 5 (VQA and captions, both arms) and Table 6 (retrieval, ITG)."""
    lines = []
    comparisons = (
        ("zero-shot VQA accuracy (Figure 5)", summary["stage1+2"], summary["stage2_only"], "VQA"),
        ("CIDEr", summary["stage1+2"], summary["stage2_only"], "CIDEr"),
        ("captions wholly right", summary["stage1+2"], summary["stage2_only"], "caption_wholly_right"),
        ("text R@1, stage 1 with vs without ITG (Table 6)", summary["stage1+2"], summary["stage1_without_itg"],
         "text_R@1"),
        ("image R@1, with vs without ITG", summary["stage1+2"], summary["stage1_without_itg"], "image_R@1"),
    )  # fmt: skip
    for label, a, b, metric in comparisons:
        gap, spread = a[metric][0] - b[metric][0], max(a[metric][1], b[metric][1])
        if seeds == 1:
            verdict = "one seed: no spread measured"
        else:
            beyond = abs(gap) > 2 * spread
            verdict = f"{'beyond' if beyond else 'within'} twice the larger seed-to-seed std ({spread:.1f})"
        lines.append(f"- {label}: {a[metric][0]:.1f} vs {b[metric][0]:.1f}, a gap of {gap:+.1f}, {verdict}")
    return "\n".join(lines)


def _examples_table(test: Sequence[dict], run: dict, count: int = 12) -> str:
    rows = ["| image | truth | BLIP-2 caption | no-stage-1 caption | question | BLIP-2 answer | truth |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for index in range(min(count, len(test))):
        record = test[index]
        qa = record["questions"][index % len(record["questions"])]
        answer = run["stage1+2"]["answers"][f"{index}|{qa['question']}"]
        marks = ["" if caption_is_right(run[arm]["captions"][index], record["scene"]) else " ✗" for arm in ARMS]
        rows.append(
            f"| `data/test/{record['image']}` | {record['caption'][0]} | {run['stage1+2']['captions'][index]}{marks[0]} "
            f"| {run['stage2_only']['captions'][index]}{marks[1]} | {qa['question']} | "
            f"{answer}{'' if answer == qa['answer'] else ' ✗'} | {qa['answer']} |"
        )
    return "\n".join(rows)


def _tables(results: dict, per_seed: Sequence[dict], towers: dict) -> dict[str, str]:
    per_type_a = per_seed[0]["stage1+2"]["VQA_per_type"]
    per_type_b = per_seed[0]["stage2_only"]["VQA_per_type"]
    per_type_llm = towers.get("llm_per_type", {})  # the LLM alone, reading the true caption: the ceiling
    per_type = ["| question type | BLIP-2 | no stage 1 | LLM alone, true caption first |", "|---|---:|---:|---:|"] + [
        f"| {name} | {per_type_a[name]:.1f} | {per_type_b.get(name, float('nan')):.1f} "
        f"| {per_type_llm.get(name, float('nan')):.1f} |"
        for name in sorted(per_type_a)
    ]
    probe = ["| attribute | linear probe accuracy (%) | majority rate (%) |", "|---|---:|---:|"] + [
        f"| {name} | {m['accuracy']:.1f} | {m['majority']:.1f} |" for name, m in towers["probe"].items()
    ]
    timings = [f"| {name} | {seconds:.0f} |" for name, seconds in results["timings_s"].items()]
    timings.append(f"| **total** | **{sum(results['timings_s'].values()):.0f}** |")
    return {"per_type": "\n".join(per_type), "probe": "\n".join(probe), "timings": "\n".join(timings)}


def write_report(
    output: Path,
    results: dict,
    world: dict,
    test_images: Sequence[Image.Image],
    per_seed: Sequence[dict],
    curves: Sequence[dict],
    towers: dict,
) -> None:
    """`output/report.md` and `output/plots/*.png`. `towers`: the shipped towers' `curves`, `probe`, `llm` and
    `build` (their `towers.json`)."""
    test = world["test"]
    summary = {arm: {k: tuple(v) for k, v in metrics.items()} for arm, metrics in results["summary"].items()}
    _draw_plots(output, towers, curves, test, test_images, per_seed, summary)
    report = _results_markdown(results, summary, test, per_seed, towers) + _towers_and_protocol_markdown(
        results, per_seed, towers
    )
    (output / "report.md").write_text(report)


def _draw_plots(
    output: Path,
    towers: dict,
    curves: Sequence[dict],
    test: Sequence[dict],
    test_images: Sequence[Image.Image],
    per_seed: Sequence[dict],
    summary: dict,
) -> None:
    """The four figures of the report, into `output/plots/` (created if needed)."""
    plots = output / "plots"
    plots.mkdir(exist_ok=True)
    processor = Blip2Processor.from_pretrained(output / "runs" / "seed0" / "stage2")
    plot_losses(plots / "losses.png", towers, curves)
    plot_examples(plots / "examples.png", test, test_images, per_seed[0])
    plot_cross_attention(plots / "cross_attention.png", output / "runs" / "seed0" / "stage2", processor, test_images)
    plot_results(plots / "results.png", summary, per_seed)


def _results_markdown(
    results: dict, summary: dict, test: Sequence[dict], per_seed: Sequence[dict], towers: dict
) -> str:
    """The report's first half: the results, examples, the paper's ablations and what the captions say."""
    settings, seeds = results["settings"], results["seeds"]
    return f"""# blip2-hf demo: a miniature BLIP-2, end to end on CPU

## Results (held-out test split, {settings["num_test"]} images, mean ± std over {seeds} seed(s))

{results_table(results)}

![results](plots/results.png)

## Examples (held-out test images, seed 0; ✗ marks a wrong caption or answer)

![examples](plots/examples.png)

{_examples_table(test, per_seed[0])}

## The paper's ablations in miniature

Both stage-2 arms train for the same {settings["stage2_steps"]} steps from the same frozen towers; the first starts
from stage 1 ({settings["stage1_steps"]} steps of ITC + ITM + ITG). Stage 1 without ITG trains the same steps on
ITC + ITM alone and is scored on retrieval:

{_verdict(summary, seeds)}

Zero-shot VQA along stage 2 ({settings["vqa_curve_images"]} validation images, mean ± std over {seeds} seed(s);
the right panel of `plots/results.png`), as the paper's Figure 5 plots it:

{vqa_curve_table(per_seed)}

{itg_ablation_table(summary)}

The frozen LLM alone, text only: it answers {towers["llm"]["with_caption"]:.1f}% of the test questions when it reads
the image's ground-truth caption first (the ceiling for zero-shot VQA through it) and
{towers["llm"]["without_context"]:.1f}% from the question alone (its prior).

## What the captions say (test split, %, mean ± std over {seeds} seed(s))

{caption_content_table(summary)}

CIDEr rewards the phrasing as much as the content. This table reads only the content, with the world's grammar:
`groups`, the caption describes as many groups as the image has; `color`, the share of the image's groups the caption
names (by their color: a scene's groups differ in color); `shape` / `count` / `size` / `side`, of the named groups,
the share whose shape / number / size (where one is stated) / side the caption gets right. "Wholly right": every group
named, each with all its attributes right.

"""


def _towers_and_protocol_markdown(results: dict, per_seed: Sequence[dict], towers: dict) -> str:
    """The report's second half: the frozen towers, VQA per question type, losses, attention, protocol and timings."""
    tables = _tables(results, per_seed, towers)
    settings = results["settings"]
    threads = towers.get("tower_threads") or {}
    build = ", ".join(
        f"{label} {towers['build'][name] / 60:.0f} min on {threads.get(name, towers.get('build_threads', 2))} thread(s)"
        for name, label in (("vision_encoder", "image encoder"), ("language_model", "LLM"))
    )
    return f"""## The frozen towers

Built once by `blip2-hf demo --build-towers` ({build} of training)
and shipped with the package (`blip2_hf/demo/towers/towers.json`: command, seed, budget, sha256 of every file), as
BLIP-2 starts from EVA-CLIP and OPT: a ViT with a convolutional stem trained by scene tagging, each patch token also
tagged with the group it shows (no text), and an OPT-style LLM trained on text alone. What the image encoder carries, read by a logistic regression on the mean of its output tokens (trained
on this world's 4,000 training images, scored on its test
images), next to the majority rate:

{tables["probe"]}

## Zero-shot VQA per question type (seed 0)

{tables["per_type"]}

## Losses

![losses](plots/losses.png)

## What the queries look at

Cross-attention of the stage-2 model's queries over the image patches (last cross-attention layer, mean over heads):

![cross-attention](plots/cross_attention.png)

## Protocol

- Captioning: beam search ({settings["caption_beams"]} beams, at most 30 tokens, stop at "\\n"), no prompt; CIDEr and
  BLEU-4 (pycocoevalcap, x100) against every reference caption of each image.
- Zero-shot VQA: prompt `{VQA_PROMPT}` (LAVIS's OPT zero-shot yaml), greedy, first line of the output; every question of
  every test image; exact match. The stage-2 data hold captions only: the model never trained on a question.
- Retrieval (stage 1): ITC over all test pairs, ITM re-ranking of the top {settings["rerank_k"]} (LAVIS), every caption
  of every test image.
- Checkpoints: `runs/seed*/stage1`, `runs/seed*/stage1_without_itg` (`Blip2ForPreTraining`), `runs/seed*/stage2` and
  `runs/seed*/stage2_without_stage1` (`Blip2ForConditionalGeneration`), `model` and `retrieval_model` (seed 0, used by
  `blip2-hf caption / ask / retrieve`), `pretrained/` (the frozen towers and the processor), all loadable with
  `from_pretrained`.

## Time (s, wall clock)

| phase | seconds |
|---|---:|
{tables["timings"]}
"""
