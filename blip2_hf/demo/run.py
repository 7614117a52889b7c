"""The demo, top to bottom: world -> unimodal towers -> (per seed) stage 1, stage 2, stage 2 without stage 1 ->
evaluation -> results table, plots, report. `blip2-hf demo` calls `run_demo`.

Everything BLIP-2 goes through the package's own code paths: `Blip2ForPreTraining` + `Blip2Stage1Trainer` +
`Stage1Collator`, `Blip2ForConditionalGeneration.init_from_stage1` + `Blip2Stage2Trainer` + `Stage2Collator`, the
frozen-feature cache, `generate`, `blip2_hf.metrics` and `blip2_hf.retrieval`. Only the unimodal pretraining (which
BLIP-2 takes as given) is the demo's own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import OPTConfig, OPTForCausalLM
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
from ..processing_blip2 import Blip2HFProcessor as Blip2Processor
from ..retrieval import encode_images, encode_texts, itc_similarity, itm_rerank, recall_at_k
from ..testing_utils import make_bert_tokenizer, make_opt_tokenizer
from ..trainer import Blip2Stage1Trainer, Blip2Stage2Trainer, Blip2TrainingArguments
from . import ARMS, CAPTION_MODEL_SUBDIR, RETRIEVAL_MODEL_SUBDIR, VQA_PROMPT
from .pretrain import pretrain_language_model, pretrain_vision_encoder, scene_documents
from .probe import probe_image_encoder
from .report import write_report
from .world import CAPTION_ATTRIBUTES, IMAGE_SIZE, caption_content_accuracy, make_world, write_split

logger = logging.getLogger("blip2_hf.demo")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes and budgets. The default fits the 10-minute budget on 2 CPU cores; `QUICK` the 2-minute one."""

    num_train: int = 4000
    num_validation: int = 100
    num_test: int = 200
    # the frozen towers
    vision_width: int = 96
    vision_layers: int = 4
    vision_steps: int = 250
    vision_batch_size: int = 128
    llm_width: int = 64
    llm_layers: int = 3
    llm_steps: int = 3000
    llm_batch_size: int = 32
    documents_per_scene: int = 4
    # BLIP-2
    qformer_width: int = 96
    qformer_layers: int = 4
    num_query_tokens: int = 16
    stage1_steps: int = 500
    stage2_steps: int = 400
    batch_size: int = 32
    # Q-Former dropout (LAVIS: 0.1 in both stages). Stage 1 runs without: at this scale and budget, dropout 0.1 kept
    # ITM at its prior (loss 0.635, the entropy of one positive in three rows) and retrieval R@1 at 12.7 / 12.2%;
    # without it ITM learns (~0.59), R@1 is 31.3 / 25.3% and stage 1 takes 122-136 s, not 185-216 s (3 seeds each).
    # Stage 2 keeps LAVIS's 0.1: without it both arms' answers collapsed into caption words (VQA 39.7 / 33.6%).
    stage1_dropout: float = 0.0
    stage2_dropout: float = 0.1
    learning_rate: float = 1e-3
    # evaluation
    caption_beams: int = 3
    rerank_k: int = 16


QUICK = DemoSettings(
    num_train=1200,
    num_validation=40,
    num_test=60,
    vision_steps=80,
    llm_steps=400,
    documents_per_scene=2,
    stage1_steps=60,
    stage2_steps=60,
    batch_size=32,
    num_query_tokens=8,
)


