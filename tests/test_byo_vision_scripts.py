"""Bring your own image encoder through the scripts: a transformers vision model's own folder (CLIP, SigLIP, DINOv2,
ConvNeXt, each with its image processor; a full CLIPModel) as `training/stage1.py --vision_model_name_or_path`, with
no processor folder; stage 2 (`training/stage2.py`) from that stage-1 folder onto a tiny OPT, reloaded and captioning;
the frozen-feature cache with such an encoder; and the errors: a processor whose image size is not the encoder's, a
vision folder missing a tensor, a foreign encoder without its image processor."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    ConvNextImageProcessor,
    SiglipImageProcessor,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import blip2_hf
from blip2_hf import feature_cache
from blip2_hf.feature_cache import check_cache_matches, read_cache_index
from blip2_hf.hub import _describe_towers
from blip2_hf.testing_utils import tiny_vision_config
from blip2_hf.training_scripts import check_processor_matches_model, processor_output_size, training_dataset

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("clip", "siglip", "dinov2", "convnext")
# The contract's defaults: CLIP and SigLIP feed their second-last layer (the paper's choice for CLIP), DINOv2 and
# ConvNeXt their last hidden state.
DEFAULT_FEATURE_LAYER = {"clip": -2, "siglip": -2, "dinov2": -1, "convnext": -1}
IMAGE_SIZE = 32  # tiny_vision_config's
# The size each family's processor writes in the stage-1 runs. DINOv2's is not its config's, as for the real ones
# (facebook/dinov2-*: config 518 px, processor 224): it interpolates its position embeddings to any size.
PROCESSOR_SIZE = {"clip": IMAGE_SIZE, "siglip": IMAGE_SIZE, "dinov2": 24, "convnext": IMAGE_SIZE}
STEPS = [
    "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "16", "--use_cpu", "true",
    "--report_to", "none", "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--save_steps", "1000",
    "--logging_steps", "1",
]  # fmt: skip


def load_script(name: str, folder: str = "training"):
    """A script of `training/` (or `evaluation/`, with its folder on the path for its `common` import) as a module."""
    if folder == "evaluation" and str(ROOT / folder) not in sys.path:
        sys.path.insert(0, str(ROOT / folder))
    spec = importlib.util.spec_from_file_location(f"byo_{folder}_{name}", ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


stage1_script = load_script("stage1")
stage2_script = load_script("stage2")


def image_processor(family: str, size: int = IMAGE_SIZE):
    """The family's own image processor (its class, resizing and normalization) at `size` px."""
    square = {"height": size, "width": size}
    if family == "clip":
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size=square)
    if family == "siglip":
        return SiglipImageProcessor(size=square)
    if family == "dinov2":  # DINOv2's is a BitImageProcessor with the ImageNet mean/std
        return BitImageProcessor(
            size={"shortest_edge": size},
            crop_size=square,
            image_mean=IMAGENET_DEFAULT_MEAN,
            image_std=IMAGENET_DEFAULT_STD,
        )
    return ConvNextImageProcessor(size={"shortest_edge": size})


def save_vision_folder(folder: Path, family: str, seed: int = 0, processor_size: int | None = IMAGE_SIZE):
    """What a user has: `<Family>Model.save_pretrained(folder)` of a tiny random encoder, with its image processor
    beside it (none with `processor_size=None`). Returns the standalone model."""
    torch.manual_seed(seed)
    model = AutoModel.from_config(tiny_vision_config(family)).eval()
    model.save_pretrained(folder)
    if processor_size is not None:
        image_processor(family, processor_size).save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """training/tiny_setup.py's world, small: images with captions, a BERT (with its Q-Former tokenizer beside it, so
    that stage1.py needs no processor folder), an OPT with its tokenizer, the stage-1 Blip2Config (EVA vision)."""
    work = tmp_path_factory.mktemp("byo") / "tiny"
    load_script("tiny_setup").main(["--output", str(work), "--num-images", "8"])
    for file in (work / "processor_opt" / "qformer_tokenizer").iterdir():
        shutil.copy(file, work / "bert" / file.name)
    return work


def run_stage1(tiny: Path, output: Path, *arguments: str) -> Path:
    stage1_script.main(
        [
            "--config_name", str(tiny / "stage1_config"), "--bert_name_or_path", str(tiny / "bert"),
            "--train_data", str(tiny / "data" / "train.json"), "--output_dir", str(output), *STEPS, *arguments,
        ]
    )  # fmt: skip
    return output


