"""Defaults shared by the library, the command line and the scripts, in a module that imports nothing heavy: the
command line builds its parsers (and answers `--help`) from these before it imports torch or transformers."""

from __future__ import annotations

from pathlib import Path

# The zero-shot VQA prompt of `blip2-hf ask` and evaluation/vqa.py: LAVIS's BLIP-2 zero-shot VQA configs use it for
# every LLM (`vqav2_zeroshot_opt_eval.yaml`, `..._flant5xl_eval.yaml`, `prompt: "Question: {} Short answer:"`); the
# demo's LLM learns this format. The paper's OPT rows used "Question: {} Answer:" (pass it as the prompt to match).
VQA_PROMPT = "Question: {} Short answer:"

# The model card template `blip2-hf push` / `card` render (model_cards/blip2.md is the same file).
DEFAULT_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
# The upstream BLIP-2 checkpoints (Salesforce/blip2-*) are published under MIT; the LLM's own license applies too.
DEFAULT_LICENSE = "mit"
# Seconds each Hub request of `blip2-hf push` / `hub.push_folder` may wait to connect and for each read or write.
HUB_TIMEOUT = 60.0
