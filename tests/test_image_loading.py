"""One image loader (`blip2_hf.load_image`) for every entry point: a 16-bit PNG, a float TIFF, a palette PNG with a
transparent entry, a half-transparent RGBA PNG and an EXIF-rotated JPEG give the same pixels through the pipeline, the
processor, the CLI and the training collators, and missing paths or folders give errors that say so."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import blip2_hf
from blip2_hf import cli, data, feature_cache
from blip2_hf.data import Stage2Collator
from blip2_hf.testing_utils import (
    draw_images,
    make_opt_tokenizer,
    save_tiny_generation_checkpoint,
    tiny_config_dict,
    tiny_vision_config,
)

SIZE = (40, 30)


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    weight = alpha[..., None].astype(np.float64) / 255.0
    return np.rint(rgb * weight + 255.0 * (1.0 - weight)).astype(np.uint8)


def _write_files(folder) -> dict[str, np.ndarray]:
    """Write the test files; returns `{name: the 8-bit RGB pixels a viewer shows}`, computed without the loader."""
    base = draw_images(1, size=SIZE)[0]
    rgb = np.asarray(base)
    grey = np.asarray(base.convert("L"))
    grey_rgb = np.repeat(grey[..., None], 3, axis=-1)
    expected = {}

    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "16-bit.png")
    expected["16-bit.png"] = grey_rgb
    Image.fromarray(grey.astype(np.float32) / 255).save(folder / "float.tiff")
    expected["float.tiff"] = grey_rgb

    palette = base.convert("P")
    indices = np.asarray(palette)
    transparent = int(np.bincount(indices.ravel()).argmax())  # the background's entry: transparency matters
    palette.save(folder / "palette.png", transparency=transparent)
    colours = np.asarray(palette.convert("RGB")).copy()
    assert (colours[indices == transparent] != 255).any()  # else white compositing would go unnoticed
    colours[indices == transparent] = 255
    expected["palette.png"] = colours

    alpha = (grey // 2).astype(np.uint8)
    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
    Image.fromarray(rgba).save(folder / "rgba.png")
    expected["rgba.png"] = _composite_on_white(rgb, alpha)

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: shown rotated 90 degrees clockwise
    base.save(folder / "exif.jpg", exif=exif, quality=95)
    with Image.open(folder / "exif.jpg") as stored:
        expected["exif.jpg"] = np.rot90(np.asarray(stored.convert("RGB")), k=-1)
    return expected


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return folder, _write_files(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    save_tiny_generation_checkpoint(folder, "opt")
    return folder


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return transformers.pipeline("image-to-text", model=str(checkpoint), trust_remote_code=True)


NAMES = ["16-bit.png", "float.tiff", "palette.png", "rgba.png", "exif.jpg"]


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_point_gives_the_same_pixels(name, files, pipe):
    folder, expected = files
    path = folder / name
    processor = pipe.processor
    reference = processor(images=Image.fromarray(expected[name]), return_tensors="pt")["pixel_values"]

    def pixels(image) -> torch.Tensor:
        return processor(images=image, return_tensors="pt")["pixel_values"]

    assert np.array_equal(np.asarray(blip2_hf.load_image(path)), expected[name])
    assert np.array_equal(np.asarray(blip2_hf.load_image(str(path))), expected[name])
    assert np.array_equal(np.asarray(blip2_hf.load_image(path.read_bytes())), expected[name])
    with Image.open(path) as opened:  # the processor given the file as PIL opens it
        assert torch.equal(pixels(opened), reference)
    # the pipeline (its remote code from the checkpoint), from the path
    assert torch.equal(pipe.preprocess(str(path))["pixel_values"], reference)
    # the CLI's reader
    assert np.array_equal(np.asarray(cli._read_image(path, "caption")), expected[name])
    # training: a caption JSON row (a path) and a webdataset row (bytes)
    collator = Stage2Collator(processor)
    rows = [{"image": str(path), "caption": "a photo"}, {"image": {"bytes": path.read_bytes()}, "caption": "a photo"}]
    assert torch.equal(collator(rows)["pixel_values"], torch.cat([reference, reference]))


def test_pipeline_of_a_foreign_encoder_reads_files_by_the_same_rules(files, tmp_path):
    """A checkpoint whose image processor is its encoder's own (SigLIP's, no `load_image`): the pipeline still
    reads paths with BLIP-2's loader (it refused them, so the model card's `captioner("image.jpg")` failed for every
    bring-your-own encoder), then resizes and normalizes with SigLIP's processor."""
    folder, expected = files
    processor = blip2_hf.Blip2Processor(
        transformers.SiglipImageProcessor(size={"height": 32, "width": 32}), make_opt_tokenizer(), num_query_tokens=4
    )
    config = tiny_config_dict(
        "opt", image_token_index=processor.image_token_id, vision_config=tiny_vision_config("siglip")
    )
    config["text_config"].update(
        vocab_size=len(processor.tokenizer) + 4, bos_token_id=2, eos_token_id=2, pad_token_id=1
    )
    torch.manual_seed(0)
    blip2_hf.Blip2ForConditionalGeneration(blip2_hf.Blip2Config(**config)).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pipe = transformers.pipeline("image-to-text", model=str(tmp_path), trust_remote_code=True)
    assert not hasattr(pipe.processor.image_processor, "load_image")
    for name in ("16-bit.png", "rgba.png", "exif.jpg"):
        reference = pipe.processor(images=Image.fromarray(expected[name]), return_tensors="pt")["pixel_values"]
        assert torch.equal(pipe.preprocess(str(folder / name))["pixel_values"], reference), name
    path = folder / "exif.jpg"
    assert pipe(str(path), max_new_tokens=3) == pipe(Image.fromarray(expected["exif.jpg"]), max_new_tokens=3)


