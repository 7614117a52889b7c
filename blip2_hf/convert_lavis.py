"""Convert Salesforce LAVIS BLIP-2 checkpoints (`.pth` files holding `{"model": state_dict}`) into blip2_hf folders.

Our module names are transformers' BLIP-2 keys, so the conversion is a renaming plus four special cases:

- `KEY_TABLE` below: one line per LAVIS key pattern and the key it becomes here. Check it line by line against
  LAVIS's `state_dict()` (`eva_vit.py`, `Qformer.py`, `blip2_qformer.py`, `blip2_opt.py`, `blip2_t5.py`).
- `DROPPED`: LAVIS keys left out on purpose (a buffer, the EVA-CLIP head), and `conditional_drop_reason` for the few
  that are dropped only for some targets (ViT blocks past the configured depth, the Q-Former text FFN of stage 2,
  the Q-Former LM head when the target class has none).
- `merge_qv_bias`: EVA's separate query and value biases become one fused `qkv.bias = cat(q, 0, v)`.
- `resize_position_embedding`: the ViT position grid is resized bicubically when the image size differs (LAVIS's
  `interpolate_pos_embed`, e.g. 16x16 -> 26x26 for 364 px).

Everything else is strict: a LAVIS key that matches no rule, a key with no place in the target class and a tensor
whose shape differs from what the config implies raise a `ValueError` naming them. The returned `ConversionReport`
says which of our keys were filled (and from which LAVIS key), which LAVIS keys were dropped and why, and which of our
keys the checkpoint does not provide: LAVIS saves neither the frozen ViT nor the LLM, so those come from
`eva_vit_g.pth` (`--vit`) and the LLM's own checkpoint (`--llm`).

Command line (`blip2-hf-convert-lavis`, or `python -m blip2_hf.convert_lavis`):

    blip2-hf-convert-lavis --checkpoint blip2_pretrained_opt2.7b.pth --vit eva_vit_g.pth \
        --llm /path/to/facebook-opt-2.7b --config pretrain_opt2.7b --output blip2-opt-2.7b

`.pth` files are read with `torch.load(weights_only=True)` only: nothing in them is unpickled beyond tensors and plain
containers. The output folder holds our config and safetensors weights (no tokenizer or image processor), plus
`lavis_conversion_report.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .configuration_blip2 import Blip2Config
from .modeling_blip2 import (
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2ForPreTraining,
    Blip2VisionModel,
)

# ---------------------------------------------------------------------------------------------------------------------
# The key table
# ---------------------------------------------------------------------------------------------------------------------

# Placeholders shared by both sides of a row; every other character is literal.
PLACEHOLDERS: dict[str, str] = {
    "i": r"\d+",  # a layer index
    "p": r"weight|bias",
    "qkv": r"query|key|value",
    "name": r".+",  # the rest of a key (the LLM's own keys, unchanged)
}

# Layer prefixes, to keep every row on one line.
VIT_BLOCK, OUR_VIT_LAYER = "visual_encoder.blocks.{i}.", "vision_model.encoder.layers.{i}."
QFORMER_LAYER, OUR_QFORMER_LAYER = "Qformer.bert.encoder.layer.{i}.", "qformer.encoder.layer.{i}."

# (LAVIS key pattern, our key pattern). Order does not matter: the patterns are anchored and do not overlap.
KEY_TABLE: list[tuple[str, str]] = [
    # --- EVA ViT-g (`visual_encoder`, eva_vit.py) --------------------------------------------------------------------
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),  # resize_position_embedding
    ("visual_encoder.patch_embed.proj.{p}", "vision_model.embeddings.patch_embedding.{p}"),
    (VIT_BLOCK + "norm1.{p}", OUR_VIT_LAYER + "layer_norm1.{p}"),
    (VIT_BLOCK + "attn.qkv.weight", OUR_VIT_LAYER + "self_attn.qkv.weight"),
    (VIT_BLOCK + "attn.q_bias", OUR_VIT_LAYER + "self_attn.qkv.bias"),  # merge_qv_bias: cat(q_bias, 0, v_bias)
    (VIT_BLOCK + "attn.v_bias", OUR_VIT_LAYER + "self_attn.qkv.bias"),  # merge_qv_bias
    (VIT_BLOCK + "attn.proj.{p}", OUR_VIT_LAYER + "self_attn.projection.{p}"),
    (VIT_BLOCK + "norm2.{p}", OUR_VIT_LAYER + "layer_norm2.{p}"),
    (VIT_BLOCK + "mlp.fc1.{p}", OUR_VIT_LAYER + "mlp.fc1.{p}"),
    (VIT_BLOCK + "mlp.fc2.{p}", OUR_VIT_LAYER + "mlp.fc2.{p}"),
    # LAVIS's `ln_vision` sits outside the ViT and is trained; transformers calls it the ViT's post_layernorm.
    ("ln_vision.{p}", "vision_model.post_layernorm.{p}"),
    # --- Q-Former (`Qformer.bert`, Qformer.py) -----------------------------------------------------------------------
    ("query_tokens", "query_tokens"),
    # BERT's embedding LayerNorm runs on [queries; text] together, so it belongs to the Q-Former here.
    ("Qformer.bert.embeddings.LayerNorm.{p}", "qformer.layernorm.{p}"),
    ("Qformer.bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),  # stage 1 only
    ("Qformer.bert.embeddings.position_embeddings.weight", "embeddings.position_embeddings.weight"),  # stage 1 only
    # self-attention, shared by queries and text
    (QFORMER_LAYER + "attention.self.{qkv}.{p}", OUR_QFORMER_LAYER + "attention.attention.{qkv}.{p}"),
    (QFORMER_LAYER + "attention.output.dense.{p}", OUR_QFORMER_LAYER + "attention.output.dense.{p}"),
    (QFORMER_LAYER + "attention.output.LayerNorm.{p}", OUR_QFORMER_LAYER + "attention.output.LayerNorm.{p}"),
    # cross-attention from the queries to the image (layers i % cross_attention_frequency == 0)
    (QFORMER_LAYER + "crossattention.self.{qkv}.{p}", OUR_QFORMER_LAYER + "crossattention.attention.{qkv}.{p}"),
    (QFORMER_LAYER + "crossattention.output.dense.{p}", OUR_QFORMER_LAYER + "crossattention.output.dense.{p}"),
    (QFORMER_LAYER + "crossattention.output.LayerNorm.{p}", OUR_QFORMER_LAYER + "crossattention.output.LayerNorm.{p}"),
    # query FFN
    (QFORMER_LAYER + "intermediate_query.dense.{p}", OUR_QFORMER_LAYER + "intermediate_query.dense.{p}"),
    (QFORMER_LAYER + "output_query.dense.{p}", OUR_QFORMER_LAYER + "output_query.dense.{p}"),
    (QFORMER_LAYER + "output_query.LayerNorm.{p}", OUR_QFORMER_LAYER + "output_query.LayerNorm.{p}"),
    # text FFN, BERT's own (conditional_drop_reason drops it when the config has use_qformer_text_input=False)
    (QFORMER_LAYER + "intermediate.dense.{p}", OUR_QFORMER_LAYER + "intermediate.dense.{p}"),
    (QFORMER_LAYER + "output.dense.{p}", OUR_QFORMER_LAYER + "output.dense.{p}"),
    (QFORMER_LAYER + "output.LayerNorm.{p}", OUR_QFORMER_LAYER + "output.LayerNorm.{p}"),
    # --- Q-Former LM head (stage 1, ITG): BERT's `cls`, decoder weight tied to the word embeddings ------------------
    ("Qformer.cls.predictions.bias", "cls.predictions.bias"),
    ("Qformer.cls.predictions.transform.dense.{p}", "cls.predictions.transform.dense.{p}"),
    ("Qformer.cls.predictions.transform.LayerNorm.{p}", "cls.predictions.transform.LayerNorm.{p}"),
    ("Qformer.cls.predictions.decoder.weight", "cls.predictions.decoder.weight"),
    # BERT registers `decoder.bias = bias` (one tensor, two names); dropped when our class has no such alias.
    ("Qformer.cls.predictions.decoder.bias", "cls.predictions.decoder.bias"),
    # --- stage-1 heads (blip2_qformer.py) ----------------------------------------------------------------------------
    ("vision_proj.{p}", "vision_projection.{p}"),
    ("text_proj.{p}", "text_projection.{p}"),
    ("itm_head.{p}", "itm_head.{p}"),
    ("temp", "temp"),  # the learnable ITC temperature, a 0-dim tensor
    # --- stage 2 (blip2_opt.py / blip2_t5.py): the LLM keys are already transformers' ------------------------------
    ("opt_proj.{p}", "language_projection.{p}"),
    ("opt_model.{name}", "language_model.{name}"),  # OPTForCausalLM: model.decoder.*, lm_head.weight
    ("t5_proj.{p}", "language_projection.{p}"),
    ("t5_model.{name}", "language_model.{name}"),  # T5ForConditionalGeneration: shared, encoder.*, decoder.*, lm_head
]

# LAVIS keys that are always left out, and why.
DROPPED: list[tuple[str, str]] = [
    ("Qformer.bert.embeddings.position_ids", "buffer: arange(max_position_embeddings), rebuilt by our model"),
    ("visual_encoder.norm.{p}", "EVA-CLIP's final norm: BLIP-2 takes the raw output of its last kept block"),
    ("visual_encoder.fc_norm.{p}", "EVA-CLIP's pooled-feature norm: unused by BLIP-2"),
    ("visual_encoder.head.{p}", "EVA-CLIP's classification/projection head: unused by BLIP-2"),
]

# Why the checkpoint may not provide one of our keys (first matching pattern wins).
MISSING_REASONS: list[tuple[str, str]] = [
    (
        "vision_model.post_layernorm.{p}",
        "LAVIS's ln_vision: every BLIP-2 checkpoint has it, eva_vit_g.pth does not",
    ),
    (
        "vision_model.{name}",
        "the frozen EVA ViT: LAVIS does not save frozen weights (freeze_vit=True); convert eva_vit_g.pth with --vit",
    ),
    (
        "language_model.{name}",
        "the frozen LLM: LAVIS never saves it; give the LLM's own checkpoint (e.g. facebook/opt-2.7b) with --llm",
    ),
    ("cls.predictions.{name}", "the Q-Former LM head: only stage-1 checkpoints have it"),
    ("embeddings.{name}", "the Q-Former text embeddings: stage-2 checkpoints drop them"),
    (
        "qformer.encoder.layer.{i}.intermediate.{name}",
        "the Q-Former text FFN: stage-2 checkpoints drop it (take it from the stage-1 checkpoint)",
    ),
    (
        "qformer.encoder.layer.{i}.output.{name}",
        "the Q-Former text FFN: stage-2 checkpoints drop it (take it from the stage-1 checkpoint)",
    ),
    ("{name}", "not saved in this LAVIS checkpoint"),
]

QV_BIAS_KEY = re.compile(r"visual_encoder\.blocks\.\d+\.attn\.([qv])_bias")
POSITION_EMBEDDING_KEY = "vision_model.embeddings.position_embedding"
EVA_TOP_LEVEL_NAMES = ("cls_token", "pos_embed", "patch_embed", "blocks", "norm", "fc_norm", "head")


def _compile(pattern: str) -> re.Pattern[str]:
    """`"visual_encoder.blocks.{i}.norm1.{p}"` -> an anchored regex with a named group per placeholder."""
    parts = re.split(r"\{(\w+)\}", pattern)  # literal, name, literal, name, ..., literal
    regex = "".join(
        re.escape(part) if index % 2 == 0 else f"(?P<{part}>{PLACEHOLDERS[part]})" for index, part in enumerate(parts)
    )
    return re.compile(regex)


_KEY_RULES = [(_compile(lavis), ours) for lavis, ours in KEY_TABLE]
_DROP_RULES = [(_compile(lavis), reason) for lavis, reason in DROPPED]
_MISSING_RULES = [(_compile(ours), reason) for ours, reason in MISSING_REASONS]


def rename_key(lavis_key: str) -> str | None:
    """Our key for `lavis_key` by `KEY_TABLE`, or None when no row matches."""
    for regex, ours in _KEY_RULES:
        match = regex.fullmatch(lavis_key)
        if match:
            return ours.format(**match.groupdict())
    return None


def _first_reason(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    return next((reason for regex, reason in rules if regex.fullmatch(key)), None)


# ---------------------------------------------------------------------------------------------------------------------
# The special cases
# ---------------------------------------------------------------------------------------------------------------------


def merge_qv_bias(q_bias: torch.Tensor, v_bias: torch.Tensor) -> torch.Tensor:
    """EVA's attention has no key bias: it builds `cat(q_bias, zeros, v_bias)` in every forward. Ours is one fused
    `qkv.bias [3D]`; a key bias only adds a per-query constant to the logits, which the softmax ignores."""
    return torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])


def resize_position_embedding(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """`[1, 1 + g*g, D]` -> `[1, 1 + grid*grid, D]`, as LAVIS's `interpolate_pos_embed`: the class position is kept,
    the `g x g` patch grid is resized bicubically (align_corners=False). Computed in fp32 (CPU bicubic has no fp16)
    and returned in the input dtype."""
    num_extra = 1
    side = math.isqrt(pos_embed.shape[1] - num_extra)
    dim = pos_embed.shape[-1]
    extra, patches = pos_embed[:, :num_extra], pos_embed[:, num_extra:]
    patches = patches.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patches = nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([extra, patches], dim=1)


def is_bare_eva(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """An EVA ViT checkpoint on its own (`eva_vit_g.pth`): top-level `blocks.*` / `cls_token`, no BLIP-2 parts."""
    tops = {key.split(".", 1)[0] for key in state_dict}
    return bool(tops) and tops <= set(EVA_TOP_LEVEL_NAMES) and bool(tops & {"blocks", "cls_token", "pos_embed"})


def add_visual_encoder_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`eva_vit_g.pth` keys -> the keys they have inside a LAVIS BLIP-2 model (`visual_encoder.*`)."""
    return {f"visual_encoder.{key}": tensor for key, tensor in state_dict.items()}


