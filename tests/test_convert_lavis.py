"""LAVIS -> blip2_hf conversion (`blip2_hf.convert_lavis`), offline and at tiny size.

LAVIS state dicts are written here by hand from the LAVIS layout (spec §14.1: `visual_encoder.blocks.{i}.attn.q_bias`,
`Qformer.bert.encoder.layer.{i}.attention.self.query`, `opt_proj`, ...) with random tensors, saved as
`{"model": state_dict}`, run through the command (`main([...])`) and loaded back with `from_pretrained`. The checks
name the expected destination of each tensor explicitly, so they do not reuse the converter's key table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from blip2_hf import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2ForPreTraining
from blip2_hf.convert_lavis import (
    KEY_TABLE,
    PLACEHOLDERS,
    PRESETS,
    convert_state_dict,
    convert_state_dict_with_report,
    load_config,
    load_lavis_checkpoint,
    main,
    rename_key,
)
from blip2_hf.modeling_blip2 import Blip2VisionModel
from blip2_hf.testing_utils import IMAGE_TOKEN, tiny_config_dict

# ---------------------------------------------------------------------------------------------------------------------
# LAVIS state dicts at tiny size (shapes from tiny_config_dict: every width 32, FFN 37, vocab 99)
# ---------------------------------------------------------------------------------------------------------------------


def stage1_config() -> dict:
    """Tiny stage-1 config: text through the Q-Former, `[DEC]` = 98 and `[SEP]` = 3 in the 99-token vocabulary."""
    cfg = tiny_config_dict("opt", text_input=True)
    cfg["qformer_config"] |= dict(bos_token_id=98, eos_token_id=3)
    return cfg


class Rand:
    """Seeded random tensors, so every LAVIS tensor is distinct and a misplaced one cannot go unnoticed."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator)


def lavis_vit(cfg: dict, rand: Rand, blocks: int | None = None, grid: int | None = None, prefix="visual_encoder."):
    """EVA ViT keys (eva_vit.py); `prefix=""` gives eva_vit_g.pth's bare layout."""
    vision = cfg["vision_config"]
    d, ffn, patch = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    grid = grid or vision["image_size"] // patch
    sd = {
        "cls_token": rand(1, 1, d),
        "pos_embed": rand(1, 1 + grid * grid, d),
        "patch_embed.proj.weight": rand(d, 3, patch, patch),
        "patch_embed.proj.bias": rand(d),
    }
    for i in range(blocks or vision["num_hidden_layers"]):
        b = f"blocks.{i}."
        sd |= {b + "norm1.weight": rand(d), b + "norm1.bias": rand(d), b + "norm2.weight": rand(d)}
        sd |= {b + "norm2.bias": rand(d), b + "attn.qkv.weight": rand(3 * d, d)}
        sd |= {b + "attn.q_bias": rand(d), b + "attn.v_bias": rand(d)}
        sd |= {b + "attn.proj.weight": rand(d, d), b + "attn.proj.bias": rand(d)}
        sd |= {b + "mlp.fc1.weight": rand(ffn, d), b + "mlp.fc1.bias": rand(ffn)}
        sd |= {b + "mlp.fc2.weight": rand(d, ffn), b + "mlp.fc2.bias": rand(d)}
    return {prefix + key: value for key, value in sd.items()}


def linear(sd: dict, name: str, out_features: int, in_features: int, rand: Rand) -> None:
    sd[name + ".weight"], sd[name + ".bias"] = rand(out_features, in_features), rand(out_features)


def layer_norm(sd: dict, name: str, width: int, rand: Rand) -> None:
    sd[name + ".weight"], sd[name + ".bias"] = rand(width), rand(width)