def test_training_evaluation_and_feature_cache_use_the_same_loader():
    # evaluation/{caption,vqa,retrieval}.py import `blip2_hf.data.load_image`
    assert data.load_image is blip2_hf.load_image is feature_cache.load_image


def test_pipeline_output_depends_on_the_16_bit_content(files, pipe):
    """The bug this guards against: transformers' `load_image` turned every 16-bit PNG white."""
    folder, _ = files
    white = pipe.processor(images=Image.new("RGB", SIZE, "white"), return_tensors="pt")["pixel_values"]
    assert not torch.equal(pipe.preprocess(str(folder / "16-bit.png"))["pixel_values"], white)


def test_missing_path_and_folder_errors(tmp_path, pipe):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match=r"Image file '.*nope\.png' does not exist"):
        blip2_hf.load_image(missing)
    with pytest.raises(IsADirectoryError, match=r"is a folder; expected an image file"):
        blip2_hf.load_image(tmp_path)
    # the pipeline said "Incorrect padding" (it tried the path as base64)
    with pytest.raises(FileNotFoundError, match=r"nope\.png' does not exist"):
        pipe(str(missing))
    with pytest.raises(IsADirectoryError, match=r"is a folder"):
        pipe(str(tmp_path))
    with pytest.raises(TypeError, match=r"Cannot load an image from a builtins\.int"):
        blip2_hf.load_image(3)


def test_cli_names_missing_files_and_folders(tmp_path, checkpoint, files, capsys):
    folder, _ = files
    missing = tmp_path / "nope.png"
    code = cli.main(["caption", str(missing), str(tmp_path), str(folder / "rgba.png"), "--model", str(checkpoint),
                     "--max-new-tokens", "2"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 1
    assert f"cannot read {missing}: FileNotFoundError: Image file '{missing}' does not exist." in err
    assert f"{tmp_path}: the folder holds no image files" in err  # a folder is read for its images (none here)
    assert out.startswith(f"{folder / 'rgba.png'}\t")  # the readable image is still captioned


def test_data_uri_and_arrays(files):
    import base64

    folder, expected = files
    uri = "data:image/png;base64," + base64.b64encode((folder / "rgba.png").read_bytes()).decode()
    assert np.array_equal(np.asarray(blip2_hf.load_image(uri)), expected["rgba.png"])
    with pytest.raises(ValueError, match="does not hold valid base64"):
        blip2_hf.load_image("data:image/png;base64,@@@")
    # an RGBA array is composited like the RGBA file
    rgba = np.asarray(Image.open(folder / "rgba.png"))
    assert np.array_equal(np.asarray(blip2_hf.load_image(rgba)), expected["rgba.png"])


class _PngHandler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_url_is_read_with_the_same_rules(files):
    folder, expected = files
    handler = type("Handler", (_PngHandler,), {"body": (folder / "16-bit.png").read_bytes()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/image.png"
        assert np.array_equal(np.asarray(blip2_hf.load_image(url)), expected["16-bit.png"])
    finally:
        server.shutdown()
        server.server_close()


def test_url_that_never_answers_times_out_naming_it():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # connections complete in the backlog; nothing is ever sent back
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/image.png"
    try:
        start = time.monotonic()
        with pytest.raises(OSError, match=rf"Could not download the image {url} \(timeout 0.5 s\)"):
            blip2_hf.load_image(url, timeout=0.5)
        assert time.monotonic() - start < 5
    finally:
        silent.close()
