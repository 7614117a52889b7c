"""`blip2-hf demo`: the synthetic world is what its captions and answers say, the language model's corpus never asks
what its context does not tell, and the quick demo runs end to end into loadable checkpoints, results, plots and a
report that the `caption` / `ask` / `retrieve` commands then use."""

from __future__ import annotations

import dataclasses
import json
import random
import re

import numpy as np
import pytest
import torch

from blip2_hf import cli
from blip2_hf.demo.pretrain import (
    BACKGROUND,
    TokenTagger,
    length_grouped_batches,
    patch_groups,
    scene_documents,
    token_tags,
)
from blip2_hf.demo.probe import attribute_labels, linear_probe
from blip2_hf.demo.world import (
    COLORS,
    COUNT_WORDS,
    SHAPES,
    caption_content_accuracy,
    make_world,
    random_scene,
    write_split,
)


def _color_pixels(image, color, tolerance=40) -> int:
    pixels = np.asarray(image, dtype=np.int16)
    return int((np.abs(pixels - np.array(color)).max(-1) < tolerance).sum())


def test_scenes_are_what_their_captions_and_answers_say():
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng)
        image = scene.draw()
        assert image.size == (64, 64) and image.mode == "RGB"
        shapes = {group.shape for group in scene.groups}
        assert len(shapes) == len(scene.groups) and len({group.color for group in scene.groups}) == len(scene.groups)
        for group in scene.groups:
            # every group's color is in the pixels (a small object covers > 40 pixels at 64 x 64)
            assert _color_pixels(image, COLORS[group.color]) > 40 * group.count * 0.6
            for caption in scene.captions():
                assert group.color in caption.split()
                assert re.search(rf"\b{group.shape}s?\b", caption)
        for other in set(COLORS) - {group.color for group in scene.groups}:
            assert _color_pixels(image, COLORS[other], tolerance=25) < 10, other
        answers = {qa["question"]: qa["answer"] for qa in scene.questions()}
        for group in scene.groups:
            plural = group.count > 1
            the = f"are the {group.shape}s" if plural else f"is the {group.shape}"
            assert answers[f"what color {the}?"] == group.color
            assert answers[f"what size {the}?"] == group.size
            assert answers[f"how many {group.shape}s are there?"] == COUNT_WORDS[group.count]
            assert answers[f"which shape is {group.color}?"] == group.shape
            if group.side is not None:
                assert answers[f"where {the}?"] == group.side
                # the group really stands in that half
                half = np.asarray(image, dtype=np.int16)[:, :32] if group.side == "left" else np.asarray(image)[:, 32:]
                assert _color_pixels(half, COLORS[group.color]) > 30
        for shape in SHAPES:
            assert answers[f"is there a {shape}?"] == ("yes" if shape in shapes else "no")


def test_group_mask_is_where_each_group_is_drawn():
    rng = random.Random(1)
    for _ in range(100):
        scene = random_scene(rng)
        image, mask = np.asarray(scene.draw(), dtype=np.int16), scene.group_mask()
        assert mask.shape == (64, 64) and set(np.unique(mask)) == {-1, *range(len(scene.groups))}
        for index, group in enumerate(scene.groups):
            # the group's pixels carry its color (up to the sensor noise of +-12), and no other pixel does
            inside = np.abs(image[mask == index] - np.array(COLORS[group.color])).max(-1)
            assert (inside <= 12).mean() > 0.97, group
            assert _color_pixels(image[mask != index], COLORS[group.color], tolerance=13) <= 3
            if group.side is not None:
                columns = np.nonzero((mask == index).any(0))[0]
                assert (columns < 32).all() if group.side == "left" else (columns >= 32).all()


def test_patch_targets_name_each_token_s_own_group():
    mask = np.full((64, 64), -1)
    mask[0:16, 0:16] = 0  # patch 0: all group 0
    mask[0:16, 16:20] = 1  # patch 1: 64 pixels of group 1
    mask[16:17, 0:10] = 1  # patch 4: a sliver (10 pixels): no target
    mask[16:32, 16:32] = 0
    mask[16:32, 16:24] = 1  # patch 5: 128 pixels each: the first group of the tie
    patches = patch_groups(mask, 16)
    assert patches.shape == (16,)
    assert patches[:6].tolist() == [0, 1, BACKGROUND, BACKGROUND, -100, 0]
    assert (patches[6:] == BACKGROUND).all()
    groups = [
        {"shape": "circle", "color": "red", "size": "large", "count": 2, "side": "left"},
        {"shape": "triangle", "color": "white", "size": "small", "count": 1, "side": None},
    ]
    tags = token_tags(groups, patches)
    assert tags[0].tolist() == [0, 0, 1, 1, 0]  # red, circle, large, two, left
    assert tags[1].tolist() == [5, 2, 0, 0, 2]  # white, triangle, small, one, no side
    assert tags[2].tolist() == [len(COLORS), -100, -100, -100, -100]  # background: color "nothing" only
    assert tags[4].tolist() == [-100] * 5
    # the token loss learns from exactly the targeted tokens: a perfect head on those gives ~0, the rest is ignored
    tagger = TokenTagger(8)
    tokens = torch.randn(1, 16, 8, requires_grad=True)
    loss = tagger.loss(tokens, tags[None])
    loss.backward()
    assert torch.isfinite(loss) and tokens.grad[0, 4].abs().sum() == 0 and tokens.grad[0, 0].abs().sum() > 0