def lavis_qformer(cfg: dict, rand: Rand, text: bool, lm_head: bool = False) -> dict:
    """`ln_vision`, `query_tokens` and `Qformer.*` (Qformer.py). Stage 2 (`text=False`) has neither the word/position
    embeddings nor the text FFN; `lm_head` adds `Qformer.cls.predictions.*` (decoder weight = word embeddings)."""
    q, v = cfg["qformer_config"], cfg["vision_config"]
    d, ffn, dv = q["hidden_size"], q["intermediate_size"], v["hidden_size"]
    sd = {"query_tokens": rand(1, cfg["num_query_tokens"], d)}
    layer_norm(sd, "ln_vision", dv, rand)
    layer_norm(sd, "Qformer.bert.embeddings.LayerNorm", d, rand)
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(q["max_position_embeddings"])[None]
    if text:
        sd["Qformer.bert.embeddings.word_embeddings.weight"] = rand(q["vocab_size"], d)
        sd["Qformer.bert.embeddings.position_embeddings.weight"] = rand(q["max_position_embeddings"], d)
    for i in range(q["num_hidden_layers"]):
        layer = f"Qformer.bert.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            linear(sd, layer + "attention.self." + name, d, d, rand)
        linear(sd, layer + "attention.output.dense", d, d, rand)
        layer_norm(sd, layer + "attention.output.LayerNorm", d, rand)
        if i % q["cross_attention_frequency"] == 0:
            linear(sd, layer + "crossattention.self.query", d, d, rand)
            linear(sd, layer + "crossattention.self.key", d, dv, rand)
            linear(sd, layer + "crossattention.self.value", d, dv, rand)
            linear(sd, layer + "crossattention.output.dense", d, d, rand)
            layer_norm(sd, layer + "crossattention.output.LayerNorm", d, rand)
        linear(sd, layer + "intermediate_query.dense", ffn, d, rand)
        linear(sd, layer + "output_query.dense", d, ffn, rand)
        layer_norm(sd, layer + "output_query.LayerNorm", d, rand)
        if text:
            linear(sd, layer + "intermediate.dense", ffn, d, rand)
            linear(sd, layer + "output.dense", d, ffn, rand)
            layer_norm(sd, layer + "output.LayerNorm", d, rand)
    if lm_head:
        bias = rand(q["vocab_size"])
        sd["Qformer.cls.predictions.bias"] = bias
        sd["Qformer.cls.predictions.decoder.bias"] = bias  # BERT: decoder.bias = bias, one tensor
        sd["Qformer.cls.predictions.decoder.weight"] = sd["Qformer.bert.embeddings.word_embeddings.weight"]
        linear(sd, "Qformer.cls.predictions.transform.dense", d, d, rand)
        layer_norm(sd, "Qformer.cls.predictions.transform.LayerNorm", d, rand)
    return sd


def lavis_stage1(cfg: dict, rand: Rand, lm_head: bool = False) -> dict:
    """Blip2Qformer as its saved checkpoints: no frozen ViT."""
    sd = lavis_qformer(cfg, rand, text=True, lm_head=lm_head)
    d, e = cfg["qformer_config"]["hidden_size"], 256  # image_text_hidden_size (default)
    linear(sd, "vision_proj", e, d, rand)
    linear(sd, "text_proj", e, d, rand)
    linear(sd, "itm_head", 2, d, rand)
    sd["temp"] = torch.tensor(0.0654)
    return sd


def llm_state_dict(cfg: dict, rand: Rand) -> dict:
    """The LLM's own (transformers) keys, random values; Flan-T5's lm_head differs from its embeddings."""
    text_config = AutoConfig.for_model(**cfg["text_config"])
    auto = AutoModelForSeq2SeqLM if text_config.is_encoder_decoder else AutoModelForCausalLM
    sd = {key: rand(*value.shape) for key, value in auto.from_config(text_config).state_dict().items()}
    if "shared.weight" in sd:  # T5: one input embedding under three names, a separate lm_head
        sd["encoder.embed_tokens.weight"] = sd["decoder.embed_tokens.weight"] = sd["shared.weight"]
    else:  # OPT ties its lm_head to the input embedding
        sd["lm_head.weight"] = sd["model.decoder.embed_tokens.weight"]
    return sd


def lavis_stage2(cfg: dict, rand: Rand, llm: str, with_vit: bool = False, with_llm: bool = False) -> dict:
    """Blip2OPT / Blip2T5 (`llm` = "opt" / "t5"): saved checkpoints lack the ViT and the LLM; the in-memory state
    dict (what transformers' conversion reads) has both."""
    sd = lavis_qformer(cfg, rand, text=False)
    linear(sd, f"{llm}_proj", cfg["text_config"].get("hidden_size", cfg["text_config"].get("d_model")), 32, rand)
    if with_vit:
        sd |= lavis_vit(cfg, rand)
    if with_llm:
        sd |= {f"{llm}_model.{key}": value for key, value in llm_state_dict(cfg, rand).items()}
    return sd


