"""`blip2-hf caption` / `ask` / `retrieve` against what the library gives directly on the same tiny checkpoints (built
here, no Hub): the same captions and answers as `model.generate` + decoding, the same ranking as `blip2_hf.retrieval`,
unreadable images named and skipped, and the missing default (demo) model explained."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blip2_hf
from blip2_hf.cli import _one_line, build_parser, main
from blip2_hf.data import load_image, pre_caption
from blip2_hf.demo import CAPTION_MODEL_SUBDIR, DEMO_DIR_ENV, RETRIEVAL_MODEL_SUBDIR, VQA_PROMPT
from blip2_hf.retrieval import encode_images, encode_texts, itc_similarity, itm_rerank
from blip2_hf.testing_utils import (
    draw_images,
    make_bert_tokenizer,
    make_opt_tokenizer,
    perturb_,
    save_tiny_generation_checkpoint,
    tiny_config_dict,
)

ROOT = Path(__file__).resolve().parents[1]
NUM_QUERY_TOKENS = 4
QUESTION = "what color is the circle?"
QUERY = "A red circle on a white background."
# The order `retrieve` lists the gallery in: sorted by name, extensions of any case.
GALLERY = ("a.png", "b.jpg", "c.PNG", "d.jpeg", "e.png", "f.JPG")


def build_generation_checkpoint(folder: Path, text: str) -> None:
    """A stage-2 folder: tiny OPT- or T5-style LLM, weights moved well off their init so captions differ per image."""
    save_tiny_generation_checkpoint(folder, text, num_query_tokens=NUM_QUERY_TOKENS)


def build_retrieval_checkpoint(folder: Path, tokenizers: str = "opt+bert") -> None:
    """A `Blip2ForImageTextRetrieval` folder. Its processor's tokenizers: "opt+bert" (the LLM's and the Q-Former's, as
    stage-1 folders), "bert" (BERT only, as transformers' Salesforce/blip2-itm-vit-g) or "opt" (no Q-Former one)."""
    bert = make_bert_tokenizer()
    processor = blip2_hf.Blip2Processor(
        image_processor=blip2_hf.Blip2Processor.default_image_processor(30),
        tokenizer=make_bert_tokenizer() if tokenizers == "bert" else make_opt_tokenizer(),
        qformer_tokenizer=bert if tokenizers == "opt+bert" else None,
        num_query_tokens=NUM_QUERY_TOKENS,
    )
    config = tiny_config_dict("opt", num_query_tokens=NUM_QUERY_TOKENS, text_input=True, image_token_index=None)
    config["qformer_config"].update(vocab_size=len(bert), pad_token_id=0)
    torch.manual_seed(0)
    model = perturb_(blip2_hf.Blip2ForImageTextRetrieval(blip2_hf.Blip2Config(**config)), scale=0.2)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def truncated_png() -> bytes:
    """A PNG cut in the middle of its pixel data: opens, fails when decoded."""
    buffer = io.BytesIO()
    draw_images(1, size=(64, 64), seed=1)[0].save(buffer, format="PNG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    build_generation_checkpoint(root / "opt", "opt")
    build_generation_checkpoint(root / "t5", "t5")
    build_retrieval_checkpoint(root / "retrieval")
    images = root / "images"
    images.mkdir()
    for index, image in enumerate(draw_images(3, size=(40, 30))):
        image.save(images / f"image{index}.png")
    (images / "garbage.png").write_bytes(b"this is not an image")
    (images / "truncated.png").write_bytes(truncated_png())
    gallery = root / "gallery"
    gallery.mkdir()
    for name, image in zip(GALLERY, draw_images(len(GALLERY), size=(40, 30), seed=3)):
        image.save(gallery / name)
    (gallery / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # JPEG magic, then junk
    (gallery / "notes.txt").write_text("not an image extension: ignored, not reported")
    (gallery / "sub.png").mkdir()  # a folder, whatever its name: ignored
    return root


def load(folder: Path, model_class=blip2_hf.Blip2ForConditionalGeneration):
    return model_class.from_pretrained(folder).eval(), blip2_hf.Blip2Processor.from_pretrained(folder)


def generated_text(model, processor, image, prompt: str | None, **generate_kwargs) -> str:
    """One image, the library's documented way: image only (no text) for a caption, else image + prompt."""
    if prompt is None:
        inputs = processor(images=image, return_tensors="pt")
        prefix = [processor.image_token_id] * NUM_QUERY_TOKENS + [model.config.text_config.bos_token_id]
    else:
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        prefix = inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ids = model.generate(**inputs, **generate_kwargs)
    if model.config.use_decoder_only_language_model:
        assert ids[0, : len(prefix)].tolist() == prefix  # the output starts with the LLM input, then the new tokens
        ids = ids[:, len(prefix) :]
    return processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------------------------------
# caption
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["opt", "t5"])
def test_caption_prints_what_generate_gives_and_skips_unreadable_images(world, capsys, text):
    images = world / "images"
    good = [images / f"image{index}.png" for index in range(3)]
    bad = [images / "garbage.png", images / "truncated.png", images / "missing.png"]
    argv = [good[0], bad[0], good[1], bad[1], bad[2], good[2]]
    # Batches of 2 readable images: one batch spans the unreadable ones, the last one is short. The default 3 beams;
    # 8 new tokens rather than 30 to keep the test quick (the defaults are checked in `test_defaults`).
    code, out, err = run(
        capsys, "caption", *argv, "--model", world / text, "--batch-size", 2, "--max-new-tokens", 8, "--device", "cpu"
    )
    model, processor = load(world / text)
    expected = [
        generated_text(model, processor, load_image(path), None, num_beams=3, max_new_tokens=8) for path in good
    ]
    assert all(expected) and len(set(expected)) == 3  # the check below can tell images apart
    assert out.splitlines() == [f"{path}\t{caption}" for path, caption in zip(good, expected)]
    assert code == 1
    for path in bad:
        assert str(path) in err
    assert "UnidentifiedImageError" in err and "FileNotFoundError" in err and "truncated" in err
    assert "3 of 6 images could not be read" in err


@pytest.mark.parametrize("text", ["opt", "t5"])
def test_caption_with_prompt_and_generation_settings(world, capsys, text):
    good = [world / "images" / f"image{index}.png" for index in range(2)]
    code, out, err = run(
        capsys, "caption", *good, "--model", world / text, "--prompt", "a photo of", "--num-beams", 2,
        "--max-new-tokens", 7,
    )  # fmt: skip
    assert code == 0, err
    model, processor = load(world / text)
    expected = [
        generated_text(model, processor, load_image(path), "a photo of", num_beams=2, max_new_tokens=7)
        for path in good
    ]
    assert out.splitlines() == [f"{path}\t{caption}" for path, caption in zip(good, expected)]
    # The prompt is not repeated in the caption (the new tokens only).
    assert not any(caption.startswith("a photo of") for caption in expected)


def test_caption_uses_the_demo_checkpoint_by_default(world, capsys, monkeypatch, tmp_path):
    (tmp_path / CAPTION_MODEL_SUBDIR).symlink_to(world / "opt", target_is_directory=True)
    monkeypatch.setenv(DEMO_DIR_ENV, str(tmp_path))
    image = world / "images" / "image0.png"
    settings = ["--num-beams", 1, "--max-new-tokens", 4]
    code, out, err = run(capsys, "caption", image, *settings)
    assert code == 0, err
    assert out == run(capsys, "caption", image, *settings, "--model", world / "opt")[1]


# ---------------------------------------------------------------------------------------------------------------------
# ask
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["opt", "t5"])
def test_ask_prints_the_answer_to_the_formatted_prompt(world, capsys, text):
    image = world / "images" / "image1.png"
    code, out, err = run(capsys, "ask", image, QUESTION, "--model", world / text)
    assert code == 0, err
    model, processor = load(world / text)
    expected = generated_text(
        model, processor, load_image(image), VQA_PROMPT.format(QUESTION), num_beams=5, max_new_tokens=10
    )
    assert expected and out == expected + "\n"

    template = "Q: {} A:"
    code, out, _ = run(capsys, "ask", image, QUESTION, "--model", world / text, "--prompt-template", template,
                       "--num-beams", 1, "--max-new-tokens", 4)  # fmt: skip
    expected = generated_text(
        model, processor, load_image(image), template.format(QUESTION), num_beams=1, max_new_tokens=4
    )
    assert code == 0 and out == expected + "\n"


def test_ask_errors(world, capsys):
    image = world / "images" / "image0.png"
    code, out, err = run(capsys, "ask", image, QUESTION, "--model", world / "opt", "--prompt-template", "No slot:")
    assert code == 2 and out == "" and "--prompt-template" in err and "{}" in err
    code, out, err = run(capsys, "ask", world / "images" / "garbage.png", QUESTION, "--model", world / "opt")
    assert code == 1 and out == "" and "garbage.png" in err


# ---------------------------------------------------------------------------------------------------------------------
# retrieve
# ---------------------------------------------------------------------------------------------------------------------


def expected_ranking(world: Path, rerank_k: int, top_k: int) -> list[tuple[float, Path]]:
    """The text's ranking straight from `blip2_hf.retrieval` over the whole gallery: every image encoded, ITC, ITM
    re-ranking of the text's ITC top-`rerank_k` (LAVIS `compute_sim_matrix`), best `top_k`."""
    model, processor = load(world / "retrieval", blip2_hf.Blip2ForImageTextRetrieval)
    paths = [world / "gallery" / name for name in GALLERY]
    pixel_values = processor(images=[load_image(path) for path in paths], return_tensors="pt")["pixel_values"]
    images = encode_images(model, [pixel_values[:4], pixel_values[4:]], progress=False)
    tokens = processor.qformer_tokenizer([pre_caption(QUERY)], truncation=True, max_length=35, return_tensors="pt")
    texts = encode_texts(model, [tokens], progress=False)
    itc = itc_similarity(images.image_feats, texts.text_feats)
    _, score_t2i = itm_rerank(model, images, texts, itc, k=rerank_k, progress=False)
    scores, order = score_t2i[0].sort(descending=True)
    assert (scores[:top_k] > -100).all() and len(set(scores[:top_k].tolist())) == top_k  # re-ranked, no ties
    return [(score, paths[index]) for score, index in zip(scores[:top_k].tolist(), order[:top_k].tolist())]


@pytest.mark.parametrize(("rerank_k", "top_k", "effective_k"), [(4, 3, 4), (2, 5, 5), (16, 5, 6)])
def test_retrieve_ranks_as_blip2_hf_retrieval(world, capsys, rerank_k, top_k, effective_k):
    """`--rerank-k` below, above and beyond the gallery; raised to `--top-k` when smaller."""
    code, out, err = run(
        capsys, "retrieve", "--images", world / "gallery", "--text", QUERY, "--model", world / "retrieval",
        "--top-k", top_k, "--rerank-k", rerank_k, "--batch-size", 4,
    )  # fmt: skip
    assert code == 0, err
    rows = [line.split("\t") for line in out.splitlines()]
    expected = expected_ranking(world, effective_k, top_k)
    assert [rank for rank, _, _ in rows] == [str(rank) for rank in range(1, top_k + 1)]
    assert [path for _, _, path in rows] == [str(path) for _, path in expected]
    assert [float(score) for _, score, _ in rows] == pytest.approx([score for score, _ in expected], abs=1e-4)
    assert "broken.jpg" in err and "notes.txt" not in err and "sub.png" not in err


def test_retrieve_with_a_bert_tokenizer_only(world, capsys, tmp_path):
    """A processor whose only tokenizer is BERT (transformers' blip2-itm checkpoints) encodes the text with it."""
    build_retrieval_checkpoint(tmp_path / "bert_only", tokenizers="bert")
    argv = ["retrieve", "--images", world / "gallery", "--text", QUERY, "--top-k", 6]
    code, out, err = run(capsys, *argv, "--model", tmp_path / "bert_only")
    assert code == 0, err
    assert out == run(capsys, *argv, "--model", world / "retrieval")[1]
    assert len(out.splitlines()) == 6


def test_retrieve_errors(world, capsys, tmp_path):
    retrieval = world / "retrieval"
    code, out, err = run(capsys, "retrieve", "--images", tmp_path, "--text", QUERY, "--model", retrieval)
    assert code == 2 and out == "" and str(tmp_path) in err and "no image files" in err
    (tmp_path / "bad.png").write_bytes(b"junk")
    code, out, err = run(capsys, "retrieve", "--images", tmp_path, "--text", QUERY, "--model", retrieval)
    assert code == 2 and out == "" and "bad.png" in err and "no readable image" in err
    code, _, err = run(capsys, "retrieve", "--images", tmp_path / "bad.png", "--text", QUERY, "--model", retrieval)
    assert code == 2 and "is not a folder" in err
    # A processor with only the LLM tokenizer (OPT, not BERT): the text cannot be encoded.
    build_retrieval_checkpoint(tmp_path / "no_qformer_tokenizer", tokenizers="opt")
    code, out, err = run(capsys, "retrieve", "--images", world / "gallery", "--text", QUERY,
                         "--model", tmp_path / "no_qformer_tokenizer")  # fmt: skip
    assert code == 2 and out == "" and "Q-Former tokenizer" in err


# ---------------------------------------------------------------------------------------------------------------------
# Shared: default model, device, help
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "subdir", "example"),
    [
        ("caption", CAPTION_MODEL_SUBDIR, "Salesforce/blip2-opt-2.7b"),
        ("ask", CAPTION_MODEL_SUBDIR, "Salesforce/blip2-opt-2.7b"),
        ("retrieve", RETRIEVAL_MODEL_SUBDIR, "Salesforce/blip2-itm-vit-g"),
    ],
)
def test_missing_default_model_says_how_to_make_it(world, capsys, monkeypatch, tmp_path, command, subdir, example):
    monkeypatch.setenv(DEMO_DIR_ENV, str(tmp_path))
    image = world / "images" / "image0.png"
    argv = {
        "caption": [image],
        "ask": [image, QUESTION],
        "retrieve": ["--images", world / "gallery", "--text", QUERY],
    }[command]
    code, out, err = run(capsys, command, *argv)
    assert code == 2 and out == ""
    assert str(tmp_path / subdir) in err
    assert "`blip2-hf demo`" in err and "BLIP2_HF_DEMO_DIR" in err and f"--model {example}" in err


