"""Image-text retrieval scoring with the stage-1 Q-Former (`Blip2ForImageTextRetrieval`), as LAVIS's
`compute_sim_matrix` (BLIP-2, `k_test=128`) and `RetrievalTask._report_metrics`:

    images = encode_images(model, (batch["pixel_values"] for batch in image_loader))  # once per image
    texts = encode_texts(model, text_loader)  # once per text: (input_ids, attention_mask) or processor batches
    itc = itc_similarity(images.image_feats, texts.text_feats)  # [N_img, N_txt] cosine, max over queries
    score_i2t, score_t2i = itm_rerank(model, images, texts, itc, k=128)  # ITM + ITC on the top-k, -100 elsewhere
    metrics = recall_at_k(score_i2t, score_t2i, img2txt, txt2img)  # txt_r1 ... r_mean, in percent

The model passes run in eval mode (each module's train/eval flag is restored afterwards) under
`torch.inference_mode`; the tensors returned are ordinary tensors (not inference tensors), so callers can update them
in place (e.g. `all_reduce` across ranks, as LAVIS does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

NO_MATCH_SCORE = -100.0  # LAVIS's score for every pair outside the top-k of its row
_ITC_CHUNK_ELEMENTS = 1 << 25  # [chunk, Q, N_txt] elements per ITC matmul (128 MiB in fp32)
# Projected cross-attention keys + values held at once by `itm_match_logits`: 512 MiB in fp32, 56 images at ViT-g width
# (257 patches) with BLIP-2's Q-Former (6 cross-attention layers of 768), so that a 5k-image gallery never holds its
# 47 GB of projections; each image is still projected once.
_KV_CHUNK_ELEMENTS = 1 << 27
_RANK_CHUNK_ROWS = 256  # score rows ranked at once by `recall_at_k`


class ImageIndex(NamedTuple):
    """Every image encoded once.

    - `image_feats [N_img, Q, E]`: L2-normalized query projections (ITC), on the compute device.
    - `image_embeds [N_img, 1 + P, Dv]`: vision tower output (ITM re-ranking), on `embeds_device`; `None` when
      encoded with `keep_image_embeds=False`.
    """

    image_feats: torch.Tensor
    image_embeds: torch.Tensor | None


class TextIndex(NamedTuple):
    """Every text encoded once.

    - `text_feats [N_txt, E]`: L2-normalized `[CLS]` projections (ITC).
    - `input_ids`, `attention_mask [N_txt, L]`: Q-Former tokens for ITM; batches of different lengths are
      right-padded to the longest with `pad_token_id` (mask 0).
    """

    text_feats: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """`model.eval()` for the duration, then every module's own flag back (a frozen ViT kept in eval mode inside a
    model in training mode stays so)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _model_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _pixel_values(batch: torch.Tensor | Mapping) -> torch.Tensor:
    return batch["pixel_values"] if isinstance(batch, Mapping) else batch