@dataclass
class _Target:
    """What the target class expects: key -> shape, tied key -> its source, and which conditional rules apply."""

    model_class: type[nn.Module]
    shapes: dict[str, torch.Size]
    tied: dict[str, str]
    vision_layers: int
    text_ffn: bool


def conditional_drop_reason(lavis_key: str, our_key: str, target: _Target, state_dict: Mapping) -> str | None:
    """The LAVIS keys dropped only for some targets: ViT blocks past `vision_config.num_hidden_layers`, the Q-Former
    text FFN when the config builds none, and the Q-Former LM head for a class without one."""
    name = target.model_class.__name__
    block = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\..+", our_key)
    if block and int(block.group(1)) >= target.vision_layers and our_key not in target.shapes:
        return (
            f"EVA block {block.group(1)}: BLIP-2 keeps the first vision_config.num_hidden_layers="
            f"{target.vision_layers} blocks (it drops EVA-CLIP ViT-g's last block)"
        )
    if re.fullmatch(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\..+", our_key) and not target.text_ffn:
        return "Q-Former text FFN: the config has qformer_config.use_qformer_text_input=False (stage 2 never uses it)"
    if our_key.startswith("cls.predictions.") and not any(k.startswith("cls.predictions.") for k in target.shapes):
        return f"Q-Former LM head: {name} has none (Blip2ForPreTraining does)"
    if our_key == "cls.predictions.decoder.bias" and our_key not in target.shapes:
        bias = state_dict.get("Qformer.cls.predictions.bias")
        if bias is not None and torch.equal(bias, state_dict[lavis_key]):
            return "alias of Qformer.cls.predictions.bias (BERT sets decoder.bias = bias)"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """What a conversion did.

    model_class: the class the keys are for.
    filled: our key -> the LAVIS key(s) it was made from.
    dropped: LAVIS key -> why it was left out on purpose.
    missing: our key -> why the checkpoint does not provide it ("not in this checkpoint"); such weights keep the
        target model's initialization.
    tied: our key -> the filled key whose tensor it shares (not stored separately).
    notes: anything else done on the way (position-grid resizing, blocks cut, ties undone).
    """

    model_class: str
    filled: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self, origins: Mapping[str, str] | None = None) -> str:
        """A readable summary; `origins` (LAVIS key -> file) splits the filled keys by the file they came from."""
        total = len(self.filled) + len(self.missing) + len(self.tied)
        lines = [f"LAVIS -> blip2_hf conversion for {self.model_class}: {len(self.filled)} of {total} keys filled"]
        if origins:
            per_file: dict[str, int] = defaultdict(int)
            for lavis_keys in self.filled.values():
                per_file[origins.get(lavis_keys.split(" + ")[0], "?")] += 1
            lines += [f"  from {source}: {_keys(count)}" for source, count in sorted(per_file.items())]
        if self.tied:
            lines.append(f"tied ({_keys(len(self.tied))} sharing a filled tensor):")
            lines += [f"  {ours} = {source}" for ours, source in sorted(self.tied.items())]
        if self.dropped:
            lines.append(f"dropped on purpose ({_keys(len(self.dropped))} of LAVIS):")
            lines += _grouped(self.dropped)
        if self.missing:
            lines.append(
                f"NOT IN THIS CHECKPOINT ({_keys(len(self.missing))}; they keep their random initialization):"
            )
            lines += _grouped(self.missing)
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {note}" for note in self.notes]
        return "\n".join(lines)


