"""Publishing against a loopback Hub (`tests/hub_server.py`): model cards built from results.json files, `push_folder`
(one atomic commit) and transformers' own `push_to_hub` for a trained stage-2 and stage-1 model and their processors,
then a fresh process without `blip2_hf` that loads every published repo by its id and gets the same outputs; and the
error cases: no token, a refused token, no write access, a commit the server fails, pickles."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import (
    OTHER_USER,
    READ_TOKEN,
    TEST_USER,
    WRITE_TOKEN,
    TestHub,
    client_env,
    patch_client,
)
from huggingface_hub import ModelCard
from utils import BENCHMARK_NAMES, draw_images, make_bert_tokenizer, make_opt_tokenizer

import blip2_hf
from blip2_hf import cli, hub
from blip2_hf.metrics import CAPTION_METRICS, retrieval_recall, vqa_accuracy
from blip2_hf.remote_code import AUTO_MAP, IMAGE_TO_TEXT_PIPELINE, REMOTE_CODE_FILES
from blip2_hf.testing_utils import perturb_, tiny_config_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
LLM_ID = "facebook/opt-125m"  # recorded in the stage-2 config as the LLM's `_name_or_path`
VISION_ID = "Salesforce/blip2-vit-g"  # given as an argument
NEW_TOKENS = 5
PROMPT = "Question: what is it? Answer:"
TEXTS = ["a red circle on a white background", "a black dog running in the green grass"]

# ---------------------------------------------------------------------------------------------------------------------
# The test Hub and the client pointed at it
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_hub(tmp_path_factory):
    """The loopback Hub, and this process's huggingface_hub / transformers pointed at it with an empty HF_HOME and
    `HF_TOKEN` = a write token it knows."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    with TestHub() as server, patch_client(server.url, str(hf_home)):
        yield server


# ---------------------------------------------------------------------------------------------------------------------
# Trained tiny models, saved as training leaves them
# ---------------------------------------------------------------------------------------------------------------------


def stage2_model_and_processor() -> tuple[blip2_hf.Blip2ForConditionalGeneration, blip2_hf.Blip2Processor]:
    processor = blip2_hf.Blip2Processor(
        image_processor=blip2_hf.Blip2Processor.default_image_processor(30),
        tokenizer=make_opt_tokenizer(),
        num_query_tokens=4,
    )
    config = tiny_config_dict("opt", image_token_index=processor.image_token_id)
    config["text_config"].update(
        vocab_size=len(processor.tokenizer) + 4, bos_token_id=2, eos_token_id=2, pad_token_id=1
    )
    config["text_config"]["_name_or_path"] = LLM_ID  # what stage 2 records when it loads the LLM by name
    torch.manual_seed(0)
    # "Trained": every weight moved off its initialization.
    model = perturb_(blip2_hf.Blip2ForConditionalGeneration(blip2_hf.Blip2Config(**config)), scale=0.2)
    return model, processor


def stage1_model_and_processor() -> tuple[blip2_hf.Blip2ForPreTraining, blip2_hf.Blip2Processor]:
    qformer_tokenizer = make_bert_tokenizer()
    processor = blip2_hf.Blip2Processor(
        image_processor=blip2_hf.Blip2Processor.default_image_processor(30),
        tokenizer=make_opt_tokenizer(),
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=4,
    )
    config = tiny_config_dict("opt", text_input=True, image_token_index=None)
    config["qformer_config"].update(
        vocab_size=len(qformer_tokenizer),
        bos_token_id=qformer_tokenizer.bos_token_id,  # [DEC]
        eos_token_id=qformer_tokenizer.sep_token_id,
    )
    torch.manual_seed(1)
    model = perturb_(blip2_hf.Blip2ForPreTraining(blip2_hf.Blip2Config(**config)), seed=1, scale=0.1)
    return model, processor


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stage2")
    model, processor = stage2_model_and_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "training_args.bin").write_bytes(b"\x80\x04 a pickle Trainer writes: never published")
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"\x80\x04 optimizer state")
    (folder / "checkpoint-2" / "trainer_state.json").write_text(
        json.dumps(
            {
                "global_step": 2,
                "epoch": 1.0,
                "train_batch_size": 4,
                "log_history": [
                    {"loss": 4.5, "learning_rate": 1e-4, "step": 1},
                    {"loss": 4.25, "learning_rate": 5e-5, "step": 2},
                ],
            }
        )
    )
    return folder, model, processor


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stage1")
    model, processor = stage1_model_and_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Path]:
    """results.json files as evaluation/{vqa,caption,retrieval}.py write them, with metrics from blip2_hf.metrics
    (VQA and retrieval computed here; caption scores need Java, so written with coco_caption_scores' keys)."""
    out = tmp_path_factory.mktemp("results")
    vqa = vqa_accuracy(["red", "blue", "cat"], [["red"] * 10, ["red"] * 3 + ["blue"] * 7, ["dog"] * 10])
    caption_scores = {"CIDEr": 1.2345, "Bleu_4": 0.3812, "SPICE": 0.2071, "METEOR": 0.29, "ROUGE_L": 0.58}
    caption = dict(caption_scores, **{f"{k}_x100": 100 * v for k, v in caption_scores.items()})
    assert set(caption_scores) <= set(CAPTION_METRICS)
    scores = torch.tensor([[0.9, 0.1, 0.3, 0.2], [0.2, 0.1, 0.8, 0.7]])  # 2 images x 4 texts
    retrieval = retrieval_recall(scores, scores.t(), [[0, 1], [2, 3]], [0, 0, 1, 1])

    def run(task: str, benchmark: str | None, file: str, metrics: dict, **extra) -> dict:
        """A results.json as the script writes it: a benchmark only with --benchmark, else custom."""
        label = dict(dataset=benchmark or "custom", benchmark=benchmark, dataset_file=file, protocol=benchmark)
        return dict(task=task, **label, metrics=metrics, **extra)

    files = {
        "vqa": run("vqa", "vqav2", "v2_OpenEnded_mscoco_val2014_questions.json", vqa, split="val", settings={}),
        "caption": run("caption", "coco", "coco_karpathy_test.json", {"overall": caption}, settings={}),
        "retrieval": run("retrieval", "flickr30k", "flickr30k_test.json", retrieval, settings={"split": "test"}),
        "custom_vqa": run("vqa", None, "my_questions.json", vqa, split=None, settings={}),
        "custom_caption": run("caption", None, "my_captions.json", {"overall": caption}, settings={}),
        "custom_retrieval": run("retrieval", None, "my_pairs.json", retrieval, settings={"split": "test"}),
    }
    paths = {}
    for name, data in files.items():
        (out / name).mkdir()
        paths[name] = out / name / "results.json"
        paths[name].write_text(json.dumps(data, indent=1))
    return paths