def save_pth(path: Path, state_dict: dict, wrap: bool = True) -> str:
    torch.save({"model": state_dict} if wrap else state_dict, path)
    return str(path)


def save_config(path: Path, cfg: dict) -> str:
    path.write_text(json.dumps(cfg))
    return str(path)


def run(tmp_path: Path, checkpoint: dict, cfg: dict, *extra: str) -> tuple[Path, dict]:
    """main() on the checkpoint; returns the output folder and its conversion report."""
    output = tmp_path / "converted"
    argv = [
        "--checkpoint",
        save_pth(tmp_path / "ckpt.pth", checkpoint),
        "--config",
        save_config(tmp_path / "c.json", cfg),
    ]
    assert main([*argv, *extra, "--output", str(output)]) == 0
    return output, json.loads((output / "lavis_conversion_report.json").read_text())


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.detach(), expected.to(actual.dtype), rtol=0, atol=0)


def check_qformer(model, sd: dict, cfg: dict, text: bool) -> None:
    """Every Q-Former tensor where it belongs: self-attention, cross-attention (even layers only), query FFN apart
    from text FFN."""
    q = cfg["qformer_config"]
    assert_same(model.query_tokens, sd["query_tokens"])
    assert_same(model.qformer.layernorm.weight, sd["Qformer.bert.embeddings.LayerNorm.weight"])
    assert_same(model.vision_model.post_layernorm.bias, sd["ln_vision.bias"])
    for i, layer in enumerate(model.qformer.encoder.layer):
        lavis = f"Qformer.bert.encoder.layer.{i}."
        assert_same(layer.attention.attention.query.weight, sd[lavis + "attention.self.query.weight"])
        assert_same(layer.attention.attention.key.bias, sd[lavis + "attention.self.key.bias"])
        assert_same(layer.attention.attention.value.weight, sd[lavis + "attention.self.value.weight"])
        assert_same(layer.attention.output.dense.weight, sd[lavis + "attention.output.dense.weight"])
        assert_same(layer.attention.output.LayerNorm.bias, sd[lavis + "attention.output.LayerNorm.bias"])
        if i % q["cross_attention_frequency"] == 0:
            assert_same(layer.crossattention.attention.key.weight, sd[lavis + "crossattention.self.key.weight"])
            assert_same(layer.crossattention.attention.value.bias, sd[lavis + "crossattention.self.value.bias"])
            assert_same(
                layer.crossattention.output.LayerNorm.weight, sd[lavis + "crossattention.output.LayerNorm.weight"]
            )
        else:
            assert not hasattr(layer, "crossattention")
        assert_same(layer.intermediate_query.dense.weight, sd[lavis + "intermediate_query.dense.weight"])
        assert_same(layer.output_query.dense.bias, sd[lavis + "output_query.dense.bias"])
        assert_same(layer.output_query.LayerNorm.weight, sd[lavis + "output_query.LayerNorm.weight"])
        if text:  # the text FFN is BERT's `intermediate`/`output`, not the query one
            assert_same(layer.intermediate.dense.weight, sd[lavis + "intermediate.dense.weight"])
            assert_same(layer.output.dense.weight, sd[lavis + "output.dense.weight"])
            assert_same(layer.output.LayerNorm.bias, sd[lavis + "output.LayerNorm.bias"])
            assert not torch.equal(layer.intermediate.dense.weight, layer.intermediate_query.dense.weight)
        else:
            assert not hasattr(layer, "intermediate")


