"""Auto classes and pipelines: in this process through the registration `import blip2_hf` does, and in a fresh process
where `blip2_hf` cannot be imported, through the code and `auto_map` a saved checkpoint carries."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from utils import draw_images

import blip2_hf
from blip2_hf.testing_utils import save_tiny_generation_checkpoint

NEW_TOKENS = 5


def build_checkpoint(folder, text: str) -> blip2_hf.Blip2ForConditionalGeneration:
    model = save_tiny_generation_checkpoint(folder, text)
    draw_images(1, size=(40, 30))[0].save(folder / "image.png")
    # 16-bit grey: decoded by Blip2ImageProcessor (scaled, not clipped), which must ship with the checkpoint
    grey = np.asarray(draw_images(1, size=(40, 30))[0].convert("L")).astype(np.uint16) * 257
    Image.fromarray(grey).save(folder / "image16.png")
    return model


@pytest.fixture(scope="module", params=["opt", "t5"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    return folder, build_checkpoint(folder, request.param), request.param


def test_checkpoint_carries_code_and_complete_auto_map(checkpoint):
    folder, _, _ = checkpoint
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "blip2_hf"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_blip2.Blip2Config",
        "AutoModel": "modeling_blip2.Blip2Model",
        "AutoModelForImageTextToText": "modeling_blip2.Blip2ForConditionalGeneration",
        "AutoModelForZeroShotImageClassification": "modeling_blip2.Blip2ForImageTextRetrieval",
        "AutoModelForPreTraining": "modeling_blip2.Blip2ForPreTraining",
    }
    assert config["custom_pipelines"]["image-to-text"]["impl"] == "pipeline_blip2.Blip2ImageToTextPipeline"
    code_files = ("configuration_blip2.py", "modeling_blip2.py", "losses.py", "remote_code.py", "pipeline_blip2.py")
    for name in (*code_files, "processing_blip2.py"):
        assert (folder / name).is_file(), name
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_blip2.Blip2Processor"
    # no class name: AutoProcessor would resolve "Blip2Processor" to transformers' class
    assert "processor_class" not in processor_config
    assert "processor_class" not in json.loads((folder / "tokenizer_config.json").read_text())


def test_auto_classes_in_process(checkpoint):
    folder, model, _ = checkpoint
    assert type(transformers.AutoConfig.from_pretrained(folder)) is blip2_hf.Blip2Config
    assert type(transformers.AutoModel.from_pretrained(folder)) is blip2_hf.Blip2Model
    loaded = transformers.AutoModelForImageTextToText.from_pretrained(folder)
    assert type(loaded) is blip2_hf.Blip2ForConditionalGeneration
    assert type(transformers.AutoProcessor.from_pretrained(folder)) is blip2_hf.Blip2Processor
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_pipelines_in_process(checkpoint):
    folder, model, text = checkpoint
    processor = blip2_hf.Blip2Processor.from_pretrained(folder)
    image = draw_images(1, size=(40, 30))[0]
    caption = transformers.pipeline("image-to-text", model=folder, trust_remote_code=True)
    assert type(caption).__name__ == "Blip2ImageToTextPipeline"  # the class from the checkpoint's code
    out = caption(image, max_new_tokens=NEW_TOKENS)
    expected = model.eval().generate(**processor(images=image, return_tensors="pt"), max_new_tokens=NEW_TOKENS)
    new = expected[:, 5:] if text == "opt" else expected  # OPT: the output starts with `<image> x 4, BOS`
    assert out == [{"generated_text": processor.batch_decode(new, skip_special_tokens=True)[0].strip()}]


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["blip2_hf"] = None  # the package cannot be imported: everything must come from the checkpoint
    try:
        import blip2_hf  # noqa: F401
        raise SystemExit("blip2_hf should not be importable here")
    except ImportError:
        pass
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

    folder, n = sys.argv[1], int(sys.argv[2])
    image = Image.open(folder + "/image.png")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    generator = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    ids = generator.generate(**processor(images=image, return_tensors="pt"), max_new_tokens=n)
    caption = pipeline("image-to-text", model=folder, trust_remote_code=True)
    answer = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    result = {
        "config": [type(config).__name__, config.model_type],
        "model": [type(model).__name__, type(model).__module__],
        "generator": [type(generator).__name__, type(generator).__module__],
        "processor": [type(processor).__name__, type(processor).__module__],
        "image_processor": [type(processor.image_processor).__name__, type(processor.image_processor).__module__],
        "pixels16": processor(images=Image.open(folder + "/image16.png"))["pixel_values"].tolist(),
        "generated_ids": ids.tolist(),
        "caption_pipeline": type(caption).__name__,
        "caption": caption(folder + "/image.png", max_new_tokens=n),
        "caption_with_prompt": caption(image, prompt="a photo of", max_new_tokens=n),
        "answer_pipeline": type(answer).__name__,
        "answer": answer(images=image, text="Question: what is it? Answer:", max_new_tokens=n),
    }
    print("RESULT" + json.dumps(result))
    """
)


