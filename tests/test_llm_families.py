"""Any LLM under BLIP-2: tiny random LLMs of every family the package supports (causal OPT, Llama, Qwen2, Mistral with
its sliding window, Gemma with its scaled embeddings; encoder-decoder T5 / Flan-T5 and mT5), each with a tokenizer
trained on the spot, through stage 2 of the real `training/stage2.py`, saved and reloaded, and generating the same
tokens batched (left padding) as one prompt at a time. Also: `<image>` given a row when the tokenizer has none, a
tokenizer without a pad token, chat templates, LoRA targets per family, and stage 2 re-bootstrapped from a
stage-2 folder (ours or transformers' layout) onto a new LLM.

The Qwen2, Mistral and Gemma tokenizers reuse the OPT and Llama layouts (`blip2_hf.testing_utils`) with their own
special tokens set on top: Qwen2 the OPT byte-level BPE without BOS, `<|im_end|>` as EOS, `<|endoftext|>` as pad and a
ChatML chat template; Mistral the Llama layout without a pad token; Gemma the Llama layout with `<pad>` and Gemma's
chat template, which writes the BOS token itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_from_stage1 import load_stage2_script, stage1_model
from tokenizers import processors

from blip2_hf import Blip2ForConditionalGeneration, Blip2Processor, answer_questions
from blip2_hf.testing_utils import (
    draw_images,
    make_llama_tokenizer,
    make_opt_tokenizer,
    make_t5_tokenizer,
    perturb_,
    tiny_config_dict,
    tiny_text_config,
)

DECODER_ONLY = ["opt", "llama", "qwen2", "mistral", "gemma"]
ENCODER_DECODER = ["t5", "mt5"]
FAMILIES = DECODER_ONLY + ENCODER_DECODER
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA_CHAT = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>user\n{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PROMPTS = ["a photo of a cat sitting on", "a", "Question: what color is the circle? Answer:"]


def family_tokenizer(family: str) -> transformers.PreTrainedTokenizerBase:
    """A tokenizer in `family`'s special-token layout (see the module docstring), without `<image>`."""
    if family in ("t5", "mt5"):
        return make_t5_tokenizer()
    if family == "opt":
        return make_opt_tokenizer()
    if family == "qwen2":
        tokenizer = make_opt_tokenizer()
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
        tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = None, "<|im_end|>", "<|endoftext|>"
        tokenizer.chat_template = CHATML
        return tokenizer
    tokenizer = make_llama_tokenizer()
    if family == "mistral":
        tokenizer.pad_token = None
    elif family == "gemma":
        tokenizer.add_special_tokens(
            {"pad_token": "<pad>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
        )
        tokenizer.chat_template = GEMMA_CHAT
    return tokenizer


def save_family_llm(folder: Path, family: str, free_rows: int = 1, tokenizer=None, **config) -> Path:
    """A tiny random LLM of `family` and its tokenizer saved in `folder`, `free_rows` embedding rows beyond the
    tokenizer's (0: no room for `<image>`, as Llama-2)."""
    tokenizer = tokenizer or family_tokenizer(family)
    ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("pad", "bos", "eos")}
    text = tiny_text_config(family, vocab_size=len(tokenizer) + free_rows, **ids, **config)
    if family in ENCODER_DECODER:
        text["decoder_start_token_id"] = tokenizer.pad_token_id
    auto = transformers.AutoModelForSeq2SeqLM if family in ENCODER_DECODER else transformers.AutoModelForCausalLM
    torch.manual_seed(1)
    llm = perturb_(auto.from_config(transformers.AutoConfig.for_model(**text)), scale=0.3)
    llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A stage-1 folder (30 px images, 4 queries), every family's LLM folder and a caption JSON of 4 images."""
    root = tmp_path_factory.mktemp("families")
    model, processor = stage1_model()
    model.save_pretrained(root / "stage1")
    processor.save_pretrained(root / "stage1")
    for family in FAMILIES:
        save_family_llm(root / family, family)
    rows = []
    for index, image in enumerate(draw_images(4)):
        image.save(root / f"{index}.png")
        rows.append({"image": f"{index}.png", "caption": ["a red circle on a white background", "a cat"][index % 2]})
    (root / "train.json").write_text(json.dumps(rows))
    return root


