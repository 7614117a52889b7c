"""Strict loading (issue 20, item 2): a BLIP-2 folder that lacks tensors the class needs, holds tensors it does not
know or holds one of another shape is an error naming them, in `from_pretrained`, the CLI, the evaluation scripts and
the pipeline, instead of random weights and a run that "succeeds"; `strict=False` loads it anyway; the documented
differences between stages and formats still load.

The error is matched by its type's name, not imported: the tests then fail for the behaviour (not an ImportError) on
code without strict loading."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file

import blip2_hf
from blip2_hf.cli import main
from blip2_hf.testing_utils import draw_images, perturb_, save_tiny_generation_checkpoint, tiny_config_dict

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "model.safetensors"


def rewrite_weights(source: Path, folder: Path, edit) -> Path:
    """A copy of the checkpoint `source` whose `model.safetensors` is rewritten after `edit(tensors)`."""
    shutil.copytree(source, folder)
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    return folder


def drop(*prefixes: str):
    def edit(tensors: dict) -> None:
        for key in [key for key in tensors if key.startswith(prefixes)]:
            del tensors[key]

    return edit


# variant -> (edit of a complete stage-2 folder, the tensor the error must name)
VARIANTS = {
    "no_query_tokens": (drop("query_tokens"), "query_tokens"),
    "no_projection": (drop("language_projection."), "language_projection.weight"),
    "unknown_tensor": (
        lambda tensors: tensors.update({"qformer.stray.weight": torch.ones(3)}),
        "qformer.stray.weight",
    ),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A complete tiny stage-2 folder (`good`), the three broken copies of `VARIANTS`, a copy holding the weights of
    a model with 8 queries instead of 4 (`other_shape`), one with its weights cut in half (`truncated`), and images."""
    root = tmp_path_factory.mktemp("strict")
    save_tiny_generation_checkpoint(root / "good", num_query_tokens=4)
    for name, (edit, _) in VARIANTS.items():
        rewrite_weights(root / "good", root / name, edit)
    save_tiny_generation_checkpoint(root / "eight_queries", num_query_tokens=8)
    shutil.copytree(root / "good", root / "other_shape")
    shutil.copy(root / "eight_queries" / WEIGHTS, root / "other_shape" / WEIGHTS)
    shutil.copytree(root / "good", root / "truncated")
    data = (root / "good" / WEIGHTS).read_bytes()
    (root / "truncated" / WEIGHTS).write_bytes(data[: len(data) // 2])
    (root / "images" / "val2014").mkdir(parents=True)
    draw_images(1, size=(40, 30))[0].save(root / "images" / "val2014" / "COCO_val2014_000000000001.jpg")
    return root


def raises_mismatch(call, *args, **kwargs) -> str:
    """The message of the `CheckpointMismatchError` that `call` raises."""
    with pytest.raises(Exception) as info:
        call(*args, **kwargs)
    assert type(info.value).__name__ == "CheckpointMismatchError", repr(info.value)
    return str(info.value)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_class", [blip2_hf.Blip2ForConditionalGeneration, blip2_hf.Blip2Model])
def test_from_pretrained_names_the_tensors(world, variant, model_class):
    message = raises_mismatch(model_class.from_pretrained, world / variant)
    key = VARIANTS[variant][1]
    assert key in message and str(world / variant) in message and "strict=False" in message
    assert ("1 tensor unexpected" if variant == "unknown_tensor" else "missing") in message
    assert "\n" not in message
    # through the Auto class (as pipelines and remote code load) too
    auto = transformers.AutoModelForImageTextToText
    assert key in raises_mismatch(auto.from_pretrained, world / variant, trust_remote_code=True)


def test_another_shape_is_named_with_both_shapes(world):
    message = raises_mismatch(blip2_hf.Blip2ForConditionalGeneration.from_pretrained, world / "other_shape")
    assert "query_tokens (1, 8, 32) vs (1, 4, 32)" in message


def test_strict_false_loads_as_transformers_does(world):
    """The opt-out: the missing tensor starts at its init (not the saved values), the unknown one is dropped."""
    good = load_file(world / "good" / WEIGHTS)
    model, info = blip2_hf.Blip2ForConditionalGeneration.from_pretrained(
        world / "no_query_tokens", strict=False, output_loading_info=True
    )
    assert info["missing_keys"] == {"query_tokens"}
    assert not torch.equal(model.query_tokens.detach(), good["query_tokens"])
    torch.testing.assert_close(model.language_projection.weight.detach(), good["language_projection.weight"])
    model = blip2_hf.Blip2ForConditionalGeneration.from_pretrained(world / "unknown_tensor", strict=False)
    assert "qformer.stray.weight" not in model.state_dict()
    # a complete folder loads strictly, exactly
    model = blip2_hf.Blip2ForConditionalGeneration.from_pretrained(world / "good")
    torch.testing.assert_close(model.query_tokens.detach(), good["query_tokens"])


@pytest.mark.parametrize(
    "variant, named",
    [
        *((name, key) for name, (_, key) in VARIANTS.items()),
        ("other_shape", "query_tokens"),
        ("truncated", "safetensors"),
    ],
)
def test_cli_one_line_and_exit_2(world, capfd, variant, named):
    image = world / "images" / "val2014" / "COCO_val2014_000000000001.jpg"
    capfd.readouterr()
    code = main(["caption", str(image), "--model", str(world / variant), "--max-new-tokens", "2"])
    out, err = capfd.readouterr()
    assert code == 2 and out == "", (code, out, err)
    assert err.count("\n") == 1 and err.startswith("blip2-hf caption: error: cannot load "), err
    assert named in err and str(world / variant) in err


@pytest.fixture
def vqa_script():
    """evaluation/vqa.py as a module (as tests/test_evaluation.py runs it); the Accelerator singleton reset after."""
    evaluation = ROOT / "evaluation"
    if str(evaluation) not in sys.path:
        sys.path.insert(0, str(evaluation))
    spec = importlib.util.spec_from_file_location("evaluation_vqa_strict", evaluation / "vqa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    AcceleratorState._reset_state(reset_partial_state=True)


def test_vqa_evaluation_refuses_before_answering(world, tmp_path, vqa_script):
    questions = tmp_path / "questions.json"
    question = {"image_id": 1, "question": "What color is the circle?", "question_id": 1000}
    questions.write_text(json.dumps({"data_subtype": "val2014", "questions": [question]}))
    args = ["--questions", str(questions), "--image_dir", str(world / "images"), "--num_workers", "0"]
    with pytest.raises(SystemExit) as exit_info:
        vqa_script.main([*args, "--model", str(world / "no_query_tokens"), "--output_dir", str(tmp_path / "out")])
    message = str(exit_info.value.code)
    assert "query_tokens" in message and "\n" not in message
    assert not (tmp_path / "out" / "results.json").exists()
    assert not (tmp_path / "out" / "predictions.json").exists()


def test_pipeline_refuses_and_opts_out(world):
    """`pipeline` tries the config's `architectures` after a failed Auto class: transformers' own
    Blip2ForConditionalGeneration must not then load the folder with a random `query_tokens`."""
    folder = str(world / "no_query_tokens")
    message = raises_mismatch(transformers.pipeline, "image-to-text", model=folder, trust_remote_code=True)
    assert "query_tokens" in message
    captioner = transformers.pipeline(
        "image-to-text", model=folder, trust_remote_code=True, model_kwargs={"strict": False}
    )
    assert not type(captioner.model).__module__.startswith("transformers."), type(captioner.model)


def test_lora_folder_is_checked_on_its_base_weights(world, tmp_path):
    """A LoRA folder (base weights + adapter, as training/stage2.py saves it): transformers returns the adapter's
    loading info, yet a base tensor missing is still an error; complete, it loads with its adapter."""
    from peft import LoraConfig, get_peft_model

    model = blip2_hf.Blip2ForConditionalGeneration.from_pretrained(world / "good")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=r".*language_model\..*\.(q_proj|v_proj)"))
    peft_model.save_pretrained(tmp_path / "lora")
    peft_model.unload().save_pretrained(tmp_path / "lora")
    loaded = blip2_hf.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "lora")
    assert any("lora_" in name for name, _ in loaded.named_parameters())
    rewrite_weights(tmp_path / "lora", tmp_path / "lora_broken", drop("query_tokens"))
    message = raises_mismatch(blip2_hf.Blip2ForConditionalGeneration.from_pretrained, tmp_path / "lora_broken")
    assert "query_tokens" in message


