"""The evaluation scripts (`evaluation/vqa.py`, `caption.py`, `retrieval.py`) end to end on tiny checkpoints and tiny
datasets in every supported annotation format: outputs, counts, tables, metrics recomputed from the written
predictions, answers equal to the model's own unbatched generation, and 2 processes (`accelerate launch`, gloo on
CPU) equal to 1. Data labels: custom data is recorded (and carded) as `custom` with its file's name; a benchmark
only with `--benchmark` on its official file, whole (the tests shrink the official sizes to tiny ones)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from utils import BENCHMARK_NAMES

import blip2_hf
from blip2_hf.data import load_image
from blip2_hf.metrics import coco_caption_scores, retrieval_recall, vqa_accuracy
from blip2_hf.retrieval import itc_similarity, itm_rerank
from blip2_hf.testing_utils import (
    draw_images,
    make_bert_tokenizer,
    make_opt_tokenizer,
    perturb_,
    save_tiny_generation_checkpoint,
    tiny_config_dict,
)

ROOT = Path(__file__).resolve().parents[1]
EVALUATION = ROOT / "evaluation"
NUM_IMAGES = 6
FAST = ["--num_workers", "0"]


def load_script(name: str):
    """An evaluation script as a module (`evaluation/` on the path for its `common` import)."""
    if str(EVALUATION) not in sys.path:
        sys.path.insert(0, str(EVALUATION))
    spec = importlib.util.spec_from_file_location(f"evaluation_{name}", EVALUATION / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vqa = load_script("vqa")
caption = load_script("caption")
retrieval = load_script("retrieval")
import common  # noqa: E402  (evaluation/common.py, on the path once a script is loaded)


def official_size(monkeypatch, task: str, benchmark: str, file_name: str, size: int) -> None:
    """Let a tiny file with an official name stand for the benchmark: its size becomes the official one."""
    split, _ = common.BENCHMARK_FILES[task][benchmark][file_name]
    monkeypatch.setitem(common.BENCHMARK_FILES[task][benchmark], file_name, (split, size))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """The scripts' `Accelerator()` is a process-wide singleton: reset it so that no later test inherits it."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def read(path: Path):
    return json.loads(path.read_text())


def our_row(markdown: str, name: str) -> list[str]:
    """The cells of our row of a results table."""
    (line,) = [line for line in markdown.splitlines() if line.startswith(f"| **{name}** |")]
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


# ---------------------------------------------------------------------------------------------------------------------
# Tiny checkpoints and datasets
# ---------------------------------------------------------------------------------------------------------------------


def build_generation_checkpoint(folder: Path, text: str) -> None:
    """As tests/test_auto_and_pipelines.py: a tiny stage-2 model whose vocabulary fits the processor's tokenizer."""
    save_tiny_generation_checkpoint(folder, text)


def build_stage1_checkpoint(folder: Path) -> None:
    """A stage-1 folder (`Blip2ForPreTraining`, Q-Former text input, BERT tokenizer with `[DEC]`), as stage1.py
    saves it: it loads into `Blip2ForImageTextRetrieval`."""
    bert = make_bert_tokenizer()
    processor = blip2_hf.Blip2Processor(
        image_processor=blip2_hf.Blip2Processor.default_image_processor(30),
        tokenizer=make_opt_tokenizer(),
        qformer_tokenizer=bert,
        num_query_tokens=4,
    )
    config = tiny_config_dict("opt", text_input=True, image_token_index=None)
    config["qformer_config"].update(
        vocab_size=len(bert), bos_token_id=bert.bos_token_id, eos_token_id=bert.sep_token_id, pad_token_id=0
    )
    torch.manual_seed(0)
    perturb_(blip2_hf.Blip2ForPreTraining(blip2_hf.Blip2Config(**config)), scale=0.2).save_pretrained(folder)
    processor.save_pretrained(folder)