def test_bad_model_and_device(world, capsys, tmp_path):
    image = world / "images" / "image0.png"
    for missing in (tmp_path / "nothing_here", "./runs/nothing_here", "runs/stage2/nothing_here"):
        code, out, err = run(capsys, "caption", image, "--model", missing)
        assert code == 2 and out == "" and "Traceback" not in err
        assert (
            err
            == f"blip2-hf caption: error: --model {missing}: no such folder (and not a Hub id, which is NAME or NAMESPACE/NAME).\n"
        )
    if not torch.cuda.is_available():
        code, out, err = run(capsys, "caption", image, "--model", world / "opt", "--device", "cuda")
        assert code == 2 and out == "" and "CUDA is not available" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(image), "--num-beams", "0"])
    assert exit_info.value.code == 2
    assert "at least 1" in capsys.readouterr().err


def test_one_line():
    assert _one_line("a cat\non a\tsofa\r\n") == "a cat on a sofa"
    assert _one_line("two  spaces stay") == "two  spaces stay"


def test_defaults():
    parse = build_parser().parse_args
    caption = parse(["caption", "x.png"])
    assert (caption.num_beams, caption.max_new_tokens, caption.batch_size, caption.prompt) == (3, 30, 16, "")
    ask = parse(["ask", "x.png", "why?"])
    assert (ask.num_beams, ask.max_new_tokens, ask.prompt_template) == (5, 10, VQA_PROMPT)
    assert ask.images == [Path("x.png")] and ask.question == "why?"
    assert parse(["ask", "x.png", "y.png", "why?"]).images == [Path("x.png"), Path("y.png")]
    assert VQA_PROMPT is blip2_hf.VQA_PROMPT is vqa_default_prompt()  # one prompt: ask, evaluation/vqa.py, the demo
    retrieve = parse(["retrieve", "--images", "d", "--text", "t"])
    assert (retrieve.top_k, retrieve.rerank_k) == (5, 16)
    for args in (caption, ask, retrieve):
        assert args.model is None and args.device == "auto"


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("caption", ["IMAGE", "--prompt", "--num-beams", "--max-new-tokens", "--batch-size", "--model", "--device"]),
        ("ask", ["IMAGE", "QUESTION", "--prompt-template", "Question: {} Short answer:", "--model", "--device"]),
        ("retrieve", ["--images", "--text", "--top-k", "--rerank-k", "SCORE", "ITM", "logit", "ITC", "--model"]),
    ],
)
def test_help(capsys, command, expected):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: blip2-hf {command}")
    for word in expected:
        assert word in out, word
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and command in capsys.readouterr().out