def stage1_config() -> dict:
    config = tiny_config_dict("opt", text_input=True, image_token_index=None)
    config["qformer_config"].update(bos_token_id=98, eos_token_id=3)
    return config


def test_documented_differences_load_and_others_do_not(world, tmp_path, capfd, caplog):
    """Loads: a stage-1 folder into retrieval (its ITG head ignored), a transformers retrieval checkpoint (no `temp`:
    it starts at `initial_temperature`, said on stderr), an old checkpoint's `position_ids` buffer (silently: it is
    rebuilt). Refused, with a pointer: a stage-1 folder into stage 2 (random LLM), a retrieval folder into stage 1
    (random ITG head)."""
    torch.manual_seed(0)
    perturb_(blip2_hf.Blip2ForPreTraining(blip2_hf.Blip2Config(**stage1_config()))).save_pretrained(tmp_path / "s1")
    blip2_hf.Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "s1")
    reference = transformers.Blip2ForImageTextRetrieval(transformers.Blip2Config(**stage1_config()))
    reference.save_pretrained(tmp_path / "hf_retrieval")
    capfd.readouterr()
    model = blip2_hf.Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf_retrieval")
    assert model.temp.item() == pytest.approx(model.config.initial_temperature)
    assert "has no temp" in caplog.text and "initial_temperature=0.07" in caplog.text, caplog.text
    assert "LOAD REPORT" not in capfd.readouterr().err  # that warning instead of transformers' table
    buffers = rewrite_weights(
        world / "good", tmp_path / "buffers", lambda t: t.update({"qformer.position_ids": torch.arange(3)})
    )
    blip2_hf.Blip2ForConditionalGeneration.from_pretrained(buffers)
    assert "position_ids" not in capfd.readouterr().err

    message = raises_mismatch(blip2_hf.Blip2ForConditionalGeneration.from_pretrained, tmp_path / "s1")
    assert "language_model." in message and "from_stage1" in message and "cls.predictions" in message
    message = raises_mismatch(blip2_hf.Blip2ForPreTraining.from_pretrained, tmp_path / "hf_retrieval")
    assert "5 tensors missing (cls.predictions." in message
