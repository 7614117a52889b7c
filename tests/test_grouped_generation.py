"""Questions grouped by image: `generate(image_rows=...)` (each image encoded once, decoder-only LLMs sharing the
prefix's and the beams' prompt keys/values), `blip2_hf.inference.answer_questions` and `evaluation/vqa.py` give the
tokens that one question per row gives."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

import blip2_hf
import blip2_hf.modeling_blip2 as modeling
from blip2_hf.inference import answer_questions, batches_by_image, grouped_inputs
from blip2_hf.testing_utils import draw_images, save_tiny_generation_checkpoint

EVALUATION = Path(__file__).resolve().parents[1] / "evaluation"
PROMPT = "Question: {} Short answer:"
# image 0: one question; image 1: four of different lengths; image 2: two
QUESTIONS = [
    ["what color is the circle?"],
    ["how many dogs are there?", "what", "is the cat sleeping on the red sofa next to the window?", "where is it?"],
    ["what shape is blue?", "is there a dog in the photo?"],
]
SEARCHES = {
    "greedy": dict(max_new_tokens=5, min_new_tokens=5),
    "beams": dict(num_beams=3, max_new_tokens=4, min_new_tokens=1, length_penalty=-1.0),
}


@pytest.fixture(scope="module", params=["opt", "t5"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    save_tiny_generation_checkpoint(folder, request.param)
    model = blip2_hf.Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    return model, blip2_hf.Blip2Processor.from_pretrained(folder), folder


def per_row(model, processor, images, **kwargs) -> torch.LongTensor:
    """One question per row, each with its own copy of the image: the plain batch a user would build."""
    texts = [PROMPT.format(q) for questions in QUESTIONS for q in questions]
    repeated = [image for image, questions in zip(images, QUESTIONS) for _ in questions]
    inputs = processor(images=repeated, text=texts, padding=True, padding_side="left", return_tensors="pt")
    return model.generate(**inputs, **kwargs)


def grouped(model, processor, images, **kwargs) -> torch.LongTensor:
    texts = [[PROMPT.format(q) for q in questions] for questions in QUESTIONS]
    return model.generate(**grouped_inputs(processor, images, texts), **kwargs)


class Spy:
    """Counts `_generate_sharing_prefix` calls and records the prefix length `_prefix_layout` chose. The tiny LLMs
    count as large here (`SHARE_PREFIX_MIN_LLM_PARAMETERS` 0): the default `share_prefix=None` then shares, as for a
    real LLM."""

    def __init__(self, monkeypatch):
        monkeypatch.setattr(modeling, "SHARE_PREFIX_MIN_LLM_PARAMETERS", 0)
        self.calls, self.prefix_lengths = 0, []
        shortcut, layout = modeling.Blip2ForConditionalGeneration._generate_sharing_prefix, modeling._prefix_layout

        def counted(*args, **kwargs):
            self.calls += 1
            return shortcut(*args, **kwargs)

        def recorded(*args):
            result = layout(*args)
            self.prefix_lengths.append(result[1])
            return result

        monkeypatch.setattr(modeling.Blip2ForConditionalGeneration, "_generate_sharing_prefix", counted)
        monkeypatch.setattr(modeling, "_prefix_layout", recorded)


@pytest.mark.parametrize("search", list(SEARCHES))
def test_grouped_answers_equal_one_question_per_row(tiny, search, monkeypatch):
    model, processor, _ = tiny
    spy = Spy(monkeypatch)
    images = draw_images(3, size=(40, 30))
    expected = per_row(model, processor, images, share_prefix=False, **SEARCHES[search])
    assert torch.equal(grouped(model, processor, images, **SEARCHES[search]), expected)
    if model.config.use_decoder_only_language_model:
        # the shortcut ran, sharing `<image> x 4, BOS, "Question", ":"` (the tiny tokenizer: 2 tokens) per image
        assert spy.calls == 1 and spy.prefix_lengths == [4 + 1 + 2]
    else:
        assert spy.calls == 0  # T5: the encoder runs once per row and generate never re-runs it per beam


@pytest.mark.parametrize("search", ["greedy", "beams", "returned sequences", "dict output"])
def test_prefix_shortcut_equals_the_plain_path(tiny, search):
    model, processor, _ = tiny
    kwargs = dict(SEARCHES.get(search, SEARCHES["beams"]))
    if search == "returned sequences":
        kwargs["num_return_sequences"] = 2
    if search == "dict output":
        kwargs.update(return_dict_in_generate=True, output_scores=True)
    images = draw_images(3, size=(40, 30), seed=1)
    shared = grouped(model, processor, images, share_prefix=True, **kwargs)
    plain = grouped(model, processor, images, share_prefix=False, **kwargs)
    if search == "dict output":
        assert torch.equal(shared.sequences, plain.sequences)
        assert torch.allclose(shared.sequences_scores, plain.sequences_scores, atol=1e-5)
    else:
        assert torch.equal(shared, plain)
        assert shared.shape[0] == 7 * kwargs.get("num_return_sequences", 1)


def test_beams_of_rows_with_distinct_images_share_their_prompt(tiny, monkeypatch):
    """No image has two rows: nothing to share across rows, but each row's prompt is still run once for its beams."""
    model, processor, _ = tiny
    spy = Spy(monkeypatch)
    images = draw_images(2, size=(40, 30), seed=2)
    texts = [[PROMPT.format("what color is the circle?")], [PROMPT.format("how many?")]]
    inputs = grouped_inputs(processor, images, texts)
    plain = model.generate(**inputs, share_prefix=False, **SEARCHES["beams"])
    assert torch.equal(model.generate(**inputs, **SEARCHES["beams"]), plain)
    assert spy.prefix_lengths == ([0] if model.config.use_decoder_only_language_model else [])


