"""The demo's plots and markdown report (`output/plots/*.png`, `output/report.md`)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ..modeling_blip2 import Blip2ForConditionalGeneration
from ..processing_blip2 import Blip2HFProcessor as Blip2Processor
from . import ARMS, VQA_PROMPT
from .world import CAPTION_ATTRIBUTES

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
        (axes[0], "vision_curve", "image encoder: contrastive (CLIP-style)"),
        (axes[1], "llm_curve", "LLM: next token, text only"),
    ):
        steps, losses = zip(*((entry["step"], entry["loss"]) for entry in towers[name]))
        ax.plot(steps, losses, color="black")
        ax.set_title(title, fontsize=10)
    for seed, logs in enumerate(curves):
        for key, color in (("loss_itc", "tab:green"), ("loss_itm", "tab:orange"), ("loss_itg", "tab:purple")):
            axes[2].plot(
                *_series(logs["stage1"], key), color=color, alpha=0.8, label=key[5:].upper() if seed == 0 else None
            )
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
    """Test images with both arms' captions and the stage-1+2 model's answers to two questions each."""
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
            mark = "ok" if caption in record["caption"] else "x"
            lines.append(f"[{mark}] {'BLIP-2' if arm == 'stage1+2' else 'no stage 1'}: {caption}")
        for qa in record["questions"][:: max(1, len(record["questions"]) // 2)][:2]:
            answer = run["stage1+2"]["answers"][f"{index}|{qa['question']}"]
            mark = "ok" if answer == qa["answer"] else "x"
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


def plot_results(path: Path, summary: dict) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    for ax, metric in zip(axes, ("VQA", "CIDEr", "caption_exact_match")):
        for position, arm in enumerate(ARMS):
            mean, std = summary[arm][metric]
            ax.bar(position, mean, yerr=std, color=ARM_COLORS[arm], capsize=6)
        ax.set_xticks(range(len(ARMS)), ["stage 1 + 2", "stage 2 only"])
        ax.set_title({"VQA": "zero-shot VQA accuracy (%)", "caption_exact_match": "captions exactly right (%)"}.get(
            metric, "caption CIDEr"), fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pm(value: Sequence[float], digits: int = 1) -> str:
    mean, std = value
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_table(results: dict) -> str:
    summary = results["summary"]
    rows = [
        "| model | zero-shot VQA acc. (%) | CIDEr | BLEU-4 | captions exactly right (%) | retrieval R@1 text / image (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        metrics = summary[arm]
        retrieval = (
            f"{_pm(metrics['text_R@1'])} / {_pm(metrics['image_R@1'])}" if "text_R@1" in metrics else "– (no stage 1)"
        )
        rows.append(
            f"| {ARMS[arm]} | {_pm(metrics['VQA'])} | {_pm(metrics['CIDEr'])} | {_pm(metrics['BLEU-4'])} | "
            f"{_pm(metrics['caption_exact_match'])} | {retrieval} |"
        )
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


def write_report(
    output: Path,
    results: dict,
    world: dict,
    test_images: Sequence[Image.Image],
    per_seed: Sequence[dict],
    curves: Sequence[dict],
    towers: dict,
) -> None:
    plots = output / "plots"
    plots.mkdir(exist_ok=True)
    test = world["test"]
    processor = Blip2Processor.from_pretrained(output / "runs" / "seed0" / "stage2")
    summary = {arm: {k: tuple(v) for k, v in metrics.items()} for arm, metrics in results["summary"].items()}
    plot_losses(plots / "losses.png", towers, curves)
    plot_examples(plots / "examples.png", test, test_images, per_seed[0])
    plot_cross_attention(plots / "cross_attention.png", output / "runs" / "seed0" / "stage2", processor, test_images)
    plot_results(plots / "results.png", summary)

    settings, seeds = results["settings"], results["seeds"]
    a, b = summary["stage1+2"], summary["stage2_only"]
    verdict = []
    for metric, label in (("VQA", "zero-shot VQA accuracy"), ("CIDEr", "CIDEr")):
        gap = a[metric][0] - b[metric][0]
        spread = max(a[metric][1], b[metric][1])
        verdict.append(
            f"- {label}: {a[metric][0]:.1f} vs {b[metric][0]:.1f}, a gap of {gap:+.1f}"
            + (
                f" against a seed-to-seed std of at most {spread:.1f}"
                if seeds > 1
                else " (one seed: no spread measured)"
            )
        )
    examples = ["| image | truth | BLIP-2 caption | no-stage-1 caption | question | BLIP-2 answer | truth |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    run = per_seed[0]
    for index in range(12):
        record = test[index]
        qa = record["questions"][index % len(record["questions"])]
        answer = run["stage1+2"]["answers"][f"{index}|{qa['question']}"]
        examples.append(
            f"| `data/test/{record['image']}` | {record['caption'][0]} | {run['stage1+2']['captions'][index]} | "
            f"{run['stage2_only']['captions'][index]} | {qa['question']} | "
            f"{answer} | {qa['answer']} |"
        )
    per_type_a = per_seed[0]["stage1+2"]["VQA_per_type"]
    per_type_b = per_seed[0]["stage2_only"]["VQA_per_type"]
    per_type = ["| question type | BLIP-2 | no stage 1 |", "|---|---:|---:|"] + [
        f"| {name} | {per_type_a[name]:.1f} | {per_type_b.get(name, float('nan')):.1f} |"
        for name in sorted(per_type_a)
    ]
    probe = ["| attribute | linear probe accuracy (%) | majority rate (%) |", "|---|---:|---:|"] + [
        f"| {name} | {m['accuracy']:.1f} | {m['majority']:.1f} |" for name, m in towers["vision"]["probe"].items()
    ]
    timings = "\n".join(f"| {name} | {seconds:.0f} |" for name, seconds in results["timings_s"].items())
    total = sum(results["timings_s"].values())
    report = f"""# blip2-hf demo: a miniature BLIP-2, end to end on CPU

