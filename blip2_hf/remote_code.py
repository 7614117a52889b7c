"""Checkpoint packaging: what a saved BLIP-2 folder carries so that it loads where `blip2_hf` is not installed.

Every checkpoint we save holds the package's model code (`REMOTE_CODE_FILES`) and a config with the complete
`auto_map` (`AUTO_MAP`) and, for models that generate, the `image-to-text` pipeline entry (`IMAGE_TO_TEXT_PIPELINE`),
so that `AutoModel*.from_pretrained(folder, trust_remote_code=True)` and `pipeline(..., trust_remote_code=True)`
work. `save_pretrained` (modeling_blip2.py) writes them, and `hub.push_folder` completes older folders with them.

This file is remote code too (modeling_blip2.py imports it): it imports only the standard library.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CODE_DIR = Path(__file__).parent
AUTO_MAP = {
    "AutoConfig": "configuration_blip2.Blip2Config",
    "AutoModel": "modeling_blip2.Blip2Model",
    "AutoModelForImageTextToText": "modeling_blip2.Blip2ForConditionalGeneration",
    "AutoModelForZeroShotImageClassification": "modeling_blip2.Blip2ForImageTextRetrieval",
    "AutoModelForPreTraining": "modeling_blip2.Blip2ForPreTraining",
}
PIPELINE_FILE = "pipeline_blip2.py"
REMOTE_CODE_FILES = ("configuration_blip2.py", "modeling_blip2.py", "losses.py", "remote_code.py", PIPELINE_FILE)
IMAGE_TO_TEXT_PIPELINE = {
    "impl": "pipeline_blip2.Blip2ImageToTextPipeline",
    "pt": ["AutoModelForImageTextToText"],
    "type": "multimodal",
}


def set_auto_map(config: Any, generates: bool) -> None:
    """Write the complete `auto_map` into `config` (a `Blip2Config`) and, when the model `generates` and the pipeline
    code is at hand to ship beside it, the `image-to-text` pipeline entry."""
    config.auto_map = dict(AUTO_MAP)
    # Loaded as remote code, this folder may lack the pipeline file: then no entry names it.
    if generates and (CODE_DIR / PIPELINE_FILE).exists():
        config.custom_pipelines = {"image-to-text": dict(IMAGE_TO_TEXT_PIPELINE)}


def has_complete_auto_map(config: Mapping[str, Any], generates: bool) -> bool:
    """Whether a config.json's dict already holds everything `set_auto_map` writes."""
    complete = all((config.get("auto_map") or {}).get(key) == value for key, value in AUTO_MAP.items())
    if generates:
        complete &= (config.get("custom_pipelines") or {}).get("image-to-text") == IMAGE_TO_TEXT_PIPELINE
    return complete


def copy_remote_code(save_directory: str | os.PathLike) -> None:
    """Copy the model code (`REMOTE_CODE_FILES`, those present beside this file) into `save_directory`."""
    for name in REMOTE_CODE_FILES:
        if (CODE_DIR / name).exists():
            shutil.copyfile(CODE_DIR / name, Path(save_directory) / name)