@pytest.mark.parametrize("prompt", ["", "a photo of"])
def test_captioning_beams_share_the_prompt_without_image_rows(tiny, monkeypatch, prompt):
    """Plain captioning (one image per row, no `image_rows`): the beams of a row share its prompt's prefill, for the
    plain path's tokens (and the per-row copy of the image, as every caller builds it, still works)."""
    model, processor, _ = tiny
    spy = Spy(monkeypatch)
    images = draw_images(3, size=(40, 30), seed=3)
    inputs = processor(images=images, text=[prompt] * 3, padding=True, padding_side="left", return_tensors="pt")
    plain = model.generate(**inputs, share_prefix=False, **SEARCHES["beams"])
    assert torch.equal(model.generate(**inputs, **SEARCHES["beams"]), plain)
    image_only = model.generate(pixel_values=inputs["pixel_values"], share_prefix=False, **SEARCHES["beams"])
    assert torch.equal(model.generate(pixel_values=inputs["pixel_values"], **SEARCHES["beams"]), image_only)
    if model.config.use_decoder_only_language_model:
        assert spy.calls == 2 and spy.prefix_lengths == [0, 0]  # no rows to share across, only the beams
        greedy = model.generate(**inputs, **SEARCHES["greedy"])
        assert spy.calls == 2  # without beams there is nothing to share: the plain path
        assert torch.equal(greedy, model.generate(**inputs, share_prefix=False, **SEARCHES["greedy"]))
    else:
        assert spy.calls == 0


def test_prefix_sharing_is_automatic_by_the_llm_size(tiny, monkeypatch):
    """Default `share_prefix=None`: plain path for an LLM below `SHARE_PREFIX_MIN_LLM_PARAMETERS` (the extra calls
    cost more than its prefill), the shortcut from that size on; True forces it."""
    model, processor, _ = tiny
    if not model.config.use_decoder_only_language_model:
        pytest.skip("T5 never takes the shortcut")
    calls = []
    shortcut = modeling.Blip2ForConditionalGeneration._generate_sharing_prefix
    monkeypatch.setattr(
        modeling.Blip2ForConditionalGeneration,
        "_generate_sharing_prefix",
        lambda *args, **kwargs: calls.append(1) or shortcut(*args, **kwargs),
    )
    images = draw_images(3, size=(40, 30), seed=4)
    size = model._language_model_parameters()
    assert size == sum(p.numel() for p in model.language_model.parameters()) < modeling.SHARE_PREFIX_MIN_LLM_PARAMETERS
    plain = grouped(model, processor, images, **SEARCHES["beams"])
    assert calls == []
    assert torch.equal(grouped(model, processor, images, share_prefix=True, **SEARCHES["beams"]), plain)
    assert calls == [1]
    monkeypatch.setattr(modeling, "SHARE_PREFIX_MIN_LLM_PARAMETERS", size)
    assert torch.equal(grouped(model, processor, images, **SEARCHES["beams"]), plain)
    assert calls == [1, 1]


def test_answer_questions_packs_whole_images(tiny):
    model, processor, folder = tiny
    images = draw_images(3, size=(40, 30))
    paths = []
    for index, image in enumerate(images):
        paths.append(folder / f"image{index}.png")
        image.save(paths[-1])
    # batch_size 3: [image 0], [image 1 (4 questions, alone)], [image 2]
    answers = answer_questions(model, processor, paths, QUESTIONS, prompt=PROMPT, batch_size=3, **SEARCHES["beams"])
    ids = per_row(model, processor, images, **SEARCHES["beams"])
    if model.config.use_decoder_only_language_model:
        prompts = processor(text=[PROMPT.format(q) for qs in QUESTIONS for q in qs], padding=True, return_tensors="pt")
        ids = ids[:, prompts["input_ids"].shape[1] :]
    flat = [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]
    assert [len(a) for a in answers] == [1, 4, 2]
    assert [a for image_answers in answers for a in image_answers] == flat


