"""BLIP-2's stage-1 objectives (Li et al., 2023, Figure 2) as functions of tensors, in the manner of open_clip's
`loss.py`: `Blip2ForPreTraining` runs the Q-Former passes, these turn their outputs into the three losses.

- ITC (image-text contrastive): `itc_similarities` -> `itc_loss`.
- ITM (image-text matching): `sample_hard_negatives` / `sample_itm_batch` lay out the ITM rows (positives, each text
  with a hard negative image, each image with a hard negative text), `itm_loss` scores them.
- ITG (image-grounded text generation): `itg_inputs` (the `[DEC]`-led text and its labels) -> `itg_loss`.

With an initialized process group the contrastive and hard-negative parts run against the global batch: every
process's rows gathered by `gather_with_grad` / `gather_no_grad`. This file is copied into saved checkpoints beside
`modeling_blip2.py` (remote code): it imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------------------------------
# The global batch: gathers across processes
# ---------------------------------------------------------------------------------------------------------------------


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group (LAVIS crashes there, #537)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0, processes may hold different numbers of rows (a collator that skipped an unreadable
    image, a last batch). The backward hands each process the sum over all processes of the gradient of its own rows
    (all-reduce, then its slice), so gradients are those of one process running the whole batch."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, world_size = world()
        sizes = gather_sizes(tensor.shape[0], tensor.device)
        largest = max(sizes)
        padded = tensor.new_zeros((largest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world_size)]
        torch.distributed.all_gather(parts, padded.contiguous())
        ctx.start, ctx.size = sum(sizes[:rank]), tensor.shape[0]
        return torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous()
        torch.distributed.all_reduce(grad)
        return grad[ctx.start : ctx.start + ctx.size]


def gather_sizes(size: int, device: torch.device) -> list[int]:
    """Every process's number of rows, in rank order."""
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world()[1])]
    torch.distributed.all_gather(sizes, torch.tensor([size], dtype=torch.long, device=device))
    return [int(s.item()) for s in sizes]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor [B, ...]` from every process along dim 0 -> `[N, ...]`, differentiably (see
    `_AllGatherWithGrad`). With DDP's gradient averaging the gradients equal those of one process on the whole batch
    (LAVIS gathers the other side's features without gradient, which is not exact). One process: `tensor` itself."""
    if world()[1] == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """`gather_with_grad` for tensors that need no gradient (token ids, masks)."""
    if world()[1] == 1:
        return tensor
    with torch.no_grad():
        return _AllGatherWithGrad.apply(tensor)


def pad_to_world_length(ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token ids and mask `[B, T]` to the longest length over the processes, so that they can be gathered."""
    if world()[1] == 1:
        return ids, mask
    length = torch.tensor([ids.shape[1]], device=ids.device)
    torch.distributed.all_reduce(length, op=torch.distributed.ReduceOp.MAX)
    extra = int(length.item()) - ids.shape[1]
    if extra:
        ids = nn.functional.pad(ids, (0, extra), value=pad_id)
        mask = nn.functional.pad(mask, (0, extra), value=0)
    return ids, mask


def local_offset(batch_size: int, device: torch.device) -> int:
    """Where this process's `batch_size` rows start in the global batch (the processes' batches concatenated in rank
    order): its rows of the global batch are `offset + arange(batch_size)`."""
    rank, world_size = world()
    return sum(gather_sizes(batch_size, device)[:rank]) if world_size > 1 else 0


# ---------------------------------------------------------------------------------------------------------------------
# ITC
# ---------------------------------------------------------------------------------------------------------------------


def itc_similarities(
    image_feats: torch.Tensor, text_feat: torch.Tensor, temperature: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ITC logits: for each image the highest cosine over its queries, divided by the temperature.

    Args:
        image_feats: `[B, Q, E]` normalized query projections of the local images.
        text_feat: `[B, E]` normalized `[CLS]` projections of the local texts.
    Returns:
        `sim_i2t [B, N]` (local images against the texts of the global batch) and `sim_t2i [B, N]` (local texts
        against the images of the global batch); `N = B` in one process.
    """
    image_feats_all = gather_with_grad(image_feats)  # [N, Q, E]
    text_feat_all = gather_with_grad(text_feat)  # [N, E]
    sim_i2t = torch.einsum("bqe,ne->bqn", image_feats, text_feat_all).max(dim=1).values / temperature
    sim_t2i = torch.einsum("be,nqe->bnq", text_feat, image_feats_all).max(dim=2).values / temperature
    return sim_i2t, sim_t2i


def itc_loss(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, targets: torch.LongTensor, label_smoothing: float = 0.1
) -> torch.Tensor:
    """Symmetric contrastive loss: the mean of image->text and text->image cross-entropy, each row's positive at
    `targets [B]` (its column of the global batch), with label smoothing (0.1 in LAVIS)."""
    image_to_text = nn.functional.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
    text_to_image = nn.functional.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)
    return (image_to_text + text_to_image) / 2


# ---------------------------------------------------------------------------------------------------------------------
# ITM
# ---------------------------------------------------------------------------------------------------------------------


def sample_hard_negatives(similarity: torch.Tensor, positive_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one negative per row with probability softmax(similarity) over the row, positives excluded (LAVIS's ITM
    hard-negative mining, vectorized, without a host sync: the step can run ahead of the GPU).

    Args:
        similarity: `[B, N]` logits (similarity / temperature) of each local row against the whole global batch.
        positive_index: `[B]` column of each row's positive.
    Returns:
        `[B]` sampled columns, and `[B]` bool: whether the row had any candidate at all (False when the global batch
        is one pair). NaN similarities get no weight; a row whose weights are all zero or NaN draws uniformly.
    """
    logits = torch.nan_to_num(similarity.detach().float(), nan=-torch.inf, posinf=-torch.inf)
    # every column but the row's positive (a scatter: boolean or advanced indexing would sync with the host)
    candidates = torch.ones_like(logits, dtype=torch.bool).scatter_(1, positive_index[:, None], False)
    weights = torch.softmax(logits.masked_fill(~candidates, -torch.inf), dim=1)
    broken = ~torch.isfinite(weights).all(dim=1) | (weights.sum(dim=1) <= 0)
    weights = torch.where(broken[:, None], candidates.float(), weights.nan_to_num(0.0))
    # a row has a candidate unless the global batch is one pair; such rows draw anything (the caller drops them)
    has_negative = torch.full_like(positive_index, logits.shape[1] > 1, dtype=torch.bool)
    # `torch.multinomial(weights, 1)` draws exactly this (its one-sample path: the same exponential_ call, the same
    # generator state after it), but first checks the weights with `item()` on the CPU: the weights are valid here
    # by construction, so the check is only a sync
    return (weights / torch.empty_like(weights).exponential_(1)).argmax(dim=1), has_negative


@dataclass
class ItmBatch:
    """The rows of the ITM pass, `R = B + n_t + n_i` of them, in three blocks:

    1. the `B` positives: local text b with local image b;
    2. each local text that has a negative, with its hard negative image (`n_t` rows);
    3. each local image that has a negative, with its hard negative text (`n_i` rows).

    text_rows: `[R]` rows of the global batch's texts.
    image_rows: `[R]` rows of the ITM images: the `B` local images, then, when `appended_images` is set, those images.
    appended_images: `[n_t]` rows of the global batch's images to append after the local ones (the negative images
        of block 2, which may live on other processes), or None when the negatives index the local images (one
        process: the global batch is the local one).
    labels: `[R]`, 1 for the positives and 0 for the negatives.
    """

    text_rows: torch.LongTensor
    image_rows: torch.LongTensor
    appended_images: torch.LongTensor | None
    labels: torch.LongTensor


def itm_batch(
    local_rows: torch.LongTensor,
    negative_images: tuple[torch.LongTensor, torch.Tensor | None],
    negative_texts: tuple[torch.LongTensor, torch.Tensor | None],
    append_negative_images: bool,
) -> ItmBatch:
    """Lays out the ITM rows (`ItmBatch`) from `local_rows [B]` (the local pairs' rows of the global batch) and the
    draws of `sample_hard_negatives`: `negative_images` (a global image row per local text, and whether it has one)
    and `negative_texts` (a global text row per local image, and whether it has one). A None "whether" means every
    row has one: no boolean indexing, whose data-dependent shape would sync with the host. `append_negative_images`:
    the negative images are gathered and appended after the local images (several processes), rather than indexed
    among them (one process)."""
    negative_image, text_has_negative = negative_images
    negative_text, image_has_negative = negative_texts

    def kept(rows: torch.Tensor, has_negative: torch.Tensor | None) -> torch.Tensor:
        return rows if has_negative is None else rows[has_negative]

    local_images = torch.arange(len(local_rows), device=local_rows.device)
    text_rows = torch.cat([local_rows, kept(local_rows, text_has_negative), kept(negative_text, image_has_negative)])
    appended = kept(negative_image, text_has_negative) if append_negative_images else None
    if appended is None:
        negative_image_rows = kept(negative_image, text_has_negative)
    else:
        negative_image_rows = len(local_rows) + torch.arange(len(appended), device=local_rows.device)
    image_rows = torch.cat([local_images, negative_image_rows, kept(local_images, image_has_negative)])
    labels = torch.zeros(len(text_rows), dtype=torch.long, device=local_rows.device)
    labels[: len(local_rows)] = 1
    return ItmBatch(text_rows=text_rows, image_rows=image_rows, appended_images=appended, labels=labels)


def sample_itm_batch(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, local_rows: torch.LongTensor, append_negative_images: bool
) -> ItmBatch:
    """Draws the hard negatives from the ITC logits `[B, N]` (a negative image per text from `sim_t2i`, then a
    negative text per image from `sim_i2t`, in LAVIS's order) and lays out the ITM rows (`itm_batch`). Every row has
    a negative unless the global batch is one pair (`N == 1`), which the shapes tell without a host sync."""
    negative_image, text_has_negative = sample_hard_negatives(sim_t2i, local_rows)
    negative_text, image_has_negative = sample_hard_negatives(sim_i2t, local_rows)
    if sim_i2t.shape[1] > 1:
        text_has_negative = image_has_negative = None
    return itm_batch(
        local_rows, (negative_image, text_has_negative), (negative_text, image_has_negative), append_negative_images
    )


def itm_loss(logits_itm: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """Plain cross-entropy (no smoothing, as LAVIS) of the ITM logits `[R, 2]` (no match, match) against `labels
    [R]` (`ItmBatch.labels`)."""
    return nn.functional.cross_entropy(logits_itm, labels)


# ---------------------------------------------------------------------------------------------------------------------
# ITG
# ---------------------------------------------------------------------------------------------------------------------


def itg_inputs(
    input_ids: torch.LongTensor, attention_mask: torch.Tensor, bos_token_id: int
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """The ITG text from the captions `[B, T]` (`[CLS]`-led, as LAVIS tokenizes them): `decoder_ids [B, T]`, where
    `[DEC]` (`bos_token_id`) replaces `[CLS]`, and `labels [B, T]`, the same ids with padding set to -100."""
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = bos_token_id
    return decoder_ids, decoder_ids.masked_fill(attention_mask == 0, -100)


def itg_loss(logits_itg: torch.Tensor, labels: torch.LongTensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Next-token cross-entropy of the Q-Former LM logits `[B, T, V]` against `labels [B, T]` (`itg_inputs`):
    position t predicts token t + 1, so every non-pad token after `[DEC]` is predicted; label smoothing (0.1 in
    LAVIS)."""
    return nn.functional.cross_entropy(
        logits_itg[:, :-1].reshape(-1, logits_itg.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )


__all__ = [
    "ItmBatch",
    "gather_no_grad",
    "gather_sizes",
    "gather_with_grad",
    "itc_loss",
    "itc_similarities",
    "itg_inputs",
    "itg_loss",
    "itm_batch",
    "itm_loss",
    "local_offset",
    "pad_to_world_length",
    "sample_hard_negatives",
    "sample_itm_batch",
    "world",
]