def run_stage2(work: Path, output: Path, *arguments: str) -> None:
    """training/stage2.py in this process, 2 steps of 2 images on the CPU."""
    load_stage2_script().main(
        ["--train_data", str(work / "train.json"), "--output_dir", str(output), "--max_steps", "2"]
        + ["--per_device_train_batch_size", "2", "--use_cpu", "true", "--report_to", "none", "--augment", "false"]
        + ["--save_steps", "1000", "--dataloader_num_workers", "0", "--disable_tqdm", "true", *arguments]
    )


def assert_generations_equal(model, processor, images, prompts, kwargs_list, share_prefix_values) -> None:
    """Left-padded batched generation gives each row the tokens that row alone gives."""
    batch = processor(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    width = batch["input_ids"].shape[1]
    decoder_only = model.config.use_decoder_only_language_model
    for kwargs in kwargs_list:
        for share_prefix in share_prefix_values:
            together = model.generate(**batch, share_prefix=share_prefix, **kwargs)
            for row, (image, prompt) in enumerate(zip(images, prompts)):
                alone_inputs = processor(images=[image], text=[prompt], return_tensors="pt")
                alone = model.generate(**alone_inputs, share_prefix=share_prefix, **kwargs)[0]
                new_alone = alone[alone_inputs["input_ids"].shape[1] :] if decoder_only else alone
                new_together = together[row, width:] if decoder_only else together[row]
                length = min(len(new_alone), len(new_together))
                assert length > 0 and torch.equal(new_alone[:length], new_together[:length]), (
                    kwargs, share_prefix, row, alone, together[row],
                )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Stage 2 through the script, save / reload, batched generation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family",
    [pytest.param(family, marks=pytest.mark.slow) if family in ("mistral", "mt5") else family for family in FAMILIES],
)
def test_stage2_script_trains_saves_and_reloads_each_family(work: Path, tmp_path: Path, family: str):
    """2 steps of stage 2 through training/stage2.py (the processor built from the stage-1 image processor and the
    family's tokenizer); the frozen LLM is saved as it was (plus the `<image>` row), and the folder reloads into a
    model with the same logits and generations."""
    extra = ["--pad_token", "</s>"] if family == "mistral" else []
    chat = ["--use_chat_template", "true", "--prompt", "Describe the image.", "--max_length", "48"]
    extra += chat if family == "qwen2" else []  # the ChatML prompt alone is 32 tokens
    output = tmp_path / "stage2"
    run_stage2(work, output, "--stage1_name_or_path", str(work / "stage1"), "--language_model_name_or_path",
               str(work / family), *extra)  # fmt: skip

    model = Blip2ForConditionalGeneration.from_pretrained(output).eval()
    processor = Blip2Processor.from_pretrained(output)
    assert model.config.text_config.model_type == family and processor.qformer_tokenizer is None
    assert model.config.image_token_index == processor.image_token_id
    assert processor.tokenizer.pad_token is not None
    stage1 = load_file(work / "stage1" / "model.safetensors")
    trained = model.query_tokens.detach()  # the steps trained (a step skipped for a NaN loss changes nothing)
    assert trained.shape == stage1["query_tokens"].shape and not torch.equal(trained, stage1["query_tokens"])
    original = transformers.AutoModel.from_pretrained(work / family).state_dict()
    ours = model.language_model.base_model.state_dict()
    for key, value in original.items():
        rows = value.shape[0] if "embed_tokens" in key or "shared" in key else None
        assert torch.equal(ours[key][:rows], value), key  # frozen: the LLM is saved as it was loaded

    images = draw_images(2, seed=1)
    inputs = processor(images=images, text=PROMPTS[:2], padding=True, padding_side="left", return_tensors="pt")
    model.save_pretrained(tmp_path / "again")
    again = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        labels = None if model.config.use_decoder_only_language_model else inputs["input_ids"][:, -3:].contiguous()
        assert torch.equal(model(**inputs, labels=labels).logits, again(**inputs, labels=labels).logits)
    for kwargs in (dict(max_new_tokens=4), dict(max_new_tokens=3, num_beams=2)):
        assert torch.equal(model.generate(**inputs, **kwargs), again.generate(**inputs, **kwargs))


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generation_equals_one_by_one(work: Path, family: str):
    """Prompts of different lengths, left-padded in one batch, greedy and 2 beams, with and without prefix sharing
    (decoder-only): every row the tokens it gets alone (positions from the attention mask, Mistral's sliding window
    of 8 shorter than the image tokens and prompt, Gemma's embedding scale on the text tokens only)."""
    model, processor = Blip2ForConditionalGeneration.from_stage1(work / "stage1", work / family)
    if processor.tokenizer.pad_token is None:  # Mistral
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    perturb_(model.language_projection, scale=0.5)  # a soft prompt that moves the LLM's choices
    share = (True, False) if family in DECODER_ONLY else (None,)
    searches = (dict(max_new_tokens=5), dict(max_new_tokens=4, num_beams=2))
    assert_generations_equal(model.eval(), processor, draw_images(3, seed=2), PROMPTS, searches, share)