def _text_batch(batch: torch.Tensor | Sequence | Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` from a tensor of ids (no padding), an `(ids, mask)` pair or a mapping (a
    `Blip2Processor` batch: its `qformer_input_ids` / `qformer_attention_mask` when present, else `input_ids` /
    `attention_mask`)."""
    if isinstance(batch, Mapping):
        prefix = "qformer_" if "qformer_input_ids" in batch else ""
        input_ids, attention_mask = batch[f"{prefix}input_ids"], batch.get(f"{prefix}attention_mask")
    elif isinstance(batch, torch.Tensor):
        input_ids, attention_mask = batch, None
    else:
        input_ids, attention_mask = batch
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() != 2:
        raise ValueError(f"Text batches must be [B, L] token ids, got shape {tuple(input_ids.shape)}.")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}.")
    return input_ids, attention_mask


def _right_pad_cat(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    """Concatenate `[B_i, L_i]` tensors along the batch, right-padding each to the longest `L_i` with `value`."""
    length = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, length - t.shape[1]), value=value) for t in tensors])


def encode_images(
    model: torch.nn.Module,
    pixel_value_batches: Iterable[torch.Tensor | Mapping],
    device: torch.device | str | None = None,
    keep_image_embeds: bool = True,
    embeds_device: torch.device | str | None = "cpu",
    interpolate_pos_encoding: bool = False,
    progress: bool = True,
) -> ImageIndex:
    """Run the vision tower and the Q-Former once per image.

    Args:
        model: a `Blip2ForImageTextRetrieval`.
        pixel_value_batches: `[B, 3, H, W]` pixel values, or mappings holding them under `"pixel_values"` (processor
            batches), e.g. a `DataLoader`.
        device: where the passes run (the model's device by default); `image_feats` stay there.
        keep_image_embeds: keep the `[N_img, 1 + P, Dv]` vision outputs needed by `itm_rerank` (≈ 5 GB in fp16 per
            1,000 images at 364 px with ViT-g); `False` when only ITC is wanted.
        embeds_device: where `image_embeds` are kept (CPU by default, as LAVIS keeps `vit_feats`); `None`: `device`.
        progress: show a tqdm bar.

    Returns:
        `ImageIndex(image_feats [N_img, Q, E], image_embeds [N_img, 1 + P, Dv] | None)`.
    """
    device = _model_device(model, device)
    embeds_device = device if embeds_device is None else torch.device(embeds_device)
    dtype = next(model.parameters()).dtype
    feats, embeds = [], []
    with _eval_mode(model):
        for batch in tqdm(pixel_value_batches, desc="Encoding images", unit="batch", disable=not progress):
            pixel_values = _pixel_values(batch).to(device=device, dtype=dtype)
            with torch.inference_mode():
                features = model.get_image_features(
                    pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True
                )
                image_feats, image_embeds = features.pooler_output, features.last_hidden_state
            feats.append(image_feats)
            if keep_image_embeds:
                embeds.append(image_embeds.to(embeds_device))
    if not feats:
        raise ValueError("No image batches to encode.")
    # Concatenated outside inference mode: ordinary tensors for the caller.
    return ImageIndex(torch.cat(feats), torch.cat(embeds) if keep_image_embeds else None)


def encode_texts(
    model: torch.nn.Module,
    text_batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor] | Mapping],
    device: torch.device | str | None = None,
    progress: bool = True,
) -> TextIndex:
    """Encode every text once through the unimodal Q-Former text path.

    Args:
        model: a `Blip2ForImageTextRetrieval`.
        text_batches: Q-Former (BERT) tokens per batch: `input_ids [B, L]` (unpadded), `(input_ids,
            attention_mask)` pairs, or mappings (`Blip2Processor` / tokenizer output; `qformer_input_ids` and
            `qformer_attention_mask` are used when present). Padding must be on the right (`[CLS]` first), as
            BERT tokenizers pad; batches may have different lengths.
        device: where the passes run (the model's device by default); everything returned stays there.
        progress: show a tqdm bar.

    Returns:
        `TextIndex(text_feats [N_txt, E], input_ids [N_txt, L], attention_mask [N_txt, L])`, with `L` the longest
        batch.
    """
    device = _model_device(model, device)
    feats, ids, masks = [], [], []
    with _eval_mode(model):
        for batch in tqdm(text_batches, desc="Encoding texts", unit="batch", disable=not progress):
            input_ids, attention_mask = _text_batch(batch)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            with torch.inference_mode():
                feats.append(model.get_text_features(input_ids, attention_mask, return_dict=True).pooler_output)
            ids.append(input_ids)
            masks.append(attention_mask)
    if not feats:
        raise ValueError("No text batches to encode.")
    pad_token_id = getattr(model.config.qformer_config, "pad_token_id", None) or 0
    return TextIndex(torch.cat(feats), _right_pad_cat(ids, pad_token_id), _right_pad_cat(masks, 0))


def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """ITC similarity as LAVIS evaluates it: for each (image, text), the largest cosine between the image's query
    projections and the text `[CLS]` projection (both already normalized), without the temperature.

    Args:
        image_feats: `[N_img, Q, E]`.
        text_feats: `[N_txt, E]`.
        chunk_size: images per matmul (default: a `[chunk, Q, N_txt]` product of ≈ 32M elements).

    Returns:
        `[N_img, N_txt]` on `image_feats`' device (= `Blip2ForImageTextRetrieval(...).logits_per_image`).
    """
    if image_feats.dim() != 3 or text_feats.dim() != 2 or image_feats.shape[-1] != text_feats.shape[-1]:
        raise ValueError(
            f"Expected image_feats [N_img, Q, E] and text_feats [N_txt, E], got {tuple(image_feats.shape)} and "
            f"{tuple(text_feats.shape)}."
        )
    num_images, num_queries, _ = image_feats.shape
    num_texts = text_feats.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _ITC_CHUNK_ELEMENTS // max(1, num_queries * num_texts))
    text_t = text_feats.to(image_feats.device).t()
    sims = image_feats.new_empty(num_images, num_texts, dtype=torch.result_type(image_feats, text_feats))
    with torch.no_grad():
        for start in range(0, num_images, chunk_size):
            # [c, Q, E] x [E, N_txt] -> [c, Q, N_txt] -> max over the queries
            sims[start : start + chunk_size] = torch.matmul(image_feats[start : start + chunk_size], text_t).amax(1)
    return sims


def _text_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """`[N]` columns up to each row's last attended token (at least 1): what a batch of these rows must keep."""
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, 0).amax(1).clamp(min=1)


def _default_image_chunk_size(model: torch.nn.Module, image_embeds: torch.Tensor) -> int:
    """Images whose projected cross-attention keys and values (`2 x [P, D]` per cross-attention layer each) fit in
    `_KV_CHUNK_ELEMENTS`."""
    qformer = model.qformer
    cross_layers = sum(bool(layer.has_cross_attention) for layer in qformer.encoder.layer)
    per_image = 2 * max(1, cross_layers) * image_embeds.shape[1] * qformer.config.hidden_size
    return max(1, _KV_CHUNK_ELEMENTS // per_image)


def _pair_order(
    image_ids: torch.Tensor, text_lengths: torch.Tensor, image_chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """How `itm_match_logits` visits the pairs: `(distinct images [N_u] sorted, each pair's index among them [N],
    the visiting order of the pairs [N], the pair count of each chunk of `image_chunk_size` distinct images)`.
    Pairs go chunk by chunk, and within a chunk by text length, so that a batch pads its texts little."""
    images, local = image_ids.unique(return_inverse=True)
    chunk = local // image_chunk_size
    order = torch.argsort(chunk * (int(text_lengths.max()) + 1) + text_lengths, stable=True)
    counts = torch.bincount(chunk, minlength=(len(images) + image_chunk_size - 1) // image_chunk_size)
    return images, local, order, counts


def itm_match_logits(
    model: torch.nn.Module,
    image_embeds: torch.Tensor,
    text_index: TextIndex,
    image_ids: torch.Tensor,
    text_ids: torch.Tensor,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    progress: bool = True,
    image_chunk_size: int | None = None,
) -> torch.Tensor:
    """ITM "match" logits `[N_pairs]` (fp32, on `image_ids`' device) of the pairs `(image_ids[n], text_ids[n])`:
    images `image_embeds [N_img, 1 + P, Dv]` (an `ImageIndex`'s, or a slice of them), texts of `text_index`,
    `batch_size` pairs per Q-Former pass on `device` (the model's by default).

    Each distinct image's cross-attention keys and values are projected once (`Blip2QFormerModel.project_image`),
    `image_chunk_size` images at a time (default: as many as fit in 512 MiB of fp32), and every pair on that image
    reads them through `Blip2QFormerImage.rows`: the projection, a third of a ViT-g ITM pass, is paid per image
    instead of per pair. A chunk's pairs run sorted by text length, so that each batch is cut to its longest text.
    """
    if batch_size < 1 or (image_chunk_size is not None and image_chunk_size < 1):
        raise ValueError(f"batch_size and image_chunk_size must be positive, got {batch_size} and {image_chunk_size}.")
    if image_ids.shape != text_ids.shape or image_ids.dim() != 1:
        raise ValueError(
            f"image_ids and text_ids must be [N_pairs], got {tuple(image_ids.shape)} and {tuple(text_ids.shape)}."
        )
    device = _model_device(model, device)
    logits = torch.empty(len(image_ids), dtype=torch.float32, device=image_ids.device)
    if len(image_ids) == 0:  # e.g. a process whose image slice holds no candidate pair
        return logits
    for name, ids, bound in (("image_ids", image_ids, len(image_embeds)), ("text_ids", text_ids, len(text_index[0]))):
        if int(ids.min()) < 0 or int(ids.max()) >= bound:
            raise ValueError(f"{name} must lie in [0, {bound}), got [{int(ids.min())}, {int(ids.max())}].")
    if image_chunk_size is None:
        image_chunk_size = _default_image_chunk_size(model, image_embeds)
    text_ids = text_ids.to(text_index.input_ids.device)
    text_lengths = _text_lengths(text_index.attention_mask)
    images, local, order, counts = _pair_order(
        image_ids, text_lengths[text_ids].to(image_ids.device), image_chunk_size
    )
    bar = tqdm(total=len(image_ids), desc="ITM re-ranking", unit="pair", disable=not progress)
    start = 0
    with _eval_mode(model), bar:
        for chunk, count in enumerate(counts.tolist()):
            first = chunk * image_chunk_size
            chunk_images = images[first : first + image_chunk_size].to(image_embeds.device)
            with torch.inference_mode():
                projected = model.qformer.project_image(image_embeds[chunk_images].to(device))
            for batch_start in range(start, start + count, batch_size):
                pairs = order[batch_start : min(batch_start + batch_size, start + count)]
                texts = text_ids[pairs.to(text_ids.device)]
                length = int(text_lengths[texts].max())
                input_ids = text_index.input_ids[texts, :length].to(device)
                attention_mask = text_index.attention_mask[texts, :length].to(device)
                with torch.inference_mode():
                    image = projected.select((local[pairs] - first).to(device))
                    itm_logits, _ = model.image_text_matching(image, input_ids, attention_mask)
                logits[pairs] = itm_logits[:, 1].float().to(logits.device)
                bar.update(len(pairs))
            start += count
    return logits


def itm_rerank(
    model: torch.nn.Module,
    image_index: ImageIndex,
    text_index: TextIndex,
    itc: torch.Tensor,
    k: int = 128,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    progress: bool = True,
    image_chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank the ITC candidates with the ITM head, as LAVIS's `compute_sim_matrix`.

    For each image, its top-`k` texts by ITC get `score = itm_logits[:, 1] + itc` (the raw ITM "match" logit, no
    softmax, plus the ITC cosine); its other texts get -100. The same for each text over images. `k` is capped at
    the number of candidates. A pair in both an image's and a text's top-`k` is run through ITM once.

    The pairs of both directions run together in batches of any images and texts: each image's cross-attention keys
    and values are projected once for the whole re-ranking and shared by all of its pairs (LAVIS repeats the image
    `k` times per query and projects every copy), and each batch is cut to its longest text.

    Args:
        model: a `Blip2ForImageTextRetrieval`.
        image_index: from `encode_images` (with `keep_image_embeds=True`).
        text_index: from `encode_texts`.
        itc: `[N_img, N_txt]` from `itc_similarity`.
        k: candidates re-ranked per query (LAVIS `k_test`: 128 for COCO and Flickr30K).
        batch_size: (image, text) pairs per ITM pass.
        device: where the ITM passes run (the model's device by default).
        progress: show a tqdm bar.
        image_chunk_size: images whose projected keys and values are held on `device` at once (default: as many as
            fit in 512 MiB of fp32, 56 at ViT-g width); peak memory is that plus one batch's pass.

    Returns:
        `score_i2t [N_img, N_txt]` and `score_t2i [N_txt, N_img]`, fp32, on `itc`'s device.
    """
    if image_index.image_embeds is None:
        raise ValueError("ITM re-ranking needs the image embeddings: encode_images(..., keep_image_embeds=True).")
    num_images, num_texts = itc.shape
    if image_index.image_embeds.shape[0] != num_images or text_index.input_ids.shape[0] != num_texts:
        raise ValueError(
            f"itc is {num_images} x {num_texts} but the indexes hold {image_index.image_embeds.shape[0]} images and "
            f"{text_index.input_ids.shape[0]} texts."
        )
    if k < 1 or batch_size < 1 or (image_chunk_size is not None and image_chunk_size < 1):
        raise ValueError(
            f"k, batch_size and image_chunk_size must be positive, got {k}, {batch_size} and {image_chunk_size}."
        )
    device = _model_device(model, device)
    k_i2t, k_t2i = min(k, num_texts), min(k, num_images)
    sim_i2t, top_texts = itc.topk(k_i2t, dim=1)  # [N_img, k]
    sim_t2i, top_images = itc.t().topk(k_t2i, dim=1)  # [N_txt, k]
    arange = torch.arange(max(num_images, num_texts), device=itc.device)
    i2t_images, i2t_texts = arange[:num_images].repeat_interleave(k_i2t), top_texts.flatten()
    t2i_images, t2i_texts = top_images.flatten(), arange[:num_texts].repeat_interleave(k_t2i)

    # Every distinct pair once.
    keys = torch.cat([i2t_images * num_texts + i2t_texts, t2i_images * num_texts + t2i_texts])
    pairs, where = keys.unique(return_inverse=True)
    logits = itm_match_logits(
        model,
        image_index.image_embeds,
        text_index,
        pairs // num_texts,
        pairs % num_texts,
        batch_size,
        device,
        progress,
        image_chunk_size,
    )[where]

    score_i2t = torch.full((num_images, num_texts), NO_MATCH_SCORE, dtype=torch.float32, device=itc.device)
    score_i2t[i2t_images, i2t_texts] = logits[: len(i2t_images)] + sim_i2t.flatten().float()
    score_t2i = torch.full((num_texts, num_images), NO_MATCH_SCORE, dtype=torch.float32, device=itc.device)
    score_t2i[t2i_texts, t2i_images] = logits[len(i2t_images) :] + sim_t2i.flatten().float()
    return score_i2t, score_t2i


def _best_target_ranks(
    scores: torch.Tensor, targets: Sequence[Sequence[int]], ties: Literal["pessimistic", "optimistic"]
) -> torch.Tensor:
    """0-based rank `[N]` of the best-ranked target of each row of `scores [N, M]`. Ties with a non-target count
    against the row ("pessimistic") or for it ("optimistic")."""
    num_rows, num_cols = scores.shape
    rows = torch.tensor([row for row, cols in enumerate(targets) for _ in cols], dtype=torch.long)
    cols = torch.tensor([col for cols_ in targets for col in cols_], dtype=torch.long)
    if any(len(cols_) == 0 for cols_ in targets):
        raise ValueError("Every query needs at least one ground-truth match.")
    if len(cols) and (cols.min() < 0 or cols.max() >= num_cols):
        raise ValueError(f"Ground-truth indices must lie in [0, {num_cols}).")
    ranks = torch.empty(num_rows, dtype=torch.long)
    for start in range(0, num_rows, _RANK_CHUNK_ROWS):
        chunk = scores[start : start + _RANK_CHUNK_ROWS].to(device="cpu", dtype=torch.float64)
        in_chunk = (rows >= start) & (rows < start + len(chunk))
        is_target = torch.zeros(chunk.shape, dtype=torch.bool)
        is_target[rows[in_chunk] - start, cols[in_chunk]] = True
        best = chunk.masked_fill(~is_target, -torch.inf).amax(1, keepdim=True)
        ahead = (chunk >= best) & ~is_target if ties == "pessimistic" else chunk > best
        ranks[start : start + len(chunk)] = ahead.sum(1)
    return ranks


def recall_at_k(
    score_i2t: torch.Tensor,
    score_t2i: torch.Tensor,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    ties: Literal["pessimistic", "optimistic"] = "pessimistic",
) -> dict[str, float]:
    """Recall@K in percent, as LAVIS's `RetrievalTask._report_metrics`.

    - Text retrieval (`txt_r{k}`): the rank of an image is that of its best-ranked ground-truth caption in its row of
      `score_i2t`; R@K is the share of images ranked < K.
    - Image retrieval (`img_r{k}`): the rank of a caption's ground-truth image in its row of `score_t2i`.
    - `txt_r_mean` / `img_r_mean`: mean over `ks`; `r_mean`: their mean; `agg_metrics` = `txt_r_mean` (LAVIS's model
      selection metric).

    Args:
        score_i2t: `[N_img, N_txt]` (tensor or array).
        score_t2i: `[N_txt, N_img]`.
        img2txt: for each image, the indices of its captions.
        txt2img: for each caption, the index of its image.
        ks: the K's.
        ties: LAVIS breaks ties by whatever order `np.argsort` leaves them in; here a candidate scoring exactly as
            the ground truth counts as ranked ahead of it ("pessimistic", so that a constant score is no hit) or
            behind it ("optimistic"). With float scores only the -100 fill ties, which matters only if `k < max(ks)`.

    Returns:
        `{"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean",
        "agg_metrics"}` (for the default `ks`), floats in percent.
    """
    score_i2t, score_t2i = torch.as_tensor(score_i2t), torch.as_tensor(score_t2i)
    num_images, num_texts = score_i2t.shape
    if num_images == 0 or num_texts == 0:
        raise ValueError("Empty score matrices.")
    if score_t2i.shape != (num_texts, num_images):
        raise ValueError(f"score_t2i must be {num_texts} x {num_images}, got {tuple(score_t2i.shape)}.")
    if len(img2txt) != num_images or len(txt2img) != num_texts:
        raise ValueError(
            f"img2txt / txt2img must have {num_images} / {num_texts} entries, got {len(img2txt)} / {len(txt2img)}."
        )
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}.")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive, got {ks}.")
    ranks = {
        "txt": _best_target_ranks(score_i2t, img2txt, ties),
        "img": _best_target_ranks(score_t2i, [[int(image)] for image in txt2img], ties),
    }
    metrics = {}
    for prefix, prefix_ranks in ranks.items():
        for k in ks:
            metrics[f"{prefix}_r{k}"] = 100.0 * int((prefix_ranks < k).sum()) / len(prefix_ranks)
        metrics[f"{prefix}_r_mean"] = sum(metrics[f"{prefix}_r{k}"] for k in ks) / len(ks)
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    metrics["agg_metrics"] = metrics["txt_r_mean"]
    return metrics