def _keys(count: int) -> str:
    return f"{count} key" if count == 1 else f"{count} keys"


def _grouped(reasons: Mapping[str, str], max_patterns: int = 8) -> list[str]:
    """Keys grouped by reason, layer indices folded into `*` so that 39 ViT blocks read as one line."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for key, reason in reasons.items():
        by_reason[reason].append(key)
    lines = []
    for reason, keys in by_reason.items():
        lines.append(f"  {_keys(len(keys))}: {reason}")
        patterns: dict[str, int] = defaultdict(int)
        for key in keys:
            patterns[re.sub(r"\.\d+\.", ".*.", key)] += 1
        shown = sorted(patterns.items())
        lines += [
            f"      {pattern}" + (f"  (x{count})" if count > 1 else "") for pattern, count in shown[:max_patterns]
        ]
        if len(shown) > max_patterns:
            lines.append(f"      ... and {len(shown) - max_patterns} more patterns")
    return lines


def infer_model_class(lavis_state_dict: Mapping[str, torch.Tensor]) -> type[nn.Module]:
    """The class a LAVIS checkpoint converts to: a stage-2 projection -> `Blip2ForConditionalGeneration`; the
    Q-Former LM head (`Qformer.cls`) -> `Blip2ForPreTraining`; other Q-Former checkpoints (stage 1 without the LM
    head, retrieval) -> `Blip2ForImageTextRetrieval`; a ViT alone (`eva_vit_g.pth`) -> `Blip2VisionModel`."""
    keys = list(lavis_state_dict)
    if any(k.startswith(("opt_proj.", "t5_proj.", "opt_model.", "t5_model.")) for k in keys):
        return Blip2ForConditionalGeneration
    if any(k.startswith("Qformer.cls.") for k in keys):
        return Blip2ForPreTraining
    stage_one = ("Qformer.", "query_tokens", "vision_proj.", "text_proj.", "itm_head.", "temp")
    if any(k.startswith(stage_one) for k in keys):
        return Blip2ForImageTextRetrieval
    if is_bare_eva(lavis_state_dict) or all(k.startswith(("visual_encoder.", "ln_vision.")) for k in keys):
        return Blip2VisionModel
    raise ValueError(
        "Not a LAVIS BLIP-2 checkpoint: no Q-Former (Qformer.*), stage-2 (opt_proj / t5_proj) or EVA ViT keys. "
        f"First keys: {keys[:5]}"
    )


def _target(model_class: type[nn.Module], config: Blip2Config) -> _Target:
    """Our keys and shapes for `model_class`, read from a model built on the meta device (no memory, no init cost).
    Keys are in the composite layout (`vision_model.*`) even for `Blip2VisionModel`."""
    is_vision = issubclass(model_class, Blip2VisionModel)
    with torch.device("meta"):
        model = model_class(config.vision_config if is_vision else config)
    prefix = "vision_model." if is_vision else ""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return _Target(
        model_class=model_class,
        shapes={prefix + key: tensor.shape for key, tensor in model.state_dict().items()},
        tied={prefix + key: prefix + source for key, source in tied.items()},
        vision_layers=config.vision_config.num_hidden_layers,
        text_ffn=bool(config.qformer_config.use_qformer_text_input),
    )


def _listing(items: Sequence[str], limit: int = 25) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {shown}{more}"


def convert_state_dict_with_report(
    lavis_state_dict: Mapping[str, torch.Tensor],
    config: Blip2Config,
    model_class: type[nn.Module] | None = None,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Convert a LAVIS state dict to our keys for `model_class` (default: `infer_model_class`).

    Args:
        lavis_state_dict: the `"model"` entry of a LAVIS `.pth` (or a bare `eva_vit_g.pth` state dict), tensors only.
        config: the target configuration; every converted tensor must have the shape it implies.
    Returns:
        Our state dict (tensors are shared with the input where no special case applies) and its report. Keys are
        those of `model_class.state_dict()`.
    Raises:
        ValueError: naming every LAVIS key that matches no rule or has no place in `model_class`, every tensor whose
            shape differs from the config's (LAVIS key, our key, both shapes), and a lone `q_bias` / `v_bias`.
    """
    notes: list[str] = []
    state_dict = dict(lavis_state_dict)
    if is_bare_eva(state_dict):
        state_dict = add_visual_encoder_prefix(state_dict)
        notes.append("bare EVA ViT checkpoint: its keys were read as visual_encoder.*")
    model_class = model_class or infer_model_class(state_dict)
    llm_prefix(state_dict, config)  # an OPT checkpoint with a T5 config (or the reverse) fails here, by name
    target = _target(model_class, config)
    report = ConversionReport(model_class=model_class.__name__, notes=notes)

    converted, qv_biases = _rename_or_drop(state_dict, target, report)
    _merge_qv_biases(qv_biases, converted, report)
    _resize_position_grid(converted, target, report)
    _check_shapes(converted, target, report)
    _account_for_target_keys(converted, target, report)
    if issubclass(model_class, Blip2VisionModel):
        converted = _strip_vision_prefix(converted, report)
    return converted, report