COLORS = ("red", "green", "blue", "yellow", "black", "white")
THINGS = ("circle", "square", "triangle", "dog", "cat")
QUESTIONS = [
    "What color is the circle?",
    "How many dogs are there?",
    "Is the cat sleeping?",
    "What's (in) the square; the triangle?",
]


def captions_of(image: int) -> list[str]:
    """5 captions per image, all different (identical texts would tie in ITC and make top-k order arbitrary)."""
    return [f"A {COLORS[image]} {THINGS[j]} on a {COLORS[(image + j + 1) % 6]} background!" for j in range(5)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Checkpoints (opt, t5, stage1) and images: COCO names under images/val2014/, GQA ids under gqa/."""
    root = tmp_path_factory.mktemp("evaluation")
    build_generation_checkpoint(root / "opt", "opt")
    build_generation_checkpoint(root / "t5", "t5")
    build_stage1_checkpoint(root / "stage1")
    for folder in ("images/val2014", "gqa"):
        (root / folder).mkdir(parents=True)
    for index, image in enumerate(draw_images(NUM_IMAGES, size=(40, 30))):
        image.save(root / "images" / "val2014" / f"COCO_val2014_{index + 1:012d}.jpg")
        image.save(root / "gqa" / f"n{index}.jpg")
    return root


def vqa_questions(num: int) -> list[dict]:
    return [
        dict(image_id=index % NUM_IMAGES + 1, question=QUESTIONS[index % len(QUESTIONS)], question_id=1000 + index)
        for index in range(num)
    ]


def write_official_vqa(root: Path, num: int) -> Path:
    path = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    path.write_text(json.dumps({"data_subtype": "val2014", "questions": vqa_questions(num)}))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------------------------------


def test_pre_question_is_lavis_blip_question():
    assert vqa.pre_question("What's (in) the square; the triangle?") == "what's in the square the triangle?"
    assert vqa.pre_question('Is it "red"!  ') == "is it red"
    assert vqa.pre_question("a, b: c~d # e*f") == "a, b cd  ef"
    assert vqa.pre_question("one two three four", max_words=2) == "one two"


def test_vqa_formats_are_detected():
    assert vqa.detect_format({"questions": []}) == "vqa"
    assert vqa.detect_format({"201": {"imageId": "n1", "question": "q", "answer": "a"}}) == "gqa"
    assert vqa.detect_format([{"question_id": 1, "question": "q", "image": "x.jpg"}]) == "lavis"
    with pytest.raises(ValueError, match="Cannot tell"):
        vqa.detect_format({"images": []})


def test_vqa_official_format_scored_against_the_annotations(world, tmp_path, monkeypatch):
    """`--benchmark vqav2` on the official questions file (its size shrunk to 8): first without answers (predictions
    only), then with annotations made from those predictions: every even question's 10 answers are its predicted
    answer (accuracy 100), every odd one's a wrong answer (0)."""
    questions = write_official_vqa(tmp_path, 8)
    official_size(monkeypatch, "vqa", "vqav2", questions.name, 8)
    common = ["--model", str(world / "opt"), "--questions", str(questions), "--image_dir", str(world / "images")]
    common += ["--benchmark", "vqav2"]
    first = vqa.main([*common, "--batch_size", "3", "--output_dir", str(tmp_path / "first"), *FAST])
    assert first["metrics"] is None and first["split"] == "val"
    assert (first["dataset"], first["benchmark"], first["dataset_file"]) == ("vqav2", "vqav2", questions.name)
    predictions = read(tmp_path / "first" / "predictions.json")
    assert [p["question_id"] for p in predictions] == list(range(1000, 1008))
    assert our_row((tmp_path / "first" / "results.md").read_text(), "opt") == ["-"] * 4

    annotations = []
    for index, prediction in enumerate(predictions):
        answer = prediction["answer"] if index % 2 == 0 else "xylophone"
        annotations.append(
            dict(
                question_id=prediction["question_id"],
                answers=[dict(answer=answer, answer_id=i + 1) for i in range(10)],
                answer_type="yes/no" if index % 2 == 0 else "other",
                question_type="what color is the",
            )
        )
    annotation_file = tmp_path / "v2_mscoco_val2014_annotations.json"
    annotation_file.write_text(json.dumps({"annotations": annotations}))
    out = tmp_path / "second"
    results = vqa.main([*common, "--annotations", str(annotation_file), "--output_dir", str(out), *FAST])

    assert results["dataset"] == "vqav2" and results["split"] == "val" and results["settings"]["format"] == "vqa"
    assert results["metrics"]["accuracy"] == 50.0 and results["metrics"]["num_questions"] == 8
    assert results["metrics"]["per_answer_type"] == {"yes/no": 100.0, "other": 0.0}
    assert read(out / "results.json") == json.loads(json.dumps(results))
    assert read(out / "predictions.json") == predictions  # batch size 3 then 16: the same answers
    references = [[a["answer"] for a in annotation["answers"]] for annotation in annotations]
    recomputed = vqa_accuracy([p["answer"] for p in predictions], references, mode="vqa")
    assert recomputed["accuracy"] == results["metrics"]["accuracy"]
    settings = results["settings"]
    assert settings["prompt_used"] == "Question: {} Short answer:" and settings["metric_mode"] == "vqa"
    assert settings["generation"] == dict(
        num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0, repetition_penalty=1.0, do_sample=False
    )
    assert settings["num_questions"] == settings["num_predictions"] == 8 and settings["num_images"] == NUM_IMAGES
    markdown = (out / "results.md").read_text()
    assert "| Models | VQAv2 val | VQAv2 test-dev | OK-VQA test | GQA test-dev |" in markdown
    assert "| BLIP-2 ViT-g FlanT5XXL (paper) | 65.2 | 65.0 | 45.9 | 44.7 |" in markdown
    assert our_row(markdown, "opt") == ["50.0", "-", "-", "-"]


def test_vqa_answer_is_the_unbatched_generation_without_the_prompt(world, tmp_path):
    """A left-padded batch of prompts of different lengths answers each question as the model does alone; the answer
    is the new tokens only (decoder-only output = prompt + new tokens)."""
    questions = write_official_vqa(tmp_path, 4)
    args = ["--model", str(world / "opt"), "--questions", str(questions), "--image_dir", str(world / "images")]
    results = vqa.main([*args, "--batch_size", "4", "--max_new_tokens", "4", "--output_dir", str(tmp_path), *FAST])
    # an official file name alone (4 of 214354 questions, no --benchmark) is custom data
    assert (results["dataset"], results["benchmark"], results["protocol"]) == ("custom", None, "vqav2")
    predictions = read(tmp_path / "predictions.json")
    model = blip2_hf.Blip2ForConditionalGeneration.from_pretrained(world / "opt").eval()
    processor = blip2_hf.Blip2Processor.from_pretrained(world / "opt")
    for index in (0, 3):
        prompt = f"Question: {vqa.pre_question(QUESTIONS[index])} Short answer:"
        image = load_image(world / "images" / "val2014" / f"COCO_val2014_{index + 1:012d}.jpg")
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        ids = model.generate(**inputs, num_beams=5, max_new_tokens=4, min_new_tokens=1, length_penalty=-1.0)
        expected = processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
        assert predictions[index]["answer"] == expected.strip()


def test_vqa_gqa_format_with_an_encoder_decoder_llm(world, tmp_path):
    questions = {
        str(200 + i): dict(imageId=f"n{i % NUM_IMAGES}", question=QUESTIONS[i % 4], answer=["yes", "2", "red"][i % 3])
        for i in range(5)
    }
    path = tmp_path / "testdev_balanced_questions.json"
    path.write_text(json.dumps(questions))
    out = tmp_path / "out"
    args = ["--model", str(world / "t5"), "--questions", str(path), "--image_dir", str(world / "gqa")]
    results = vqa.main([*args, "--batch_size", "2", "--limit", "4", "--output_dir", str(out), *FAST])

    assert (results["dataset"], results["protocol"], results["settings"]["format"]) == ("custom", "gqa", "gqa")
    assert results["split"] is None and results["dataset_file"] == "testdev_balanced_questions.json"
    assert results["settings"]["prompt_used"] == "Question: {} Short answer:"  # the one default (blip2_hf.VQA_PROMPT)
    assert results["settings"]["metric_mode"] == "gqa" and results["metrics"]["num_questions"] == 4
    predictions = read(out / "predictions.json")
    assert [p["question_id"] for p in predictions] == ["200", "201", "202", "203"]
    assert predictions[1]["image"].endswith(os.path.join("gqa", "n1.jpg"))
    references = [[questions[p["question_id"]]["answer"]] for p in predictions]
    recomputed = vqa_accuracy([p["answer"] for p in predictions], references, mode="gqa")
    assert 0 <= results["metrics"]["accuracy"] == recomputed["accuracy"] <= 100
    # --limit 4: custom data, our row alone (the paper's rows measure other data)
    markdown = (out / "results.md").read_text()
    assert our_row(markdown, "t5") == [f"{results['metrics']['accuracy']:.1f}"]
    assert "custom data (testdev_balanced_questions.json)" in markdown and "(paper)" not in markdown


def test_vqa_lavis_format_okvqa_with_a_custom_prompt(world, tmp_path, monkeypatch):
    entries = [
        dict(
            question_id=i,
            question=QUESTIONS[i % 4],
            image=f"val2014/COCO_val2014_{i + 1:012d}.jpg",
            answer=["red"] * 5 + ["blue"] * 5,
        )
        for i in range(3)
    ]
    path = tmp_path / "okvqa_val_eval.json"
    path.write_text(json.dumps(entries))
    official_size(monkeypatch, "vqa", "okvqa", path.name, 3)
    out = tmp_path / "out"
    args = ["--model", str(world / "opt"), "--questions", str(path), "--image_dir", str(world / "images")]
    args += ["--benchmark", "okvqa"]
    results = vqa.main([*args, "--prompt", "Q: {} A:", "--num_beams", "2", "--output_dir", str(out), *FAST])

    assert (results["dataset"], results["split"], results["settings"]["format"]) == ("okvqa", "test", "lavis")
    assert results["settings"]["prompt_used"] == "Q: {} A:" and results["settings"]["generation"]["num_beams"] == 2
    assert "lemmatized" in results["metrics"] and 0 <= results["metrics"]["accuracy"] <= 100
    assert our_row((out / "results.md").read_text(), "opt")[2] == f"{results['metrics']['accuracy']:.1f}"
    assert len(read(out / "predictions.json")) == 3


def test_vqa_refuses_bad_input(world, tmp_path):
    questions = write_official_vqa(tmp_path, 2)
    args = ["--model", str(world / "opt"), "--questions", str(questions), *FAST]
    with pytest.raises(SystemExit):
        vqa.main([*args, "--prompt", "no placeholder"])
    with pytest.raises(FileNotFoundError, match="2 image"):
        vqa.main([*args, "--image_dir", str(tmp_path)])


def test_vqa_custom_data_is_labelled_custom_in_results_and_on_the_card(world, tmp_path):
    """Your own questions, scored as VQAv2 is: results.json, results.md and the model card `push` would publish say
    `custom` and the file's name, never a paper benchmark."""
    from blip2_hf import hub

    entries = [
        dict(
            question_id=i,
            question=QUESTIONS[i % 4],
            image=f"val2014/COCO_val2014_{i + 1:012d}.jpg",
            answer=["red"] * 10,
        )
        for i in range(3)
    ]
    path = tmp_path / "my_questions.json"
    path.write_text(json.dumps(entries))
    out = tmp_path / "out"
    args = ["--model", str(world / "opt"), "--questions", str(path), "--image_dir", str(world / "images")]
    results = vqa.main([*args, "--max_new_tokens", "3", "--output_dir", str(out), *FAST])

    assert (results["dataset"], results["benchmark"], results["split"]) == ("custom", None, None)
    assert (results["dataset_file"], results["protocol"], results["table_column"]) == (
        "my_questions.json", "vqav2", "custom: my_questions.json",
    )  # fmt: skip
    accuracy = results["metrics"]["accuracy"]
    markdown = (out / "results.md").read_text()
    assert our_row(markdown, "opt") == [f"{accuracy:.1f}"] and "custom data (my_questions.json)" in markdown
    assert "(paper)" not in markdown and not any(name in markdown for name in BENCHMARK_NAMES)

    card = hub.build_model_card(world / "opt", "testuser/mine", [out])
    (entry,) = card.data.eval_results
    assert (entry.dataset_type, entry.dataset_name, entry.dataset_split) == ("custom", "my_questions.json", None)
    assert entry.metric_value == round(accuracy, 2)
    model_index = str(card).split("---")[1]
    for name in BENCHMARK_NAMES:  # as words: "pycocoevalcap" names a tool, not a dataset
        assert not re.search(rf"\b{name}\b", str(card)), name
    assert "my_questions.json" in model_index and "not on a published\nbenchmark" in card.text


def test_benchmark_requires_its_official_file_whole(world, tmp_path):
    """`--benchmark` refuses (before any model work) a file that is not the benchmark's official one, a file of
    the wrong size, and a subset."""
    args = ["--model", str(world / "opt"), "--image_dir", str(world / "images"), *FAST]
    mine = tmp_path / "my_questions.json"
    mine.write_text(json.dumps({"data_subtype": "val2014", "questions": vqa_questions(4)}))
    with pytest.raises(SystemExit, match=r"not one of its official files \(v2_OpenEnded_mscoco_val2014_questions"):
        vqa.main([*args, "--questions", str(mine), "--benchmark", "vqav2"])
    official = write_official_vqa(tmp_path, 4)
    with pytest.raises(SystemExit, match=r"has 4 questions, the official vqav2 val has 214354.*without --benchmark"):
        vqa.main([*args, "--questions", str(official), "--benchmark", "vqav2"])
    with pytest.raises(SystemExit, match="drop --limit"):
        vqa.main([*args, "--questions", str(official), "--benchmark", "vqav2", "--limit", "2"])
    with pytest.raises(SystemExit):  # the benchmark sets the scoring: a contradicting --dataset is a usage error
        vqa.parse_args(["--model", "m", "--questions", str(official), "--benchmark", "vqav2", "--dataset", "gqa"])
    flickr = tmp_path / "flickr30k_test.json"
    flickr.write_text(json.dumps(flickr_entries()))
    retrieval_args = ["--model", str(world / "stage1"), "--annotations", str(flickr), "--benchmark", "flickr30k"]
    with pytest.raises(SystemExit, match=f"has {NUM_IMAGES} images, the official flickr30k test has 1000"):
        retrieval.main([*retrieval_args, "--image_dir", str(world / "images"), *FAST])


# ---------------------------------------------------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------------------------------------------------


def test_caption_image_id_as_lavis():
    assert caption.lavis_image_id("val2014/COCO_val2014_000000391895.jpg") == 391895
    assert caption.lavis_image_id("nocaps/0013ea2087020901.jpg") == "0013ea2087020901"


@pytest.mark.slow
def test_caption_custom_lavis_format(world, tmp_path):
    entries = [dict(image=f"val2014/COCO_val2014_{i + 1:012d}.jpg", caption=captions_of(i)) for i in range(NUM_IMAGES)]
    path = tmp_path / "my_captions.json"
    path.write_text(json.dumps(entries))
    out = tmp_path / "out"
    args = ["--model", str(world / "opt"), "--annotations", str(path), "--image_dir", str(world / "images")]
    results = caption.main([*args, "--batch_size", "4", "--max_new_tokens", "12", "--output_dir", str(out), *FAST])

    assert (results["dataset"], results["protocol"], results["settings"]["format"]) == ("custom", "coco", "lavis")
    assert results["dataset_file"] == "my_captions.json" and results["benchmark"] is None
    assert results["settings"]["num_images"] == NUM_IMAGES and results["settings"]["num_references"] == 30
    predictions = read(out / "predictions.json")
    assert [p["image_id"] for p in predictions] == list(range(1, NUM_IMAGES + 1))
    overall = results["metrics"]["overall"]
    assert {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE", "CIDEr_x100"} <= set(overall)
    assert overall["METEOR"] is not None  # METEOR is on by default
    references = [captions_of(i) for i in range(NUM_IMAGES)]
    recomputed = coco_caption_scores([p["caption"] for p in predictions], references, spice=False, meteor=False)
    for key in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert overall[key] == pytest.approx(recomputed[key])
    markdown = (out / "results.md").read_text()
    row = our_row(markdown, "opt")
    keys = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
    assert row == [caption.fmt(overall[f"{key}_x100"]) for key in keys]
    assert "custom data (my_captions.json)" in markdown and not any(name in markdown for name in BENCHMARK_NAMES)

    # The caption is the continuation of the prompt, without it: what the model generates for the image alone.
    model = blip2_hf.Blip2ForConditionalGeneration.from_pretrained(world / "opt").eval()
    processor = blip2_hf.Blip2Processor.from_pretrained(world / "opt")
    inputs = processor(images=load_image(predictions[0]["image"]), text="a photo of", return_tensors="pt")
    ids = model.generate(**inputs, num_beams=5, max_new_tokens=12, min_new_tokens=8)
    expected = processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    assert predictions[0]["caption"] == expected.strip()


@pytest.mark.slow
def test_caption_nocaps_per_domain(world, tmp_path, monkeypatch):
    domains = ["in-domain", "near-domain", "out-domain"]
    ground_truth = dict(
        images=[
            dict(id=10 + i, file_name=f"COCO_val2014_{i + 1:012d}.jpg", domain=domains[i % 3])
            for i in range(NUM_IMAGES)
        ],
        annotations=[
            dict(image_id=10 + i, caption=text, id=100 * i + j)
            for i in range(NUM_IMAGES)
            for j, text in enumerate(captions_of(i))
        ],
    )
    path = tmp_path / "nocaps_val_4500_captions.json"
    path.write_text(json.dumps(ground_truth))
    official_size(monkeypatch, "caption", "nocaps", path.name, NUM_IMAGES)
    out = tmp_path / "out"
    args = ["--model", str(world / "t5"), "--annotations", str(path), "--image_dir", str(world / "images" / "val2014")]
    args += ["--benchmark", "nocaps"]
    results = caption.main(
        [*args, "--prompt", "", "--max_new_tokens", "10", "--no-meteor", "--output_dir", str(out), *FAST]
    )

    assert (results["dataset"], results["benchmark"], results["settings"]["format"]) == ("nocaps", "nocaps", "coco")
    assert results["settings"]["num_images_per_domain"] == dict.fromkeys(domains, 2)
    metrics = results["metrics"]
    assert set(metrics) == {"overall", *domains}
    assert {metrics[part]["num_images"] for part in domains} == {2} and metrics["overall"]["num_images"] == 6
    predictions = read(out / "predictions.json")
    for domain in domains:  # each domain scored as its own corpus
        indices = [i for i in range(NUM_IMAGES) if domains[i % 3] == domain]
        recomputed = coco_caption_scores(
            [predictions[i]["caption"] for i in indices], [captions_of(i) for i in indices], spice=False, meteor=False
        )
        assert metrics[domain]["CIDEr"] == pytest.approx(recomputed["CIDEr"])
    row = our_row((out / "results.md").read_text(), "t5")
    cider = [f"{metrics[part]['CIDEr_x100']:.1f}" for part in (*domains, "overall")]
    assert row[0:8:2] == cider and row[8:] == ["-", "-"]
    assert row[1:8:2] == [caption.fmt(metrics[part]["SPICE_x100"]) for part in (*domains, "overall")]  # or "-"


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------------------------------


def flickr_entries() -> list[dict]:
    return [dict(image=f"val2014/COCO_val2014_{i + 1:012d}.jpg", caption=captions_of(i)) for i in range(NUM_IMAGES)]


def test_retrieval_lavis_format_from_a_stage1_folder(world, tmp_path, monkeypatch):
    path = tmp_path / "flickr30k_test.json"
    path.write_text(json.dumps(flickr_entries()))
    official_size(monkeypatch, "retrieval", "flickr30k", path.name, NUM_IMAGES)
    out = tmp_path / "out"
    args = ["--model", str(world / "stage1"), "--annotations", str(path), "--image_dir", str(world / "images")]
    args += ["--benchmark", "flickr30k"]
    results = retrieval.main(
        [*args, "--batch_size", "4", "--k", "3", "--save_scores", "--output_dir", str(out), *FAST]
    )

    assert (results["dataset"], results["benchmark"], results["settings"]["format"]) == (
        "flickr30k",
        "flickr30k",
        "lavis",
    )
    assert results["settings"]["num_images"] == NUM_IMAGES and results["settings"]["num_texts"] == 30
    metrics = results["metrics"]
    assert set(metrics) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}
    assert all(0 <= value <= 100 for value in metrics.values())
    predictions = read(out / "predictions.json")
    assert predictions["img2txt"][1] == [5, 6, 7, 8, 9] and predictions["txt2img"][5:10] == [1] * 5
    assert predictions["texts"][:5] == captions_of(0)
    assert len(predictions["i2t_top"]) == NUM_IMAGES and len(predictions["t2i_top"]) == 30
    scores = torch.load(out / "scores.pt")
    # k = 3: each image's 3 best texts and each text's 3 best images are re-ranked, the rest are -100
    assert ((scores["score_i2t"] > -100).sum(1) == 3).all() and ((scores["score_t2i"] > -100).sum(1) == 3).all()
    recomputed = retrieval_recall(
        scores["score_i2t"], scores["score_t2i"], predictions["img2txt"], predictions["txt2img"]
    )
    assert recomputed == metrics
    row = our_row((out / "results.md").read_text(), "stage1")
    keys = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"]
    assert row == [f"{metrics[key]:.1f}" for key in keys] + ["-"] * 6


def test_retrieval_karpathy_format_test_split(world, tmp_path):
    images = [
        dict(
            filepath="val2014",
            filename=f"COCO_val2014_{i + 1:012d}.jpg",
            split="test" if i < 4 else "train",
            sentences=[dict(raw=text) for text in captions_of(i)],
        )
        for i in range(NUM_IMAGES)
    ]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(dict(dataset="coco", images=images)))
    out = tmp_path / "out"
    args = ["--model", str(world / "stage1"), "--annotations", str(path), "--image_dir", str(world / "images")]
    results = retrieval.main([*args, "--limit", "3", "--output_dir", str(out), *FAST])

    # the file says "coco", but it is not COCO's test split (nor all of it): custom data
    assert (results["dataset"], results["protocol"], results["settings"]["format"]) == ("custom", "coco", "karpathy")
    assert results["settings"]["num_images"] == 3 and results["settings"]["num_texts"] == 15
    markdown = (out / "results.md").read_text()
    keys = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"]
    assert our_row(markdown, "stage1") == [f"{results['metrics'][key]:.1f}" for key in keys]
    assert "custom data (dataset.json)" in markdown and not any(name in markdown for name in BENCHMARK_NAMES)