def test_test_hub_binds_loopback_only_and_stops_itself():
    import time
    import urllib.error
    import urllib.request

    server = TestHub(max_lifetime=0.5).start()
    assert server.url.startswith("http://127.0.0.1:")
    url = server.url + "/api/agent-harnesses"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # whatever proxy the environment sets
    assert json.loads(direct.open(url, timeout=5).read()) == {"standardEnvVars": [], "harnesses": {}}
    time.sleep(1.5)  # nobody calls stop(): the watchdog does
    with pytest.raises(urllib.error.URLError):
        direct.open(url, timeout=5)


# ---------------------------------------------------------------------------------------------------------------------
# Model cards
# ---------------------------------------------------------------------------------------------------------------------


def metrics_of(card: ModelCard) -> dict[tuple[str, str, str], float]:
    return {(r.task_type, r.dataset_type, r.metric_name): r.metric_value for r in card.data.eval_results or []}


def test_template_ships_in_the_package_and_model_cards_holds_the_same_file():
    assert hub.DEFAULT_TEMPLATE.is_file() and hub.DEFAULT_TEMPLATE.parent.parent == Path(blip2_hf.__file__).parent
    assert (REPO_ROOT / "model_cards" / "blip2.md").read_text() == hub.DEFAULT_TEMPLATE.read_text()
    setup_cfg = (REPO_ROOT / "setup.cfg").read_text()
    assert "blip2_hf = templates/*.md," in setup_cfg and "blip2-hf = blip2_hf_launch:main" in setup_cfg