def run_stage2(tiny: Path, stage1: Path, output: Path) -> Path:
    stage2_script.main(
        [
            "--stage1_name_or_path", str(stage1), "--language_model_name_or_path", str(tiny / "opt"),
            "--train_data", str(tiny / "data" / "train.json"), "--output_dir", str(output), *STEPS,
        ]
    )  # fmt: skip
    return output


@pytest.fixture(scope="module")
def stage1_runs(tiny: Path) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Stage 1 through the script for every family: its vision folder as the encoder, no processor folder."""
    runs = {}
    for family in FAMILIES:
        vision = tiny.parent / f"{family}_vision"
        standalone = save_vision_folder(vision, family, processor_size=PROCESSOR_SIZE[family])
        runs[family] = (run_stage1(tiny, tiny.parent / f"{family}_stage1", "--vision_model_name_or_path", str(vision)),
                        standalone)  # fmt: skip
    return runs


def an_image(tiny: Path) -> Image.Image:
    return Image.open(tiny / "data" / "images" / "0000.png").convert("RGB")


@pytest.mark.parametrize("family", FAMILIES)
def test_stage1_takes_the_encoder_and_its_image_processor(family, stage1_runs, tiny):
    output, standalone = stage1_runs[family]
    model = blip2_hf.Blip2ForPreTraining.from_pretrained(output)
    config = model.config
    assert config.vision_config.model_type == standalone.config.model_type
    assert config.vision_feature_layer == DEFAULT_FEATURE_LAYER[family]  # the EVA config_name's -1 was not kept
    assert config.vision_feature_select_strategy == "full"
    assert config.qformer_config.encoder_hidden_size == config.vision_hidden_size == 32
    # the frozen encoder is the user's checkpoint, every tensor, untouched by training
    ours, theirs = model.vision_model.backbone.state_dict(), standalone.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # the processor saved beside the model is the encoder's own image processor + the Q-Former tokenizer
    processor = blip2_hf.Blip2Processor.from_pretrained(output)
    expected = image_processor(family, PROCESSOR_SIZE[family])
    assert type(processor.image_processor).__name__.startswith(type(expected).__name__.removesuffix("ImageProcessor"))
    image = an_image(tiny)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels, expected(image, return_tensors="pt")["pixel_values"], atol=1e-6)
    size = PROCESSOR_SIZE[family]
    assert pixels.shape[-2:] == (size, size)
    assert processor.qformer_tokenizer.bos_token == "[DEC]" and processor.qformer_tokenizer.padding_side == "right"
    assert processor.qformer_tokenizer.convert_tokens_to_ids("<image>") == processor.qformer_tokenizer.unk_token_id
    # what stage 1 trains sees these pixels: the encoder runs on them
    num_patches = (size // 8) ** 2  # patch 8; ConvNeXt: a patch-4 stem then one 2x downsampling
    assert model.vision_model.encode_frozen(pixels).shape == (1, num_patches + (family in ("clip", "dinov2")), 32)


def stage2_and_caption(family: str, stage1_runs, tiny: Path) -> None:
    stage1, standalone = stage1_runs[family]
    output = run_stage2(tiny, stage1, tiny.parent / f"{family}_stage2")
    model = blip2_hf.Blip2ForConditionalGeneration.from_pretrained(output).eval()
    processor = blip2_hf.Blip2Processor.from_pretrained(output)
    assert model.config.vision_config.model_type == standalone.config.model_type
    assert model.config.vision_feature_layer == DEFAULT_FEATURE_LAYER[family]
    backbone = model.vision_model.backbone.state_dict()
    assert all(torch.equal(backbone[k], v) for k, v in standalone.state_dict().items())  # still the user's
    assert (
        type(processor.image_processor).__name__
        == type(blip2_hf.Blip2Processor.from_pretrained(stage1).image_processor).__name__
    )
    image = an_image(tiny)
    ids = model.generate(**processor(images=[image, image], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert ids.shape[0] == 2 and torch.equal(ids[0], ids[1])
    assert isinstance(processor.batch_decode(ids, skip_special_tokens=True)[0], str)


# DINOv2's folders name its attention tensors as before transformers 5 (`attention.attention.key`), its modules
# `attention.k_proj`: stage 2 reads the stage-1 folder tensor by tensor and must rename them as from_pretrained does.
@pytest.mark.parametrize("family", FAMILIES)
def test_stage2_from_a_foreign_encoder_stage1_folder_captions(family, stage1_runs, tiny):
    stage2_and_caption(family, stage1_runs, tiny)


def test_feature_cache_with_a_foreign_encoder(stage1_runs, tiny, tmp_path):
    siglip, _ = stage1_runs["siglip"]
    cache = tmp_path / "cache"
    data = str(tiny / "data" / "train.json")
    code = feature_cache.main(
        ["--model", str(siglip), "--data", data, "--output", str(cache), "--dtype", "fp32", "--no-progress"]
    )
    assert code == 0
    index = read_cache_index(cache)
    assert index["vision_config"]["model_type"] == "siglip_vision_model"
    assert index["vision_config"]["vision_feature_layer"] == -2 and index["embed_shape"] == [16, 32]
    model = blip2_hf.Blip2ForPreTraining.from_pretrained(siglip)
    check_cache_matches(model, cache)
    cached = feature_cache.load_feature_cache(cache)[0]["frozen_image_states"]
    pixels = blip2_hf.Blip2Processor.from_pretrained(siglip)(images=an_image(tiny), return_tensors="pt")
    assert torch.allclose(cached, model.encode_image_frozen(pixels["pixel_values"])[0], atol=1e-5)
    # stage 1 trains from it (the script checks it against the model first)
    output = tmp_path / "from_cache"
    stage1_script.main(["--model_name_or_path", str(siglip), "--feature_cache", str(cache), "--train_data", data,
                        "--output_dir", str(output), *STEPS])  # fmt: skip
    assert (output / "model.safetensors").is_file()
    # another family's encoder, or the same encoder read at another layer, is refused
    with pytest.raises(ValueError, match="model_type: model clip_vision_model != cache siglip_vision_model"):
        check_cache_matches(blip2_hf.Blip2ForPreTraining.from_pretrained(stage1_runs["clip"][0]), cache)
    config = blip2_hf.Blip2Config.from_pretrained(siglip)
    config.vision_feature_layer = -1
    other_layer = blip2_hf.Blip2ForPreTraining(config)
    other_layer.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="vision_feature_layer: model -1 != cache -2"):
        check_cache_matches(other_layer, cache)


def test_feature_cache_of_an_eva_model_still_checks(tmp_path):
    """An EVA cache's record keeps its fields; one written before the feature fields were recorded still matches."""
    config = blip2_hf.Blip2Config(vision_config=tiny_vision_config("eva").to_dict(), qformer_config={"hidden_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 37})  # fmt: skip
    model = blip2_hf.Blip2Model(config)
    record = feature_cache.vision_config_dict(model)
    assert record["model_type"] == "blip2_hf_vision_model" and record["vision_feature_layer"] == -1
    assert "hidden_sizes" not in record  # only the fields the config has


def test_augmentation_crops_at_the_processors_output_size(tiny):
    """ConvNeXt (and DINOv2) take any size (no `vision_image_size`): the random resized crop takes the processor's
    output size."""
    model = types.SimpleNamespace(config=blip2_hf.Blip2Config(vision_config=tiny_vision_config("convnext")))
    processor = blip2_hf.Blip2Processor(image_processor("convnext", 24), blip2_hf.testing_utils.make_opt_tokenizer())
    data = [str(tiny / "data" / "train.json")]
    _, transform = training_dataset(model, data, processor=processor)
    assert transform.size == (24, 24)
    with pytest.raises(ValueError, match="fixed output size.*--augment false"):
        training_dataset(model, data)
    assert training_dataset(model, data, augment=False)[1] is None


def test_a_processor_of_another_size_is_refused(tiny, tmp_path):
    vision = tmp_path / "siglip48"
    save_vision_folder(vision, "siglip", processor_size=48)
    with pytest.raises(ValueError, match=r"size=\{'height': 48, 'width': 48\}.*writes 48x48 images.*expects 32x32 "
                       r"\(vision_config.image_size=32\)"):  # fmt: skip
        run_stage1(tiny, tmp_path / "out", "--vision_model_name_or_path", str(vision))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_check_processor_matches_model_per_family():
    def config(family):
        return blip2_hf.Blip2Config(vision_config=tiny_vision_config(family))

    def processor(image_processor):
        return blip2_hf.Blip2Processor(image_processor, tokenizer=blip2_hf.testing_utils.make_opt_tokenizer())

    check_processor_matches_model(processor(image_processor("clip")), config("clip"), "here")
    check_processor_matches_model(processor(image_processor("convnext", 64)), config("convnext"), "here")  # any size
    no_crop = CLIPImageProcessor(size={"shortest_edge": 32}, do_center_crop=False)
    assert processor_output_size(no_crop) is None
    with pytest.raises(ValueError, match="here: .*do_center_crop=False.*depends on the input.*image_size=32"):
        check_processor_matches_model(processor(no_crop), config("clip"), "here")
    with pytest.raises(ValueError, match="crop_size=\\{'height': 64, 'width': 64\\}.*writes 64x64.*expects 32x32"):
        check_processor_matches_model(processor(image_processor("clip", 64)), config("clip"), "here")
    # DINOv2 interpolates its position embeddings to any size: facebook/dinov2-* say 518 px, their processors 224
    check_processor_matches_model(processor(image_processor("dinov2", 64)), config("dinov2"), "here")


def test_a_vision_folder_missing_a_tensor_is_refused(tiny, tmp_path):
    vision = tmp_path / "dinov2_partial"
    save_vision_folder(vision, "dinov2")
    weights = load_file(vision / "model.safetensors")
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, vision / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match=str(vision)) as error:
        run_stage1(tiny, tmp_path / "out", "--vision_model_name_or_path", str(vision))
    assert dropped.split(".")[-2] in str(error.value)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_foreign_encoder_without_its_image_processor_needs_one(tiny, tmp_path):
    vision = tmp_path / "clip_bare"
    save_vision_folder(vision, "clip", processor_size=None)
    with pytest.raises(
        ValueError, match="clip_bare has no preprocessor_config.json.*clip_vision_model.*processor_name"
    ):
        run_stage1(tiny, tmp_path / "out", "--vision_model_name_or_path", str(vision))


def test_a_full_clip_model_gives_its_vision_tower(tiny, tmp_path):
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                eos_token_id=2)  # fmt: skip
    clip = CLIPModel(
        CLIPConfig(vision_config=tiny_vision_config("clip").to_dict(), text_config=text, projection_dim=16)
    )
    folder = tmp_path / "clip_full"
    clip.save_pretrained(folder)
    image_processor("clip").save_pretrained(folder)
    output = run_stage1(tiny, tmp_path / "out", "--vision_model_name_or_path", str(folder))
    model = blip2_hf.Blip2ForPreTraining.from_pretrained(output)
    assert model.config.vision_config.model_type == "clip_vision_model" and model.config.vision_feature_layer == -2
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    reference = clip.vision_model(pixels, output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(model.vision_model.encode_frozen(pixels), reference, atol=1e-6)


def test_config_name_feature_fields_kept_only_for_the_same_family(tiny, tmp_path):
    vision = tmp_path / "siglip"
    save_vision_folder(vision, "siglip")
    args = stage1_script.ModelArguments(config_name=str(tiny / "stage1_config"), vision_model_name_or_path=str(vision))
    assert stage1_script.stage1_config(args).vision_feature_layer == -2  # the EVA config's -1 is EVA's
    raw = json.loads((tiny / "stage1_config" / "config.json").read_text())
    raw.update(vision_config=tiny_vision_config("siglip").to_dict(), vision_feature_layer=-1)
    (tmp_path / "siglip_config.json").write_text(json.dumps(raw))
    args.config_name = str(tmp_path / "siglip_config.json")
    config = stage1_script.stage1_config(args)
    assert config.vision_feature_layer == -1 and config.qformer_config.encoder_hidden_size == 32


def test_eva_folder_without_a_processor_gets_blip2_preprocessing(tiny):
    args = stage1_script.ModelArguments(
        config_name=str(tiny / "stage1_config"),
        vision_model_name_or_path=str(tiny / "vision"),
        bert_name_or_path=str(tiny / "bert"),
    )
    config = stage1_script.stage1_config(args)
    assert config.vision_config.model_type == "blip2_hf_vision_model"
    processor, _ = stage1_script.build_processor(args, config)
    assert isinstance(processor.image_processor, blip2_hf.Blip2ImageProcessor)
    assert processor_output_size(processor.image_processor) == (IMAGE_SIZE, IMAGE_SIZE)
    model = stage1_script.build_model(args, config)  # our `vision_model.*` layout, loaded strictly
    reference = blip2_hf.Blip2VisionModel.from_pretrained(tiny / "vision")
    assert torch.equal(
        model.vision_model.embeddings.patch_embedding.weight, reference.embeddings.patch_embedding.weight
    )


def test_model_card_names_the_encoder_family():
    def line(family):
        return _describe_towers(blip2_hf.Blip2Config(vision_config=tiny_vision_config(family)), "stage1")["vision"]

    assert line("siglip").startswith("SigLIP (siglip_vision_model), 2 layers, width 32, 32x32px images in 8px patches")
    assert "hidden state -2" in line("siglip") and "last hidden state" in line("dinov2")
    assert line("convnext").startswith("ConvNeXt (convnext), 2 stages, width 32, images of any size")
    assert line("eva").startswith("ViT, 2 layers, width 32, 32px images in 8px patches")


def test_evaluation_image_size_keeps_the_encoders_normalization():
    common = load_script("common", "evaluation")
    for family in FAMILIES:
        resized = common.resized_image_processor(image_processor(family), 48)
        assert processor_output_size(resized) == (48, 48)
        assert list(resized.image_mean) == list(image_processor(family).image_mean)
    args = common.argparse.Namespace(image_size=48)
    assert not common.interpolate_pos_encoding(
        args, blip2_hf.Blip2Config(vision_config=tiny_vision_config("convnext"))
    )
    assert common.interpolate_pos_encoding(args, blip2_hf.Blip2Config(vision_config=tiny_vision_config("siglip")))


def test_hub_ids_for_the_encoder_and_the_stage1_folder(stage1_runs, tiny, tmp_path):
    """`--vision_model_name_or_path` and `--stage1_name_or_path` take Hub repository ids as well as folders: the
    scripts read those folders file by file, so the repository is downloaded first (safetensors and configs only)."""
    from hub_server import TEST_USER, TestHub, patch_client
    from huggingface_hub import HfApi

    with TestHub() as server, patch_client(server.url, str(tmp_path / "hf_home")):
        api = HfApi()
        vision = tiny.parent / "siglip_vision"
        for name, folder in (("siglip", vision), ("siglip-stage1", stage1_runs["siglip"][0])):
            api.create_repo(f"{TEST_USER}/{name}")
            api.upload_folder(repo_id=f"{TEST_USER}/{name}", folder_path=folder)
        stage1 = run_stage1(tiny, tmp_path / "stage1", "--vision_model_name_or_path", f"{TEST_USER}/siglip")
        stage2 = run_stage2(tiny, f"{TEST_USER}/siglip-stage1", tmp_path / "stage2")
        with pytest.raises(FileNotFoundError, match="--vision_model_name_or_path testuser/no-such-encoder"):
            run_stage1(tiny, tmp_path / "bad", "--vision_model_name_or_path", f"{TEST_USER}/no-such-encoder")
    encoder = load_file(stage1 / "model.safetensors")
    assert all(torch.equal(encoder[key], load_file(stage2 / "model.safetensors")[key]) for key in encoder
               if key.startswith("vision_model.backbone."))  # fmt: skip
    original = load_file(vision / "model.safetensors")  # the encoder as uploaded, under the backbone's own names
    backbone = {key.removeprefix("vision_model.backbone."): tensor for key, tensor in encoder.items()
                if key.startswith("vision_model.backbone.")}  # fmt: skip
    assert backbone.keys() == original.keys()
    assert all(torch.equal(backbone[key], original[key]) for key in original)


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluation_scripts_with_a_foreign_encoder(family, stage1_runs, tiny, tmp_path):
    """`evaluation/retrieval.py` on the stage-1 folder and `evaluation/caption.py` on its stage-2 folder run with the
    encoder's own image processor (its size; DINOv2's differs from its config's) and score every image and text."""
    retrieval_script, caption_script = load_script("retrieval", "evaluation"), load_script("caption", "evaluation")
    entries = json.loads((tiny / "data" / "train.json").read_text())[:4]
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps(entries))
    common = ["--annotations", str(annotations), "--image_dir", str(tiny / "data"), "--num_workers", "0"]
    stage1 = stage1_runs[family][0]
    results = retrieval_script.main(
        ["--model", str(stage1), *common, "--k", "2", "--batch_size", "4", "--output_dir", str(tmp_path / "r")]
    )
    assert results["settings"]["num_images"] == 4 and results["settings"]["num_texts"] == 8
    assert 0 <= results["metrics"]["txt_r1"] <= 100 and 0 <= results["metrics"]["img_r1"] <= 100
    stage2 = tiny.parent / f"{family}_stage2"
    if not stage2.exists():
        run_stage2(tiny, stage1, stage2)
    results = caption_script.main(
        ["--model", str(stage2), *common, "--max_new_tokens", "4", "--batch_size", "4", "--output_dir",
         str(tmp_path / "c"), "--no-meteor", "--no-spice", "--num_beams", "1", "--min_new_tokens", "1"]
    )  # fmt: skip
    predictions = json.loads((tmp_path / "c" / "predictions.json").read_text())
    assert len(predictions) == 4 and all(isinstance(p["caption"], str) for p in predictions)
    assert results["metrics"]["overall"]["CIDEr"] is not None