def _rename_or_drop(
    state_dict: Mapping[str, torch.Tensor], target: _Target, report: ConversionReport
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, tuple[str, torch.Tensor]]]]:
    """Route each LAVIS key: dropped (with its reason, in `report`), renamed to our key, or held as a q/v bias half.

    Returns:
        The renamed tensors by our key, and the EVA `q_bias` / `v_bias` halves by our fused key, then `"q"` / `"v"`,
        as `(LAVIS key, tensor)`.
    Raises:
        ValueError: naming every LAVIS key that matches no rule, then every key with no place in the target class.
    """
    converted: dict[str, torch.Tensor] = {}
    qv_biases: dict[str, dict[str, tuple[str, torch.Tensor]]] = defaultdict(dict)
    unmatched: list[str] = []
    homeless: list[str] = []
    for lavis_key, tensor in state_dict.items():
        reason = _first_reason(lavis_key, _DROP_RULES)
        our_key = None if reason else rename_key(lavis_key)
        if reason is None and our_key is None:
            unmatched.append(lavis_key)
            continue
        reason = reason or conditional_drop_reason(lavis_key, our_key, target, state_dict)
        if reason:
            report.dropped[lavis_key] = reason
        elif our_key not in target.shapes:
            homeless.append(f"{lavis_key} -> {our_key}")
        elif (qv := QV_BIAS_KEY.fullmatch(lavis_key)) is not None:
            qv_biases[our_key][qv.group(1)] = (lavis_key, tensor)
        else:
            converted[our_key] = tensor
            report.filled[our_key] = lavis_key
    if unmatched:
        raise ValueError(f"{len(unmatched)} LAVIS keys match no row of KEY_TABLE or DROPPED:{_listing(unmatched)}")
    if homeless:
        raise ValueError(
            f"{len(homeless)} LAVIS keys have no place in {report.model_class} (is the config or the class the "
            f"right one?):{_listing(homeless)}"
        )
    return converted, qv_biases


