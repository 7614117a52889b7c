"""The demo, top to bottom: world -> unimodal towers -> (per seed) stage 1, stage 2, stage 2 without stage 1 ->
evaluation -> results table, plots, report. `blip2-hf demo` calls `run_demo`.

Everything BLIP-2 goes through the package's own code paths: `Blip2ForPreTraining` + `Blip2Stage1Trainer` +
`Stage1Collator`, `Blip2ForConditionalGeneration.from_stage1` + `Blip2Stage2Trainer` + `Stage2Collator`, the
frozen-feature cache, `generate`, `blip2_hf.metrics` and `blip2_hf.retrieval`. Only the unimodal pretraining (which
BLIP-2 takes as given) is the demo's own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import OPTForCausalLM, TrainerCallback
from transformers.utils import logging as hf_logging

from ..configuration_blip2 import Blip2Config, Blip2VisionConfig
from ..data import Stage1Collator, Stage2Collator, load_caption_json
from ..feature_cache import build_feature_cache, load_feature_cache
from ..metrics import coco_caption_scores, vqa_accuracy
from ..modeling_blip2 import (
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2ForPreTraining,
    Blip2VisionModel,
)
from ..processing_blip2 import Blip2Processor
from ..retrieval import encode_images, encode_texts, itc_similarity, itm_rerank, recall_at_k
from ..trainer import Blip2Stage1Trainer, Blip2Stage2Trainer, Blip2TrainingArguments
from . import ARMS, CAPTION_MODEL_SUBDIR, RETRIEVAL_MODEL_SUBDIR, VQA_PROMPT
from .quality import first_line
from .report import mean_std, write_report
from .towers import copy_towers, demo_processor
from .world import CAPTION_ATTRIBUTES, caption_content_accuracy, caption_is_right, make_world, write_split

logger = logging.getLogger("blip2_hf.demo")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes and budgets of BLIP-2's training on the shipped towers (`towers.py`). The default fits 8 minutes on 2
    CPU cores; `QUICK` 90 seconds."""

    num_train: int = 4000
    num_validation: int = 100
    num_test: int = 200
    qformer_width: int = 96
    qformer_layers: int = 4
    num_query_tokens: int = 16
    # Stage 2 needs the longer schedule: with 800 steps its soft prompt already held which attribute belongs to which
    # group (a linear read-out: 100%) but the captions still swapped them; 400 / 1,000 fits the time budget
    # (benchmarks/README.md, "Training choices").
    stage1_steps: int = 400
    stage2_steps: int = 1000
    batch_size: int = 32
    # Q-Former dropout (LAVIS: 0.1 in both stages, meant for bert-base on 129M images). Stage 1 runs without: at
    # this scale and budget dropout keeps ITM at its prior, so stage 1 would learn no matching. Stage 2 keeps 0.1,
    # without which the answers collapse into caption words (benchmarks/README.md, "Training choices").
    stage1_dropout: float = 0.0
    stage2_dropout: float = 0.1
    stage1_learning_rate: float = 1e-3
    # At 1e-3 the BLIP-2 arm's zero-shot VQA collapsed midway in one seed of three (the soft prompt captured the
    # LLM's question-reading heads); at 5e-4 it did not, but the captions learned too slowly; 7e-4 keeps both
    # (benchmarks/README.md, "Training choices")
    stage2_learning_rate: float = 7e-4
    # evaluation
    caption_beams: int = 3
    rerank_k: int = 16
    # the paper's Figure 5 as a curve: zero-shot VQA on validation images at this many points along stage 2
    vqa_curve_points: int = 4
    vqa_curve_images: int = 50


QUICK = DemoSettings(
    num_train=1200,
    num_validation=40,
    num_test=60,
    stage1_steps=60,
    stage2_steps=150,
    batch_size=32,
    num_query_tokens=8,
    stage2_learning_rate=1e-3,  # its 150 steps: 57% of the caption colors right at 1e-3, 49% at 5e-4
    vqa_curve_points=2,
    vqa_curve_images=20,
)

# The paper's Table 6 ablation: stage 1 without its generative objective (ITG), scored on retrieval.
STAGE1_ABLATION = {"stage1": ["itc", "itm", "itg"], "stage1_without_itg": ["itc", "itm"]}