# ---------------------------------------------------------------------------------------------------------------------
# <image> token and pad token
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_image_token_gets_a_row_when_the_tokenizer_has_no_room(tmp_path: Path, work: Path, family: str):
    """A tokenizer that fills the LLM's embeddings: `<image>` is the next id and the input (and untied output)
    embeddings get one row, the old rows kept."""
    folder = save_family_llm(tmp_path / family, family, free_rows=0)
    llm = transformers.AutoModel.from_pretrained(folder)
    rows = llm.get_input_embeddings().num_embeddings
    model, processor = Blip2ForConditionalGeneration.from_stage1(work / "stage1", folder)
    assert processor.image_token_id == rows == model.config.image_token_index
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == model.config.text_config.vocab_size == rows + 1
    assert model.get_output_embeddings().weight.shape[0] == rows + 1
    assert torch.equal(embeddings[:rows], llm.get_input_embeddings().weight)


def test_tokenizer_that_already_has_the_image_token_keeps_its_id(tmp_path: Path, work: Path):
    """`<image>` already in the tokenizer (and in the LLM's rows): its id is used, nothing is resized."""
    tokenizer = family_tokenizer("llama")
    tokenizer.add_tokens([transformers.AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    folder = save_family_llm(tmp_path / "llama", "llama", free_rows=0, tokenizer=tokenizer)
    model, processor = Blip2ForConditionalGeneration.from_stage1(work / "stage1", folder)
    assert processor.image_token_id == model.config.image_token_index == image_id == len(tokenizer) - 1
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)


def test_tokenizer_without_pad_token(work: Path, tmp_path: Path):
    """Mistral's tokenizer has no pad token: padding is an error naming `tokenizer.pad_token`, and so is stage 2
    without `--pad_token`; `--pad_token` must name a token of the vocabulary."""
    model, processor = Blip2ForConditionalGeneration.from_stage1(work / "stage1", work / "mistral")
    assert processor(text=["a cat"], return_tensors="pt")["input_ids"].shape[0] == 1  # one row: nothing to pad
    with pytest.raises(ValueError, match=r"padding needs tokenizer\.pad_token.*--pad_token"):
        processor(text=["a cat", "a red circle"], padding=True, return_tensors="pt")
    stage2 = load_stage2_script()
    with pytest.raises(ValueError, match=r"tokenizer\.pad_token is None.*--pad_token TOKEN.*'</s>'"):
        stage2.set_pad_token(model, processor, None)
    with pytest.raises(ValueError, match=r"--pad_token '<nope>' is not a token of the LLM's tokenizer"):
        stage2.set_pad_token(model, processor, "<nope>")
    stage2.set_pad_token(model, processor, "</s>")
    assert (
        processor.tokenizer.pad_token_id
        == model.config.text_config.pad_token_id
        == model.generation_config.pad_token_id
    )
    with pytest.raises(ValueError, match=r"--pad_token TOKEN"):
        run_stage2(work, tmp_path / "out", "--stage1_name_or_path", str(work / "stage1"),
                   "--language_model_name_or_path", str(work / "mistral"))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_chat_template_prompt_and_training_labels(work: Path, family: str):
    """The prompt is the chat template's user turn ready for the answer, the image tokens in front and one BOS (Gemma's
    template writes BOS, the tokenizer adds one too), and stage 2's labels cover the caption and its end only."""
    _, processor = Blip2ForConditionalGeneration.from_stage1(work / "stage1", work / family)
    tokenizer = processor.tokenizer
    prompt = processor.chat_prompt("Describe the image.")
    if family == "qwen2":
        assert prompt == "<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"
    else:
        assert prompt == "<start_of_turn>user\nDescribe the image.<end_of_turn>\n<start_of_turn>model\n"
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert processor(text=prompt)["input_ids"][0] == [processor.image_token_id] * 4 + prompt_ids
    if family == "gemma":  # the template's BOS dropped: the tokenizer adds its own
        assert prompt_ids[0] == tokenizer.bos_token_id and prompt_ids.count(tokenizer.bos_token_id) == 1
    else:
        assert tokenizer.bos_token is None and tokenizer.decode(prompt_ids) == prompt

    stage2 = load_stage2_script()
    data_args = stage2.DataArguments(prompt="Describe the image.", use_chat_template=True, max_length=48)
    collator = stage2.make_collator(processor, data_args, decoder_only=True)
    captions = ["a red circle", "a cat on a sofa"]
    batch = collator._decoder_only_text(captions)
    for row, caption in enumerate(captions):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        start = 4 + len(prompt_ids)
        assert ids[4:start].tolist() == prompt_ids  # the prompt's tokens unchanged by what follows them
        real = int(batch["attention_mask"][row].sum())
        assert (labels[:start] == -100).all() and torch.equal(labels[start:real], ids[start:real])
        if family == "qwen2":  # byte-level BPE: the labelled tokens are exactly the caption and its end
            assert tokenizer.decode(labels[start:real]) == caption + "\n"
    # a max_length the chat prompt fills leaves every label masked (a NaN loss): refused, naming the field
    data_args.max_length = len(prompt_ids)
    with pytest.raises(ValueError, match=rf"takes {len(prompt_ids)} of the max_length={len(prompt_ids)} text tokens"):
        stage2.make_collator(processor, data_args, decoder_only=True)


def test_chat_template_in_answer_questions_and_vqa(work: Path, tmp_path: Path, monkeypatch):
    """`answer_questions(use_chat_template=True)` answers what the chat prompt gives by hand; evaluation/vqa.py's
    batches hold the same ids; a tokenizer without a chat template is an error naming `tokenizer.chat_template`."""
    model, processor = Blip2ForConditionalGeneration.from_stage1(work / "stage1", work / "qwen2")
    perturb_(model.language_projection, scale=0.5)
    model.eval()
    images = draw_images(2, seed=3)
    questions = [["what color is it?", "is it a cat?"], ["what shape?"]]
    answers = answer_questions(model, processor, images, questions, prompt="{}", max_new_tokens=4,
                               use_chat_template=True)  # fmt: skip
    chat = processor.chat_prompt("is it a cat?")
    inputs = processor(images=images[:1], text=[chat], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4)
    expected = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answers[0][1] == expected
    assert answer_questions(model, processor, images, questions, prompt="{}", max_new_tokens=4) != answers

    import importlib.util

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "evaluation"))  # vqa.py imports its neighbours
    spec = importlib.util.spec_from_file_location(
        "evaluation_vqa", Path(__file__).parents[1] / "evaluation" / "vqa.py"
    )
    vqa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vqa)
    images[0].save(tmp_path / "0.png")
    rows, batch = vqa.Collate(processor, "{}", 50, use_chat_template=True)(
        [[{"image": str(tmp_path / "0.png"), "question": "is it a cat?"}]]
    )
    assert batch["input_ids"][0].tolist() == inputs["input_ids"][0].tolist()

    _, plain = Blip2ForConditionalGeneration.from_stage1(work / "stage1", work / "opt")
    with pytest.raises(ValueError, match=r"tokenizer\.chat_template is None"):
        plain.chat_prompt("a question")