A synthetic world of colored shapes ({settings["num_train"]} training, {settings["num_test"]} test images, 64 x 64
px); an image encoder pretrained without language (contrastive, CLIP-style) and an OPT-style LLM pretrained on text
alone, both then frozen; BLIP-2's two stages with the package's Trainers; evaluation with the package's metrics.
{seeds} seed(s) of BLIP-2 training (the frozen towers are shared, as real BLIP-2 starts from fixed EVA-CLIP and OPT).

## Results (test split, mean ± std over {seeds} seed(s))

{results_table(results)}

Both arms train stage 2 for the same {settings["stage2_steps"]} steps from the same frozen towers; the first also ran
stage 1 ({settings["stage1_steps"]} steps of ITC + ITM + ITG) first. The paper's Figure 5 in miniature:

{chr(10).join(verdict)}

References for the VQA numbers (the frozen LLM alone, text only): it answers
{towers["llm"]["with_caption"]:.1f}% of the test questions when it reads the image's ground-truth caption first (the
ceiling for zero-shot VQA through this LLM) and {towers["llm"]["without_context"]:.1f}% from the question alone (its
prior). The image encoder's own contrastive zero-shot retrieval on validation: R@1 image->text
{towers["vision"]["val_i2t_r1"]:.1f}%, text->image {towers["vision"]["val_t2i_r1"]:.1f}%.

![results](plots/results.png)

## What the captions say (test split, %, mean ± std over {seeds} seed(s))

{caption_content_table(summary)}

CIDEr rewards the phrasing as much as the content. This table reads only the content, with the world's grammar:
`groups`, the caption describes as many groups as the image has; `color`, the share of the image's groups the caption
names (by their color: a scene's groups differ in color); `shape` / `count` / `size` / `side`, of the named groups,
the share whose shape / number / size (where one is stated) / side the caption gets right.

## What the frozen image encoder carries

BLIP-2 passes on only what the frozen image encoder saw. A logistic regression on the mean of its output tokens
(trained on the training images, scored on the test images), per attribute, next to the majority rate (always
answering the more frequent value): an attribute near its majority rate is out of reach of both arms.

{chr(10).join(probe)}

## Zero-shot VQA per question type (seed 0)

{chr(10).join(per_type)}

## Examples (held-out test images, seed 0)

![examples](plots/examples.png)

{chr(10).join(examples)}

## Losses

![losses](plots/losses.png)

## What the queries look at

Cross-attention of the stage-2 model's queries over the 8 x 8 image patches (last cross-attention layer, mean over
heads):

![cross-attention](plots/cross_attention.png)

## Protocol

- Captioning: beam search ({settings["caption_beams"]} beams, at most 30 tokens, stop at "\\n"), no prompt; CIDEr and
  BLEU-4 (pycocoevalcap, x100) against all {len(test[0]["caption"])}-ish reference captions of each image; "exactly
  right": the caption is one of the references.
- Zero-shot VQA: prompt `{VQA_PROMPT}` (LAVIS's OPT zero-shot yaml), greedy, first line of the output; every question of
  every test image; exact match. The stage-2 data hold captions only: the model never trained on a question.
- Retrieval (stage 1): ITC over all test pairs, ITM re-ranking of the top {settings["rerank_k"]} (LAVIS), every caption
  of every test image.
- Checkpoints: `runs/seed*/stage1` (`Blip2ForPreTraining`), `runs/seed*/stage2` and `runs/seed*/stage2_without_stage1`
  (`Blip2ForConditionalGeneration`), `model` and `retrieval_model` (seed 0, used by `blip2-hf caption / ask /
  retrieve`), `pretrained/` (the frozen towers and the processor), all loadable with `from_pretrained`.

## Time (s)

| phase | seconds |
|---|---:|
{timings}
| **total** | **{total:.0f}** |
"""
    (output / "report.md").write_text(report)
