"""The demo's "off-the-shelf" unimodal towers: built once with a real budget, shipped with the package, loaded by
`blip2-hf demo` as a user loads EVA-CLIP and OPT from the Hub.

BLIP-2 starts from strong frozen models that someone else trained. Trained inside the demo (a few minutes), the image
encoder carried colors but not shapes or sides, and no Q-Former can pass on what the encoder never saw. So the towers
are made here, by `blip2-hf demo --build-towers DIR` (about 33 minutes on 2 CPU cores), and the files in
`blip2_hf/demo/towers/` are that command's output:

- `vision_encoder/`: a `Blip2VisionModel` (ViT with a convolutional stem) trained by scene tagging, each patch token
  also tagged with the group it shows; no text;
- `language_model/`: an `OPTForCausalLM` trained on text alone (captions, then question/answer lines), with its
  tokenizer;
- `qformer_tokenizer/`: the BERT-style WordPiece tokenizer (with `[DEC]`) the Q-Former reads;
- `towers.json`: the command, seed, budget, wall times, versions, quality checks on the demo's world, and the sha256
  of every file, which `verify_towers` checks before the demo loads anything.

Both towers train on scenes drawn from their own generators (`seed`), never the demo world's images or texts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import OPTConfig

from ..configuration_blip2 import Blip2VisionConfig
from ..processing_blip2 import Blip2Processor
from ..tokenizer_training import train_bert_tokenizer, train_opt_tokenizer
from .pretrain import patch_groups, pretrain_image_encoder, pretrain_language_model, scene_documents
from .quality import quality_checks, text_only_vqa
from .world import IMAGE_SIZE, random_scene

TOWERS_DIR = Path(__file__).parent / "towers"
MANIFEST = "towers.json"
VISION_SUBDIR, LLM_SUBDIR, QFORMER_TOKENIZER_SUBDIR = "vision_encoder", "language_model", "qformer_tokenizer"


@dataclasses.dataclass(frozen=True)
class TowerBudget:
    """Architectures and budgets of the two towers. The default is what ships (about 33 minutes on 2 CPU cores, one
    tower after the other; `towers.json` records each one's time)."""

    vision_scenes: int = 30000  # the image pool (drawn once; 30000 x 12 kB as bytes)
    vision_width: int = 128
    vision_layers: int = 4
    conv_stem_channels: tuple[int, ...] = (32, 64, 96, 128)  # 4 stride-2 convolutions: 16 x 16 px patches
    vision_steps: int = 2000
    vision_batch_size: int = 128
    vision_learning_rate: float = 2e-3
    # each patch token also tagged with its own group (`pretrain.TokenTagger`): keeps the tokens local, so that a
    # group's attributes stay bound to it (benchmarks/README.md, "Training choices")
    vision_token_tagging: bool = True
    llm_scenes: int = 20000
    documents_per_scene: int = 3
    # Dense question documents and a long schedule: each reading skill (which group has which count, side, color,
    # shape) breaks out of chance on its own, after a plateau of thousands of steps (benchmarks/README.md).
    questions_per_document: tuple[int, int] = (6, 8)
    questions_always_asked: tuple[str, ...] = ()  # types asked in every document (("shape",) measured worse)
    llm_width: int = 128
    llm_layers: int = 4
    llm_max_positions: int = 256  # a document of two captions and eight questions is up to ~140 tokens
    llm_steps: int = 8000
    llm_batch_size: int = 32
    llm_learning_rate: float = 2e-3


def _scene_rng(seed: int, tower: str) -> random.Random:
    # string seeds: disjoint from the demo world's generators (integers) and from each other
    return random.Random(f"blip2-hf towers {tower} {seed}")


def text_corpus(seed: int, num_scenes: int = 4000) -> list[str]:
    """Captions and question/answer lines of fresh scenes: what the tokenizers are trained on (the world's grammar
    is closed, so a few thousand scenes name every word)."""
    rng = _scene_rng(seed, "tokenizers")
    scenes = [random_scene(rng) for _ in range(num_scenes)]
    corpus = [caption for scene in scenes for caption in scene.captions()]
    return corpus + [
        f"Question: {qa['question']} Short answer: {qa['answer']}" for s in scenes for qa in s.questions()
    ]


def _normalizer(image_processor: Any) -> Any:
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    return lambda pixels: (pixels.float() / 255 - mean) / std


def _train_vision(folder: Path, budget: TowerBudget, seed: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    rng = _scene_rng(seed, "vision")
    scenes = [random_scene(rng) for _ in range(budget.vision_scenes)]
    pixels = torch.from_numpy(np.stack([np.asarray(scene.draw()) for scene in scenes])).permute(0, 3, 1, 2)
    config = Blip2VisionConfig(
        hidden_size=budget.vision_width,
        intermediate_size=4 * budget.vision_width,
        num_hidden_layers=budget.vision_layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=2 ** len(budget.conv_stem_channels),
        conv_stem_channels=list(budget.conv_stem_channels),
        initializer_range=0.02,
    )
    patches = None
    if budget.vision_token_tagging:
        patches = torch.stack([patch_groups(scene.group_mask(), config.patch_size) for scene in scenes])
    curve: list[dict] = []
    vision = pretrain_image_encoder(
        config,
        pixels,
        [[dataclasses.asdict(group) for group in scene.groups] for scene in scenes],
        _normalizer(Blip2Processor.default_image_processor(IMAGE_SIZE)),
        steps=budget.vision_steps,
        batch_size=budget.vision_batch_size,
        learning_rate=budget.vision_learning_rate,
        seed=seed,
        log=curve.append,
        patches=patches,
    )
    vision.save_pretrained(folder / VISION_SUBDIR)
    return _record_tower(folder / VISION_SUBDIR, budget, seed, curve, time.perf_counter() - start)


def _train_language_model(folder: Path, budget: TowerBudget, seed: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    # through the processor, which adds the "<image>" placeholder: the LLM's vocabulary must hold it
    tokenizer = Blip2Processor(
        image_processor=Blip2Processor.default_image_processor(IMAGE_SIZE),
        tokenizer=train_opt_tokenizer(text_corpus(seed) + ["\n"], 400),
    ).tokenizer
    rng = _scene_rng(seed, "language")
    scenes = [random_scene(rng) for _ in range(budget.llm_scenes)]
    documents = scene_documents(
        [scene.captions() for scene in scenes], [scene.questions() for scene in scenes],
        per_scene=budget.documents_per_scene, seed=seed, questions_per_document=budget.questions_per_document,
        always_asked=budget.questions_always_asked,
    )  # fmt: skip
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=budget.llm_width,
        word_embed_proj_dim=budget.llm_width,
        ffn_dim=4 * budget.llm_width,
        num_hidden_layers=budget.llm_layers,
        num_attention_heads=4,
        max_position_embeddings=budget.llm_max_positions,
        dropout=0.0,
        # Untied: with tied embeddings the colors' input embeddings stayed nearly equal (a caption's first color is
        # unpredictable, so the output side pushes them together) and the model read colors from its context late.
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    curve: list[dict] = []
    monitor_rng = _scene_rng(seed, "language monitor")
    monitor_scenes = [random_scene(monitor_rng) for _ in range(100)]
    monitor_records = [{"caption": s.captions(), "questions": s.questions()} for s in monitor_scenes]
    llm = pretrain_language_model(
        config, documents, tokenizer, steps=budget.llm_steps, batch_size=budget.llm_batch_size,
        learning_rate=budget.llm_learning_rate, seed=seed, log=curve.append, monitor_every=1000,
        monitor=lambda model: text_only_vqa(model, tokenizer, monitor_records, per_type=True),
    )  # fmt: skip
    llm.save_pretrained(folder / LLM_SUBDIR)
    tokenizer.save_pretrained(folder / LLM_SUBDIR)
    return _record_tower(folder / LLM_SUBDIR, budget, seed, curve, time.perf_counter() - start)


def file_hashes(folder: Path) -> dict[str, str]:
    """`{relative path: sha256}` of every file under `folder` but the manifest."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


TOWER_RECORD = "training.json"


def _tower_budget(folder: Path, budget: TowerBudget) -> dict[str, Any]:
    """The part of the budget that a tower's training reads (the other tower's may change without retraining it)."""
    fields = dataclasses.asdict(budget)
    if folder.name == VISION_SUBDIR:
        return {name: value for name, value in fields.items() if name.startswith(("vision_", "conv_stem"))}
    return {name: value for name, value in fields.items() if not name.startswith(("vision_", "conv_stem"))}


def _record_tower(folder: Path, budget: TowerBudget, seed: int, curve: list[dict], seconds: float) -> dict[str, Any]:
    """Written last, once the tower's files are saved: a tower folder without it is incomplete."""
    record = {
        "budget": _tower_budget(folder, budget), "seed": seed, "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(), "curve": curve,
    }  # fmt: skip
    (folder / TOWER_RECORD).write_text(json.dumps(record))
    return record


def _finished_tower(folder: Path, budget: TowerBudget, seed: int) -> dict[str, Any] | None:
    """The record of a tower an earlier, interrupted build finished with the same budget and seed; None if there is
    none (an incomplete tower folder is trained again from scratch)."""
    path = folder / TOWER_RECORD
    if not path.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        return None
    record = json.loads(path.read_text())
    # compared as JSON reads it back (tuples become lists)
    if record["budget"] != json.loads(json.dumps(_tower_budget(folder, budget))) or record["seed"] != seed:
        raise FileExistsError(f"{folder} was trained with another budget or seed: build into a new folder")
    return record


def build_towers(output: str | Path, budget: TowerBudget = TowerBudget(), seed: int = 0) -> dict[str, Any]:
    """Train the two towers one after the other (each on every core), save them with the Q-Former tokenizer into
    `output`, score them on the demo's world (`quality_checks`) and write `output/towers.json`. Returns the manifest.

    A build that was interrupted resumes: a tower whose folder holds its `training.json` (same budget and seed) is
    kept, an incomplete one is trained again. A finished build (`towers.json` present) is never overwritten."""
    output = Path(output)
    if (output / MANIFEST).exists() or (output.exists() and not (output / QFORMER_TOKENIZER_SUBDIR).is_dir()
                                        and any(output.iterdir())):  # fmt: skip
        raise FileExistsError(f"{output} is not empty: the towers are built into a new folder")
    output.mkdir(parents=True, exist_ok=True)
    train_bert_tokenizer(text_corpus(seed), 200).save_pretrained(output / QFORMER_TOKENIZER_SUBDIR)
    runs = {name: _finished_tower(output / name, budget, seed) for name in (VISION_SUBDIR, LLM_SUBDIR)}
    for name, record in runs.items():
        if record is not None:
            print(f"towers: {output / name} was finished by an earlier build ({record['seconds']:.0f} s): kept")
    start, threads = time.perf_counter(), torch.get_num_threads()
    # one after the other on every core: the language model's schedule is the longer by far, and one thread each
    # side by side would leave a core idle once the image encoder is done
    for name, train in ((VISION_SUBDIR, _train_vision), (LLM_SUBDIR, _train_language_model)):
        if runs[name] is None:
            runs[name] = train(output, budget, seed, threads)
    torch.set_num_threads(threads)
    manifest = {
        # the thread count changes the floating-point sums, so a build is reproduced with the same one
        "command": f"OMP_NUM_THREADS={threads} blip2-hf demo --build-towers {output.name}",
        "seed": seed,
        "budget": dataclasses.asdict(budget),
        "wall_time_s": {
            "training_this_run": round(time.perf_counter() - start, 1),
            "total_training": round(sum(run["seconds"] for run in runs.values()), 1),
            **{name: run["seconds"] for name, run in runs.items()},
        },
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
        # a resumed build keeps a tower an earlier run trained, possibly on another thread count
        "tower_threads": {name: run["threads"] for name, run in runs.items()},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__},
        "quality": quality_checks(output),
        "curves": {name: run["curve"] for name, run in runs.items()},
        "files": file_hashes(output),
    }  # fmt: skip
    (output / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return verify_towers(output)  # as a later reader sees it (tuples read back as lists)


class TowersError(ValueError):
    """The shipped towers are missing, altered or incomplete."""


def verify_towers(folder: str | Path = TOWERS_DIR) -> dict[str, Any]:
    """Check every file `folder/towers.json` lists against its sha256 (and that no weight file is unlisted); return
    the manifest. Raises `TowersError` naming the first missing or altered file."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise TowersError(
            f"{manifest_path} is missing: not a towers folder (build one with blip2-hf demo --build-towers)"
        )
    manifest = json.loads(manifest_path.read_text())
    actual = file_hashes(folder)
    for name, expected in manifest["files"].items():
        if name not in actual:
            raise TowersError(f"{folder / name} is missing (listed in {manifest_path})")
        if actual[name] != expected:
            raise TowersError(
                f"{folder / name} does not match its sha256 in {manifest_path}: {actual[name]} != {expected}"
            )
    unlisted = sorted(name for name in actual if name not in manifest["files"] and name.endswith(".safetensors"))
    if unlisted:
        raise TowersError(f"{folder}: weights not listed in {MANIFEST}: {unlisted}")
    return manifest


def copy_towers(destination: Path, folder: str | Path = TOWERS_DIR) -> dict[str, Any]:
    """Verify the towers in `folder` and copy them to `destination` (the demo's `pretrained/`). Returns the manifest."""
    manifest = verify_towers(folder)
    shutil.rmtree(destination, ignore_errors=True)
    shutil.copytree(folder, destination)
    return manifest


def demo_processor(towers: Path, num_query_tokens: int) -> Blip2Processor:
    """The stage-1 processor on the shipped tokenizers: 64 x 64 images, the LLM's BPE, the Q-Former's WordPiece."""
    return Blip2Processor(
        image_processor=Blip2Processor.default_image_processor(IMAGE_SIZE),
        tokenizer=transformers.AutoTokenizer.from_pretrained(towers / LLM_SUBDIR),
        qformer_tokenizer=transformers.AutoTokenizer.from_pretrained(towers / QFORMER_TOKENIZER_SUBDIR),
        num_query_tokens=num_query_tokens,
    )
