"""The evaluation scripts survive bad images and interruptions: an image that does not decode is found before the
model loads (refused with the list, or left out and listed with `--skip_bad_images`), and an interrupted run resumes
from the predictions it appended, ending with the results an uninterrupted run writes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from accelerate.state import AcceleratorState
from PIL import Image
from test_evaluation import build_stage1_checkpoint, load_script

import blip2_hf
from blip2_hf.testing_utils import draw_images, save_tiny_generation_checkpoint

vqa = load_script("vqa")
caption = load_script("caption")
retrieval = load_script("retrieval")
import common  # noqa: E402  (evaluation/common.py, on the path once a script is loaded)

FAST = ["--num_workers", "0"]
QUESTIONS = ["What color is the circle?", "How many dogs are there?", "Is the cat sleeping?"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def truncated_jpeg(path: Path) -> None:
    """A JPEG cut in half: it exists and its header opens, its pixels do not decode ("image file is truncated")."""
    noise = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(noise).save(data, format="JPEG")
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny OPT generation checkpoint, a stage-1 folder, images 0..3 and `bad.jpg` (truncated)."""
    root = tmp_path_factory.mktemp("robust")
    save_tiny_generation_checkpoint(root / "opt", "opt")
    build_stage1_checkpoint(root / "stage1")
    (root / "images").mkdir()
    for index, image in enumerate(draw_images(4, size=(40, 30))):
        image.save(root / "images" / f"{index}.jpg")
    truncated_jpeg(root / "images" / "bad.jpg")
    return root


def vqa_file(folder: Path, images: list[str], name: str = "questions.json") -> Path:
    entries = [
        dict(question_id=100 + i, question=QUESTIONS[i % 3], image=image, answer=["red", "two"][i % 2])
        for i, image in enumerate(images)
    ]
    path = folder / name
    path.write_text(json.dumps(entries))
    return path


def caption_file(folder: Path, images: list[str]) -> Path:
    path = folder / "captions.json"
    path.write_text(
        json.dumps([dict(image=image, caption=[f"a picture {i}", "a thing"]) for i, image in enumerate(images)])
    )
    return path


def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded: the bad image should have stopped the run before")


@pytest.mark.parametrize("script", ["vqa", "caption", "retrieval"])
def test_an_image_that_does_not_decode_is_refused_before_the_model_loads(world, tmp_path, monkeypatch, script):
    module = {"vqa": vqa, "caption": caption, "retrieval": retrieval}[script]
    monkeypatch.setattr(module, "load_model", no_model)
    images = ["0.jpg", "1.jpg", "bad.jpg", "2.jpg"]
    if script == "vqa":
        args = ["--model", str(world / "opt"), "--questions", str(vqa_file(tmp_path, images))]
    else:
        model = world / ("opt" if script == "caption" else "stage1")
        args = ["--model", str(model), "--annotations", str(caption_file(tmp_path, images))]
    with pytest.raises(SystemExit) as refusal:
        module.main([*args, "--image_dir", str(world / "images"), "--output_dir", str(tmp_path / "out"), *FAST])
    message = str(refusal.value)
    assert "1 of 4 image(s) do not decode" in message and "bad.jpg (OSError: image file is truncated" in message
    assert "Nothing was evaluated" in message and "--skip_bad_images" in message
    assert not (tmp_path / "out" / "results.json").exists()


def test_vqa_skip_bad_images_lists_them_and_scores_the_rest(world, tmp_path):
    """With --skip_bad_images the questions on bad.jpg are left out, listed in results.json, and the rest scores
    exactly as a file without them."""
    common = ["--model", str(world / "opt"), "--image_dir", str(world / "images"), "--max_new_tokens", "3", *FAST]
    with_bad = vqa_file(tmp_path, ["0.jpg", "bad.jpg", "1.jpg", "bad.jpg", "2.jpg"])
    skipped = vqa.main(
        [*common, "--questions", str(with_bad), "--skip_bad_images", "--output_dir", str(tmp_path / "a")]
    )
    assert [entry["image"] for entry in skipped["skipped_images"]] == [str(world / "images" / "bad.jpg")]
    assert skipped["skipped_images"][0]["error"].startswith("OSError: image file is truncated")
    assert skipped["settings"]["num_questions"] == 3 and skipped["settings"]["num_questions_skipped"] == 2
    predictions = json.loads((tmp_path / "a" / "predictions.json").read_text())
    assert [p["question_id"] for p in predictions] == [100, 102, 104]
    assert json.loads((tmp_path / "a" / "results.json").read_text())["skipped_images"] == skipped["skipped_images"]

    entries = [entry for entry in json.loads(with_bad.read_text()) if entry["image"] != "bad.jpg"]
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps(entries))
    reference = vqa.main([*common, "--questions", str(clean)])
    assert skipped["metrics"] == reference["metrics"] and reference["skipped_images"] == []