def _trainer_args(
    output_dir: Path, steps: int, settings: DemoSettings, seed: int, learning_rate: float
) -> Blip2TrainingArguments:
    return Blip2TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=learning_rate,
        min_learning_rate=learning_rate / 10,
        warmup_steps=max(1, steps // 10),
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        seed=seed,
        # Two CPU threads made stage 1 differ between two runs of the same seed (from step 9 of a 30-step run; one
        # thread, or deterministic algorithms, repeat exactly): the demo's seeds must be reruns, not draws
        full_determinism=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
    )


# =====================================================================================================================
# World, tokenizers, unimodal towers
# =====================================================================================================================


def build_world(output: Path, settings: DemoSettings) -> dict[str, list[dict]]:
    splits = make_world(settings.num_train, settings.num_validation, settings.num_test, seed=0)
    return {name: write_split(scenes, output / "data" / name) for name, scenes in splits.items()}


def load_images(folder: Path, records: Sequence[dict]) -> list[Image.Image]:
    return [Image.open(folder / record["image"]).convert("RGB") for record in records]


# =====================================================================================================================
# BLIP-2: stage 1, stage 2, the ablation
# =====================================================================================================================


def stage1_config(
    vision_config: Blip2VisionConfig,
    qformer_tokenizer: Any,
    settings: DemoSettings,
    objectives: Sequence[str] = ("itc", "itm", "itg"),
) -> Blip2Config:
    tokenizer = qformer_tokenizer
    return Blip2Config(
        vision_config=vision_config.to_dict(),
        qformer_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=settings.qformer_width,
            num_hidden_layers=settings.qformer_layers,
            num_attention_heads=4,
            intermediate_size=4 * settings.qformer_width,
            hidden_dropout_prob=settings.stage1_dropout,
            attention_probs_dropout_prob=settings.stage1_dropout,
            max_position_embeddings=64,
            cross_attention_frequency=2,
            encoder_hidden_size=vision_config.hidden_size,
            use_qformer_text_input=True,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.sep_token_id,
        ),
        num_query_tokens=settings.num_query_tokens,
        image_text_hidden_size=64,
        pretraining_objectives=list(objectives),
    )


def _train(trainer_class: type, model: Any, collator: Any, processor: Blip2Processor, output_dir: Path,
           steps: int, cache: Path, settings: DemoSettings, seed: int, learning_rate: float,
           callbacks: Sequence[TrainerCallback] = ()) -> list[dict]:  # fmt: skip
    """Train on the frozen-feature cache, save the model and its processor in `output_dir`, return the log history."""
    trainer = trainer_class(
        model=model,
        args=_trainer_args(output_dir, steps, settings, seed, learning_rate),
        train_dataset=load_feature_cache(cache),
        data_collator=collator,
        callbacks=list(callbacks),
    )
    trainer.train()
    trainer.save_model(str(output_dir))
    processor.save_pretrained(output_dir)
    return trainer.state.log_history


def stage1_model(
    pretrained: Path,
    processor: Blip2Processor,
    settings: DemoSettings,
    objectives: Sequence[str] = ("itc", "itm", "itg"),
) -> Blip2ForPreTraining:
    """Stage 1 before training: the frozen image encoder, queries and a Q-Former randomly initialized (there is no
    BERT in this world)."""
    vision = Blip2VisionModel.from_pretrained(pretrained / "vision_encoder", dtype=torch.float32)
    model = Blip2ForPreTraining(stage1_config(vision.config, processor.qformer_tokenizer, settings, objectives))
    model.vision_model.load_state_dict(vision.state_dict())
    return model


def train_stage1(
    output_dir: Path,
    pretrained: Path,
    cache: Path,
    processor: Blip2Processor,
    settings: DemoSettings,
    seed: int,
    objectives: Sequence[str] = ("itc", "itm", "itg"),
) -> list[dict]:
    """Stage 1 from a random Q-Former against the frozen image encoder, with the `objectives` (all three, or an
    ablation); saves a `Blip2ForPreTraining` folder and returns the Trainer's log history."""
    torch.manual_seed(seed)
    model = stage1_model(pretrained, processor, settings, objectives)
    collator = Stage1Collator(processor, max_length=32)
    return _train(
        Blip2Stage1Trainer, model, collator, processor, output_dir, settings.stage1_steps, cache, settings, seed,
        settings.stage1_learning_rate,
    )  # fmt: skip


