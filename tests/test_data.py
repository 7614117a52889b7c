"""blip2_hf.data: sources (caption JSON, image folder, tar shards, mixing), pre_caption, augmentation, image loading,
bad-sample accounting and the stage-1 / stage-2 collators. Everything is built in tmp dirs, offline."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from utils import draw_images, make_bert_tokenizer, make_opt_tokenizer, make_t5_tokenizer

from blip2_hf.data import (
    BadImageTracker,
    RandomResizedCropFlip,
    Stage1Collator,
    Stage2Collator,
    load_caption_json,
    load_image,
    load_image_folder,
    load_training_data,
    load_webdataset,
    pre_caption,
    share_naming_sides,
)
from blip2_hf.processing_blip2 import Blip2Processor
from blip2_hf.training_scripts import training_dataset

Q = 4
SIZE = 24
CAPTIONS = ["A cat sitting on a red sofa.", "a black dog running in the green grass", "Two cats!"]


# ------------------------------------------------------------------------------------------------------------ helpers


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_images(folder, n: int, fmt: str = "JPEG", prefix: str = "img") -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index, image in enumerate(draw_images(n)):
        path = os.path.join(folder, f"{prefix}{index}.{'jpg' if fmt == 'JPEG' else fmt.lower()}")
        image.save(path, format=fmt)
        paths.append(path)
    return paths


def write_json(path, entries) -> str:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(entries, file)
    return str(path)


def write_tar(path, samples: list[dict[str, bytes]]) -> str:
    """`samples`: one dict per sample, `{"__key__": key, extension: payload, ...}`."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for extension, payload in sample.items():
                if extension == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def build_processor(tokenizer=None) -> Blip2Processor:
    return Blip2Processor(
        image_processor=Blip2Processor.default_image_processor(SIZE),
        tokenizer=tokenizer if tokenizer is not None else make_opt_tokenizer(),
        qformer_tokenizer=make_bert_tokenizer(),
        num_query_tokens=Q,
    )


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' Arrow caches and lock files (written even when streaming) out of the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


@pytest.fixture
def rows(tmp_path) -> list[dict]:
    paths = write_images(tmp_path / "images", len(CAPTIONS))
    return [{"image": path, "caption": caption} for path, caption in zip(paths, CAPTIONS)]


# ------------------------------------------------------------------------------------------------------- pre_caption


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("A man (left) riding a horse!!", "a man left riding a horse"),
        ("A cat.\n", "a cat"),  # "." -> " ", then " \n" is a whitespace run -> " ", stripped
        ("  Two  dogs;  playing ~ outside  ", "two dogs playing outside"),
        ('He said: "hello" #1 *wow*', "he said hello 1 wow"),
        ("Keep commas, apostrophes' and question marks?", "keep commas, apostrophes' and question marks?"),
        ("slash/and-dash", "slash/and-dash"),
        ("one\ttab", "one\ttab"),  # a single whitespace character is not a run: LAVIS keeps it
        ("trailing newline\n", "trailing newline"),
        ("...", ""),
    ],
)
def test_pre_caption_examples(raw, clean):
    assert pre_caption(raw) == clean


def test_pre_caption_keeps_the_first_max_words():
    caption = " ".join(f"w{i}" for i in range(60))
    assert pre_caption(caption) == " ".join(f"w{i}" for i in range(50))
    assert pre_caption("A b. C d e", max_words=3) == "a b c"
    assert pre_caption("a b c", max_words=3) == "a b c"


# ----------------------------------------------------------------------------------------------------------- sources


def test_load_caption_json_explodes_lists_and_joins_paths(tmp_path):
    elsewhere = write_images(tmp_path / "elsewhere", 1)[0]
    path = write_json(
        tmp_path / "ann.json",
        [
            {"image": "val2014/a.jpg", "caption": "one caption", "image_id": "coco_1"},
            {"image": "val2014/b.jpg", "caption": ["c1", "c2", "c3"], "image_id": 2},
            {"image": elsewhere, "caption": "absolute path kept"},
        ],
    )
    dataset = load_caption_json(path)
    assert dataset.column_names == ["image", "caption"]
    assert dataset.num_rows == 5
    root = str(tmp_path)
    assert dataset["image"] == [
        os.path.join(root, "val2014/a.jpg"),
        *[os.path.join(root, "val2014/b.jpg")] * 3,
        elsewhere,
    ]
    assert dataset["caption"] == ["one caption", "c1", "c2", "c3", "absolute path kept"]
    assert load_caption_json(path, image_root="/data/coco")["image"][0] == "/data/coco/val2014/a.jpg"


