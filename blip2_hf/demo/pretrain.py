"""The demo's "off-the-shelf" unimodal models, pretrained on the spot and then frozen, as BLIP-2 assumes them:

- an image encoder (`Blip2VisionModel`, a small ViT) trained without any language model, contrastively against a
  small text tower of its own, as CLIP trained the EVA-CLIP ViT-g that BLIP-2 uses. The text tower is thrown away;
- an OPT-style language model (`OPTForCausalLM`) trained on text alone: short "documents" about training scenes,
  one or two captions, then question/answer pairs about them. It learns what captions and answers look like and to
  answer from the text before a question; it never sees an image.

Neither model knows the other: connecting them is BLIP-2's job.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerBase

from ..configuration_blip2 import Blip2VisionConfig
from ..modeling_blip2 import Blip2VisionModel
from .world import SIZES


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
    return loss.item()


class TextTower(nn.Module):
    """The CLIP-style text encoder the image encoder is trained against: token + position embeddings, a small
    transformer, mean over the tokens."""

    def __init__(self, vocab_size: int, width: int, max_length: int, num_layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(max_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids) + self.position[: input_ids.shape[1]]
        hidden = self.encoder(hidden, src_key_padding_mask=attention_mask == 0)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)


def pretrain_vision_encoder(
    config: Blip2VisionConfig,
    pixel_values: torch.Tensor,
    captions: Sequence[Sequence[str]],
    scene_keys: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    steps: int,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
    log: Callable[[dict], None] | None = None,
    validation: tuple[torch.Tensor, Sequence[str]] | None = None,
) -> tuple[Blip2VisionModel, dict[str, float]]:
    """CLIP-style contrastive training of a `Blip2VisionModel` against a `TextTower`.

    Args:
        pixel_values: `[N, 3, H, W]`, the training images, already normalized by the processor.
        captions: the captions of each image (one is drawn per step).
        scene_keys: what each image shows; images of one scene in a batch are all positives of each other's
            captions (CLIP's one-hot targets would call them negatives).
        log: called with `{"step", "loss"}` every 10 steps.
        validation: `(pixel_values [M, 3, H, W], one caption per image)` of M distinct scenes: the returned metrics
            then hold the zero-shot retrieval recall@1 of the trained pair (image -> text and text -> image, %).

    The image embedding is the mean of the encoder's output tokens (after `post_layernorm`), projected: every patch
    token is trained to carry what the image shows, which is what the Q-Former's cross-attention reads.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vision = Blip2VisionModel(config)
    width = config.hidden_size
    text_tower = TextTower(len(tokenizer), width, max_length=40)
    image_proj, text_proj = nn.Linear(width, 64), nn.Linear(width, 64)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    modules = nn.ModuleList([vision, text_tower, image_proj, text_proj])
    params = list(modules.parameters()) + [logit_scale]
    key_ids = {key: index for index, key in enumerate(dict.fromkeys(scene_keys))}
    keys = torch.tensor([key_ids[key] for key in scene_keys])

    def contrastive_loss() -> torch.Tensor:
        index = torch.randperm(len(pixel_values), generator=generator)[:batch_size]
        tokens = tokenizer([rng.choice(captions[i]) for i in index.tolist()], padding=True, return_tensors="pt")
        image_out = vision(pixel_values=pixel_values[index]).last_hidden_state
        image_feat = F.normalize(image_proj(image_out.mean(1)), dim=-1)
        text_feat = F.normalize(text_proj(text_tower(tokens["input_ids"], tokens["attention_mask"])), dim=-1)
        logits = logit_scale.exp().clamp(max=100) * image_feat @ text_feat.t()
        same = (keys[index][:, None] == keys[index][None, :]).float()
        targets = same / same.sum(1, keepdim=True)
        loss_i2t = torch.sum(-targets * logits.log_softmax(1), 1).mean()
        loss_t2i = torch.sum(-targets * logits.t().log_softmax(1), 1).mean()
        return (loss_i2t + loss_t2i) / 2

    modules.train()
    final_loss = _optimize(params, contrastive_loss, steps, learning_rate, "image encoder (contrastive)", log)
    modules.eval()
    metrics = {"final_loss": final_loss}
    if validation is not None:
        with torch.no_grad():
            val_pixels, val_captions = validation
            tokens = tokenizer(list(val_captions), padding=True, return_tensors="pt")
            image_feat = image_proj(vision(pixel_values=val_pixels).last_hidden_state.mean(1))
            text_feat = text_proj(text_tower(tokens["input_ids"], tokens["attention_mask"]))
            sim = F.normalize(image_feat, dim=-1) @ F.normalize(text_feat, dim=-1).t()
            target = torch.arange(len(sim))
            metrics["val_i2t_r1"] = 100 * (sim.argmax(1) == target).float().mean().item()
            metrics["val_t2i_r1"] = 100 * (sim.argmax(0) == target).float().mean().item()
    return vision, metrics


def scene_documents(
    captions: Sequence[Sequence[str]], questions: Sequence[Sequence[dict]], per_scene: int, seed: int = 0
) -> list[str]:
    """The language model's corpus: per scene, `per_scene` documents of one or two of its captions (ones that name
    every attribute), then two to four "Question: ... Short answer: ..." lines about it (LAVIS's zero-shot VQA prompt
    for OPT), each line ended by "\n". Only text: the answers come from the captions before them. A second caption
    restates the first: predicting it rewards copying from the context, which answering from it needs too."""
    rng = random.Random(seed)
    documents = []
    for scene_captions, scene_questions in zip(captions, questions):
        # the context must hold every answer: captions that leave out the sizes would teach the model to guess
        complete = [caption for caption in scene_captions if any(size in caption.split() for size in SIZES)]
        for _ in range(per_scene):
            lines = rng.sample(complete, k=min(len(complete), rng.choice((1, 2))))
            for qa in rng.sample(list(scene_questions), k=rng.randint(2, 4)):
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
) -> OPTForCausalLM:
    """Next-token prediction on `documents` (BOS + text, every token a target).

    Batches are grouped by length (`length_grouped_batches`): random batches of 32 documents padded to ~1.5x their
    mean length (86 tokens for a mean of 58, measured), so a third of the compute went to padding."""
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

    model.train()
    _optimize(list(model.parameters()), lm_loss, steps, learning_rate, "language model (text only)", log)
    model.eval()
    return model