def check_vit(model, sd: dict, layers: int, prefix: str = "visual_encoder.") -> None:
    vision = model.vision_model
    assert_same(vision.embeddings.class_embedding, sd[prefix + "cls_token"])
    assert_same(vision.embeddings.patch_embedding.weight, sd[prefix + "patch_embed.proj.weight"])
    for i in range(layers):
        layer, lavis = vision.encoder.layers[i], f"{prefix}blocks.{i}."
        q_bias, v_bias = sd[lavis + "attn.q_bias"], sd[lavis + "attn.v_bias"]
        assert_same(layer.self_attn.qkv.bias, torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]))
        assert_same(layer.self_attn.qkv.weight, sd[lavis + "attn.qkv.weight"])
        assert_same(layer.self_attn.projection.weight, sd[lavis + "attn.proj.weight"])
        assert_same(layer.layer_norm1.weight, sd[lavis + "norm1.weight"])
        assert_same(layer.layer_norm2.bias, sd[lavis + "norm2.bias"])
        assert_same(layer.mlp.fc1.weight, sd[lavis + "mlp.fc1.weight"])
        assert_same(layer.mlp.fc2.bias, sd[lavis + "mlp.fc2.bias"])


# ---------------------------------------------------------------------------------------------------------------------
# The table itself
# ---------------------------------------------------------------------------------------------------------------------


def test_key_table_rows_are_well_formed():
    seen = set()
    for lavis, ours in KEY_TABLE:
        assert lavis not in seen, f"duplicate row {lavis}"
        seen.add(lavis)
        placeholders = {name for name in PLACEHOLDERS if "{" + name + "}" in lavis}
        assert placeholders == {name for name in PLACEHOLDERS if "{" + name + "}" in ours}, (lavis, ours)
    assert rename_key("Qformer.bert.encoder.layer.10.attention.self.value.bias") == (
        "qformer.encoder.layer.10.attention.attention.value.bias"
    )
    assert rename_key("Qformer.bert.encoder.layer.3.output_query.dense.weight") == (
        "qformer.encoder.layer.3.output_query.dense.weight"
    )
    assert (
        rename_key("Qformer.bert.encoder.layer.3.output.dense.weight") == "qformer.encoder.layer.3.output.dense.weight"
    )
    assert (
        rename_key("opt_model.model.decoder.layers.0.fc1.weight") == "language_model.model.decoder.layers.0.fc1.weight"
    )
    assert rename_key("Qformer.bert.encoder.layer.0.attention.self.rotary.weight") is None


# ---------------------------------------------------------------------------------------------------------------------
# Stage 1
# ---------------------------------------------------------------------------------------------------------------------


def test_stage1_to_retrieval(tmp_path, capsys):
    cfg = stage1_config()
    sd = lavis_stage1(cfg, Rand(1))
    output, report = run(tmp_path, sd, cfg)
    model = Blip2ForImageTextRetrieval.from_pretrained(output)

    check_qformer(model, sd, cfg, text=True)
    assert_same(model.embeddings.word_embeddings.weight, sd["Qformer.bert.embeddings.word_embeddings.weight"])
    assert_same(model.embeddings.position_embeddings.weight, sd["Qformer.bert.embeddings.position_embeddings.weight"])
    assert_same(model.vision_projection.weight, sd["vision_proj.weight"])
    assert_same(model.text_projection.bias, sd["text_proj.bias"])
    assert_same(model.itm_head.weight, sd["itm_head.weight"])
    assert model.temp.shape == () and model.temp.item() == pytest.approx(0.0654)

    # The published stage-1 checkpoints have no ViT: the report says so and points to eva_vit_g.pth.
    assert report["model_class"] == "Blip2ForImageTextRetrieval"
    assert list(report["dropped"]) == ["Qformer.bert.embeddings.position_ids"]  # a buffer
    missing = report["missing"]
    assert set(missing) == {
        k for k in model.state_dict() if k.startswith("vision_model.") and "post_layernorm" not in k
    }
    assert all(reason.startswith("not in this checkpoint") and "--vit" in reason for reason in missing.values())
    assert "NOT IN THIS CHECKPOINT" in capsys.readouterr().out


def test_stage1_lm_head_is_reported_dropped_for_retrieval():
    cfg = stage1_config()
    sd = lavis_stage1(cfg, Rand(2), lm_head=True)
    converted, report = convert_state_dict_with_report(sd, Blip2Config(**cfg), Blip2ForImageTextRetrieval)
    cls_keys = {k for k in sd if k.startswith("Qformer.cls.")}
    assert len(cls_keys) == 7 and cls_keys <= set(report.dropped)
    assert all("LM head" in report.dropped[k] for k in cls_keys)
    assert not any(k.startswith("cls.") for k in converted)