def test_fresh_process_without_the_package(checkpoint):
    folder, model, text = checkpoint
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(folder), str(NEW_TOKENS)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=folder,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["config"] == ["Blip2Config", "blip2_hf"]
    assert result["model"][0] == "Blip2Model" and result["model"][1].startswith("transformers_modules")
    assert result["generator"][0] == "Blip2ForConditionalGeneration"
    assert result["generator"][1].startswith("transformers_modules")
    assert result["processor"][0] == "Blip2Processor" and result["processor"][1].startswith("transformers_modules")
    assert result["image_processor"][0] == "Blip2ImageProcessor"
    assert result["image_processor"][1].startswith("transformers_modules")
    assert result["caption_pipeline"] == "Blip2ImageToTextPipeline"
    assert result["answer_pipeline"] == "ImageTextToTextPipeline"

    # the remote code generates exactly what the package does
    processor = blip2_hf.Blip2Processor.from_pretrained(folder)
    sixteen_bit = processor(images=Image.open(folder / "image16.png"))["pixel_values"]
    assert Image.open(folder / "image16.png").mode in ("I;16", "I")
    assert np.array_equal(np.asarray(result["pixels16"], dtype=np.float32), sixteen_bit)
    image = Image.open(folder / "image.png")
    expected = model.eval().generate(**processor(images=image, return_tensors="pt"), max_new_tokens=NEW_TOKENS)
    assert result["generated_ids"] == expected.tolist()
    new = expected[:, 5:] if text == "opt" else expected
    assert result["caption"] == [{"generated_text": processor.batch_decode(new, skip_special_tokens=True)[0].strip()}]
    assert isinstance(result["caption_with_prompt"][0]["generated_text"], str)
    answer = result["answer"]
    assert len(answer) == 1 and answer[0]["generated_text"].startswith("Question: what is it? Answer:")


MODEL_ONLY_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["blip2_hf"] = None
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    print("RESULT", type(model).__module__, model.vision_model.embeddings.patch_embedding.weight.sum().item())
    """
)


def test_model_saved_without_its_processor_loads_as_remote_code(tmp_path):
    """`model.save_pretrained` alone (no processor beside it) ships code that loads where `blip2_hf` is not importable:
    the model code names no module the folder lacks (transformers' loader checks every relative import)."""
    model = save_tiny_generation_checkpoint(tmp_path / "full", "opt")
    model.save_pretrained(tmp_path / "model_only")
    assert not (tmp_path / "model_only" / "processing_blip2.py").exists()
    proc = subprocess.run(
        [sys.executable, "-c", MODEL_ONLY_SCRIPT, str(tmp_path / "model_only")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, weight_sum = proc.stdout.split("RESULT", 1)[1].split()
    assert module.startswith("transformers_modules")
    assert float(weight_sum) == pytest.approx(model.vision_model.embeddings.patch_embedding.weight.sum().item())