def stage2_model(
    pretrained: Path, processor: Blip2Processor, settings: DemoSettings, stage1_dir: Path | None
) -> Blip2ForConditionalGeneration:
    """The frozen image encoder and LLM bridged by a Q-Former (`Blip2ForConditionalGeneration.from_stage1`, as
    training/stage2.py): from stage 1 (`stage1_dir`), or fresh (the ablation: stage 1 untrained, so query tokens and
    Q-Former randomly initialized, the same towers)."""
    stage1 = stage1_model(pretrained, processor, settings) if stage1_dir is None else stage1_dir
    llm = OPTForCausalLM.from_pretrained(pretrained / "language_model", dtype=torch.float32)
    dropout = settings.stage2_dropout
    model, _ = Blip2ForConditionalGeneration.from_stage1(
        stage1,
        llm,
        processor,
        qformer_config={"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout},
    )
    model.freeze_towers()
    return model


def train_stage2(
    output_dir: Path,
    pretrained: Path,
    cache: Path,
    processor: Blip2Processor,
    settings: DemoSettings,
    seed: int,
    stage1_dir: Path | None,
    vqa_curve: VQACurve | None = None,
) -> list[dict]:
    """Stage 2 (plain LM loss on caption + "\n", no prompt) on the frozen-feature cache; saves a
    `Blip2ForConditionalGeneration` folder with its processor and returns the Trainer's log history. `vqa_curve`
    (optional) scores zero-shot VQA along the way."""
    torch.manual_seed(seed)
    model = stage2_model(pretrained, processor, settings, stage1_dir)
    processor = processor.without_qformer_tokenizer()
    collator = Stage2Collator(processor, max_length=32)
    return _train(
        Blip2Stage2Trainer, model, collator, processor, output_dir, settings.stage2_steps, cache, settings, seed,
        settings.stage2_learning_rate, [vqa_curve] if vqa_curve is not None else [],
    )  # fmt: skip


# =====================================================================================================================
# Evaluation
# =====================================================================================================================


@torch.inference_mode()
def generate(
    model: Blip2ForConditionalGeneration,
    processor: Blip2Processor,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    batch_size: int = 64,
    **generation: Any,
) -> list[str]:
    """The first line of what the model writes after each (image, prompt)."""
    model.eval()
    texts = []
    for start in range(0, len(images), batch_size):
        inputs = processor(
            images=list(images[start : start + batch_size]),
            text=list(prompts[start : start + batch_size]),
            padding=True,
            return_tensors="pt",
        ).to(model.device)
        ids = model.generate(**inputs, **generation)
        new = ids[:, inputs["input_ids"].shape[1] :]
        texts += [first_line(text) for text in processor.batch_decode(new, skip_special_tokens=True)]
    return texts


def evaluate_generation(
    model: Blip2ForConditionalGeneration, processor: Blip2Processor, test: Sequence[dict], images: Sequence[Image.Image],
    settings: DemoSettings,
) -> dict[str, Any]:  # fmt: skip
    """Captioning (CIDEr, BLEU-4 against every reference caption; exact match: the caption is one of them; what the
    captions say, attribute by attribute: `caption_content_accuracy`) and zero-shot VQA (every question of every test
    image, the LLM's prompt format; exact-match accuracy, overall and per question type)."""
    captions = generate(
        model, processor, images, [""] * len(images), num_beams=settings.caption_beams, max_new_tokens=30
    )
    references = [record["caption"] for record in test]
    scores = coco_caption_scores(captions, references, spice=False, meteor=False, tokenize=False)
    exact = [caption in refs for caption, refs in zip(captions, references)]
    right = [caption_is_right(caption, record["scene"]) for caption, record in zip(captions, test)]
    content = caption_content_accuracy(captions, [record["scene"] for record in test])

    questions, answers, vqa = zero_shot_vqa(model, processor, test, images)
    return {
        "CIDEr": 100 * scores["CIDEr"],
        "BLEU-4": 100 * scores["Bleu_4"],
        "caption_exact_match": 100 * sum(exact) / len(exact),
        "caption_wholly_right": 100 * sum(right) / len(right),
        **{f"caption_{name}": value for name, value in content.items()},
        "VQA": vqa["accuracy"],
        "VQA_per_type": vqa["per_question_type"],
        "captions": captions,
        "answers": {f"{index}|{qa['question']}": answer for (index, qa), answer in zip(questions, answers)},
    }


@torch.inference_mode()
def zero_shot_vqa(
    model: Blip2ForConditionalGeneration, processor: Blip2Processor, records: Sequence[dict],
    images: Sequence[Image.Image],
) -> tuple[list[tuple[int, dict]], list[str], dict[str, Any]]:  # fmt: skip
    """Every question of every record, the LLM's prompt format, greedy; returns `(questions as (image index, qa),
    answers, vqa_accuracy's scores)` (exact match, overall and per question type)."""
    questions = [(index, qa) for index, record in enumerate(records) for qa in record["questions"]]
    answers = generate(
        model,
        processor,
        [images[index] for index, _ in questions],
        [VQA_PROMPT.format(qa["question"]) for _, qa in questions],
        num_beams=1,
        max_new_tokens=5,
    )
    vqa = vqa_accuracy(
        answers, [qa["answer"] for _, qa in questions], mode="gqa", question_types=[qa["type"] for _, qa in questions]
    )
    return questions, answers, vqa


class VQACurve(TrainerCallback):
    """Zero-shot VQA on held-out images at `points` evenly spaced steps of stage 2 and at its end, as the paper's
    Figure 5 plots it along training (where OPT without stage 1 forgets); `curve` collects `{"step", "VQA"}`."""

    def __init__(
        self, processor: Blip2Processor, records: Sequence[dict], images: Sequence[Image.Image], steps: int,
        points: int,
    ) -> None:  # fmt: skip
        self.processor, self.records, self.images = processor, records, images
        self.every = max(1, steps // max(1, points))
        self.curve: list[dict[str, float]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            scores = zero_shot_vqa(model, self.processor, self.records, self.images)[2]
            model.train()  # generate() left it in eval mode; the frozen towers stay in eval (Blip2 `train`)
            self.curve.append({"step": state.global_step, "VQA": scores["accuracy"]})


@torch.inference_mode()
def evaluate_retrieval(
    stage1_dir: Path, processor: Blip2Processor, test: Sequence[dict], images: Sequence[Image.Image],
    settings: DemoSettings,
) -> dict[str, float]:  # fmt: skip
    """Image-text retrieval on the test split with the stage-1 model, as LAVIS: ITC over all pairs, ITM re-ranking of
    the top-k; every caption of every image (R@1: the top-1 is one of the image's captions / the caption's image)."""
    model = Blip2ForImageTextRetrieval.from_pretrained(stage1_dir).eval()
    pixel_values = processor(images=list(images), return_tensors="pt")["pixel_values"]
    texts = [caption for record in test for caption in record["caption"]]
    txt2img = [index for index, record in enumerate(test) for _ in record["caption"]]
    img2txt: list[list[int]] = [[] for _ in test]
    for text_index, image_index in enumerate(txt2img):
        img2txt[image_index].append(text_index)
    image_index = encode_images(model, pixel_values.split(64), progress=False)
    tokenizer = processor.qformer_tokenizer
    text_batches = [
        tokenizer(texts[start : start + 256], padding=True, truncation=True, max_length=35, return_tensors="pt")
        for start in range(0, len(texts), 256)
    ]
    text_index = encode_texts(model, text_batches, progress=False)
    itc = itc_similarity(image_index.image_feats, text_index.text_feats)
    score_i2t, score_t2i = itm_rerank(model, image_index, text_index, itc, k=settings.rerank_k, progress=False)
    recall = recall_at_k(score_i2t, score_t2i, img2txt, txt2img)
    itc_recall = recall_at_k(itc, itc.t(), img2txt, txt2img)
    return {
        "text_R@1": recall["txt_r1"],
        "image_R@1": recall["img_r1"],
        "text_R@1_itc_only": itc_recall["txt_r1"],
        "image_R@1_itc_only": itc_recall["img_r1"],
    }


# =====================================================================================================================
# The whole demo
# =====================================================================================================================


def summarize(per_seed: Sequence[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """`{arm: {metric: (mean, std)}}` over the seeds, and `{"stage1_without_itg": {retrieval metric: ...}}`."""
    summary = {}
    for arm in ARMS:
        metrics = (
            "CIDEr",
            "BLEU-4",
            "caption_exact_match",
            "caption_wholly_right",
            "VQA",
            *(f"caption_{a}" for a in CAPTION_ATTRIBUTES),
        )
        summary[arm] = {name: mean_std([run[arm][name] for run in per_seed]) for name in metrics}
    summary["stage1_without_itg"] = {}
    for name in ("text_R@1", "image_R@1", "text_R@1_itc_only", "image_R@1_itc_only"):
        summary["stage1+2"][name] = mean_std([run["retrieval"][name] for run in per_seed])
        summary["stage1_without_itg"][name] = mean_std([run["retrieval_without_itg"][name] for run in per_seed])
    return summary


# Every entry a demo run writes into its output folder; a folder holding anything else is not the demo's to clear.
DEMO_MARKER = ".blip2-hf-demo.json"
DEMO_CONTENTS = {"data", "pretrained", "feature_cache", "runs", "model", "retrieval_model", "plots", "results.json",
                 "report.md", DEMO_MARKER}  # fmt: skip


def prepare_output(output: Path) -> None:
    """Make `output` ready for a run: a new or empty folder is used as is; a folder a demo wrote (it holds
    `DEMO_MARKER` and nothing the demo does not write) is cleared, saying whether its run was complete or
    interrupted; anything else is refused with a `ValueError`, and nothing is deleted."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a folder")
    entries = sorted(output.iterdir()) if output.exists() else []
    marker = output / DEMO_MARKER
    if entries and not marker.is_file():
        raise ValueError(
            f"--output {output} is not empty and is not a blip2-hf demo folder (no {DEMO_MARKER}): refusing to write "
            "into it. Choose a new or empty folder."
        )
    if entries:
        foreign = [entry.name for entry in entries if entry.name not in DEMO_CONTENTS]
        if foreign:
            raise ValueError(
                f"--output {output} holds files the demo did not write ({', '.join(foreign[:5])}): refusing to clear "
                "it. Move them or choose another folder."
            )
        try:
            state = json.loads(marker.read_text())
        except json.JSONDecodeError:
            state = {}
        if state.get("status") == "complete":
            print(f"[demo] {output} holds a complete demo run ({state.get('finished')}): replacing it", flush=True)
        else:
            print(
                f"[demo] {output} holds an interrupted demo run (started {state.get('started', '?')}, never "
                "finished): starting clean",
                flush=True,
            )
        for entry in entries:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    output.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"status": "running", "started": time.strftime("%Y-%m-%d %H:%M:%S")}))


def run_demo(output: str | Path, seeds: int = 1, quick: bool = False) -> dict[str, Any]:
    """Run the demo into `output` and return the results (also written to `output/results.json`, with the report
    `output/report.md`, the plots in `output/plots/`, the checkpoints in `output/runs/seed*/` and, for the
    `caption` / `ask` / `retrieve` commands, `output/model` and `output/retrieval_model`)."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the Q-Formers are built on purpose from scratch: no "newly initialized" notes
    hf_logging.disable_progress_bar()  # no "Loading weights" bar per checkpoint; the training bars stay
    try:
        return _run_demo(Path(output), seeds, QUICK if quick else DemoSettings())
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class _Clock:
    """Wall time per phase of the demo, in order."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    def phase(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = now - self.start
        self.start = now


def run_seed(
    output: Path, seed: int, cache: Path, processor: Blip2Processor, settings: DemoSettings, test: Sequence[dict],
    test_images: Sequence[Image.Image], validation: tuple[Sequence[dict], Sequence[Image.Image]], clock: _Clock,
) -> tuple[dict[str, Any], dict[str, list[dict]]]:  # fmt: skip
    """One BLIP-2 seed: stage 1, both stage-2 arms (paper Figure 5; zero-shot VQA also along training, on the
    `validation` records and images), stage 1 without ITG (Table 6), each evaluated. Returns `(results, training
    logs)`."""
    pretrained, runs = output / "pretrained", output / "runs" / f"seed{seed}"
    stage2_processor = processor.without_qformer_tokenizer()
    results: dict[str, Any] = {"seed": seed}
    print(f"[demo] 4/5 seed {seed}: stage 1 (ITC + ITM + ITG), {settings.stage1_steps} steps", flush=True)
    logs = {"stage1": train_stage1(runs / "stage1", pretrained, cache, processor, settings, seed)}
    results["retrieval"] = evaluate_retrieval(runs / "stage1", processor, test, test_images, settings)
    clock.phase(f"seed {seed} stage 1 + retrieval")
    for arm, stage1_dir in (("stage1+2", runs / "stage1"), ("stage2_only", None)):
        folder = runs / ("stage2" if arm == "stage1+2" else "stage2_without_stage1")
        print(f"[demo]     seed {seed}: stage 2, {ARMS[arm]}, {settings.stage2_steps} steps", flush=True)
        curve = VQACurve(stage2_processor, *validation, settings.stage2_steps, settings.vqa_curve_points)
        logs[arm] = train_stage2(folder, pretrained, cache, processor, settings, seed, stage1_dir, curve)
        model = Blip2ForConditionalGeneration.from_pretrained(folder)
        results[arm] = evaluate_generation(model, stage2_processor, test, test_images, settings)
        results[arm]["VQA_curve"] = curve.curve
        clock.phase(f"seed {seed} {arm} + evaluation")
        print(
            f"[demo]     {ARMS[arm]}: VQA {results[arm]['VQA']:.1f}%, CIDEr {results[arm]['CIDEr']:.1f}, captions "
            f"wholly right {results[arm]['caption_wholly_right']:.1f}%",
            flush=True,
        )
    print(f"[demo]     seed {seed}: stage 1 without ITG (the paper's Table 6), {settings.stage1_steps} steps")
    without_itg = STAGE1_ABLATION["stage1_without_itg"]
    logs["stage1_without_itg"] = train_stage1(
        runs / "stage1_without_itg", pretrained, cache, processor, settings, seed, without_itg
    )
    results["retrieval_without_itg"] = evaluate_retrieval(
        runs / "stage1_without_itg", processor, test, test_images, settings
    )
    clock.phase(f"seed {seed} stage 1 without ITG + retrieval")
    for name, key in (("with ITG", "retrieval"), ("without ITG", "retrieval_without_itg")):
        r = results[key]
        print(f"[demo]     stage 1 {name}: retrieval R@1 text {r['text_R@1']:.1f}%, image {r['image_R@1']:.1f}%")
    return results, logs


def _run_demo(output: Path, seeds: int, settings: DemoSettings) -> dict[str, Any]:
    prepare_output(output)
    clock = _Clock()
    print(f"[demo] 1/5 synthetic world: {settings.num_train} training, {settings.num_test} test images", flush=True)
    world = build_world(output, settings)
    test = world["test"]
    test_images = load_images(output / "data" / "test", test)
    held_out = world["validation"][: settings.vqa_curve_images]
    validation = (held_out, load_images(output / "data" / "validation", held_out))
    clock.phase("world")

    print("[demo] 2/5 off-the-shelf towers, frozen: a ViT (scene tagging, no text) and an OPT-style LLM (text only)")
    pretrained = output / "pretrained"
    manifest = copy_towers(pretrained)  # checks each file against its sha256 first
    processor = demo_processor(pretrained, settings.num_query_tokens)
    processor.save_pretrained(pretrained / "processor")
    towers = {"curves": manifest["curves"], **manifest["quality"], "build": manifest["wall_time_s"],
              "build_threads": manifest["machine"]["cpu_threads"], "tower_threads": manifest.get("tower_threads", {})}  # fmt: skip
    clock.phase("towers (verify, load)")

    print("[demo] 3/5 frozen-feature cache: the frozen image encoder runs once over the training images")
    cache = output / "feature_cache"
    vision = Blip2VisionModel.from_pretrained(pretrained / "vision_encoder", dtype=torch.float32)
    build_feature_cache(
        vision, load_caption_json(output / "data" / "train" / "annotations.json"), processor, cache, batch_size=128,
        overwrite=True, progress=False,
    )  # fmt: skip
    clock.phase("feature cache")

    per_seed, curves = [], []
    for seed in range(seeds):
        results, logs = run_seed(output, seed, cache, processor, settings, test, test_images, validation, clock)
        per_seed.append(results)
        curves.append(logs)
    for subdir, source in ((CAPTION_MODEL_SUBDIR, "stage2"), (RETRIEVAL_MODEL_SUBDIR, "stage1")):
        shutil.rmtree(output / subdir, ignore_errors=True)
        shutil.copytree(output / "runs" / "seed0" / source, output / subdir)

    summary = summarize(per_seed)
    results = {
        "settings": dataclasses.asdict(settings),
        "seeds": seeds,
        "towers": {name: value for name, value in towers.items() if name != "curves"},
        "summary": {arm: {k: list(v) for k, v in metrics.items()} for arm, metrics in summary.items()},
        "per_seed": [
            {
                k: ({m: v for m, v in r.items() if m not in ("captions", "answers")} if isinstance(r, dict) else r)
                for k, r in run.items()
            }
            for run in per_seed
        ],  # fmt: skip
        "curves": curves,  # the Trainers' log histories, per seed
        "timings_s": clock.timings,
    }
    print("[demo] 5/5 plots and report", flush=True)
    write_report(output, results, world, test_images, per_seed, curves, towers)
    clock.phase("report")
    (output / "results.json").write_text(json.dumps(results, indent=1))
    (output / DEMO_MARKER).write_text(
        json.dumps({"status": "complete", "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    )
    return results