def test_stage1_with_lm_head_to_pretraining(tmp_path):
    cfg = stage1_config()
    sd = lavis_stage1(cfg, Rand(3), lm_head=True)
    output, report = run(tmp_path, sd, cfg)
    assert report["model_class"] == "Blip2ForPreTraining"
    model = Blip2ForPreTraining.from_pretrained(output)

    check_qformer(model, sd, cfg, text=True)
    head = model.cls.predictions
    assert_same(head.bias, sd["Qformer.cls.predictions.bias"])
    assert_same(head.transform.dense.weight, sd["Qformer.cls.predictions.transform.dense.weight"])
    assert_same(head.transform.LayerNorm.bias, sd["Qformer.cls.predictions.transform.LayerNorm.bias"])
    assert_same(head.decoder.weight, sd["Qformer.cls.predictions.decoder.weight"])
    # the decoder stays tied to the word embeddings, as in LAVIS
    assert head.decoder.weight.data_ptr() == model.embeddings.word_embeddings.weight.data_ptr()
    assert_same(model.temp, sd["temp"])


# ---------------------------------------------------------------------------------------------------------------------
# Stage 2
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("llm_format", ["base-model file", "transformers folder"])
def test_stage2_opt_with_llm_from_its_own_checkpoint(tmp_path, capsys, llm_format):
    cfg = tiny_config_dict("opt")
    sd = lavis_stage2(cfg, Rand(4), "opt")
    llm = llm_state_dict(cfg, Rand(5))
    if llm_format == "base-model file":
        # facebook/opt-* files hold the base model (`decoder.*`, no `model.` prefix) and no lm_head (tied)
        facebook = {k.removeprefix("model."): v.clone() for k, v in llm.items() if k != "lm_head.weight"}
        llm_path = tmp_path / "opt.safetensors"
        save_file(facebook, llm_path)
    else:
        opt = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg["text_config"]))
        opt.load_state_dict(llm)
        llm_path = tmp_path / "opt"
        opt.save_pretrained(llm_path)
    output, report = run(tmp_path, sd, cfg, "--llm", str(llm_path))
    model = Blip2ForConditionalGeneration.from_pretrained(output)

    check_qformer(model, sd, cfg, text=False)
    assert_same(model.language_projection.weight, sd["opt_proj.weight"])
    assert_same(model.language_projection.bias, sd["opt_proj.bias"])
    decoder = model.language_model.model.decoder
    assert_same(decoder.embed_tokens.weight, llm["model.decoder.embed_tokens.weight"])
    assert_same(decoder.layers[1].self_attn.k_proj.weight, llm["model.decoder.layers.1.self_attn.k_proj.weight"])
    assert_same(model.language_model.lm_head.weight, llm["model.decoder.embed_tokens.weight"])
    assert report["tied"] == {"language_model.lm_head.weight": "language_model.model.decoder.embed_tokens.weight"}
    assert all(k.startswith("vision_model.") for k in report["missing"])  # only the ViT is left
    out = capsys.readouterr().out
    assert f"from {llm_path.name}" in out and "from ckpt.pth" in out


