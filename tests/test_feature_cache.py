"""The frozen-feature cache (`blip2_hf.feature_cache`): round trip, one encoder call per distinct image, the same
first-step losses from the cache as from pixels (stage 1 and stage 2), unreadable images, the model/cache check,
damaged caches, atomic writes and the console command on saved tiny checkpoints."""

from __future__ import annotations

import json
import shutil

import datasets
import pytest
import torch
from safetensors.torch import load_file, save_file
from utils import draw_images, make_bert_tokenizer

import blip2_hf
from blip2_hf import feature_cache
from blip2_hf.data import load_image
from blip2_hf.feature_cache import (
    build_feature_cache,
    check_cache_matches,
    load_feature_cache,
    read_cache_index,
)
from blip2_hf.testing_utils import make_tiny_processor, perturb_, tiny_config_dict

# Five images, eight caption rows: image 0 has three captions, image 1 two.
CAPTIONS = [
    (0, "a red circle on a white background"),
    (1, "a blue square next to a yellow triangle"),
    (0, "a picture of shapes in different colors"),
    (2, "a green triangle inside a large black square"),
    (1, "the triangle is yellow"),
    (3, "a dog and a cat sitting together on the floor"),
    (0, "a photo of"),
    (4, "colorful shapes drawn on a gray background"),
]
NUM_IMAGES = 5


def make_processor() -> blip2_hf.Blip2Processor:
    return make_tiny_processor()


def stage1_model(processor: blip2_hf.Blip2Processor, seed: int = 0, **vision) -> blip2_hf.Blip2ForPreTraining:
    config = tiny_config_dict("opt", text_input=True, image_token_index=None)
    # the Q-Former tokenizer's ids: [DEC] (its BOS) is the last of its 301 tokens, [SEP] is 3
    config["qformer_config"].update(
        bos_token_id=processor.qformer_tokenizer.bos_token_id,
        eos_token_id=3,
        vocab_size=len(processor.qformer_tokenizer),
    )
    config["vision_config"].update(vision)
    torch.manual_seed(seed)
    return perturb_(blip2_hf.Blip2ForPreTraining(blip2_hf.Blip2Config(**config)), seed=seed, scale=0.1)


def stage2_model(processor: blip2_hf.Blip2Processor, seed: int = 0) -> blip2_hf.Blip2ForConditionalGeneration:
    config = tiny_config_dict("opt", image_token_index=processor.image_token_id)
    config["text_config"].update(
        vocab_size=len(processor.tokenizer) + 4, bos_token_id=2, eos_token_id=2, pad_token_id=1
    )
    torch.manual_seed(seed)
    return perturb_(blip2_hf.Blip2ForConditionalGeneration(blip2_hf.Blip2Config(**config)), seed=seed, scale=0.1)


@pytest.fixture(scope="module")
def processor():
    return make_processor()


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index, image in enumerate(draw_images(NUM_IMAGES, size=(40, 30))):
        path = folder / f"image{index}.{'png' if index % 2 else 'jpg'}"
        image.save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def caption_data(image_paths):
    return datasets.Dataset.from_dict(
        {"image": [image_paths[i] for i, _ in CAPTIONS], "caption": [caption for _, caption in CAPTIONS]}
    )


@pytest.fixture(scope="module")
def models(processor):
    return stage1_model(processor), stage2_model(processor)


@pytest.fixture(scope="module")
def cache_fp16(models, caption_data, processor, tmp_path_factory):
    output = tmp_path_factory.mktemp("caches") / "fp16"
    report = build_feature_cache(
        models[0], caption_data, processor, output, batch_size=2, shard_size=2, progress=False
    )
    return output, report


def pixels(processor, paths) -> torch.Tensor:
    return processor(images=[load_image(path) for path in paths], return_tensors="pt")["pixel_values"]


def cached_batch(cache: datasets.Dataset) -> torch.Tensor:
    return torch.stack([row["frozen_image_states"] for row in cache])


