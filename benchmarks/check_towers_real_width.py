"""Bring-your-own towers at real widths, depth cut: stage 1, stage 2 and a caption through the real scripts and CLI.

    python benchmarks/check_towers_real_width.py           # SigLIP-so400m + Qwen2.5-1.5B widths: ~4 min on 2 cores
    python benchmarks/check_towers_real_width.py --quick   # smoke run: the same pipeline at tiny widths (~1 min)
    python benchmarks/check_towers_real_width.py --device cuda

The towers a user would download are built here with random weights and saved as their own folders (nothing is
fetched):

    vision   `SiglipVisionModel` at google/siglip-so400m-patch14-384's widths (1152 wide, MLP 4304, 16 heads, patch
             14, 384 px: 27 x 27 = 729 tokens, no CLS), 2 layers, with its `SiglipImageProcessor` (384 px, mean/std 0.5)
    LLM      `Qwen2ForCausalLM` at Qwen/Qwen2.5-1.5B-Instruct's widths (1536 wide, MLP 8960, 12 heads, 2 KV heads,
             vocab 151936, tied embeddings, rope theta 1e6), 2 layers, with a byte-level BPE tokenizer trained on the
             spot in Qwen2.5's layout (no BOS, `<|im_end|>` EOS, `<|endoftext|>` pad, a ChatML chat template)
    Q-Former `BertForMaskedLM` at bert-base-uncased's widths (768, 12 layers) and its vocabulary layout (30522 ids,
             `[CLS]` 101, `[SEP]` 102), the source `training/configs/blip2_vitg_qformer.json` expects

Then, each phase in a fresh Python process (the script run as `__main__` by `runpy`, so that the process can report
its CUDA peak), on drawn 448 x 512 images resized by the SigLIP processor:

    stage 1        training/stage1.py --config training/configs/stage1_pretrain.yaml + the SigLIP folder, 1 step
    stage 2        training/stage2.py --config training/configs/stage2_opt2.7b.yaml from that stage-1 folder onto the
                   Qwen2 folder, 1 step; again with --use_chat_template (the prompt as a ChatML user turn)
    caption / ask  `blip2-hf caption` of the first stage-2 folder, `blip2-hf ask --chat-template` of the second

For each phase: wall seconds of the whole process (imports, building, loading, the step, saving), the Trainer's own
`train_runtime` (the step, with the optimizer's state allocated; no checkpoint is written), the process's peak resident memory (`os.wait4`'s `ru_maxrss`) and, on CUDA, its peak allocated GPU
memory. The trained and frozen parameter counts are those of `freeze_towers` on the saved configs; the image token
count is what the encoder's `encode_frozen` returns for one 384-px image. A failing phase prints its log's tail and the
script exits with status 1. `--quick` runs the same pipeline (same vocabularies, image size and token counts) with every
tower 32 wide and 1 layer deep. Results: a markdown table and JSON in bench_out/towers_real_width.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
import transformers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment as machine_environment  # noqa: E402
from bench_common import write_json  # noqa: E402

from blip2_hf import Blip2Config, Blip2ForConditionalGeneration, Blip2ForPreTraining
from blip2_hf.modeling_blip2 import build_vision_model
from blip2_hf.testing_utils import draw_images, make_bert_tokenizer, make_opt_tokenizer

ROOT = Path(__file__).resolve().parents[1]
OUT_DEFAULT = ROOT / "bench_out" / "towers_real_width.json"
STAGE1_YAML = ROOT / "training" / "configs" / "stage1_pretrain.yaml"
STAGE2_YAML = ROOT / "training" / "configs" / "stage2_opt2.7b.yaml"
QFORMER_CONFIG = ROOT / "training" / "configs" / "blip2_vitg_qformer.json"

IMAGE_SIZE, PATCH = 384, 14
BERT_VOCAB = 30522  # bert-base-uncased: [DEC] becomes 30522, the Q-Former config's bos_token_id (vocab 30523)
QWEN_VOCAB = 151936
SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's ChatML template, its default system turn included (about 30 tokens before the caption: the
# stage-2 runs with the chat template need a --max_length above the YAML's 32).
CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT = "Describe the image."
CAPTIONS = ("a drawing of red and blue shapes", "a green circle next to a yellow square")
# Real widths (depth cut to 2) and the --quick widths (32 wide, 1 layer); vocabularies and token counts are the same.
WIDTHS = {
    "real": dict(
        vision=dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=2),
        llm=dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                 num_hidden_layers=2),
        bert=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
    ),
    "quick": dict(
        vision=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1),
        llm=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=1),
        bert=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2),
    ),
}  # fmt: skip
# Runs a script (or the blip2-hf console script's `main`) as `__main__` and, at exit, prints the CUDA peak if any.
RUNNER = """
import atexit, runpy, sys
def peak():
    import torch
    if torch.cuda.is_initialized():
        print(f"CUDA_PEAK_BYTES {torch.cuda.max_memory_allocated()}", flush=True)