def test_stage2_opt_logits_match_hand_loaded_reference(tmp_path):
    """End to end: the converted folder gives the logits of a model whose weights were put in place by hand."""
    cfg = tiny_config_dict("opt")
    sd = lavis_stage2(cfg, Rand(6), "opt", with_vit=True, with_llm=True)
    output, report = run(tmp_path, sd, cfg)
    assert report["missing"] == {}
    converted = Blip2ForConditionalGeneration.from_pretrained(output).eval()

    reference = Blip2ForConditionalGeneration(Blip2Config(**cfg)).eval()

    def put(module, lavis: str) -> None:
        module.weight.copy_(sd[lavis + ".weight"])
        module.bias.copy_(sd[lavis + ".bias"])

    with torch.no_grad():
        vision = reference.vision_model
        vision.embeddings.class_embedding.copy_(sd["visual_encoder.cls_token"])
        vision.embeddings.position_embedding.copy_(sd["visual_encoder.pos_embed"])
        put(vision.embeddings.patch_embedding, "visual_encoder.patch_embed.proj")
        for i, layer in enumerate(vision.encoder.layers):
            block = f"visual_encoder.blocks.{i}"
            put(layer.layer_norm1, block + ".norm1")
            put(layer.layer_norm2, block + ".norm2")
            layer.self_attn.qkv.weight.copy_(sd[block + ".attn.qkv.weight"])
            q_bias, v_bias = sd[block + ".attn.q_bias"], sd[block + ".attn.v_bias"]
            layer.self_attn.qkv.bias.copy_(torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]))
            put(layer.self_attn.projection, block + ".attn.proj")
            put(layer.mlp.fc1, block + ".mlp.fc1")
            put(layer.mlp.fc2, block + ".mlp.fc2")
        put(vision.post_layernorm, "ln_vision")
        reference.query_tokens.copy_(sd["query_tokens"])
        put(reference.qformer.layernorm, "Qformer.bert.embeddings.LayerNorm")
        for i, layer in enumerate(reference.qformer.encoder.layer):
            lavis = f"Qformer.bert.encoder.layer.{i}."
            for name in ("query", "key", "value"):
                put(getattr(layer.attention.attention, name), lavis + "attention.self." + name)
            put(layer.attention.output.dense, lavis + "attention.output.dense")
            put(layer.attention.output.LayerNorm, lavis + "attention.output.LayerNorm")
            if hasattr(layer, "crossattention"):
                for name in ("query", "key", "value"):
                    put(getattr(layer.crossattention.attention, name), lavis + "crossattention.self." + name)
                put(layer.crossattention.output.dense, lavis + "crossattention.output.dense")
                put(layer.crossattention.output.LayerNorm, lavis + "crossattention.output.LayerNorm")
            put(layer.intermediate_query.dense, lavis + "intermediate_query.dense")
            put(layer.output_query.dense, lavis + "output_query.dense")
            put(layer.output_query.LayerNorm, lavis + "output_query.LayerNorm")
        put(reference.language_projection, "opt_proj")
        llm = {k.removeprefix("opt_model."): v for k, v in sd.items() if k.startswith("opt_model.")}
        reference.language_model.load_state_dict(llm, strict=True)

    pixel_values = Rand(7)(2, 3, 30, 30)
    input_ids = torch.tensor([[IMAGE_TOKEN] * 4 + [2, 11, 12, 13], [IMAGE_TOKEN] * 4 + [2, 21, 22, 23]])
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values, input_ids=input_ids).logits
        actual = converted(pixel_values=pixel_values, input_ids=input_ids).logits
    assert actual.shape == (2, 8, 99)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_stage2_t5_keeps_flan_t5_lm_head_apart_and_drops_text_ffn(tmp_path):
    cfg = tiny_config_dict("t5")
    sd = lavis_stage2(cfg, Rand(8), "t5", with_llm=True)
    # a checkpoint that still carries the text FFN: unused by stage 2, so dropped and reported
    rand = Rand(9)
    for i in range(cfg["qformer_config"]["num_hidden_layers"]):
        linear(sd, f"Qformer.bert.encoder.layer.{i}.intermediate.dense", 37, 32, rand)
        linear(sd, f"Qformer.bert.encoder.layer.{i}.output.dense", 32, 37, rand)
        layer_norm(sd, f"Qformer.bert.encoder.layer.{i}.output.LayerNorm", 32, rand)
    output, report = run(tmp_path, sd, cfg)
    model = Blip2ForConditionalGeneration.from_pretrained(output)

    check_qformer(model, sd, cfg, text=False)
    assert_same(model.language_projection.weight, sd["t5_proj.weight"])
    t5 = model.language_model
    assert_same(t5.shared.weight, sd["t5_model.shared.weight"])
    assert_same(t5.lm_head.weight, sd["t5_model.lm_head.weight"])  # Flan-T5: not the input embedding
    assert_same(
        t5.encoder.block[0].layer[0].SelfAttention.q.weight,
        sd["t5_model.encoder.block.0.layer.0.SelfAttention.q.weight"],
    )
    assert_same(
        t5.decoder.block[1].layer[2].DenseReluDense.wo.weight,
        sd["t5_model.decoder.block.1.layer.2.DenseReluDense.wo.weight"],
    )
    text_ffn = [k for k in sd if ".intermediate.dense." in k or ".output.dense." in k or ".output.LayerNorm." in k]
    text_ffn = [k for k in text_ffn if "attention" not in k]
    assert len(text_ffn) == 18
    assert all("use_qformer_text_input=False" in report["dropped"][k] for k in text_ffn)
    assert any("kept separate" in note and "lm_head" in note for note in report["notes"])


