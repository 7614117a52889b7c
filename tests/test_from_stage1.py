"""`Blip2ForConditionalGeneration.from_stage1`: stage 2 assembled from a stage-1 folder or model and an LLM loaded once
with `from_pretrained` (no random LLM built first), with the image token given a row when the tokenizer fills the
LLM's vocabulary (Llama-2: 32000 tokens in 32000 rows), the "\\n" EOS rule of decoder-only LLMs and the query-count
check. training/stage2.py and the demo both build stage 2 through it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import transformers

import blip2_hf
from blip2_hf import Blip2Config, Blip2ForConditionalGeneration, Blip2ForPreTraining, Blip2Processor
from blip2_hf.testing_utils import (
    TINY_TEXT,
    draw_images,
    make_bert_tokenizer,
    make_llama_tokenizer,
    make_opt_tokenizer,
    make_t5_tokenizer,
    perturb_,
    tiny_config_dict,
)

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = {"opt": make_opt_tokenizer, "t5": make_t5_tokenizer, "llama": make_llama_tokenizer}
LLM_CLASSES = {
    "opt": transformers.OPTForCausalLM,
    "t5": transformers.T5ForConditionalGeneration,
    "llama": transformers.LlamaForCausalLM,
}


def stage1_model(num_query_tokens: int = 4) -> tuple[Blip2ForPreTraining, Blip2Processor]:
    """A tiny stage-1 model, its weights moved off their initialization (so a copy is told from a fresh init), and
    its processor (30 px images, an OPT tokenizer, the Q-Former's BERT tokenizer)."""
    qformer_tokenizer = make_bert_tokenizer()
    processor = Blip2Processor(
        image_processor=Blip2Processor.default_image_processor(30),
        tokenizer=make_opt_tokenizer(),
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=num_query_tokens,
    )
    config = tiny_config_dict("opt", num_query_tokens=num_query_tokens, text_input=True)
    config["qformer_config"].update(
        vocab_size=len(qformer_tokenizer),
        pad_token_id=qformer_tokenizer.pad_token_id,
        bos_token_id=qformer_tokenizer.bos_token_id,
        eos_token_id=qformer_tokenizer.sep_token_id,
    )
    torch.manual_seed(0)
    return perturb_(Blip2ForPreTraining(Blip2Config(**config)), scale=0.1), processor


def save_llm(folder: Path, kind: str, free_rows: int = 1) -> tuple[transformers.PreTrainedModel, Path]:
    """A tiny LLM with its tokenizer (no `<image>` yet), `free_rows` embedding rows beyond the tokenizer (0: the
    tokenizer fills the vocabulary, as Llama-2's 32000 tokens in 32000 rows)."""
    tokenizer = TOKENIZERS[kind]()
    ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("pad", "bos", "eos")}
    text = dict(TINY_TEXT[kind], vocab_size=len(tokenizer) + free_rows, **{f"{k}_token_id": v for k, v in ids.items()})
    text.pop("model_type")
    if kind == "t5":
        text["decoder_start_token_id"] = tokenizer.pad_token_id
    torch.manual_seed(1)
    llm_class = LLM_CLASSES[kind]
    perturb_(llm_class(llm_class.config_class(**text)), scale=0.1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return llm_class.from_pretrained(folder), folder


@pytest.fixture
def stage1_folder(tmp_path: Path) -> Path:
    model, processor = stage1_model()
    model.save_pretrained(tmp_path / "stage1")
    processor.save_pretrained(tmp_path / "stage1")
    return tmp_path / "stage1"


def no_random_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building an LLM from its config (random weights, then thrown away) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a random LLM was built")

    for auto_class in (transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM):
        monkeypatch.setattr(auto_class, "from_config", refuse)


def assert_stage1_copied(model: Blip2ForConditionalGeneration, stage1: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    towers = [key for key in own if key.startswith(("vision_model.", "qformer.", "query_tokens"))]
    assert towers and all(torch.equal(own[key], stage1[key]) for key in towers)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_from_stage1_folder_and_llm_path(stage1_folder: Path, tmp_path: Path, monkeypatch, kind: str):
    """The stage-1 towers copied, the LLM exactly as saved and never built at random, the processor built from the
    stage-1 image processor and the LLM's tokenizer, "\\n" added to the EOS ids of the decoder-only LLM only, the
    same seed giving the same new `language_projection`."""
    llm, llm_folder = save_llm(tmp_path / kind, kind)
    no_random_llm(monkeypatch)
    torch.manual_seed(7)
    model, processor = Blip2ForConditionalGeneration.from_stage1(stage1_folder, llm_folder, None)

    assert_stage1_copied(model, Blip2ForPreTraining.from_pretrained(stage1_folder).state_dict())
    assert type(model.language_model) is LLM_CLASSES[kind]
    theirs = llm.state_dict()
    assert all(torch.equal(value, theirs[key]) for key, value in model.language_model.state_dict().items())
    assert not model.config.qformer_config.use_qformer_text_input
    assert processor.qformer_tokenizer is None and processor.num_query_tokens == model.config.num_query_tokens == 4
    assert model.config.image_token_index == processor.image_token_id == len(processor.tokenizer) - 1
    assert processor.image_processor.size == {"height": 30, "width": 30}  # stage 1's, not the 224 px default
    newline = processor.tokenizer("\n", add_special_tokens=False).input_ids
    eos = model.generation_config.eos_token_id
    if kind == "opt":
        assert len(newline) == 1 and eos == [llm.config.eos_token_id, newline[0]]
    else:
        assert eos == llm.config.eos_token_id  # Flan-T5 ends with `</s>`

    torch.manual_seed(7)
    again, _ = Blip2ForConditionalGeneration.from_stage1(stage1_folder, llm_folder, None)
    assert torch.equal(again.language_projection.weight, model.language_projection.weight)
    inputs = processor(images=draw_images(2), text=["a photo of", "a red"], padding=True, return_tensors="pt")
    assert model.eval().generate(**inputs, max_new_tokens=3).shape[0] == 2


def test_llm_whose_vocabulary_the_tokenizer_fills_gets_a_row_for_the_image_token(stage1_folder: Path, tmp_path: Path):
    """Llama-2's 32000 tokens fill its 32000 rows: `<image>` gets the next id and the embeddings a row for it (it
    used to fail in the config check, `image_token_index = ... is invalid`, before the resize could run). The old rows
    are kept, the model trains, saves, reloads and generates the same."""
    llm, llm_folder = save_llm(tmp_path / "llama", "llama", free_rows=0)
    rows = llm.get_input_embeddings().num_embeddings
    stage1_processor = Blip2Processor.from_pretrained(stage1_folder)
    processor = Blip2Processor(
        image_processor=stage1_processor.image_processor,
        tokenizer=transformers.AutoTokenizer.from_pretrained(llm_folder),
        num_query_tokens=4,
    )
    assert processor.image_token_id == rows  # one past the last row
    model, processor = Blip2ForConditionalGeneration.from_stage1(stage1_folder, llm_folder, processor)

    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == model.config.text_config.vocab_size == rows + 1
    assert model.get_output_embeddings().weight.shape[0] == rows + 1
    assert torch.equal(embeddings[:rows], llm.get_input_embeddings().weight)
    assert model.config.image_token_index == rows

    inputs = processor(images=draw_images(2), text=["a photo of", "a red"], padding=True, return_tensors="pt")
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == processor.image_token_id, -100)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and model.language_projection.weight.grad.abs().sum() > 0

    model.save_pretrained(tmp_path / "stage2")
    reloaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "stage2").eval()
    expected = model.eval().generate(**inputs, max_new_tokens=4)
    assert torch.equal(reloaded.generate(**inputs, max_new_tokens=4), expected)


