"""`blip2-hf caption DIR --output` / `blip2-hf ask --questions FILE`: streamed through DataLoader workers, written as
JSON Lines per batch, resumed on rerun. Checked against the plain per-image commands on a tiny checkpoint (no Hub):
the same captions and answers, an interrupted run finished without regenerating what is done or writing a line twice,
unreadable images recorded once, bad questions files named by line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import blip2_hf
from blip2_hf.batch_inference import Question, expand_image_sources, group_by_image, read_questions, resolve_dtype
from blip2_hf.cli import main
from blip2_hf.testing_utils import draw_images, save_tiny_generation_checkpoint

FAST = ["--num-beams", "2", "--max-new-tokens", "5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny OPT checkpoint and a folder tree: 5 images (nested, mixed extension case), a text file, a broken PNG."""
    root = tmp_path_factory.mktemp("streaming")
    save_tiny_generation_checkpoint(root / "model", "opt")
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    names = ["b.png", "a.jpg", "sub/c.PNG", "sub/d.jpeg", "e.JPG"]
    for name, image in zip(names, draw_images(len(names), size=(48, 36), seed=5)):
        image.save(photos / name)
    (photos / "notes.txt").write_text("not an image")
    return root


class RowCounts(list):
    def __init__(self):
        super().__init__()
        self.images: list[int] = []

    def clear(self) -> None:
        super().clear()
        self.images.clear()