# ---------------------------------------------------------------------------------------------------------------------
# EVA ViT-g on its own (eva_vit_g.pth)
# ---------------------------------------------------------------------------------------------------------------------


def test_bare_eva_vit_drops_last_block_and_head_and_resizes_positions(tmp_path):
    cfg = tiny_config_dict("opt")
    cfg["vision_config"]["image_size"] = 42  # 7x7 patches of 6 px; the EVA file is trained for 5x5
    rand = Rand(10)
    eva = lavis_vit(cfg, rand, blocks=3, grid=5, prefix="")  # one block more than the 2 configured
    eva |= {"norm.weight": rand(32), "norm.bias": rand(32), "head.weight": rand(10, 32), "head.bias": rand(10)}
    eva |= {"fc_norm.weight": rand(32), "fc_norm.bias": rand(32)}
    vit_path = save_pth(tmp_path / "eva_vit_g.pth", eva, wrap=False)
    sd = lavis_stage2(cfg, rand, "opt")
    output, report = run(tmp_path, sd, cfg, "--vit", vit_path)
    model = Blip2ForConditionalGeneration.from_pretrained(output)

    check_vit(model, eva, layers=2, prefix="")
    assert len(model.vision_model.encoder.layers) == 2
    # LAVIS's interpolate_pos_embed: class position kept, the 5x5 grid resized bicubically to 7x7
    pos = eva["pos_embed"]
    grid = pos[:, 1:].reshape(1, 5, 5, 32).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False)
    expected = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 49, 32)], dim=1)
    assert_same(model.vision_model.embeddings.position_embedding, expected)
    assert any("5x5 -> 7x7" in note for note in report["notes"])

    dropped = report["dropped"]
    block_2 = {k for k in dropped if k.startswith("visual_encoder.blocks.2.")}
    assert len(block_2) == 13 and all("num_hidden_layers=2" in dropped[k] for k in block_2)
    for name in ("norm", "fc_norm", "head"):
        assert f"visual_encoder.{name}.weight" in dropped and f"visual_encoder.{name}.bias" in dropped
    assert report["missing"] == {k: v for k, v in report["missing"].items() if k.startswith("language_model.")}


def test_bare_eva_state_dict_converts_to_vision_model_keys():
    cfg = tiny_config_dict("opt")
    eva = lavis_vit(cfg, Rand(11), blocks=3, prefix="")
    converted, report = convert_state_dict_with_report(eva, Blip2Config(**cfg))
    assert report.model_class == "Blip2VisionModel"
    assert "encoder.layers.1.self_attn.qkv.bias" in converted and "encoder.layers.2.mlp.fc1.weight" not in converted
    assert set(report.missing) == {"post_layernorm.weight", "post_layernorm.bias"}  # LAVIS's ln_vision
    with torch.device("meta"):
        expected = Blip2VisionModel(Blip2Config(**cfg).vision_config).state_dict()
    assert set(converted) | set(report.missing) == set(expected)


# ---------------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------------