def _trainer_args(output_dir: Path, steps: int, settings: DemoSettings, seed: int) -> Blip2TrainingArguments:
    return Blip2TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        min_learning_rate=settings.learning_rate / 10,
        warmup_steps=max(1, steps // 10),
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        seed=seed,
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


def build_processor(records: Sequence[dict], settings: DemoSettings) -> Blip2Processor:
    """Tokenizers trained on the training text (the captions and the question/answer lines): the Q-Former's BERT
    WordPiece (+ `[DEC]`) and an OPT-style byte-level BPE whose words are single tokens."""
    corpus = [caption for record in records for caption in record["caption"]]
    corpus += [f"Question: {qa['question']} Short answer: {qa['answer']}" for r in records for qa in r["questions"]]
    return Blip2Processor(
        image_processor=Blip2Processor.default_image_processor(IMAGE_SIZE),
        tokenizer=make_opt_tokenizer(400, corpus + ["\n"]),
        qformer_tokenizer=make_bert_tokenizer(200, corpus),
        num_query_tokens=settings.num_query_tokens,
    )


def load_images(folder: Path, records: Sequence[dict]) -> list[Image.Image]:
    return [Image.open(folder / record["image"]).convert("RGB") for record in records]


def pretrain_towers(
    output: Path, world: dict, processor: Blip2Processor, settings: DemoSettings, test_images: Sequence[Image.Image]
) -> dict[str, Any]:
    """Train and save the frozen image encoder (`pretrained/vision_encoder`) and LLM (`pretrained/language_model`);
    returns their loss curves and quality checks. `test_images` (the test split's) score the image encoder's linear
    probe."""
    train, validation = world["train"], world["validation"]
    data = output / "data"
    pixel_values = processor(images=load_images(data / "train", train), return_tensors="pt")["pixel_values"]
    val_pixels = processor(images=load_images(data / "validation", validation), return_tensors="pt")["pixel_values"]
    vision_config = Blip2VisionConfig(
        hidden_size=settings.vision_width,
        intermediate_size=4 * settings.vision_width,
        num_hidden_layers=settings.vision_layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
        initializer_range=0.02,
    )
    vision_curve: list[dict] = []
    vision, vision_metrics = pretrain_vision_encoder(
        vision_config,
        pixel_values,
        [record["caption"] for record in train],
        [json.dumps(record["scene"], sort_keys=True) for record in train],
        processor.qformer_tokenizer,
        steps=settings.vision_steps,
        batch_size=settings.vision_batch_size,
        log=vision_curve.append,
        validation=(val_pixels, [record["caption"][0] for record in validation]),
    )
    vision.save_pretrained(output / "pretrained" / "vision_encoder")
    logger.warning(
        f"image encoder: contrastive zero-shot retrieval on validation, R@1 image->text "
        f"{vision_metrics['val_i2t_r1']:.1f}%, text->image {vision_metrics['val_t2i_r1']:.1f}%"
    )
    # What BLIP-2 can pass on at all: each attribute read from the frozen features by a linear probe (the report's
    # table). An attribute the probe cannot read is out of reach of both arms of the ablation.
    test_pixels = processor(images=list(test_images), return_tensors="pt")["pixel_values"]
    vision_metrics["probe"] = probe_image_encoder(
        vision, pixel_values, [r["scene"] for r in train], test_pixels, [r["scene"] for r in world["test"]]
    )
    logger.warning(
        "image encoder, linear probe on test images (accuracy / majority rate, %): "
        + ", ".join(f"{name} {m['accuracy']:.0f}/{m['majority']:.0f}" for name, m in vision_metrics["probe"].items())
    )

    tokenizer = processor.tokenizer
    llm_config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.llm_width,
        word_embed_proj_dim=settings.llm_width,
        ffn_dim=4 * settings.llm_width,
        num_hidden_layers=settings.llm_layers,
        num_attention_heads=4,
        max_position_embeddings=128,
        dropout=0.0,
        # Untied: with tied embeddings the colors' input embeddings stay nearly equal (a caption's first color is
        # unpredictable, so the output side pushes them together) and the model did not learn to read a color from
        # the context within the budget (18% vs 44% color answers after 1500 steps, measured).
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    documents = scene_documents(
        [record["caption"] for record in train],
        [record["questions"] for record in train],
        per_scene=settings.documents_per_scene,
    )
    llm_curve: list[dict] = []
    llm = pretrain_language_model(
        llm_config, documents, tokenizer, steps=settings.llm_steps, batch_size=settings.llm_batch_size,
        log=llm_curve.append,
    )  # fmt: skip
    llm.save_pretrained(output / "pretrained" / "language_model")
    tokenizer.save_pretrained(output / "pretrained" / "language_model")
    llm_metrics = text_only_vqa(llm, tokenizer, world["test"])
    logger.warning(
        f"language model, text only, on test questions: {llm_metrics['with_caption']:.1f}% reading the ground-truth "
        f"caption first, {llm_metrics['without_context']:.1f}% from the question alone"
    )
    return {"vision_curve": vision_curve, "vision": vision_metrics, "llm_curve": llm_curve, "llm": llm_metrics}


@torch.inference_mode()
def text_only_vqa(llm: OPTForCausalLM, tokenizer: Any, test: Sequence[dict], batch_size: int = 128) -> dict:
    """The LLM alone on the test questions: after the image's first ground-truth caption (what the image tells,
    as text: the ceiling for zero-shot VQA through it) and from the question alone (its prior: the floor)."""
    questions = [(record, qa) for record in test for qa in record["questions"]]
    newline = tokenizer("\n", add_special_tokens=False).input_ids[0]
    result = {}
    contexts = {"with_caption": lambda r: r["caption"][0] + "\n", "without_context": lambda r: ""}
    for name, context in contexts.items():
        prompts = [context(record) + VQA_PROMPT.format(qa["question"]) for record, qa in questions]
        answers = []
        for start in range(0, len(prompts), batch_size):
            inputs = tokenizer(
                prompts[start : start + batch_size], padding=True, padding_side="left", return_tensors="pt"
            )
            ids = llm.generate(
                **inputs, max_new_tokens=4, do_sample=False, eos_token_id=[newline, tokenizer.eos_token_id],
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            answers += [_first_line(text) for text in tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1] :])]
        references = [qa["answer"] for _, qa in questions]
        result[name] = vqa_accuracy(answers, references, mode="gqa")["accuracy"]
    return result