@pytest.fixture
def generated_rows(monkeypatch) -> list[int]:
    """Counts the rows each `generate` call gets (the model's work), in-process; `rows.images` the images each call
    encodes."""
    rows = RowCounts()
    original = blip2_hf.Blip2ForConditionalGeneration.generate

    def counting(self, *args, **kwargs):
        rows.append(int(kwargs["input_ids"].shape[0]))
        rows.images.append(int(kwargs["pixel_values"].shape[0]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(blip2_hf.Blip2ForConditionalGeneration, "generate", counting)
    return rows


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sorted_images(world: Path) -> list[Path]:
    photos = world / "photos"
    return [photos / name for name in ("a.jpg", "b.png", "e.JPG", "sub/c.PNG", "sub/d.jpeg")]


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------


def test_expand_image_sources(world, tmp_path):
    photos = world / "photos"
    assert expand_image_sources([photos]) == sorted_images(world)  # recursive, sorted, extensions of any case
    assert expand_image_sources([f"{photos}/*.png", f"{photos}/**/*.jpeg"]) == [
        photos / "b.png",
        photos / "sub/d.jpeg",
    ]
    assert expand_image_sources([f"{photos}/s*"]) == [photos / "sub/c.PNG", photos / "sub/d.jpeg"]  # a matched folder
    # A plain missing path is kept (reading it fails and is reported per file), an explicit file of any extension too.
    assert expand_image_sources([tmp_path / "missing.png", photos / "notes.txt"]) == [
        tmp_path / "missing.png",
        photos / "notes.txt",
    ]
    twice = [photos / "b.png", photos, f"{photos}/./b.png"]
    assert len(expand_image_sources(twice)) == 7
    assert expand_image_sources(twice, unique=True) == [
        photos / "b.png",
        *sorted_images(world)[:1],
        *sorted_images(world)[2:],
    ]
    with pytest.raises(ValueError, match=r"empty.*holds no image files"):
        (tmp_path / "empty").mkdir()
        expand_image_sources([tmp_path / "empty"])
    with pytest.raises(ValueError, match=r"\*\.gif.*matches no image files"):
        expand_image_sources([f"{photos}/*.gif"])


def test_group_by_image_keeps_each_images_questions_in_one_batch(tmp_path):
    questions = [Question(name, tmp_path / name, f"q{i}") for i, name in enumerate("aabacccb")]
    paths, per_image, batches = group_by_image(questions, batch_size=3)
    assert paths == [tmp_path / "a", tmp_path / "b", tmp_path / "c"]  # order of first appearance
    assert [[q.question for q in asked] for asked in per_image] == [
        ["q0", "q1", "q3"],
        ["q2", "q7"],
        ["q4", "q5", "q6"],
    ]
    assert batches == [[0], [1], [2]]  # 3 + 2 > 3 and 2 + 3 > 3: never an image split across batches
    assert group_by_image(questions, batch_size=5)[2] == [[0, 1], [2]]
    assert group_by_image(questions, batch_size=1)[2] == [[0], [1], [2]]  # more questions than the batch: alone


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="float16 needs a GPU"):
        resolve_dtype("float16", cpu)


# ---------------------------------------------------------------------------------------------------------------------
# caption
# ---------------------------------------------------------------------------------------------------------------------


def test_streamed_folder_captions_equal_per_image_captions(world, capsys, tmp_path):
    """Workers, batches of 2 over a nested folder: the records the plain `caption IMAGE...` prints, in order."""
    model = ["--model", world / "model", *FAST]
    output = tmp_path / "captions.jsonl"
    code, out, err = run(capsys, "caption", world / "photos", "--output", output, "--batch-size", 2,
                         "--num-workers", 2, *model)  # fmt: skip
    assert code == 0 and out == "", err
    images = sorted_images(world)
    plain = {}
    for image in images:  # one image per call, no workers: the existing path
        code, out, _ = run(capsys, "caption", image, "--num-workers", 0, *model)
        path, caption = out.rstrip("\n").split("\t")
        plain[path] = caption
    assert len(set(plain.values())) == len(images)  # the check below can tell images apart
    assert lines(output) == [{"image": str(image), "caption": plain[str(image)]} for image in images]
    # Without --output a folder prints the same captions, as `PATH<TAB>caption` lines.
    code, out, _ = run(capsys, "caption", world / "photos", "--batch-size", 3, "--num-workers", 0, *model)
    assert code == 0 and out.splitlines() == [f"{image}\t{plain[str(image)]}" for image in images]


def test_interrupted_caption_run_resumes_without_redoing_or_duplicating(world, capsys, tmp_path, generated_rows):
    model = ["--model", world / "model", *FAST, "--num-workers", 0]
    full = tmp_path / "full.jsonl"
    assert run(capsys, "caption", world / "photos", "--output", full, "--batch-size", 2, *model)[0] == 0
    expected = full.read_text()

    # A run on half the images, then killed while writing its third line (cut mid-line).
    output = tmp_path / "captions.jsonl"
    first = expected.splitlines(keepends=True)
    output.write_text("".join(first[:2]) + first[2][: len(first[2]) // 2])
    generated_rows.clear()
    code, out, err = run(capsys, "caption", world / "photos", "--output", output, "--batch-size", 2, *model)
    assert code == 0, err
    assert "dropped its last line" in err and "skipping 2 images already in" in err
    assert sum(generated_rows) == 3  # the 3 images not done, none of the 2 done ones
    assert output.read_text() == expected  # same lines, the cut one once, in order

    # Done: a rerun generates nothing and leaves the file as it is.
    generated_rows.clear()
    code, _, err = run(capsys, "caption", world / "photos", "--output", output, *model)
    assert code == 0 and generated_rows == [] and output.read_text() == expected
    assert "skipping 5 images" in err
    # Images named another way (./, a glob) are the same images.
    code, _, err = run(capsys, "caption", f"{world}/photos/./*.png", "--output", output, *model)
    assert code == 0 and generated_rows == [] and output.read_text() == expected


def test_corrupt_images_are_recorded_once_and_retried_on_request(world, capsys, tmp_path, generated_rows):
    folder = tmp_path / "mixed"
    folder.mkdir()
    draw_images(1, size=(40, 30))[0].save(folder / "good.png")
    (folder / "garbage.png").write_bytes(b"this is not an image")
    output = tmp_path / "captions.jsonl"
    argv = ["caption", folder, "--output", output, "--model", world / "model", *FAST, "--num-workers", 1]
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert f"cannot read {folder / 'garbage.png'}: UnidentifiedImageError" in err
    records = lines(output)
    assert [record["image"] for record in records] == [str(folder / "garbage.png"), str(folder / "good.png")]
    assert records[0]["error"].startswith("UnidentifiedImageError") and "caption" not in records[0]
    assert "caption" in records[1]
    # A rerun does not try it again, and still exits 1: the file holds an error.
    generated_rows.clear()
    code, _, err = run(capsys, *argv)
    assert code == 1 and generated_rows == [] and lines(output) == records
    assert "holds 1 error lines" in err and "--retry-errors" in err
    # --retry-errors: the error line is replaced, not repeated (the file is still broken, so it is an error again).
    code, _, err = run(capsys, *argv, "--retry-errors")
    assert code == 1 and "removed 1 error lines" in err and "cannot read" in err
    assert sorted(map(json.dumps, lines(output))) == sorted(map(json.dumps, records))


def test_caption_input_and_output_errors(world, capsys, tmp_path):
    model = ["--model", world / "model"]
    code, out, err = run(capsys, "caption", f"{world}/photos/*.gif", *model)
    assert (
        code == 2 and out == "" and "*.gif: the pattern matches no image files" in err and "no image files to" in err
    )
    # Among other inputs, an empty folder is named and the others still captioned (exit code 1, as unreadable files).
    (tmp_path / "empty").mkdir()
    image = world / "photos" / "b.png"
    code, out, err = run(capsys, "caption", tmp_path / "empty", image, *model, *FAST)
    assert code == 1 and f"{tmp_path / 'empty'}: the folder holds no image files" in err
    assert out.startswith(f"{image}\t")
    not_ours = tmp_path / "other.jsonl"
    not_ours.write_text('{"image": "a.png", "caption": "x"}\nhello\n')
    code, out, err = run(capsys, "caption", world / "photos", "--output", not_ours, *model)
    assert code == 2 and f"{not_ours}, line 2: not a results line" in err and not_ours.read_text().endswith("hello\n")
    code, out, err = run(capsys, "caption", world / "photos", "--dtype", "float16", "--device", "cpu", *model)
    assert code == 2 and out == "" and "float16 needs a GPU" in err


# ---------------------------------------------------------------------------------------------------------------------
# ask --questions
# ---------------------------------------------------------------------------------------------------------------------

QUESTIONS = [
    {"image": "photos/b.png", "question": "what color is the circle?", "question_id": 7},
    {"image": "photos/a.jpg", "question": "what shape is there?", "question_id": 3},
    {"image": "photos/b.png", "question": "how many shapes?", "question_id": "q-9"},
    {"image": "missing.png", "question": "what is it?", "question_id": 4},
    {"image": "photos/b.png", "question": "is it red or is it blue or green?", "question_id": 5},
    {"image": "photos/a.jpg", "question": "what color is the circle?", "question_id": 6},
]


def write_jsonl(path: Path, items: list) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_questions_file_round_trip_and_resume(world, capsys, tmp_path, generated_rows):
    """Answers grouped by image (batches of whole images) equal `ask IMAGE QUESTION` one by one; an interrupted run
    resumes by question_id."""
    questions = write_jsonl(world / "questions.jsonl", QUESTIONS)  # image paths relative to the file's folder
    model = ["--model", world / "model", *FAST]
    output = tmp_path / "answers.jsonl"
    code, out, err = run(capsys, "ask", "--questions", questions, "--output", output, "--batch-size", 3, *model)
    assert code == 1 and out == "" and "missing.png" in err  # named once, recorded per question
    assert generated_rows == [3, 2]  # b.png's three questions, then a.jpg's two: each image's questions together
    assert generated_rows.images == [1, 1]  # each image encoded once for all its questions (`image_rows`)
    by_id = {record["question_id"]: record for record in lines(output)}
    assert sorted(by_id, key=str) == sorted((q["question_id"] for q in QUESTIONS), key=str)
    assert by_id[4]["error"].startswith("FileNotFoundError") and "answer" not in by_id[4]
    for item in QUESTIONS:
        if item["question_id"] == 4:
            continue
        code, single, _ = run(capsys, "ask", world / item["image"], item["question"], *model)
        assert by_id[item["question_id"]] == {**item, "answer": single.strip()}
    assert len({record.get("answer") for record in by_id.values()}) > 2  # answers differ between questions

    # A JSON list gives the same; killed after its first batch (b.png's three answers): the rest only is generated.
    as_list = tmp_path / "questions.json"
    as_list.write_text(json.dumps(QUESTIONS))
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text("".join(output.read_text().splitlines(keepends=True)[:3]))
    generated_rows.clear()
    code, _, err = run(capsys, "ask", "--questions", as_list, "--image-root", world, "--output", resumed, *model)
    assert code == 1 and "skipping 3 questions" in err and generated_rows == [2]
    assert resumed.read_text() == output.read_text()
    # Without --output: the same records as JSON lines on stdout.
    code, out, _ = run(capsys, "ask", "--questions", questions, *model)
    assert [json.loads(line) for line in out.splitlines()] == lines(output)


def test_questions_without_ids_resume_by_image_and_question(world, capsys, tmp_path, generated_rows):
    items = [{"image": q["image"], "question": q["question"]} for q in QUESTIONS if q["question_id"] != 4]
    questions = write_jsonl(world / "no_ids.jsonl", items)
    output = tmp_path / "answers.jsonl"
    argv = ["ask", "--questions", questions, "--output", output, "--model", world / "model", *FAST]
    assert run(capsys, *argv)[0] == 0
    assert [(r["image"], r["question"]) for r in lines(output)] == [(i["image"], i["question"]) for i in items
                                                                    if i["image"].endswith("b.png")] + [
        (i["image"], i["question"]) for i in items if i["image"].endswith("a.jpg")]  # fmt: skip
    generated_rows.clear()
    assert run(capsys, *argv)[0] == 0 and generated_rows == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"image": "a.png", "question": "q?"}\nnot json\n', "line 2: not valid JSON"),
        ('{"image": "a.png", "question": "q?"}\n\n{"image": "a.png"}\n', "line 3: missing key 'question'"),
        ('{"image": "a.png", "question": ""}\n', "line 1: 'question' must be a non-empty string"),
        ('[{"image": "a.png", "question": "q?"}, 5]', "item 1: expected an object"),
        ('[{"image": "a.png", "question": "q?"', "not valid JSON"),
        ('{"image": "a.png", "question": "q?", "question_id": 1}\n{"image": "b.png", "question": "r?", "question_id": 1}',
         "line 2: the same question_id 1 as line 1"),
        ('{"image": "a.png", "question": "q?"}\n{"image": "a.png", "question": "q?"}', "distinct question_id"),
        ('{"image": "a.png", "question": "q?", "question_id": [1]}', "line 1: 'question_id' must be a string or an"),
        ("\n", "no questions"),
    ],
)  # fmt: skip
def test_bad_questions_file_names_the_line(world, capsys, tmp_path, content, message):
    questions = tmp_path / "questions.jsonl"
    questions.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_questions(questions)
    code, out, err = run(capsys, "ask", "--questions", questions, "--model", world / "model")
    assert code == 2 and out == "" and str(questions) in err and "Traceback" not in err


def test_ask_argument_errors(world, capsys, tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:1])
    code, _, err = run(capsys, "ask", world / "photos" / "a.jpg", "why?", "--questions", questions)
    assert code == 2 and "not both" in err
    code, _, err = run(capsys, "ask", "--model", world / "model")
    assert code == 2 and "--questions FILE" in err
    code, _, err = run(capsys, "ask", "--questions", tmp_path / "nope.jsonl", "--model", world / "model")
    assert code == 2 and "nope.jsonl" in err


@pytest.mark.slow
def test_caption_benchmark_quick_run(tmp_path):
    """benchmarks/bench_caption.py --quick runs end to end and its caption-identity check against transformers'
    pipeline holds (timings are not asserted)."""
    import subprocess
    import sys

    out = tmp_path / "caption.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_caption.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| tiny-opt" in proc.stdout and "captions identical: True" in proc.stdout
    result = json.loads(out.read_text())["results"][0]
    assert result["captions_identical"] and result["distinct_captions"] > 1
