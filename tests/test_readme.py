"""Every ```python block of README.md runs as written, with each Hugging Face Hub name it uses replaced by a tiny
local stand-in built here (same layout, tiny widths), in a fresh working directory holding `photo.jpg` and
`photo2.jpg`. A snippet that fails, or names a Hub repository without a stand-in below, fails its test."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from test_extract_features import save_stage1_folder
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

from blip2_hf.testing_utils import (
    TINY_QFORMER,
    draw_images,
    make_bert_tokenizer,
    make_llama_tokenizer,
    make_opt_tokenizer,
    make_t5_tokenizer,
    save_tiny_generation_checkpoint,
)

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def save_bert(folder: Path) -> None:
    """bert-base-uncased's layout: a `BertForMaskedLM` (Q-Former widths) and a WordPiece tokenizer without `[DEC]`."""
    vocab = {token: index for token, index in make_bert_tokenizer().get_vocab().items() if token != "[DEC]"}
    BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(folder)
    sizes = {key: TINY_QFORMER[key] for key in ("hidden_size", "num_hidden_layers", "num_attention_heads")}
    config = BertConfig(
        vocab_size=len(vocab),
        intermediate_size=TINY_QFORMER["intermediate_size"],
        max_position_embeddings=TINY_QFORMER["max_position_embeddings"],
        **sizes,
    )
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(folder)


def tokenizer_folder(make: Callable) -> Callable[[Path], None]:
    return lambda folder: make().save_pretrained(folder)


# Hub name -> builder of its stand-in folder.
STANDINS: dict[str, Callable[[Path], None]] = {
    "Salesforce/blip2-opt-2.7b": lambda folder: save_tiny_generation_checkpoint(folder, "opt"),
    "Salesforce/blip2-flan-t5-xl": lambda folder: save_tiny_generation_checkpoint(folder, "t5"),
    "Salesforce/blip2-itm-vit-g": save_stage1_folder,  # the stage-1 layout: Q-Former with text, BERT + [DEC]
    "bert-base-uncased": save_bert,
    "facebook/opt-2.7b": tokenizer_folder(make_opt_tokenizer),
    "google/flan-t5-xl": tokenizer_folder(make_t5_tokenizer),
    "lmsys/vicuna-7b-v1.5": tokenizer_folder(make_llama_tokenizer),
}


def snippets() -> list[tuple[str, int, str]]:
    """`(section heading, first line number, code)` of every python block, in README order."""
    text = README.read_text()
    found = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start(1)) + 1
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        found.append((headings[-1] if headings else "top", line, match.group(1)))
    return found


SNIPPETS = snippets()


def test_readme_has_the_snippets_it_documents():
    headings = [heading for heading, _, _ in SNIPPETS]
    assert len(SNIPPETS) >= 4, headings  # Use, Build a processor, Stage 1, extract_features
    for expected in ("Use", "Build a processor for your LLM", "Stage 1 (representation learning)"):
        assert expected in headings


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, Path]:
    """Built lazily: a snippet only pays for the stand-ins it names."""
    root = tmp_path_factory.mktemp("hub")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            folder = root / name.replace("/", "--")
            STANDINS[name](folder)
            built[name] = folder
        return built[name]

    return get


def localize(code: str, where: str, hub) -> str:
    """Replace each Hub name in the snippet's string literals by its stand-in folder; fail on a Hub name without one."""
    names = {
        node.value
        for node in ast.walk(ast.parse(code, where))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and (node.value in STANDINS or HUB_NAME.match(node.value))
    }
    missing = sorted(name for name in names if name not in STANDINS)
    assert not missing, f"{where} names Hub repositories {missing} with no stand-in in tests/test_readme.py: add one"
    for name in names:
        code = re.sub(rf"([\"']){re.escape(name)}\1", repr(str(hub(name))), code)
    return code


@pytest.mark.parametrize(
    "heading, line, code", SNIPPETS, ids=[f"{heading} (README.md:{line})" for heading, line, _ in SNIPPETS]
)
def test_snippet_runs(heading, line, code, hub, tmp_path, monkeypatch):
    where = f"README.md:{line}"
    code = localize(code, where, hub)
    # A Hub name the checks above miss (no "/", no stand-in) fails at once instead of retrying a network call.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    for name, image in zip(("photo.jpg", "photo2.jpg"), draw_images(2, size=(48, 40))):
        image.save(name)
    torch.manual_seed(0)
    exec(compile(code, where, "exec"), {"__name__": "__readme__"})
