"""PyTorch BLIP-2 (Li et al., 2023): a frozen image encoder and a frozen LLM bridged by a Querying Transformer.

Read top to bottom: the vision encoder (EVA ViT layout), the Q-Former (BERT with learned queries, cross-attention to
the image and the paper's three self-attention masks), then the models users load: `Blip2VisionModel`,
`Blip2QFormerModel`, `Blip2Model`, `Blip2ForConditionalGeneration` and `Blip2ForImageTextRetrieval`.

Module names are the checkpoint keys of transformers' BLIP-2 (the Salesforce/blip2-* checkpoints), so those load here
without conversion, and what we save loads there. This file is copied into saved checkpoints as remote code: it imports
only torch, transformers and the configuration and packaging files beside it (`remote_code.py`).
"""

from __future__ import annotations

import copy
import inspect
import logging as python_logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .configuration_blip2 import (
    Blip2Config,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    vision_family,
    vision_layer_widths,
)
from .losses import (
    gather_no_grad,
    gather_with_grad,
    itc_loss,
    itc_similarities,
    itg_inputs,
    itg_loss,
    itm_loss,
    local_offset,
    pad_to_world_length,
    sample_itm_batch,
    world,
)
from .losses import sample_hard_negatives as sample_hard_negatives  # re-exported: it was defined here
from .remote_code import copy_remote_code, set_auto_map

logger = logging.get_logger(__name__)

SelfAttentionMask = Literal["bidirectional", "unimodal", "multimodal_causal"]


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Blip2QFormerModelOutput(ModelOutput):
    """
    The fields of transformers' `BaseModelOutputWithPoolingAndCrossAttentions` (5.x), in its order.

    last_hidden_state: `[B, Q + T, D]`, query positions first, then text positions.
    pooler_output: `[B, D]`, the first position (the first query, or `[CLS]` for text alone).
    hidden_states: the embeddings output and each layer's output, each `[B, Q + T, D]`.
    cache: the self-attention keys/values of every position run so far (with `use_cache=True`).
    attentions / cross_attentions: per-layer attention probabilities (eager attention only).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    cache: Cache | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class Blip2ImageFeaturesOutput(BaseModelOutputWithPooling):
    """
    What `get_image_features` of `Blip2ForConditionalGeneration` and of the stage-1 models returns (`Blip2Model`'s, as
    transformers', is the vision model's output): the fields of transformers' `BaseModelOutputWithVisionQformerOutputs`.

    last_hidden_state: `[B, 1 + P, Dv]` image embeddings (after `post_layernorm`).
    pooler_output: the image features the model hands on: `[B, Q, D_llm]`, the query outputs projected into the LLM's
        embedding space (the soft prompt; `Blip2ForConditionalGeneration`), or `[B, Q, E]`, the L2-normalized ITC
        projections of the query outputs (the stage-1 models).
    hidden_states / attentions: the vision encoder's (with `output_hidden_states` / `output_attentions`).
    vision_outputs / qformer_outputs: the raw outputs of both towers.
    """

    vision_outputs: BaseModelOutputWithPooling | None = None
    qformer_outputs: Blip2QFormerModelOutput | None = None


@dataclass
class Blip2ForConditionalGenerationModelOutput(ModelOutput):
    """
    loss: language-modeling loss over the `labels` that are not -100.
    logits: `[B, L, V]` LLM logits (decoder logits for encoder-decoder LLMs).
    vision_outputs / qformer_outputs / language_model_outputs: each tower's own output.
    image_outputs: the image side as the LLM received it, what `Blip2ForConditionalGeneration.get_image_features`
        returns (the field newer transformers VLM outputs carry, and what `mm_encoder_outputs={"image": ...}` takes):
        `pooler_output` the soft prompt `[B, Q, D_llm]`, `last_hidden_state` the image embeddings, `hidden_states` /
        `attentions` the vision encoder's, with `vision_outputs` and `qformer_outputs` (the two fields above). Last,
        so that the tuple positions of the other fields are those of transformers' output.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    vision_outputs: BaseModelOutputWithPooling | None = None
    qformer_outputs: Blip2QFormerModelOutput | None = None
    language_model_outputs: ModelOutput | None = None
    image_outputs: Blip2ImageFeaturesOutput | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        nested = ("vision_outputs", "qformer_outputs", "language_model_outputs", "image_outputs")
        return tuple(self[k] if k not in nested else self[k].to_tuple() for k in self.keys())


@dataclass
class Blip2ImageTextMatchingModelOutput(ModelOutput):
    """
    logits_per_image: ITC `[B_img, B_txt]` cosine similarity, max over queries; or ITM `[B, 2]` (no match / match).
    logits_per_text: its transpose.
    text_embeds: ITC `[B_txt, E]` normalized text `[CLS]` projection; ITM `[B, Q + T, D]` joint output.
    image_embeds: ITC `[B_img, Q, E]` normalized query projections; ITM `[B, 1 + P, Dv]` the image embeddings (as
        transformers).
    text_model_output: the Q-Former's output: the text pass (ITC) or the joint pass (ITM).
    vision_model_output: the vision encoder's output.
    temperature: the learnable ITC temperature; `logits_per_image / temperature` are the training logits. Last, so
        that the tuple positions of the other fields are those of transformers' output.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: Blip2QFormerModelOutput | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    temperature: torch.FloatTensor | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            self[k] if k not in ("text_model_output", "vision_model_output") else self[k].to_tuple()
            for k in self.keys()
        )


# ---------------------------------------------------------------------------------------------------------------------
# Attention shared by both towers
# ---------------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. query `[B, H, Lq, d]`, key/value `[B, H, Lk, d]`, additive mask `[B, 1, Lq, Lk]`.
    Returns `[B, Lq, H, d]` and the probabilities `[B, H, Lq, Lk]`. BLIP-2 keeps the softmax in the input dtype."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean `[B, Lq, Lk]` (True = may attend) -> additive float `[B, 1, Lq, Lk]`, right for eager and sdpa alike."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


# ---------------------------------------------------------------------------------------------------------------------
# Vision encoder (EVA ViT-g in the transformers layout)
# ---------------------------------------------------------------------------------------------------------------------


class Blip2ConvStem(nn.Module):
    """`vision_config.conv_stem_channels`: 3x3 stride-2 convolutions (GroupNorm over all channels, GELU), then a 1x1
    convolution to the encoder's width. `[B, 3, H, W]` -> `[B, D, H/p, W/p]`, as the single patch convolution."""

    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        widths = [3, *config.conv_stem_channels]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(widths, widths[1:]))
        # GroupNorm, not BatchNorm: a frozen encoder must not depend on batch statistics
        self.norms = nn.ModuleList(nn.GroupNorm(1, width) for width in widths[1:])
        self.proj = nn.Conv2d(widths[-1], config.hidden_size, kernel_size=1)

    @property
    def weight(self) -> torch.Tensor:  # the dtype the stem computes in, as `nn.Conv2d.weight` tells it
        return self.proj.weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = pixel_values
        for conv, norm in zip(self.convs, self.norms):
            hidden = nn.functional.gelu(norm(conv(hidden)))
        return self.proj(hidden)