def _merge_qv_biases(
    qv_biases: Mapping[str, Mapping[str, tuple[str, torch.Tensor]]],
    converted: dict[str, torch.Tensor],
    report: ConversionReport,
) -> None:
    """Fuse each block's EVA `q_bias` and `v_bias` into our `qkv.bias`, in place; a lone half raises `ValueError`."""
    for our_key, parts in qv_biases.items():
        if set(parts) != {"q", "v"}:
            raise ValueError(f"{our_key} needs both attn.q_bias and attn.v_bias; the checkpoint has only {set(parts)}")
        converted[our_key] = merge_qv_bias(parts["q"][1], parts["v"][1])
        report.filled[our_key] = f"{parts['q'][0]} + {parts['v'][0]}"


def _resize_position_grid(converted: dict[str, torch.Tensor], target: _Target, report: ConversionReport) -> None:
    """Resize the ViT position embeddings in place when the config's square patch grid differs from the checkpoint's.

    Anything else (a non-square grid, another width) is left for `_check_shapes` to report.
    """
    position = converted.get(POSITION_EMBEDDING_KEY)
    expected = target.shapes.get(POSITION_EMBEDDING_KEY)
    if position is not None and expected is not None and position.shape != expected:
        old_side, new_side = math.isqrt(position.shape[1] - 1), math.isqrt(expected[1] - 1)
        if (
            old_side**2 == position.shape[1] - 1
            and new_side**2 == expected[1] - 1
            and position.shape[2] == expected[2]
        ):
            converted[POSITION_EMBEDDING_KEY] = resize_position_embedding(position, new_side)
            report.notes.append(
                f"position embeddings resized {old_side}x{old_side} -> {new_side}x{new_side} patches "
                "(bicubic, align_corners=False, as LAVIS's interpolate_pos_embed)"
            )


