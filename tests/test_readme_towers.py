"""README.md's "Bring your own towers" commands run as written: every command of every ```bash block of the section,
in order, in a fresh working directory (where `training/` is the repository's), with each Hub name replaced by a tiny
local stand-in of the same layout (a two-tower SigLIP folder, a DINOv2 whose config says a larger image size than its
processor crops, as facebook/dinov2-* do, a Qwen2 tokenizer with ChatML, a Llama-3 tokenizer without a pad token but
with its reserved one, transformers' BLIP-2 layout). Only the launcher is stripped (`accelerate launch` -> the script's
`main`, in this process) and only the recipe YAMLs' heavy fields are overridden by appended flags (tiny Q-Former
config and BERT, tiny data, one step on the CPU). A command that breaks, or a Hub name without a stand-in, fails."""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from test_byo_vision_scripts import image_processor, load_script
from test_llm_families import save_family_llm, transformers_blip2_folder
from transformers import AutoModel, SiglipConfig, SiglipModel

from blip2_hf import Blip2Config
from blip2_hf.cli import main as cli_main
from blip2_hf.testing_utils import make_llama_tokenizer, tiny_vision_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## Bring your own towers"
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
LLAMA3_PAD = "<|finetune_right_pad_id|>"  # Llama 3.1+ reserve it; their tokenizers set no pad token


def save_siglip(folder: Path) -> None:
    """google/siglip-so400m-patch14-384's layout: a two-tower `SiglipModel` folder with its `SiglipImageProcessor`."""
    vision = tiny_vision_config("siglip")
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision.to_dict())).save_pretrained(folder)
    image_processor("siglip").save_pretrained(folder)


def save_dinov2(folder: Path) -> None:
    """facebook/dinov2-large's layout: a `Dinov2Model` whose config says 64 px (the real one: 518) while its processor
    resizes and crops to 32 px (the real one: 256 then 224); DINOv2 interpolates its position embeddings."""
    config = tiny_vision_config("dinov2")
    config.image_size = 64
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    image_processor("dinov2").save_pretrained(folder)


def save_llama3(folder: Path) -> None:
    """meta-llama/Llama-3.2-1B's tokenizer layout: no pad token, `<|finetune_right_pad_id|>` among its specials."""
    tokenizer = make_llama_tokenizer()
    tokenizer.pad_token = None
    tokenizer.add_special_tokens({"additional_special_tokens": [LLAMA3_PAD]})
    save_family_llm(folder, "llama", tokenizer=tokenizer)


# Hub name -> builder of its stand-in folder.
STANDINS: dict[str, Callable[[Path], object]] = {
    "google/siglip-so400m-patch14-384": save_siglip,
    "facebook/dinov2-large": save_dinov2,
    "Qwen/Qwen2.5-1.5B-Instruct": lambda folder: save_family_llm(folder, "qwen2"),  # ChatML, `<|endoftext|>` pad
    "meta-llama/Llama-3.2-1B": save_llama3,
    "Salesforce/blip2-opt-2.7b": transformers_blip2_folder,
}
# What the recipe YAMLs hold that a test cannot run (ViT-g/BERT-base widths, COCO + VG, 250k steps, fp16 on GPUs),
# appended to each training command so that they override it; `{tiny}` is the tiny world's folder.
TINY_FLAGS = (
    "--train_data {tiny}/data/train.json --image_root {tiny}/data --max_steps 1 --per_device_train_batch_size 2 "
    "--fp16 false --use_cpu true --dataloader_num_workers 0 --save_steps 1000 --report_to none --disable_tqdm true"
)
STAGE1_FLAGS = "--config_name {tiny}/stage1_config --bert_name_or_path {tiny}/bert"


def blocks() -> list[tuple[int, str]]:
    """`(line number, text)` of each ```bash block of the section."""
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    found = []
    for match in BLOCK.finditer(text, start, end if end != -1 else len(text)):
        found.append((text.count("\n", 0, match.start(1)) + 1, match.group(1)))
    return found


def commands(block: str) -> list[list[str]]:
    """The block's commands as argument lists (lines joined at a trailing backslash, comments dropped)."""
    return [words for line in block.replace("\\\n", " ").splitlines() if (words := shlex.split(line, comments=True))]


BLOCKS = blocks()