def test_cli_ask_with_chat_template(work: Path, tmp_path: Path, capsys):
    """`blip2-hf ask --chat-template` answers through the chat prompt; a model whose tokenizer has no chat template
    exits 2 naming `tokenizer.chat_template`."""
    from blip2_hf.cli import main

    for family in ("qwen2", "opt"):
        model, processor = Blip2ForConditionalGeneration.from_stage1(work / "stage1", work / family)
        model.save_pretrained(tmp_path / family)
        processor.save_pretrained(tmp_path / family)
    draw_images(1)[0].save(tmp_path / "image.png")
    ask = ["ask", str(tmp_path / "image.png"), "is it a cat?", "--chat-template", "--device", "cpu", "--model"]
    assert main([*ask, str(tmp_path / "qwen2"), "--max-new-tokens", "3"]) == 0
    assert main([*ask, str(tmp_path / "opt")]) == 2
    assert "tokenizer.chat_template is None" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# LoRA targets
# ---------------------------------------------------------------------------------------------------------------------

# lora_A modules per family (2 layers each; T5: encoder self-attention, decoder self- and cross-attention)
QV_COUNTS = {"opt": 4, "llama": 4, "qwen2": 4, "mistral": 4, "gemma": 4, "t5": 12, "mt5": 12}
# every linear layer but the head: OPT q, k, v, out_proj, fc1, fc2; Llama-likes q, k, v, o, gate, up, down;
# T5 (gated) encoder q, k, v, o, wi_0, wi_1, wo, decoder 4 more for cross-attention
ALL_LINEAR_COUNTS = {"opt": 12, "llama": 14, "qwen2": 14, "mistral": 14, "gemma": 14, "t5": 36, "mt5": 36}