@pytest.mark.parametrize(
    "content, match",
    [
        ({"images": []}, "expected a list"),
        ([{"image": "a.jpg"}], "entry 0 needs the keys"),
        ([{"image": "a.jpg", "caption": "ok"}, {"image": "b.jpg", "caption": 3}], "entry 1 has caption 3"),
        ([{"image": 7, "caption": "x"}], "non-string image"),
    ],
)
def test_load_caption_json_rejects_malformed_files(tmp_path, content, match):
    path = write_json(tmp_path / "bad.json", content)
    with pytest.raises(ValueError, match=match):
        load_caption_json(path)


def test_load_image_folder(tmp_path):
    folder = tmp_path / "folder"
    write_images(folder, 2)
    write_images(folder / "sub", 1, fmt="PNG", prefix="deep")
    with open(folder / "metadata.jsonl", "w") as file:
        file.write(json.dumps({"file_name": "img0.jpg", "caption": "a cat", "image_id": 0}) + "\n")
        file.write(json.dumps({"file_name": "img1.jpg", "caption": "a dog", "image_id": 1}) + "\n")
        file.write(json.dumps({"file_name": "sub/deep0.png", "caption": "a square", "image_id": 2}) + "\n")
    dataset = load_image_folder(folder, cache_dir=str(tmp_path / "cache"))
    assert dataset.column_names == ["image", "caption"]
    rows = sorted(zip(dataset["caption"], dataset["image"]))
    assert [caption for caption, _ in rows] == ["a cat", "a dog", "a square"]
    assert [os.path.relpath(image, folder) for _, image in rows] == ["img0.jpg", "img1.jpg", "sub/deep0.png"]
    assert all(load_image(image).size == (40, 30) for _, image in rows)

    streamed = list(load_image_folder(folder, streaming=True))
    assert sorted(row["caption"] for row in streamed) == ["a cat", "a dog", "a square"]
    assert all(set(row) == {"image", "caption"} and isinstance(row["image"], str) for row in streamed)


def test_load_image_folder_text_column_and_caption_lists(tmp_path):
    folder = tmp_path / "folder"
    write_images(folder, 2)
    with open(folder / "metadata.jsonl", "w") as file:
        file.write(json.dumps({"file_name": "img0.jpg", "text": ["first", "second"]}) + "\n")
        file.write(json.dumps({"file_name": "img1.jpg", "text": ["third"]}) + "\n")
    dataset = load_image_folder(folder, cache_dir=str(tmp_path / "cache"))
    assert dataset.column_names == ["image", "caption"]
    assert sorted(zip(dataset["caption"], map(os.path.basename, dataset["image"]))) == [
        ("first", "img0.jpg"),
        ("second", "img0.jpg"),
        ("third", "img1.jpg"),
    ]


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere")
    write_images(tmp_path / "plain", 1)
    with pytest.raises(FileNotFoundError, match="no metadata.jsonl"):
        load_image_folder(tmp_path / "plain")


def wds_samples(prefix: str, n: int, corrupt: int | None = None) -> list[dict[str, bytes]]:
    """jpg + txt, png + json caption, jpeg + json with an extra key, ... cycling."""
    samples = []
    for index, image in enumerate(draw_images(n, seed=len(prefix))):
        key = f"{prefix}{index:04d}"
        kind = index % 3
        if kind == 0:
            sample = {"jpg": encode(image), "txt": f"{prefix} txt {index}".encode()}
        elif kind == 1:
            sample = {"png": encode(image, "PNG"), "json": json.dumps({"caption": f"{prefix} json {index}"}).encode()}
        else:
            payload = {"caption": f"{prefix} json {index}", "url": "http://x", "width": 40}
            sample = {"jpeg": encode(image), "json": json.dumps(payload).encode(), "cls": b"3"}
        if index == corrupt:
            sample = {"webp": b"definitely not a webp", "txt": f"{prefix} corrupt {index}".encode()}
        samples.append({"__key__": key, **sample})
    return samples


@pytest.mark.parametrize("streaming", [True, False])
def test_load_webdataset(tmp_path, streaming):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "train-000.tar", wds_samples("a", 4))
    write_tar(shards / "train-001.tar", wds_samples("b", 3, corrupt=2))
    dataset = load_webdataset(str(shards / "train-*.tar"), streaming=streaming, cache_dir=str(tmp_path / "cache"))
    rows = list(dataset)
    assert [set(row) for row in rows] == [{"image", "caption"}] * 7
    assert [row["caption"] for row in rows] == [
        "a txt 0",
        "a json 1",
        "a json 2",
        "a txt 3",
        "b txt 0",
        "b json 1",
        "b corrupt 2",
    ]
    assert all(isinstance(row["image"], bytes) for row in rows)  # undecoded
    assert rows[6]["image"] == b"definitely not a webp"
    assert load_image(rows[1]["image"]).size == (40, 30)
    if streaming:
        assert dataset.num_shards == 2  # one per tar: DataLoader workers split by shard