def vqa_default_prompt() -> str:
    """The prompt evaluation/vqa.py uses when none is given."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vqa", ROOT / "evaluation" / "vqa.py")
    sys.path.insert(0, str(ROOT / "evaluation"))  # vqa.py imports its sibling `common`
    try:
        vqa = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(vqa)
    finally:
        sys.path.remove(str(ROOT / "evaluation"))
    return vqa.VQA_PROMPT


def test_ask_several_images_prints_path_and_answer(world, capsys):
    images = [world / "images" / "image0.png", world / "images" / "garbage.png", world / "images" / "image2.png"]
    code, out, err = run(capsys, "ask", *images, QUESTION, "--model", world / "opt", "--batch-size", 1)
    assert code == 1 and "garbage.png" in err and "1 of 3 images could not be read" in err
    single = [run(capsys, "ask", image, QUESTION, "--model", world / "opt")[1].strip() for image in images[::2]]
    assert out.splitlines() == [f"{images[0]}\t{single[0]}", f"{images[2]}\t{single[1]}"]


def test_progress_bars_on_stderr_for_a_terminal(world, capsys, monkeypatch):
    """On a terminal, caption and ask draw a tqdm bar on stderr; stdout holds the results only."""
    images = [world / "images" / f"image{index}.png" for index in range(3)]
    plain = run(capsys, "caption", *images, "--model", world / "opt", "--batch-size", 2)[1]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, err = run(capsys, "caption", *images, "--model", world / "opt", "--batch-size", 2)
    assert code == 0 and out == plain and "caption: 100%" in err and "3/3" in err
    code, out, err = run(capsys, "ask", *images[:2], QUESTION, "--model", world / "opt")
    assert code == 0 and len(out.splitlines()) == 2 and "ask: 100%" in err and "2/2" in err


def test_stage1_folder_loads_for_retrieval_without_a_load_report(world, tmp_path, capfd):
    """A stage-1 folder holds the ITG head, which retrieval leaves out on purpose: no "unexpected keys" report."""
    retrieval = blip2_hf.Blip2ForImageTextRetrieval.from_pretrained(world / "retrieval")
    retrieval.config.qformer_config.bos_token_id = 1  # stage 1 needs a [DEC] id for ITG
    stage1 = blip2_hf.Blip2ForPreTraining(retrieval.config)
    stage1.save_pretrained(tmp_path / "stage1")
    blip2_hf.Blip2Processor.from_pretrained(world / "retrieval").save_pretrained(tmp_path / "stage1")
    assert any(key.startswith("cls.predictions.") for key in stage1.state_dict())
    _, info = blip2_hf.Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "stage1", output_loading_info=True)
    assert info["unexpected_keys"] == set() or not info["unexpected_keys"]
    capfd.readouterr()
    code = main(["retrieve", "--images", str(world / "gallery"), "--text", QUERY, "--model", str(tmp_path / "stage1")])
    out, err = capfd.readouterr()
    assert code == 0 and len(out.splitlines()) == 5
    assert "LOAD REPORT" not in err and "UNEXPECTED" not in err and "Loading weights" not in err, err


LAUNCH_HELP = """
import sys
import blip2_hf_launch
for argv in ([], ["caption"], ["ask"], ["retrieve"], ["push"], ["card"], ["demo"]):
    try:
        blip2_hf_launch.main([*argv, "--help"])
    except SystemExit as exit:
        assert exit.code == 0, argv