def test_stage2_card_metadata_results_and_sections(stage2, results, tmp_path, test_hub):
    folder, _, _ = stage2
    card = hub.build_model_card(
        folder,
        "testuser/blip2-tiny",
        [results["vqa"], results["caption"].parent],
        base_models=[VISION_ID],
        datasets=["coco"],
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")  # a local path: parsed offline
    loaded.validate()  # the Hub's validate-yaml (the test Hub's)
    data = loaded.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-text-to-text"
    assert data.base_model == [LLM_ID, VISION_ID]  # the config's record first, then the argument
    assert data.datasets == ["coco"] and data.license == "mit"
    assert {"blip-2", "vision-language"} <= set(data.tags)
    vqa = json.loads(results["vqa"].read_text())["metrics"]["accuracy"]
    caption = json.loads(results["caption"].read_text())["metrics"]["overall"]
    assert data.model_name == "blip2-tiny"
    assert metrics_of(loaded) == {
        ("visual-question-answering", "vqav2", "VQA accuracy"): round(vqa, 2),
        ("image-to-text", "coco", "CIDEr"): round(caption["CIDEr_x100"], 2),
        ("image-to-text", "coco", "BLEU-4"): round(caption["Bleu_4_x100"], 2),
        ("image-to-text", "coco", "SPICE"): round(caption["SPICE_x100"], 2),
    }
    assert vqa == 66.67  # a real score (1, 1, 0), not a placeholder
    text = loaded.text
    for section in (
        "## Model details",
        "## Evaluation",
        "## How to use",
        "## Training",
        "## Limitations and biases",
        "## Citation",
    ):
        assert section in text, section
    assert f"| Image Captioning | COCO Karpathy | test | CIDEr | {round(caption['CIDEr_x100'], 2)} |" in text
    assert "AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)" in text
    assert 'pipeline("image-to-text", model=repo, trust_remote_code=True)' in text
    assert 'repo = "testuser/blip2-tiny"' in text
    assert "in-context learning" in text and "@inproceedings{li2023blip2" in text
    # the recipe comes from the latest checkpoint's trainer_state.json (training_args.bin is never unpickled)
    assert "| optimizer steps | 2 |" in text and "| last logged training loss | 4.2500 |" in text


def test_stage1_card_retrieval_results(stage1, results):
    folder, _, _ = stage1
    card = hub.build_model_card(folder, "testuser/blip2-stage1", [results["retrieval"]])
    data = ModelCard(str(card)).data
    assert data.pipeline_tag == "zero-shot-image-classification" and "q-former" in data.tags
    assert data.base_model is None  # nothing recorded, nothing given
    recall = json.loads(results["retrieval"].read_text())["metrics"]
    expected = {
        ("image-text-retrieval", "flickr30k", f"{d}@{k}"): round(recall[f"{key}_r{k}"], 2)
        for d, key in (("TR", "txt"), ("IR", "img"))
        for k in (1, 5, 10)
    }
    assert metrics_of(ModelCard(str(card))) == expected
    assert recall["txt_r1"] == 100.0 and recall["img_r1"] == 75.0  # text 1 ties both images: a miss (pessimistic)
    text = card.text
    assert "AutoModelForPreTraining.from_pretrained(repo, trust_remote_code=True)" in text
    # no record of the run: the card says so, and claims no recipe (never the paper's 129M images)
    assert "No record of the training run was found" in text and "129M" not in text


def test_card_without_results_has_no_model_index(stage2, tmp_path):
    folder, _, _ = stage2
    card = hub.build_model_card(folder, "testuser/x", None, license="apache-2.0")
    assert "model-index" not in str(card) and card.data.eval_results is None
    assert "No evaluation results were given" in card.text and card.data.license == "apache-2.0"
    empty = tmp_path / "results.json"
    empty.write_text(json.dumps({"task": "vqa", "dataset": "vqav2", "metrics": None}))  # predictions only
    assert "model-index" not in str(hub.build_model_card(folder, "testuser/x", [empty]))
    unknown = tmp_path / "other.json"
    unknown.write_text(json.dumps({"task": "segmentation", "metrics": {"miou": 1.0}}))
    with pytest.raises(ValueError, match="unknown task 'segmentation'"):
        hub.build_model_card(folder, "testuser/x", [unknown])
    with pytest.raises(FileNotFoundError):
        hub.build_model_card(folder, "testuser/x", [tmp_path / "missing.json"])


def test_nocaps_domains_and_metrics_not_computed(tmp_path):
    scores = {"CIDEr": 1.1, "CIDEr_x100": 110.0, "Bleu_4": 0.3, "Bleu_4_x100": 30.0, "SPICE": None, "SPICE_x100": None}
    path = tmp_path / "results.json"
    metrics = {"overall": scores, "in-domain": dict(scores, CIDEr_x100=120.5, SPICE=0.15, SPICE_x100=15.0)}
    path.write_text(json.dumps({"task": "caption", "dataset": "nocaps", "benchmark": "nocaps", "metrics": metrics}))
    entries = {
        (r.dataset_name, r.dataset_config, r.dataset_split, r.metric_name): r.metric_value
        for r in hub.eval_results_from_json(tmp_path)  # a folder means its results.json
    }
    assert entries == {
        ("NoCaps", None, "validation", "CIDEr"): 110.0,
        ("NoCaps", None, "validation", "BLEU-4"): 30.0,
        ("NoCaps (in-domain)", "in-domain", "validation", "CIDEr"): 120.5,
        ("NoCaps (in-domain)", "in-domain", "validation", "BLEU-4"): 30.0,
        ("NoCaps (in-domain)", "in-domain", "validation", "SPICE"): 15.0,
    }  # SPICE was skipped overall (null): no entry, never a placeholder


def test_custom_template(stage2, tmp_path):
    folder, _, _ = stage2
    template = tmp_path / "card.md"
    template.write_text("---\n{{ card_data }}\n---\n# {{ title }} ({{ kind }}) for {{ repo_id }}\n")
    card = hub.build_model_card(folder, "testuser/custom", template_path=template)
    assert card.text.strip() == "# custom (stage2) for testuser/custom"
    assert card.data.pipeline_tag == "image-text-to-text"


def test_custom_data_results_name_no_benchmark(stage2, results, tmp_path, caplog):
    """Results on your own files are `custom` in the model-index, named by the file; so is a results.json that
    labels a benchmark without recording that it ran one (written before --benchmark existed)."""
    legacy = tmp_path / "legacy.json"
    legacy_data = json.loads(results["vqa"].read_text())
    del legacy_data["benchmark"]
    legacy_data["settings"] = {"questions": "/data/mine/questions_v3.json"}
    del legacy_data["dataset_file"]
    legacy.write_text(json.dumps(legacy_data))
    paths = [results["custom_vqa"], results["custom_caption"], results["custom_retrieval"], legacy]
    with caplog.at_level(logging.WARNING, logger="blip2_hf"):
        card = hub.build_model_card(stage2[0], "testuser/mine", paths)
    assert "does not record a benchmark run" in caplog.text and "--benchmark vqav2" in caplog.text
    entries = card.data.eval_results
    assert len(entries) == 1 + 3 + 6 + 1
    assert {(r.dataset_type, r.dataset_split) for r in entries} == {("custom", None)}
    assert {r.dataset_name for r in entries} == {
        "my_questions.json", "my_captions.json", "my_pairs.json", "questions_v3.json",
    }  # fmt: skip
    for name in BENCHMARK_NAMES:  # as words: "pycocoevalcap" names a tool, not a dataset
        assert not re.search(rf"\b{name}\b", str(card)), name
    assert "not on a published\nbenchmark" in card.text
    mismatch = tmp_path / "mismatch.json"
    mismatch.write_text(json.dumps(dict(legacy_data, benchmark="gqa")))  # dataset vqav2, benchmark gqa
    with pytest.raises(ValueError, match="benchmark 'gqa' with dataset 'vqav2'"):
        hub.eval_results_from_json(mismatch)


def load_training_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"training_{name}", REPO_ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_card_training_section_is_the_saved_run(stage2, tmp_path, monkeypatch):
    """training/stage2.py records its run (`write_training_run`, called with its own argument dataclasses and the
    Trainer's state); the card shows that run, not the paper's recipe, and no local model as `base_model`."""
    from transformers import TrainerState

    from blip2_hf.trainer import Blip2TrainingArguments

    stage2_script = load_training_script("stage2")
    folder = tmp_path / "run"
    shutil.copytree(stage2[0], folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["_name_or_path"] = "tiny_work/opt"  # a relative local path: it looks like a Hub id
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)  # where training ran: tiny_work/opt and tiny_work/stage1 exist here
    (tmp_path / "tiny_work" / "opt").mkdir(parents=True)
    (tmp_path / "tiny_work" / "stage1").mkdir()
    model_args = stage2_script.ModelArguments(
        stage1_name_or_path="tiny_work/stage1", language_model_name_or_path="tiny_work/opt", lora_r=4
    )
    data_args = stage2_script.DataArguments(train_data=["tiny_work/data/train.json", "shards/{000..003}.tar"],
                                            train_data_weights=[3.0, 1.0], prompt="a photo of ")  # fmt: skip
    training_args = Blip2TrainingArguments(
        output_dir=str(folder), learning_rate=3e-4, per_device_train_batch_size=8, max_steps=40, warmup_steps=5
    )
    history = [{"loss": 5.0, "step": 20}, {"loss": 3.125, "step": 40}, {"train_loss": 4.0625, "step": 40}]
    state = TrainerState(global_step=40, epoch=2.5, log_history=history)
    hub.write_training_run(folder, "training/stage2.py", (model_args, data_args, training_args), state, 2)
    monkeypatch.chdir(REPO_ROOT)  # the card is built elsewhere: tiny_work/opt no longer exists from here

    card = hub.build_model_card(folder, "testuser/run", None)
    text = card.text
    for row in (
        "| script | `training/stage2.py` |",
        "| language_model_name_or_path | a local folder (`opt`) |",
        "| training data | `train.json` (weight 3.0), `{000..003}.tar` (weight 1.0) |",
        "| LoRA | r=4, alpha=16 on the LLM's q/v projections |",
        "| prompt | `a photo of ` |",
        "| learning_rate | 0.0003 |",
        "| max_steps | 40 |",
        "| global batch size | 16 |",
        "| optimizer steps | 40 |",
        "| last logged training loss | 3.1250 |",
        "| mean training loss | 4.0625 |",
        "(From training_run.json, saved with the weights.)",
        "apart from the LoRA adapters added to the language model",
    ):
        assert row in text, row
    assert "num_train_epochs" not in text  # max_steps set: epochs are not the recipe
    assert "129M" not in text and "LAION" not in text
    assert card.data.base_model is None  # "tiny_work/opt" was a local folder, not the Hub's
    assert "tiny_work" not in str(card.data.to_dict())


# ---------------------------------------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def published(test_hub, stage2, stage1, results) -> dict[str, str]:
    """Four repos: each trained model published by `push_folder` and by transformers' `push_to_hub` (model, then
    processor). Returns {repo_id: "stage2" | "stage1"}."""
    repos = {}
    hub.push_folder(stage2[0], f"{TEST_USER}/stage2", results=[results["vqa"], results["caption"]])
    repos[f"{TEST_USER}/stage2"] = "stage2"
    hub.push_folder(stage1[0], f"{TEST_USER}/stage1", results=[results["retrieval"]])
    repos[f"{TEST_USER}/stage1"] = "stage1"
    for kind, (_, model, processor) in (("stage2", stage2), ("stage1", stage1)):
        repo_id = f"{TEST_USER}/{kind}-push-to-hub"
        model.push_to_hub(repo_id)
        processor.push_to_hub(repo_id)
        repos[repo_id] = kind
    return repos


def assert_loadable_without_the_package(files: dict[str, bytes], generates: bool) -> None:
    config = json.loads(files["config.json"])
    assert config["auto_map"] == AUTO_MAP
    if generates:
        assert config["custom_pipelines"]["image-to-text"] == IMAGE_TO_TEXT_PIPELINE
    for name in (*REMOTE_CODE_FILES, "processing_blip2.py"):
        assert name in files, name
    assert (
        json.loads(files["processor_config.json"])["auto_map"]["AutoProcessor"] == "processing_blip2.Blip2Processor"
    )
    for name in ("processor_config.json", "tokenizer_config.json"):  # by name, AutoProcessor would pick transformers'
        assert "processor_class" not in json.loads(files[name]), name
    assert "model.safetensors" in files and "tokenizer.json" in files


def test_push_folder_publishes_everything_in_one_commit(test_hub, published, stage2, stage1):
    for kind, (folder, _, _) in (("stage2", stage2), ("stage1", stage1)):
        repo_id = f"{TEST_USER}/{kind}"
        files = test_hub.files(repo_id)
        assert [c.title for c in test_hub.commits(repo_id)][1:] == [
            f"Upload BLIP-2 ({json.loads(files['config.json'])['architectures'][0]}) with blip2-hf {blip2_hf.__version__}"
        ]  # the repo's initial commit, then exactly one
        assert_loadable_without_the_package(files, generates=kind == "stage2")
        for name in ("model.safetensors", "config.json", "tokenizer.json", "processor_config.json"):
            assert files[name] == (folder / name).read_bytes(), name
        assert not any(name.endswith((".bin", ".pt")) or name.startswith("checkpoint-") for name in files)
        card = ModelCard(files["README.md"].decode())
        assert card.data.eval_results, "the card carries the results"
    stage1_files = test_hub.files(f"{TEST_USER}/stage1")
    assert {"qformer_tokenizer/tokenizer.json", "qformer_tokenizer/tokenizer_config.json"} <= set(stage1_files)


def test_push_to_hub_of_models_and_processor(test_hub, published):
    for repo_id, kind in published.items():
        if "push-to-hub" in repo_id:
            files = test_hub.files(repo_id)
            assert_loadable_without_the_package(files, generates=kind == "stage2")
            titles = [c.title for c in test_hub.commits(repo_id)][1:]
            assert titles == [
                f"Upload {'Blip2ForConditionalGeneration' if kind == 'stage2' else 'Blip2ForPreTraining'}",
                "Upload processor",
            ]
    assert "qformer_tokenizer/tokenizer.json" in test_hub.files(f"{TEST_USER}/stage1-push-to-hub")


def test_processor_save_pretrained_with_push_to_hub_names_no_processor_class(test_hub, stage1, tmp_path):
    repo_id = f"{TEST_USER}/processor-save-and-push"
    stage1[2].save_pretrained(tmp_path / "processor", push_to_hub=True, repo_id=repo_id, commit_message="processor")
    files = test_hub.files(repo_id)
    assert [c.title for c in test_hub.commits(repo_id)][1:] == ["processor"]
    for name in ("processor_config.json", "tokenizer_config.json", "qformer_tokenizer/tokenizer_config.json"):
        assert "processor_class" not in json.loads(files[name]), name
        assert "processor_class" not in json.loads((tmp_path / "processor" / name).read_text()), name
    assert json.loads(files["processor_config.json"])["auto_map"]["AutoProcessor"] == "processing_blip2.Blip2Processor"


# The outputs compared across processes: this code runs in the fresh process on the loaded repos and here on the
# in-memory models that were pushed.
OUTPUTS = textwrap.dedent(
    f"""
    import torch

    NEW_TOKENS, PROMPT, TEXTS = {NEW_TOKENS!r}, {PROMPT!r}, {TEXTS!r}


    @torch.no_grad()
    def stage2_outputs(generator, base, processor, images):
        prompted = processor(images=images[0], text=PROMPT, return_tensors="pt")
        ids = generator.generate(**processor(images=images[0], return_tensors="pt"), max_new_tokens=NEW_TOKENS)
        return dict(logits=generator(**prompted).logits.tolist(), base_logits=base(**prompted).logits.tolist(),
                    generated_ids=ids.tolist())


    @torch.no_grad()
    def stage1_outputs(pretraining, retrieval, processor, images):
        inputs = processor(images=images, text=TEXTS, padding=True, return_tensors="pt")
        text = dict(input_ids=inputs["qformer_input_ids"], attention_mask=inputs["qformer_attention_mask"])
        torch.manual_seed(0)  # ITM draws its hard negatives
        out = pretraining(pixel_values=inputs["pixel_values"], **text)
        itc = retrieval(pixel_values=inputs["pixel_values"], **text)
        itm = retrieval(pixel_values=inputs["pixel_values"], use_image_text_matching_head=True, **text)
        return dict(loss=[out.loss_itc.item(), out.loss_itm.item(), out.loss_itg.item()],
                    sim_i2t=out.sim_i2t.tolist(), logits_itg=out.logits_itg.tolist(),
                    generated_ids=pretraining.generate(pixel_values=inputs["pixel_values"], max_new_tokens=NEW_TOKENS).tolist(),
                    itc=itc.logits_per_image.tolist(), itm=itm.logits_per_image.tolist())
    """
)

FRESH_PROCESS = OUTPUTS + textwrap.dedent(
    """
    import json, re, sys
    sys.modules["blip2_hf"] = None  # everything must come from the repos
    try:
        import blip2_hf  # noqa: F401
        raise SystemExit("blip2_hf should not be importable here")
    except ImportError:
        pass
    from huggingface_hub import hf_hub_download
    from PIL import Image
    from transformers import (AutoModel, AutoModelForImageTextToText, AutoModelForPreTraining,
                              AutoModelForZeroShotImageClassification, AutoProcessor, pipeline)

    repos, image_paths = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    images = [Image.open(path) for path in image_paths]
    result = {}
    # The usage snippet of every card blip2-hf wrote runs as it is (it opens "image.jpg").
    images[0].save("image.jpg")
    for repo_id in repos:
        with open(hf_hub_download(repo_id, "README.md"), encoding="utf-8") as file:
            card = file.read()
        if "blip2-hf" in card:
            exec(re.search("```python(.*?)```", card, re.DOTALL).group(1), {})
            result.setdefault("snippets_run", []).append(repo_id)
    for repo_id, kind in repos.items():
        processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)
        entry = {"processor": [type(processor).__name__, type(processor).__module__]}
        if kind == "stage2":
            generator = AutoModelForImageTextToText.from_pretrained(repo_id, trust_remote_code=True).eval()
            base = AutoModel.from_pretrained(repo_id, trust_remote_code=True).eval()
            entry.update(stage2_outputs(generator, base, processor, images))
            captioner = pipeline("image-to-text", model=repo_id, trust_remote_code=True)
            entry["caption"] = captioner(image_paths[0], max_new_tokens=NEW_TOKENS)
            entry["classes"] = [type(generator).__module__, type(base).__name__, type(captioner).__name__]
        else:
            pretraining = AutoModelForPreTraining.from_pretrained(repo_id, trust_remote_code=True).eval()
            retrieval = AutoModelForZeroShotImageClassification.from_pretrained(repo_id, trust_remote_code=True).eval()
            entry.update(stage1_outputs(pretraining, retrieval, processor, images))
            entry["classes"] = [type(pretraining).__module__, type(retrieval).__name__]
        result[repo_id] = entry
    print("RESULT" + json.dumps(result))
    """
)


@pytest.mark.slow
def test_fresh_process_loads_every_published_repo(test_hub, published, stage2, stage1, tmp_path):
    image_paths = []
    for index, image in enumerate(draw_images(2, size=(40, 30), seed=3)):
        image_paths.append(str(tmp_path / f"image{index}.png"))
        image.save(image_paths[-1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(client_env(test_hub.url, str(tmp_path / "empty_hf_home")))
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, json.dumps(published), json.dumps(image_paths)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    remote = json.loads(proc.stdout.split("RESULT", 1)[1])

    reference = {}
    exec(OUTPUTS, reference)
    from PIL import Image

    images = [Image.open(path) for path in image_paths]
    # The same computations on the models that were pushed (AutoModel / the retrieval class: read from the folders).
    base = blip2_hf.Blip2Model.from_pretrained(stage2[0]).eval()
    retrieval = blip2_hf.Blip2ForImageTextRetrieval.from_pretrained(stage1[0]).eval()
    local = {
        "stage2": reference["stage2_outputs"](stage2[1].eval(), base, stage2[2], images),
        "stage1": reference["stage1_outputs"](stage1[1].eval(), retrieval, stage1[2], images),
    }
    assert remote.pop("snippets_run") == [f"{TEST_USER}/stage2", f"{TEST_USER}/stage1"]
    for repo_id, kind in published.items():
        entry = remote[repo_id]
        assert entry["processor"][0] == "Blip2Processor" and entry["processor"][1].startswith("transformers_modules")
        assert entry["classes"][0].startswith("transformers_modules"), entry["classes"]
        for key, value in local[kind].items():
            assert entry[key] == value, f"{repo_id}: {key} differs"
        if kind == "stage2":
            assert entry["classes"][1:] == ["Blip2Model", "Blip2ImageToTextPipeline"]
            new_tokens = torch.tensor(local["stage2"]["generated_ids"])[:, 4 + 1 :]  # after `<image> x 4, BOS`
            caption = stage2[2].batch_decode(new_tokens, skip_special_tokens=True)[0].strip()
            assert entry["caption"] == [{"generated_text": caption}]
        else:
            assert entry["classes"][1] == "Blip2ForImageTextRetrieval"


# ---------------------------------------------------------------------------------------------------------------------
# Errors: tokens, rights, failed commits, pickles
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def captured_logs(monkeypatch):
    """Every record of the libraries that touch the token (ours, huggingface_hub, transformers, httpx), at DEBUG,
    with huggingface_hub's HF_DEBUG request logging (each request as a curl command) on."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_DEBUG", True)
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect(level=logging.DEBUG)
    names = ("blip2_hf", "huggingface_hub", "transformers", "httpx", "httpcore", "")
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.DEBUG)
    yield records
    for name in names:
        logging.getLogger(name).removeHandler(handler)
        logging.getLogger(name).setLevel(saved[name])


def test_no_token_says_how_to_log_in(test_hub, stage2, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    before = len(test_hub.requests)
    with pytest.raises(hub.HubAuthError, match="No Hugging Face token") as err:
        hub.push_folder(stage2[0], f"{TEST_USER}/no-token")
    assert "HF_TOKEN" in str(err.value) and "hf auth login" in str(err.value)
    assert len(test_hub.requests) == before  # refused before any call


@pytest.mark.parametrize(
    "token, repo_id, expected",
    [
        (
            "hf_wrongTOKENnobodyknows0123456789",
            f"{TEST_USER}/wrong-token",
            r"refused the token .* \(401 Unauthorized\)",
        ),
        (READ_TOKEN, f"{TEST_USER}/read-only", r"lacks write access to the namespace 'testuser'"),
        (WRITE_TOKEN, f"{OTHER_USER}/theirs", r"lacks write access to the namespace 'otheruser'"),
    ],
    ids=["401-wrong-token", "403-read-only-token", "403-other-namespace"],
)
def test_refused_tokens_name_the_repo_and_never_leak(
    test_hub, stage2, token, repo_id, expected, capsys, captured_logs
):
    if repo_id.startswith(OTHER_USER):
        test_hub.create_repo(repo_id)  # someone else's public repo: creating it "succeeds" (exist_ok), writing fails
    with pytest.raises(hub.HubAuthError, match=expected) as err:
        hub.push_folder(stage2[0], repo_id, token=token)
    assert repo_id in str(err.value)
    if repo_id in test_hub.repos:
        assert "model.safetensors" not in test_hub.files(repo_id)
    out = capsys.readouterr()
    assert any("curl" in record for record in captured_logs), "no request was logged: the check would be empty"
    for text in (str(err.value), repr(err.value), out.out, out.err, *captured_logs):
        assert token not in text
    # nor the token of the environment, nor in a successful push's output
    hub.push_folder(stage2[0], f"{TEST_USER}/leak-check")
    out = capsys.readouterr()
    for text in (out.out, out.err, *captured_logs):
        assert WRITE_TOKEN not in text and token not in text


def test_failed_commit_publishes_nothing(test_hub, stage2, published):
    test_hub.fail_next_commit()
    with pytest.raises(hub.PushError, match=r"HTTP 500.*Nothing was published.*created was deleted again"):
        hub.push_folder(stage2[0], f"{TEST_USER}/half-published")
    assert f"{TEST_USER}/half-published" not in test_hub.repos  # created by the push, so deleted again
    # a repo that already had a model keeps it unchanged
    before = test_hub.files(f"{TEST_USER}/stage2")
    test_hub.fail_next_commit(503)
    with pytest.raises(hub.PushError, match="HTTP 503"):
        hub.push_folder(stage2[0], f"{TEST_USER}/stage2", commit_message="second version")
    assert test_hub.files(f"{TEST_USER}/stage2") == before
    assert test_hub._fail_next_commit is None  # the switch was used by these pushes, not left for another test


def test_pickles_are_refused_unless_allowed(test_hub, stage2, tmp_path):
    folder = tmp_path / "with_pickle"
    shutil.copytree(stage2[0], folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 pickled weights")
    before = len(test_hub.requests)
    with pytest.raises(hub.PushError, match=r"pickled files: pytorch_model.bin.*safetensors"):
        hub.push_folder(folder, f"{TEST_USER}/pickled")
    assert len(test_hub.requests) == before
    hub.push_folder(folder, f"{TEST_USER}/pickled", allow_pickle=True)
    assert "pytorch_model.bin" in test_hub.files(f"{TEST_USER}/pickled")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(hub.PushError, match="no safetensors weights"):
        hub.push_folder(folder, f"{TEST_USER}/pickled")


def test_incomplete_folder_is_completed_and_stale_weights_deleted(test_hub, stage2, tmp_path):
    """A folder whose config lacks the auto_map and pipeline entry and that has no remote code (e.g. saved by
    transformers' BLIP-2), pushed over a repo that holds an older sharded checkpoint."""
    folder = tmp_path / "bare"
    shutil.copytree(stage2[0], folder, ignore=shutil.ignore_patterns("*.py"))
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"], config["custom_pipelines"]
    (folder / "config.json").write_text(json.dumps(config))
    repo_id = f"{TEST_USER}/completed"
    stale = {"model-00001-of-00002.safetensors": b"old", "model.safetensors.index.json": b"{}", "notes.txt": b"kept"}
    test_hub.create_repo(repo_id, files=stale)
    hub.push_folder(folder, repo_id)
    files = test_hub.files(repo_id)
    assert_loadable_without_the_package(files, generates=True)
    assert "model-00001-of-00002.safetensors" not in files and "model.safetensors.index.json" not in files
    assert files["notes.txt"] == b"kept"
    assert json.loads(files["config.json"])["text_config"]["vocab_size"] == config["text_config"]["vocab_size"]
    assert not (folder / "modeling_blip2.py").exists() and "auto_map" not in json.loads(
        (folder / "config.json").read_text()
    )


def test_push_without_namespace_and_to_a_branch(test_hub, stage2):
    url = hub.push_folder(stage2[0], "no-namespace")  # the token's user owns it, and the card says so
    assert url.startswith(f"{test_hub.url}/{TEST_USER}/no-namespace/commit/")
    card = test_hub.files(f"{TEST_USER}/no-namespace")["README.md"].decode()
    assert f'repo = "{TEST_USER}/no-namespace"' in card
    commits = len(test_hub.commits(f"{TEST_USER}/no-namespace"))
    hub.push_folder(stage2[0], f"{TEST_USER}/no-namespace")  # nothing changed: the client makes no empty commit
    assert len(test_hub.commits(f"{TEST_USER}/no-namespace")) == commits
    hub.push_folder(stage2[0], f"{TEST_USER}/no-namespace", revision="v2", license="apache-2.0", commit_message="v2")
    assert test_hub.commits(f"{TEST_USER}/no-namespace")[-1].title == "v2"
    on_branch, on_main = test_hub.files(f"{TEST_USER}/no-namespace", "v2"), test_hub.files(f"{TEST_USER}/no-namespace")
    assert on_branch["model.safetensors"] == (stage2[0] / "model.safetensors").read_bytes()
    assert ModelCard(on_branch["README.md"].decode()).data.license == "apache-2.0"
    assert ModelCard(on_main["README.md"].decode()).data.license == "mit"


# ---------------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_push_and_card(test_hub, stage2, results, tmp_path, capsys):
    code = cli.main(
        [
            "push",
            str(stage2[0]),
            f"{TEST_USER}/cli",
            "--results",
            str(results["vqa"]),
            str(results["caption"]),
            "--private",
            "--license",
            "apache-2.0",
            "--dataset",
            "coco",
            "--dataset",
            "vg",
            "--tag",
            "tiny",
        ]
    )
    out = capsys.readouterr()
    assert code == 0 and out.out.strip().startswith(f"{test_hub.url}/{TEST_USER}/cli/commit/"), out
    assert test_hub.repos[f"{TEST_USER}/cli"].private
    card = ModelCard(test_hub.files(f"{TEST_USER}/cli")["README.md"].decode())
    assert card.data.license == "apache-2.0" and card.data.datasets == ["coco", "vg"] and "tiny" in card.data.tags
    assert len(card.data.eval_results) == 4

    assert cli.main(["card", str(stage2[0]), f"{TEST_USER}/cli", "-o", str(tmp_path / "README.md")]) == 0
    assert ModelCard.load(tmp_path / "README.md").data.pipeline_tag == "image-text-to-text"
    assert cli.main(["push", str(tmp_path), f"{TEST_USER}/cli"]) == 1  # not a model folder: a message, no traceback
    assert "has no config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_subprocess_refused_token(test_hub, stage2, tmp_path):
    """`python -m blip2_hf.cli push` in its own process, client configured by HF_ENDPOINT: a clear error, exit 1,
    and the token nowhere in its output."""
    token = "hf_subprocessWRONGtoken9876543210"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(client_env(test_hub.url, str(tmp_path / "hf_home"), token=token))
    proc = subprocess.run(
        [sys.executable, "-m", "blip2_hf.cli", "push", str(stage2[0]), f"{TEST_USER}/cli-refused"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "401 Unauthorized" in proc.stderr and f"{TEST_USER}/cli-refused" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert token not in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# LoRA folders: merged, or the adapter with its base on the Hub
# ---------------------------------------------------------------------------------------------------------------------

LORA_PROMPT = "Question: what is it? Answer:"


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    """A LoRA folder as training/stage2.py --lora_r 4 leaves it: adapters added by its `add_lora`, then the adapter
    files and the base model (trained Q-Former, LLM without the adapter) saved side by side, and the processor."""
    stage2_script = load_training_script("stage2")
    folder = tmp_path_factory.mktemp("lora")
    model, processor = stage2_model_and_processor()
    perturb_(model, seed=7, scale=0.05)  # stage 2 trains the Q-Former beside the adapter: another base than stage2's
    peft_model = stage2_script.add_lora(model, stage2_script.ModelArguments(lora_r=4))
    torch.manual_seed(5)
    with torch.no_grad():  # "trained": lora_B starts at zero, which would make the adapter a no-op
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(folder)
    peft_model.unload().save_pretrained(folder)
    processor.save_pretrained(folder)
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] is None  # what peft records: the reason a plain push cannot load
    return folder


@pytest.fixture(scope="module")
def lora_published(test_hub, lora) -> dict[str, str]:
    """The LoRA folder published by the CLI: merged; as an adapter with its base pushed too; as a second adapter
    on that base (already on the Hub: checked, not pushed again)."""
    repos = {"merged": f"{TEST_USER}/lora-merged", "adapter": f"{TEST_USER}/lora-adapter"}
    repos |= {"base": f"{TEST_USER}/lora-base", "adapter2": f"{TEST_USER}/lora-adapter2"}
    assert cli.main(["push", str(lora), repos["merged"], "--merge-lora"]) == 0
    assert cli.main(["push", str(lora), repos["adapter"], "--base-model", repos["base"], "--push-base"]) == 0
    base_commits = len(test_hub.commits(repos["base"]))
    assert cli.main(["push", str(lora), repos["adapter2"], "--base-model", repos["base"]]) == 0
    assert len(test_hub.commits(repos["base"])) == base_commits
    return repos


def test_lora_pushes_publish_merged_weights_or_adapter_and_base(test_hub, lora, lora_published):
    merged = test_hub.files(lora_published["merged"])
    assert_loadable_without_the_package(merged, generates=True)
    assert not any(name.startswith("adapter_") for name in merged)  # a plain checkpoint: nothing points elsewhere
    assert merged["model.safetensors"] != (lora / "model.safetensors").read_bytes()  # the adapter is in the weights
    assert ModelCard(merged["README.md"].decode()).data.base_model == LLM_ID  # recorded by the config, a Hub id

    base = test_hub.files(lora_published["base"])
    assert_loadable_without_the_package(base, generates=True)
    assert base["model.safetensors"] == (lora / "model.safetensors").read_bytes()
    assert not any(name.startswith("adapter_") for name in base)
    for key in ("adapter", "adapter2"):
        files = test_hub.files(lora_published[key])
        adapter = json.loads(files["adapter_config.json"])
        assert adapter["base_model_name_or_path"] == lora_published["base"] and adapter["auto_mapping"] is None
        assert files["adapter_model.safetensors"] == (lora / "adapter_model.safetensors").read_bytes()
        assert "model.safetensors" not in files and "config.json" not in files  # the base repo has them
        assert {"processor_config.json", "tokenizer.json", "processing_blip2.py"} <= set(files)
        card = ModelCard(files["README.md"].decode())
        assert card.data.base_model == lora_published["base"] and card.data.library_name == "peft"
        assert str(lora) not in str(card) and "lora" in card.data.tags


def test_lora_push_refusals_say_what_to_do(test_hub, lora, stage2, tmp_path, capsys):
    before = len(test_hub.requests)
    with pytest.raises(hub.PushError, match=r"base_model_name_or_path=None.*--merge-lora.*--base-model.*--push-base"):
        hub.push_folder(lora, f"{TEST_USER}/lora-refused")
    for local in ("./runs/stage2_lora", str(lora), "~/models/base"):
        with pytest.raises(hub.PushError, match="is a local path or not a Hub repo id"):
            hub.push_folder(lora, f"{TEST_USER}/lora-refused", base_models=[local])
    with pytest.raises(hub.PushError, match="A LoRA adapter has one base model"):
        hub.push_folder(lora, f"{TEST_USER}/lora-refused", base_models=[LLM_ID, VISION_ID])
    with pytest.raises(hub.PushError, match="pick one"):
        hub.push_folder(lora, f"{TEST_USER}/lora-refused", merge_lora=True, push_base=True)
    with pytest.raises(hub.PushError, match="has no LoRA adapter"):
        hub.push_folder(stage2[0], f"{TEST_USER}/lora-refused", merge_lora=True)
    assert len(test_hub.requests) == before  # all refused before any call

    with pytest.raises(hub.PushError, match=r"base model repo testuser/no-such-base does not exist.*--push-base"):
        hub.push_folder(lora, f"{TEST_USER}/lora-refused", base_models=[f"{TEST_USER}/no-such-base"])
    hub.push_folder(stage2[0], f"{TEST_USER}/other-base")  # a BLIP-2 repo, but not this adapter's base
    with pytest.raises(hub.PushError, match=r"does not hold .* base weights \(model.safetensors differs\)"):
        hub.push_folder(lora, f"{TEST_USER}/lora-refused", base_models=[f"{TEST_USER}/other-base"])
    assert f"{TEST_USER}/lora-refused" not in test_hub.repos

    capsys.readouterr()
    assert cli.main(["push", str(lora), f"{TEST_USER}/lora-refused"]) == 1
    assert cli.main(["card", str(lora), f"{TEST_USER}/lora-refused", "--base-model", "./runs/base"]) == 1
    err = capsys.readouterr().err
    assert "blip2-hf push: error:" in err and "is a LoRA folder" in err and "Traceback" not in err
    assert "blip2-hf card: error: --base-model './runs/base' is a local path" in err
    assert cli.main(["card", str(lora), f"{TEST_USER}/x", "--merge-lora", "-o", str(tmp_path / "README.md")]) == 0


LORA_FRESH_PROCESS = textwrap.dedent(
    """
    import json, re, sys
    sys.modules["blip2_hf"] = None  # everything must come from the repos
    try:
        import blip2_hf  # noqa: F401
        raise SystemExit("blip2_hf should not be importable here")
    except ImportError:
        pass
    from huggingface_hub import hf_hub_download
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    repos, image_path, prompt = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    Image.open(image_path).save("image.jpg")  # what the card's snippet opens
    result = {}
    for repo_id in repos:
        with open(hf_hub_download(repo_id, "README.md"), encoding="utf-8") as file:
            exec(re.search("```python(.*?)```", file.read(), re.DOTALL).group(1), {})  # the card's snippet runs
        model = AutoModelForImageTextToText.from_pretrained(repo_id, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)
        inputs = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
        result[repo_id] = model.generate(**inputs, max_new_tokens=6, do_sample=False).tolist()
    print("RESULT" + json.dumps(result))
    """
)


@pytest.mark.slow
def test_lora_repos_load_by_id_without_the_package(test_hub, lora, lora_published, tmp_path):
    """Merged and adapter repos, loaded by repo id in a fresh process that cannot import blip2_hf, generate the
    ids the LoRA folder generates; the adapter matters (the base alone generates others)."""
    image_path = tmp_path / "image.png"
    draw_images(1, size=(40, 30), seed=4)[0].save(image_path)
    repos = [lora_published["merged"], lora_published["adapter"]]  # adapter2: the same files (checked above)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "PYTHONPATH"}
    env.update(client_env(test_hub.url, str(tmp_path / "empty_hf_home")))
    proc = subprocess.run(
        [sys.executable, "-c", LORA_FRESH_PROCESS, json.dumps(repos), str(image_path), LORA_PROMPT],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    remote = json.loads(proc.stdout.split("RESULT", 1)[1])

    from PIL import Image

    def generate(folder: Path) -> list[list[int]]:
        model = blip2_hf.Blip2ForConditionalGeneration.from_pretrained(folder).eval()
        processor = blip2_hf.Blip2Processor.from_pretrained(folder)
        inputs = processor(images=Image.open(image_path), text=LORA_PROMPT, return_tensors="pt")
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=6, do_sample=False).tolist()

    local = generate(lora)  # from_pretrained finds the adapter beside the weights
    base_only = tmp_path / "base_only"
    shutil.copytree(lora, base_only, ignore=shutil.ignore_patterns("adapter_*"))
    assert generate(base_only) != local, "the adapter changes nothing: the comparison would prove nothing"
    for repo_id in repos:
        assert remote[repo_id] == local, repo_id