def test_models_in_memory_and_config_overrides(monkeypatch, tmp_path: Path):
    """Stage 1 and the LLM as loaded models (the LLM used as is), a stage-1 processor used without its Q-Former
    tokenizer, `qformer_config` fields overridden on top of stage 1's."""
    stage1, stage1_processor = stage1_model()
    llm, _ = save_llm(tmp_path / "opt", "opt")
    llm.config.eos_token_id = 2  # `</s>`, the tokenizer's; "\n" is added after it
    no_random_llm(monkeypatch)
    model, processor = Blip2ForConditionalGeneration.from_stage1(
        stage1, llm, stage1_processor, qformer_config={"hidden_dropout_prob": 0.3}
    )
    assert model.language_model is llm
    assert_stage1_copied(model, stage1.state_dict())
    assert model.config.qformer_config.hidden_dropout_prob == 0.3
    assert model.config.qformer_config.num_hidden_layers == stage1.config.qformer_config.num_hidden_layers
    assert stage1_processor.qformer_tokenizer is not None and processor.qformer_tokenizer is None
    assert processor.tokenizer is stage1_processor.tokenizer


def test_bad_inputs_are_named(stage1_folder: Path, tmp_path: Path):
    _, llm_folder = save_llm(tmp_path / "opt", "opt")
    processor = Blip2Processor.from_pretrained(stage1_folder)
    with pytest.raises(ValueError, match="writes 4 image tokens, the model has num_query_tokens=6"):
        Blip2ForConditionalGeneration.from_stage1(stage1_folder, llm_folder, processor, num_query_tokens=6)
    with pytest.raises(ValueError, match="text_config comes from the language model"):
        Blip2ForConditionalGeneration.from_stage1(stage1_folder, llm_folder, processor, text_config={})
    # a Trainer checkpoint of stage 1 holds the trained tensors only: no frozen ViT to copy
    stage1 = Blip2ForPreTraining.from_pretrained(stage1_folder)
    trained = {k: v for k, v in stage1.state_dict().items() if not k.startswith("vision_model.encoder")}
    checkpoint = tmp_path / "checkpoint-10"
    checkpoint.mkdir()
    stage1.config.save_pretrained(checkpoint)
    from safetensors.torch import save_file

    save_file({k: v.clone() for k, v in trained.items()}, checkpoint / "model.safetensors")
    with pytest.raises(ValueError, match=r"checkpoint-10 lacks \d+ tensors .*vision_model\.encoder"):
        Blip2ForConditionalGeneration.from_stage1(checkpoint, llm_folder, processor)
    with pytest.raises(ValueError, match="processor=None needs a stage-1 folder"):
        Blip2ForConditionalGeneration.from_stage1(stage1_model()[0], llm_folder, None)
    with pytest.raises(TypeError, match="expected a BLIP-2 model"):
        Blip2ForConditionalGeneration.from_stage1(
            transformers.AutoModelForCausalLM.from_pretrained(llm_folder), llm_folder
        )


def load_stage2_script():
    spec = importlib.util.spec_from_file_location("training_stage2", ROOT / "training" / "stage2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_training_script_builds_stage2_for_an_llm_whose_vocabulary_is_full(stage1_folder: Path, tmp_path: Path):
    """training/stage2.py goes through `from_stage1`: a Llama-style LLM without a free row, and no processor given
    (the stage-1 folder's image processor, the LLM's tokenizer)."""
    stage2 = load_stage2_script()
    llm, llm_folder = save_llm(tmp_path / "llama", "llama", free_rows=0)
    args = stage2.ModelArguments(stage1_name_or_path=str(stage1_folder), language_model_name_or_path=str(llm_folder))
    model, processor = stage2.build_model(args)
    assert isinstance(model, blip2_hf.Blip2ForConditionalGeneration) and processor.qformer_tokenizer is None
    assert model.config.image_token_index == llm.config.vocab_size == model.config.text_config.vocab_size - 1