def _first_line(text: str) -> str:
    return text.replace("</s>", "\n").replace("<pad>", "").split("\n")[0].strip()


# =====================================================================================================================
# BLIP-2: stage 1, stage 2, the ablation
# =====================================================================================================================


def stage1_config(vision_config: Blip2VisionConfig, qformer_tokenizer: Any, settings: DemoSettings) -> Blip2Config:
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
    )


def _train(trainer_class: type, model: Any, collator: Any, processor: Blip2Processor, output_dir: Path,
           steps: int, cache: Path, settings: DemoSettings, seed: int) -> list[dict]:  # fmt: skip
    """Train on the frozen-feature cache, save the model and its processor in `output_dir`, return the log history."""
    trainer = trainer_class(
        model=model,
        args=_trainer_args(output_dir, steps, settings, seed),
        train_dataset=load_feature_cache(cache),
        data_collator=collator,
    )
    trainer.train()
    trainer.save_model(str(output_dir))
    processor.save_pretrained(output_dir)
    return trainer.state.log_history


def train_stage1(
    output_dir: Path, pretrained: Path, cache: Path, processor: Blip2Processor, settings: DemoSettings, seed: int
) -> list[dict]:
    """Stage 1 from a random Q-Former (there is no BERT in this world) against the frozen image encoder; saves a
    `Blip2ForPreTraining` folder and returns the Trainer's log history."""
    torch.manual_seed(seed)
    vision = Blip2VisionModel.from_pretrained(pretrained / "vision_encoder")
    model = Blip2ForPreTraining(stage1_config(vision.config, processor.qformer_tokenizer, settings))
    model.vision_model.load_state_dict(vision.state_dict())
    collator = Stage1Collator(processor, max_length=32)
    return _train(
        Blip2Stage1Trainer, model, collator, processor, output_dir, settings.stage1_steps, cache, settings, seed
    )


