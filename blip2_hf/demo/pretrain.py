"""The demo's "off-the-shelf" unimodal models, pretrained on the spot and then frozen, as BLIP-2 assumes them:

- an image encoder (`Blip2VisionModel`, a small ViT with a convolutional stem) trained without any language model:
  supervised tagging of what each scene shows (shapes, colors, sizes, counts, sides), as the ImageNet-trained ViTs
  BLIP-1 started from; the tagging heads are thrown away;
- an OPT-style language model (`OPTForCausalLM`) trained on text alone: short "documents" about training scenes,
  one or two captions, then question/answer pairs about them. It learns what captions and answers look like and to
  answer from the text before a question; it never sees an image.

Neither model knows the other: connecting them is BLIP-2's job.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerBase

from ..configuration_blip2 import Blip2VisionConfig
from ..modeling_blip2 import Blip2VisionModel
from .world import COLORS, SHAPES, SIZES


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimize(
    parameters: list[nn.Parameter],
    loss_at: Callable[[], torch.Tensor],
    steps: int,
    learning_rate: float,
    description: str,
    log: Callable[[dict], None] | None,
    after_step: Callable[[int], None] | None = None,
) -> float:
    """AdamW (betas 0.9/0.98, weight decay 0.05, gradients clipped at 1) with a linear warmup over the first tenth,
    then cosine to a tenth of `learning_rate`; `loss_at()` draws a batch and returns its loss. Returns the last loss."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.05, betas=(0.9, 0.98))
    for step in (bar := tqdm(range(steps), desc=description, leave=False)):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, steps, learning_rate, warmup=max(1, steps // 10))
        loss = loss_at()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if log is not None:
                log({"step": step, "loss": loss.item()})
        if after_step is not None:
            after_step(step)
    return loss.item()


def scene_tags(groups: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a scene shows (its groups as `asdict(Group)`), as the image encoder's tagging targets: `present [3]`
    (each shape), `colors [6]` (each color), and per shape its group's `(color, size, count - 1, side)` class indices
    `[3, 4]` (side: 0 left, 1 right, 2 neither), -100 where the shape is absent."""
    present, colors = torch.zeros(len(SHAPES)), torch.zeros(len(COLORS))
    attributes = torch.full((len(SHAPES), 4), -100, dtype=torch.long)
    for group in groups:
        shape, color = SHAPES.index(group["shape"]), list(COLORS).index(group["color"])
        present[shape], colors[color] = 1.0, 1.0
        side = {"left": 0, "right": 1, None: 2}[group["side"]]
        attributes[shape] = torch.tensor([color, list(SIZES).index(group["size"]), group["count"] - 1, side])
    return present, colors, attributes


class SceneTagger(nn.Module):
    """Linear heads on the mean of the encoder's output tokens: is there a circle / square / triangle, is there
    something red / ..., and per shape its group's color, size, count and side. Thrown away after pretraining."""

    CLASSES = {"color": len(COLORS), "size": len(SIZES), "count": 3, "side": 3}

    def __init__(self, width: int):
        super().__init__()
        self.present = nn.Linear(width, len(SHAPES))
        self.colors = nn.Linear(width, len(COLORS))
        self.attributes = nn.ModuleDict({name: nn.Linear(width, len(SHAPES) * k) for name, k in self.CLASSES.items()})

    def loss(self, pooled: torch.Tensor, present: torch.Tensor, colors: torch.Tensor, attributes: torch.Tensor):
        """`pooled [B, D]`; targets as `scene_tags` stacks them. Sum of the binary and per-attribute losses."""
        loss = F.binary_cross_entropy_with_logits(self.present(pooled), present)
        loss = loss + F.binary_cross_entropy_with_logits(self.colors(pooled), colors)
        for index, (name, classes) in enumerate(self.CLASSES.items()):
            logits = self.attributes[name](pooled).view(-1, classes)  # [B * 3 shapes, classes]
            loss = loss + F.cross_entropy(logits, attributes[:, :, index].reshape(-1), ignore_index=-100)
        return loss


BACKGROUND = -1  # `patch_groups`' label of a patch no object covers


def patch_groups(group_mask: np.ndarray, patch_size: int, min_pixels: int = 16) -> torch.Tensor:
    """`[num_patches]` (row-major, as the encoder's tokens): the group a patch shows (the one covering most of its
    pixels, if at least `min_pixels`), `BACKGROUND` for a patch with no object pixel, -100 (no target) for one with
    only a sliver of an object. `group_mask`: `Scene.group_mask()`, `[H, W]`, -1 for the background."""
    height, width = group_mask.shape
    patches = group_mask.reshape(height // patch_size, patch_size, width // patch_size, patch_size)
    patches = torch.from_numpy(patches.transpose(0, 2, 1, 3).reshape(-1, patch_size * patch_size))
    num_groups = int(patches.max()) + 1
    coverage = torch.stack([(patches == index).sum(1) for index in range(max(1, num_groups))], dim=1)
    most, group = coverage.max(1)
    labels = torch.where(most >= min_pixels, group, torch.full_like(group, -100))
    return labels.masked_fill(most == 0, BACKGROUND)


def token_tags(groups: Sequence[dict], patches: torch.Tensor) -> torch.Tensor:
    """Per patch token (`patches`: `patch_groups`), the group it shows as `(color, shape, size, count - 1, side)`
    class indices `[num_patches, 5]` (side: 0 left, 1 right, 2 neither). A background token has color
    `len(COLORS)` ("nothing") and no other target (-100); a token with no target has -100 everywhere."""
    rows = []
    for group in groups:
        side = {"left": 0, "right": 1, None: 2}[group["side"]]
        rows.append([list(COLORS).index(group["color"]), SHAPES.index(group["shape"]),
                     list(SIZES).index(group["size"]), group["count"] - 1, side])  # fmt: skip
    table = torch.tensor(rows + [[len(COLORS)] + [-100] * 4, [-100] * 5])  # then background, then no target
    index = torch.where(patches == BACKGROUND, len(rows), torch.where(patches < 0, len(rows) + 1, patches))
    return table[index]


class TokenTagger(nn.Module):
    """Linear heads on every patch token: the color ("nothing" for the background), shape, size, count and side of
    the group the token shows. Supervising each token with its own group keeps the tokens local, so that the
    Q-Former's cross-attention can pick one group's tokens and read all of that group's attributes together; with the
    mean-pooled tagging alone the tokens of an image became nearly the same (cosine ~0.9) and the attributes of two
    groups could only be read from them jointly, not bound to their group (benchmarks/README.md)."""

    CLASSES = {"color": len(COLORS) + 1, "shape": len(SHAPES), "size": len(SIZES), "count": 3, "side": 3}

    def __init__(self, width: int):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(width, k) for name, k in self.CLASSES.items()})

    def loss(self, tokens: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        """`tokens [B, P, D]` (patch tokens, no CLS), `tags [B, P, 5]` (`token_tags`): sum of the heads' mean
        cross-entropies over the tokens that have a target."""
        loss = tokens.new_zeros(())
        for index, head in enumerate(self.heads.values()):
            target = tags[..., index].reshape(-1)
            if (target != -100).any():
                loss = loss + F.cross_entropy(head(tokens).flatten(0, 1), target, ignore_index=-100)
        return loss


def pretrain_image_encoder(
    config: Blip2VisionConfig,
    pixels: torch.Tensor,
    scenes: Sequence[Sequence[dict]],
    normalize: Callable[[torch.Tensor], torch.Tensor],
    steps: int,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    position_std: float = 0.3,
    seed: int = 0,
    log: Callable[[dict], None] | None = None,
    patches: torch.Tensor | None = None,
) -> Blip2VisionModel:
    """Supervised scene tagging of a `Blip2VisionModel` (`SceneTagger` on the mean of its output tokens), as the
    ImageNet-trained ViTs BLIP-1 started from: labels from the scene, no text, no language model.

    Args:
        pixels: `[N, 3, H, W]` uint8 images (kept as bytes: a pool of tens of thousands of images).
        scenes: each image's groups (`asdict(Group)`).
        normalize: uint8 `[B, 3, H, W]` -> the encoder's normalized float input (the processor's mean / std).
        patches: `[N, num_patches]` (`patch_groups` per image): with it, each patch token is also tagged with its
            own group's attributes (`TokenTagger`).
        position_std: std of the position embeddings' init. The ViT default (0.02) leaves the tokens' position an
            order of magnitude below their content, and the encoder learned "left" / "right" only late, if at all.

    The demo's linear probe reads the tokens' mean; the Q-Former's cross-attention reads the tokens themselves. Tagged
    on the mean alone, the tokens of an image became nearly the same (each a bag of the scene's attributes), so the
    per-token tags (`patches`) are what keeps each group's attributes in its own tokens.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vision = Blip2VisionModel(config)
    nn.init.normal_(vision.embeddings.position_embedding, std=position_std)
    tagger, token_tagger = SceneTagger(config.hidden_size), TokenTagger(config.hidden_size)
    targets = [torch.stack(column) for column in zip(*(scene_tags(groups) for groups in scenes))]
    if patches is not None:
        tags = torch.stack([token_tags(groups, image_patches) for groups, image_patches in zip(scenes, patches)])
    modules = nn.ModuleList([vision, tagger] + ([token_tagger] if patches is not None else []))

    def tagging_loss() -> torch.Tensor:
        index = torch.randint(len(pixels), (batch_size,), generator=generator)
        tokens = vision(pixel_values=normalize(pixels[index])).last_hidden_state
        loss = tagger.loss(tokens.mean(1), *(target[index] for target in targets))
        if patches is not None:
            loss = loss + token_tagger.loss(tokens[:, 1:], tags[index])
        return loss

    modules.train()
    _optimize(list(modules.parameters()), tagging_loss, steps, learning_rate, "image encoder (tagging)", log)
    vision.eval()
    return vision


def scene_documents(
    captions: Sequence[Sequence[str]],
    questions: Sequence[Sequence[dict]],
    per_scene: int,
    seed: int = 0,
    questions_per_document: tuple[int, int] = (2, 4),
    always_asked: Sequence[str] = (),
) -> list[str]:
    """The language model's corpus: per scene, `per_scene` documents of one or two of its captions (ones that name
    every attribute), then `questions_per_document` (a range) "Question: ... Short answer: ..." lines about it
    (LAVIS's zero-shot VQA prompt for OPT), each line ended by "\n". Only text: the answers come from the captions
    before them. A second caption restates the first: predicting it rewards copying from the context, which answering
    from it needs too. Questions of the types in `always_asked` are in every document of their scene (counted in
    `questions_per_document`; asking "shape" in every document did not teach it: benchmarks/README.md)."""
    rng = random.Random(seed)
    documents = []
    for scene_captions, scene_questions in zip(captions, questions):
        # the context must hold every answer: captions that leave out the sizes would teach the model to guess
        complete = [caption for caption in scene_captions if any(size in caption.split() for size in SIZES)]
        for _ in range(per_scene):
            lines = rng.sample(complete, k=min(len(complete), rng.choice((1, 2))))
            count = min(len(scene_questions), rng.randint(*questions_per_document))
            asked = [qa for qa in scene_questions if qa["type"] in always_asked][:count]
            others = [qa for qa in scene_questions if qa["type"] not in always_asked]
            chosen = rng.sample(others, k=min(len(others), count - len(asked)))
            if asked:
                chosen = asked + chosen
                rng.shuffle(chosen)  # the always-asked ones anywhere in the document
            for qa in chosen:
                lines.append(f"Question: {qa['question']} Short answer: {qa['answer']}")
            documents.append("".join(line + "\n" for line in lines))
    rng.shuffle(documents)
    return documents


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator, group: int = 8
) -> Iterator[list[int]]:
    """Endless batches of indices into `lengths`, grouped by length as the Trainer's `group_by_length`: `group`
    batches' worth of indices are drawn at random (with replacement), sorted by length, cut into batches, and the
    batches yielded in random order."""
    lengths = torch.as_tensor(lengths)
    while True:
        index = torch.randint(len(lengths), (group * batch_size,), generator=generator)
        batches = index[lengths[index].argsort(stable=True)].split(batch_size)
        for position in torch.randperm(group, generator=generator).tolist():
            yield batches[position].tolist()


def pretrain_language_model(
    config: OPTConfig,
    documents: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    steps: int,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    log: Callable[[dict], None] | None = None,
    monitor: Callable[[OPTForCausalLM], dict] | None = None,
    monitor_every: int = 1000,
) -> OPTForCausalLM:
    """Next-token prediction on `documents` (BOS + text, every token a target). `monitor(model)` (for example
    `quality.text_only_vqa` on held-out scenes) runs every `monitor_every` steps and at the end; its result is printed
    and logged with the step: the skills break out one at a time after long plateaus, which only such a curve shows.

    Batches are grouped by length (`length_grouped_batches`): random batches pad every document to the longest of
    its batch, which spent about a third of the compute on padding (benchmarks/README.md, "Training choices")."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = OPTForCausalLM(config)
    encoded = tokenizer(list(documents))["input_ids"]  # once, not at every step
    batches = length_grouped_batches([len(ids) for ids in encoded], batch_size, generator)

    def lm_loss() -> torch.Tensor:
        tokens = tokenizer.pad(
            {"input_ids": [encoded[i] for i in next(batches)]}, padding_side="right", return_tensors="pt"
        )
        labels = tokens["input_ids"].masked_fill(tokens["attention_mask"] == 0, -100)
        return model(**tokens, labels=labels).loss

    def monitor_step(step: int) -> None:
        if monitor is not None and ((step + 1) % monitor_every == 0 or step + 1 == steps):
            model.eval()
            result = {"step": step + 1, **monitor(model)}
            model.train()
            print(f"language model, step {step + 1}: {result}", flush=True)
            if log is not None:
                log(result)

    model.train()
    _optimize(list(model.parameters()), lm_loss, steps, learning_rate, "language model (text only)", log, monitor_step)
    model.eval()
    return model