def test_caption_content_accuracy_reads_what_a_caption_claims():
    rng = random.Random(1)
    scenes = [random_scene(rng) for _ in range(100)]
    groups = [[dataclasses.asdict(group) for group in scene.groups] for scene in scenes]
    # every reference caption, in every style, says everything right
    for style in range(6):
        captions = [scene.captions()[style % len(scene.captions())] for scene in scenes]
        scores = caption_content_accuracy(captions, groups)
        assert all(value == 100.0 for name, value in scores.items() if name != "size" or style % 3 != 2), (
            style,
            scores,
        )
    truth = [
        {"shape": "circle", "color": "red", "size": "large", "count": 2, "side": "left"},
        {"shape": "triangle", "color": "blue", "size": "small", "count": 1, "side": "right"},
    ]
    # right: red's count and side, blue's count; wrong: blue's shape, red's size, blue's side (none said)
    scores = caption_content_accuracy(["there are two small red circles on the left and a blue square"], [truth])
    assert scores == {"groups": 100.0, "color": 100.0, "shape": 50.0, "count": 100.0, "size": 0.0, "side": 50.0}
    # one group of two named; the other group's attributes are not scored; no size stated at all
    scores = caption_content_accuracy(["a green circle and a blue triangle on the right"], [truth])
    assert scores["groups"] == 100.0 and scores["color"] == 50.0 and scores["shape"] == 100.0
    assert scores["side"] == 100.0 and np.isnan(scores["size"])
    assert caption_content_accuracy(["three red squares"], [truth])["groups"] == 0.0
    assert caption_content_accuracy(["nothing"], [truth]) == pytest.approx(
        {"groups": 0.0, "color": 0.0, "shape": np.nan, "count": np.nan, "size": np.nan, "side": np.nan}, nan_ok=True
    )
    with pytest.raises(ValueError):
        caption_content_accuracy(["a red circle"], [truth, truth])


def test_world_is_deterministic_and_held_out_scenes_are_distinct(tmp_path):
    first, second = make_world(50, 20, 30, seed=3), make_world(50, 20, 30, seed=3)
    assert [s.key() for s in first["train"]] == [s.key() for s in second["train"]]
    assert np.array_equal(np.asarray(first["test"][0].draw()), np.asarray(second["test"][0].draw()))
    assert [s.key() for s in make_world(50, 20, 30, seed=4)["train"]] != [s.key() for s in first["train"]]
    for split in ("validation", "test"):
        keys = [scene.key() for scene in first[split]]
        assert len(keys) == len(set(keys))
    records = write_split(first["test"], tmp_path / "test")
    assert json.loads((tmp_path / "test" / "annotations.json").read_text()) == records
    assert (tmp_path / "test" / records[5]["image"]).is_file()


def test_language_model_corpus_only_asks_what_its_context_tells():
    scenes = make_world(100, 1, 1, seed=0)["train"]
    documents = scene_documents([s.captions() for s in scenes], [s.questions() for s in scenes], per_scene=3)
    assert len(documents) == 300
    for document in documents:
        lines = document.rstrip("\n").split("\n")
        context = [line for line in lines if not line.startswith("Question: ")]
        questions = [line for line in lines if line.startswith("Question: ")]
        assert lines[: len(context)] == context and len(context) in (1, 2) and 2 <= len(questions) <= 4
        words = set(" ".join(context).split())
        assert words & {"small", "large"}  # captions that name the sizes
        for line in questions:
            question, answer = line.removeprefix("Question: ").split(" Short answer: ")
            if question.startswith(("what color", "what size", "which shape", "where")):
                assert answer in words or answer + "s" in words, (context, question, answer)


