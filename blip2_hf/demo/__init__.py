"""`blip2-hf demo`: a miniature BLIP-2 reproduced end to end on CPU (synthetic world, "off-the-shelf" unimodal towers
pretrained on the spot, stage 1, stage 2, evaluation, the no-stage-1 ablation, a report).

Where the demo leaves its checkpoints, which the `caption` / `ask` / `retrieve` commands use when no `--model` is
given: `<demo dir>/model` (stage 2, seed 0: captions and answers) and `<demo dir>/retrieval_model` (stage 1, seed 0:
ITC + ITM). The demo dir is `$BLIP2_HF_DEMO_DIR`, else `./blip2_demo`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..constants import VQA_PROMPT  # noqa: F401 (the demo's prompt: the package's zero-shot VQA prompt)

DEMO_DIR_ENV = "BLIP2_HF_DEMO_DIR"
DEFAULT_DEMO_DIR = "blip2_demo"
CAPTION_MODEL_SUBDIR = "model"
RETRIEVAL_MODEL_SUBDIR = "retrieval_model"
# The two arms of the ablation (paper Figure 5), as the results and the report name them.
ARMS = {"stage1+2": "stage 1 + stage 2 (BLIP-2)", "stage2_only": "stage 2 only (no representation learning)"}


def demo_dir() -> Path:
    """`$BLIP2_HF_DEMO_DIR`, else `./blip2_demo`."""
    return Path(os.environ.get(DEMO_DIR_ENV) or DEFAULT_DEMO_DIR)
