"""Small input errors of the training entry points: `--train_data x.json` given once is one source (not a list of
characters), captions that are empty after cleaning are skipped with a warning naming the file and entry, and JSON
that does not parse is an error naming the file, line and column."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import sys
import tarfile
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from blip2_hf.data import load_caption_json, load_image_folder, load_training_data, load_webdataset
from blip2_hf.testing_utils import draw_images
from blip2_hf.training_scripts import parse_args_with_config, training_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]


def training_script(name: str):
    spec = importlib.util.spec_from_file_location(f"training_{name}_input_errors", REPO_ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=["stage1", "stage2"])
def script_parser(request):
    module = training_script(request.param)
    return HfArgumentParser((module.ModelArguments, module.DataArguments, module.Blip2TrainingArguments))


def data_arguments(parser, argv):
    return next(args for args in parse_args_with_config(parser, argv) if hasattr(args, "train_data"))


# ------------------------------------------------------------------------------------------ --train_data given once


def test_one_train_data_source_is_a_one_item_list(script_parser, tmp_path):
    out = ["--output_dir", str(tmp_path / "out")]
    data = data_arguments(script_parser, ["--train_data", "train.json", "--train_data_weights", "2", *out])
    assert data.train_data == ["train.json"]  # was "train.json", then read as sources 't', 'r', 'a', ...
    assert data.train_data_weights == [2.0]
    assert data_arguments(script_parser, ["--train_data=train.json", *out]).train_data == ["train.json"]
    several = data_arguments(script_parser, ["--train_data", "a.json", "b.json", "--train_data_weights", "1", "3", *out])
    assert (several.train_data, several.train_data_weights) == (["a.json", "b.json"], [1.0, 3.0])
    # the same from a config file
    config = tmp_path / "config.yaml"
    config.write_text(f"train_data: train.json\ntrain_data_weights: 1e-1\noutput_dir: {tmp_path / 'out'}\n")
    from_file = data_arguments(script_parser, ["--config", str(config)])
    assert (from_file.train_data, from_file.train_data_weights) == (["train.json"], [0.1])


def test_yaml_no_is_the_strategy_no(script_parser, tmp_path):
    """YAML 1.1 reads a bare `no` as False: `--save_strategy no` (and `save_strategy: no` in a config) is the strategy
    "no", while a bool field keeps `false` / `no` as False."""
    config = tmp_path / "config.yaml"
    config.write_text(f"save_strategy: no\noutput_dir: {tmp_path / 'out'}\n")
    for argv in (["--config", str(config)], ["--save_strategy", "no", "--output_dir", str(tmp_path / "out")]):
        training_args = parse_args_with_config(script_parser, [*argv, "--augment", "no"])
        assert training_args[-1].save_strategy == "no"
        assert data_arguments(script_parser, [*argv, "--augment", "no"]).augment is False


def test_one_train_data_source_loads(tmp_path):
    """End to end, as the scripts call it: the parsed one-item list is the one JSON source."""
    draw_images(1)[0].save(tmp_path / "a.png")
    (tmp_path / "train.json").write_text(json.dumps([{"image": "a.png", "caption": "a red circle"}]))
    data = data_arguments(HfArgumentParser((training_script("stage2").DataArguments,)),
                          ["--train_data", str(tmp_path / "train.json")])  # fmt: skip
    dataset, _ = training_dataset(None, data.train_data, augment=False)  # the model is only read for augmentation
    assert dataset["caption"] == ["a red circle"]


# ------------------------------------------------------------------------------------------ empty captions


def test_empty_captions_in_a_json_are_skipped_and_named(tmp_path, caplog):
    path = tmp_path / "captions.json"
    entries = [
        {"image": "a.jpg", "caption": ""},
        {"image": "b.jpg", "caption": ["a dog", " ... "]},
        {"image": "c.jpg", "caption": "!!"},
        {"image": "d.jpg", "caption": "A cat."},
    ]
    path.write_text(json.dumps(entries))
    with caplog.at_level(logging.WARNING, logger="blip2_hf.data"):
        dataset = load_caption_json(path)
    assert dataset["caption"] == ["a dog", "A cat."]
    assert [Path(image).name for image in dataset["image"]] == ["b.jpg", "d.jpg"]
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert f"Caption JSON {str(path)!r}: skipped 3 caption(s) that are empty after cleaning" in warning
    assert "entry 0, entry 1[1], entry 2" in warning


def test_a_json_of_only_empty_captions_is_an_error(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps([{"image": "a.jpg", "caption": "  "}, {"image": "b.jpg", "caption": ["."]}]))
    with pytest.raises(ValueError, match=r"empty\.json' has no caption left to train on"):
        load_caption_json(path)


def test_empty_captions_in_an_image_folder_are_skipped_and_named(tmp_path, caplog):
    for name in ("a.png", "b.png"):
        draw_images(1)[0].save(tmp_path / name)
    rows = [{"file_name": "a.png", "caption": "a circle"}, {"file_name": "b.png", "caption": "()"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level(logging.WARNING, logger="blip2_hf.data"):
        dataset = load_image_folder(tmp_path, cache_dir=str(tmp_path / "cache"))
    assert dataset["caption"] == ["a circle"]
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "skipped 1 caption(s) that are empty after cleaning: b.png" in warning


def test_empty_captions_in_a_webdataset_are_skipped_and_named(tmp_path, caplog):
    image = io.BytesIO()
    draw_images(1)[0].save(image, format="PNG")
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for key, caption in (("000", b"a circle"), ("001", b" ... ")):
            for extension, payload in (("png", image.getvalue()), ("txt", caption)):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with caplog.at_level(logging.WARNING, logger="blip2_hf.data"):
        captions = [row["caption"] for row in load_webdataset(str(shard))]
    assert captions == ["a circle"]
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "Skipped 1 sample(s) whose caption is empty after cleaning" in warning and "001" in warning


# ------------------------------------------------------------------------------------------ malformed JSON


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[{"image": "a.jpg", "caption": "x"},,]', "line 1, column 37"),
        ('[\n  {"image": "a.jpg",\n   "caption": "x"\n', "line 4, column 1"),
        ("", "line 1, column 1"),
    ],
)
def test_malformed_json_names_the_file_line_and_column(tmp_path, text, where):
    path = tmp_path / "broken.json"
    path.write_text(text)
    for load in (load_caption_json, lambda p: load_training_data([str(p)])):
        with pytest.raises(ValueError, match=rf"Caption JSON .*broken\.json: not valid JSON \(.* at {where}\)\."):
            load(path)


def test_json_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"image": "a.jpg", "caption": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.json: not UTF-8 text"):
        load_caption_json(path)