atexit.register(peak)
target, sys.argv = sys.argv[1], sys.argv[1:]
if target == "blip2-hf":
    from blip2_hf_launch import main
    sys.exit(main(sys.argv[1:]))
runpy.run_path(target, run_name="__main__")
"""

# ---------------------------------------------------------------------------------------------------------------------
# The towers a user would download, and data
# ---------------------------------------------------------------------------------------------------------------------


def save_siglip(folder: Path, widths: dict) -> None:
    """A `SiglipVisionModel` folder (so400m's patch and image size, `widths`) with its 384-px image processor."""
    config = SiglipVisionConfig(**widths, patch_size=PATCH, image_size=IMAGE_SIZE)
    torch.manual_seed(0)
    SiglipVisionModel(config).save_pretrained(folder)
    square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    SiglipImageProcessor(size=square, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)


def bert_base_tokenizer() -> BertTokenizerFast:
    """A WordPiece tokenizer in bert-base-uncased's id layout: [PAD] 0, [unused*] 1-99, [UNK] 100, [CLS] 101, [SEP]
    102, [MASK] 103, then pieces trained on the spot, filled with [unused*] up to 30522 ids."""
    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
    pieces = [token for token in make_bert_tokenizer().get_vocab() if token not in specials]
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces]
    tokens += [f"[unused{i}]" for i in range(99, 99 + BERT_VOCAB - len(tokens))]
    return BertTokenizerFast(vocab=OrderedDict((token, index) for index, token in enumerate(tokens)))


def save_bert(folder: Path, widths: dict) -> None:
    """The Q-Former's source: a random `BertForMaskedLM` (`widths`, vocab 30522) with its tokenizer."""
    tokenizer = bert_base_tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=BERT_VOCAB, **widths)).save_pretrained(folder)


def qwen_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained on the spot in Qwen2.5-Instruct's layout: no BOS, `<|im_end|>` as EOS, `<|endoftext|>`
    as pad, a ChatML chat template."""
    from tokenizers import processors

    # trained on the texts it will see, so that they take about as many tokens as Qwen2.5's 151k-token BPE gives them
    tokenizer = make_opt_tokenizer(vocab_size=400, corpus=[*CAPTIONS, SYSTEM, PROMPT, "system user assistant"] * 4)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = None, "<|im_end|>", "<|endoftext|>"
    tokenizer.chat_template = CHATML
    return tokenizer


def save_qwen2(folder: Path, widths: dict) -> None:
    """A random `Qwen2ForCausalLM` (`widths`, Qwen2.5's vocabulary, tied embeddings, rope theta 1e6) and tokenizer."""
    tokenizer = qwen_tokenizer()
    config = Qwen2Config(
        vocab_size=QWEN_VOCAB, tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **widths,
    )  # fmt: skip
    torch.manual_seed(1)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_data(folder: Path, num_images: int) -> Path:
    """`num_images` drawn 448 x 512 images and a caption JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index, image in enumerate(draw_images(num_images, size=(448, 512))):
        image.save(folder / f"{index}.png")
        records.append({"image": f"{index}.png", "caption": CAPTIONS[index % len(CAPTIONS)]})
    (folder / "train.json").write_text(json.dumps(records))
    return folder / "train.json"


def quick_stage1_config(path: Path, widths: dict) -> Path:
    """blip2_vitg_qformer.json with its Q-Former at the BERT `widths` (for --quick: from_bert needs them equal)."""
    config = json.loads(QFORMER_CONFIG.read_text())
    config["qformer_config"].update(widths)
    path.write_text(json.dumps(config))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------------------------------


def run_phase(name: str, target: str, arguments: list[str], log: Path) -> dict:
    """Run `target` (a script path, or "blip2-hf" for the console script) in a fresh process; its wall seconds, peak
    RSS (MiB), CUDA peak (MiB, or None), the Trainer's `train_runtime` and `train_loss` (if it logged them)."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-c", RUNNER, target, *arguments], stdout=handle, stderr=subprocess.STDOUT, env=env
        )
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    print(f"{name}: {seconds:.1f}s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB, exit {process.returncode}", flush=True)
    if process.returncode != 0:
        print(text[-4000:], file=sys.stderr)
        raise SystemExit(f"FAIL: {name} exited with {process.returncode} (log: {log})")

    def logged(key: str) -> float | None:
        found = re.findall(rf"'{key}': '?([0-9.eE+-]+|nan|inf)", text)
        return float(found[-1]) if found else None

    cuda = re.findall(r"CUDA_PEAK_BYTES (\d+)", text)
    return {
        "phase": name,
        "seconds": seconds,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "cuda_peak_mib": int(cuda[-1]) / 2**20 if cuda else None,
        "train_runtime_s": logged("train_runtime"),
        "train_loss": logged("train_loss"),
        "output_tail": text.strip().splitlines()[-1] if text.strip() else "",
        "skipped_steps": text.count("Skipped step"),
    }


