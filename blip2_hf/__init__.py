"""blip2-hf: BLIP-2 built natively on the Hugging Face stack."""

from .configuration_blip2 import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig
from .modeling_blip2 import (
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Model,
    Blip2PreTrainedModel,
    Blip2QFormerModel,
    Blip2VisionModel,
)

__version__ = "0.1.0"

__all__ = [
    "Blip2Config",
    "Blip2QFormerConfig",
    "Blip2VisionConfig",
    "Blip2PreTrainedModel",
    "Blip2VisionModel",
    "Blip2QFormerModel",
    "Blip2Model",
    "Blip2ForConditionalGeneration",
    "Blip2ForImageTextRetrieval",
]