def _check_shapes(converted: Mapping[str, torch.Tensor], target: _Target, report: ConversionReport) -> None:
    """Raise `ValueError` naming every converted tensor (LAVIS key, our key, both shapes) the config does not imply."""
    mismatched = [
        f"{report.filled[key]} -> {key}: LAVIS {tuple(tensor.shape)}, expected {tuple(target.shapes[key])}"
        for key, tensor in converted.items()
        if tensor.shape != target.shapes[key]
    ]
    if mismatched:
        raise ValueError(f"{len(mismatched)} tensors do not have the shape the config implies:{_listing(mismatched)}")


def _account_for_target_keys(converted: Mapping[str, torch.Tensor], target: _Target, report: ConversionReport) -> None:
    """Note the EVA blocks dropped for depth, and record each target key not filled as tied or missing (with why)."""
    dropped_blocks = sorted({int(k.split(".")[2]) for k in report.dropped if k.startswith("visual_encoder.blocks.")})
    if dropped_blocks:
        report.notes.append(
            f"EVA blocks {dropped_blocks} dropped: vision_config.num_hidden_layers={target.vision_layers} keeps the "
            "first blocks"
        )
    for our_key in target.shapes:
        if our_key in converted:
            continue
        source = target.tied.get(our_key)
        if source is not None and source in converted:
            report.tied[our_key] = source
        else:
            report.missing[our_key] = "not in this checkpoint: " + _first_reason(our_key, _MISSING_RULES)


def _strip_vision_prefix(converted: Mapping[str, torch.Tensor], report: ConversionReport) -> dict[str, torch.Tensor]:
    """Drop the `vision_model.` prefix from the state dict and the report: the vision model's own keys carry none."""
    strip = len("vision_model.")
    report.filled = {key[strip:]: value for key, value in report.filled.items()}
    report.missing = {key[strip:]: value for key, value in report.missing.items()}
    report.tied = {key[strip:]: value[strip:] for key, value in report.tied.items()}
    return {key[strip:]: tensor for key, tensor in converted.items()}


def convert_state_dict(
    lavis_state_dict: Mapping[str, torch.Tensor],
    config: Blip2Config,
    model_class: type[nn.Module] | None = None,
) -> dict[str, torch.Tensor]:
    """`convert_state_dict_with_report` without the report: LAVIS keys -> our keys for the implied class."""
    return convert_state_dict_with_report(lavis_state_dict, config, model_class)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Files: LAVIS .pth, the LLM's own checkpoint, configs
# ---------------------------------------------------------------------------------------------------------------------


def load_lavis_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a LAVIS `.pth`: its `"model"` entry, or the file itself when it is a bare state dict
    (`eva_vit_g.pth`). Read with `weights_only=True`: nothing but tensors and plain containers is unpickled."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as error:  # not a zip / legacy pickle at all, or cut short
        raise ValueError(f"{path} is not a PyTorch checkpoint: {str(error).splitlines()[0]}") from error
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):  # garbage bytes ("Unsupported operand"), not an unsafe object
            raise ValueError(f"{path} is not a PyTorch checkpoint (torch.load cannot unpickle it)") from error
        raise ValueError(
            f"{path} cannot be read safely: it holds Python objects other than tensors and plain containers, and "
            "this tool only loads .pth files with torch.load(weights_only=True) (unpickling arbitrary objects can "
            "run code). If you trust the file, re-save its weights alone, e.g. "
            "torch.save({'model': torch.load(path, weights_only=False)['model']}, 'clean.pth'), and convert that. "
            f"torch said: {str(error).splitlines()[0]}"
        ) from error
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"{path}: expected {{'model': state_dict}} or a state dict, got {type(state_dict).__name__}")
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: the state dict has entries that are not tensors:{_listing(not_tensors)}")
    return state_dict