def test_load_webdataset_missing_fields_read_as_none(tmp_path):
    image = encode(draw_images(1)[0])
    path = write_tar(
        tmp_path / "s.tar",
        [
            {"__key__": "k0", "jpg": image, "txt": b"fine"},
            {"__key__": "k1", "txt": b"no image"},
            {"__key__": "k2", "jpg": image, "json": b'{"url": "no caption"}'},
        ],
    )
    rows = list(load_webdataset(path))
    assert [(row["image"] is not None, row["caption"]) for row in rows] == [
        (True, "fine"),
        (False, "no image"),
        (True, None),
    ]


def test_load_webdataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No file matches"):
        load_webdataset(str(tmp_path / "*.tar"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_webdataset([str(tmp_path / "missing.tar")])


def make_sources(tmp_path) -> dict[str, str]:
    """One source of each kind, 3 rows each."""
    paths = write_images(tmp_path / "json_images", 3)
    json_path = write_json(
        tmp_path / "json_images" / "ann.json",
        [{"image": os.path.basename(p), "caption": f"json {i}"} for i, p in enumerate(paths)],
    )
    folder = tmp_path / "folder"
    write_images(folder, 3)
    with open(folder / "metadata.jsonl", "w") as file:
        for index in range(3):
            file.write(json.dumps({"file_name": f"img{index}.jpg", "caption": f"folder {index}"}) + "\n")
    tars = tmp_path / "tars"
    tars.mkdir()
    write_tar(tars / "s-0.tar", wds_samples("t", 2))
    write_tar(tars / "s-1.tar", wds_samples("u", 1))
    return {"json": json_path, "folder": str(folder), "tars": str(tars), "glob": str(tars / "s-*.tar")}


def test_load_training_data_infers_each_source_type(tmp_path):
    sources = make_sources(tmp_path)
    cache = str(tmp_path / "cache")
    json_data = load_training_data([sources["json"]], cache_dir=cache)
    assert json_data.num_rows == 3 and all(load_image(p).size == (40, 30) for p in json_data["image"])
    moved = load_training_data([sources["json"]], image_root="/elsewhere")
    assert moved["image"] == [f"/elsewhere/img{i}.jpg" for i in range(3)]
    assert load_training_data(sources["folder"], cache_dir=cache).num_rows == 3
    for key in ("tars", "glob"):  # a folder of tars, a glob of tars: streamed by default
        streamed = load_training_data([sources[key]], cache_dir=cache)
        assert [row["caption"] for row in streamed] == ["t txt 0", "t json 1", "u txt 0"]
    assert load_training_data([sources["glob"]], streaming=False, cache_dir=cache).num_rows == 3
    single_tar = load_training_data([os.path.join(sources["tars"], "s-1.tar")], cache_dir=cache)
    assert [row["caption"] for row in single_tar] == ["u txt 0"]
    assert [row["caption"] for row in load_training_data([sources["json"]], streaming=True)] == [
        "json 0",
        "json 1",
        "json 2",
    ]


def test_load_training_data_errors_name_the_source(tmp_path):
    sources = make_sources(tmp_path)
    missing = str(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_training_data([sources["json"], missing])
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.tar"):
        load_training_data([str(tmp_path / "nothing-*.tar")])
    odd = tmp_path / "data.csv"
    odd.write_text("x")
    with pytest.raises(ValueError, match="Cannot tell what kind of training data .*data.csv"):
        load_training_data([str(odd)])
    with pytest.raises(ValueError, match="Cannot tell"):
        load_training_data([str(tmp_path / "json_images")])  # a folder of images without metadata
    with pytest.raises(ValueError, match="one weight per source"):
        load_training_data([sources["json"], sources["folder"]], weights=[1.0])
    with pytest.raises(ValueError, match="positive"):
        load_training_data([sources["json"], sources["folder"]], weights=[1.0, 0.0])


def test_mixing_by_weight_draws_mostly_from_the_heavy_source_until_all_are_exhausted(tmp_path):
    heavy = write_json(tmp_path / "heavy.json", [{"image": f"h{i}.jpg", "caption": f"heavy {i}"} for i in range(20)])
    light = write_json(tmp_path / "light.json", [{"image": f"l{i}.jpg", "caption": f"light {i}"} for i in range(20)])
    mixed = load_training_data([heavy, light], weights=[9, 1], seed=0)
    captions = mixed["caption"]
    from_heavy = sum(caption.startswith("heavy") for caption in captions)
    assert from_heavy / len(captions) > 0.8
    # all_exhausted: every row of both sources appears (the heavy one many times over).
    assert {f"light {i}" for i in range(20)} <= set(captions)
    assert {f"heavy {i}" for i in range(20)} <= set(captions)
    assert load_training_data([heavy, light], weights=[9, 1], seed=0)["caption"] == captions  # seeded
    assert load_training_data([heavy, light], weights=[9, 1], seed=1)["caption"] != captions


def test_mixing_paths_with_tar_bytes_streams_image_dicts(tmp_path):
    sources = make_sources(tmp_path)
    mixed = load_training_data([sources["json"], sources["glob"]], weights=[1, 1], seed=0)
    rows = list(mixed)
    captions = [row["caption"] for row in rows]
    assert {"json 0", "json 1", "json 2", "t txt 0", "t json 1", "u txt 0"} <= set(captions)
    for row in rows:
        assert set(row) == {"image", "caption"}
        assert set(row["image"]) == {"path", "bytes"}  # paths and bytes share the Image(decode=False) struct
        assert load_image(row["image"]).size == (40, 30)
    by_caption = {row["caption"]: row["image"] for row in rows}
    assert by_caption["json 0"]["bytes"] is None and by_caption["json 0"]["path"].endswith("img0.jpg")
    assert by_caption["t txt 0"]["bytes"] is not None


# ------------------------------------------------------------------------------------------------------ augmentation


def test_random_resized_crop_flip_output_size_and_reproducibility():
    image = draw_images(1, size=(64, 48))[0]
    transform = RandomResizedCropFlip(SIZE)
    random.seed(3)
    first = [transform(image) for _ in range(5)]
    random.seed(3)
    second = [transform(image) for _ in range(5)]
    assert all(out.size == (SIZE, SIZE) and out.mode == "RGB" for out in first)
    assert [out.tobytes() for out in first] == [out.tobytes() for out in second]
    assert len({out.tobytes() for out in first}) == 5  # the draws differ from call to call
    assert RandomResizedCropFlip((20, 30))(image).size == (30, 20)  # (height, width)


def test_share_naming_sides_counts_whole_words_in_any_caption_of_a_sample():
    captions = ["a dog on the left", ["a cat", "a cat to the RIGHT"], "the leftover cake", "brightness"]
    assert share_naming_sides(captions) == 0.5
    assert share_naming_sides([]) == 0.0


@pytest.mark.parametrize("augment", [True, False])
def test_training_data_warns_when_the_flip_would_make_side_captions_false(tmp_path, caplog, augment):
    from types import SimpleNamespace

    draw_images(1)[0].save(tmp_path / "a.png")
    records = [{"image": "a.png", "caption": f"a red square on the {side}"} for side in ("left", "right")]
    (tmp_path / "train.json").write_text(json.dumps(records + [{"image": "a.png", "caption": "a cat"}]))
    model = SimpleNamespace(config=SimpleNamespace(vision_image_size=(SIZE, SIZE)))  # the size the encoder expects
    with caplog.at_level(logging.WARNING, logger="blip2_hf.training_scripts"):
        _, transform = training_dataset(model, [str(tmp_path / "train.json")], augment=augment)
    assert (transform is not None) == augment
    assert ("67% of the first captions name a side" in caplog.text) == augment, caplog.text
    assert ("--augment false" in caplog.text) == augment


def test_random_resized_crop_respects_scale_and_ratio():
    width, height = 400, 300
    transform = RandomResizedCropFlip(SIZE, scale=(0.5, 1.0))
    random.seed(0)
    boxes = [transform.get_params(width, height) for _ in range(2000)]
    fractions = np.array([h * w / (width * height) for _, _, h, w in boxes])
    ratios = np.array([w / h for _, _, h, w in boxes])
    # Rounding w and h to pixels moves the area by well under 1% at this size.
    assert fractions.min() >= 0.49 and fractions.max() <= 1.0
    assert fractions.min() < 0.52 and fractions.max() > 0.97  # the whole range is drawn
    # Uniform in [0.5, 1] before rejection; large crops with extreme ratios do not fit and are redrawn.
    assert 0.6 < fractions.mean() < 0.75
    assert ratios.min() >= 0.74 and ratios.max() <= 1.35
    assert all(0 <= top <= height - h and 0 <= left <= width - w for top, left, h, w in boxes)
    # The crop is taken at the drawn box and resized with bicubic resampling (then maybe flipped).
    image = draw_images(1, size=(width, height))[0]
    no_flip = RandomResizedCropFlip(SIZE, flip_prob=0.0)
    random.seed(5)
    top, left, h, w = no_flip.get_params(width, height)
    expected = image.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    random.seed(5)
    assert no_flip(image).tobytes() == expected.tobytes()


def test_random_resized_crop_falls_back_to_a_centered_crop():
    # A 100x10 strip: no crop of >= 90% of the area has an aspect ratio within [3/4, 4/3].
    transform = RandomResizedCropFlip(SIZE, scale=(0.9, 1.0))
    random.seed(0)
    assert transform.get_params(100, 10) == (0, 43, 10, 13)  # height 10, width round(10 * 4/3), centered
    assert transform.get_params(10, 100) == (43, 0, 13, 10)  # tall: width 10, height round(10 / (3/4))
    assert RandomResizedCropFlip(SIZE, scale=(1.0, 1.0), ratio=(1.0, 1.0)).get_params(30, 30) == (0, 0, 30, 30)


def test_random_horizontal_flip_happens_about_half_the_time():
    image = draw_images(1, size=(SIZE, SIZE))[0]
    # scale 1 and ratio 1 on a square image: the crop is the whole image, only the flip is random.
    transform = RandomResizedCropFlip(SIZE, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    plain = image.tobytes()
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).tobytes()
    assert plain != flipped
    random.seed(0)
    outputs = [transform(image).tobytes() for _ in range(400)]
    assert set(outputs) == {plain, flipped}
    assert 160 <= outputs.count(flipped) <= 240
    never = RandomResizedCropFlip(SIZE, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0)
    assert never(image).tobytes() == plain


# ------------------------------------------------------------------------------------------------------ load_image


def test_load_image_accepts_paths_bytes_dicts_and_pil(tmp_path):
    image = draw_images(1, mode="L")[0]
    path = tmp_path / "grey.png"
    image.save(path)
    payload = path.read_bytes()
    expected = np.asarray(image.convert("RGB"))
    for value in (str(path), path, payload, bytearray(payload), {"path": None, "bytes": payload},
                  {"path": str(path), "bytes": None}, image):  # fmt: skip
        loaded = load_image(value)
        assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), expected)
    with pytest.raises(ValueError, match="no image"):
        load_image(None)
    with pytest.raises(ValueError, match="neither bytes nor a path"):
        load_image({"path": None, "bytes": None})
    with pytest.raises(TypeError, match="int"):
        load_image(3)


def test_load_image_fails_on_truncated_and_non_image_data(tmp_path):
    payload = encode(draw_images(1, size=(64, 64))[0])
    with pytest.raises(OSError, match="(?i)truncated"):
        load_image(payload[: len(payload) // 2])  # the header parses, the pixels do not
    with pytest.raises(OSError):
        load_image(b"not an image at all")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(OSError):
        load_image(str(empty))
    with pytest.raises(FileNotFoundError):
        load_image(str(tmp_path / "missing.jpg"))


# ------------------------------------------------------------------------------------------------------ the tracker


def test_bad_image_tracker_counts_and_raises_past_the_fraction(caplog):
    tracker = BadImageTracker(max_bad_fraction=0.5, min_seen=4, max_examples=2)
    with caplog.at_level(logging.WARNING, logger="blip2_hf.data"):
        tracker.record_bad("/data/a.jpg", OSError("broken"))
        tracker.record_bad("/data/b.jpg", OSError("broken"))
        tracker.record_bad("/data/c.jpg", OSError("broken"))  # 3 of 3 bad, but fewer than min_seen
    assert (tracker.num_seen, tracker.num_bad) == (3, 3)
    assert tracker.bad_examples == ["/data/a.jpg", "/data/b.jpg"]
    assert "/data/c.jpg" in caplog.text and "OSError: broken" in caplog.text
    with pytest.raises(RuntimeError, match=r"3 of 4 samples \(75\.0%\) failed to load.*/data/a\.jpg \(OSError"):
        tracker.record_good()

    tolerant = BadImageTracker(max_bad_fraction=0.5, min_seen=4)
    for _ in range(3):
        tolerant.record_good()
    for _ in range(3):
        tolerant.record_bad("x", ValueError("y"))  # 3 of 6 = 50%: not above the limit
    assert tolerant.bad_fraction == 0.5


# ------------------------------------------------------------------------------------------------------- stage 1


def test_stage1_collator_exact_tensors(rows):
    processor = build_processor()
    batch = Stage1Collator(processor, max_length=8)(rows)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask"}
    images = [load_image(row["image"]) for row in rows]
    torch.testing.assert_close(batch["pixel_values"], processor(images=images, return_tensors="pt")["pixel_values"])
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE)
    bert = make_bert_tokenizer()
    expected = bert([pre_caption(row["caption"]) for row in rows], padding="longest", truncation=True, max_length=8)
    assert batch["input_ids"].tolist() == expected["input_ids"]
    assert batch["attention_mask"].tolist() == expected["attention_mask"]
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[1] <= 8
    assert (batch["input_ids"][:, 0] == bert.cls_token_id).all()
    # Right padding; every row ends with [SEP] (the long caption was truncated to 8 tokens, [SEP] included).
    for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        length = sum(mask)
        assert mask == [1] * length + [0] * (len(mask) - length)
        assert ids[length - 1] == bert.sep_token_id and set(ids[length:]) <= {bert.pad_token_id}
    assert bert.decode(batch["input_ids"][2], skip_special_tokens=True) == "two cats"


def test_stage1_collator_applies_the_transform_before_the_processor(rows):
    processor = build_processor()
    transform = RandomResizedCropFlip(SIZE)
    collator = Stage1Collator(processor, image_transform=transform)
    batch = collator(rows)
    # each sample draws from its own generator, seeded by (seed, epoch, sample): not from the global stream
    random.seed(7)
    expected = [transform(load_image(row["image"]), collator._rng(row)) for row in rows]
    torch.testing.assert_close(batch["pixel_values"], processor(images=expected, return_tensors="pt")["pixel_values"])
    assert torch.equal(collator(rows[::-1])["pixel_values"], batch["pixel_values"].flip(0))  # order-independent
    collator.epoch = 1  # a new epoch, new crops
    assert not torch.equal(collator(rows)["pixel_values"], batch["pixel_values"])


def test_stage1_collator_needs_a_qformer_tokenizer():
    processor = Blip2Processor(tokenizer=make_opt_tokenizer(), num_query_tokens=Q)
    with pytest.raises(ValueError, match="qformer_tokenizer"):
        Stage1Collator(processor)


def test_cache_rows_give_frozen_image_states():
    embeds = [np.full((5, 6), i, dtype=np.float16) for i in range(3)]
    cache_rows = [
        {"frozen_image_states": embeds[0].tolist(), "caption": "A cat."},  # a cache read without a format: nested lists
        {"frozen_image_states": embeds[1], "caption": "a dog"},
        {"frozen_image_states": torch.from_numpy(embeds[2]), "caption": "two cats"},
    ]
    processor = build_processor()
    batch = Stage1Collator(processor)(cache_rows)
    assert set(batch) == {"frozen_image_states", "input_ids", "attention_mask"}
    assert batch["frozen_image_states"].dtype == torch.float32 and batch["frozen_image_states"].shape == (3, 5, 6)
    assert batch["frozen_image_states"][:, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert make_bert_tokenizer().decode(batch["input_ids"][0], skip_special_tokens=True) == "a cat"
    batch2 = Stage2Collator(processor, prompt="a photo of ")(cache_rows)
    assert set(batch2) == {"frozen_image_states", "input_ids", "attention_mask", "labels"}
    torch.testing.assert_close(batch2["frozen_image_states"], batch["frozen_image_states"])
    with pytest.raises(ValueError, match="mixes"):
        Stage1Collator(processor)([cache_rows[0], {"image": "x.jpg", "caption": "y"}])


# ------------------------------------------------------------------------------------------------------- stage 2


def test_stage2_prompt_that_fills_max_length_is_refused(rows):
    """A decoder-only prompt (BOS included) as long as `max_length` leaves every label masked: refused by name at
    build time, not a NaN loss on every step; one token shorter leaves the caption's first token as the target."""
    processor = build_processor()
    prompt = "a photo of a red circle on the left "
    prompt_length = len(processor.tokenizer(prompt.rstrip())["input_ids"])
    with pytest.raises(ValueError, match=rf"takes {prompt_length} of the max_length={prompt_length} .*--max_length"):
        Stage2Collator(processor, max_length=prompt_length, prompt=prompt)
    batch = Stage2Collator(processor, max_length=prompt_length + 1, prompt=prompt)(rows)
    assert ((batch["labels"] != -100).sum(dim=1) == 1).all()
    Stage2Collator(processor, max_length=prompt_length, prompt=prompt, is_encoder_decoder=True)  # the encoder reads it


@pytest.mark.parametrize("prompt", ["", "a photo of "])
def test_stage2_decoder_only_labels(rows, prompt):
    processor = build_processor()
    tokenizer = processor.tokenizer
    batch = Stage2Collator(processor, max_length=64, prompt=prompt)(rows)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    texts = [prompt + pre_caption(row["caption"]) + "\n" for row in rows]
    prompt_length = len(tokenizer(prompt.rstrip())["input_ids"])  # BOS (+ prompt tokens)
    assert prompt_length == (
        1 if not prompt else 1 + len(tokenizer("a photo of", add_special_tokens=False)["input_ids"])
    )
    width = batch["input_ids"].shape[1]
    for row, text in enumerate(texts):
        ids = [processor.image_token_id] * Q + tokenizer(text)["input_ids"]
        padding = width - len(ids)
        assert batch["input_ids"][row].tolist() == ids + [tokenizer.pad_token_id] * padding  # right padding
        assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * padding
        # -100 exactly on image tokens + BOS + prompt and on padding; the caption and "\n" are targets.
        masked = Q + prompt_length
        expected = [-100] * masked + ids[masked:] + [-100] * padding
        assert batch["labels"][row].tolist() == expected
        kept = [token for token in batch["labels"][row].tolist() if token != -100]
        decoded = tokenizer.decode(kept)
        assert decoded.endswith("\n") and decoded.strip() == pre_caption(rows[row]["caption"])


def test_stage2_decoder_only_truncates_text_to_max_length(rows):
    processor = build_processor()
    batch = Stage2Collator(processor, max_length=6)(rows)
    assert batch["input_ids"].shape[1] == Q + 6  # BOS and "\n" count (LAVIS max_txt_len)
    long_row = batch["input_ids"][1].tolist()
    assert long_row[Q:] == processor.tokenizer(pre_caption(CAPTIONS[1]) + "\n")["input_ids"][:6]


def t5_processor() -> Blip2Processor:
    return build_processor(make_t5_tokenizer())


def test_stage2_encoder_decoder_prefix_split(rows):
    processor = t5_processor()
    tokenizer = processor.tokenizer
    collator = Stage2Collator(processor, is_encoder_decoder=True, prompt="")
    captions = [pre_caption(row["caption"]) for row in rows]
    batch = collator(rows)
    # one k per caption, from the sample's own generator
    ks = [collator._rng(row).randint(1, max(1, len(c.split()) // 2)) for row, c in zip(rows, captions)]
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels", "decoder_attention_mask"}
    eos = tokenizer.eos_token_id
    for row, (caption, k) in enumerate(zip(captions, ks)):
        words = caption.split()
        assert 1 <= k <= max(1, len(words) // 2)
        encoder_ids = [processor.image_token_id] * Q + tokenizer(" ".join(words[:k]))["input_ids"]
        padded = encoder_ids + [tokenizer.pad_token_id] * (batch["input_ids"].shape[1] - len(encoder_ids))
        assert batch["input_ids"][row].tolist() == padded
        labels = [token for token in batch["labels"][row].tolist() if token != -100]
        assert labels == tokenizer(" ".join(words[k:]))["input_ids"] and labels[-1] == eos
        assert batch["decoder_attention_mask"][row].tolist() == [1] * len(labels) + [0] * (
            batch["labels"].shape[1] - len(labels)
        )
        n = len(labels)
        assert batch["labels"][row, n:].eq(-100).all()


def test_stage2_split_point_covers_the_whole_range():
    collator = Stage2Collator(t5_processor(), is_encoder_decoder=True, prompt="a photo of ")
    caption = "a small white dog playing with a blue ball"  # 9 words: k in 1..4
    random.seed(0)
    splits = [collator.split_caption(caption) for _ in range(400)]
    ks = {len(encoder.split()) - 3 for encoder, _ in splits}
    assert ks == {1, 2, 3, 4}
    assert all(encoder.startswith("a photo of ") for encoder, _ in splits)
    assert all(f"{encoder[len('a photo of ') :]} {target}" == caption for encoder, target in splits)
    assert collator.split_caption("dog") == ("a photo of ", "dog")  # one word: nothing to split


def test_stage2_encoder_decoder_without_split(rows):
    processor = t5_processor()
    tokenizer = processor.tokenizer
    batch = Stage2Collator(processor, is_encoder_decoder=True, prompt="a photo of", split_prefix=False)(rows)
    prompt_ids = [processor.image_token_id] * Q + tokenizer("a photo of")["input_ids"]
    assert batch["input_ids"].tolist() == [prompt_ids] * 3 and batch["attention_mask"].all()
    for row, source in enumerate(rows):
        labels = [token for token in batch["labels"][row].tolist() if token != -100]
        assert labels == tokenizer(pre_caption(source["caption"]))["input_ids"]
        assert labels[-1] == tokenizer.eos_token_id


# ------------------------------------------------------------------------------------------------- corrupt data


def corrupt_caption_json(tmp_path) -> str:
    folder = tmp_path / "images"
    good = write_images(folder, 3)
    payload = encode(draw_images(1, size=(64, 64))[0])
    (folder / "truncated.jpg").write_bytes(payload[: len(payload) // 2])
    (folder / "text.jpg").write_bytes(b"this is not an image, just some text\n" * 4)
    (folder / "empty.jpg").write_bytes(b"")
    names = [os.path.basename(path) for path in good] + ["truncated.jpg", "text.jpg", "empty.jpg"]
    entries = [{"image": name, "caption": f"caption {i}"} for i, name in enumerate(names)]
    # Interleave good and bad entries.
    order = [0, 3, 1, 4, 5, 2]
    return write_json(folder / "ann.json", [entries[i] for i in order])


@pytest.mark.parametrize("stage", [1, 2])
def test_bad_images_are_skipped_counted_and_logged(tmp_path, caplog, stage):
    dataset = load_caption_json(corrupt_caption_json(tmp_path))
    processor = build_processor()
    tracker = BadImageTracker()
    collator = (Stage1Collator if stage == 1 else Stage2Collator)(processor, tracker=tracker)
    with caplog.at_level(logging.WARNING, logger="blip2_hf.data"):
        batch = collator([dataset[i] for i in range(len(dataset))])
    assert batch["pixel_values"].shape[0] == batch["input_ids"].shape[0] == 3  # the batch shrinks
    assert (tracker.num_seen, tracker.num_bad) == (6, 3)
    assert [os.path.basename(name) for name in tracker.bad_examples] == ["truncated.jpg", "text.jpg", "empty.jpg"]
    for name in ("truncated.jpg", "text.jpg", "empty.jpg"):
        assert name in caplog.text
    assert "truncated" in caplog.text and "UnidentifiedImageError" in caplog.text
    good = [load_image(dataset[i]["image"]) for i in (0, 2, 5)]
    torch.testing.assert_close(batch["pixel_values"], processor(images=good, return_tensors="pt")["pixel_values"])


def test_mostly_bad_dataset_raises_a_clear_error(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    write_images(folder, 1)
    rows = [{"image": str(folder / "img0.jpg"), "caption": "fine"}]
    rows += [{"image": str(folder / f"missing{i}.jpg"), "caption": f"lost {i}"} for i in range(7)]
    collator = Stage1Collator(build_processor(), tracker=BadImageTracker(max_bad_fraction=0.5, min_seen=4))
    with pytest.raises(RuntimeError) as error:
        collator(rows)
    message = str(error.value)
    assert "3 of 4 samples (75.0%) failed to load" in message
    assert "missing0.jpg" in message and "FileNotFoundError" in message and "image_root" in message


def test_a_batch_of_only_bad_images_raises_even_below_min_seen(tmp_path):
    tracker = BadImageTracker(min_seen=1000)
    collator = Stage2Collator(build_processor(), tracker=tracker)
    rows = [{"image": b"junk", "caption": "a"}, {"image": str(tmp_path / "gone.jpg"), "caption": "b"}]
    with pytest.raises(RuntimeError, match=r"every sample of the last batch \(2 samples\) was bad.*gone\.jpg"):
        collator(rows)
    assert tracker.num_bad == 2


def test_samples_without_image_or_caption_are_bad(tmp_path, caplog):
    image = encode(draw_images(1)[0])
    path = write_tar(
        tmp_path / "s.tar",
        [
            {"__key__": "k0", "jpg": image, "txt": b"fine"},
            {"__key__": "k1", "txt": b"no image"},
            {"__key__": "k2", "jpg": image, "json": b'{"url": "no caption"}'},
        ],
    )
    tracker = BadImageTracker()
    with caplog.at_level(logging.WARNING, logger="blip2_hf.data"):
        batch = Stage1Collator(build_processor(), tracker=tracker)(list(load_webdataset(path)))
    assert batch["pixel_values"].shape[0] == 1 and tracker.num_bad == 2
    assert "'no image'" in caplog.text and "no caption string" in caplog.text