def test_round_trip(cache_fp16, models, processor, image_paths):
    output, report = cache_fp16
    model = models[0]
    assert sorted(p.name for p in output.iterdir()) == [
        "features-00000.safetensors",
        "features-00001.safetensors",
        "features-00002.safetensors",
        "index.json",
    ]
    assert (report.num_rows, report.num_rows_cached, report.num_images, report.num_images_cached) == (8, 8, 5, 5)
    assert report.num_shards == 3 and report.embed_shape == (26, 32) and report.dtype == "float16"
    assert report.total_bytes == sum(p.stat().st_size for p in output.glob("*.safetensors"))
    index = json.loads((output / "index.json").read_text())
    assert index["vision_config"]["hidden_size"] == 32 and index["image_size"] == [30, 30]
    assert index["counts"] == {
        "rows": 8,
        "rows_cached": 8,
        "rows_skipped": 0,
        "images": 5,
        "images_cached": 5,
        "images_skipped": 0,
        "bytes": report.total_bytes,
    }
    assert index["source"]["num_rows"] == 8 and index["source"]["columns"] == ["image", "caption"]

    cache = load_feature_cache(output)
    assert cache.column_names == ["frozen_image_states", "caption"] and len(cache) == len(CAPTIONS)
    assert list(cache["caption"]) == [caption for _, caption in CAPTIONS]
    expected = model.encode_image_frozen(pixels(processor, [image_paths[i] for i, _ in CAPTIONS])).half()
    got = cached_batch(cache)
    assert got.shape == (8, 26, 32) and got.dtype == torch.float16
    assert torch.equal(got, expected)
    # the transform survives the usual dataset operations, and the reader survives pickling (DataLoader workers)
    assert torch.equal(cached_batch(cache.select([5, 2])), expected[[5, 2]])
    shuffled = cache.shuffle(seed=0)
    order = [list(cache["caption"]).index(caption) for caption in list(shuffled["caption"])[:3]]
    assert torch.equal(cached_batch(shuffled.select(range(3))), expected[order])
    loader = torch.utils.data.DataLoader(cache, batch_size=4, num_workers=2, collate_fn=cached_batch)
    assert torch.equal(torch.cat(list(loader)), expected)


def test_each_image_is_encoded_once(models, caption_data, processor, image_paths, tmp_path, monkeypatch):
    model = models[1]
    encoded = []
    original = model.encode_image_frozen

    def counting(pixel_values, **kwargs):
        encoded.append(len(pixel_values))
        return original(pixel_values, **kwargs)

    monkeypatch.setattr(model, "encode_image_frozen", counting)
    report = build_feature_cache(model, caption_data, processor, tmp_path / "paths", batch_size=3, progress=False)
    assert sum(encoded) == NUM_IMAGES and encoded == [3, 2] and report.num_images_cached == NUM_IMAGES
    rows = read_cache_index(tmp_path / "paths")["rows"]
    slots = [(shard, row) for shard, row in zip(rows["shard"], rows["row"])]
    for image in range(NUM_IMAGES):
        assert len({slot for slot, (i, _) in zip(slots, CAPTIONS) if i == image}) == 1
    assert len(set(slots)) == NUM_IMAGES

    # images given as bytes (a `datasets.Image` column) are keyed by their content: two copies are one image
    encoded.clear()
    data = [open(image_paths[i], "rb").read() for i, _ in CAPTIONS]
    data.append(bytes(data[1]))  # the same bytes in another object
    by_bytes = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in data], "caption": [c for _, c in CAPTIONS] + ["again"]}
    ).cast_column("image", datasets.Image())
    build_feature_cache(model, by_bytes, processor, tmp_path / "bytes", batch_size=8, progress=False)
    assert encoded == [NUM_IMAGES]
    first, second = load_feature_cache(tmp_path / "paths"), load_feature_cache(tmp_path / "bytes")
    assert torch.equal(cached_batch(first), cached_batch(second)[:-1])
    assert torch.equal(second[-1]["frozen_image_states"], second[1]["frozen_image_states"])


@pytest.fixture(scope="module")
def fp32_caches(models, caption_data, processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp32")
    for name, model in zip(("stage1", "stage2"), models):
        build_feature_cache(model, caption_data, processor, folder / name, dtype="fp32", progress=False)
    return folder


def stage1_loss(model, captions, **image) -> tuple[torch.Tensor, torch.Tensor]:
    text = make_bert_tokenizer()(captions, padding=True, return_tensors="pt")
    model.zero_grad()
    torch.manual_seed(0)  # ITM draws its negatives
    loss = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], **image).loss
    loss.backward()
    return loss.detach(), model.vision_model.post_layernorm.weight.grad.clone()


