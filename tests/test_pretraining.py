"""Stage 1 (`Blip2ForPreTraining`): each loss against a plain reference written here from the formulas, the masks by
perturbation, the hard-negative sampler's edge cases, the frozen encoder, BERT initialization, Q-Former captioning
and the checkpoint flow to retrieval and stage 2. The two-process run is in test_pretraining_distributed.py."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.nn import functional as F

import blip2_hf
from blip2_hf.modeling_blip2 import sample_hard_negatives
from blip2_hf.testing_utils import perturb_, tiny_config_dict

DEC, SEP, PAD = 98, 3, 0


def stage1_config(**overrides) -> blip2_hf.Blip2Config:
    config = tiny_config_dict("opt", text_input=True, image_token_index=None, **overrides)
    config["qformer_config"].update(bos_token_id=DEC, eos_token_id=SEP)
    return blip2_hf.Blip2Config(**config)


def stage1_model(seed: int = 0, **overrides) -> blip2_hf.Blip2ForPreTraining:
    torch.manual_seed(seed)
    return perturb_(blip2_hf.Blip2ForPreTraining(stage1_config(**overrides)), seed=seed, scale=0.1)


def batch(batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 80, (batch_size, 7), generator=generator)
    ids[:, 0] = 1  # [CLS]
    mask = torch.ones_like(ids)
    if batch_size > 1:
        mask[1, 4:] = 0
        ids[1, 4:] = PAD
    return dict(
        pixel_values=torch.randn(batch_size, 3, 30, 30, generator=generator), input_ids=ids, attention_mask=mask
    )


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, epsilon: float) -> torch.Tensor:
    """(1 - eps) * NLL(target) + eps * mean over classes of NLL(class), averaged over rows: the formula, by hand."""
    log_probs = logits.log_softmax(dim=-1)
    nll = -log_probs.gather(1, target[:, None]).squeeze(1)
    uniform = -log_probs.mean(dim=-1)
    return ((1 - epsilon) * nll + epsilon * uniform).mean()


def features(model, inputs):
    """Query outputs, image embeddings and text [CLS] output, each by its own plain pass."""
    image_embeds = model.vision_model(inputs["pixel_values"]).last_hidden_state
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    query_output = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
    text_cls = model.qformer(
        text_embeds=model.embeddings(inputs["input_ids"]), attention_mask=inputs["attention_mask"]
    ).last_hidden_state[:, 0]
    return image_embeds, query_output, text_cls


@pytest.fixture(scope="module")
def two_pairs():
    """Global batch of 2: each row has exactly one negative candidate, so the ITM batch is deterministic."""
    model = stage1_model().eval()
    inputs = batch(2)
    with torch.no_grad():
        output = model(**inputs)
    return model, inputs, output


def test_itc_loss_matches_the_formula(two_pairs, record_parity):
    model, inputs, output = two_pairs
    with torch.no_grad():
        _, query_output, text_cls = features(model, inputs)
        image_feats = F.normalize(model.vision_projection(query_output), dim=-1)
        text_feat = F.normalize(model.text_projection(text_cls), dim=-1)
        n = len(text_feat)
        sim = torch.zeros(n, n)
        for i in range(n):
            for j in range(n):
                sim[i, j] = max(float(image_feats[i, q] @ text_feat[j]) for q in range(image_feats.shape[1]))
        sim = sim / model.temp
        target = torch.arange(n)
        expected = (smoothed_cross_entropy(sim, target, 0.1) + smoothed_cross_entropy(sim.t(), target, 0.1)) / 2
    assert record_parity("stage1 ITC sim_i2t vs formula", output.sim_i2t, sim) < 1e-5
    assert record_parity("stage1 ITC sim_t2i vs formula", output.sim_t2i, sim.t()) < 1e-5
    assert record_parity("stage1 ITC loss vs formula", output.loss_itc, expected) < 1e-5


def test_itm_loss_matches_the_formula(two_pairs, record_parity):
    model, inputs, output = two_pairs
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        image_embeds = model.vision_model(inputs["pixel_values"]).last_hidden_state

        def itm(image, text):  # one pair, queries and text see each other
            joint = model.qformer(
                query_embeds=model.query_tokens,
                text_embeds=model.embeddings(ids[text : text + 1]),
                attention_mask=mask[text : text + 1],
                encoder_hidden_states=image_embeds[image : image + 1],
                self_attention_mask="bidirectional",
            ).last_hidden_state
            return model.itm_head(joint[:, :4]).mean(dim=1)[0]

        # positives; each text with the other image; each image with the other text
        pairs = [(0, 0), (1, 1), (1, 0), (0, 1), (0, 1), (1, 0)]
        logits = torch.stack([itm(image, text) for image, text in pairs])
        labels = torch.tensor([1, 1, 0, 0, 0, 0])
        expected = F.cross_entropy(logits, labels)  # plain cross-entropy, no smoothing
    assert record_parity("stage1 ITM logits vs formula", output.logits_itm, logits) < 1e-5
    assert record_parity("stage1 ITM loss vs formula", output.loss_itm, expected) < 1e-5


def test_itg_loss_matches_the_formula(two_pairs, record_parity):
    model, inputs, output = two_pairs
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        image_embeds = model.vision_model(inputs["pixel_values"]).last_hidden_state
        decoder_ids = ids.clone()
        decoder_ids[:, 0] = DEC
        length = ids.shape[1]
        # the mask written out: queries see queries; text token t sees all queries and text tokens <= t
        allowed = torch.zeros(4 + length, 4 + length, dtype=torch.bool)
        allowed[:, :4] = True
        allowed[4:, 4:] = torch.tril(torch.ones(length, length, dtype=torch.bool))
        key_mask = torch.cat([torch.ones(2, 4, dtype=torch.bool), mask.bool()], dim=1)
        additive = torch.zeros(2, 1, 4 + length, 4 + length).masked_fill(
            ~(allowed[None] & key_mask[:, None, :])[:, None], torch.finfo(torch.float32).min
        )
        qformer = model.qformer
        hidden = qformer.layernorm(
            torch.cat([model.query_tokens.expand(2, -1, -1), model.embeddings(decoder_ids)], dim=1)
        )
        for layer in qformer.encoder.layer:
            hidden, _, _ = layer(hidden, additive, image_embeds, query_length=4)
        logits = model.cls(hidden[:, 4:])
        rows, targets = [], []
        for b in range(2):
            for t in range(length - 1):
                if mask[b, t + 1]:  # every non-pad token after [DEC] is predicted from the tokens before it
                    rows.append(logits[b, t])
                    targets.append(decoder_ids[b, t + 1])
        expected = smoothed_cross_entropy(torch.stack(rows), torch.stack(targets), 0.1)
    assert record_parity("stage1 ITG logits vs formula", output.logits_itg, logits) < 1e-5
    assert record_parity("stage1 ITG loss vs formula", output.loss_itg, expected) < 1e-5
    assert torch.allclose(output.loss, output.loss_itc + output.loss_itm + output.loss_itg)


def test_masks_by_perturbation():
    model = stage1_model().eval()
    inputs = batch(3, seed=1)
    with torch.no_grad():
        base = model(**inputs)
        k = 4
        changed = dict(inputs, input_ids=inputs["input_ids"].clone())
        changed["input_ids"][0, k] = (changed["input_ids"][0, k] + 11) % 80 + 5
        torch.manual_seed(0)
        other = model(**changed)
        # ITG: logits before the changed token do not move, from it on they do
        assert torch.allclose(other.logits_itg[0, :k], base.logits_itg[0, :k], atol=1e-6)
        assert not torch.allclose(other.logits_itg[0, k], base.logits_itg[0, k])
        # ITC: the image side (query features) does not depend on text: row 0 of sim_t2i moves, the image-0 features
        # seen by the unchanged texts 1 and 2 do not
        assert torch.allclose(other.sim_t2i[1:], base.sim_t2i[1:], atol=1e-6)
        assert not torch.allclose(other.sim_t2i[0], base.sim_t2i[0])
        # ITM: the positive pair's score moves with its text (queries see the text there)
        assert not torch.allclose(other.logits_itm[0], base.logits_itm[0])
        assert torch.allclose(other.logits_itm[1:3], base.logits_itm[1:3], atol=1e-6)


def test_cached_and_joint_itg_paths_agree():
    model = stage1_model().eval()
    inputs = batch(2)
    with torch.no_grad():
        cached = model(**inputs).loss_itg
        model.activation_checkpointing_enable()
        model.train()
        for module in model.modules():  # dropout off so the two paths are comparable
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.0
    torch.manual_seed(0)
    joint = model(**inputs).loss_itg  # under checkpointing the cache is dropped: the joint pass runs
    assert torch.allclose(cached, joint, atol=1e-5)


def test_frozen_vision_encoder_gets_no_gradient_and_stays_in_eval():
    model = stage1_model()
    model.train()
    assert not model.vision_model.encoder.training and not model.vision_model.embeddings.training
    assert model.qformer.training
    model(**batch(3)).loss.backward()
    frozen = [
        p for n, p in model.named_parameters() if n.startswith(("vision_model.encoder", "vision_model.embeddings"))
    ]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "vision_model.post_layernorm.weight" in trainable  # LAVIS trains ln_vision
    for name in ("query_tokens", "temp", "itm_head.weight", "cls.predictions.bias", "vision_projection.weight"):
        assert dict(model.named_parameters())[name].grad is not None, name
    assert model.qformer.encoder.layer[0].crossattention.attention.key.weight.grad.abs().sum() > 0


def test_frozen_image_states_input_equals_pixel_values():
    model = stage1_model().eval()
    inputs = batch(2)
    with torch.no_grad():
        frozen = model.encode_image_frozen(inputs["pixel_values"])
        a = model(**inputs)
        b = model(frozen_image_states=frozen, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert torch.allclose(a.loss, b.loss, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one of pixel_values and frozen_image_states"):
        model(input_ids=inputs["input_ids"])


# ---------------------------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------------------------


def test_sampler_draws_from_softmax_without_the_positive():
    similarity = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    positive = torch.tensor([0])
    torch.manual_seed(0)
    draws = torch.stack([sample_hard_negatives(similarity, positive)[0] for _ in range(4000)]).flatten()
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    expected = torch.softmax(torch.tensor([1.0, 0.0, -1.0]), dim=0)
    assert frequencies[0] == 0
    assert torch.allclose(frequencies[1:], expected, atol=0.03)


def test_sampler_edge_cases():
    # batch of one: no candidate, no crash, flagged
    index, has_negative = sample_hard_negatives(torch.tensor([[3.0]]), torch.tensor([0]))
    assert index.tolist() == [0] and has_negative.tolist() == [False]
    # NaN similarities: a NaN column gets no weight; an all-NaN row draws uniformly among the others
    torch.manual_seed(0)
    nan = float("nan")
    sim = torch.tensor([[1.0, nan, 5.0], [nan, nan, nan], [0.0, 0.0, 0.0]])
    for _ in range(200):
        index, has_negative = sample_hard_negatives(sim, torch.tensor([0, 1, 2]))
        assert index[0] == 2 and index[1] in (0, 2) and index[2] in (0, 1) and has_negative.all()
    # identical captions: equal similarities, uniform over the other pairs
    index, _ = sample_hard_negatives(torch.zeros(4, 4), torch.arange(4))
    assert (index != torch.arange(4)).all()


def test_forward_with_batch_of_one_identical_captions_and_nan():
    model = stage1_model()
    out = model(**batch(1))
    assert torch.isfinite(out.loss) and out.logits_itm.shape == (1, 2)  # only the positive: no negative exists
    inputs = batch(3)
    inputs["input_ids"] = inputs["input_ids"][:1].repeat(3, 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    out = model(**inputs)
    assert torch.isfinite(out.loss) and out.logits_itm.shape == (9, 2)
    with torch.no_grad():
        model.temp.fill_(0.0)  # similarities become inf/NaN: the sampler still draws valid negatives
    out = model(**batch(3))
    assert out.logits_itm.shape == (9, 2)


def test_temperature_clamp_is_an_option():
    model = stage1_model(temperature_range=[0.001, 0.5])
    with torch.no_grad():
        model.temp.fill_(2.0)
    model(**batch(2))
    assert model.temp.item() == pytest.approx(0.5)
    unclamped = stage1_model()
    with torch.no_grad():
        unclamped.temp.fill_(2.0)
    unclamped(**batch(2))
    assert unclamped.temp.item() == pytest.approx(2.0)  # LAVIS never clamps


# ---------------------------------------------------------------------------------------------------------------------
# BERT init, captioning, checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def test_from_bert_copies_what_the_paper_copies(tmp_path):
    torch.manual_seed(0)
    bert_config = transformers.BertConfig(
        vocab_size=98,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    bert = perturb_(transformers.BertForMaskedLM(bert_config))
    bert.save_pretrained(tmp_path)
    model = blip2_hf.Blip2ForPreTraining.from_bert(tmp_path, stage1_config())
    state = bert.state_dict()
    for i in range(3):
        ours, theirs = model.qformer.encoder.layer[i], f"bert.encoder.layer.{i}"
        assert torch.equal(ours.attention.attention.value.weight, state[f"{theirs}.attention.self.value.weight"])
        assert torch.equal(
            ours.attention.output.LayerNorm.weight, state[f"{theirs}.attention.output.LayerNorm.weight"]
        )
        for ffn_in, ffn_out in ((ours.intermediate, ours.output), (ours.intermediate_query, ours.output_query)):
            assert torch.equal(ffn_in.dense.weight, state[f"{theirs}.intermediate.dense.weight"])
            assert torch.equal(ffn_out.dense.weight, state[f"{theirs}.output.dense.weight"])
    assert torch.equal(model.qformer.layernorm.weight, state["bert.embeddings.LayerNorm.weight"])
    word = model.embeddings.word_embeddings.weight
    assert torch.equal(word[:98], state["bert.embeddings.word_embeddings.weight"])  # [DEC] is the extra row 98
    assert model.cls.predictions.decoder.weight is word  # tied, as BERT
    assert torch.equal(model.cls.predictions.bias[:98], state["cls.predictions.bias"])
    assert torch.equal(model.cls.predictions.transform.dense.weight, state["cls.predictions.transform.dense.weight"])
    # cross-attention has no BERT counterpart: random
    cross = model.qformer.encoder.layer[0].crossattention.attention.query.weight
    assert not torch.equal(cross, state["bert.encoder.layer.0.attention.self.query.weight"])
    with pytest.raises(ValueError, match="hidden_size"):
        small = transformers.BertForMaskedLM(
            transformers.BertConfig(vocab_size=98, hidden_size=16, num_attention_heads=4)
        )
        blip2_hf.Blip2ForPreTraining.from_bert(small, stage1_config())


def test_qformer_captioning_follows_the_itg_path():
    model = stage1_model().eval()
    pixel_values = batch(2)["pixel_values"]
    tokens = model.generate(pixel_values=pixel_values, max_new_tokens=6, min_new_tokens=6)
    assert tokens.shape == (2, 7) and (tokens[:, 0] == DEC).all()
    with torch.no_grad():  # greedy by recomputation: every step one joint multimodal-causal pass, no cache
        image_embeds = model.vision_model(pixel_values).last_hidden_state
        expected = torch.full((2, 1), DEC)
        for _ in range(6):
            hidden = model.qformer(
                query_embeds=model.query_tokens.expand(2, -1, -1),
                text_embeds=model.embeddings(expected),
                encoder_hidden_states=image_embeds,
                self_attention_mask="multimodal_causal",
            ).last_hidden_state
            logits = model.cls(hidden[:, -1])
            logits[:, SEP] = -torch.inf
            expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, expected)
    with pytest.raises(ValueError, match="greedily"):
        model.generate(pixel_values=pixel_values, num_beams=3)


def test_stage1_checkpoint_flows_to_retrieval_and_stage2(tmp_path):
    model = stage1_model().eval()
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForPreTraining.from_pretrained(tmp_path)
    assert type(reloaded) is blip2_hf.Blip2ForPreTraining
    assert reloaded.cls.predictions.decoder.weight is reloaded.embeddings.word_embeddings.weight
    inputs = batch(2)

    retrieval, info = blip2_hf.Blip2ForImageTextRetrieval.from_pretrained(tmp_path, output_loading_info=True)
    # the ITG head (`cls.*`) is left behind on purpose and not reported (`_keys_to_ignore_on_load_unexpected`)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any(name.startswith("cls.") for name in retrieval.state_dict())
    reference, info = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and info["unexpected_keys"] == {"temp"} | {
        k for k in info["unexpected_keys"] if k.startswith("cls.")
    }
    with torch.no_grad():
        sim = model(**inputs).sim_i2t * model.temp  # stage-1 cosine similarities
        ours = retrieval.eval()(**inputs).logits_per_image
        theirs = reference.eval()(**inputs).logits_per_image
    assert torch.allclose(ours, sim, atol=1e-5) and torch.allclose(theirs, sim, atol=1e-5)

    stage2 = blip2_hf.Blip2ForConditionalGeneration(blip2_hf.Blip2Config(**tiny_config_dict("opt")))
    report = stage2.init_from_stage1(tmp_path)
    assert torch.equal(stage2.query_tokens, model.query_tokens)
    assert torch.equal(stage2.vision_model.post_layernorm.weight, model.vision_model.post_layernorm.weight)
    layer = stage2.qformer.encoder.layer[0]
    assert torch.equal(
        layer.crossattention.attention.key.weight, model.qformer.encoder.layer[0].crossattention.attention.key.weight
    )
    assert {k.split(".")[0] for k in report["new"]} == {"language_model", "language_projection"}
    assert "temp" in report["dropped"] and "cls.predictions.bias" in report["dropped"]
    assert any(".intermediate.dense" in k for k in report["dropped"])  # stage 2 has no text FFN


def test_pretraining_objectives_leave_a_loss_out_as_table_6():
    """`pretraining_objectives=["itc", "itm"]` (the paper's "w/o ITG"): the loss is ITC + ITM, equal to the full
    model's two terms; no ITG output; the Q-Former LM head gets no gradient; the Trainer logs only what was computed."""
    inputs = batch(4)
    full = stage1_model()
    without_itg = stage1_model(pretraining_objectives=["itc", "itm"])
    torch.manual_seed(1)
    expected = full(**inputs)
    torch.manual_seed(1)
    out = without_itg(**inputs)
    assert out.loss_itg is None and out.logits_itg is None
    torch.testing.assert_close(out.loss_itc, expected.loss_itc, rtol=0, atol=0)
    torch.testing.assert_close(out.loss_itm, expected.loss_itm, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, expected.loss_itc + expected.loss_itm, rtol=0, atol=0)
    out.loss.backward()
    assert all(p.grad is None for n, p in without_itg.named_parameters() if n.startswith("cls.predictions.transform"))
    assert without_itg.query_tokens.grad is not None

    only_itc = stage1_model(pretraining_objectives=["itc"])(**inputs)
    assert only_itc.loss_itm is None and only_itc.loss_itg is None
    torch.testing.assert_close(only_itc.loss, expected.loss_itc, rtol=0, atol=0)


@pytest.mark.parametrize("objectives", [[], ["itm"], ["itm", "itg"], ["itc", "itc"], ["itc", "mlm"], "itc"], ids=str)
def test_pretraining_objectives_are_validated(objectives):
    with pytest.raises(Exception, match="pretraining_objectives"):
        stage1_config(pretraining_objectives=objectives)