def test_retrieval_skip_bad_images_drops_the_image_and_its_captions(world, tmp_path):
    common = ["--model", str(world / "stage1"), "--image_dir", str(world / "images"), "--k", "4", *FAST]
    with_bad = caption_file(tmp_path, ["0.jpg", "bad.jpg", "1.jpg", "2.jpg"])
    skipped = retrieval.main([*common, "--annotations", str(with_bad), "--skip_bad_images"])
    assert [entry["image"] for entry in skipped["skipped_images"]] == [str(world / "images" / "bad.jpg")]
    assert skipped["settings"]["num_images"] == 3 and skipped["settings"]["num_texts"] == 6
    entries = [entry for entry in json.loads(with_bad.read_text()) if entry["image"] != "bad.jpg"]
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps(entries))
    AcceleratorState._reset_state(reset_partial_state=True)
    reference = retrieval.main([*common, "--annotations", str(clean)])
    assert skipped["metrics"] == reference["metrics"]


def test_benchmark_is_never_scored_without_some_of_its_images(world, tmp_path, monkeypatch):
    monkeypatch.setattr(vqa, "load_model", no_model)
    questions = vqa_file(tmp_path, ["0.jpg", "bad.jpg"], name="okvqa_val_eval.json")
    monkeypatch.setitem(common.BENCHMARK_FILES["vqa"]["okvqa"], questions.name, ("test", 2))
    args = ["--model", str(world / "opt"), "--questions", str(questions), "--image_dir", str(world / "images")]
    with pytest.raises(SystemExit, match="drop --benchmark to evaluate the rest as custom data"):
        vqa.main([*args, "--benchmark", "okvqa", "--skip_bad_images", *FAST])


class GenerateCounter:
    """Wraps `generate`: counts the calls (one per batch) and raises KeyboardInterrupt at call `fail_at`."""

    def __init__(self, monkeypatch, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at
        original = blip2_hf.Blip2ForConditionalGeneration.generate

        def generate(model, *args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_at:
                raise KeyboardInterrupt("interrupted (simulated)")
            return original(model, *args, **kwargs)

        monkeypatch.setattr(blip2_hf.Blip2ForConditionalGeneration, "generate", generate)


def comparable(results: dict) -> dict:
    """results.json without what differs between any two runs (the date, where it was written)."""
    settings = {k: v for k, v in results["settings"].items() if k not in ("date", "output_dir")}
    return {**results, "settings": settings}


def test_interrupted_vqa_resumes_from_its_predictions(world, tmp_path, monkeypatch, capsys):
    """Interrupted after 2 of 4 batches (and a last line cut by the kill): the same command answers the 2 batches
    left, says it resumed, and writes the results.json and predictions.json of an uninterrupted run."""
    questions = vqa_file(tmp_path, ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "0.jpg", "1.jpg", "2.jpg"])
    common = ["--model", str(world / "opt"), "--questions", str(questions), "--image_dir", str(world / "images")]
    common += ["--batch_size", "2", "--max_new_tokens", "3", *FAST]
    reference = vqa.main([*common, "--output_dir", str(tmp_path / "reference")])

    out = tmp_path / "out"
    GenerateCounter(monkeypatch, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        vqa.main([*common, "--output_dir", str(out)])
    assert not (out / "results.json").exists()
    partial = out / "predictions.partial.0.jsonl"
    lines = partial.read_text().splitlines()
    # batches hold whole images (grouped by image): [0.jpg: 100 104] [1.jpg: 101 105] [2.jpg: 102 106] [3.jpg: 103]
    assert len(lines) == 1 + 4 and [json.loads(line)["question_id"] for line in lines[1:]] == [100, 104, 101, 105]
    with partial.open("a") as file:
        file.write('{"question_id": 102, "answ')  # the kill cut this line

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(SystemExit, match=r"other settings \(--prompt None there, 'Q: \{\} A:' now\)"):
        vqa.main([*common, "--output_dir", str(out), "--prompt", "Q: {} A:"])  # not the same run: refused

    AcceleratorState._reset_state(reset_partial_state=True)
    counter = GenerateCounter(monkeypatch)
    capsys.readouterr()
    resumed = vqa.main([*common, "--output_dir", str(out)])
    assert "Resuming: 4 predictions read from" in capsys.readouterr().out
    assert counter.calls == 2  # questions 102, 106 (2.jpg) and 103 (3.jpg) only: 2 batches
    assert comparable(resumed) == comparable(reference)
    assert comparable(json.loads((out / "results.json").read_text())) == comparable(
        json.loads((tmp_path / "reference" / "results.json").read_text())
    )
    assert (out / "predictions.json").read_text() == (tmp_path / "reference" / "predictions.json").read_text()
    assert not partial.exists()  # done: predictions.json holds them all
