"""The whole user loop with bring-your-own towers, every step a subprocess as the user runs it: a SigLIP vision model's
own folder (`SiglipVisionModel` + `SiglipImageProcessor`) as the frozen image encoder and a Qwen2 LLM (a tokenizer with
a ChatML chat template) as the frozen voice, with training/tiny_setup.py's BERT for the Q-Former.

`stage1.py` in 2 CPU processes (`accelerate launch --multi_gpu`, gloo) for 2 steps, then resumed to 3 -> `stage2.py`
onto Qwen2 with the chat template and LoRA on all its linear layers -> `blip2-hf caption`, `blip2-hf ask
--chat-template`, `evaluation/vqa.py --use_chat_template` and `pipeline("image-to-text")` on the stage-2 folder -> a
frozen-feature cache of the stage-1 folder (`blip2-hf-cache-features`) and stage 2 trained from it -> `blip2-hf push
--merge-lora` to the loopback test Hub -> a fresh process where `blip2_hf` cannot be imported loads the repo by its id
and generates what the local folder gives.

One module fixture runs the loop (the steps after stage 2 side by side); the tests check each step's outputs."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hub_server import TEST_USER, TestHub, client_env
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from test_llm_families import save_family_llm
from test_train_use_publish import one_line, run_command, user_env
from transformers import SiglipImageProcessor, SiglipVisionModel

import blip2_hf
from blip2_hf.testing_utils import tiny_vision_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

PYTHON = sys.executable
IMAGES = ["tiny_work/data/images/0000.png", "tiny_work/data/images/0001.png"]  # as tiny_setup.py draws them
PROMPT = "Describe the image."
QUESTION = "what color is the shape?"
REPO_ID = f"{TEST_USER}/tiny-siglip-qwen2"
CAPTION_ARGS = dict(num_beams=3, max_new_tokens=8)
ASK_ARGS = dict(num_beams=3, max_new_tokens=6, min_new_tokens=1)  # `ask` adds min_new_tokens=1 (LAVIS's min_len)
COMMON = [
    "--train_data", "tiny_work/data/train.json", "--augment", "false", "--per_device_train_batch_size", "4",
    "--logging_steps", "1", "--warmup_steps", "0", "--use_cpu", "true", "--report_to", "none",
    "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--seed", "42",
]  # fmt: skip
STAGE1 = [
    str(ROOT / "training" / "stage1.py"), "--config_name", "tiny_work/stage1_config", "--vision_model_name_or_path",
    "siglip", "--bert_name_or_path", "tiny_work/bert", "--max_length", "16", "--output_dir", "stage1",
    "--save_steps", "1", *COMMON,
]  # fmt: skip
# The ChatML prompt alone is 32 tokens of the tiny tokenizer: 48 leaves room for the captions.
STAGE2 = [
    PYTHON, str(ROOT / "training" / "stage2.py"), "--stage1_name_or_path", "stage1", "--language_model_name_or_path",
    "qwen2", "--use_chat_template", "true", "--prompt", PROMPT, "--max_length", "48", "--lora_r", "4",
    "--lora_target_modules", "all-linear", "--learning_rate", "1e-3", "--save_steps", "1000", *COMMON,
]  # fmt: skip
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Qwen2's, lm_head aside
CLI = [PYTHON, "-m", "blip2_hf.cli"]

# What is compared across processes: this code runs in the fresh process on the repo loaded by id, and here on the
# local folder. Captions and the chat-template answer as `blip2-hf caption` / `ask --chat-template` generate them,
# plus the first greedy caption steps' logits of both images (a LoRA adapter lost on the way changes those even where
# it changes no token; two images giving the same logits would mean the image is not read).
OUTPUTS = textwrap.dedent(
    f"""
    import torch

    QUESTION = {QUESTION!r}
    CAPTION_ARGS, ASK_ARGS = {CAPTION_ARGS!r}, {ASK_ARGS!r}


    @torch.no_grad()
    def outputs(model, processor, images):
        def new_tokens(inputs, **kwargs):
            ids = model.generate(**inputs, do_sample=False, **kwargs)
            if "input_ids" in inputs:  # the prompt, then the new tokens (images alone: the ids as generate gives them)
                ids = ids[:, inputs["input_ids"].shape[1]:]
            return ids.tolist(), [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]

        captioned = processor(images=images, return_tensors="pt")
        caption_ids, captions = new_tokens(captioned, **CAPTION_ARGS)
        asked = processor(images=images[0], text=processor.chat_prompt(QUESTION), return_tensors="pt")
        answer_ids, answers = new_tokens(asked, **ASK_ARGS)
        greedy = model.generate(**captioned, do_sample=False, max_new_tokens=3, output_logits=True,
                                return_dict_in_generate=True)
        return dict(caption_ids=caption_ids, captions=captions, answer_ids=answer_ids, answer=answers[0],
                    logits=torch.stack(greedy.logits, 1).tolist(), model_module=type(model).__module__,
                    image_processor=type(processor.image_processor).__name__)
    """
)

FRESH_PROCESS = OUTPUTS + textwrap.dedent(
    """
    import json, re, sys
    sys.modules["blip2_hf"] = None  # everything must come from the repo
    try:
        import blip2_hf  # noqa: F401
        raise SystemExit("blip2_hf should not be importable here")
    except ImportError:
        pass
    from huggingface_hub import hf_hub_download
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    repo_id, image_paths = sys.argv[1], json.loads(sys.argv[2])
    images = [Image.open(path).convert("RGB") for path in image_paths]
    images[0].save("image.jpg")  # what the card's snippet opens
    with open(hf_hub_download(repo_id, "README.md"), encoding="utf-8") as file:
        exec(re.search("```python(.*?)```", file.read(), re.DOTALL).group(1), {})  # the card's snippet runs
    model = AutoModelForImageTextToText.from_pretrained(repo_id, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)
    print("RESULT" + json.dumps(outputs(model, processor, images)))
    """
)


def save_towers(work: Path) -> None:
    """The user's own towers, each saved as its own folder: a SigLIP vision model with its image processor, and a
    Qwen2 LLM with its ChatML tokenizer. The Q-Former tokenizer goes beside tiny_setup.py's BERT, so that stage1.py
    builds its processor from the towers' folders alone (no processor folder)."""
    torch.manual_seed(0)
    SiglipVisionModel(tiny_vision_config("siglip")).save_pretrained(work / "siglip")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(work / "siglip")
    save_family_llm(work / "qwen2", "qwen2")
    for file in (work / "tiny_work" / "processor_opt" / "qformer_tokenizer").iterdir():
        shutil.copy(file, work / "tiny_work" / "bert" / file.name)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_stage1(work: Path, env: dict[str, str]) -> dict:
    """Stage 1 in two CPU processes for 2 steps (a checkpoint each step), then the same command resumed to step 3."""
    launch = [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", *STAGE1]
    ddp_env = dict(env, ACCELERATE_USE_CPU="1")
    first = run_command([*launch, "--max_steps", "2"], work, ddp_env)
    checkpoint2 = work / "stage1" / "checkpoint-2"
    before = {name: digest(checkpoint2 / name) for name in ("model.safetensors", "trainer_state.json")}
    state2 = json.loads((checkpoint2 / "trainer_state.json").read_text())
    resumed = run_command([*launch, "--max_steps", "3", "--resume_from_checkpoint", "last"], work, ddp_env)
    return dict(
        first=first,
        resumed=resumed,
        checkpoint2_before=before,
        checkpoint2_after={name: digest(checkpoint2 / name) for name in before},
        state2=state2,
    )


def from_cache(work: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The frozen-feature cache of the stage-1 folder (fp32: the features as the pixel run computes them), then stage 2
    from it for one step."""
    run_command(["blip2-hf-cache-features", "--model", "stage1", "--data", "tiny_work/data/train.json", "--output",
                 "cache", "--dtype", "fp32", "--no-progress"], work, env)  # fmt: skip
    return run_command([*STAGE2, "--feature_cache", "cache", "--output_dir", "stage2_cached", "--max_steps", "1"],
                       work, env)  # fmt: skip


def evaluate_and_push(work: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """evaluation/vqa.py through the chat template on a question file of one's own, then the folder pushed with its
    LoRA merged and the evaluation on its card."""
    questions = [
        {"question_id": 1, "question": QUESTION.capitalize(), "image": "images/0000.png", "answer": ["red"] * 3},
        {"question_id": 2, "question": "Which shape is it?", "image": "images/0001.png", "answer": ["circle"]},
    ]
    (work / "my_questions.json").write_text(json.dumps(questions))
    run_command(
        [PYTHON, str(ROOT / "evaluation" / "vqa.py"), "--model", "stage2", "--questions", "my_questions.json",
         "--image_dir", "tiny_work/data", "--output_dir", "eval", "--prompt", "{}", "--use_chat_template",
         "--num_beams", "3", "--max_new_tokens", "6", "--min_new_tokens", "1", "--length_penalty", "1.0",
         "--batch_size", "1", "--num_workers", "0"], work, env,
    )  # fmt: skip
    return run_command([*CLI, "push", "stage2", REPO_ID, "--results", "eval/results.json", "--merge-lora"], work, env)


@pytest.fixture(scope="module")
def loop(tmp_path_factory) -> dict:
    """The loop run once: what each step printed or wrote, with "remote" (the fresh process's outputs for the pushed
    repo) and "local" (the same computed here on the stage-2 folder)."""
    work = tmp_path_factory.mktemp("byo_loop")
    with TestHub() as hub:
        env = user_env(hub.url, work / "hf_home")
        run_command([PYTHON, str(ROOT / "training" / "tiny_setup.py"), "--output", "tiny_work", "--num-images", "16"],
                    work, env)  # fmt: skip
        save_towers(work)
        steps = dict(stage1=run_stage1(work, env))
        steps["stage2"] = run_command([*STAGE2, "--output_dir", "stage2", "--max_steps", "3"], work, env)
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = dict(
                caption=pool.submit(run_command, [*CLI, "caption", *IMAGES, "--model", "stage2", "--num-beams", "3",
                                                  "--max-new-tokens", "8"], work, env),
                ask=pool.submit(run_command, [*CLI, "ask", IMAGES[0], QUESTION, "--chat-template", "--prompt-template",
                                              "{}", "--model", "stage2", "--num-beams", "3", "--max-new-tokens", "6"],
                                work, env),
                push=pool.submit(evaluate_and_push, work, env),
                cached=pool.submit(from_cache, work, env),
            )  # fmt: skip
            steps.update({name: future.result() for name, future in futures.items()})

        fresh_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        fresh_env.update(client_env(hub.url, str(work / "empty_hf_home")))  # nothing cached from the push
        (work / "fresh").mkdir()
        images = json.dumps([str(work / image) for image in IMAGES])
        proc = run_command([PYTHON, "-c", FRESH_PROCESS, REPO_ID, images], work / "fresh", fresh_env)
        steps["remote"] = json.loads(proc.stdout.split("RESULT", 1)[1])
        steps["files"] = hub.files(REPO_ID)

    reference: dict = {}
    exec(OUTPUTS, reference)
    steps["images"] = [Image.open(work / image).convert("RGB") for image in IMAGES]
    model = blip2_hf.Blip2ForConditionalGeneration.from_pretrained(work / "stage2").eval()  # with its LoRA adapter
    steps["local"] = reference["outputs"](model, blip2_hf.Blip2Processor.from_pretrained(work / "stage2"),
                                          steps["images"])  # fmt: skip
    steps["work"] = work
    return steps


def trainer_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def logged_losses(text: str) -> list[str]:
    """The per-step loss lines the Trainer prints (not its closing summary)."""
    return re.findall(r"\{'loss': '([^']+)'", text)


def test_stage1_in_two_processes_resumes_at_step_2(loop):
    work, stage1 = loop["work"], loop["stage1"]
    output = work / "stage1"
    assert json.loads((output / "training_run.json").read_text())["num_processes"] == 2
    assert len(logged_losses(stage1["first"].stdout)) == 2
    # the resumed run trained step 3 only, from checkpoint-2, which it left as it was
    assert "Resuming from stage1/checkpoint-2" in stage1["resumed"].stderr
    assert len(logged_losses(stage1["resumed"].stdout)) == 1
    assert stage1["checkpoint2_after"] == stage1["checkpoint2_before"]
    state = trainer_state(output / "checkpoint-3")
    assert state["global_step"] == 3 and [entry["step"] for entry in state["log_history"]] == [1, 2, 3]
    assert state["log_history"][:2] == stage1["state2"]["log_history"]  # steps 1 and 2 carried over, not redone
    assert float(logged_losses(stage1["resumed"].stdout)[0]) == pytest.approx(state["log_history"][2]["loss"], 1e-3)
    step2, step3 = load_file(output / "checkpoint-2" / "model.safetensors"), load_file(output / "model.safetensors")
    assert not torch.equal(step2["query_tokens"], step3["query_tokens"])  # step 3 trained

    model = blip2_hf.Blip2ForPreTraining.from_pretrained(output)
    assert model.config.vision_config.model_type == "siglip_vision_model" and model.config.vision_feature_layer == -2
    siglip = SiglipVisionModel.from_pretrained(work / "siglip").state_dict()
    backbone = model.vision_model.backbone.state_dict()
    assert set(backbone) == set(siglip) and all(torch.equal(backbone[k], v) for k, v in siglip.items())  # frozen
    processor = blip2_hf.Blip2Processor.from_pretrained(output)
    assert type(processor.image_processor).__name__.startswith("SiglipImageProcessor")
    pixels = processor(images=loop["images"][0], return_tensors="pt")["pixel_values"]
    expected = SiglipImageProcessor.from_pretrained(work / "siglip")(loop["images"][0], return_tensors="pt")
    torch.testing.assert_close(pixels, expected["pixel_values"], atol=1e-6, rtol=0)


def test_stage2_trains_the_qformer_and_lora_on_every_qwen2_linear(loop):
    work = loop["work"]
    output = work / "stage2"
    assert len(logged_losses(loop["stage2"].stdout)) == 3
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and all(name in adapter["target_modules"] for name in LINEAR)
    model = blip2_hf.Blip2ForConditionalGeneration.from_pretrained(output)
    config = model.config
    assert (config.vision_config.model_type, config.text_config.model_type) == ("siglip_vision_model", "qwen2")
    lora = {name: param for name, param in model.named_parameters() if "lora_B" in name}
    assert {name for name in LINEAR if any(f".{name}.lora_B" in key for key in lora)} == set(LINEAR)
    assert all(param.abs().sum() > 0 for param in lora.values())  # every adapter trained (B starts at zero)
    assert not any("lora_" in name and "language_model" not in name for name, _ in model.named_parameters())

    stage1 = load_file(work / "stage1" / "model.safetensors")
    assert not torch.equal(model.qformer.layernorm.weight, stage1["qformer.layernorm.weight"])  # trained
    siglip = SiglipVisionModel.from_pretrained(work / "siglip").state_dict()
    backbone = model.vision_model.backbone.state_dict()
    assert all(torch.equal(backbone[k], v) for k, v in siglip.items())  # still the user's SigLIP, frozen
    base = load_file(output / "model.safetensors")  # the model under the adapter
    for key, value in load_file(work / "qwen2" / "model.safetensors").items():  # the user's Qwen2, untouched
        assert torch.equal(base[f"language_model.{key}"], value), key
    processor = blip2_hf.Blip2Processor.from_pretrained(output)
    assert processor.chat_prompt(PROMPT) == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"


def test_caption_ask_vqa_and_pipeline_agree(loop):
    work, local = loop["work"], loop["local"]
    captions = loop["caption"].stdout.splitlines()
    assert captions == [f"{image}\t{one_line(text)}" for image, text in zip(IMAGES, local["captions"])]
    # `ask --chat-template` and vqa.py --use_chat_template build the same chat prompt: the same answer, and the one
    # the chat prompt gives in-process
    answer = loop["ask"].stdout.strip("\n")
    assert answer == one_line(local["answer"])
    predictions = json.loads((work / "eval" / "predictions.json").read_text())
    assert [p["question_id"] for p in predictions] == [1, 2] and predictions[0]["answer"] == local["answer"]
    results = json.loads((work / "eval" / "results.json").read_text())
    assert results["settings"]["use_chat_template"] is True and results["metrics"]["num_questions"] == 2
    # the image is read: the two images give different logits
    logits = torch.tensor(local["logits"])
    assert logits.shape[:2] == (2, 3) and (logits[0] - logits[1]).abs().max() > 1e-3

    from transformers import pipeline

    captioner = pipeline("image-to-text", model=str(work / "stage2"), trust_remote_code=True)
    outputs = captioner(loop["images"], generate_kwargs=CAPTION_ARGS)
    assert [one_line(output[0]["generated_text"].strip()) for output in outputs] == [
        line.split("\t", 1)[1] for line in captions
    ]


def test_stage2_from_the_feature_cache_trains_on_the_same_features(loop):
    work = loop["work"]
    index = json.loads((work / "cache" / "index.json").read_text())
    assert index["vision_config"]["model_type"] == "siglip_vision_model" and index["embed_shape"] == [16, 32]
    cached = trainer_state(work / "stage2_cached" / "checkpoint-1")
    pixels = trainer_state(work / "stage2" / "checkpoint-3")
    # The same first batch, weights and seed: the cached features are the frozen SigLIP's on the same pixels, so the
    # first step's loss and gradient norm are the pixel run's.
    first = [entry for entry in pixels["log_history"] if entry.get("step") == 1 and "loss" in entry]
    assert cached["global_step"] == 1 and first
    for key in ("loss", "grad_norm"):
        assert cached["log_history"][0][key] == pytest.approx(first[0][key], rel=1e-4), key
    model = blip2_hf.Blip2ForConditionalGeneration.from_pretrained(work / "stage2_cached")
    assert any("lora_B" in name and param.abs().sum() > 0 for name, param in model.named_parameters())


def test_repo_loaded_by_id_without_the_package_generates_as_the_folder(loop):
    remote, local, files = loop["remote"], loop["local"], loop["files"]
    assert remote["model_module"].startswith("transformers_modules"), remote["model_module"]
    assert remote["image_processor"].startswith("SiglipImageProcessor")
    assert remote["caption_ids"] == local["caption_ids"] and remote["answer_ids"] == local["answer_ids"]
    assert remote["captions"] == local["captions"] and remote["answer"] == local["answer"]
    # merged LoRA: float rounding of W + BA only
    torch.testing.assert_close(torch.tensor(remote["logits"]), torch.tensor(local["logits"]), atol=1e-4, rtol=0)
    assert not any(name.startswith("adapter_") for name in files) and "model.safetensors" in files
    config = json.loads(files["config.json"])
    assert (config["vision_config"]["model_type"], config["text_config"]["model_type"]) == (
        "siglip_vision_model",
        "qwen2",
    )
    card = ModelCard(files["README.md"].decode())
    assert {(r.dataset_type, r.dataset_name) for r in card.data.eval_results} == {("custom", "my_questions.json")}
    assert "SigLIP" in card.text and "| script | `training/stage2.py` |" in card.text