def test_sharded_itm_rerank_matches_the_library(world):
    """The script's re-ranking (ITM on the candidate pairs of an image slice) gives `itm_rerank`'s matrices."""
    args = retrieval.parse_args(
        ["--model", str(world / "stage1"), "--annotations", "unused", "--k", "4", "--itm_batch_size", "5", *FAST]
    )
    accelerator = Accelerator()
    model = blip2_hf.Blip2ForImageTextRetrieval.from_pretrained(world / "stage1").eval()
    processor = blip2_hf.Blip2Processor.from_pretrained(world / "stage1")
    paths = [str(world / "images" / "val2014" / f"COCO_val2014_{i + 1:012d}.jpg") for i in range(NUM_IMAGES)]
    texts = [text.lower() for i in range(NUM_IMAGES) for text in captions_of(i)[:2]]
    images, text_index = retrieval.encode(model, processor, processor.qformer_tokenizer, paths, texts, args, False)
    itc = itc_similarity(images.image_feats, text_index.text_feats)
    ours = retrieval.rerank(model, accelerator, images, 0, text_index, itc, args)
    expected = itm_rerank(model, images, text_index, itc, k=4, progress=False)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------------------------------


def run_script(script: str, args: list[str], processes: int, cwd: Path) -> None:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    if processes == 1:
        command = [sys.executable, str(EVALUATION / script)]
    else:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
        ]
        command += [str(EVALUATION / script)]
    proc = subprocess.run(command + args, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
def test_vqa_two_processes_match_one(world, tmp_path):
    """7 questions over the test images, batches of about 2 questions of whole images: two processes split the
    images between them (each image's questions stay together) and give the one process's answers, in file order."""
    questions = write_official_vqa(tmp_path, 7)
    args = ["--model", str(world / "t5"), "--questions", str(questions), "--image_dir", str(world / "images")]
    args += ["--batch_size", "2", *FAST]
    run_script("vqa.py", [*args, "--output_dir", "one"], 1, tmp_path)
    run_script("vqa.py", [*args, "--output_dir", "two"], 2, tmp_path)
    one, two = read(tmp_path / "one" / "predictions.json"), read(tmp_path / "two" / "predictions.json")
    assert len(one) == 7 and one == two
    assert len({p["answer"] for p in one}) > 1  # the tiny T5 answers differently per question
    results = read(tmp_path / "two" / "results.json")
    assert results["settings"]["num_processes"] == 2 and results["settings"]["num_predictions"] == 7
    assert (tmp_path / "two" / "results.md").read_text() == (tmp_path / "one" / "results.md").read_text()


@pytest.mark.slow
def test_retrieval_two_processes_match_one(world, tmp_path):
    """5 images (3 + 2 per process) and 25 texts: sharded encoding and ITM give the single process's scores."""
    path = tmp_path / "flickr30k_test.json"
    path.write_text(json.dumps(flickr_entries()))
    args = ["--model", str(world / "stage1"), "--annotations", str(path), "--image_dir", str(world / "images")]
    args += ["--limit", "5", "--k", "3", "--batch_size", "4", "--save_scores", *FAST]
    run_script("retrieval.py", [*args, "--output_dir", "one"], 1, tmp_path)
    run_script("retrieval.py", [*args, "--output_dir", "two"], 2, tmp_path)
    one, two = torch.load(tmp_path / "one" / "scores.pt"), torch.load(tmp_path / "two" / "scores.pt")
    for key in ("score_i2t", "score_t2i"):
        torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=0)
    assert read(tmp_path / "one" / "results.json")["metrics"] == read(tmp_path / "two" / "results.json")["metrics"]
    assert read(tmp_path / "two" / "results.json")["settings"]["num_processes"] == 2