def parameter_counts(folder: Path, model_class: type) -> dict:
    """Trained and frozen parameters of the model `folder`'s config describes, after `freeze_towers` (built on the
    meta device: no weights read or allocated)."""
    with torch.device("meta"):
        model = model_class(Blip2Config.from_pretrained(folder))
    model.freeze_towers()
    trained = sum(param.numel() for param in model.parameters() if param.requires_grad)
    frozen = sum(param.numel() for param in model.parameters() if not param.requires_grad)
    return {"trained_parameters": trained, "frozen_parameters": frozen}


def image_token_count(folder: Path) -> tuple[int, int]:
    """`(tokens, width)` of what the stage-1 folder's image encoder hands the Q-Former for one 384-px image (the
    `encode_frozen` path, shapes only: built on the meta device)."""
    with torch.device("meta"):
        vision = build_vision_model(Blip2Config.from_pretrained(folder))
        states = vision.encode_frozen(torch.empty(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    return states.shape[1], states.shape[2]


def training_flags(data: Path, batch_size: int, device: torch.device, output: Path) -> list[str]:
    """What turns the paper's recipe YAML into one step on this data and device (no Trainer checkpoint: the script's
    final save of the model stays)."""
    # The scripts read each value as YAML, where a bare `no` is False: quoted, it stays the string SaveStrategy takes.
    flags = [
        "--train_data", str(data), "--image_root", str(data.parent), "--output_dir", str(output),
        "--max_steps", "1", "--per_device_train_batch_size", str(batch_size), "--warmup_steps", "0",
        "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--logging_steps", "1", "--save_strategy", '"no"',
        "--report_to", "none", "--augment", "false",
    ]  # fmt: skip
    if device.type == "cpu":
        flags += ["--use_cpu", "true", "--fp16", "false"]
    return flags


def run_pipeline(work: Path, widths: dict, batch_size: int, device: torch.device, quick: bool) -> list[dict]:
    """Build the towers in `work`, then run the phases; one result per phase (counts on the training phases)."""
    save_siglip(work / "siglip", widths["vision"])
    save_bert(work / "bert", widths["bert"])
    save_qwen2(work / "qwen2", widths["llm"])
    data = save_data(work / "data", batch_size)
    image = str(work / "data" / "0.png")
    cli_device = ["--device", device.type, "--max-new-tokens", "8", "--num-beams", "1"]

    stage1 = work / "stage1"
    stage1_args = ["--config", str(STAGE1_YAML), "--vision_model_name_or_path", str(work / "siglip"),
                   "--bert_name_or_path", str(work / "bert"), "--processor_name_or_path", "null",
                   *training_flags(data, batch_size, device, stage1)]  # fmt: skip
    if quick:
        stage1_args += ["--config_name", str(quick_stage1_config(work / "stage1_config.json", widths["bert"]))]
    results = [run_phase("stage 1 (1 step)", str(ROOT / "training" / "stage1.py"), stage1_args, work / "stage1.log")]
    results[-1].update(parameter_counts(stage1, Blip2ForPreTraining))
    tokens, width = image_token_count(stage1)
    queries = Blip2Config.from_pretrained(stage1).num_query_tokens
    results[-1].update(image_tokens=tokens, image_width=width, queries=queries)

    chat = ["--use_chat_template", "true", "--prompt", PROMPT, "--max_length", "64"]
    variants = [("stage 2 (1 step)", "stage2", []), ("stage 2, chat template (1 step)", "stage2_chat", chat)]
    for name, folder, extra in variants:
        stage2_args = ["--config", str(STAGE2_YAML), "--stage1_name_or_path", str(stage1),
                       "--language_model_name_or_path", str(work / "qwen2"), "--processor_name_or_path", "null",
                       *training_flags(data, batch_size, device, work / folder), *extra]  # fmt: skip
        results.append(run_phase(name, str(ROOT / "training" / "stage2.py"), stage2_args, work / f"{folder}.log"))
        results[-1].update(parameter_counts(work / folder, Blip2ForConditionalGeneration))
        results[-1].update(image_tokens=tokens, image_width=width, queries=queries)

    caption = ["caption", image, "--model", str(work / "stage2"), *cli_device]
    results.append(run_phase("blip2-hf caption (8 tokens)", "blip2-hf", caption, work / "caption.log"))
    ask = ["ask", image, PROMPT, "--chat-template", "--prompt-template", "{}", "--model", str(work / "stage2_chat")]
    results.append(run_phase("blip2-hf ask --chat-template", "blip2-hf", [*ask, *cli_device], work / "ask.log"))
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def markdown_table(results: list[dict]) -> str:
    def millions(value: int | None) -> str:
        return "" if value is None else f"{value / 1e6:.3g}M"

    def number(value: float | None, digits: int = 1) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    rows = [
        "| phase | seconds | train_runtime s | peak RSS MiB | CUDA peak MiB | trained | frozen | image tokens | queries |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r['phase']} | {r['seconds']:.1f} | {number(r['train_runtime_s'])} | {r['peak_rss_mib']:.0f} "
            f"| {number(r['cuda_peak_mib'], 0)} | {millions(r.get('trained_parameters'))} "
            f"| {millions(r.get('frozen_parameters'))} | {r.get('image_tokens', '')} | {r.get('queries', '')} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: the same pipeline, every tower 32 wide")
    parser.add_argument("--batch-size", type=int, default=4, help="images per training step (default 4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=None, help="keep the towers and runs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=OUT_DEFAULT, help=f"JSON results (default {OUT_DEFAULT})")
    args = parser.parse_args()
    if args.batch_size < 2:
        parser.error("--batch-size: stage 1 needs at least 2 pairs per step (ITC and ITM negatives)")

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    device = torch.device(args.device)
    setting = "quick" if args.quick else "real"
    environment = machine_environment(device, setting=setting, batch_size=args.batch_size)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="towers_real_width_") as temp:
        work = args.work or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        results = run_pipeline(work, WIDTHS[setting], args.batch_size, device, args.quick)
    total = time.perf_counter() - start
    environment["load_average_1min_after"] = os.getloadavg()[0]

    print()
    print(markdown_table(results))
    print(
        f"\nSigLIP so400m widths + Qwen2.5-1.5B widths ({setting}), batch {args.batch_size}, device "
        f"{environment['device']}; each phase a fresh process (seconds include imports, loading and saving). torch "
        f"{environment['torch']}, {environment['threads']} threads, total {total:.0f}s, 1-min load average "
        f"{environment['load_average_1min_before']:.2f} before / {environment['load_average_1min_after']:.2f} after."
    )
    write_json(args.out, {"environment": environment, "setting": setting, "total_seconds": total, "results": results})
    if device.type == "cpu" and environment["load_average_1min_after"] > environment["threads"] + 0.5:
        print(
            f"WARNING: the 1-min load average reached {environment['load_average_1min_after']:.2f} with "
            f"{environment['threads']} threads of ours: other processes shared the CPU. Rerun on an idle machine."
        )
    expected = (IMAGE_SIZE // PATCH) ** 2
    losses = [r["train_loss"] for r in results if r["train_loss"] is not None]
    skipped = sum(r["skipped_steps"] for r in results)
    if results[0]["image_tokens"] != expected or len(losses) != 3 or skipped or not all(map(math.isfinite, losses)):
        got = f"{results[0]['image_tokens']} tokens, losses {losses}, {skipped} skipped steps"
        print(f"FAIL: expected {expected} image tokens and 3 steps with finite losses; got {got}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