def stage2_model(
    pretrained: Path, processor: Blip2Processor, settings: DemoSettings, stage1_dir: Path | None
) -> Blip2ForConditionalGeneration:
    """The frozen image encoder and LLM bridged by a Q-Former: from stage 1 (`stage1_dir`), or fresh (the ablation:
    query tokens and Q-Former randomly initialized, the same towers)."""
    vision_config = Blip2VisionConfig.from_pretrained(pretrained / "vision_encoder")
    llm = OPTForCausalLM.from_pretrained(pretrained / "language_model")
    qformer_config = stage1_config(vision_config, processor.qformer_tokenizer, settings).qformer_config.to_dict()
    qformer_config["use_qformer_text_input"] = False  # stage 2 runs no text through the Q-Former (LAVIS drops it)
    qformer_config["hidden_dropout_prob"] = qformer_config["attention_probs_dropout_prob"] = settings.stage2_dropout
    config = Blip2Config(
        vision_config=vision_config.to_dict(),
        qformer_config=qformer_config,
        text_config=llm.config.to_dict(),
        num_query_tokens=settings.num_query_tokens,
        image_token_index=processor.image_token_id,
    )
    model = Blip2ForConditionalGeneration(config)
    model.language_model = llm
    if stage1_dir is not None:  # the image encoder (with stage 1's trained post_layernorm), queries, Q-Former
        model.init_from_stage1(stage1_dir)
    else:
        model.vision_model = Blip2VisionModel.from_pretrained(pretrained / "vision_encoder")
    # LAVIS trains OPT to end a caption with "\n" and stops generating there
    newline = processor.tokenizer("\n", add_special_tokens=False).input_ids[0]
    model.generation_config.eos_token_id = [llm.config.eos_token_id, newline]
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.freeze_vision_encoder()
    model.freeze_language_model()
    return model