def test_section_documents_the_issue_pairs():
    """The section holds the commands the issue asks for: SigLIP + Qwen2 and DINOv2 + Llama (stage 1, stage 2, use),
    and stage 2 re-bootstrapped from a published BLIP-2."""
    names = [" ".join(word for words in commands(block) for word in words) for _, block in BLOCKS]
    assert len(names) == 3, names
    for text, towers in zip(names, [("siglip", "Qwen2"), ("dinov2", "Llama"), ("Salesforce/blip2", "Qwen2")]):
        assert all(tower in text for tower in towers), text
    for text in names[:2]:
        assert "training/stage1.py" in text and "training/stage2.py" in text and "blip2-hf" in text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """training/tiny_setup.py's world, small: captioned images, the stage-1 Blip2Config and a BERT with its Q-Former
    tokenizer beside it (as bert-base-uncased has its tokenizer)."""
    work = tmp_path_factory.mktemp("towers") / "tiny"
    load_script("tiny_setup").main(["--output", str(work), "--num-images", "8"])
    for file in (work / "processor_opt" / "qformer_tokenizer").iterdir():
        shutil.copy(file, work / "bert" / file.name)
    return work


# Arguments that name a model or folder to read: after the stand-ins replace Hub names, each must be on disk.
SOURCES = ("--vision_model_name_or_path", "--bert_name_or_path", "--stage1_name_or_path",
           "--language_model_name_or_path", "--processor_name_or_path", "--config_name", "--model")  # fmt: skip


def localize(words: list[str], where: str, hub: Callable[[str], Path]) -> list[str]:
    """Each Hub name replaced by its stand-in folder; a model source that is still not on disk (a Hub name without a
    stand-in) fails."""
    words = [str(hub(word)) if word in STANDINS else word for word in words]
    for flag, value in zip(words, words[1:]):
        if flag in SOURCES and value != "null" and not Path(value).exists():
            pytest.fail(f"{where}: {flag} {value}: not on disk; a Hub name needs a stand-in in {Path(__file__).name}")
    return words


def run_command(words: list[str], where: str, tiny: Path, hub: Callable[[str], Path], capsys) -> None:
    """One README command: a training script runs its `main` with the tiny flags appended; `blip2-hf` runs the
    console script's `main` and must exit 0."""
    if words[:2] == ["accelerate", "launch"]:
        words = words[2:]
    words = localize(words, where, hub)
    if words[0] in ("training/stage1.py", "training/stage2.py"):
        extra = TINY_FLAGS + (" " + STAGE1_FLAGS if words[0].endswith("stage1.py") else "")
        load_script(Path(words[0]).stem).main(words[1:] + shlex.split(extra.format(tiny=tiny)))
        output = Path(words[words.index("--output_dir") + 1])
        assert (output / "config.json").is_file(), f"{where}: {output} has no model"
        return
    if words[0] == "blip2-hf":
        code = cli_main(words[1:])
        printed = capsys.readouterr()
        assert code == 0, f"{where}: blip2-hf exited {code}: {printed.err[-2000:]}"
        return
    pytest.fail(f"{where}: no runner for {words[0]!r} in {Path(__file__).name}: add one")


@pytest.mark.parametrize("line, block", [pytest.param(line, block, id=f"README.md:{line}") for line, block in BLOCKS])
def test_block_runs(line, block, tiny, tmp_path, monkeypatch, capsys):
    # A Hub name the checks miss fails at once instead of retrying a network call.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "training").symlink_to(ROOT / "training")
    shutil.copy(tiny / "data" / "images" / "0000.png", "photo.jpg")  # the name the README uses; PIL reads by content
    built: dict[str, Path] = {}

    def hub(name: str) -> Path:
        """The stand-in of a Hub name given directly (not downloaded first), built on first use."""
        if name not in built:
            built[name] = tmp_path / "hub" / name.replace("/", "--")
            STANDINS[name](built[name])
        return built[name]

    for index, words in enumerate(commands(block)):
        torch.manual_seed(0)
        run_command(words, f"README.md:{line}, command {index + 1}", tiny, hub, capsys)
    check_outputs(block, hub)


def check_outputs(block: str, hub: Callable[[str], Path]) -> None:
    """What each block promises beyond running: every stage-2 folder holds the stage-1 folder's image encoder family
    under the named LLM's family."""
    for words in commands(block):
        if "training/stage2.py" not in words:
            continue
        config = Blip2Config.from_pretrained(words[words.index("--output_dir") + 1])
        stage1 = words[words.index("--stage1_name_or_path") + 1]
        stage1 = Blip2Config.from_pretrained(hub(stage1) if stage1 in STANDINS else stage1)
        assert config.vision_config.model_type == stage1.vision_config.model_type
        llm = words[words.index("--language_model_name_or_path") + 1]
        assert config.text_config.model_type == ("qwen2" if "Qwen" in llm else "llama"), llm