def test_unmatched_key_is_named():
    cfg = tiny_config_dict("opt")
    sd = lavis_stage2(cfg, Rand(12), "opt")
    sd["Qformer.bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"match no row(.|\n)*layer\.0\.attention\.self\.rotary\.weight"):
        convert_state_dict(sd, Blip2Config(**cfg))


def refusal(tmp_path: Path, capsys, checkpoint: Path | str, cfg: dict, *extra: str) -> str:
    """main() on a checkpoint it must refuse: exit code 1, no output folder, and the stderr message (no traceback)."""
    output = tmp_path / "refused"
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--config",
        save_config(tmp_path / "c.json", cfg),
        "--output",
        str(output),
    ]
    assert main([*argv, *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("blip2-hf-convert-lavis: error: ") and "Traceback" not in err
    assert not output.exists()
    return err


def test_misshaped_key_names_both_shapes(tmp_path, capsys):
    cfg = stage1_config()
    sd = lavis_stage1(cfg, Rand(13))
    sd["itm_head.weight"] = torch.zeros(3, 32)
    err = refusal(tmp_path, capsys, save_pth(tmp_path / "ckpt.pth", sd), cfg)
    assert "itm_head.weight -> itm_head.weight: LAVIS (3, 32), expected (2, 32)" in err


def test_usual_mistakes_are_one_line_messages(tmp_path, capsys):
    """A missing file, a file that is no PyTorch checkpoint, one that is not BLIP-2 (wrong keys) and an existing
    --output each get a message naming the problem, exit code 1."""
    cfg = stage1_config()
    assert "missing.pth: no such file" in refusal(tmp_path, capsys, tmp_path / "missing.pth", cfg)
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    assert "notes.pth is not a PyTorch checkpoint" in refusal(tmp_path, capsys, tmp_path / "notes.pth", cfg)
    resnet = save_pth(tmp_path / "resnet.pth", {"conv1.weight": torch.zeros(2, 3, 1, 1), "fc.bias": torch.zeros(2)})
    err = refusal(tmp_path, capsys, resnet, cfg)
    assert "conv1.weight" in err and "fc.bias" in err  # the keys that are no LAVIS BLIP-2 key
    assert "--config 'nope.json': neither a preset" in refusal(tmp_path, capsys, resnet, cfg, "--config", "nope.json")

    good = save_pth(tmp_path / "good.pth", lavis_stage1(cfg, Rand(16)))
    (tmp_path / "taken").mkdir()
    argv = [
        "--checkpoint",
        good,
        "--config",
        save_config(tmp_path / "c.json", cfg),
        "--output",
        str(tmp_path / "taken"),
    ]
    assert main(argv) == 1
    assert "--output" in capsys.readouterr().err and not any((tmp_path / "taken").iterdir())
    assert main([*argv, "--overwrite"]) == 0 and (tmp_path / "taken" / "config.json").is_file()


def test_llm_of_the_wrong_family_is_refused():
    sd = lavis_stage2(tiny_config_dict("opt"), Rand(15), "opt")
    with pytest.raises(ValueError, match=r"opt_\* keys \(OPT\) but the config's LLM is 't5'"):
        convert_state_dict(sd, Blip2Config(**tiny_config_dict("t5")))


def test_pth_with_python_objects_is_refused(tmp_path, capsys):
    cfg = tiny_config_dict("opt")
    path = tmp_path / "unsafe.pth"
    torch.save({"model": lavis_stage2(cfg, Rand(14), "opt"), "args": Path("anything")}, path)
    with pytest.raises(ValueError, match=r"cannot be read safely(.|\n)*weights_only=True"):
        load_lavis_checkpoint(path)
    assert "unsafe.pth cannot be read safely" in refusal(tmp_path, capsys, path, cfg)


# ---------------------------------------------------------------------------------------------------------------------
# Presets for the released LAVIS models (real widths, built on the meta device)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, image_tokens, projection",
    [
        ("pretrain", 257, None),
        ("coco", 677, None),
        ("pretrain_opt2.7b", 257, 2560),
        ("caption_coco_opt6.7b", 677, 4096),
        ("pretrain_flant5xl", 257, 2048),
        ("pretrain_flant5xxl", 257, 4096),
    ],
)
def test_presets_match_the_released_shapes(name, image_tokens, projection):
    assert name in PRESETS
    config = load_config(name)
    model_class = Blip2ForConditionalGeneration if projection else Blip2ForImageTextRetrieval
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in model_class(config).state_dict().items()}
    assert shapes["vision_model.embeddings.position_embedding"] == (1, image_tokens, 1408)
    assert sum(k.endswith("self_attn.qkv.weight") for k in shapes) == 39
    assert shapes["query_tokens"] == (1, 32, 768)
    assert shapes["qformer.encoder.layer.10.crossattention.attention.key.weight"] == (768, 1408)
    if projection is None:
        assert shapes["embeddings.word_embeddings.weight"] == (30523, 768)  # BERT + [DEC]
        assert "qformer.encoder.layer.0.intermediate.dense.weight" in shapes
    else:
        assert shapes["language_projection.weight"] == (projection, 768)
        assert config.image_token_index < config.text_config.vocab_size