def test_language_model_corpus_asks_the_always_asked_types_in_every_document():
    positions = []
    for index, scene in enumerate(make_world(60, 1, 1, seed=0)["train"]):
        questions = scene.questions()
        documents = scene_documents(
            [scene.captions()], [questions], per_scene=2, seed=index, questions_per_document=(6, 8),
            always_asked=("shape",),
        )  # fmt: skip
        shape_lines = {f"Question: {qa['question']} Short answer: {qa['answer']}" for qa in questions
                       if qa["type"] == "shape"}  # fmt: skip
        for document in documents:
            asked = [line for line in document.rstrip("\n").split("\n") if line.startswith("Question: ")]
            assert shape_lines <= set(asked) and len(set(asked)) == len(asked)
            assert min(6, len(questions)) <= len(asked) <= 8
            positions += [asked.index(line) for line in shape_lines]
    assert len(set(positions)) > 3  # shuffled among the other questions, not always first


def test_length_grouped_batches_pad_less_and_draw_every_document():
    lengths = torch.randint(10, 90, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    batches = length_grouped_batches(lengths, 32, torch.Generator().manual_seed(1))
    drawn = [next(batches) for _ in range(400)]
    assert all(len(batch) == 32 and all(0 <= i < 1000 for i in batch) for batch in drawn)
    # 12,800 draws with replacement reach nearly every document
    assert len({i for batch in drawn for i in batch}) > 990
    padded = sum(32 * max(lengths[i] for i in batch) for batch in drawn)
    real = sum(lengths[i] for batch in drawn for i in batch)
    assert padded < 1.1 * real  # random batches of 32 pad to ~1.8x here
    # the batches of one group come in random order, not shortest first
    group_maxima = [max(lengths[i] for i in batch) for batch in drawn[:8]]
    assert group_maxima != sorted(group_maxima)


def test_attribute_labels_follow_the_scene():
    scene = [
        {"shape": "circle", "color": "red", "size": "small", "count": 2, "side": "left"},
        {"shape": "square", "color": "blue", "size": "large", "count": 1, "side": "right"},
    ]
    names, labels = attribute_labels([scene])
    on = {name for name, value in zip(names, labels[0].tolist()) if value == 1}
    assert on == {
        "a circle", "a circle on the left", "two or more circles", "a square", "a large square",
        "something red", "something blue",
    }  # fmt: skip


def test_linear_probe_reads_an_encoded_attribute_and_not_an_absent_one():
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(1200, 2, generator=generator) < 0.3).float()
    features = torch.randn(1200, 16, generator=generator)
    features[:, 3] += 4 * labels[:, 0]  # label 0 is in the features, label 1 is not
    accuracy, majority = linear_probe(features[:800], labels[:800], features[800:], labels[800:])
    assert accuracy[0] > 0.95
    assert abs(majority[1].item() - max(labels[800:, 1].mean().item(), 1 - labels[800:, 1].mean().item())) < 1e-6
    assert accuracy[1] <= majority[1] + 0.03  # no better than always answering the frequent value


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, monkeypatch, capsys):
    output = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--seeds", "1", "--output", str(output)]) == 0
    results = json.loads((output / "results.json").read_text())
    for arm in ("stage1+2", "stage2_only"):
        for metric in ("VQA", "CIDEr", "BLEU-4", "caption_exact_match"):
            mean, std = results["summary"][arm][metric]
            assert 0 <= mean <= 1000 and std == 0.0
    assert 0 <= results["summary"]["stage1+2"]["text_R@1"][0] <= 100
    assert 0 <= results["summary"]["stage1_without_itg"]["image_R@1"][0] <= 100
    # the quick demo still sees: its captions name the image's colors far above chance (a random color names a
    # group's color 1 time in 6); 52% measured at its 150 stage-2 steps, 98% at the default demo's 800
    assert results["summary"]["stage1+2"]["caption_color"][0] >= 35
    # every loss the demo trains with falls
    curves = results["curves"][0]
    for key in ("loss_itc", "loss_itm", "loss_itg"):
        values = [entry[key] for entry in curves["stage1"] if key in entry]
        assert values[-1] < values[0], key
    assert not any("loss_itg" in entry for entry in curves["stage1_without_itg"])  # the Table 6 ablation
    # Figure 5 along training: zero-shot VQA on validation images at the settings' points, for both arms
    for arm in ("stage1+2", "stage2_only"):
        curve = results["per_seed"][0][arm]["VQA_curve"]
        assert [point["step"] for point in curve] == [75, 150], arm
        assert all(0 <= point["VQA"] <= 100 for point in curve)
    itg_free = json.loads((output / "runs" / "seed0" / "stage1_without_itg" / "config.json").read_text())
    assert itg_free["pretraining_objectives"] == ["itc", "itm"]
    for arm in ("stage1+2", "stage2_only"):
        values = [entry["loss"] for entry in curves[arm] if "loss" in entry]
        assert values[-1] < values[0], arm
    # the Q-Former's dropout per stage, as the settings say (none in stage 1, LAVIS's 0.1 in stage 2)
    for run, dropout in (("stage1", 0.0), ("stage2", 0.1), ("stage2_without_stage1", 0.1)):
        qformer = json.loads((output / "runs" / "seed0" / run / "config.json").read_text())["qformer_config"]
        assert qformer["hidden_dropout_prob"] == qformer["attention_probs_dropout_prob"] == dropout, run
    probe = results["towers"]["probe"]
    assert len(probe) == 18 and all(0 <= m["accuracy"] <= 100 and 50 <= m["majority"] <= 100 for m in probe.values())
    report = (output / "report.md").read_text()
    assert report.startswith("# blip2-hf demo") and report.index("## Results") < report.index("## Examples")
    assert report.index("## Examples") < report.index("## The paper's ablations")
    assert "## The frozen towers" in report and "| a circle on the left |" in report
    assert "| stage-2 step | 75 | 150 |" in report
    assert json.loads((output / ".blip2-hf-demo.json").read_text())["status"] == "complete"
    for plot in re.findall(r"\]\((plots/[^)]+)\)", report):
        assert (output / plot).is_file(), plot
    assert {"losses.png", "examples.png", "cross_attention.png", "results.png"} <= {
        path.name for path in (output / "plots").iterdir()
    }

    # the commands use the demo's checkpoints when no --model is given
    monkeypatch.setenv("BLIP2_HF_DEMO_DIR", str(output))
    images = sorted((output / "data" / "test" / "images").iterdir())[:2]
    capsys.readouterr()
    assert cli.main(["caption", *map(str, images)]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == list(map(str, images))
    assert cli.main(["ask", str(images[0]), "what color is the circle?"]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main(["retrieve", "--images", str(images[0].parent), "--text", "a red circle", "--top-k", "3"]) == 0
    assert len(capsys.readouterr().out.strip().split("\n")) == 3


def test_vqa_curve_scores_at_its_points_and_the_last_step_and_leaves_the_model_training(monkeypatch):
    from types import SimpleNamespace

    from blip2_hf.demo import run

    scored = []

    def fake_vqa(model, processor, records, images):
        scored.append(model.eval())  # as `generate` does
        return [], [], {"accuracy": 10.0 * len(scored)}

    monkeypatch.setattr(run, "zero_shot_vqa", fake_vqa)
    model = torch.nn.Linear(2, 2).train()
    curve = run.VQACurve(processor=None, records=[], images=[], steps=10, points=3)  # every 3 steps, and step 10
    for step in range(1, 11):
        curve.on_step_end(None, SimpleNamespace(global_step=step, max_steps=10), None, model=model)
        assert model.training
    assert curve.curve == [{"step": 3, "VQA": 10.0}, {"step": 6, "VQA": 20.0}, {"step": 9, "VQA": 30.0},
                           {"step": 10, "VQA": 40.0}]  # fmt: skip


def test_vqa_curve_table_gives_each_arm_mean_and_std_per_step():
    from blip2_hf.demo.report import vqa_curve_table

    per_seed = [
        {arm: {"VQA_curve": [{"step": 5, "VQA": a}, {"step": 10, "VQA": b}]} for arm, (a, b) in runs.items()}
        for runs in ({"stage1+2": (40, 60), "stage2_only": (50, 10)}, {"stage1+2": (50, 80), "stage2_only": (50, 30)})
    ]
    table = vqa_curve_table(per_seed).split("\n")
    assert table[0] == "| stage-2 step | 5 | 10 |"
    assert table[2].endswith("| 45.0 ± 7.1 | 70.0 ± 14.1 |") and table[3].endswith("| 50.0 ± 0.0 | 20.0 ± 14.1 |")
    assert vqa_curve_table([{"stage1+2": {}, "stage2_only": {}}]) == ""  # results from before the curve


def test_demo_output_folder_is_checked_before_anything_is_deleted(tmp_path, capsys):
    from blip2_hf.demo.run import DEMO_MARKER, prepare_output

    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("keep me")
    with pytest.raises(ValueError, match="not a blip2-hf demo folder"):
        prepare_output(foreign)
    assert (foreign / "chapter1.tex").read_text() == "keep me"
    assert cli.main(["demo", "--quick", "--output", str(foreign)]) == 1
    assert "refusing" in capsys.readouterr().err and (foreign / "chapter1.tex").exists()

    interrupted = tmp_path / "demo"
    prepare_output(interrupted)  # a run starts ... and is killed: the marker says "running"
    (interrupted / "runs").mkdir()
    prepare_output(interrupted)
    assert "interrupted demo run" in capsys.readouterr().out and not (interrupted / "runs").exists()
    (interrupted / DEMO_MARKER).write_text(json.dumps({"status": "complete", "finished": "then"}))
    prepare_output(interrupted)
    assert "complete demo run" in capsys.readouterr().out
    (interrupted / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        prepare_output(interrupted)
    assert (interrupted / "notes.txt").exists()