class Blip2VisionEmbeddings(nn.Module):
    """Patch embedding (one convolution, or `Blip2ConvStem`) + `[CLS]` + absolute position embeddings.
    `[B, 3, H, W]` -> `[B, 1 + (H/p)(W/p), D]`."""

    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        if config.conv_stem_channels is None:
            self.patch_embedding = nn.Conv2d(
                3, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
            )
        else:
            self.patch_embedding = Blip2ConvStem(config)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Resize the trained position grid bicubically to `(height/p, width/p)` patches, e.g. 16x16 -> 26x26 for
        364 px (as LAVIS does when it loads a 224 px encoder for 364 px fine-tuning). Returns `[1, 1 + h*w, D]`."""
        new_h, new_w = height // self.patch_size, width // self.patch_size
        num_positions = self.position_embedding.shape[1] - 1
        side = int(num_positions**0.5)
        if (new_h, new_w) == (side, side):
            return self.position_embedding
        class_pos, patch_pos = self.position_embedding[:, :1], self.position_embedding[:, 1:]
        dim = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        patch_pos = nn.functional.interpolate(patch_pos, size=(new_h, new_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim)
        return torch.cat([class_pos, patch_pos], dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must have shape [batch, 3, height, width], got {tuple(pixel_values.shape)}"
            )
        batch_size, _, height, width = pixel_values.shape
        expected = self.config.image_size
        if not interpolate_pos_encoding and (height, width) != (expected, expected):
            raise ValueError(
                f"pixel_values are {height}x{width} but the vision encoder's position embeddings are for "
                f"{expected}x{expected} (vision_config.image_size); resize the images or pass "
                "interpolate_pos_encoding=True to interpolate the position embeddings."
            )
        dtype = self.patch_embedding.weight.dtype
        patch_embeds = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        class_embeds = self.class_embedding.expand(batch_size, 1, -1).to(dtype)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        position_embedding = (
            self.interpolate_pos_encoding(height, width) if interpolate_pos_encoding else self.position_embedding
        )
        return embeddings + position_embedding.to(dtype)


class Blip2Attention(nn.Module):
    """ViT self-attention with one fused `qkv` projection (EVA: the key bias is zero and gets no gradient that
    matters, since a per-query constant does not change a softmax)."""

    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.is_causal = False
        self.attention_dropout = config.attention_dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.projection = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, d]
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scale,
            **kwargs,
        )
        attn_output = self.projection(attn_output.reshape(batch_size, seq_len, -1))
        return attn_output, attn_weights


class Blip2MLP(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class Blip2EncoderLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.self_attn = Blip2Attention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Blip2MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.self_attn(self.layer_norm1(hidden_states), **kwargs)
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.layer_norm2(hidden_states))
        return hidden_states, attn_weights


class Blip2Encoder(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([Blip2EncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self, inputs_embeds: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> BaseModelOutput:
        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, attn_weights = layer(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )


# ---------------------------------------------------------------------------------------------------------------------
# Q-Former
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)  # tensors: compare by identity
class Blip2QFormerImage:
    """The image as the Q-Former's cross-attention reads it, one object for every way a pass can be given it:

    - `states [N, P, Dv]`: features of N distinct images (the vision encoder's output), which each cross-attention
      layer projects to its keys and values; or instead
    - `key_values`: those keys and values already projected, `(key, value)` of `[N, H, P, d]` per layer (None for
      layers without cross-attention), made by `Blip2QFormerModel.project_image`, so that several passes over the
      same images (stage 1's query pass and its ITM pass) project them once;
    - `attention_mask [N, P]`: 1 for real patches (None: all real, as BLIP-2's images);
    - `rows [B]`: the image each row of the batch attends to (None: row b attends to image b). Rows on one image (ITM's
      positives and negatives) then share its keys and values instead of each projecting its own copy.

    `select(rows)` picks rows, `cat(other)` appends images. `Blip2QFormerModel.forward` takes it as
    `encoder_hidden_states`, where a plain tensor `[B, P, Dv]` means `Blip2QFormerImage(states=tensor)`.
    """

    states: torch.Tensor | None = None
    key_values: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...] | None = None
    attention_mask: torch.Tensor | None = None
    rows: torch.LongTensor | None = None

    def __post_init__(self):
        if (self.states is None) == (self.key_values is None):
            raise ValueError(
                "Blip2QFormerImage holds either states (image features [N, P, Dv]) or key_values (their projection "
                "by Blip2QFormerModel.project_image): exactly one of them."
            )
        if self.key_values is not None:
            self.key_values = tuple(self.key_values)

    @property
    def num_images(self) -> int:
        """N, the number of distinct images."""
        if self.states is not None:
            return self.states.shape[0]
        return next((key.shape[0] for key, _ in filter(None, self.key_values)), 0)

    def __len__(self) -> int:
        """The number of rows that attend to these images (B)."""
        return self.num_images if self.rows is None else len(self.rows)

    def select(self, rows: torch.LongTensor) -> Blip2QFormerImage:
        """The images seen by `rows [B']` of this batch: no copy, only the row index changes."""
        return replace(self, rows=rows if self.rows is None else self.rows[rows])

    def cat(self, other: Blip2QFormerImage) -> Blip2QFormerImage:
        """These images followed by `other`'s (both without `rows`, both states or both projected)."""
        if self.rows is not None or other.rows is not None:
            raise ValueError("Blip2QFormerImage.cat appends images: call it before select(rows).")
        if (self.states is None) != (other.states is None):
            raise ValueError("Blip2QFormerImage.cat: both images must hold states, or both key_values.")
        mask = None
        if self.attention_mask is not None or other.attention_mask is not None:
            mask = torch.cat([image.patch_mask() for image in (self, other)])
        if self.states is not None:
            return Blip2QFormerImage(states=torch.cat([self.states, other.states]), attention_mask=mask)
        key_values = [
            None if mine is None else (torch.cat([mine[0], theirs[0]]), torch.cat([mine[1], theirs[1]]))
            for mine, theirs in zip(self.key_values, other.key_values, strict=True)
        ]
        return Blip2QFormerImage(key_values=key_values, attention_mask=mask)

    def patch_mask(self) -> torch.Tensor:
        """`[N, P]` patch mask, ones where none was given."""
        if self.attention_mask is not None:
            return self.attention_mask
        if self.states is not None:
            return self.states.new_ones(self.states.shape[:2], dtype=torch.long)
        key = next(key for key, _ in filter(None, self.key_values))
        return key.new_ones((key.shape[0], key.shape[2]), dtype=torch.long)

    def layer_inputs(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """What layer `layer_idx` cross-attends to: `(states, None, None)` or `(None, key, value)`."""
        if self.key_values is None:
            return self.states, None, None
        key_value = self.key_values[layer_idx]
        return (None, None, None) if key_value is None else (None, *key_value)

    def cross_attention_mask(self, query_length: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive cross-attention mask `[B, 1, Q, P]` (per row), or None when no patch mask was given (a mask
        is applied as given, even one that masks nothing: testing its values would sync with the host)."""
        if self.attention_mask is None:
            return None
        mask = self.attention_mask
        if self.rows is not None:  # the layers index the keys per row: index their mask once, here
            mask = mask[self.rows]
        return _additive_mask(mask[:, None, :].bool().expand(-1, query_length, -1), dtype)


class Blip2QFormerMultiHeadAttention(nn.Module):
    """BERT attention. Self-attention over `[queries; text]`, or cross-attention from the queries to the image
    (`key`/`value` then read `encoder_hidden_size`-wide image features). Self-attention can append its keys/values
    to a `Cache`, so that text run later (ITG, Q-Former generation) attends to the queries without running them again.
    Cross-attention is given its keys and values (`key_value`, see `Blip2QFormerLayer`).
    """

    def __init__(self, config: Blip2QFormerConfig, is_cross_attention: bool = False, layer_idx: int | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # masks are always explicit (see `Blip2QFormerModel.build_self_attention_mask`)
        self.attention_dropout = config.attention_probs_dropout_prob
        kv_width = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states `[B, L, D]`; `key_value`: keys and values `[B, H, L_keys, d]` (cross-attention, from
        `project_key_value`), or None to attend to `hidden_states` (self-attention); additive mask
        `[B, 1, L, L_keys]`. Returns `[B, L, D]` and the attention probabilities (eager only)."""
        batch_size, seq_len, _ = hidden_states.shape
        query = self._heads(self.query(hidden_states))
        key, value = self.project_key_value(hidden_states) if key_value is None else key_value
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return attn_output.reshape(batch_size, seq_len, -1), attn_weights

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, L, D]` -> `[B, H, L, d]`."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def project_key_value(self, kv_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, L, D_kv]` -> keys and values `[B, H, L, d]`."""
        return self._heads(self.key(kv_states)), self._heads(self.value(kv_states))


class Blip2QFormerOutput(nn.Module):
    """BERT's sub-layer output: dense -> dropout -> LayerNorm(x + residual). After attention (`input_size` =
    hidden) it is the checkpoints' `attention.output`; after a feed-forward (`input_size` = intermediate) `output`."""

    def __init__(self, config: Blip2QFormerConfig, input_size: int):
        super().__init__()
        self.dense = nn.Linear(input_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class Blip2QFormerAttention(nn.Module):
    """Attention + residual + post-LayerNorm (BERT)."""

    def __init__(self, config: Blip2QFormerConfig, is_cross_attention: bool = False, layer_idx: int | None = None):
        super().__init__()
        self.attention = Blip2QFormerMultiHeadAttention(config, is_cross_attention, layer_idx)
        self.output = Blip2QFormerOutput(config, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.attention(hidden_states, attention_mask, key_value, cache)
        return self.output(attn_output, hidden_states), attn_weights


class Blip2QFormerIntermediate(nn.Module):
    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class Blip2QFormerLayer(GradientCheckpointingLayer):
    """One Q-Former layer. Self-attention is shared by queries and text (the mask decides who sees whom); then the
    first `query_length` positions (the queries) cross-attend to the image, if this layer has cross-attention, and go
    through the query FFN, while the text positions go through the text FFN (BERT's).

    The image comes as this layer's part of a `Blip2QFormerImage`: `encoder_hidden_states [N, P, Dv]`, which the
    layer projects, or `image_key` / `image_value` `[N, H, P, d]` projected beforehand; with `image_rows [B]`, row b
    attends to image `image_rows[b]` (else N = B). The image tensors come positionally, as inputs of an activation
    checkpoint: a reentrant one then backpropagates into a projection shared by several passes once, from outside,
    instead of from each layer's recompute. `encoder_attention_mask` is per row, `[B, 1, Q, P]`."""

    def __init__(self, config: Blip2QFormerConfig, layer_idx: int):
        super().__init__()
        self.attention = Blip2QFormerAttention(config, layer_idx=layer_idx)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = Blip2QFormerAttention(config, is_cross_attention=True, layer_idx=layer_idx)
        if config.use_qformer_text_input:
            self.intermediate = Blip2QFormerIntermediate(config)
            self.output = Blip2QFormerOutput(config, config.intermediate_size)
        self.intermediate_query = Blip2QFormerIntermediate(config)
        self.output_query = Blip2QFormerOutput(config, config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        image_key: torch.Tensor | None = None,
        image_value: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        image_rows: torch.LongTensor | None = None,
        query_length: int = 0,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        attention_output, self_weights = self.attention(hidden_states, attention_mask, cache=cache)
        query_part, text_part = attention_output[:, :query_length], attention_output[:, query_length:]
        outputs, cross_weights = [], None
        if query_length > 0:
            if self.has_cross_attention:
                cross = self.crossattention
                if image_key is None:
                    image_key, image_value = cross.attention.project_key_value(encoder_hidden_states)
                if image_rows is not None:  # each distinct image was projected once: give each row its own
                    image_key, image_value = image_key[image_rows], image_value[image_rows]
                query_part, cross_weights = cross(query_part, encoder_attention_mask, (image_key, image_value))
            outputs.append(self.output_query(self.intermediate_query(query_part), query_part))
        if text_part.shape[1] > 0:
            if not hasattr(self, "intermediate"):
                raise ValueError(
                    "Text was given to a Q-Former built without text feed-forward blocks: set "
                    "qformer_config.use_qformer_text_input=True (stage-2 checkpoints have no text weights)."
                )
            outputs.append(self.output(self.intermediate(text_part), text_part))
        layer_output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return layer_output, self_weights, cross_weights


class Blip2QFormerEncoder(nn.Module):
    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList([Blip2QFormerLayer(config, i) for i in range(config.num_hidden_layers)])


class Blip2TextEmbeddings(nn.Module):
    """Q-Former text embeddings: word + absolute position (positions count text only, never queries). The LayerNorm
    that BERT applies here is `qformer.layernorm`, applied to queries and text together. `[B, T]` -> `[B, T, D]`."""

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False
        )

    def forward(self, input_ids: torch.LongTensor, past_text_length: int = 0) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if past_text_length + seq_len > self.position_ids.shape[1]:
            raise ValueError(
                f"Text of {past_text_length + seq_len} tokens is longer than the Q-Former's "
                f"max_position_embeddings={self.position_ids.shape[1]}; truncate it."
            )
        position_ids = self.position_ids[:, past_text_length : past_text_length + seq_len]
        return self.word_embeddings(input_ids) + self.position_embeddings(position_ids)


def _reject_image_embeds_input(kwargs: dict[str, Any]) -> None:
    """Raise when `image_embeds` reaches a forward's `**kwargs`: the argument was renamed `frozen_image_states`.

    No alias is kept: in transformers (and in our outputs) `image_embeds` is the vision output *after*
    `post_layernorm`, so a tensor passed under that name is ambiguous, and one in the transformers sense would get
    the LayerNorm a second time."""
    if "image_embeds" in kwargs:
        raise TypeError(
            "`image_embeds` is not an input: pass the frozen encoder's output before `post_layernorm` "
            "(`encode_image_frozen`, a feature cache) as `frozen_image_states`."
        )


# What `local_model_folder` downloads of a Hub repository: configs, tokenizer and processor files, safetensors weights
# (never pickled `.bin` / `.pt` files).
MODEL_FOLDER_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "merges.txt", "vocab.*")


def local_model_folder(name_or_path: str | os.PathLike, what: str = "model") -> Path:
    """A local folder as it is, or a Hub repository id downloaded into the Hugging Face cache (`MODEL_FOLDER_FILES`),
    for code that reads a folder file by file (safetensors tensor by tensor, configs beside them). A path that is
    neither is a `FileNotFoundError` naming `what` and the download error."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{what} {name_or_path} is a file; expected a folder or a Hub repository id.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=list(MODEL_FOLDER_FILES)))
    except Exception as error:  # HFValidationError, RepositoryNotFoundError, offline mode, connection errors
        raise FileNotFoundError(
            f"{what} {name_or_path}: no such local folder, and not a Hub repository that could be downloaded "
            f"({type(error).__name__}: {error})"
        ) from error


def read_safetensors_folder(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a `save_pretrained` folder (one `model.safetensors` or shards with an index). Safetensors only:
    nothing is unpickled."""
    from safetensors.torch import load_file

    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(single)
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder} holds neither model.safetensors nor model.safetensors.index.json.")
    import json

    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state_dict.update(load_file(folder / shard))
    return state_dict


def checkpoint_keys_as_model_keys(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` read from a saved folder, renamed as `model`'s own parameters are named. transformers 5 saves some
    families under their legacy names and renames them while loading (DINOv2's `attention.attention.key` is the
    module `attention.k_proj`), so a folder read tensor by tensor must be renamed the same way, with the renamings
    transformers registers for `model` and each of its sub-models (scoped to their prefix). A tensor that needs more
    than a renaming (a split or merge) is an error naming it."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # a transformers without conversion mappings saves under the module names
        return tensors
    transforms = get_model_conversion_mapping(model)
    if not transforms:
        return tensors
    renamings = [transform for transform in transforms if isinstance(transform, WeightRenaming)]
    converters = [transform for transform in transforms if not isinstance(transform, WeightRenaming)]
    renamed = {}
    for key, tensor in tensors.items():
        new_key, converter = rename_source_key(key, renamings, converters)
        if converter is not None:
            raise ValueError(
                f"{key}: this tensor must be converted (pattern {converter!r}), not only renamed, to load into "
                f"{type(model).__name__}; load the folder with from_pretrained instead."
            )
        renamed[new_key] = tensor
    return renamed


class CheckpointMismatchError(Exception):
    """A checkpoint whose tensors do not fit the class loading it: tensors missing (they would start random),
    unexpected (they would be dropped) or of another shape, beyond the differences `Blip2PreTrainedModel.from_pretrained`
    documents. The message is one line naming the tensors (the first few of each kind, with their count).

    Not a ValueError or OSError on purpose: `transformers.pipeline` catches those from one model class and tries the
    next, and the classes it tries include transformers' own `Blip2ForConditionalGeneration` (named by the config's
    `architectures`), which would load the same folder with random tensors."""


# Unexpected tensors that carry nothing: buffers every model rebuilds at construction (`arange`), which older
# checkpoints saved (transformers drops them only for models that still have such a buffer).
_HARMLESS_UNEXPECTED = re.compile(r"(^|\.)position_ids$")
# Missing tensors with a documented start: the learnable ITC temperature, which transformers' port of retrieval does
# not have (Salesforce/blip2-itm-vit-g), starts at `config.initial_temperature`, LAVIS's initial value.
_TOLERATED_MISSING = frozenset({"temp"})
_SHOWN_KEYS = 5


def _some(keys: Sequence[str], what: str) -> str:
    """`"3 tensors missing (a, b, c)"`: the count, `what`, and the first `_SHOWN_KEYS` names."""
    more = ", ..." if len(keys) > _SHOWN_KEYS else ""
    return f"{len(keys)} {'tensor' if len(keys) == 1 else 'tensors'} {what} ({', '.join(keys[:_SHOWN_KEYS])}{more})"


class _WithoutLoadReport(python_logging.Filter):
    """Drops transformers' multi-line load report (a table of missing / unexpected / mismatched tensors): a strict
    load raises one line naming them instead, and logs what it tolerates itself."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


# ---------------------------------------------------------------------------------------------------------------------
# Base class
# ---------------------------------------------------------------------------------------------------------------------


class Blip2PreTrainedModel(PreTrainedModel):
    config_class = Blip2Config
    base_model_prefix = "blip"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_attention_backend = True
    _supports_sdpa = True
    # The Q-Former runs in fp32 and uses explicit additive masks: flash attention cannot serve it.
    _supports_flash_attn = False
    _supports_flex_attn = False
    _no_split_modules = ["Blip2VisionEmbeddings", "Blip2EncoderLayer", "Blip2QFormerLayer", "Blip2TextEmbeddings"]
    # LAVIS's mixed precision: the frozen towers may be half precision, the trainable bridge stays fp32 (for fp16
    # *and* bf16; transformers' port keeps only `query_tokens`/`qformer` in fp32, and only under fp16). Each model
    # lists its own bridge modules: transformers matches the entries as patterns anywhere in a weight's name, so an
    # entry a class does not have could catch a frozen tower's weights (an LLM's `embeddings.word_embeddings`).
    _keep_in_fp32_modules_strict: list[str] = []

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args: Any, strict: bool = True, **kwargs
    ) -> PreTrainedModel | tuple[PreTrainedModel, dict[str, Any]]:
        """`PreTrainedModel.from_pretrained`, strict: a checkpoint that lacks tensors this class needs, holds tensors
        it does not know, or holds one of another shape raises `CheckpointMismatchError` naming them, instead of
        transformers' warning and random weights. Auto classes, pipelines, the CLI and the evaluation scripts load
        through here.

        What still loads (the documented differences between stages and formats):
        - tensors transformers itself leaves out: tied weights (an LLM's `lm_head` tied to its input embeddings, the
          stage-1 ITG decoder tied to the Q-Former's word embeddings) and a class's `_keys_to_ignore_on_load_*`, e.g.
          the ITG head (`cls.predictions.*`) of a stage-1 folder loaded into `Blip2ForImageTextRetrieval`;
        - `position_ids` buffers an older checkpoint saved (rebuilt at construction);
        - no `temp` (transformers' `Blip2ForImageTextRetrieval` checkpoints, e.g. Salesforce/blip2-itm-vit-g, have
          no learnable temperature): it starts at `config.initial_temperature`, with a warning.
        Everything else is an error, e.g. a stage-1 folder loaded into `Blip2ForConditionalGeneration` (its LLM and
        `language_projection` would be random: build stage 2 with `Blip2ForConditionalGeneration.from_stage1`), or a
        retrieval folder loaded into `Blip2ForPreTraining` (no ITG head). A folder with a LoRA adapter is checked on
        its base weights (peft loads the adapter). An unreadable safetensors file (truncated) is an `OSError` naming
        the checkpoint.

        Args:
            strict: False restores transformers' behaviour for users who mean it: missing tensors are initialized at
                random, unexpected ones dropped, and both listed in transformers' load report.
            ignore_mismatched_sizes: True (transformers' switch) also lets tensors of another shape be re-initialized
                under `strict`, with a warning naming them.
        """
        if not strict:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
            (loaded[0] if isinstance(loaded, tuple) else loaded).__dict__.pop("_base_loading_info", None)
            return loaded
        wants_info = kwargs.pop("output_loading_info", False)
        check_shapes = not kwargs.get("ignore_mismatched_sizes", False)
        kwargs["ignore_mismatched_sizes"] = True  # shapes are checked below, with the tensors named on one line
        report_filter = _WithoutLoadReport()
        transformers_logger = logging.get_logger("transformers.modeling_utils")
        transformers_logger.addFilter(report_filter)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except Exception as error:
            if type(error).__name__ != "SafetensorError":  # safetensors' error type, not importable as remote code
                raise
            raise OSError(
                f"{pretrained_model_name_or_path}: a weight file is not readable safetensors (truncated or damaged?): "
                f"{error}"
            ) from error
        finally:
            transformers_logger.removeFilter(report_filter)
        # the base model's tensors (transformers returns a LoRA adapter's loading info when the folder holds one)
        base_info = model.__dict__.pop("_base_loading_info", None) or info
        cls._check_loaded_tensors(model, base_info, pretrained_model_name_or_path, check_shapes)
        return (model, info) if wants_info else model

    @staticmethod
    def _check_loaded_tensors(
        model: PreTrainedModel, info: dict[str, Any], name: str | os.PathLike | None, check_shapes: bool
    ) -> None:
        """Raise `CheckpointMismatchError` for the missing, unexpected and (when `check_shapes`) mismatched tensors
        of a load's `info` (transformers' loading info) beyond what `from_pretrained` documents; warn about those it
        tolerates."""
        missing = sorted(set(info["missing_keys"]) - _TOLERATED_MISSING)
        unexpected = sorted(info["unexpected_keys"])
        mismatched = [f"{key} {tuple(ckpt)} vs {tuple(own)}" for key, ckpt, own in info["mismatched_keys"]]
        problems = [_some(missing, "missing")] if missing else []
        problems += [_some(unexpected, "unexpected")] if unexpected else []
        if mismatched and check_shapes:
            problems.append(_some(mismatched, "of another shape, checkpoint vs model"))
        if problems:
            hint = ""
            if any(key.startswith("language_model.") for key in missing):
                hint = (
                    " (a stage-1 folder becomes stage 2 with Blip2ForConditionalGeneration.from_stage1(folder, llm))"
                )
            raise CheckpointMismatchError(
                f"{name}: the checkpoint does not match {type(model).__name__}: {'; '.join(problems)}{hint}. "
                "Pass strict=False to from_pretrained to load it anyway (missing tensors random, unexpected dropped)."
            )
        tolerated = sorted(set(info["missing_keys"]) & _TOLERATED_MISSING)
        if tolerated:
            logger.warning(
                f"{name} has no {', '.join(tolerated)} (a transformers Blip2ForImageTextRetrieval checkpoint): "
                f"temp starts at config.initial_temperature={model.config.initial_temperature}."
            )
        if mismatched:
            logger.warning(
                f"{name}: ignore_mismatched_sizes=True re-initialized {_some(mismatched, 'of another shape')}"
            )

    def _adjust_missing_and_unexpected_keys(self, loading_info: Any) -> None:
        """transformers' hook after the weights are in: also drop `position_ids` buffers from the unexpected tensors
        (see `from_pretrained`), and keep a copy of the result for `from_pretrained`'s check (a LoRA adapter loaded
        afterwards replaces the loading info transformers returns)."""
        super()._adjust_missing_and_unexpected_keys(loading_info)
        loading_info.unexpected_keys = {
            key for key in loading_info.unexpected_keys if not _HARMLESS_UNEXPECTED.search(key)
        }
        self._base_loading_info = {
            "missing_keys": set(loading_info.missing_keys),
            "unexpected_keys": set(loading_info.unexpected_keys),
            "mismatched_keys": list(loading_info.mismatched_keys),
        }

    def _output_flags(
        self, output_attentions: bool | None, output_hidden_states: bool | None, return_dict: bool | None
    ) -> tuple[bool, bool, bool]:
        """transformers' rule for the three output switches: the keyword when given, else this model's config (a
        composite model's own config, whose answer it then passes explicitly to its towers)."""
        config = self.config
        return (
            bool(config.output_attentions if output_attentions is None else output_attentions),
            bool(config.output_hidden_states if output_hidden_states is None else output_hidden_states),
            bool(config.return_dict if return_dict is None else return_dict),
        )

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus the remote code: the composite models write the full `auto_map`
        (and, for generation, the `image-to-text` pipeline entry) and copy this package's model files beside the
        weights. `push_to_hub` goes through here too. Refuses (ValueError, nothing written) when a tensor to save is
        NaN/inf: a diverged model must not look like a trained one."""
        state_dict = kwargs.get("state_dict")
        bad = nonfinite_tensor_names(self.state_dict() if state_dict is None else state_dict)
        if bad:
            raise ValueError(
                f"Not saving to {save_directory}: {len(bad)} tensor(s) hold NaN or inf values: {name_some(bad)}. "
                f"The model diverged (or was loaded so); save weights from before it did."
            )
        if isinstance(self.config, Blip2Config):
            set_auto_map(self.config, self.can_generate())
        super().save_pretrained(save_directory, *args, **kwargs)
        if isinstance(self.config, Blip2Config) and kwargs.get("is_main_process", True):
            copy_remote_code(save_directory)

    def post_init(self) -> None:
        """`PreTrainedModel.post_init`, after building this class's `_keep_in_fp32_modules_strict` entries in fp32:
        transformers upcasts them only when it loads weights, so a model built under another default dtype
        (`torch.set_default_dtype`, `from_config(dtype=...)`) would otherwise hold a half-precision bridge. A no-op
        in fp32: the weights, their random initialization and checkpoints stay as they are."""
        for entry in type(self)._keep_in_fp32_modules_strict:
            try:
                self.get_submodule(entry).float()
            except AttributeError:  # a parameter of this model (`query_tokens`, `temp`), not a module
                param = self.get_parameter(entry)
                param.data = param.data.float()
        super().post_init()

    def _get_dtype_plan(self, dtype: torch.dtype) -> dict:
        """transformers' plan of the tensors loaded in fp32 whatever `dtype` is asked, with this class's own
        `_keep_in_fp32_modules_strict` entries anchored at the top of a weight's name: transformers matches them
        anywhere, and a transformers image encoder has names of its own that contain them (DINOv2's
        `backbone.embeddings.position_embeddings` and `cls_token`), which must stay in the frozen tower's dtype."""
        plan = super()._get_dtype_plan(dtype)
        for entry in type(self)._keep_in_fp32_modules_strict:
            if entry in plan:
                plan[rf"^{re.escape(entry)}(?:\.|$)"] = plan.pop(entry)
        return plan

    def _init_weights(self, module: nn.Module) -> None:
        # Linear / Embedding: normal(0, initializer_range); LayerNorm: 1, 0. A transformers image encoder
        # (`Blip2BackboneVisionModel.backbone`) is a model of its own: transformers initializes it with its own
        # `_init_weights`, never this one.
        super()._init_weights(module)
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, Blip2VisionEmbeddings):
            init.trunc_normal_(module.position_embedding, mean=0.0, std=std)
            init.trunc_normal_(module.class_embedding, mean=0.0, std=std)
        elif isinstance(module, Blip2TextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
        if hasattr(module, "query_tokens") and isinstance(module.query_tokens, nn.Parameter):
            # normal(0, 0.02) as LAVIS: transformers' zero init makes the first LayerNorm's gradient explode.
            init.normal_(module.query_tokens, mean=0.0, std=self.config.qformer_config.initializer_range)
        if hasattr(module, "temp") and isinstance(module.temp, nn.Parameter):
            init.constant_(module.temp, self.config.initial_temperature)
        if isinstance(module, Blip2QFormerLMPredictionHead):
            init.zeros_(module.bias)


FROZEN_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def frozen_tower_dtype(precision: str, config: Blip2Config, device: torch.device | str | None = None) -> torch.dtype:
    """The dtype BLIP-2's frozen towers run in, for training, evaluation and the feature cache alike: `precision`
    "fp16" / "bf16" / "fp32", or "auto": fp32 on CPU (`device`, default CUDA when available), else bf16 for an
    encoder-decoder LLM (Flan-T5 overflows in fp16) and fp16 otherwise, as LAVIS runs them."""
    if precision == "auto":
        device_type = (
            torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        if device_type == "cpu":
            return torch.float32
        text_config = getattr(config, "text_config", None)
        return torch.bfloat16 if text_config is not None and text_config.is_encoder_decoder else torch.float16
    if precision not in FROZEN_PRECISIONS:
        raise ValueError(f"frozen precision {precision!r}: expected one of auto, {', '.join(FROZEN_PRECISIONS)}.")
    return FROZEN_PRECISIONS[precision]


def nonfinite_tensor_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in `tensors` that hold a NaN or an infinity, in order. Tensors on the meta
    device (no values) and integer ones (quantized weights) are skipped."""
    return [
        name
        for name, tensor in tensors.items()
        if (tensor.is_floating_point() or tensor.is_complex())
        and tensor.device.type != "meta"
        and not bool(torch.isfinite(tensor).all())
    ]


def name_some(names: Sequence[str], first: int = 5) -> str:
    """`names` for a message: the first few, then how many in all."""
    shown = ", ".join(names[:first])
    return f"{shown} ... ({len(names)} in all)" if len(names) > first else shown


class Blip2FrozenTowersMixin:
    """The one contract for BLIP-2's frozen towers, on the models that hold an image encoder (and an LLM): which
    modules are frozen (`frozen_towers`), how (`freeze_towers`: no gradients, eval mode, a dtype), and the frozen
    encoder's output (`encode_image_frozen`) with the trainable `post_layernorm` over it."""

    # Towers that training keeps frozen; `train()` leaves each in eval mode while none of its parameters trains
    # (LAVIS's `disabled_train`): the frozen ViT and LLM never run dropout or update statistics.
    # (`vision_model.backbone`: a transformers vision model as the image encoder, `Blip2BackboneVisionModel`)
    frozen_towers = ("vision_model.embeddings", "vision_model.encoder", "vision_model.backbone", "language_model")

    def train(self, mode: bool = True) -> Blip2PreTrainedModel:
        super().train(mode)
        if mode:
            for name in self.frozen_towers:
                try:
                    tower = self.get_submodule(name)
                except AttributeError:
                    continue
                if not any(param.requires_grad for param in tower.parameters()):
                    tower.eval()
        return self

    def freeze_towers(self, dtype: torch.dtype | None = None) -> None:
        """Freeze every tower of `frozen_towers` this model has: the image encoder but its `post_layernorm` (LAVIS's
        trainable `ln_vision`) and the LLM get no gradients and stay in eval mode, their weights cast to `dtype`
        (`frozen_tower_dtype`; None keeps theirs). LoRA adapters inside them (`lora_*` parameters) keep training,
        in their own dtype."""
        self._freeze(self.frozen_towers, dtype)

    def freeze_vision_encoder(self) -> None:
        """`freeze_towers` for the image encoder alone."""
        self._freeze([name for name in self.frozen_towers if name.startswith("vision_model.")], None)

    def _freeze(self, names: Sequence[str], dtype: torch.dtype | None) -> None:
        for name in names:
            try:
                tower = self.get_submodule(name)
            except AttributeError:
                continue
            for param_name, param in tower.named_parameters():
                if "lora_" in param_name:
                    continue
                param.requires_grad_(False)
                if dtype is not None:
                    param.data = param.data.to(dtype)
            if not any(param.requires_grad for param in tower.parameters()):
                tower.eval()

    def encode_image_frozen(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """The frozen encoder's selected features `[B, T, Dv]` (EVA: `[B, 1 + P, Dv]`) before the trainable
        `post_layernorm`, without autograd: what a frozen-feature cache stores and what
        `forward(frozen_image_states=...)` takes (`vision_model.encode_frozen`)."""
        return self.vision_model.encode_frozen(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)

    def _image_embeds(
        self, pixel_values: torch.Tensor | None, frozen_image_states: torch.Tensor | None
    ) -> torch.Tensor:
        """The image embeddings `[B, 1 + P, Dv]` (`post_layernorm` over the frozen encoder's output), from images or
        from cached `frozen_image_states`."""
        if (pixel_values is None) == (frozen_image_states is None):
            raise ValueError("Pass exactly one of pixel_values and frozen_image_states (the frozen encoder's output).")
        if frozen_image_states is None:
            frozen_image_states = self.encode_image_frozen(pixel_values)
        layer_norm = self.vision_model.post_layernorm
        return layer_norm(frozen_image_states.to(layer_norm.weight.dtype))


# ---------------------------------------------------------------------------------------------------------------------
# The two towers as models of their own
# ---------------------------------------------------------------------------------------------------------------------


def select_vision_features(
    outputs: ModelOutput, feature_layer: int, num_prefix_tokens: int | None, strategy: str
) -> torch.Tensor:
    """The image features BLIP-2 takes from an encoder's output: `last_hidden_state` (`feature_layer=-1`) or
    `hidden_states[feature_layer]`, a convolutional map `[B, C, h, w]` flattened row-major to `[B, h * w, C]`, and
    for `strategy="patch"` without the `num_prefix_tokens` leading tokens (`[CLS]`, registers). -> `[B, T, Dv]`."""
    states = outputs.last_hidden_state if feature_layer == -1 else outputs.hidden_states[feature_layer]
    if states.dim() == 4:
        states = states.flatten(2).transpose(1, 2)
    if strategy == "patch" and num_prefix_tokens:
        states = states[:, num_prefix_tokens:]
    return states


def _pooled(image_embeds: torch.Tensor, keeps_cls: bool) -> torch.Tensor:
    """`[B, T, Dv]` -> `[B, Dv]`: the `[CLS]` position where the tokens have one, else their mean."""
    return image_embeds[:, 0] if keeps_cls else image_embeds.mean(dim=1)


class Blip2VisionModel(Blip2PreTrainedModel):
    """The image encoder in the EVA layout. `pixel_values [B, 3, H, W]` -> `last_hidden_state [B, 1 + P, Dv]` (after
    `post_layernorm`, LAVIS's `ln_vision`), `pooler_output [B, Dv]` (the `[CLS]` position, normed once more, as
    transformers). `feature_layer` / `select_strategy` are `Blip2Config.vision_feature_layer` /
    `vision_feature_select_strategy` (defaults: the last block's output, every token: BLIP-2's)."""

    config_class = Blip2VisionConfig
    input_modalities = ("image",)
    _keep_in_fp32_modules_strict = []

    def __init__(self, config: Blip2VisionConfig, feature_layer: int = -1, select_strategy: str = "full"):
        super().__init__(config)
        self.embeddings = Blip2VisionEmbeddings(config)
        self.encoder = Blip2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def _encoder_outputs(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, BaseModelOutput]:
        """`(selected features [B, T, Dv] before post_layernorm, the encoder's output)`."""
        encoder_outputs = self.encoder(
            self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding),
            output_hidden_states=output_hidden_states or self.feature_layer != -1,
            output_attentions=output_attentions,
        )
        return select_vision_features(encoder_outputs, self.feature_layer, 1, self.select_strategy), encoder_outputs

    def encode_frozen(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """`[B, 3, H, W]` -> the frozen encoder's selected features `[B, T, Dv]` before `post_layernorm`, without
        autograd (what a frozen-feature cache stores)."""
        with torch.no_grad():
            return self._encoder_outputs(pixel_values, interpolate_pos_encoding)[0]

    def pool(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """`pooler_output [B, Dv]` of `last_hidden_state [B, T, Dv]`: the `[CLS]` position normed once more (as
        transformers' BLIP-2), or the mean over the patch tokens when the strategy drops `[CLS]`."""
        if self.select_strategy == "patch":
            return _pooled(image_embeds, keeps_cls=False)
        return self.post_layernorm(image_embeds[:, 0])

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        selected, encoder_outputs = self._encoder_outputs(
            pixel_values, interpolate_pos_encoding, output_hidden_states, output_attentions
        )
        # a frozen encoder may run in half precision while `post_layernorm` trains in fp32
        last_hidden_state = self.post_layernorm(selected.to(self.post_layernorm.weight.dtype))
        output = BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=self.pool(last_hidden_state),
            hidden_states=encoder_outputs.hidden_states if output_hidden_states else None,
            attentions=encoder_outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


def _backbone_from_config(config: PreTrainedConfig) -> PreTrainedModel:
    """`AutoModel.from_config(config)`, in eager attention when the model has no other (ConvNeXt, a CNN, has no
    attention at all): the composite model passes its own choice (sdpa) down to every sub-config."""
    model_class = AutoModel._model_mapping[type(config)]
    other_kernels = ("_supports_sdpa", "_supports_flash_attn", "_supports_flex_attn")
    if not any(getattr(model_class, flag, False) for flag in other_kernels):
        return AutoModel.from_config(config, attn_implementation="eager")
    return AutoModel.from_config(config)


class Blip2BackboneVisionModel(Blip2PreTrainedModel):
    """Any transformers vision model as BLIP-2's frozen image encoder: `backbone` is what `AutoModel.from_config`
    builds of `config` (`SiglipVisionModel`, `CLIPVisionModel`, `Dinov2Model`, `ConvNextModel`, ...; its weights
    keep that model's own names under `vision_model.backbone.`), `post_layernorm` our trainable LayerNorm over the
    selected features (LAVIS's `ln_vision`).

    `pixel_values [B, 3, H, W]` -> `last_hidden_state [B, T, Dv]` (`post_layernorm` over the `feature_layer`'s
    `select_strategy` tokens; a ConvNeXt map's `h * w` positions row-major), `pooler_output [B, Dv]` (the `[CLS]`
    position where the tokens keep one, else their mean). Load the backbone's own checkpoint with `load_backbone`.
    """

    config_class = PreTrainedConfig
    input_modalities = ("image",)
    _keep_in_fp32_modules_strict = []

    def __init__(self, config: PreTrainedConfig, feature_layer: int | None = None, select_strategy: str = "full"):
        super().__init__(config)
        family = vision_family(config)
        self.backbone = _backbone_from_config(config)
        self.feature_layer = family.feature_layer if feature_layer is None else feature_layer
        self.select_strategy = select_strategy
        self.num_prefix_tokens = None if family.prefix_tokens is None else family.prefix_tokens(config)
        widths = vision_layer_widths(config)
        width = widths[self.feature_layer] if widths is not None else config.hidden_size
        self.post_layernorm = nn.LayerNorm(width, eps=getattr(config, "layer_norm_eps", 1e-5))
        # CLIP and SigLIP take the switch (their position embeddings are for one size); DINOv2 always interpolates
        # and ConvNeXt has none, so any size works there
        self._takes_interpolate = "interpolate_pos_encoding" in inspect.signature(self.backbone.forward).parameters
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def _backbone_outputs(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ModelOutput:
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must have shape [batch, 3, height, width], got {tuple(pixel_values.shape)}"
            )
        kwargs = {}
        if self._takes_interpolate:
            self._check_image_size(pixel_values, interpolate_pos_encoding)
            kwargs["interpolate_pos_encoding"] = interpolate_pos_encoding
        elif interpolate_pos_encoding:
            raise ValueError(
                f"interpolate_pos_encoding=True, but {type(self.backbone).__name__} has no such option (it takes "
                "images of any size as they are): leave it False."
            )
        if output_attentions:
            kwargs["output_attentions"] = True
        return self.backbone(
            pixel_values=pixel_values.to(self.backbone.dtype),
            output_hidden_states=output_hidden_states or self.feature_layer != -1,
            return_dict=True,
            **kwargs,
        )

    def _check_image_size(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> None:
        size = self.config.image_size
        expected = (size, size) if isinstance(size, int) else tuple(size)
        if not interpolate_pos_encoding and tuple(pixel_values.shape[-2:]) != expected:
            raise ValueError(
                f"pixel_values are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} but the "
                f"{type(self.backbone).__name__} position embeddings are for {expected[0]}x{expected[1]} "
                "(vision_config.image_size); resize the images or pass interpolate_pos_encoding=True."
            )

    def _select(self, outputs: ModelOutput) -> torch.Tensor:
        return select_vision_features(outputs, self.feature_layer, self.num_prefix_tokens, self.select_strategy)

    def encode_frozen(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """`[B, 3, H, W]` -> the frozen backbone's selected features `[B, T, Dv]` before `post_layernorm`, without
        autograd (what a frozen-feature cache stores)."""
        with torch.no_grad():
            return self._select(self._backbone_outputs(pixel_values, interpolate_pos_encoding))

    def pool(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """`pooler_output [B, Dv]` of `last_hidden_state [B, T, Dv]`: the `[CLS]` position where the selected tokens
        start with one, else the mean over the tokens."""
        return _pooled(image_embeds, keeps_cls=bool(self.num_prefix_tokens) and self.select_strategy == "full")

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        outputs = self._backbone_outputs(
            pixel_values, interpolate_pos_encoding, output_hidden_states, output_attentions
        )
        last_hidden_state = self.post_layernorm(self._select(outputs).to(self.post_layernorm.weight.dtype))
        output = BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=self.pool(last_hidden_state),
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=getattr(outputs, "attentions", None),
        )
        return output if return_dict else output.to_tuple()

    def load_backbone(self, path_or_model: str | os.PathLike | nn.Module) -> None:
        """Load the backbone's weights from its family's own checkpoint: a folder (`SiglipVisionModel` /
        `AutoModel.save_pretrained`, or a larger model that holds this one: a two-tower `SiglipModel` / `CLIPModel`, a
        `ConvNextForImageClassification`, whose other tower and heads are left out) or a loaded model of the
        backbone's class (its state dict as is). Every backbone tensor is required: a missing one, one of another
        shape, or an unexpected one inside the backbone's own modules (e.g. a deeper encoder's extra layers) is a
        `ValueError` naming the source and keys."""
        own = self.backbone.state_dict()
        if isinstance(path_or_model, nn.Module):
            name, state = type(path_or_model).__name__, path_or_model.state_dict()
            missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            mismatched = [
                f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
                for key in sorted(set(own) & set(state))
                if state[key].shape != own[key].shape
            ]
        else:
            name = str(path_or_model)
            state, missing, unexpected, mismatched = self._read_backbone_folder(path_or_model)
        problems = [_some(missing, "missing")] if missing else []
        problems += [_some(unexpected, "unexpected")] if unexpected else []
        problems += [_some(mismatched, "of another shape, checkpoint vs backbone")] if mismatched else []
        if problems:
            raise ValueError(
                f"{name}: not the weights of this {type(self.backbone).__name__} "
                f"({self.config.model_type}): {'; '.join(problems)}."
            )
        self.backbone.load_state_dict({key: state[key] for key in own}, strict=True)

    def _read_backbone_folder(
        self, folder: str | os.PathLike
    ) -> tuple[dict[str, torch.Tensor], list[str], list[str], list[str]]:
        """`(state dict in the backbone's names, missing, unexpected, mismatched)` of a checkpoint folder, read by the
        backbone class's own `from_pretrained` (which maps a larger model's names onto it) into this architecture.
        Unexpected tensors outside the backbone's top-level modules (another tower, a task head) are dropped."""
        backbone_class = type(self.backbone)
        report_filter = _WithoutLoadReport()
        transformers_logger = logging.get_logger("transformers.modeling_utils")
        transformers_logger.addFilter(report_filter)
        try:
            loaded, info = backbone_class.from_pretrained(
                folder, config=self.backbone.config, ignore_mismatched_sizes=True, output_loading_info=True
            )
        finally:
            transformers_logger.removeFilter(report_filter)
        roots = {key.split(".")[0] for key in self.backbone.state_dict()}
        prefix = f"{backbone_class.base_model_prefix}."
        unexpected = sorted(key for key in info["unexpected_keys"] if key.removeprefix(prefix).split(".")[0] in roots)
        dropped = len(info["unexpected_keys"]) - len(unexpected)
        if dropped:
            logger.info(
                f"{folder}: {dropped} tensors outside the {backbone_class.__name__} (other towers, heads) left out"
            )
        mismatched = [f"{key} {tuple(ckpt)} vs {tuple(ours)}" for key, ckpt, ours in info["mismatched_keys"]]
        return loaded.state_dict(), sorted(info["missing_keys"]), unexpected, mismatched


def build_vision_model(config: Blip2Config) -> Blip2VisionModel | Blip2BackboneVisionModel:
    """The image encoder of a BLIP-2 config: ours for a `Blip2VisionConfig` (EVA), a `Blip2BackboneVisionModel`
    around transformers' own model for any other vision config; the features its config selects."""
    # by model type, not class: loaded as remote code, the config's module may be another copy of ours
    ours = config.vision_config.model_type == Blip2VisionConfig.model_type
    vision_class = Blip2VisionModel if ours else Blip2BackboneVisionModel
    return vision_class._from_config(
        config.vision_config,
        feature_layer=config.vision_feature_layer,
        select_strategy=config.vision_feature_select_strategy,
    )


class Blip2QFormerModel(Blip2PreTrainedModel):
    """The Querying Transformer on embeddings: learned queries and/or embedded text in, one sequence
    `[queries; text]` out. Which position sees which is set by `self_attention_mask`:

    - `"bidirectional"` (ITM): every position sees every other;
    - `"unimodal"` (ITC): queries see queries, text sees text;
    - `"multimodal_causal"` (ITG): queries see queries only; text sees all queries and the text before it.

    Only queries cross-attend to the image. With `use_cache=True` the self-attention keys/values are kept in
    `cache`; a later call with that `cache` sees every cached position (queries, then any text already run) in all
    masks but `"unimodal"`, so text can be decoded against the queries without running them again. Likewise
    `project_image` projects images to every layer's cross-attention keys/values once, for several calls to share.
    """

    config_class = Blip2QFormerConfig
    _keep_in_fp32_modules_strict = []

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = Blip2QFormerEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> None:
        return None  # queries and text embeddings live in the models that own them

    def project_image(
        self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None
    ) -> Blip2QFormerImage:
        """Every layer's cross-attention keys and values of `encoder_hidden_states [N, P, Dv]` (`[N, H, P, d]` per
        layer), with the patch mask `[N, P]` if any, as a `Blip2QFormerImage` to pass as `encoder_hidden_states`:
        several passes over the same images (stage 1's query pass and its ITM pass) then project them once."""
        states = encoder_hidden_states.to(self.layernorm.weight.dtype)
        key_values = [
            layer.crossattention.attention.project_key_value(states) if layer.has_cross_attention else None
            for layer in self.encoder.layer
        ]
        return Blip2QFormerImage(key_values=key_values, attention_mask=encoder_attention_mask)

    def _image_input(
        self,
        encoder_hidden_states: torch.Tensor | Blip2QFormerImage | None,
        encoder_attention_mask: torch.Tensor | None,
        batch_size: int,
        query_length: int,
    ) -> Blip2QFormerImage | None:
        """`forward`'s image argument as one `Blip2QFormerImage` (states in the Q-Former's dtype), checked."""
        if encoder_hidden_states is None:
            if query_length > 0 and self.config.num_hidden_layers > 0:
                raise ValueError(
                    "Queries cross-attend to the image: pass encoder_hidden_states [batch, patches, width]."
                )
            return None
        if not isinstance(encoder_hidden_states, Blip2QFormerImage):
            image = Blip2QFormerImage(states=encoder_hidden_states, attention_mask=encoder_attention_mask)
        elif encoder_attention_mask is not None:
            raise ValueError(
                "encoder_hidden_states is a Blip2QFormerImage: give its patch mask as its attention_mask, not as "
                "encoder_attention_mask."
            )
        else:
            image = encoder_hidden_states
            if image.rows is not None and len(image) != batch_size:
                raise ValueError(
                    f"encoder_hidden_states.rows has shape {tuple(image.rows.shape)}; expected [{batch_size}]: the "
                    "image of each row of the batch."
                )
            if image.key_values is not None and len(image.key_values) != self.config.num_hidden_layers:
                raise ValueError(
                    f"encoder_hidden_states.key_values has {len(image.key_values)} entries; expected "
                    f"{self.config.num_hidden_layers}, one per layer, as project_image returns."
                )
        if image.states is not None:
            image = replace(image, states=image.states.to(self.layernorm.weight.dtype))
        return image

    def _self_mask(
        self,
        mask_type: SelfAttentionMask,
        attention_mask: torch.Tensor | None,
        hidden_states: torch.Tensor,
        query_length: int,
        past_length: int,
    ) -> torch.Tensor | None:
        """`build_self_attention_mask` for `hidden_states [B, Q + T, D]` after `past_length` cached positions, with
        `attention_mask` given for the text alone `[B, T]` or for everything `[B, past + Q + T]`."""
        batch_size, length = hidden_states.shape[:2]
        if attention_mask is not None and attention_mask.shape[1] == length - query_length:
            # text only: queries and the past are never padding
            attention_mask = torch.cat(
                [attention_mask.new_ones(batch_size, past_length + query_length), attention_mask], dim=1
            )
        elif attention_mask is not None and attention_mask.shape[1] != past_length + length:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[1]} columns; expected {length - query_length} (text "
                f"tokens) or {past_length + length} (cached {past_length} + queries {query_length} + text "
                f"{length - query_length})."
            )
        return self.build_self_attention_mask(
            mask_type,
            query_length,
            length - query_length,
            past_length,
            attention_mask,
            hidden_states.dtype,
            hidden_states.device,
        )

    @staticmethod
    def build_self_attention_mask(
        mask_type: SelfAttentionMask,
        query_length: int,
        text_length: int,
        past_length: int = 0,
        padding_mask: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> torch.Tensor | None:
        """The additive self-attention mask `[B, 1, Q + T, past + Q + T]` for `query_length` queries followed by
        `text_length` text tokens, after `past_length` cached positions; `padding_mask [B, past + Q + T]` is 1 for real
        tokens. Returns None when nothing is masked (lets sdpa take its fastest path), which is decided from the
        lengths alone: a `padding_mask` is always applied, even one without padding, since testing its values would
        sync with the host (on a GPU, every Q-Former pass of a training step would wait for the device)."""
        if mask_type not in ("bidirectional", "unimodal", "multimodal_causal"):
            raise ValueError(
                f"self_attention_mask={mask_type!r}: expected 'bidirectional', 'unimodal' or 'multimodal_causal'"
            )
        if mask_type == "unimodal" and past_length > 0:
            raise ValueError(
                "The unimodal (ITC) mask keeps queries and text apart, so it cannot be used with a cache: run "
                "queries and text without one."
            )
        length = query_length + text_length
        index = torch.arange(length, device=device)
        is_query = index < query_length
        if mask_type == "bidirectional":
            allowed = torch.ones(length, length, dtype=torch.bool, device=device)
        elif mask_type == "unimodal":
            allowed = is_query[:, None] == is_query[None, :]
        else:  # a query row sees the queries; a text row sees the queries and itself and the text before it
            allowed = is_query[None, :] | (~is_query[:, None] & (index[None, :] <= index[:, None]))
        if mask_type == "unimodal":
            masks_some = query_length > 0 and text_length > 0
        else:  # multimodal_causal masks the text for the queries, and later text for each text token
            masks_some = mask_type == "multimodal_causal" and text_length > 0 and (query_length > 0 or text_length > 1)
        if padding_mask is None and not masks_some:
            return None
        allowed = torch.cat([allowed.new_ones(length, past_length), allowed], dim=1)[None]
        if padding_mask is not None:
            allowed = allowed & padding_mask[:, None, :].bool()
        return _additive_mask(allowed, dtype)

    def forward(
        self,
        query_embeds: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | Blip2QFormerImage | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        self_attention_mask: SelfAttentionMask = "bidirectional",
        cache: Cache | None = None,
        use_cache: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Blip2QFormerModelOutput | tuple:
        """
        Args:
            query_embeds: `[B, Q, D]` learned queries (expanded `query_tokens`), or None for text alone.
            text_embeds: `[B, T, D]` embedded text (`Blip2TextEmbeddings`), or None for queries alone.
            attention_mask: padding mask, 1 = real token: `[B, T]` for the text alone (queries and cached positions
                are never padding), or `[B, past + Q + T]` for everything.
            encoder_hidden_states: the image the queries cross-attend to, needed whenever queries are given:
                `[B, P, Dv]` image embeddings (row b attends to image b), or a `Blip2QFormerImage` (distinct images
                shared by several rows, and/or their keys and values projected beforehand by `project_image`).
            encoder_attention_mask: `[B, P]` patch mask of a plain `encoder_hidden_states` (all ones for BLIP-2
                images); a `Blip2QFormerImage` carries its own.
            self_attention_mask: "bidirectional" (ITM), "unimodal" (ITC) or "multimodal_causal" (ITG).
            cache / use_cache: keep and reuse the self-attention keys/values (a `DynamicCache` is made if needed).
        Returns:
            `last_hidden_state [B, Q + T, D]` (queries first), `pooler_output [B, D]`, `cache`.
        """
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        if query_embeds is None and text_embeds is None:
            raise ValueError("Blip2QFormerModel needs query_embeds, text_embeds or both.")
        dtype = self.layernorm.weight.dtype  # the Q-Former runs in its own (fp32) precision
        parts = [x.to(dtype) for x in (query_embeds, text_embeds) if x is not None]
        hidden_states = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        query_length = 0 if query_embeds is None else query_embeds.shape[1]
        image = self._image_input(encoder_hidden_states, encoder_attention_mask, hidden_states.shape[0], query_length)
        if use_cache and cache is None:
            cache = DynamicCache()
        past_length = cache.get_seq_length() if cache is not None else 0
        self_mask = self._self_mask(self_attention_mask, attention_mask, hidden_states, query_length, past_length)
        cross_mask = None if image is None else image.cross_attention_mask(query_length, dtype)

        hidden_states = self.dropout(self.layernorm(hidden_states))
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        all_cross_attentions = () if output_attentions else None
        for index, layer in enumerate(self.encoder.layer):
            hidden_states, self_weights, cross_weights = layer(
                hidden_states,
                self_mask,
                *(image.layer_inputs(index) if image is not None else ()),  # positional, for gradient checkpointing
                encoder_attention_mask=cross_mask,
                image_rows=None if image is None else image.rows,
                query_length=query_length,
                cache=cache,
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (self_weights,)
                all_cross_attentions += (cross_weights,)

        output = Blip2QFormerModelOutput(
            last_hidden_state=hidden_states,
            pooler_output=hidden_states[:, 0],
            cache=cache if use_cache or past_length > 0 else None,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            cross_attentions=all_cross_attentions,
        )
        return output if return_dict is not False else output.to_tuple()


# ---------------------------------------------------------------------------------------------------------------------
# BLIP-2 with a language model (stage 2)
# ---------------------------------------------------------------------------------------------------------------------


class Blip2Model(Blip2FrozenTowersMixin, Blip2PreTrainedModel):
    """Vision encoder -> Q-Former queries -> `language_projection` -> soft prompt of a (frozen) LLM.

    Also gives each part's features, as transformers' `Blip2Model`: `get_image_features` (the vision model's output),
    `get_qformer_features` (query outputs `[B, Q, Dq]`) and `get_text_features` (the LLM's text hidden states). The
    soft prompt is `Blip2ForConditionalGeneration.get_image_features`' `pooler_output`, and `image_outputs` of both
    classes' forward output.
    """

    _keep_in_fp32_modules_strict = ["query_tokens", "qformer", "language_projection"]

    def __init__(self, config: Blip2Config, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        self.vision_model = build_vision_model(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        if language_model is not None:  # `from_stage1`: the LLM from its own `from_pretrained`, not built at random
            self.language_model = language_model
        elif config.use_decoder_only_language_model:
            self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            self.language_model = AutoModelForSeq2SeqLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        return self.language_model.get_encoder() if modality is None else super().get_encoder(modality=modality)

    def init_from_stage1(self, stage1_folder: str | os.PathLike | dict[str, torch.Tensor]) -> dict[str, list[str]]:
        """Initialize stage 2 from a stage-1 (`Blip2ForPreTraining` / retrieval) checkpoint folder or state dict: the
        vision encoder, the query tokens and the Q-Former are copied; the LLM and `language_projection` keep what they
        have (new); the stage-1 heads, text embeddings and, unless this Q-Former has them, the text FFNs are dropped.
        Logs and returns `{"loaded": [...], "new": [...], "dropped": [...]}`; a tensor whose shape differs is an error
        naming it."""
        source = "a state dict" if isinstance(stage1_folder, dict) else stage1_folder
        if isinstance(stage1_folder, dict):
            stage1 = stage1_folder
        else:
            stage1 = checkpoint_keys_as_model_keys(self, read_safetensors_folder(stage1_folder))
        own = self.state_dict()
        loaded, dropped = [], []
        for key, tensor in stage1.items():
            if key not in own or key.startswith(("language_model.", "language_projection.")):
                dropped.append(key)
                continue
            if own[key].shape != tensor.shape:
                raise ValueError(f"{key}: stage-1 shape {tuple(tensor.shape)} != this model's {tuple(own[key].shape)}")
            loaded.append(key)
        self.load_state_dict({key: stage1[key] for key in loaded}, strict=False)
        report = {"loaded": loaded, "new": sorted(set(own) - set(loaded)), "dropped": sorted(dropped)}

        def groups(
            keys: list[str],
        ) -> list[str]:  # "qformer.encoder.layer.3.output.dense.weight" -> "...layer.*.output"
            return sorted({".".join(re.sub(r"\.\d+(?=\.)", ".*", key).split(".")[:-1][:5]) or key for key in keys})

        new_roots, dropped_roots = groups(report["new"]), groups(report["dropped"])
        logger.warning(
            f"Stage 2 from {source}: {len(loaded)} tensors loaded; new (not in stage 1): {new_roots}; dropped "
            f"(stage-1 only): {dropped_roots}"
        )
        return report

    def _ignore_qformer_text(self, qformer_input_ids: torch.LongTensor | None) -> None:
        """Accept (and ignore) the Q-Former ids of a processor that has a Q-Former tokenizer, such as a stage-1
        processor saved beside a stage-2 model by older versions of `training/stage2.py`: this model's Q-Former reads
        only its queries. Only when the config says so (`use_qformer_text_input=False`); a config that promises text
        input the model never reads is an error rather than a silent drop."""
        if qformer_input_ids is None:
            return
        if self.config.qformer_config.use_qformer_text_input:
            raise ValueError(
                f"Got qformer_input_ids, but {type(self).__name__} feeds only the query tokens to the Q-Former (BLIP-2 "
                "stage 2), although its config says qformer_config.use_qformer_text_input=True. Build the inputs "
                "with `processor.without_qformer_tokenizer()`, or set use_qformer_text_input=False in the config."
            )
        logger.warning_once(
            "Ignoring qformer_input_ids / qformer_attention_mask: this model's Q-Former reads no text "
            "(qformer_config.use_qformer_text_input=False). Re-save its processor with "
            "`processor.without_qformer_tokenizer().save_pretrained(folder)` to stop producing them."
        )

    def get_qformer_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs
    ) -> torch.Tensor:
        """`[B, 3, H, W]` -> the query outputs `[B, Q, Dq]`."""
        vision_outputs = self._vision_outputs(pixel_values, None, interpolate_pos_encoding, False, False)
        return self._soft_prompt_features(vision_outputs, False, False).qformer_outputs.last_hidden_state

    def freeze_language_model(self) -> None:
        """`freeze_towers` for the LLM alone."""
        self._freeze(("language_model",), None)

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        frozen_image_states: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | Blip2ImageFeaturesOutput | tuple:
        """The image features, as transformers returns them from each class:

        - `Blip2Model`: the vision model's output: `last_hidden_state` the image embeddings `[B, 1 + P, Dv]`,
          `pooler_output` the pooled `[CLS]` position `[B, Dv]`, the encoder's `hidden_states` / `attentions` (the
          query outputs are `get_qformer_features`);
        - `Blip2ForConditionalGeneration`: a `Blip2ImageFeaturesOutput` whose `pooler_output` is the soft prompt
          `[B, Q, D_llm]` (fp32, as the Q-Former), the other fields the same (the Q-Former's hidden states and
          attentions are in `qformer_outputs`).

        Either goes back in as `forward(mm_encoder_outputs={"image": ...})`. Instead of `pixel_values`, cached
        `frozen_image_states` (the frozen encoder's output before `post_layernorm`, see `encode_image_frozen`) may be
        given; the encoder does not run then, so it records nothing."""
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        _reject_image_embeds_input(kwargs)
        vision_outputs = self._vision_outputs(
            pixel_values, frozen_image_states, interpolate_pos_encoding, output_attentions, output_hidden_states
        )
        output = self._image_features(vision_outputs, output_attentions, output_hidden_states)
        return output if return_dict else output.to_tuple()

    def _image_features(
        self, vision_outputs: BaseModelOutputWithPooling, output_attentions: bool, output_hidden_states: bool
    ) -> BaseModelOutputWithPooling:
        """What `get_image_features` returns of the vision output: here that output itself (transformers'
        `Blip2Model`); `Blip2ForConditionalGeneration` returns the soft prompt."""
        return vision_outputs

    def _vision_outputs(
        self,
        pixel_values: torch.Tensor | None,
        frozen_image_states: torch.Tensor | None,
        interpolate_pos_encoding: bool,
        output_attentions: bool,
        output_hidden_states: bool,
    ) -> BaseModelOutputWithPooling:
        """The vision model's output of images `[B, 3, H, W]` or of cached `frozen_image_states [B, 1 + P, Dv]`
        (then only `last_hidden_state` and `pooler_output`, made as `Blip2VisionModel` makes them)."""
        if frozen_image_states is None:
            return self.vision_model(
                pixel_values,
                interpolate_pos_encoding=interpolate_pos_encoding,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        if pixel_values is not None:
            raise ValueError("Pass pixel_values or frozen_image_states, not both.")
        image_embeds = self._image_embeds(None, frozen_image_states)
        return BaseModelOutputWithPooling(
            last_hidden_state=image_embeds, pooler_output=self.vision_model.pool(image_embeds)
        )

    def _soft_prompt_features(
        self, vision_outputs: BaseModelOutputWithPooling, output_attentions: bool, output_hidden_states: bool
    ) -> Blip2ImageFeaturesOutput:
        """The Q-Former's queries over the image embeddings of `vision_outputs`, projected into the LLM's embedding
        space: `pooler_output` is the soft prompt `[B, Q, D_llm]` (fp32, as the Q-Former), the rest the vision
        output's, as transformers' `Blip2ForConditionalGeneration.get_image_features` returns them (the Q-Former's
        hidden states and attentions are in `qformer_outputs`)."""
        image_embeds = vision_outputs.last_hidden_state
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        qformer_outputs = self.qformer(
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        query_output = qformer_outputs.last_hidden_state
        language_model_inputs = self.language_projection(query_output.to(self.language_projection.weight.dtype))
        return Blip2ImageFeaturesOutput(
            last_hidden_state=image_embeds,
            pooler_output=language_model_inputs,
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
            vision_outputs=vision_outputs,
            qformer_outputs=qformer_outputs,
        )

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """The LLM's text hidden states `[B, T, D_llm]` (the decoder stack, or the encoder for encoder-decoders)."""
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        text_model = (
            self.language_model.base_model if self.config.use_decoder_only_language_model else self.get_encoder()
        )
        outputs = text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        output = BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    def _merge_image_features(
        self,
        language_model_inputs: torch.Tensor,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """Put the soft prompt `[B, Q, D]` at the `image_token_index` placeholders that the processor writes."""
        num_queries = language_model_inputs.shape[1]
        language_model_inputs = language_model_inputs.to(inputs_embeds.device, inputs_embeds.dtype)
        image_token_id = self.config.image_token_index
        if image_token_id is None:
            raise ValueError(
                "config.image_token_index is None (a config from before image placeholder tokens): add '<image>' to "
                "the tokenizer (Blip2Processor does) and set config.image_token_index to its id."
            )
        if input_ids is None:
            placeholder = self.get_input_embeddings()(torch.tensor(image_token_id, device=inputs_embeds.device))
            image_mask = (inputs_embeds == placeholder).all(-1)
        else:
            image_mask = input_ids == image_token_id
        counts = image_mask.sum(dim=1)
        if bool((counts != num_queries).any()):
            row = int((counts != num_queries).nonzero()[0, 0])
            raise ValueError(
                f"Row {row} of input_ids has {int(counts[row])} image tokens (id {image_token_id}) but the model puts "
                f"num_query_tokens={num_queries} query outputs there: build the inputs with the processor "
                "(Blip2Processor with num_query_tokens set), which writes them in front of the prompt."
            )
        return inputs_embeds.masked_scatter(image_mask[..., None], language_model_inputs)

    def _language_model_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.LongTensor | None,
        decoder_attention_mask: torch.LongTensor | None,
        labels: torch.LongTensor | None,
        **kwargs,
    ) -> tuple[ModelOutput, torch.Tensor, torch.Tensor | None]:
        """The LLM on the merged embeddings `[B, L, D_llm]`: `(its output, logits, loss)`."""
        if self.config.use_decoder_only_language_model:
            outputs = self.language_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=True, **kwargs
            )
            logits, loss = outputs.logits, None
            if labels is not None:
                # labels may cover only the end of the sequence (the text after the image and prompt)
                loss = self.loss_function(
                    logits=logits[:, -labels.shape[1] :],
                    labels=labels.to(logits.device),
                    vocab_size=self.config.text_config.vocab_size,
                    **kwargs,
                )
        else:
            outputs = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                labels=labels,
                return_dict=True,
                **kwargs,
            )
            logits, loss = outputs.logits, outputs.loss
        return outputs, logits, loss

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        frozen_image_states: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.LongTensor | None = None,
        mm_encoder_outputs: dict[str, Blip2ImageFeaturesOutput] | None = None,
        **kwargs,
    ) -> Blip2ForConditionalGenerationModelOutput | tuple:
        """
        Args:
            pixel_values: `[B, 3, H, W]` images, or
            frozen_image_states: `[B, 1 + P, Dv]` the frozen encoder's output before `post_layernorm`
                (`encode_image_frozen`), e.g. from a cache.
            input_ids: `[B, L]` LLM prompt with `num_query_tokens` image placeholders (from the processor).
            attention_mask: `[B, L]`, 1 for real tokens.
            decoder_input_ids / decoder_attention_mask: encoder-decoder LLMs only (T5: the target side).
            labels: decoder-only: `[B, L]` aligned with `input_ids` (or its last `labels.shape[1]` positions), -100
                where no loss is wanted (image tokens, prompt, padding); shifted inside. Encoder-decoder: the target
                ids, as T5 takes them.
            qformer_input_ids / qformer_attention_mask: accepted from a processor with a Q-Former tokenizer and
                ignored, when the config says the Q-Former takes no text (see `_ignore_qformer_text`).
            mm_encoder_outputs: `{"image": get_image_features(...)}` computed beforehand, instead of pixel_values or
                frozen_image_states (transformers' argument for pre-encoded images).
            output_attentions / output_hidden_states / return_dict: as the keyword says, else as `self.config`.
        Returns:
            `loss`, `logits [B, L, V]` and the three towers' outputs.
        """
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        self._ignore_qformer_text(qformer_input_ids)
        _reject_image_embeds_input(kwargs)
        record = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        image_features = self._forward_image_features(
            pixel_values,
            frozen_image_states,
            (mm_encoder_outputs or {}).get("image"),
            interpolate_pos_encoding,
            record,
        )
        kwargs.update(record)
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass input_ids (the processor's output) or inputs_embeds.")
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        inputs_embeds = self._merge_image_features(image_features.pooler_output, input_ids, inputs_embeds)

        outputs, logits, loss = self._language_model_forward(
            inputs_embeds, attention_mask, decoder_input_ids, decoder_attention_mask, labels, **kwargs
        )

        output = Blip2ForConditionalGenerationModelOutput(
            loss=loss,
            logits=logits,
            vision_outputs=image_features.vision_outputs,
            qformer_outputs=image_features.qformer_outputs,
            language_model_outputs=outputs,
            image_outputs=image_features,
        )
        return output if return_dict else output.to_tuple()

    def _forward_image_features(
        self,
        pixel_values: torch.Tensor | None,
        frozen_image_states: torch.Tensor | None,
        encoded: BaseModelOutputWithPooling | None,
        interpolate_pos_encoding: bool,
        record: dict[str, bool],
    ) -> Blip2ImageFeaturesOutput:
        """The soft-prompt features `forward` puts into the LLM: from images, from cached frozen states, or from
        `mm_encoder_outputs["image"]` (`encoded`): the generation model's `get_image_features` output as it is, or
        `Blip2Model.get_image_features`' (the vision output), which the Q-Former then reads."""
        if encoded is None:
            vision_outputs = self._vision_outputs(
                pixel_values, frozen_image_states, interpolate_pos_encoding, **record
            )
            return self._soft_prompt_features(vision_outputs, **record)
        if pixel_values is not None or frozen_image_states is not None:
            raise ValueError("Pass mm_encoder_outputs or pixel_values / frozen_image_states, not both.")
        if getattr(encoded, "qformer_outputs", None) is None:
            return self._soft_prompt_features(encoded, **record)
        return encoded


class Blip2ForConditionalGeneration(Blip2Model, GenerationMixin):
    """`Blip2Model` that generates text: captioning (image only) and prompted generation / VQA.

    `generate` runs the image once, writes the soft prompt into the LLM input and hands over to the LLM's own
    `generate`, with this model's `generation_config` (so a saved `generation_config.json` is honoured) updated by
    any keyword arguments (`max_new_tokens`, `num_beams`, ...).

    Does the output contain the prompt? It follows the LLM family, as every transformers model does:
    - decoder-only LLMs (OPT, Llama, Qwen2, ...): the output is the full sequence, the input ids (image placeholders
      and prompt, or `[<image> x Q, BOS]` for image-only input) followed by the new tokens, so
      `output[:, input_ids.shape[1]:]` are the new tokens and `batch_decode(output, skip_special_tokens=True)`
      gives prompt + answer;
    - encoder-decoder LLMs (T5, Flan-T5): the output is the decoder sequence only (decoder start token + new tokens).
    """

    def _image_features(
        self, vision_outputs: BaseModelOutputWithPooling, output_attentions: bool, output_hidden_states: bool
    ) -> Blip2ImageFeaturesOutput:
        """`get_image_features` here, as transformers' `Blip2ForConditionalGeneration.get_image_features`: the image
        through both towers, `pooler_output` the soft prompt `[B, Q, D_llm]` (`_soft_prompt_features`)."""
        return self._soft_prompt_features(vision_outputs, output_attentions, output_hidden_states)

    @classmethod
    def from_stage1(
        cls,
        stage1: str | os.PathLike | Blip2PreTrainedModel,
        language_model: str | os.PathLike | PreTrainedModel,
        processor: Any | None = None,
        **config_overrides: Any,
    ) -> tuple[Blip2ForConditionalGeneration, Any]:
        """
        Stage 2 assembled from its parts (paper section 3.3): stage 1's image encoder, query tokens and Q-Former (its
        text-only parts dropped: stage 2 feeds it no text), a new `language_projection`, and the LLM loaded once with
        `from_pretrained`. Freezing is left to the caller, as with `from_pretrained`.

        Args:
            stage1: a stage-1 folder (`Blip2ForPreTraining`, retrieval, or a stage-2 model, whose LLM side is left
                out) or such a model. Every image-encoder, query and Q-Former tensor must be in it (a Trainer
                checkpoint without the frozen ViT is an error, not a random encoder).
            language_model: the LLM's name or path (`AutoModelForCausalLM` or `AutoModelForSeq2SeqLM` by its model
                type; an encoder such as BERT is an error), or a loaded `PreTrainedModel`, used as is.
            processor: the stage-2 processor (a stage-1 one is used without its Q-Former tokenizer), or None: the
                stage-1 folder's image processor and the LLM's tokenizer, writing `num_query_tokens` image tokens.
            config_overrides: `Blip2Config` fields, e.g. `num_query_tokens`; a dict for `qformer_config` or
                `vision_config` updates those fields of stage 1's (e.g. the Q-Former's dropout).

        The processor adds `<image>` to the tokenizer when it has no image token; when the tokenizer then outgrows
        the LLM's embeddings (Llama-2: 32000 tokens in 32000 rows) they are resized, and `config.image_token_index` is
        its id. Decoder-only LLMs also stop at "\\n": LAVIS trains OPT to end each caption with it.

        Returns:
            `(model, processor)`: the processor is what the model consumes (save it beside the model).
        """
        for name in ("text_config", "image_token_index"):
            if name in config_overrides:
                raise ValueError(f"from_stage1: {name} comes from the language model and processor; do not pass it.")
        stage1_config, stage1_weights, stage1_folder = cls._stage1_parts(stage1)
        llm = cls._load_language_model(language_model)
        num_query_tokens = config_overrides.pop("num_query_tokens", stage1_config.num_query_tokens)
        processor = cls._stage2_processor(processor, stage1_folder, llm, num_query_tokens)
        if len(processor.tokenizer) > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(len(processor.tokenizer))  # a row for `<image>`
        vision_config = stage1_config.vision_config.to_dict()
        qformer_config = stage1_config.qformer_config.to_dict()
        qformer_config["use_qformer_text_input"] = False  # stage 2 runs no text through the Q-Former (LAVIS drops it)
        for name, sub_config in (("vision_config", vision_config), ("qformer_config", qformer_config)):
            sub_config.pop("_name_or_path", None)  # where stage 1 loaded its encoder from is not this model's
            sub_config.update(config_overrides.pop(name, {}))
        for name in ("vision_feature_layer", "vision_feature_select_strategy"):  # what stage 1 trained on
            config_overrides.setdefault(name, getattr(stage1_config, name))
        config = Blip2Config(
            vision_config=vision_config,
            qformer_config=qformer_config,
            text_config=llm.config.to_dict(),
            num_query_tokens=num_query_tokens,
            image_token_index=processor.image_token_id,
            **config_overrides,
        )
        if processor.num_query_tokens != config.num_query_tokens:
            raise ValueError(
                f"from_stage1: the processor writes {processor.num_query_tokens} image tokens, the model has "
                f"num_query_tokens={config.num_query_tokens}."
            )
        model = cls(config, language_model=llm)
        model.config.text_config = llm.config
        report = model.init_from_stage1(stage1_weights)
        missing = [key for key in report["new"] if not key.startswith(("language_model.", "language_projection."))]
        if missing:
            raise ValueError(
                f"from_stage1: {stage1_folder or type(stage1).__name__} lacks {len(missing)} tensors of the image "
                f"encoder, queries or Q-Former, e.g. {missing[:3]} (a Trainer checkpoint holds only trained tensors: "
                "pass the final folder)."
            )
        if config.use_decoder_only_language_model:
            newline = processor.tokenizer("\n", add_special_tokens=False).input_ids
            eos = model.generation_config.eos_token_id
            eos = [eos] if isinstance(eos, int) else list(eos or [])
            if len(newline) == 1 and newline[0] not in eos:
                model.generation_config.eos_token_id = eos + newline
        return model, processor

    @staticmethod
    def _stage1_parts(
        stage1: str | os.PathLike | Blip2PreTrainedModel,
    ) -> tuple[Blip2Config, Path | dict[str, torch.Tensor], Path | None]:
        """`(config, weights, folder or None)` of a stage-1 folder or model, the weights as `init_from_stage1` takes
        them: the folder itself, or the model's state dict."""
        if isinstance(stage1, PreTrainedModel):
            if not isinstance(stage1.config, Blip2Config):
                raise TypeError(f"from_stage1: stage1 is a {type(stage1).__name__}; expected a BLIP-2 model.")
            folder = Path(stage1.name_or_path) if stage1.name_or_path and Path(stage1.name_or_path).is_dir() else None
            return stage1.config, stage1.state_dict(), folder
        folder = local_model_folder(stage1, "from_stage1: stage1")
        return Blip2Config.from_pretrained(folder), folder, folder

    @staticmethod
    def _load_language_model(language_model: str | os.PathLike | PreTrainedModel) -> PreTrainedModel:
        """The LLM as a causal LM (`AutoModelForCausalLM`) or an encoder-decoder (`AutoModelForSeq2SeqLM`), by its
        config's `model_type`; anything else (an encoder such as BERT, a vision model) is an error naming it."""
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        )

        if isinstance(language_model, PreTrainedModel):
            if not isinstance(language_model, GenerationMixin) or language_model.get_output_embeddings() is None:
                raise ValueError(
                    f"from_stage1: the language model is a {type(language_model).__name__}, not a causal LM or an "
                    "encoder-decoder LM with a language-modeling head (text_config must be one, e.g. "
                    "LlamaForCausalLM, T5ForConditionalGeneration)."
                )
            return language_model
        config = AutoConfig.from_pretrained(language_model)
        causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        seq2seq = config.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
        # BERT-like encoders have a causal-LM class too (BertLMHeadModel) but are not decoders: a folder saved from
        # BertModel says `architectures: ["BertModel"]` and `is_decoder: false`.
        architectures = getattr(config, "architectures", None) or []
        lm_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) | set(
            MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values()
        )
        not_a_decoder = causal and not seq2seq and getattr(config, "is_decoder", None) is False
        if not (causal or seq2seq) or (architectures and not lm_classes & set(architectures)) or not_a_decoder:
            raise ValueError(
                f"language_model_name_or_path {str(language_model)!r} holds a {config.model_type!r} model "
                f"({', '.join(architectures) or 'no architectures listed'}): BLIP-2's text_config must be a causal "
                "LM (OPT, Llama, Qwen2, Mistral, Gemma, ...) or an encoder-decoder LM (T5, Flan-T5, mT5), saved "
                "from its *ForCausalLM / *ForConditionalGeneration class."
            )
        return (AutoModelForCausalLM if causal and not seq2seq else AutoModelForSeq2SeqLM).from_pretrained(
            language_model
        )

    @staticmethod
    def _stage2_processor(
        processor: Any | None, stage1_folder: Path | None, llm: PreTrainedModel, num_query_tokens: int
    ) -> Any:
        """The given processor without a Q-Former tokenizer, or one built from the stage-1 folder's image processor
        and the LLM's tokenizer (by `llm.name_or_path`)."""
        if processor is not None:
            has_qformer_tokenizer = getattr(processor, "qformer_tokenizer", None) is not None
            return processor.without_qformer_tokenizer() if has_qformer_tokenizer else processor
        import importlib

        from transformers import AutoTokenizer

        # Imported by name, not by a `from .processing_blip2 import` statement: transformers' remote-code loader
        # requires every module such a statement names to be in the folder, and a saved model ships without the
        # processor's code (remote code passes a processor here).
        Blip2Processor = importlib.import_module(f"{__package__}.processing_blip2").Blip2Processor

        if stage1_folder is None or not llm.name_or_path:
            raise ValueError(
                "from_stage1: processor=None needs a stage-1 folder (for its image processor) and a language model "
                "loaded from a name or path (for its tokenizer); pass processor= instead."
            )
        try:
            image_processor = Blip2Processor.from_pretrained(stage1_folder).image_processor
        except (OSError, ValueError) as error:
            raise ValueError(f"from_stage1: {stage1_folder} holds no processor; pass processor=. ({error})") from error
        tokenizer = AutoTokenizer.from_pretrained(llm.name_or_path)
        return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)

    def _image_only_input_ids(self, batch_size: int, device: torch.device) -> torch.LongTensor:
        """The LLM input for captioning without a prompt, as LAVIS tokenizes the empty prompt: the image tokens then
        BOS (OPT and other decoder-only LLMs), or the image tokens then EOS (T5 appends `</s>`, has no BOS)."""
        if self.config.image_token_index is None:
            raise ValueError("config.image_token_index is not set: pass input_ids built by the processor.")
        text_config = self.config.text_config
        start = getattr(text_config, "bos_token_id", None)
        if start is None and not self.config.use_decoder_only_language_model:
            start = getattr(text_config, "eos_token_id", None)
        ids = [self.config.image_token_index] * self.config.num_query_tokens + ([start] if start is not None else [])
        return torch.tensor([ids], dtype=torch.long, device=device).repeat(batch_size, 1)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        frozen_image_states: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.LongTensor | None = None,
        image_rows: torch.LongTensor | Sequence[int] | None = None,
        share_prefix: bool | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """
        Args:
            pixel_values: `[B, 3, H, W]` (or `[N, 3, H, W]` with `image_rows`).
            frozen_image_states: `[B, 1 + P, Dv]` the frozen encoder's output (`encode_image_frozen`), instead of
                pixel_values (or `[N, 1 + P, Dv]` with `image_rows`).
            input_ids / attention_mask: `[B, L]` prompt from the processor (left-padded for batches); None for
                captioning from the image alone.
            image_rows: `[B]` for several prompts per image: the images (`pixel_values` / `frozen_image_states`) are
                then N distinct ones, encoded once each, and row `b` of `input_ids` is about image `image_rows[b]`
                (values in `0..N-1`). The output is the same as with each row's image repeated in its row.
            share_prefix: with a decoder-only LLM, compute the LLM keys/values of the prompt part that an image's
                rows share (with `image_rows`) and, with beams, a row's prompt for all its beams (with or without
                `image_rows`) once; the same tokens as without. None (default): where it pays, for LLMs of at least
                `SHARE_PREFIX_MIN_LLM_PARAMETERS`; True / False: always / never (False runs the plain path).
            generate_kwargs: any `GenerationConfig` field or `generate` argument (`max_new_tokens`, `num_beams`,
                `generation_config`, ...).
            qformer_input_ids / qformer_attention_mask: accepted from a processor with a Q-Former tokenizer and
                ignored, when the config says the Q-Former takes no text (see `_ignore_qformer_text`).
        Returns:
            `[B * num_return_sequences, L_out]` token ids (see the class docstring for what they contain).
        """
        self._ignore_qformer_text(qformer_input_ids)
        _reject_image_embeds_input(generate_kwargs)
        if hasattr(self, "hf_device_map") and hasattr(self.language_model, "_hf_hook"):
            self.language_model._hf_hook.io_same_device = True  # outputs come back to the input device
        vision_outputs = self._vision_outputs(
            pixel_values, frozen_image_states, interpolate_pos_encoding, False, False
        )
        language_model_inputs = self._soft_prompt_features(vision_outputs, False, False).pooler_output
        if image_rows is not None:
            text = input_ids if input_ids is not None else inputs_embeds
            image_rows = _checked_image_rows(image_rows, language_model_inputs.shape[0], text)
            rows_soft_prompt = language_model_inputs[image_rows.to(language_model_inputs.device)]
        else:
            rows_soft_prompt = language_model_inputs
        batch_size = rows_soft_prompt.shape[0]
        if inputs_embeds is None:
            if input_ids is None:
                input_ids = self._image_only_input_ids(batch_size, rows_soft_prompt.device)
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        inputs_embeds = self._merge_image_features(rows_soft_prompt, input_ids, inputs_embeds)
        inputs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        if self.config.use_decoder_only_language_model and input_ids is not None:
            inputs["input_ids"] = input_ids  # so that the output starts with the prompt, as decoder-only LLMs do
        # Our generation_config (not the inner LLM's) is the base; keyword arguments override its fields.
        generation_config = copy.deepcopy(generate_kwargs.pop("generation_config", None) or self.generation_config)
        model_kwargs = generation_config.update(**generate_kwargs)
        # Both shortcuts pay at ViT-g / OPT-2.7b widths (4 of 32 OPT layers, 2 images x 5 questions, CPU time of
        # generate): greedy 8 tokens 12.2 s -> 11.2 s (the image's prefix; decoding dominates at 10 rows), 5 beams
        # 25.6 s -> 13.4 s (each prompt once, not once per beam). Their cost is one or two extra forward calls and
        # cache copies, a fixed few ms that a small LLM's whole prefill does not outweigh (benchmarks/README.md):
        # hence automatic by the LLM's size. Without `image_rows` only the beams share work (captioning: the image
        # tokens and BOS, once per image instead of once per beam).
        if share_prefix is None:
            share_prefix = self._language_model_parameters() >= SHARE_PREFIX_MIN_LLM_PARAMETERS
        expands = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1) > 1
        if (
            share_prefix
            and (image_rows is not None or expands)
            and self._can_share_prefix(inputs, generation_config, model_kwargs)
        ):
            if image_rows is None:
                image_rows = torch.arange(batch_size, device=inputs_embeds.device)
            return self._generate_sharing_prefix(inputs, image_rows, generation_config, model_kwargs)
        return self.language_model.generate(**inputs, generation_config=generation_config, **model_kwargs)

    def _language_model_parameters(self) -> int:
        """The LLM's parameter count (embeddings included), counted once."""
        if getattr(self, "_llm_parameter_count", None) is None:
            self._llm_parameter_count = sum(parameter.numel() for parameter in self.language_model.parameters())
        return self._llm_parameter_count

    def _can_share_prefix(self, inputs: dict[str, torch.Tensor], generation_config: Any, model_kwargs: dict) -> bool:
        """Whether `_generate_sharing_prefix` gives the plain path's tokens: a decoder-only LLM whose default cache is
        a plain `DynamicCache` (no sliding window / linear layers, whose batch cannot simply be indexed), attention
        that takes any 2D mask (eager / SDPA), left-padded rows, and no caller-side cache, assistant or n-gram rule."""
        if not self.config.use_decoder_only_language_model or "input_ids" not in inputs:
            return False
        attention_implementation = getattr(self.language_model.config, "_attn_implementation", None)
        if attention_implementation not in (None, "eager", "sdpa"):
            return False
        if generation_config.use_cache is False or generation_config.cache_implementation is not None:
            return False
        if getattr(generation_config, "prefill_chunk_size", None) is not None:
            return False
        # n-grams are read across the whole row, whose padding the shortcut moves; prompt lookup drafts from it
        if generation_config.no_repeat_ngram_size or generation_config.prompt_lookup_num_tokens:
            return False
        if any(model_kwargs.get(key) is not None for key in ("cache", "past_key_values", "assistant_model")):
            return False
        if getattr(self.language_model, "_supports_default_dynamic_cache", lambda: False)() is False:
            return False
        probe = DynamicCache(config=self.language_model.config)
        if not probe.layers or any(type(layer) is not DynamicLayer for layer in probe.layers):
            return False
        mask = inputs["attention_mask"]
        lengths = mask.sum(1, keepdim=True)
        left_padded = torch.arange(mask.shape[1], device=mask.device)[None] >= mask.shape[1] - lengths
        return bool((mask.bool() == left_padded).all()) and bool((lengths >= 2).all())

    def _generate_sharing_prefix(
        self,
        inputs: dict[str, torch.Tensor],
        image_rows: torch.LongTensor,
        generation_config: Any,
        model_kwargs: dict,
    ) -> Any:
        """`language_model.generate` on a cache pre-filled where rows share work, for the same tokens as the plain
        path (decoder-only LLMs; `_can_share_prefix` says when).

        Rows `[pad_b, prefix, rest_b]` (left padding) are reordered to `[prefix, pad_b, rest_b]`: the positions are
        computed from the attention mask, so every token keeps its position and sees the same tokens, while the prefix
        (image tokens, BOS and the prompt's words before the question, the same ids for all rows of an image) now sits
        in the same columns for every row. Then
        1. the prefix is run once per distinct image and its keys/values copied to the image's rows (saves
           `prefix x (B - N)` token passes: 2 images x 5 questions with OPT's 32 image tokens + BOS + "Question:" run
           170 prompt tokens instead of 450, and the prefill's CPU time fell by a third at OPT-2.7b width, smaller
           matrix products running less efficiently);
        2. with beams (or several returned sequences) generate would expand the rows before its prefill and run every
           prompt once per beam: the prompt's rest but its last token is run once per row here, the cache expanded
           after (saves `(beams - 1) / beams` of the prefill). Without beams this step would only split generate's own
           prefill in two, so it is skipped;
        3. generate runs what is left (the rest of the prompt, or its last token) and decodes.
        The returned ids are the caller's `input_ids` (the original order) followed by the new tokens.
        """
        input_ids, mask, embeds = inputs["input_ids"], inputs["attention_mask"], inputs["inputs_embeds"]
        length = input_ids.shape[1]
        order, prefix_length, leaders, group = _prefix_layout(input_ids, mask, image_rows)
        ids_r = input_ids.gather(1, order)
        mask_r = mask.gather(1, order)
        embeds_r = embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1]).to(embeds.device))
        positions = (mask_r.long().cumsum(1) - 1).masked_fill(mask_r == 0, 0)  # as generate computes them
        cache = DynamicCache(config=self.language_model.config)
        decoder = self.language_model.base_model
        if prefix_length > 0:
            leaders = leaders.to(embeds.device)
            decoder(
                inputs_embeds=embeds_r[leaders, :prefix_length],
                position_ids=positions[leaders, :prefix_length].to(embeds.device),
                cache=cache,
                use_cache=True,
            )
            cache.batch_select_indices(group.to(embeds.device))
        expand = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        if expand > 1:
            if length - 1 > prefix_length:
                decoder(
                    inputs_embeds=embeds_r[:, prefix_length : length - 1],
                    attention_mask=mask_r[:, : length - 1],
                    position_ids=positions[:, prefix_length : length - 1],
                    cache=cache,
                    use_cache=True,
                )
            cache.batch_repeat_interleave(expand)
        output = self.language_model.generate(
            input_ids=ids_r,
            inputs_embeds=embeds_r,
            attention_mask=mask_r,
            cache=cache,
            generation_config=generation_config,
            **model_kwargs,
        )
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prompt.to(sequences.device), sequences[:, length:]], dim=1)
        if isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences
        return output


# `generate(share_prefix=None)` shares prompt prefills from this LLM size on. 2 images x 5 questions on 2 CPU threads,
# plain path's time / the shortcut's, greedy and 5 beams: the tests' tiny OPT (~50k parameters) 0.91 / 0.40 (3 beams),
# 7.5M 1.02 / 1.02, 69M 1.11 / 1.63, 125M 1.20 / 1.95 (benchmarks/bench_prefix_sharing.py).
SHARE_PREFIX_MIN_LLM_PARAMETERS = 5_000_000


def _checked_image_rows(
    image_rows: torch.LongTensor | Sequence[int], num_images: int, text: torch.Tensor | None
) -> torch.LongTensor:
    """`image_rows` as a `[B]` long tensor, checked: one entry per prompt row, each an index of the N images."""
    rows = torch.as_tensor(image_rows)
    if rows.ndim != 1 or (rows.numel() and rows.dtype.is_floating_point) or rows.dtype == torch.bool:
        raise ValueError(
            f"image_rows must be a 1-D tensor of image indices, shape [B]; got {tuple(rows.shape)} {rows.dtype}."
        )
    rows = rows.long()
    if text is not None and rows.shape[0] != text.shape[0]:
        raise ValueError(
            f"image_rows must have one entry per row of input_ids (shape [{text.shape[0]}]); got shape "
            f"[{rows.shape[0]}]."
        )
    bad = (rows < 0) | (rows >= num_images)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"image_rows[{row}] = {int(rows[row])} is out of range: pixel_values / frozen_image_states hold "
            f"{num_images} images, so image_rows must be in 0..{num_images - 1}."
        )
    return rows


def _prefix_layout(
    input_ids: torch.LongTensor, attention_mask: torch.Tensor, image_rows: torch.LongTensor
) -> tuple[torch.LongTensor, int, torch.LongTensor, torch.LongTensor]:
    """How `_generate_sharing_prefix` lays out left-padded rows `[B, L]`:
    - `order [B, L]`: column indices turning row `[pad_b, prefix, rest_b]` into `[prefix, pad_b, rest_b]`;
    - `prefix_length`: how many leading tokens every row has in common with the other rows of its image (at most its
      length - 1: generate needs a token to start from); 0 when no image has two rows (nothing to share);
    - `leaders [G]`: one row per distinct image; `group [B]`: each row's index into `leaders`."""
    batch, length = input_ids.shape
    lengths = attention_mask.sum(1).to(input_ids.device)
    pads = length - lengths
    columns = torch.arange(length, device=input_ids.device)
    aligned = input_ids.gather(1, (columns[None] + pads[:, None]) % length)  # row b's tokens first, then its pads
    images, group = torch.unique(image_rows.to(input_ids.device), return_inverse=True)
    leaders = torch.full((images.shape[0],), batch, dtype=torch.long, device=input_ids.device)
    leaders = leaders.scatter_reduce(0, group, torch.arange(batch, device=input_ids.device), "amin")
    if images.shape[0] == batch:
        prefix_length = 0
    else:
        leader_rows = leaders[group]
        common = torch.minimum(lengths, lengths[leader_rows])
        same = (aligned == aligned[leader_rows]) & (columns[None] < common[:, None])
        shared = same.long().cumprod(1).sum(1)
        prefix_length = int(torch.minimum(shared, lengths - 1).min())
    in_prefix = columns[None] < prefix_length
    order = torch.where(
        in_prefix,
        columns[None] + pads[:, None],  # the prefix, from behind the pads
        torch.where(columns[None] < prefix_length + pads[:, None], columns[None] - prefix_length, columns[None]),
    )
    return order, prefix_length, leaders, group


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval (stage-1 heads on the Q-Former)
# ---------------------------------------------------------------------------------------------------------------------


FeatureMode = Literal["image", "text", "multimodal"]
FEATURE_MODES = ("image", "text", "multimodal")


@dataclass
class Blip2FeaturesOutput(ModelOutput):
    """
    What `extract_features` returns, named as LAVIS's `BlipOutputFeatures` (D: Q-Former width, E:
    `image_text_hidden_size`, 256 for BLIP-2); only the fields of the mode asked for are set.

    image_embeds: `[B, Q, D]` query outputs of the image-only pass (mode "image").
    image_embeds_proj: `[B, Q, E]` their ITC projections, L2-normalized (mode "image").
    text_embeds: `[B, T, D]` Q-Former outputs of the text-only pass (mode "text").
    text_embeds_proj: `[B, E]` the `[CLS]` position's ITC projection, L2-normalized (mode "text"; LAVIS returns every
        position's, `[B, T, E]`, of which only `[:, 0]` is used).
    multimodal_embeds: `[B, Q, D]` the query outputs of the ITM pass, queries and text attending to each other, image
        `i` with text `i` (mode "multimodal"); `itm_head(multimodal_embeds).mean(1)` are the ITM logits.
    """

    image_embeds: torch.FloatTensor | None = None
    image_embeds_proj: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    text_embeds_proj: torch.FloatTensor | None = None
    multimodal_embeds: torch.FloatTensor | None = None

    def similarity(self, other: Blip2FeaturesOutput | None = None) -> torch.Tensor:
        """ITC similarity `[B_img, B_txt]`: for each image and text, the largest cosine between one of the image's
        query projections and the text's `[CLS]` projection, without temperature (LAVIS's evaluation score and
        `Blip2ForImageTextRetrieval`'s `logits_per_image`). The image side comes from whichever of `self` and `other`
        has `image_embeds_proj`, the text side from whichever has `text_embeds_proj`:
        `image_features.similarity(text_features)`."""
        sides = (self,) if other is None else (self, other)
        image = next((side.image_embeds_proj for side in sides if side.image_embeds_proj is not None), None)
        text = next((side.text_embeds_proj for side in sides if side.text_embeds_proj is not None), None)
        if image is None or text is None:
            missing = "image (mode='image')" if image is None else "text (mode='text')"
            raise ValueError(f"similarity needs image and text projections; no {missing} features were given.")
        # [B_img, Q, E] x [E, B_txt] -> [B_img, Q, B_txt] -> max over the queries
        return torch.matmul(image, text.to(image.device).t()).max(dim=1).values


class Blip2Stage1FeaturesMixin:
    """The stage-1 heads' features, shared by `Blip2ForImageTextRetrieval` and `Blip2ForPreTraining` (both have
    `vision_model`, `query_tokens`, text `embeddings`, `qformer`, `vision_projection`, `text_projection` and
    `itm_head`): ITC image and text features, ITM logits, and LAVIS's `extract_features`.

    Text is Q-Former (BERT) tokens, given either as a processor's `qformer_input_ids` / `qformer_attention_mask`
    (its `input_ids` are then the language model's, and are not read) or as `input_ids` / `attention_mask` (image
    placeholder tokens in front, if any, are removed).
    """

    def _qformer_text(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.LongTensor | None, torch.Tensor | None]:
        """The Q-Former's `(ids [B, T], mask [B, T])`: the `qformer_*` pair when given, else `input_ids` /
        `attention_mask` without image placeholders; `(None, None)` without text."""
        if qformer_input_ids is not None:
            return qformer_input_ids, qformer_attention_mask
        if input_ids is None:
            return None, None
        return self._strip_image_tokens(input_ids, attention_mask)

    def _strip_image_tokens(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        image_token_id = self.config.image_token_index
        if image_token_id is None:
            return input_ids, attention_mask
        keep = input_ids != image_token_id
        if bool(keep.all()):
            return input_ids, attention_mask
        batch_size = input_ids.shape[0]
        if len(set(keep.sum(1).tolist())) != 1:
            raise ValueError("Rows of input_ids carry different numbers of image tokens.")
        input_ids = input_ids[keep].view(batch_size, -1)
        if attention_mask is not None:
            attention_mask = attention_mask[keep].view(batch_size, -1)
        return input_ids, attention_mask

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> Blip2ImageFeaturesOutput | tuple:
        """ITC image features, as `Blip2ImageFeaturesOutput`: `pooler_output` the normalized query projections
        `[B, Q, E]`, `last_hidden_state` the image embeddings `[B, 1 + P, Dv]` (reused by ITM re-ranking),
        `hidden_states` / `attentions` the vision encoder's; `vision_outputs` / `qformer_outputs` both towers'."""
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        record = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        vision_outputs = self.vision_model(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **record
        )
        image_embeds = vision_outputs.last_hidden_state
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        qformer_outputs = self.qformer(
            query_embeds=query_tokens, encoder_hidden_states=image_embeds, return_dict=True, **record
        )
        output = Blip2ImageFeaturesOutput(
            last_hidden_state=image_embeds,
            pooler_output=nn.functional.normalize(self.vision_projection(qformer_outputs.last_hidden_state), dim=-1),
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
            vision_outputs=vision_outputs,
            qformer_outputs=qformer_outputs,
        )
        return output if return_dict else output.to_tuple()

    def get_text_features(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """ITC text features of Q-Former text (unimodal: text sees only text), as `BaseModelOutputWithPooling`:
        `pooler_output` the normalized `[CLS]` projection `[B, E]`, `last_hidden_state` the text pass's outputs
        `[B, T, D]`, `hidden_states` / `attentions` the Q-Former's."""
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        input_ids, attention_mask = self._qformer_text(
            input_ids, attention_mask, qformer_input_ids, qformer_attention_mask
        )
        if input_ids is None:
            raise ValueError("get_text_features needs Q-Former text: pass input_ids (or qformer_input_ids).")
        text_outputs = self._text_outputs(
            input_ids, attention_mask, output_attentions=output_attentions, output_hidden_states=output_hidden_states
        )
        output = BaseModelOutputWithPooling(
            last_hidden_state=text_outputs.last_hidden_state,
            pooler_output=self._text_projection(text_outputs.last_hidden_state),
            hidden_states=text_outputs.hidden_states,
            attentions=text_outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    def _text_projection(self, text_states: torch.Tensor) -> torch.Tensor:
        """Text-pass outputs `[B, T, D]` -> the normalized `[CLS]` projection `[B, E]`."""
        return nn.functional.normalize(self.text_projection(text_states[:, 0]), dim=-1)

    def _text_feature(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Q-Former ids `[B, T]` (no placeholders) -> the normalized `[CLS]` projection `[B, E]`."""
        return self._text_feature_of(self.embeddings(input_ids), attention_mask)

    def _text_feature_of(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Embedded text `[B, T, D]` -> the normalized `[CLS]` projection `[B, E]` of the text-only (unimodal) pass."""
        text_states = self.qformer(text_embeds=text_embeds, attention_mask=attention_mask, return_dict=True)
        return self._text_projection(text_states.last_hidden_state)

    def _text_pass(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Q-Former ids `[B, T]` (no placeholders) -> the text-only pass's outputs `[B, T, D]`."""
        return self._text_outputs(input_ids, attention_mask).last_hidden_state

    def _text_outputs(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, **record: bool
    ) -> Blip2QFormerModelOutput:
        """The text-only Q-Former pass over ids `[B, T]` (no placeholders); `record` are the output switches."""
        return self.qformer(
            text_embeds=self.embeddings(input_ids), attention_mask=attention_mask, return_dict=True, **record
        )

    def image_text_matching(
        self,
        image_embeds: torch.Tensor | Blip2QFormerImage,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Blip2QFormerModelOutput]:
        """ITM logits `[B, 2]` for pairs (image_embeds[i], text[i]), from image embeddings `[B, 1 + P, Dv]`, or a
        `Blip2QFormerImage` of B rows (images projected once by `qformer.project_image`, rows picked by `select`)."""
        input_ids, attention_mask = self._strip_image_tokens(input_ids, attention_mask)
        return self._matching_pass(image_embeds, input_ids, attention_mask)

    def _matching_pass(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        **record: bool,
    ) -> tuple[torch.Tensor, Blip2QFormerModelOutput]:
        """The ITM pass over Q-Former ids without placeholders: `(logits [B, 2], joint output [B, Q + T, D])`;
        `record` are the output switches."""
        return self._itm_logits(image_embeds, self.embeddings(input_ids), attention_mask, **record)

    def _itm_logits(
        self,
        image: torch.Tensor | Blip2QFormerImage,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **record: bool,
    ) -> tuple[torch.Tensor, Blip2QFormerModelOutput]:
        """One bidirectional pass over `[queries; text]`, row b on image b of `image` (`[B, P, Dv]` or a
        `Blip2QFormerImage` of B rows) and text `text_embeds [B, T, D]`; `itm_head` averaged over the query outputs:
        `(logits [B, 2], joint output [B, Q + T, D])`; `record` are the output switches."""
        query_tokens = self.query_tokens.expand(len(image), -1, -1)
        joint_output = self.qformer(
            query_embeds=query_tokens,
            text_embeds=text_embeds,
            attention_mask=attention_mask,
            encoder_hidden_states=image,
            self_attention_mask="bidirectional",
            return_dict=True,
            **record,
        )
        query_part = joint_output.last_hidden_state[:, : query_tokens.shape[1]]
        return self.itm_head(query_part).mean(dim=1), joint_output

    @torch.no_grad()
    def extract_features(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mode: FeatureMode = "multimodal",
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        frozen_image_states: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> Blip2FeaturesOutput:
        """
        LAVIS's `Blip2Qformer.extract_features`, without gradients as there. A processor's output can be passed as
        is: `model.extract_features(**processor(images=..., text=..., return_tensors="pt"), mode="text")`.

        Args:
            pixel_values: `[B, 3, H, W]` images (modes "image" and "multimodal"), or
            frozen_image_states: `[B, 1 + P, Dv]` the frozen encoder's output before `post_layernorm`
                (`encode_image_frozen`), e.g. from a cache.
            input_ids / attention_mask: `[B, T]` Q-Former tokens (modes "text" and "multimodal"), or
            qformer_input_ids / qformer_attention_mask: the same from a processor (its `input_ids` are then unused).
            mode: "image" (query outputs and their projections), "text" (text outputs and the `[CLS]` projection) or
                "multimodal" (the ITM pass's query outputs, image `i` with text `i`). Inputs the mode does not use
                are ignored.
        Returns:
            `Blip2FeaturesOutput` with the mode's fields (shapes there); `.similarity(...)` gives ITC scores.
        """
        if mode not in FEATURE_MODES:
            raise ValueError(f"mode must be one of {FEATURE_MODES}, got {mode!r}.")
        input_ids, attention_mask = self._qformer_text(
            input_ids, attention_mask, qformer_input_ids, qformer_attention_mask
        )
        if mode != "text" and pixel_values is None and frozen_image_states is None:
            raise ValueError(f"mode={mode!r} needs images: pass pixel_values (or frozen_image_states).")
        if mode != "image" and input_ids is None:
            raise ValueError(f"mode={mode!r} needs text: pass input_ids (Q-Former tokens) or qformer_input_ids.")
        if mode == "text":
            text_embeds = self._text_pass(input_ids, attention_mask)
            text_proj = self._text_projection(text_embeds)
            return Blip2FeaturesOutput(text_embeds=text_embeds, text_embeds_proj=text_proj)

        if frozen_image_states is not None:
            image_embeds = self._image_embeds(pixel_values, frozen_image_states)  # both given: an error
        else:
            image_embeds = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)[0]
        if mode == "image":
            query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
            queries = self.qformer(
                query_embeds=query_tokens, encoder_hidden_states=image_embeds, return_dict=True
            ).last_hidden_state
            image_proj = nn.functional.normalize(self.vision_projection(queries), dim=-1)
            return Blip2FeaturesOutput(image_embeds=queries, image_embeds_proj=image_proj)
        if image_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"mode='multimodal' pairs image i with text i: got {image_embeds.shape[0]} images and "
                f"{input_ids.shape[0]} texts."
            )
        _, joint_output = self._matching_pass(image_embeds, input_ids, attention_mask)
        return Blip2FeaturesOutput(multimodal_embeds=joint_output.last_hidden_state[:, : self.config.num_query_tokens])


class Blip2ForImageTextRetrieval(Blip2Stage1FeaturesMixin, Blip2FrozenTowersMixin, Blip2PreTrainedModel):
    """Image-text similarity from the stage-1 Q-Former.

    - ITC (`use_image_text_matching_head=False`): cosine between each normalized query projection and the normalized
      text `[CLS]` projection, max over the queries: `logits_per_image [B_img, B_txt]` (LAVIS's evaluation score).
      Divided by the learnable `temp` (kept here; transformers' port drops it) they are the training logits.
    - ITM (`True`): one bidirectional pass over `[queries; text]` per pair, `itm_head` on the query outputs averaged
      over the queries: `logits_per_image [B, 2]` (no match, match).
    `input_ids` are Q-Former (BERT) tokens; image placeholder tokens from a processor, if any, are removed. A
    processor's output goes in as is (its `qformer_input_ids` are the Q-Former's text). `extract_features` gives
    LAVIS's unimodal and multimodal features (`Blip2Stage1FeaturesMixin`).
    """

    # A stage-1 folder (Blip2ForPreTraining) also holds the ITG head, which retrieval does not use: loading it here
    # is intended, not a mismatch worth a load report.
    _keys_to_ignore_on_load_unexpected = [r"^cls\.predictions\."]
    # the stage-1 bridge; the vision model (its `post_layernorm` included) takes the dtype it is loaded in
    _keep_in_fp32_modules_strict = [
        "query_tokens",
        "qformer",
        "embeddings.word_embeddings",
        "embeddings.position_embeddings",
        "vision_projection",
        "text_projection",
        "itm_head",
        "temp",
    ]

    def __init__(self, config: Blip2Config):
        super().__init__(config)
        if not config.qformer_config.use_qformer_text_input:
            raise ValueError(
                "Blip2ForImageTextRetrieval runs text through the Q-Former: set "
                "qformer_config.use_qformer_text_input=True."
            )
        qformer_width = config.qformer_config.hidden_size
        self.vision_model = build_vision_model(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer_width))
        self.embeddings = Blip2TextEmbeddings(config.qformer_config)
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.vision_projection = nn.Linear(qformer_width, config.image_text_hidden_size)
        self.text_projection = nn.Linear(qformer_width, config.image_text_hidden_size)
        self.itm_head = nn.Linear(qformer_width, 2)
        self.temp = nn.Parameter(torch.tensor(config.initial_temperature))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        use_image_text_matching_head: bool = False,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> Blip2ImageTextMatchingModelOutput | tuple:
        """
        Args:
            pixel_values: `[B_img, 3, H, W]`.
            input_ids / attention_mask: `[B_txt, T]` Q-Former (BERT) tokens, or
            qformer_input_ids / qformer_attention_mask: the same from a processor, so `model(**processor(images=...,
                text=..., return_tensors="pt"))` works (the processor's `input_ids` are the language model's and are
                then not read).
            use_image_text_matching_head: ITM on pairs (`B_img == B_txt`) instead of ITC on all pairs.
            output_attentions / output_hidden_states / return_dict: as the keyword says, else as `self.config`; the
                towers' records are in `vision_model_output` and `text_model_output`.
        """
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        record = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        input_ids, attention_mask = self._qformer_text(
            input_ids, attention_mask, qformer_input_ids, qformer_attention_mask
        )
        if input_ids is None:
            raise ValueError("Blip2ForImageTextRetrieval scores text: pass input_ids (or qformer_input_ids).")
        if use_image_text_matching_head:
            vision_outputs = self.vision_model(
                pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **record
            )
            logits_per_image, text_outputs = self._matching_pass(
                vision_outputs.last_hidden_state, input_ids, attention_mask, **record
            )
            text_embeds, image_embeds = text_outputs.last_hidden_state, vision_outputs.last_hidden_state
        else:
            image_features = self.get_image_features(
                pixel_values, interpolate_pos_encoding, return_dict=True, **record
            )
            vision_outputs, image_embeds = image_features.vision_outputs, image_features.pooler_output
            text_outputs = self._text_outputs(input_ids, attention_mask, **record)
            text_embeds = self._text_projection(text_outputs.last_hidden_state)
            # [B_img, Q, E] x [E, B_txt] -> [B_img, Q, B_txt] -> max over the queries
            logits_per_image = torch.matmul(image_embeds, text_embeds.t()).max(dim=1).values
        output = Blip2ImageTextMatchingModelOutput(
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
            temperature=self.temp,
        )
        return output if return_dict else output.to_tuple()


# ---------------------------------------------------------------------------------------------------------------------
# Stage 1: representation learning (ITC + ITM + ITG), as LAVIS's `Blip2Qformer`
# ---------------------------------------------------------------------------------------------------------------------


class Blip2QFormerPredictionHeadTransform(nn.Module):
    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class Blip2QFormerLMPredictionHead(nn.Module):
    """BERT's LM head: transform, then the decoder tied to the word embeddings, plus a bias. `[B, T, D] -> [B, T, V]`."""

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.transform = Blip2QFormerPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states)) + self.bias


class Blip2QFormerLMHead(nn.Module):
    """The `cls` of BERT's checkpoints (`cls.predictions.*`), LAVIS's `Qformer.cls`."""

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.predictions = Blip2QFormerLMPredictionHead(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.predictions(hidden_states)


@dataclass
class _Stage1Text:
    """The captions of a stage-1 step, embedded once for the three objectives.

    embeds: `[B, T, D]` the local captions (ITC's text pass).
    rows: `[B]` the local pairs' rows of the global batch (`N` pairs over all processes).
    embeds_all / mask_all: `[N, W, D]` / `[N, W]` every process's captions, right-padded to the longest (ITM's texts).
    decoder_embeds / labels: `[B, T, D]` / `[B, T]` the `[DEC]`-led captions and their ITG labels (`itg_inputs`).
    """

    embeds: torch.Tensor
    rows: torch.LongTensor
    embeds_all: torch.Tensor
    mask_all: torch.Tensor
    decoder_embeds: torch.Tensor
    labels: torch.LongTensor


@dataclass
class Blip2ForPreTrainingOutput(ModelOutput):
    """
    loss: `loss_itc + loss_itm + loss_itg`.
    sim_i2t / sim_t2i: `[B, N]` ITC logits (max-over-queries cosine / temperature) of the local images (texts)
        against the texts (images) of the global batch (`N = B * world size`).
    logits_itm: `[B + n_t + n_i, 2]` ITM logits of (positives, texts with negative images, images with negative texts).
    logits_itg: `[B, T, V]` Q-Former LM logits over the `[DEC]`-led text.
    """

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    loss_itg: torch.FloatTensor | None = None
    sim_i2t: torch.FloatTensor | None = None
    sim_t2i: torch.FloatTensor | None = None
    logits_itm: torch.FloatTensor | None = None
    logits_itg: torch.FloatTensor | None = None


class Blip2ForPreTraining(Blip2Stage1FeaturesMixin, Blip2FrozenTowersMixin, Blip2PreTrainedModel):
    """Stage 1 of BLIP-2: the Q-Former learns, against a frozen image encoder, to extract the visual features text
    needs, with three objectives on one batch of image-text pairs (LAVIS `Blip2Qformer.forward`):

    - **ITC**: max over the queries of cosine(query projection, text `[CLS]` projection) / `temp`, image->text and
      text->image over the global batch, cross-entropy with label smoothing 0.1. `temp` is learnable and not clamped
      (LAVIS); `config.temperature_range` clamps it (ALBEF/BLIP do).
    - **ITM**: one negative image per text and one negative text per image, drawn from the global batch with
      probability softmax(ITC logits) with the positives excluded; (positives, text + negative image, negative text +
      image) through one bidirectional pass; `itm_head` averaged over the query outputs; plain cross-entropy.
    - **ITG**: `[DEC]` (`qformer_config.bos_token_id`) replaces `[CLS]`; text sees all queries and the text before it,
      queries never see text (their keys/values come from the query pass, as LAVIS reuses them); every non-pad token
      after `[DEC]` is predicted, label smoothing 0.1.

    The vision encoder (patch embedding and blocks) is frozen: no gradients, always in eval mode, run without autograd.
    Its `post_layernorm` (LAVIS's `ln_vision`) is trained, as LAVIS does. `extract_features`, `get_image_features`,
    `get_text_features` and `image_text_matching` are those of `Blip2ForImageTextRetrieval`
    (`Blip2Stage1FeaturesMixin`).

    Deviations from LAVIS, each exact or documented: gathers across processes are differentiable on both sides (exact
    gradients of the global-batch loss; LAVIS drops the gradient through the other processes' features); negatives are
    sampled in one vectorized call; each distinct image's cross-attention keys/values are projected once, for the
    query pass and every ITM row together, not once per pass and row, and the three passes' text is embedded in one
    lookup (same results, less compute); NaN similarities and a global batch of one pair do not crash (no negative is
    drawn for a row without candidates); retrieval fine-tuning's `image_id` soft targets are not implemented.
    """

    _tied_weights_keys = {"cls.predictions.decoder.weight": "embeddings.word_embeddings.weight"}
    # the retrieval model's bridge plus the ITG head, whose decoder is the (fp32) word embeddings
    _keep_in_fp32_modules_strict = [*Blip2ForImageTextRetrieval._keep_in_fp32_modules_strict, "cls"]

    def __init__(self, config: Blip2Config):
        super().__init__(config)
        qformer_config = config.qformer_config
        if not qformer_config.use_qformer_text_input:
            raise ValueError("Blip2ForPreTraining trains text through the Q-Former: set use_qformer_text_input=True.")
        if qformer_config.bos_token_id is None:
            raise ValueError(
                "qformer_config.bos_token_id is None: set it to the id of [DEC] (LAVIS adds it to bert-base-uncased as "
                "30522), which starts image-grounded text generation."
            )
        width = qformer_config.hidden_size
        self.vision_model = build_vision_model(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, width))
        self.embeddings = Blip2TextEmbeddings(qformer_config)
        self.qformer = Blip2QFormerModel._from_config(qformer_config)
        self.vision_projection = nn.Linear(width, config.image_text_hidden_size)
        self.text_projection = nn.Linear(width, config.image_text_hidden_size)
        self.itm_head = nn.Linear(width, 2)
        self.temp = nn.Parameter(torch.tensor(config.initial_temperature))
        self.cls = Blip2QFormerLMHead(qformer_config)
        self.post_init()
        self.freeze_vision_encoder()

    @classmethod
    def from_bert(
        cls, bert_model_or_path: str | os.PathLike | PreTrainedModel, config: Blip2Config
    ) -> Blip2ForPreTraining:
        """A stage-1 model whose Q-Former starts from a BERT masked-LM checkpoint, as the paper does (LAVIS
        `init_Qformer` + `Blip2Qformer.__init__`): embeddings, self-attention, the text FFN (copied into the query FFN
        too), the LM head (tied decoder, bias); cross-attention layers, queries and heads keep their random init.
        Only weights: no tokenizer is touched. `[DEC]` is added to BERT's *tokenizer* by
        `Blip2Processor.qformer_tokenizer_from_bert` (LAVIS's `init_tokenizer`); here it is an extra *row*:
        `config.qformer_config.vocab_size` may exceed BERT's vocabulary by the tokens added to its tokenizer (30523
        for bert-base-uncased + `[DEC]`; their embedding rows keep the random init, their LM-head biases start at
        zero), and `config.qformer_config.bos_token_id` must be `[DEC]`'s id. The vision encoder is not touched
        (load it separately, e.g. with `convert_lavis` or training/stage1.py's `vision_model_name_or_path`)."""
        from transformers import BertForMaskedLM

        bert = bert_model_or_path
        if not isinstance(bert, PreTrainedModel):
            bert = BertForMaskedLM.from_pretrained(bert_model_or_path)
        bert_state = bert.state_dict()
        model = cls(config)
        qformer_config = config.qformer_config
        bert_config = bert.config
        for field in ("hidden_size", "intermediate_size", "num_attention_heads", "max_position_embeddings"):
            if getattr(bert_config, field) != getattr(qformer_config, field):
                raise ValueError(
                    f"BERT's {field}={getattr(bert_config, field)} differs from qformer_config.{field}="
                    f"{getattr(qformer_config, field)}."
                )
        if bert_config.num_hidden_layers < qformer_config.num_hidden_layers:
            raise ValueError(
                f"BERT has {bert_config.num_hidden_layers} layers, the Q-Former {qformer_config.num_hidden_layers}."
            )
        if bert_config.vocab_size > qformer_config.vocab_size:
            raise ValueError(f"BERT's vocabulary ({bert_config.vocab_size}) exceeds the Q-Former's.")
        copies = {
            "qformer.layernorm": "bert.embeddings.LayerNorm",
            "cls.predictions.transform": "cls.predictions.transform",
        }
        for i in range(qformer_config.num_hidden_layers):
            ours, theirs = f"qformer.encoder.layer.{i}", f"bert.encoder.layer.{i}"
            copies[f"{ours}.attention.attention"] = f"{theirs}.attention.self"
            copies[f"{ours}.attention.output"] = f"{theirs}.attention.output"
            for ffn in ("", "_query"):  # the query FFN starts as a copy of BERT's FFN
                copies[f"{ours}.intermediate{ffn}"] = f"{theirs}.intermediate"
                copies[f"{ours}.output{ffn}"] = f"{theirs}.output"
        own = model.state_dict()
        new_state = {}
        for ours_prefix, bert_prefix in copies.items():
            for key in own:
                if key.startswith(ours_prefix + "."):
                    new_state[key] = bert_state[bert_prefix + key[len(ours_prefix) :]]
        rows = bert_config.vocab_size
        word = own["embeddings.word_embeddings.weight"].clone()
        word[:rows] = bert_state["bert.embeddings.word_embeddings.weight"]
        bias = torch.zeros_like(own["cls.predictions.bias"])
        bias[:rows] = bert_state["cls.predictions.bias"]
        new_state["embeddings.word_embeddings.weight"] = word
        new_state["embeddings.position_embeddings.weight"] = bert_state["bert.embeddings.position_embeddings.weight"]
        new_state["cls.predictions.bias"] = bias
        model.load_state_dict(new_state, strict=False)
        model.tie_weights()
        return model

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings.word_embeddings = value

    def get_output_embeddings(self) -> nn.Module:
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.cls.predictions.decoder = new_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        frozen_image_states: torch.Tensor | None = None,
        return_dict: bool | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.LongTensor | None = None,
        **kwargs,
    ) -> Blip2ForPreTrainingOutput | tuple:
        """Images (`pixel_values [B, 3, H, W]` or `frozen_image_states [B, 1 + P, Dv]` from `encode_image_frozen`) and
        captions (`input_ids` / `attention_mask [B, T]`, `[CLS]`-led Q-Former tokens, or a processor's `qformer_*` pair) -> the
        losses of `config.pretraining_objectives` (local means, against the global batch in a process group)."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        input_ids, attention_mask = self._captions(
            input_ids, attention_mask, qformer_input_ids, qformer_attention_mask
        )
        config = self.config
        self._clamp_temperature()
        # The queries read the images once; ITC, ITM and ITG all start from this pass.
        image_embeds = self._image_embeds(pixel_values, frozen_image_states)
        image = self._qformer_image(image_embeds)
        query_pass = self._query_pass(image, use_cache=True)
        image_feats = nn.functional.normalize(self.vision_projection(query_pass.last_hidden_state), dim=-1)
        text = self._embed_captions(input_ids, attention_mask)
        text_feat = self._text_feature_of(text.embeds, attention_mask)
        # ITC: queries and text apart; each pair against the global batch
        sim_i2t, sim_t2i = itc_similarities(image_feats, text_feat, self.temp)
        loss_itc = itc_loss(sim_i2t, sim_t2i, text.rows, config.itc_label_smoothing)
        # ITM: queries and text together, on the pairs and on hard negatives drawn from the ITC logits
        loss_itm = logits_itm = loss_itg = logits_itg = None
        if "itm" in config.pretraining_objectives:
            loss_itm, logits_itm = self._itm(image, image_embeds, text, sim_i2t, sim_t2i)
        # ITG: the text decoded from the queries, each token seeing the queries and the tokens before it
        if "itg" in config.pretraining_objectives:
            loss_itg, logits_itg = self._itg(text, attention_mask, query_pass, image)
        losses = {"itc": loss_itc, "itm": loss_itm, "itg": loss_itg}
        output = Blip2ForPreTrainingOutput(
            loss=sum(losses[name] for name in config.pretraining_objectives),
            loss_itc=loss_itc,
            loss_itm=loss_itm,
            loss_itg=loss_itg,
            sim_i2t=sim_i2t,
            sim_t2i=sim_t2i,
            logits_itm=logits_itm,
            logits_itg=logits_itg,
        )
        return output if return_dict is not False else output.to_tuple()

    def _clamp_temperature(self) -> None:
        """`config.temperature_range`, if set, clamps the ITC temperature before each step (ALBEF/BLIP; LAVIS's
        BLIP-2 does not)."""
        if self.config.temperature_range is not None:
            with torch.no_grad():
                self.temp.clamp_(*self.config.temperature_range)

    @staticmethod
    def _captions(
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        qformer_input_ids: torch.LongTensor | None,
        qformer_attention_mask: torch.Tensor | None,
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """The Q-Former captions `(ids [B, T], mask [B, T])`: a processor's `qformer_*` pair when given (its
        `input_ids` are the language model's and are then not read), else `input_ids`; mask all ones if none."""
        if qformer_input_ids is not None:
            input_ids, attention_mask = qformer_input_ids, qformer_attention_mask
        if input_ids is None:
            raise ValueError("Stage 1 trains on image-text pairs: pass input_ids (and attention_mask).")
        return input_ids, torch.ones_like(input_ids) if attention_mask is None else attention_mask

    def _qformer_image(self, image_embeds: torch.Tensor) -> Blip2QFormerImage:
        """The images `[B, 1 + P, Dv]` as the Q-Former reads them. The query pass and the ITM pass cross-attend to
        the same B images, so each cross-attention layer projects their keys/values once for both (LAVIS projects
        them again in the ITM pass: at ViT-g width that is about a tenth of the step's FLOPs). Under activation
        checkpointing every layer projects its own inside the checkpoint, as that is what checkpointing is for: the
        projected keys/values of all layers would otherwise stay in memory until the backward."""
        if self.qformer.is_activation_checkpointing:
            return Blip2QFormerImage(states=image_embeds)
        return self.qformer.project_image(image_embeds)

    def _query_pass(self, image: torch.Tensor | Blip2QFormerImage, use_cache: bool) -> Blip2QFormerModelOutput:
        """The queries alone over the images (`[B, 1 + P, Dv]` or a `Blip2QFormerImage`): `[B, Q, D]`, and with
        `use_cache` their self-attention keys/values, which ITG's text attends to."""
        query_tokens = self.query_tokens.expand(len(image), -1, -1)
        return self.qformer(
            query_embeds=query_tokens, encoder_hidden_states=image, use_cache=use_cache, return_dict=True
        )

    def _embed_captions(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> _Stage1Text:
        """The text of the three objectives (`_Stage1Text`) embedded in one lookup: the word-embedding gradient of a
        lookup is a dense `[vocab, D]` tensor (30523 x 768 for BERT), which backward would otherwise fill and sum
        three times a step."""
        qformer_config = self.config.qformer_config
        pad_id = qformer_config.pad_token_id or 0
        ids_all, mask_all = pad_to_world_length(input_ids, attention_mask, pad_id)
        ids_all, mask_all = gather_no_grad(ids_all), gather_no_grad(mask_all)  # [N, W]: every process's captions
        decoder_ids, labels = itg_inputs(input_ids, attention_mask, qformer_config.bos_token_id)
        batch_size, text_length = input_ids.shape
        padded_decoder_ids = nn.functional.pad(decoder_ids, (0, ids_all.shape[1] - text_length), value=pad_id)
        embeds_all, decoder_embeds = self.embeddings(torch.cat([ids_all, padded_decoder_ids])).split(
            [ids_all.shape[0], batch_size]
        )
        offset = local_offset(batch_size, input_ids.device)
        return _Stage1Text(
            embeds=embeds_all[offset : offset + batch_size, :text_length],
            rows=torch.arange(batch_size, device=input_ids.device) + offset,
            embeds_all=embeds_all,
            mask_all=mask_all,
            decoder_embeds=decoder_embeds[:, :text_length],
            labels=labels,
        )

    def _itm(
        self,
        image: Blip2QFormerImage,
        image_embeds: torch.Tensor,
        text: _Stage1Text,
        sim_i2t: torch.Tensor,
        sim_t2i: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM with hard negatives from the global batch: `(loss_itm, logits_itm [R, 2])`, rows as `ItmBatch`. The
        rows' images are copies of at most 2B distinct images (B in one process), so they share the projection of
        those images (the query pass's, plus the gathered negatives'): LAVIS projects all 3B copies."""
        image_embeds_all = gather_with_grad(image_embeds)
        batch = sample_itm_batch(sim_i2t, sim_t2i, text.rows, append_negative_images=world()[1] > 1)
        if batch.appended_images is not None:  # negatives may live on other processes: append them with gradient
            image = image.cat(self._qformer_image(image_embeds_all[batch.appended_images]))
        logits_itm, _ = self._itm_logits(
            image.select(batch.image_rows), text.embeds_all[batch.text_rows], text.mask_all[batch.text_rows]
        )
        return itm_loss(logits_itm, batch.labels), logits_itm

    def _itg(
        self,
        text: _Stage1Text,
        attention_mask: torch.Tensor,
        query_pass: Blip2QFormerModelOutput,
        image: Blip2QFormerImage,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITG: the `[DEC]`-led text decoded against the queries: `(loss_itg, logits_itg [B, T, V])`. The text
        attends to the query pass's cached keys/values (as LAVIS reuses them), or, where the cache was dropped
        (activation checkpointing), runs one joint multimodal-causal pass with the queries: the same result."""
        cache, num_queries = query_pass.cache, self.config.num_query_tokens
        if cache is not None and cache.get_seq_length() == num_queries:
            text_states = self.qformer(
                text_embeds=text.decoder_embeds,
                attention_mask=attention_mask,
                self_attention_mask="multimodal_causal",
                cache=cache,
                return_dict=True,
            ).last_hidden_state
        else:
            text_states = self.qformer(
                query_embeds=self.query_tokens.expand(len(image), -1, -1),
                text_embeds=text.decoder_embeds,
                attention_mask=attention_mask,
                encoder_hidden_states=image,
                self_attention_mask="multimodal_causal",
                return_dict=True,
            ).last_hidden_state[:, num_queries:]
        logits_itg = self.cls(text_states)
        return itg_loss(logits_itg, text.labels, self.config.itg_label_smoothing), logits_itg

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        frozen_image_states: torch.Tensor | None = None,
        max_new_tokens: int = 30,
        min_new_tokens: int = 0,
        **kwargs,
    ) -> torch.LongTensor:
        """Q-Former captioning (greedy): decode from `[DEC]` through the ITG path, each new token attending to the
        cached queries and the tokens before it, until `[SEP]` (`qformer_config.eos_token_id`). Returns `[B, L]` ids
        starting with `[DEC]`; rows that ended early are padded with `[PAD]`. (LAVIS decodes with 3 beams.)"""
        if kwargs.get("num_beams", 1) != 1 or kwargs.get("do_sample", False):
            raise ValueError("Blip2ForPreTraining.generate decodes greedily only (num_beams=1, do_sample=False).")
        _reject_image_embeds_input(kwargs)
        qformer_config = self.config.qformer_config
        image_embeds = self._image_embeds(pixel_values, frozen_image_states)
        batch_size = image_embeds.shape[0]
        cache = self._query_pass(image_embeds, use_cache=True).cache
        tokens = torch.full((batch_size, 1), qformer_config.bos_token_id, dtype=torch.long, device=image_embeds.device)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=tokens.device)
        for step in range(max_new_tokens):
            hidden = self.qformer(
                text_embeds=self.embeddings(tokens[:, -1:], past_text_length=step),
                self_attention_mask="multimodal_causal",
                cache=cache,
                use_cache=True,
                return_dict=True,
            ).last_hidden_state
            logits = self.cls(hidden[:, -1]).float()
            if step < min_new_tokens and qformer_config.eos_token_id is not None:
                logits[:, qformer_config.eos_token_id] = -torch.inf
            next_token = logits.argmax(dim=-1)
            next_token = next_token.masked_fill(finished, qformer_config.pad_token_id or 0)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if qformer_config.eos_token_id is not None:
                finished |= next_token == qformer_config.eos_token_id
            if bool(finished.all()):
                break
        return tokens


__all__ = [
    "Blip2FeaturesOutput",
    "Blip2QFormerImage",
    "Blip2PreTrainedModel",
    "Blip2VisionModel",
    "Blip2QFormerModel",
    "Blip2Model",
    "Blip2ForConditionalGeneration",
    "Blip2ForImageTextRetrieval",
    "Blip2ForPreTraining",
]