def load_llm_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The LLM's own weights: a transformers folder (`model.safetensors[.index.json]` or `pytorch_model.bin[.index.
    json]`) or a single `.safetensors` / `.bin` / `.pth` file. `.bin`/`.pth` are read with weights_only=True."""
    from safetensors.torch import load_file  # a transformers dependency; only needed here

    path = Path(path)
    if path.is_dir():
        for index_name, single_name in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            if (path / index_name).is_file():
                shards = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
                files = [path / shard for shard in shards]
                break
            if (path / single_name).is_file():
                files = [path / single_name]
                break
        else:
            raise ValueError(f"--llm {path}: no model.safetensors or pytorch_model.bin (or their index) in the folder")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"--llm {path}: no such file or folder")
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        state_dict.update(load_file(file) if file.suffix == ".safetensors" else load_lavis_checkpoint(file))
    return state_dict


def llm_state_dict_to_lavis(
    llm_state_dict: Mapping[str, torch.Tensor], lavis_prefix: str, our_keys: set[str] | Mapping[str, object]
) -> dict[str, torch.Tensor]:
    """Put an LLM's own keys where LAVIS has them (`opt_model.*` / `t5_model.*`). Checkpoints saved from the base model
    (facebook/opt-*: `decoder.*`, no `model.` and no `lm_head`) get the task model's `model.` back, found by looking
    the key up among ours."""
    lavis = {}
    for key, tensor in llm_state_dict.items():
        if f"language_model.{key}" not in our_keys and f"language_model.model.{key}" in our_keys:
            key = f"model.{key}"
        lavis[lavis_prefix + key] = tensor
    return lavis


# Presets for the released LAVIS BLIP-2 models (`lavis/configs/models/blip2/*.yaml`), by LAVIS model type. Built from
# four pieces: the ViT-g at 224 or 364 px (COCO fine-tuning), the stage-1 Q-Former (BERT vocabulary 30522 + [DEC]),
# and the OPT / Flan-T5 configs of the LLMs' own checkpoints. `image_token_index` is the first id after each
# tokenizer's vocabulary (where Blip2Processor's added "<image>" lands); it fits inside the embedding padding rows, so
# the LLM weights load unresized. OPT's EOS is "\n" (50118), as LAVIS generates and transformers' conversion writes.
_STAGE1_QFORMER = dict(
    vocab_size=30523, use_qformer_text_input=True, bos_token_id=30522, eos_token_id=102
)  # [DEC], [SEP]
_OPT = dict(
    model_type="opt",
    vocab_size=50272,
    num_hidden_layers=32,
    max_position_embeddings=2048,
    do_layer_norm_before=True,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=50118,
)
_LLMS = {
    "opt2.7b": (dict(_OPT, hidden_size=2560, ffn_dim=10240, word_embed_proj_dim=2560, num_attention_heads=32), 50265),
    "opt6.7b": (dict(_OPT, hidden_size=4096, ffn_dim=16384, word_embed_proj_dim=4096, num_attention_heads=32), 50265),
}
_T5 = dict(
    model_type="t5",
    vocab_size=32128,
    d_kv=64,
    num_layers=24,
    num_decoder_layers=24,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu",  # LAVIS sets exact GELU for Flan-T5 (blip2_t5.py), as transformers' conversion does
    tie_word_embeddings=False,  # Flan-T5 has its own lm_head and no decoder-output scaling
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=1,
    decoder_start_token_id=0,
)
_LLMS["flant5xl"] = (dict(_T5, d_model=2048, d_ff=5120, num_heads=32), 32100)
_LLMS["flant5xxl"] = (dict(_T5, d_model=4096, d_ff=10240, num_heads=64), 32100)


def _preset(image_size: int, llm: str | None) -> dict:
    config = dict(vision_config=dict(image_size=image_size), num_query_tokens=32)
    if llm is None:  # stage 1 / retrieval: text runs through the Q-Former
        return dict(config, qformer_config=dict(_STAGE1_QFORMER))
    text_config, image_token_index = _LLMS[llm]
    return dict(config, qformer_config={}, text_config=dict(text_config), image_token_index=image_token_index)


PRESETS: dict[str, dict] = {
    "pretrain": _preset(224, None),  # blip2_pretrain.yaml (stage 1, ITC/ITM/ITG)
    "coco": _preset(364, None),  # blip2_coco.yaml (retrieval fine-tuned, 364 px)
    "pretrain_opt2.7b": _preset(224, "opt2.7b"),
    "pretrain_opt6.7b": _preset(224, "opt6.7b"),
    "caption_coco_opt2.7b": _preset(364, "opt2.7b"),
    "caption_coco_opt6.7b": _preset(364, "opt6.7b"),
    "pretrain_flant5xl": _preset(224, "flant5xl"),
    "pretrain_flant5xxl": _preset(224, "flant5xxl"),
    "caption_coco_flant5xl": _preset(364, "flant5xl"),
}


def load_config(name_or_path: str) -> Blip2Config:
    """A `PRESETS` name, a `config.json` file, or a folder holding one (transformers' or ours)."""
    if name_or_path in PRESETS:
        return Blip2Config(**PRESETS[name_or_path])
    path = Path(name_or_path)
    if path.is_file():
        return Blip2Config.from_dict(json.loads(path.read_text()))
    if path.is_dir():
        return Blip2Config.from_pretrained(path)
    raise ValueError(f"--config {name_or_path!r}: neither a preset ({', '.join(PRESETS)}) nor a config.json / folder")


# ---------------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------------


def untie_differing_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Give a tied weight its own tensor when the checkpoint holds different values under both names (Flan-T5's
    lm_head is not its input embedding, but transformers 5 ties T5 always). Loading both into one shared tensor would
    silently keep only the last. Returns the keys untied."""
    untied = []
    for key, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if key in state_dict and source in state_dict and not torch.equal(state_dict[key], state_dict[source]):
            module_name, _, param_name = key.rpartition(".")
            module = model.get_submodule(module_name)
            setattr(module, param_name, nn.Parameter(getattr(module, param_name).detach().clone()))
            untied.append(key)
    return untied


def llm_prefix(state_dict: Mapping[str, torch.Tensor], config: Blip2Config) -> str | None:
    """`opt_model.` or `t5_model.` for a LAVIS stage-2 state dict (by its `opt_*` / `t5_*` keys), None when it has
    neither. Raises if the config's LLM is of the other kind (decoder-only OPT vs encoder-decoder T5)."""
    stage_two = ("opt_proj.", "opt_model.", "t5_proj.", "t5_model.")
    kinds = {key.split("_", 1)[0] for key in state_dict if key.startswith(stage_two)}
    if not kinds:
        return None
    if len(kinds) > 1:
        raise ValueError("The state dict holds both OPT (opt_*) and T5 (t5_*) keys: convert one model at a time")
    kind = kinds.pop()
    if bool(config.is_encoder_decoder) != (kind == "t5"):
        raise ValueError(
            f"The checkpoint holds LAVIS {kind}_* keys ({'T5' if kind == 't5' else 'OPT'}) but the config's LLM is "
            f"{config.text_config.model_type!r}: pick the matching preset or config"
        )
    return f"{kind}_model."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip2-hf-convert-lavis",
        description="Convert a Salesforce LAVIS BLIP-2 checkpoint (.pth) into a blip2_hf model folder.",
    )
    parser.add_argument("--checkpoint", required=True, help="LAVIS .pth ({'model': state_dict}): stage 1 or stage 2")
    parser.add_argument("--vit", help="eva_vit_g.pth, for the frozen ViT that LAVIS checkpoints do not save")
    parser.add_argument(
        "--llm",
        help="the LLM's own checkpoint (transformers folder or .safetensors/.bin file) for stage 2, or 'none'",
    )
    parser.add_argument(
        "--config", required=True, help=f"a config.json (or its folder), or a preset: {', '.join(PRESETS)}"
    )
    parser.add_argument("--output", required=True, help="folder to write the model to (save_pretrained)")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing --output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Convert, load into the matching class with `load_state_dict(strict=False)`, check that every weight left
    missing is one the report lists as not in this checkpoint, `save_pretrained` (safetensors), print the report."""
    args = _parser().parse_args(argv)
    try:
        return _convert(args)
    except (OSError, ValueError) as err:  # a missing or unsafe file, wrong keys or shapes, an existing --output
        print(f"blip2-hf-convert-lavis: error: {err}", file=sys.stderr)
        return 1


def _convert(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"--output {output} exists; pass --overwrite to write into it")
    config = load_config(args.config)
    checkpoint = load_lavis_checkpoint(args.checkpoint)
    model_class = infer_model_class(checkpoint)

    # Assemble the LAVIS model's in-memory state dict as LAVIS builds it: ViT file, then LLM, then the checkpoint on
    # top (a fine-tuned checkpoint's own ViT wins over eva_vit_g.pth).
    lavis: dict[str, torch.Tensor] = {}
    origins: dict[str, str] = {}
    notes: list[str] = []

    def add(state_dict: Mapping[str, torch.Tensor], origin: str) -> None:
        overridden = [key for key in state_dict if key in lavis]
        if overridden:
            notes.append(f"{len(overridden)} keys of {origins[overridden[0]]} replaced by {origin}")
        lavis.update(state_dict)
        origins.update(dict.fromkeys(state_dict, origin))

    if args.vit:
        vit = load_lavis_checkpoint(args.vit)
        vit = add_visual_encoder_prefix(vit) if is_bare_eva(vit) else vit
        strays = [key for key in vit if not key.startswith("visual_encoder.")]
        if strays:
            raise ValueError(f"--vit {args.vit} is not an EVA ViT checkpoint; it has:{_listing(strays)}")
        add(vit, Path(args.vit).name)
    if args.llm and args.llm.lower() != "none":
        prefix = llm_prefix(checkpoint, config)
        if prefix is None:
            raise ValueError("--llm is for stage-2 checkpoints (with opt_proj / t5_proj); this one has neither")
        our_keys = _target(model_class, config).shapes
        add(llm_state_dict_to_lavis(load_llm_state_dict(args.llm), prefix, our_keys), Path(args.llm).name)
    add(checkpoint, Path(args.checkpoint).name)

    converted, report = convert_state_dict_with_report(lavis, config, model_class)
    report.notes[:0] = notes
    model = model_class(config.vision_config if model_class is Blip2VisionModel else config)
    untied = untie_differing_weights(model, converted)
    if untied:
        report.notes.append(
            f"kept separate (the checkpoint's values differ from the tensor they are tied to): {untied}"
        )
    result = model.load_state_dict(converted, strict=False)
    unexplained = sorted(set(result.missing_keys) - set(report.missing) - set(report.tied))
    if unexplained or result.unexpected_keys:
        raise RuntimeError(
            f"load_state_dict disagrees with the conversion report: missing but not reported {unexplained}, "
            f"unexpected {result.unexpected_keys}"
        )
    model.save_pretrained(output)
    report_dict = dict(report.to_dict(), origins={key: origins[key] for key in lavis})
    (output / "lavis_conversion_report.json").write_text(json.dumps(report_dict, indent=1) + "\n")
    print(report.format(origins))
    print(f"saved {model_class.__name__} to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