heavy = sorted(name for name in ("torch", "transformers", "huggingface_hub", "PIL", "numpy") if name in sys.modules)
print("heavy:", heavy)
"""


def test_help_imports_no_torch():
    """`blip2-hf --help` (the console script is `blip2_hf_launch.main`) and each subcommand's answer without
    importing torch, transformers or the model code: the point of parsing before the package's `__init__`."""
    proc = subprocess.run([sys.executable, "-c", LAUNCH_HELP], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "heavy: []", proc.stdout[-2000:]
    assert "usage: blip2-hf retrieve" in proc.stdout and "usage: blip2-hf push" in proc.stdout


def test_the_console_script_runs_a_command_as_main_does(world, capsys):
    """Through the launcher (a fresh process, the package initialised after parsing) `caption` prints what `main`
    prints here, and usage errors still exit 2 from the parser."""
    image = world / "images" / "image0.png"
    expected = run(capsys, "caption", image, "--model", world / "opt")[1]
    command = [sys.executable, "-m", "blip2_hf_launch"]
    proc = subprocess.run([*command, "caption", str(image), "--model", str(world / "opt")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == expected, proc.stderr[-3000:]
    proc = subprocess.run([*command, "caption"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "IMAGE" in proc.stderr and "Traceback" not in proc.stderr