def train_stage2(
    output_dir: Path,
    pretrained: Path,
    cache: Path,
    processor: Blip2Processor,
    settings: DemoSettings,
    seed: int,
    stage1_dir: Path | None,
) -> list[dict]:
    """Stage 2 (plain LM loss on caption + "\n", no prompt) on the frozen-feature cache; saves a
    `Blip2ForConditionalGeneration` folder with its processor and returns the Trainer's log history."""
    torch.manual_seed(seed)
    model = stage2_model(pretrained, processor, settings, stage1_dir)
    processor = processor.without_qformer_tokenizer()
    collator = Stage2Collator(processor, max_length=32)
    return _train(
        Blip2Stage2Trainer, model, collator, processor, output_dir, settings.stage2_steps, cache, settings, seed
    )


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
        texts += [_first_line(text) for text in processor.batch_decode(new, skip_special_tokens=True)]
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
    content = caption_content_accuracy(captions, [record["scene"] for record in test])

    questions = [(index, qa) for index, record in enumerate(test) for qa in record["questions"]]
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
    return {
        "CIDEr": 100 * scores["CIDEr"],
        "BLEU-4": 100 * scores["Bleu_4"],
        "caption_exact_match": 100 * sum(exact) / len(exact),
        **{f"caption_{name}": value for name, value in content.items()},
        "VQA": vqa["accuracy"],
        "VQA_per_type": vqa["per_question_type"],
        "captions": captions,
        "answers": {f"{index}|{qa['question']}": answer for (index, qa), answer in zip(questions, answers)},
    }


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


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(per_seed: Sequence[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """`{arm: {metric: (mean, std)}}` over the seeds."""
    summary = {}
    for arm in ARMS:
        metrics = ("CIDEr", "BLEU-4", "caption_exact_match", "VQA", *(f"caption_{a}" for a in CAPTION_ATTRIBUTES))
        summary[arm] = {name: _mean_std([run[arm][name] for run in per_seed]) for name in metrics}
    for name in ("text_R@1", "image_R@1"):
        summary["stage1+2"][name] = _mean_std([run["retrieval"][name] for run in per_seed])
    return summary


def run_demo(output: str | Path, seeds: int = 1, quick: bool = False) -> dict[str, Any]:
    """Run the demo into `output` and return the results (also written to `output/results.json`, with the report
    `output/report.md`, the plots in `output/plots/`, the checkpoints in `output/runs/seed*/` and, for the
    `caption` / `ask` / `retrieve` commands, `output/model` and `output/retrieval_model`)."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the towers are built on purpose from scratch: no "newly initialized" notes
    hf_logging.disable_progress_bar()  # no "Loading weights" bar per checkpoint; the training bars stay
    try:
        return _run_demo(Path(output), seeds, QUICK if quick else DemoSettings())
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _run_demo(output: Path, seeds: int, settings: DemoSettings) -> dict[str, Any]:
    output.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal start
        now = time.perf_counter()
        timings[name] = now - start
        start = now

    print(f"[demo] 1/5 synthetic world: {settings.num_train} training, {settings.num_test} test images", flush=True)
    world = build_world(output, settings)
    processor = build_processor(world["train"], settings)
    pretrained = output / "pretrained"
    processor.save_pretrained(pretrained / "processor")
    phase("world")

    print("[demo] 2/5 off-the-shelf towers: a ViT (contrastive, no language model), an OPT-style LLM (text only)")
    test = world["test"]
    test_images = load_images(output / "data" / "test", test)  # for the encoder probe and the evaluations
    towers = pretrain_towers(output, world, processor, settings, test_images)
    phase("unimodal pretraining")

    print("[demo] 3/5 frozen-feature cache: the frozen image encoder runs once over the training images")
    cache = output / "feature_cache"
    vision = Blip2VisionModel.from_pretrained(pretrained / "vision_encoder")
    build_feature_cache(
        vision, load_caption_json(output / "data" / "train" / "annotations.json"), processor, cache, batch_size=128,
        overwrite=True, progress=False,
    )  # fmt: skip
    phase("feature cache")

    stage2_processor = processor.without_qformer_tokenizer()
    per_seed, curves = [], []
    for seed in range(seeds):
        runs = output / "runs" / f"seed{seed}"
        print(f"[demo] 4/5 seed {seed}: stage 1 (ITC + ITM + ITG), {settings.stage1_steps} steps", flush=True)
        stage1_log = train_stage1(runs / "stage1", pretrained, cache, processor, settings, seed)
        phase(f"seed {seed} stage 1")
        logs = {"stage1": stage1_log}
        results = {"seed": seed}
        for arm, stage1_dir in (("stage1+2", runs / "stage1"), ("stage2_only", None)):
            folder = runs / ("stage2" if arm == "stage1+2" else "stage2_without_stage1")
            print(f"[demo]     seed {seed}: stage 2, {ARMS[arm]}, {settings.stage2_steps} steps", flush=True)
            logs[arm] = train_stage2(folder, pretrained, cache, processor, settings, seed, stage1_dir)
            model = Blip2ForConditionalGeneration.from_pretrained(folder)
            results[arm] = evaluate_generation(model, stage2_processor, test, test_images, settings)
            phase(f"seed {seed} {arm}")
            print(
                f"[demo]     {ARMS[arm]}: VQA {results[arm]['VQA']:.1f}%, CIDEr {results[arm]['CIDEr']:.1f}, "
                f"captions exactly right {results[arm]['caption_exact_match']:.1f}%",
                flush=True,
            )
        results["retrieval"] = evaluate_retrieval(runs / "stage1", processor, test, test_images, settings)
        print(
            f"[demo]     stage-1 retrieval R@1: text {results['retrieval']['text_R@1']:.1f}%, image "
            f"{results['retrieval']['image_R@1']:.1f}%",
            flush=True,
        )
        phase(f"seed {seed} retrieval")
        per_seed.append(results)
        curves.append(logs)

    for subdir, source in ((CAPTION_MODEL_SUBDIR, "stage2"), (RETRIEVAL_MODEL_SUBDIR, "stage1")):
        shutil.rmtree(output / subdir, ignore_errors=True)
        shutil.copytree(output / "runs" / "seed0" / source, output / subdir)

    summary = summarize(per_seed)
    results = {
        "settings": dataclasses.asdict(settings),
        "seeds": seeds,
        "towers": {"vision": towers["vision"], "llm": towers["llm"]},
        "summary": {arm: {k: list(v) for k, v in metrics.items()} for arm, metrics in summary.items()},
        "per_seed": [
            {
                k: ({m: v for m, v in r.items() if m not in ("captions", "answers")} if isinstance(r, dict) else r)
                for k, r in run.items()
            }
            for run in per_seed
        ],  # fmt: skip
        "curves": curves,  # the Trainers' log histories, per seed: stage1, stage1+2, stage2_only
        "timings_s": timings,
    }
    (output / "results.json").write_text(json.dumps(results, indent=1))
    print("[demo] 5/5 plots and report", flush=True)
    write_report(output, results, world, test_images, per_seed, curves, towers)
    phase("report")
    results["timings_s"] = timings
    (output / "results.json").write_text(json.dumps(results, indent=1))
    return results