def test_batches_by_image():
    assert list(batches_by_image([1, 4, 2, 1, 1], 3)) == [[0], [1], [2, 3], [4]]
    assert list(batches_by_image([2, 2, 2], 16)) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="batch_size"):
        list(batches_by_image([1], 0))


@pytest.mark.parametrize(
    "image_rows, message",
    [
        ([0, 1], r"one entry per row of input_ids \(shape \[3\]\); got shape \[2\]"),
        ([0, 1, 2], r"image_rows\[2\] = 2 is out of range.*2 images.*0\.\.1"),
        ([0, -1, 1], r"image_rows\[1\] = -1 is out of range"),
        ([[0, 1, 1]], r"1-D tensor of image indices, shape \[B\]"),
        ([0.0, 1.0, 1.0], r"1-D tensor of image indices"),
    ],
)
def test_bad_image_rows_are_refused(tiny, image_rows, message):
    model, processor, _ = tiny
    images = draw_images(2, size=(40, 30))
    inputs = grouped_inputs(processor, images, [["a?"], ["b?", "c?"]])
    inputs["image_rows"] = torch.tensor(image_rows)
    with pytest.raises(ValueError, match=message):
        model.generate(**inputs, max_new_tokens=2)


def test_grouped_inputs_refuse_images_without_questions(tiny):
    _, processor, _ = tiny
    with pytest.raises(ValueError, match="Image 1 has no prompts"):
        grouped_inputs(processor, draw_images(2), [["a?"], []])
    with pytest.raises(ValueError, match="2 images and 1 lists"):
        grouped_inputs(processor, draw_images(2), [["a?"]])


# ---------------------------------------------------------------------------------------------------------------------
# evaluation/vqa.py
# ---------------------------------------------------------------------------------------------------------------------


def load_vqa_script():
    if str(EVALUATION) not in sys.path:
        sys.path.insert(0, str(EVALUATION))
    spec = importlib.util.spec_from_file_location("evaluation_vqa_grouped", EVALUATION / "vqa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vqa_script_grouped_by_image_equals_one_question_per_row(tiny, tmp_path):
    """A LAVIS-format file whose images repeat out of order (1, 4 and 2 questions): the script's grouped answers are
    the per-row ones, in the file's order, and a resumed run redoes nothing."""
    model, processor, _ = tiny
    images = draw_images(3, size=(40, 30), seed=3)
    for index, image in enumerate(images):
        image.save(tmp_path / f"{index}.png")
    order = [1, 0, 1, 2, 1, 2, 1]  # images of the questions, interleaved
    questions = [q for qs in QUESTIONS for q in qs]
    asked = {0: iter(QUESTIONS[0]), 1: iter(QUESTIONS[1]), 2: iter(QUESTIONS[2])}
    entries = [
        dict(question_id=10 + i, question=next(asked[image]), image=f"{image}.png", answer=["x"])
        for i, image in enumerate(order)
    ]
    assert sorted(e["question"] for e in entries) == sorted(questions)
    (tmp_path / "questions.json").write_text(json.dumps(entries))
    vqa = load_vqa_script()
    args = ["--model", str(tiny[2]), "--questions", str(tmp_path / "questions.json"), "--image_dir", str(tmp_path)]
    args += ["--format", "lavis", "--batch_size", "3", "--num_workers", "0", "--max_new_tokens", "4"]
    try:
        vqa.main([*args, "--output_dir", str(tmp_path / "out")])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [p["question_id"] for p in predictions] == [e["question_id"] for e in entries]

    texts = [PROMPT.format(vqa.pre_question(e["question"])) for e in entries]
    inputs = processor(
        images=[images[i] for i in order], text=texts, padding=True, padding_side="left", return_tensors="pt"
    )
    ids = model.generate(**inputs, num_beams=5, max_new_tokens=4, min_new_tokens=1, length_penalty=-1.0)
    if model.config.use_decoder_only_language_model:
        ids = ids[:, inputs["input_ids"].shape[1] :]
    expected = [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]
    assert [p["answer"] for p in predictions] == expected


@pytest.mark.slow
def test_vqa_benchmark_quick_run(tmp_path):
    """benchmarks/bench_vqa.py in smoke mode: its identity check passes (exit 0) and it writes its table and JSON."""
    out = tmp_path / "vqa.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vqa.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| tiny-opt" in proc.stdout and "answer tokens identical: True" in proc.stdout
    (result,) = json.loads(out.read_text())["results"]
    assert result["tokens_identical"] and set(result["memory"]) == {"transformers", "blip2_hf"}
