"""Stage 1's step on the fast paths: no host sync in the model's forward and backward (a torch.profiler trace on the
CPU, where every sync shows as an `item` / `nonzero` event), the hard-negative draws unchanged by the sync-free
sampler, fused AdamW equal to the unfused update and chosen where its kernel exists, SDPA equal to eager attention
with masks, frozen towers in bf16, and the opt-in compiled Q-Former. Speed itself is measured in
benchmarks/bench_training.py, never here."""

from __future__ import annotations

import copy

import pytest
import torch
from test_pretraining import batch, stage1_model
from test_trainer import no_dropout, processor, rows

import blip2_hf
from blip2_hf import losses
from blip2_hf.data import Stage1Collator
from blip2_hf.testing_utils import perturb_, tiny_config_dict
from blip2_hf.trainer import Blip2Stage1Trainer, Blip2TrainingArguments, fused_adamw_supported

# What a host sync looks like in a CPU trace: reading a value (`item` -> `_local_scalar_dense`, `bool(tensor)` ->
# `is_nonzero`) or a shape that depends on values (`nonzero`, behind boolean indexing).
SYNC_EVENTS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero")


def host_syncs(step) -> dict[str, int]:
    """How many of each `SYNC_EVENTS` op the profiler records while `step()` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        step()
    counts: dict[str, int] = {}
    for event in profiler.events():
        if event.name in SYNC_EVENTS:
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------------------------------
# No host sync in the step
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("source", ["pixel_values", "frozen_image_states", "bf16 towers"])
def test_stage1_forward_backward_has_no_host_sync(attn_implementation, source):
    model = stage1_model().train()
    model.set_attn_implementation(attn_implementation)
    model.freeze_towers(torch.bfloat16 if source == "bf16 towers" else None)
    inputs = batch(4)  # row 1 is padded: the masks are built from values, which must not be read on the host
    if source == "frozen_image_states":
        inputs["frozen_image_states"] = model.encode_image_frozen(inputs.pop("pixel_values"))
    elif source == "bf16 towers":
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)

    def step():
        output = model(**inputs)
        output.loss.backward()
        return output

    step()  # first calls may set things up (lazy init); the steady step is what runs for days
    assert host_syncs(step) == {}
    grads = [param.grad for param in model.parameters() if param.requires_grad]
    assert all(grad is not None and grad.dtype == torch.float32 for grad in grads)


def test_sync_free_hard_negatives_draw_what_multinomial_drew():
    """The sampler replaced `torch.multinomial(weights, 1)` (which checks its weights with `item()` on the CPU) by the
    same draw written out: same seed, same negatives, same generator state after; training runs repeat as before."""
    for seed in range(50):
        generator = torch.Generator().manual_seed(seed)
        rows_, columns = int(torch.randint(2, 9, (1,), generator=generator)), int(torch.randint(2, 17, (1,))) + 1
        similarity = torch.randn(rows_, columns, generator=generator) * 4
        positive = torch.randint(0, columns, (rows_,), generator=generator)
        torch.manual_seed(seed)
        drawn, has_negative = losses.sample_hard_negatives(similarity, positive)
        after = torch.rand(3)
        candidates = torch.ones_like(similarity, dtype=torch.bool)
        candidates[torch.arange(rows_), positive] = False
        weights = torch.softmax(similarity.masked_fill(~candidates, -torch.inf), dim=1)
        torch.manual_seed(seed)
        expected = torch.multinomial(weights, 1).squeeze(1)
        assert torch.equal(drawn, expected) and torch.equal(after, torch.rand(3))
        assert has_negative.all() and not (drawn == positive).any()


def test_itm_layout_without_masks_equals_all_true_masks():
    local_rows = torch.tensor([3, 4, 5])
    negative_images, negative_texts = torch.tensor([0, 5, 1]), torch.tensor([4, 0, 2])
    every = torch.ones(3, dtype=torch.bool)
    for append in (False, True):
        masked = losses.itm_batch(local_rows, (negative_images, every), (negative_texts, every), append)
        unmasked = losses.itm_batch(local_rows, (negative_images, None), (negative_texts, None), append)
        for field in ("text_rows", "image_rows", "labels", "appended_images"):
            a, b = getattr(masked, field), getattr(unmasked, field)
            assert (a is None and b is None) or torch.equal(a, b), field


# ---------------------------------------------------------------------------------------------------------------------
# Fused AdamW
# ---------------------------------------------------------------------------------------------------------------------


def test_fused_adamw_steps_equal_the_unfused_ones():
    model = stage1_model().train()
    model.freeze_towers()
    model(**batch(4)).loss.backward()
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    first = {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}
    generator = torch.Generator().manual_seed(0)
    # the same gradients for both (a step's gradients depend on the weights, which may differ in the last bit after
    # the first update): the real stage-1 gradients, then two more with noise, so that the moments matter
    steps = [first] + [
        {name: grad * (1 + step) + 1e-3 * torch.randn(grad.shape, generator=generator) for name, grad in first.items()}
        for step in (1, 2)
    ]
    runs = {}
    for fused in (True, False):
        copy_ = copy.deepcopy(model)
        params = dict(copy_.named_parameters())
        groups = [
            {"params": [params[name] for name in names if params[name].ndim >= 2], "weight_decay": 0.05},
            {"params": [params[name] for name in names if params[name].ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), fused=fused, foreach=None if fused else True)
        for grads in steps:
            for name in names:
                params[name].grad = grads[name].clone()
            optimizer.step()
        runs[fused] = params
    original = dict(model.named_parameters())
    for name in names:
        torch.testing.assert_close(runs[True][name], runs[False][name], rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.equal(runs[True][name], original[name]), name  # every trained tensor moved


def stage1_trainer(tmp_path, **arguments) -> Blip2Stage1Trainer:
    proc = processor()
    config = no_dropout(tiny_config_dict("opt", text_input=True, image_token_index=None))
    config["qformer_config"].update(
        vocab_size=len(proc.qformer_tokenizer), bos_token_id=proc.qformer_tokenizer.bos_token_id, eos_token_id=3
    )
    torch.manual_seed(0)
    model = perturb_(blip2_hf.Blip2ForPreTraining(blip2_hf.Blip2Config(**config)), scale=0.1)
    args = Blip2TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=1,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **arguments,
    )
    data = rows(tmp_path)
    return Blip2Stage1Trainer(model=model, args=args, train_dataset=data, data_collator=Stage1Collator(proc, 16))


def test_trainer_keeps_fused_adamw_where_its_kernel_exists(tmp_path, monkeypatch):
    assert fused_adamw_supported([torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)])
    assert not fused_adamw_supported([torch.zeros(2), torch.zeros(2, device="meta")])
    assert not fused_adamw_supported([torch.zeros(2, dtype=torch.long)])
    trainer = stage1_trainer(tmp_path)
    assert trainer.args.optim == "adamw_torch_fused"  # TrainingArguments' default with torch >= 2.8
    assert all(group["fused"] for group in trainer.create_optimizer().param_groups)
    # a parameter the kernel cannot update: the unfused AdamW, not an error at the first step
    monkeypatch.setattr(blip2_hf.trainer, "fused_adamw_supported", lambda params: False)
    trainer = stage1_trainer(tmp_path)
    assert not any(group["fused"] for group in trainer.create_optimizer().param_groups)


# ---------------------------------------------------------------------------------------------------------------------
# SDPA, bf16 towers, the compiled Q-Former
# ---------------------------------------------------------------------------------------------------------------------


def test_sdpa_stage1_step_equals_eager_with_padding_masks():
    results = {}
    for attn_implementation in ("eager", "sdpa"):
        model = stage1_model().eval()  # no dropout; seeded ITM draws
        model.set_attn_implementation(attn_implementation)
        assert model.qformer.config._attn_implementation == attn_implementation
        torch.manual_seed(0)
        output = model(**batch(4))
        output.loss.backward()
        grads = {name: param.grad for name, param in model.named_parameters() if param.grad is not None}
        results[attn_implementation] = (output, grads)
    (eager, eager_grads), (sdpa, sdpa_grads) = results["eager"], results["sdpa"]
    for name in ("loss_itc", "loss_itm", "loss_itg", "logits_itm", "logits_itg", "sim_i2t"):
        torch.testing.assert_close(sdpa[name], eager[name], rtol=1e-5, atol=1e-5, msg=name)
    assert set(sdpa_grads) == set(eager_grads)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(sdpa_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_frozen_towers_train_the_fp32_qformer():
    reference = stage1_model().eval()
    model = copy.deepcopy(reference)
    model.freeze_towers(torch.bfloat16)
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert model.vision_model.post_layernorm.weight.dtype == torch.float32  # trained, as LAVIS's ln_vision
    inputs = batch(4)
    torch.manual_seed(0)
    expected = reference(**inputs).loss
    torch.manual_seed(0)
    loss = model(**{**inputs, "pixel_values": inputs["pixel_values"].to(torch.bfloat16)}).loss
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - expected.item()) < 0.05
    assert model.qformer.encoder.layer[0].attention.attention.query.weight.grad.dtype == torch.float32


def test_torch_compile_qformer_compiles_the_qformer_in_place(tmp_path):
    trainer = stage1_trainer(tmp_path, torch_compile_qformer=True)
    model = trainer.model
    assert model.qformer._compiled_call_impl is not None  # compiled at its first call
    assert model.vision_model._compiled_call_impl is None and not trainer.args.torch_compile
    # in place: the parameter names, which checkpoints and resume check, are the plain model's
    assert not any("_orig_mod" in name for name in model.state_dict())
    with pytest.raises(ValueError, match="torch_compile_qformer=True compiles the Q-Former alone"):
        Blip2TrainingArguments(output_dir=str(tmp_path), torch_compile_qformer=True, torch_compile=True)


def compiled_and_eager_step(compile_qformer) -> tuple[dict, dict]:
    """(loss components, trained gradients) of one train-mode stage-1 step without dropout, eager and with the
    Q-Former compiled by `compile_qformer(qformer)`, the ITM draws seeded alike."""
    results = []
    for compiled in (False, True):
        model = stage1_model().train()
        for module in model.modules():  # dropout draws differ under compilation: none, to compare the steps
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.0
        model.freeze_towers()
        if compiled:
            compile_qformer(model.qformer)
        torch.manual_seed(0)
        output = model(**batch(4))
        output.loss.backward()
        losses_ = {name: output[name].detach() for name in ("loss", "loss_itc", "loss_itm", "loss_itg")}
        grads = {name: param.grad for name, param in model.named_parameters() if param.grad is not None}
        results.append((losses_, grads))
    return results[0], results[1]


def assert_same_step(eager: tuple[dict, dict], compiled: tuple[dict, dict]) -> None:
    for name, value in eager[0].items():
        torch.testing.assert_close(compiled[0][name], value, rtol=1e-5, atol=1e-5, msg=name)
    assert set(compiled[1]) == set(eager[1])
    for name, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_qformer_traced_step_equals_eager():
    """What Dynamo traces of the Q-Former (its graphs and graph breaks, through autograd) runs the eager step's math:
    the `aot_eager` backend, which compiles in seconds, unlike inductor's C++ code generation
    (minutes on 2 cores: `bench_training.py --compare-optim --compile` runs and checks it)."""
    assert_same_step(*compiled_and_eager_step(lambda qformer: qformer.compile(backend="aot_eager")))
