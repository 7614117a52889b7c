"""blip2-hf: BLIP-2 built natively on the Hugging Face stack.

Importing the package registers its classes with transformers' auto classes, so `AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText`, `AutoModelForZeroShotImageClassification`, `AutoModelForPreTraining`,
`AutoProcessor` and `AutoImageProcessor` resolve our `blip2_hf` checkpoints in this process; saved checkpoints also carry the code (see `remote_code.py`).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

from .configuration_blip2 import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig
from .constants import VQA_PROMPT
from .inference import answer_questions
from .modeling_blip2 import (
    Blip2BackboneVisionModel,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2ForPreTraining,
    Blip2Model,
    Blip2PreTrainedModel,
    Blip2QFormerImage,
    Blip2QFormerModel,
    Blip2VisionModel,
    CheckpointMismatchError,
)
from .pipeline_blip2 import Blip2ImageToTextPipeline
from .processing_blip2 import Blip2ImageProcessor, Blip2Processor, load_image

__version__ = "0.1.0"

for _config in (Blip2Config, Blip2VisionConfig, Blip2QFormerConfig):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
AutoModel.register(Blip2Config, Blip2Model, exist_ok=True)
AutoModel.register(Blip2VisionConfig, Blip2VisionModel, exist_ok=True)
AutoModel.register(Blip2QFormerConfig, Blip2QFormerModel, exist_ok=True)
AutoModelForImageTextToText.register(Blip2Config, Blip2ForConditionalGeneration, exist_ok=True)
AutoModelForZeroShotImageClassification.register(Blip2Config, Blip2ForImageTextRetrieval, exist_ok=True)
AutoModelForPreTraining.register(Blip2Config, Blip2ForPreTraining, exist_ok=True)
# Not `AutoImageProcessor.register`: it merges into the mapping that transformers' own (same-named) Blip2Config has,
# which would keep transformers' BlipImageProcessor as the torchvision backend of ours.
IMAGE_PROCESSOR_MAPPING.register(Blip2Config, {"pil": Blip2ImageProcessor}, exist_ok=True)
AutoProcessor.register(Blip2Config, Blip2Processor, exist_ok=True)
# A saved processor carries processing_blip2.py and an `auto_map`, like the models; so does its image processor
# (same file), so that `Blip2ImageProcessor` loads where blip2_hf is not installed.
Blip2Processor.register_for_auto_class("AutoProcessor")
Blip2ImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "Blip2Config",
    "Blip2QFormerConfig",
    "Blip2VisionConfig",
    "Blip2PreTrainedModel",
    "Blip2VisionModel",
    "Blip2BackboneVisionModel",
    "Blip2QFormerModel",
    "Blip2QFormerImage",
    "Blip2Model",
    "Blip2ForConditionalGeneration",
    "Blip2ForImageTextRetrieval",
    "Blip2ForPreTraining",
    "CheckpointMismatchError",
    "Blip2Processor",
    "Blip2ImageProcessor",
    "Blip2ImageToTextPipeline",
    "VQA_PROMPT",
    "answer_questions",
    "load_image",
]