def lora_modules(model) -> list[str]:
    return [name for name, _ in model.named_modules() if name.endswith("lora_A.default")]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_per_family(work: Path, family: str):
    stage2 = load_stage2_script()
    for targets, expected in ((None, QV_COUNTS[family]), (["all-linear"], ALL_LINEAR_COUNTS[family])):
        model, _ = Blip2ForConditionalGeneration.from_stage1(work / "stage1", work / family)
        names = lora_modules(stage2.add_lora(model, stage2.ModelArguments(lora_r=2, lora_target_modules=targets)))
        assert len(names) == expected, names
        assert all(".language_model." in name and "lm_head" not in name for name in names)
    model, _ = Blip2ForConditionalGeneration.from_stage1(work / "stage1", work / family)
    override = ["k"] if family in ENCODER_DECODER else ["k_proj"]
    names = lora_modules(stage2.add_lora(model, stage2.ModelArguments(lora_r=2, lora_target_modules=override)))
    assert len(names) == QV_COUNTS[family] // 2 and all(name.split(".")[-3] == override[0] for name in names)


def test_unknown_family_needs_lora_target_modules(work: Path):
    stage2 = load_stage2_script()
    model, _ = Blip2ForConditionalGeneration.from_stage1(work / "stage1", work / "llama")
    model.config.text_config.model_type = "my_llm"
    with pytest.raises(ValueError, match=r"model_type 'my_llm'.*pass --lora_target_modules"):
        stage2.add_lora(model, stage2.ModelArguments(lora_r=2))


