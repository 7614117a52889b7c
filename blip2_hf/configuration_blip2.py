"""BLIP-2 configurations: the vision encoder, the Q-Former, and the composite model.

The field names and defaults are those of transformers' own BLIP-2 (`transformers.models.blip_2`), which are the
Salesforce/blip2-* checkpoints' `config.json` keys, so those files load here unchanged. Our `model_type`s are our own
(`blip2_hf*`: transformers owns `blip-2`); a config saved by transformers is re-labelled on load.

This file is copied into saved checkpoints as remote code: it imports nothing but transformers and huggingface_hub.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

# transformers' BLIP-2 model types. A config that carries one of them (a Salesforce/blip2-* `config.json`) is ours
# once loaded: the label is dropped so that `config.model_type` reads ours at runtime and on save.
TRANSFORMERS_MODEL_TYPES = ("blip-2", "blip_2_vision_model", "blip_2_qformer")


def _drop_foreign_model_type(kwargs: dict[str, Any]) -> None:
    if kwargs.get("model_type") in TRANSFORMERS_MODEL_TYPES:
        kwargs.pop("model_type")


def _check(condition: bool, config: PreTrainedConfig, field: str, expected: str, shown: str | None = None) -> None:
    """Raise a `ValueError` that names the config class, the field, its value (or `shown`) and what was expected."""
    if not condition:
        value = shown if shown is not None else repr(getattr(config, field, None))
        raise ValueError(f"{type(config).__name__}.{field} = {value} is invalid: expected {expected}.")


def _check_positive_ints(config: PreTrainedConfig, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        _check(isinstance(value, int) and value > 0, config, field, "a positive integer")


def _check_probabilities(config: PreTrainedConfig, *fields: str) -> None:
    for field in fields:
        _check(0.0 <= getattr(config, field) < 1.0, config, field, "a dropout probability in [0, 1)")


@strict
class Blip2VisionConfig(PreTrainedConfig):
    r"""
    The frozen image encoder: a ViT in the EVA / transformers BLIP-2 layout (pre-norm blocks, one fused `qkv`
    projection, no final norm inside the encoder; `post_layernorm` is LAVIS's trainable `ln_vision`). The defaults are
    EVA ViT-g/14 with its last block removed, as BLIP-2 uses it: 39 layers of width 1408, 257 tokens at 224 px.

    Args:
        hidden_size: width of the encoder (1408 for ViT-g).
        intermediate_size: width of the MLP (6144 for ViT-g).
        num_hidden_layers: number of transformer blocks (39: EVA-CLIP's 40 minus the last).
        num_attention_heads: attention heads; `hidden_size` must be divisible by it.
        image_size: side of the square input the position embeddings were trained for (224; 364 for COCO fine-tuning).
        patch_size: side of a patch; `image_size` must be divisible by it.
        hidden_act: MLP activation (exact GELU in EVA).
        layer_norm_eps: LayerNorm epsilon.
        attention_dropout: dropout on attention probabilities.
        initializer_range: std of the truncated-normal init of the position and class embeddings.
        qkv_bias: whether the fused `qkv` projection has a bias (EVA: query and value biases, key bias fixed at zero).
        conv_stem_channels: None (EVA and every Salesforce checkpoint): one `patch_size` x `patch_size` convolution
            embeds each patch. A list of channel widths: a convolutional stem instead (Xiao et al., 2021, "Early
            convolutions help transformers see better"), one 3x3 stride-2 convolution per entry (GroupNorm, GELU),
            then a 1x1 convolution to `hidden_size`; `patch_size` must be `2 ** len(conv_stem_channels)`. Small
            encoders trained from scratch learn shapes much sooner with it (the demo's towers).
    """

    model_type = "blip2_hf_vision_model"
    base_config_key = "vision_config"

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float | int = 0.0
    initializer_range: float = 1e-10
    qkv_bias: bool = True
    conv_stem_channels: list[int] | None = None

    def __post_init__(self, **kwargs):
        _drop_foreign_model_type(kwargs)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        _check_positive_ints(
            self,
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
        )
        _check(
            self.hidden_size % self.num_attention_heads == 0,
            self,
            "hidden_size",
            f"a multiple of num_attention_heads={self.num_attention_heads}",
        )
        _check(
            self.image_size % self.patch_size == 0, self, "image_size", f"a multiple of patch_size={self.patch_size}"
        )
        _check(self.hidden_act in ACT2FN, self, "hidden_act", f"one of {sorted(ACT2FN)}")
        _check_probabilities(self, "attention_dropout")
        if self.conv_stem_channels is not None:
            channels = self.conv_stem_channels
            _check(
                isinstance(channels, list | tuple) and len(channels) > 0
                and all(isinstance(c, int) and c > 0 for c in channels),
                self, "conv_stem_channels", "None or a non-empty list of positive integers",
            )  # fmt: skip
            _check(
                self.patch_size == 2 ** len(channels),
                self, "patch_size", f"2 ** len(conv_stem_channels) = {2 ** len(channels)} (one stride-2 conv each)",
            )  # fmt: skip

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@strict
class Blip2QFormerConfig(PreTrainedConfig):
    r"""
    The Querying Transformer: a BERT-base encoder whose layers run learned queries and text in one sequence with shared
    self-attention; queries alone cross-attend to the image (every `cross_attention_frequency`-th layer) and use their
    own feed-forward (`intermediate_query` / `output_query`), text uses BERT's (`intermediate` / `output`).

    Args:
        vocab_size: text vocabulary (30522 for bert-base-uncased, 30523 with BLIP-2's added `[DEC]`).
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act: BERT-base shapes.
        hidden_dropout_prob, attention_probs_dropout_prob: dropout (0.1, as BERT and LAVIS).
        max_position_embeddings: longest text (position embeddings apply to text only, never to queries).
        initializer_range: std of the normal init (0.02, as BERT; also used for the query tokens, as LAVIS).
        layer_norm_eps: LayerNorm epsilon (1e-12, as BERT).
        pad_token_id: id of `[PAD]`.
        cross_attention_frequency: layer `i` cross-attends to the image when `i % cross_attention_frequency == 0`.
        encoder_hidden_size: width of the image features (set from the vision config by `Blip2Config`).
        use_qformer_text_input: build the text feed-forward blocks, needed whenever text runs through the Q-Former
            (stage 1, retrieval). Stage-2 checkpoints have no text weights.
        bos_token_id: `[DEC]`, which replaces `[CLS]` to start image-grounded text generation (stage 1: ITG and
            Q-Former captioning). LAVIS adds it to bert-base-uncased as id 30522 (vocab 30523).
        eos_token_id: `[SEP]` (102 in bert-base-uncased), where Q-Former captioning stops.
    """

    model_type = "blip2_hf_qformer"
    base_config_key = "qformer_config"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_qformer_text_input: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self, **kwargs):
        _drop_foreign_model_type(kwargs)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        _check_positive_ints(
            self,
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "cross_attention_frequency",
            "encoder_hidden_size",
        )
        _check(
            self.hidden_size % self.num_attention_heads == 0,
            self,
            "hidden_size",
            f"a multiple of num_attention_heads={self.num_attention_heads}",
        )
        _check(self.hidden_act in ACT2FN, self, "hidden_act", f"one of {sorted(ACT2FN)}")
        _check_probabilities(self, "hidden_dropout_prob", "attention_probs_dropout_prob")
        for field in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, field)
            _check(
                value is None or 0 <= value < self.vocab_size,
                self,
                field,
                f"None or an id in [0, vocab_size={self.vocab_size})",
            )


@dataclasses.dataclass(frozen=True)
class VisionFamily:
    """What `Blip2Config` needs to know of a family of image encoders (keyed by its config's `model_type`).

    Attributes:
        feature_layer: the default `vision_feature_layer` (-1: the backbone's `last_hidden_state`; k: its
            `hidden_states[k]`).
        prefix_tokens: how many tokens come before the patch tokens (`[CLS]`, registers), as a function of the
            config; None where unknown (then `vision_feature_select_strategy="patch"` is refused).
        any_size: the encoder takes any image size (a convolutional network, no position embeddings; DINOv2,
            which always interpolates its position embeddings: its config says 518 px, its processor writes 224).
    """

    feature_layer: int = -1
    prefix_tokens: Any = None
    any_size: bool = False


def _one_cls(config: PreTrainedConfig) -> int:
    return 1


def _no_cls(config: PreTrainedConfig) -> int:
    return 0


# The families tested here, with their defaults. Every family defaults to `vision_feature_select_strategy="full"`
# (all tokens: BLIP-2 feeds EVA's `[CLS]` to the Q-Former too; SigLIP and ConvNeXt have none, so "full" == "patch").
# - EVA (ours): -1, since `Blip2VisionConfig` already stops one block before EVA-CLIP's last, as the paper does;
# - CLIP and SigLIP: -2, the paper's "second last layer" (their last layer is trained for the contrastive head);
# - DINOv2: -1, its final LayerNorm included (self-supervised features, used as is by every DINOv2 probe);
# - ConvNeXt: -1, the last stage's feature map; its `h * w` positions are the tokens.
# Any other vision model transformers has may be used too, with -1 and "full" (and its own `hidden_size`).
VISION_FAMILIES: dict[str, VisionFamily] = {
    Blip2VisionConfig.model_type: VisionFamily(-1, _one_cls),
    "clip_vision_model": VisionFamily(-2, _one_cls),
    "siglip_vision_model": VisionFamily(-2, _no_cls),
    "dinov2": VisionFamily(-1, _one_cls, any_size=True),
    "dinov2_with_registers": VisionFamily(-1, lambda config: 1 + config.num_register_tokens, any_size=True),
    "convnext": VisionFamily(-1, _no_cls, any_size=True),
}
VISION_FEATURE_SELECT_STRATEGIES = ("full", "patch")


def vision_family(vision_config: PreTrainedConfig) -> VisionFamily:
    """The `VisionFamily` of a vision config (the generic one for families not in `VISION_FAMILIES`)."""
    return VISION_FAMILIES.get(vision_config.model_type, VisionFamily())


def is_vision_model_type(model_type: str | None) -> bool:
    """Whether transformers' `AutoModel` builds an image encoder for `model_type`: an image backbone
    (`AutoModelForImageClassification`'s bases: ConvNeXt, DINOv2, ViT, ...) or a `*_vision_model` tower of a
    two-tower model (CLIP, SigLIP). A full two-tower config (`clip`) or a text model (`bert`) is not one."""
    if model_type in (Blip2VisionConfig.model_type, "blip_2_vision_model"):
        return True
    return model_type in MODEL_FOR_IMAGE_MAPPING_NAMES or (
        bool(model_type) and model_type.endswith("_vision_model") and model_type in MODEL_MAPPING_NAMES
    )


def vision_depth(vision_config: PreTrainedConfig) -> int | None:
    """How many blocks (ConvNeXt: stages) the encoder has: its `hidden_states` hold `depth + 1` entries."""
    for field in ("num_hidden_layers", "num_stages"):
        if isinstance(getattr(vision_config, field, None), int):
            return getattr(vision_config, field)
    depths = getattr(vision_config, "depths", None)
    return len(depths) if isinstance(depths, list | tuple) else None


def vision_layer_widths(vision_config: PreTrainedConfig) -> list[int] | None:
    """The width of each `hidden_states` entry (`depth + 1` of them), or None where the depth is unknown. A
    pyramid (ConvNeXt: `hidden_sizes` per stage) starts with its stem, as wide as its first stage."""
    depth = vision_depth(vision_config)
    if depth is None:
        return None
    sizes = getattr(vision_config, "hidden_sizes", None)
    if isinstance(sizes, list | tuple) and len(sizes) == depth:
        return [sizes[0], *sizes]
    return [vision_config.hidden_size] * (depth + 1)


def _foreign_vision_config(vision_config: dict[str, Any]) -> PreTrainedConfig:
    """A transformers vision config from its dict (`model_type` names the class)."""
    values = dict(vision_config)
    model_type = values.pop("model_type")
    if not is_vision_model_type(model_type):
        raise _not_a_vision_model(model_type, "dict")
    return AutoConfig.for_model(model_type, **values)


def _not_a_vision_model(model_type: Any, kind: str) -> ValueError:
    return ValueError(
        f"Blip2Config.vision_config = <{kind} with model_type={model_type!r}> is invalid: expected a Blip2VisionConfig "
        "(EVA, the default) or the config of a transformers vision model (an image backbone such as 'convnext', "
        "'dinov2', 'vit', or a two-tower model's image tower such as 'clip_vision_model', 'siglip_vision_model'; "
        "not the full two-tower config, e.g. CLIPConfig: pass its .vision_config)."
    )


@strict
class Blip2Config(PreTrainedConfig):
    r"""
    The composite BLIP-2 configuration: vision encoder + Q-Former + language model. The single source of truth for
    every BLIP-2 class of this package.

    Args:
        vision_config: the frozen image encoder: a `Blip2VisionConfig` (EVA, the default: the Salesforce checkpoints)
            or the config of any transformers vision model (`SiglipVisionConfig`, `CLIPVisionConfig`,
            `Dinov2Config`, `ConvNextConfig`, ...), or either's dict with its `model_type`.
        vision_feature_layer: which output of the image encoder feeds the Q-Former: -1 its `last_hidden_state`
            (with the final norm where the encoder has one), any other `k` its `hidden_states[k]` (0: the
            embeddings, -2: the second-to-last block). None: the family's default (`VISION_FAMILIES`: -2 for CLIP
            and SigLIP, as the paper takes CLIP's second-last layer; -1 otherwise). Saved resolved.
        vision_feature_select_strategy: "full" (every token: `[CLS]` and register tokens too, as BLIP-2 feeds EVA's)
            or "patch" (patch tokens only). None: "full". Saved resolved.
        qformer_config: a `Blip2QFormerConfig` or its dict (`encoder_hidden_size` is set from `vision_hidden_size`).
        text_config: any `AutoConfig` of a causal LM (OPT, Llama-family, Qwen2, ...) or of an encoder-decoder LM
            (T5 / Flan-T5), or its dict with a `model_type` (default: OPT).
        num_query_tokens: number of learned queries (32).
        image_text_hidden_size: width of the ITC projections (256).
        image_token_index: id of the `<image>` placeholder in the LLM vocabulary; the processor writes
            `num_query_tokens` of them in front of the prompt and the model puts the projected queries there.
        initializer_factor, initializer_range: as transformers' BLIP-2.
        initial_temperature: initial value of the learnable ITC temperature (0.07, as LAVIS; transformers' port
            drops the parameter).
        temperature_range: `[min, max]` to clamp the temperature to before each stage-1 step (ALBEF/BLIP do
            `clamp_(0.001, 0.5)`); None (default) leaves it unclamped, as LAVIS's BLIP-2 does.
        itc_label_smoothing / itg_label_smoothing: label smoothing of the stage-1 ITC and ITG losses (0.1, LAVIS).
        pretraining_objectives: the stage-1 losses `Blip2ForPreTraining` computes and sums: `["itc", "itm", "itg"]`
            (the paper's). Leaving one out is the paper's Table 6 ablation (e.g. `["itc", "itm"]`: without ITG);
            ITM needs ITC, whose similarities pick its hard negatives.
        tie_word_embeddings: tie the stage-1 Q-Former LM head to the Q-Former word embeddings, as BERT does. (The
            LLM's own tying is its `text_config`'s business.)
    """

    model_type = "blip2_hf"
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="opt"),
        "vision_config": Blip2VisionConfig,
        "qformer_config": Blip2QFormerConfig,
    }

    vision_config: dict | PreTrainedConfig | None = None
    vision_feature_layer: int | None = None
    vision_feature_select_strategy: str | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    image_token_index: int | None = None
    initializer_factor: float = 1.0
    initializer_range: float = 0.02
    initial_temperature: float = 0.07
    temperature_range: list[float] | None = None
    itc_label_smoothing: float = 0.1
    itg_label_smoothing: float = 0.1
    pretraining_objectives: list[str] = dataclasses.field(default_factory=lambda: ["itc", "itm", "itg"])
    tie_word_embeddings: bool = True

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        # A Salesforce/blip2-* config.json says "blip-2": read it as ours, without transformers' "you are using a
        # model of type blip-2 to instantiate a model of type blip2_hf" warning (the layouts are the same).
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") in TRANSFORMERS_MODEL_TYPES:
            config_dict["model_type"] = cls.model_type
        return config_dict, kwargs

    def __post_init__(self, **kwargs):
        _drop_foreign_model_type(kwargs)
        # A transformers `Blip2VisionConfig` / `Blip2QFormerConfig` object is re-read as ours (same fields).
        if isinstance(self.qformer_config, PreTrainedConfig) and not isinstance(
            self.qformer_config, Blip2QFormerConfig
        ):
            self.qformer_config = self.qformer_config.to_dict()
        self.vision_config = self._resolve_vision_config(self.vision_config)
        super().__post_init__(**kwargs)
        self.is_encoder_decoder = self.text_config.is_encoder_decoder
        family = vision_family(self.vision_config)
        if self.vision_feature_layer is None:
            self.vision_feature_layer = family.feature_layer
        if self.vision_feature_select_strategy is None:
            self.vision_feature_select_strategy = "full"
        self.qformer_config.encoder_hidden_size = self.vision_hidden_size
        self.use_decoder_only_language_model = self.text_config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    @staticmethod
    def _resolve_vision_config(vision_config: Any) -> Any:
        """Ours (`Blip2VisionConfig`, built by `sub_configs_defaults` from a dict or None) or a transformers vision
        config object; anything else is a `ValueError` naming `Blip2Config.vision_config`."""
        if isinstance(vision_config, PreTrainedConfig):
            if isinstance(vision_config, Blip2VisionConfig):
                return vision_config
            # transformers' own, or ours from another copy of this file (remote code): the same fields
            if vision_config.model_type in ("blip_2_vision_model", Blip2VisionConfig.model_type):
                return vision_config.to_dict()
            if not is_vision_model_type(vision_config.model_type):
                raise _not_a_vision_model(vision_config.model_type, type(vision_config).__name__)
            return vision_config
        if isinstance(vision_config, dict):
            model_type = vision_config.get("model_type")
            if model_type in (None, Blip2VisionConfig.model_type, *TRANSFORMERS_MODEL_TYPES):
                return vision_config
            return _foreign_vision_config(vision_config)
        if vision_config is not None:
            raise _not_a_vision_model(None, type(vision_config).__name__)
        return vision_config

    @property
    def vision_hidden_size(self) -> int:
        """The width of the image features the Q-Former cross-attends to: the selected layer's (`hidden_size`;
        ConvNeXt: the stage's `hidden_sizes` entry, `hidden_sizes[-1]` by default)."""
        widths = vision_layer_widths(self.vision_config)
        layer = self.vision_feature_layer if self.vision_feature_layer is not None else -1
        if widths is not None and -len(widths) <= layer < len(widths):
            return widths[layer]
        sizes = getattr(self.vision_config, "hidden_sizes", None)
        return sizes[-1] if isinstance(sizes, list | tuple) and sizes else self.vision_config.hidden_size

    @property
    def vision_image_size(self) -> tuple[int, int] | None:
        """`(height, width)` of the images the encoder was built for (its position embeddings), or None when any size
        works (a convolutional encoder such as ConvNeXt)."""
        if vision_family(self.vision_config).any_size:
            return None
        size = self.vision_config.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def vision_num_prefix_tokens(self) -> int | None:
        """How many non-patch tokens (`[CLS]`, registers) lead the encoder's output; None where unknown."""
        prefix_tokens = vision_family(self.vision_config).prefix_tokens
        return None if prefix_tokens is None else prefix_tokens(self.vision_config)

    def validate_architecture(self):
        super().validate_architecture()
        _check_positive_ints(self, "num_query_tokens", "image_text_hidden_size")
        _check(self.initial_temperature > 0, self, "initial_temperature", "a positive number")
        if self.temperature_range is not None:
            low_high = list(self.temperature_range)
            _check(
                len(low_high) == 2 and 0 < low_high[0] <= low_high[1],
                self,
                "temperature_range",
                "None or [min, max] with 0 < min <= max",
            )
        for field in ("itc_label_smoothing", "itg_label_smoothing"):
            _check(0.0 <= getattr(self, field) < 1.0, self, field, "a label smoothing in [0, 1)")
        objectives = self.pretraining_objectives
        _check(
            isinstance(objectives, list | tuple) and len(objectives) > 0
            and set(objectives) <= {"itc", "itm", "itg"} and len(set(objectives)) == len(objectives)
            and ("itm" not in objectives or "itc" in objectives),
            self, "pretraining_objectives",
            "a non-empty list of distinct 'itc', 'itm', 'itg' (ITM needs ITC: its hard negatives come from ITC)",
        )  # fmt: skip
        self._validate_vision_features()
        text_type = self.text_config.model_type
        _check(
            text_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            or text_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
            self,
            "text_config",
            "the config of a causal or sequence-to-sequence language model",
            shown=f"<{type(self.text_config).__name__} with model_type={text_type!r}>",
        )
        vocab_size = getattr(self.text_config, "vocab_size", None)
        if self.image_token_index is not None and vocab_size is not None:
            _check(
                0 <= self.image_token_index < vocab_size,
                self,
                "image_token_index",
                f"an id inside the language model's vocabulary [0, text_config.vocab_size={vocab_size})",
            )

    def _validate_vision_features(self) -> None:
        _check(
            self.vision_feature_select_strategy in VISION_FEATURE_SELECT_STRATEGIES,
            self,
            "vision_feature_select_strategy",
            f"one of {list(VISION_FEATURE_SELECT_STRATEGIES)}",
        )
        vision_type = self.vision_config.model_type
        _check(
            self.vision_feature_select_strategy == "full" or self.vision_num_prefix_tokens is not None,
            self, "vision_feature_select_strategy",
            f"'full' for model_type={vision_type!r}: which of its tokens are patches is not known here",
        )  # fmt: skip
        layer, depth = self.vision_feature_layer, vision_depth(self.vision_config)
        if depth is None:
            _check(
                layer == -1, self, "vision_feature_layer",
                f"-1 (the last hidden state) for model_type={vision_type!r}, whose depth is not known here",
            )  # fmt: skip
            return
        _check(
            isinstance(layer, int) and not isinstance(layer, bool) and -(depth + 1) <= layer <= depth,
            self, "vision_feature_layer",
            f"-1 (the last hidden state) or an index into the {depth + 1} hidden states of the {depth}-block "
            f"{vision_type!r} encoder, in [{-(depth + 1)}, {depth}]",
        )  # fmt: skip