def test_stage1_loss_from_cache_equals_on_the_fly(models, processor, image_paths, fp32_caches, cache_fp16):
    model = models[0]
    captions = [caption for _, caption in CAPTIONS]
    reference, reference_grad = stage1_loss(
        model, captions, pixel_values=pixels(processor, [image_paths[i] for i, _ in CAPTIONS])
    )
    cache = load_feature_cache(fp32_caches / "stage1")
    loss, grad = stage1_loss(model, list(cache["caption"]), frozen_image_states=cached_batch(cache))
    assert torch.equal(loss, reference) and torch.equal(grad, reference_grad)  # post_layernorm trains from the cache
    fp16 = load_feature_cache(cache_fp16[0])
    loss16, _ = stage1_loss(model, list(fp16["caption"]), frozen_image_states=cached_batch(fp16))
    assert abs(loss16.item() - reference.item()) < 1e-3 * reference.item()


def test_stage2_loss_from_cache_equals_on_the_fly(models, processor, image_paths, fp32_caches):
    model = models[1]
    cache = load_feature_cache(fp32_caches / "stage2")
    text = processor(text=list(cache["caption"]), padding=True, return_tensors="pt")
    labels = text["input_ids"].masked_fill(text["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == processor.image_token_id, -100)
    inputs = dict(input_ids=text["input_ids"], attention_mask=text["attention_mask"], labels=labels)
    reference = model(pixel_values=pixels(processor, [image_paths[i] for i, _ in CAPTIONS]), **inputs).loss
    assert torch.equal(model(frozen_image_states=cached_batch(cache), **inputs).loss, reference)
    loss16 = model(frozen_image_states=cached_batch(cache).half(), **inputs).loss  # what an fp16 cache holds
    assert abs(loss16.item() - reference.item()) < 1e-3 * reference.item()
    generated = model.generate(frozen_image_states=cached_batch(cache.select([0, 1])), max_new_tokens=3)
    assert torch.equal(generated, model.generate(pixel_values=pixels(processor, image_paths[:2]), max_new_tokens=3))


def test_unreadable_images_are_skipped_and_counted(models, processor, image_paths, tmp_path):
    good = open(image_paths[0], "rb").read()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    images = [image_paths[0], str(tmp_path / "truncated.jpg"), image_paths[1], str(tmp_path / "garbage.png")]
    images += [str(tmp_path / "missing.jpg"), str(tmp_path / "truncated.jpg")]
    data = datasets.Dataset.from_dict({"image": images, "caption": [f"caption {i}" for i in range(len(images))]})
    report = build_feature_cache(models[1], data, processor, tmp_path / "cache", progress=False)
    assert (report.num_images, report.num_images_cached, report.num_images_skipped) == (5, 2, 3)
    assert (report.num_rows, report.num_rows_cached, report.num_rows_skipped) == (6, 2, 4)
    assert set(report.skipped) == {str(tmp_path / name) for name in ("truncated.jpg", "garbage.png", "missing.jpg")}
    index = read_cache_index(tmp_path / "cache")
    assert index["counts"]["images_skipped"] == 3 and index["counts"]["rows_skipped"] == 4
    assert index["skipped"] == report.skipped and index["rows"]["source_row"] == [0, 2]
    assert list(load_feature_cache(tmp_path / "cache")["caption"]) == ["caption 0", "caption 2"]

    unreadable = data.select([1, 3])
    with pytest.raises(ValueError, match="none of the 2 images could be read"):
        build_feature_cache(models[1], unreadable, processor, tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()


def test_check_cache_matches(models, processor, cache_fp16, tmp_path):
    output, _ = cache_fp16
    check_cache_matches(models[0], output)
    # stage 2 initialized from stage 1 has the same encoder; so does a half-precision copy
    models[0].save_pretrained(tmp_path / "stage1")
    stage2 = stage2_model(processor, seed=1)
    stage2.init_from_stage1(tmp_path / "stage1")
    check_cache_matches(stage2, output)
    check_cache_matches(stage1_model(processor).to(torch.bfloat16), output)

    with pytest.raises(ValueError, match="num_hidden_layers: model 3 != cache 2"):
        check_cache_matches(stage1_model(processor, num_hidden_layers=3), output)
    with pytest.raises(ValueError, match=r"image_size: model 36 != cache 30.*num_hidden_layers"):
        check_cache_matches(stage1_model(processor, image_size=36, num_hidden_layers=1), output)
    with pytest.raises(ValueError, match="hidden_size"):
        check_cache_matches(stage1_model(processor, hidden_size=48, patch_size=5), output)
    other_weights = stage1_model(processor, seed=1)
    with pytest.raises(ValueError, match="weights differ"):
        check_cache_matches(other_weights, output)
    check_cache_matches(other_weights, output, check_weights=False)


def test_cache_written_before_the_rename_still_loads(cache_fp16, models, tmp_path):
    """Caches written before `image_embeds` was renamed `frozen_image_states` name their shards' tensor
    `image_embeds`: they load unchanged, under the new column name, and train the same."""
    output = tmp_path / "old"
    shutil.copytree(cache_fp16[0], output)
    index = json.loads((output / "index.json").read_text())
    for shard in index["shards"]:
        path = output / shard["file"]
        save_file({"image_embeds": load_file(path)["frozen_image_states"]}, path, {"format": feature_cache.FORMAT})
        shard["bytes"] = path.stat().st_size  # the shorter name changes the header's size
    (output / "index.json").write_text(json.dumps(index))
    old, new = load_feature_cache(output), load_feature_cache(cache_fp16[0])
    assert old.column_names == ["frozen_image_states", "caption"]
    assert torch.equal(cached_batch(old), cached_batch(new))
    assert torch.equal(cached_batch(old.shuffle(seed=0)), cached_batch(new.shuffle(seed=0)))
    check_cache_matches(models[0], output)
    # a shard holding neither name is refused, naming the file and the expected tensor
    path = output / index["shards"][1]["file"]
    save_file({"features": load_file(path)["image_embeds"]}, path, {"format": feature_cache.FORMAT})
    index["shards"][1]["bytes"] = path.stat().st_size
    (output / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"features-00001\.safetensors has no tensor 'frozen_image_states'"):
        load_feature_cache(output)


def test_damaged_cache_errors_name_the_file(cache_fp16, tmp_path):
    def copy() -> tuple:
        target = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(cache_fp16[0], target)
        return target, target / "features-00001.safetensors"

    cache, shard = copy()
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"features-00001\.safetensors has \d+ bytes.*truncated"):
        load_feature_cache(cache)

    cache, shard = copy()
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"features-00001\.safetensors is missing"):
        load_feature_cache(cache)

    cache, shard = copy()  # same size, transposed: the header disagrees with index.json
    save_file(
        {"frozen_image_states": load_file(shard)["frozen_image_states"].transpose(1, 2).contiguous()},
        shard,
        {"format": feature_cache.FORMAT},
    )
    with pytest.raises(
        ValueError, match=r"features-00001\.safetensors holds frozen_image_states \[2, 32, 26\].*\[2, 26, 32\]"
    ):
        load_feature_cache(cache)

    cache, _ = copy()
    index = json.loads((cache / "index.json").read_text())
    index["rows"]["row"][4] = 7  # row 4 is in shard 1 (image 1 is the second image, shard_size 2)
    (cache / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"row 4 points at row 7 of .*features-00000\.safetensors, which holds 2"):
        load_feature_cache(cache)

    cache, _ = copy()
    (cache / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"index\.json not found"):
        load_feature_cache(cache)


def test_writes_are_atomic(models, caption_data, processor, cache_fp16, tmp_path, monkeypatch):
    model = models[0]
    calls = []
    original = model.encode_image_frozen

    def dies_on_the_third_batch(pixel_values, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(pixel_values, **kwargs)

    monkeypatch.setattr(model, "encode_image_frozen", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):  # after two shards were written
        build_feature_cache(model, caption_data, processor, tmp_path / "cache", batch_size=2, shard_size=2)
    assert list(tmp_path.iterdir()) == []  # neither the cache nor the partial directory
    monkeypatch.undo()

    shutil.copytree(cache_fp16[0], tmp_path / "cache")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_feature_cache(model, caption_data, processor, tmp_path / "cache", progress=False)
    report = build_feature_cache(
        model, caption_data.select(range(2)), processor, tmp_path / "cache", overwrite=True, progress=False
    )
    assert report.num_rows == 2 and len(load_feature_cache(tmp_path / "cache")) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_console_command(stage, processor, image_paths, tmp_path, capsys):
    model = stage1_model(processor) if stage == "stage1" else stage2_model(processor)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    image_root = tmp_path / "images"
    image_root.mkdir()
    for path in image_paths:
        shutil.copy(path, image_root)
    entries = [{"image": f"image{i}.{'png' if i % 2 else 'jpg'}", "caption": caption} for i, caption in CAPTIONS]
    (tmp_path / "train.json").write_text(json.dumps(entries[:5]))
    (tmp_path / "more.json").write_text(json.dumps(entries[5:]))
    dtype = "fp16" if stage == "stage1" else "bf16"
    argv = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.json"), str(tmp_path / "more.json")]
    argv += ["--image-root", str(image_root), "--output", str(tmp_path / "cache"), "--batch-size", "2"]
    argv += ["--dtype", dtype, "--num-workers", "2", "--no-progress"]
    assert feature_cache.main(argv) == 0
    out = capsys.readouterr().out
    assert "5 images (8 caption rows)" in out and "per image ([26x32]" in out and "random resized crop" in out

    cache = load_feature_cache(tmp_path / "cache")
    assert list(cache["caption"]) == [caption for _, caption in CAPTIONS]
    expected = model.encode_image_frozen(pixels(processor, [image_paths[i] for i, _ in CAPTIONS]))
    assert torch.equal(cached_batch(cache), expected.to(feature_cache.DTYPES[dtype]))
    reloaded = feature_cache.load_model_for_cache(tmp_path / "model")
    assert type(reloaded) is type(model)
    check_cache_matches(reloaded, tmp_path / "cache")
    index = read_cache_index(tmp_path / "cache")
    assert index["source"]["source"]["data"] == [str(tmp_path / "train.json"), str(tmp_path / "more.json")]
    assert index["model_class"] == type(model).__name__


def test_data_collators_train_from_the_cache(models, processor, caption_data, fp32_caches):
    """The data module's collators stack cache rows into `frozen_image_states`: same batch text, same loss as from images."""
    from blip2_hf.data import Stage1Collator, Stage2Collator

    for name, model, collator in (
        ("stage1", models[0], Stage1Collator(processor)),
        ("stage2", models[1], Stage2Collator(processor, prompt="a photo of ")),
    ):
        cache = load_feature_cache(fp32_caches / name)
        from_images = collator([caption_data[i] for i in range(len(caption_data))])
        from_cache = collator([cache[i] for i in range(len(cache))])
        assert set(from_cache) == set(from_images) - {"pixel_values"} | {"frozen_image_states"}
        losses = []
        for batch in (from_images, from_cache):
            torch.manual_seed(0)
            with torch.no_grad():
                losses.append(model(**batch).loss)
        assert torch.equal(losses[0], losses[1]), name


def test_console_command_mistakes_are_one_line_messages(processor, image_paths, tmp_path, capsys):
    """The usual mistakes fail before any encoding with exit code 1 and one line naming the problem, no traceback."""
    model = tmp_path / "model"
    stage1_model(processor).save_pretrained(model)
    processor.save_pretrained(model)
    good = tmp_path / "train.json"
    good.write_text(json.dumps([{"image": str(image_paths[0]), "caption": "a caption"}]))
    (tmp_path / "broken.json").write_text('[{"image": "a.png", "caption": ')
    (tmp_path / "taken").mkdir()
    capsys.readouterr()  # save_pretrained's bars

    def refused(*argv: str) -> str:
        assert feature_cache.main(["--no-progress", *argv]) == 1
        err = capsys.readouterr().err
        message = err.strip().splitlines()[-1]  # after transformers' "Loading weights" bar, if it got that far
        assert message.startswith("blip2-hf-cache-features: error: ") and "Traceback" not in err, err
        return message

    out = ["--output", str(tmp_path / "cache")]
    assert "--model nope: no such folder" in refused("--model", "nope", "--data", str(good), *out)
    assert "missing.json" in refused("--model", str(model), "--data", str(tmp_path / "missing.json"), *out)
    assert "broken.json: not valid JSON" in refused(
        "--model", str(model), "--data", str(tmp_path / "broken.json"), *out
    )
    assert "--image-root nowhere: no such folder" in refused(
        "--model", str(model), "--data", str(good), "--image-root", "nowhere", *out
    )
    taken = refused("--model", str(model), "--data", str(good), "--output", str(tmp_path / "taken"))
    assert "taken exists; pass --overwrite" in taken
    (tmp_path / "unlisted.json").write_text(json.dumps([{"image": "gone.png", "caption": "a caption"}]))
    assert "gone.png" in refused("--model", str(model), "--data", str(tmp_path / "unlisted.json"), *out)
    assert not (tmp_path / "cache").exists()