# ---------------------------------------------------------------------------------------------------------------------
# Re-bootstrap onto a new LLM, and LLMs that are not LLMs
# ---------------------------------------------------------------------------------------------------------------------


def transformers_blip2_folder(folder: Path) -> dict[str, torch.Tensor]:
    """What transformers' `Blip2ForConditionalGeneration.save_pretrained` and `Blip2Processor.save_pretrained` write
    (the layout of the Salesforce/blip2-* checkpoints): tiny OPT, 30 px images; returns its state dict."""
    tokenizer = make_opt_tokenizer()
    config = tiny_config_dict("opt", image_token_index=len(tokenizer))
    config["text_config"]["vocab_size"] = len(tokenizer) + 2
    torch.manual_seed(0)
    model = perturb_(transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(**config)))
    model.save_pretrained(folder)
    image_processor = transformers.BlipImageProcessorPil(size={"height": 30, "width": 30})
    transformers.Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=4
    ).save_pretrained(folder)
    return model.state_dict()


@pytest.mark.parametrize("source", ["ours", "transformers"])
def test_rebootstrap_a_stage2_folder_onto_a_new_llm(work: Path, tmp_path: Path, source: str):
    """`--stage1_name_or_path` a Blip2ForConditionalGeneration folder (a previous stage-2 run of ours on OPT, or
    transformers' layout) onto an LLM of another family and width: vision encoder, queries and Q-Former kept (a
    learning rate of 1e-30 leaves the trained ones as they were), `language_projection` new, the processor the folder's
    image processor and the new LLM's tokenizer."""
    previous = tmp_path / "previous"
    if source == "ours":
        model, processor = Blip2ForConditionalGeneration.from_stage1(work / "stage1", work / "opt")
        model.save_pretrained(previous)
        processor.save_pretrained(previous)
        kept = model.state_dict()
    else:
        kept = transformers_blip2_folder(previous)
    family = "qwen2" if source == "ours" else "llama"
    llm = save_family_llm(tmp_path / family, family, hidden_size=48)
    output = tmp_path / "stage2"
    run_stage2(work, output, "--stage1_name_or_path", str(previous), "--language_model_name_or_path", str(llm),
               "--learning_rate", "1e-30", "--min_learning_rate", "1e-30")  # fmt: skip

    model = Blip2ForConditionalGeneration.from_pretrained(output)
    processor = Blip2Processor.from_pretrained(output)
    own = model.state_dict()
    towers = [key for key in own if key.startswith(("vision_model.", "qformer.", "query_tokens"))]
    assert towers and all(torch.equal(own[key], kept[key]) for key in towers)
    assert model.config.text_config.model_type == family and model.language_projection.weight.shape == (48, 32)
    assert processor.image_processor.size["height"] == 30 and processor.num_query_tokens == 4
    assert processor.tokenizer.get_vocab() == {
        **family_tokenizer(family).get_vocab(),
        "<image>": len(processor.tokenizer) - 1,
    }


def test_llm_that_is_neither_causal_nor_seq2seq_is_named(work: Path, tmp_path: Path):
    tokenizer = make_opt_tokenizer()
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37
        )  # fmt: skip
    )
    bert.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    match = r"language_model_name_or_path .*'bert' model \(BertModel\).*text_config must be a causal LM"
    with pytest.raises(ValueError, match=match):
        Blip2ForConditionalGeneration.from_stage1(work / "stage1", tmp_path / "bert")
    stage2 = load_stage2_script()
    args = stage2.ModelArguments(
        stage1_name_or_path=str(work / "stage1"), language_model_name_or_path=str(tmp_path / "bert")
    )
    with pytest.raises(ValueError, match=match):
        stage2.build_model(args)
    with pytest.raises(ValueError, match=r"language model is a BertModel.*text_config must be"):
        Blip2ForConditionalGeneration.from_stage1(work / "stage1", bert)
