"""Cross-attention on distinct images (`Blip2QFormerImage.rows`): the Q-Former projects each image's keys/values once
and hands them to every row that attends to it; and projected beforehand (`project_image`), so that stage 1's query
pass and ITM pass share one projection of the same images. Checked against the same rows given explicitly
repeated images, in the Q-Former alone and in stage 1's ITM, where the rows are (positives, text + negative image,
negative text + image): losses and every gradient, in one process and across two."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_pretraining import batch, stage1_model

import blip2_hf
from blip2_hf import losses
from blip2_hf.testing_utils import TINY_QFORMER, perturb_

# ---------------------------------------------------------------------------------------------------------------------
# The Q-Former alone
# ---------------------------------------------------------------------------------------------------------------------


def tiny_qformer(attn_implementation: str) -> blip2_hf.Blip2QFormerModel:
    torch.manual_seed(0)
    config = blip2_hf.Blip2QFormerConfig(**TINY_QFORMER, use_qformer_text_input=True, encoder_hidden_size=24)
    config._attn_implementation = attn_implementation
    return perturb_(blip2_hf.Blip2QFormerModel(config), scale=0.1).eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("with_image_mask", [False, True])
def test_qformer_encoder_index_equals_repeated_images(attn_implementation, with_image_mask, record_parity):
    qformer = tiny_qformer(attn_implementation)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 7, 24, generator=generator, requires_grad=True)  # 3 distinct images, 7 patches each
    index = torch.tensor([2, 0, 0, 1, 2, 2])  # 6 rows; out of order and repeated
    queries = torch.randn(6, 4, 32, generator=generator)
    text = torch.randn(6, 5, 32, generator=generator)
    text_mask = torch.ones(6, 5, dtype=torch.long)
    text_mask[1, 3:] = 0
    image_mask = None
    if with_image_mask:  # each image pads different patches, so a mask not indexed like the images shows
        image_mask = torch.ones(3, 7, dtype=torch.long)
        image_mask[0, 5:] = 0
        image_mask[2, 1:3] = 0

    def run(**image_inputs):
        output = qformer(
            query_embeds=queries,
            text_embeds=text,
            attention_mask=text_mask,
            self_attention_mask="bidirectional",
            output_attentions=True,
            **image_inputs,
        )
        grads = torch.autograd.grad(output.last_hidden_state.square().mean(), [images, *qformer.parameters()])
        return output, grads

    distinct = blip2_hf.Blip2QFormerImage(states=images, attention_mask=image_mask)
    shared, shared_grads = run(encoder_hidden_states=distinct.select(index))
    projected, projected_grads = run(encoder_hidden_states=qformer.project_image(images, image_mask).select(index))
    repeated, repeated_grads = run(
        encoder_hidden_states=images[index], encoder_attention_mask=None if image_mask is None else image_mask[index]
    )
    for check, output, grads in (
        ("encoder_index", shared, shared_grads),
        ("project_image", projected, projected_grads),
    ):
        diff = record_parity(
            f"Q-Former {check} vs repeated images", output.last_hidden_state, repeated.last_hidden_state
        )
        assert diff < 1e-6
        for a, b in zip(output.cross_attentions, repeated.cross_attentions):
            assert (a is None) == (b is None)
            if a is not None:  # eager only
                assert a.shape[0] == 6 and record_parity(f"Q-Former {check} cross-attention", a, b) < 1e-6
        assert any(a is not None for a in output.cross_attentions) == (attn_implementation == "eager")
        worst = max(record_parity(f"Q-Former {check} gradients", a, b) for a, b in zip(grads, repeated_grads))
        assert worst < 1e-6
    if with_image_mask:  # the mask matters: without it the outputs move
        unmasked = qformer(
            query_embeds=queries,
            text_embeds=text,
            attention_mask=text_mask,
            encoder_hidden_states=blip2_hf.Blip2QFormerImage(states=images).select(index),
        )
        assert not torch.allclose(unmasked.last_hidden_state, shared.last_hidden_state, atol=1e-4)


def test_qformer_image_input_is_checked():
    qformer = tiny_qformer("sdpa")
    queries, images = torch.zeros(4, 4, 32), torch.zeros(2, 7, 24)
    image = blip2_hf.Blip2QFormerImage(states=images)
    with pytest.raises(ValueError, match=r"expected \[4\]"):
        qformer(query_embeds=queries, encoder_hidden_states=image.select(torch.tensor([0, 1])))
    projected = qformer.project_image(images)
    key_values = projected.key_values
    assert [kv is None for kv in key_values] == [not layer.has_cross_attention for layer in qformer.encoder.layer]
    heads = qformer.config.num_attention_heads
    assert key_values[0][0].shape == (2, heads, 7, 32 // heads)  # [images, heads, patches, head width]
    assert len(projected) == 2 and len(projected.select(torch.tensor([1, 0, 1, 1]))) == 4
    with pytest.raises(ValueError, match="exactly one of them"):
        blip2_hf.Blip2QFormerImage(states=images, key_values=key_values)
    with pytest.raises(ValueError, match="exactly one of them"):
        blip2_hf.Blip2QFormerImage()
    with pytest.raises(ValueError, match="not as encoder_attention_mask"):
        qformer(query_embeds=queries[:2], encoder_hidden_states=projected, encoder_attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match=f"expected {len(key_values)}, one per layer"):
        qformer(query_embeds=queries[:2], encoder_hidden_states=blip2_hf.Blip2QFormerImage(key_values=key_values[:-1]))
    with pytest.raises(ValueError, match="before select"):
        image.select(torch.tensor([0])).cat(image)
    with pytest.raises(ValueError, match="both images must hold states, or both key_values"):
        image.cat(projected)


def test_qformer_image_cat_and_select_stand_for_the_images_they_index(record_parity):
    qformer = tiny_qformer("eager")
    generator = torch.Generator().manual_seed(1)
    first, second = torch.randn(2, 7, 24, generator=generator), torch.randn(1, 7, 24, generator=generator)
    second_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])  # only the appended image pads patches
    rows = torch.tensor([2, 0, 1, 2])
    queries = torch.randn(4, 4, 32, generator=generator)
    all_images = torch.cat([first, second])
    all_masks = torch.cat([torch.ones(2, 7, dtype=torch.long), second_mask])
    with torch.no_grad():
        expected = qformer(
            query_embeds=queries, encoder_hidden_states=all_images[rows], encoder_attention_mask=all_masks[rows]
        ).last_hidden_state
        for kind, make in (
            ("states", lambda states, mask: blip2_hf.Blip2QFormerImage(states=states, attention_mask=mask)),
            ("projected", qformer.project_image),
        ):
            image = make(first, None).cat(make(second, second_mask))
            assert image.num_images == 3 and len(image.select(rows)) == 4
            torch.testing.assert_close(image.attention_mask, all_masks, rtol=0, atol=0)
            ours = qformer(query_embeds=queries, encoder_hidden_states=image.select(rows)).last_hidden_state
            assert record_parity(f"Q-Former image cat+select ({kind}) vs indexed images", ours, expected) < 1e-5
            # select composes: picking rows of selected rows is selecting the composed rows
            twice = image.select(torch.tensor([1, 2, 0, 1])).select(torch.tensor([1, 1, 0, 2]))
            assert twice.rows.tolist() == [2, 2, 1, 0]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_projected_image_gets_its_gradient_under_activation_checkpointing(use_reentrant):
    """The projected keys/values reach the checkpointed layers positionally, as inputs of the checkpoint, so one
    projection can serve two passes under a reentrant checkpoint too (handed over by keyword, each layer's recompute
    would backpropagate through the shared projection itself, and the second time fail)."""
    qformer = tiny_qformer("sdpa").train()
    for module in qformer.modules():  # dropout off: the two runs must compute the same thing
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(2, 7, 24, generator=generator, requires_grad=True)
    queries = torch.randn(3, 4, 32, generator=generator)
    keys = [layer.crossattention.attention.key.weight for layer in qformer.encoder.layer if layer.has_cross_attention]

    def grads():  # .backward(): a reentrant checkpoint refuses autograd.grad
        images.grad = None
        qformer.zero_grad(set_to_none=True)
        image = qformer.project_image(images)  # one projection, two passes (as stage 1's query and ITM passes)
        first = qformer(query_embeds=queries[:2], encoder_hidden_states=image).last_hidden_state
        second = qformer(query_embeds=queries, encoder_hidden_states=image.select(torch.tensor([1, 0, 1])))
        (first.square().mean() + second.last_hidden_state.square().mean()).backward()
        return [images.grad, *(key.grad for key in keys)]

    plain = grads()
    qformer.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    checkpointed = grads()
    for a, b in zip(checkpointed, plain):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Stage 1: the ITM pass on distinct images against the ITM pass on repeated images (the previous code, as LAVIS)
# ---------------------------------------------------------------------------------------------------------------------


class RepeatedImagesReference:
    """Makes `model` run its query and ITM passes as before images could be shared by rows and projected ahead (as LAVIS),
    from what the forward itself produced: the frozen features, the sampled negatives, then the query pass on
    `image_embeds` and the ITM pass on
    `[image_embeds; image_embeds_all[negative_image[text_has_negative]]; image_embeds[image_has_negative]]` with no
    index, each projecting its own keys/values. Built from the sampler's draws, not from the model's index, so a
    wrong index cannot fool it."""

    def __init__(self, model: blip2_hf.Blip2ForPreTraining, monkeypatch: pytest.MonkeyPatch):
        self.image_embeds, self.draws, self.itm_calls = None, [], 0
        image_embeds_fn, sampler = model._image_embeds, losses.sample_hard_negatives
        qformer_forward = model.qformer.forward

        def image_embeds(*args, **kwargs):
            self.image_embeds = image_embeds_fn(*args, **kwargs)
            return self.image_embeds

        def sample(*args, **kwargs):
            self.draws.append(sampler(*args, **kwargs))  # text -> image first, then image -> text
            return self.draws[-1]

        def qformer(*args, encoder_hidden_states=None, **kwargs):
            image = encoder_hidden_states
            if isinstance(image, blip2_hf.Blip2QFormerImage) and image.rows is None:  # the query pass
                kwargs["encoder_hidden_states"] = self.image_embeds
            elif isinstance(image, blip2_hf.Blip2QFormerImage):  # the ITM pass
                self.itm_calls += 1
                (negative_image, text_has_negative), (_, image_has_negative) = self.draws
                image_embeds = self.image_embeds
                image_embeds_all = losses.gather_with_grad(image_embeds)
                kwargs["encoder_hidden_states"] = torch.cat(
                    [
                        image_embeds,
                        image_embeds_all[negative_image[text_has_negative]],
                        image_embeds[image_has_negative],
                    ]
                )
            else:
                kwargs["encoder_hidden_states"] = image
            return qformer_forward(*args, **kwargs)

        monkeypatch.setattr(model, "_image_embeds", image_embeds)
        monkeypatch.setattr(losses, "sample_hard_negatives", sample)
        monkeypatch.setattr(model.qformer, "forward", qformer)
        # nothing projected ahead: each pass above projects its own images
        monkeypatch.setattr(
            model.qformer,
            "project_image",
            lambda images, mask=None: blip2_hf.Blip2QFormerImage(states=images, attention_mask=mask),
        )


def key_rows(model: blip2_hf.Blip2ForPreTraining) -> tuple[list[int], list]:
    """Records how many images every cross-attention `key` projection runs on."""
    rows = []
    hooks = [
        layer.crossattention.attention.key.register_forward_hook(
            lambda module, args, out: rows.append(args[0].shape[0])
        )
        for layer in model.qformer.encoder.layer
        if layer.has_cross_attention
    ]
    return rows, hooks


def losses_and_grads(model: blip2_hf.Blip2ForPreTraining, inputs: dict, seed: int = 0) -> tuple[dict, dict, list[int]]:
    """One training forward + backward, seeded (ITM negatives and dropout draw alike); the losses, the gradient of
    every trainable parameter, and the row counts of the cross-attention key projections."""
    model.zero_grad(set_to_none=True)
    rows, hooks = key_rows(model)
    torch.manual_seed(seed)
    output = model(**inputs)
    output.loss.backward()
    for hook in hooks:
        hook.remove()
    losses = {
        name: getattr(output, name).detach() for name in ("loss", "loss_itc", "loss_itm", "loss_itg", "logits_itm")
    }
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}
    return losses, grads, rows


def assert_same(record_parity, check: str, ours: tuple[dict, dict], reference: tuple[dict, dict]) -> None:
    for name, value in reference[0].items():
        assert ours[0][name].shape == value.shape, name
        assert record_parity(f"{check} {name}", ours[0][name], value) < 1e-6, name
    assert set(ours[1]) == set(reference[1])
    for name, grad in reference[1].items():
        assert record_parity(f"{check} gradients", ours[1][name], grad) < 1e-6, name


@pytest.mark.parametrize("batch_size, checkpointing", [(4, False), (4, True), (1, False)])
def test_stage1_itm_on_distinct_images_equals_repeated_images(batch_size, checkpointing, monkeypatch, record_parity):
    model = stage1_model().train()  # dropout on: it must draw alike in both runs too
    if checkpointing:
        model.activation_checkpointing_enable()
    inputs = batch(batch_size, seed=2)
    ours = losses_and_grads(model, inputs)
    with monkeypatch.context() as patch:
        reference = RepeatedImagesReference(model, patch)
        expected = losses_and_grads(model, inputs)
        assert reference.itm_calls == 1
    assert_same(record_parity, "stage1 ITM distinct images vs repeated", ours[:2], expected[:2])
    assert ours[0]["logits_itm"].shape[0] == (3 * batch_size if batch_size > 1 else 1)
    assert all(grad.abs().sum() > 0 for name, grad in ours[1].items() if "crossattention.attention.key" in name)
    # the point: the keys are projected on the B local images only, where the repeated images give 3B; and, unless
    # checkpointed layers project their own, once for the query pass and the ITM pass together
    assert max(ours[2]) == batch_size
    assert max(expected[2]) == (3 * batch_size if batch_size > 1 else 1)
    if not checkpointing:
        cross_layers = sum(layer.has_cross_attention for layer in model.qformer.encoder.layer)
        assert ours[2] == [batch_size] * cross_layers
        assert len(expected[2]) == 2 * cross_layers


# ---------------------------------------------------------------------------------------------------------------------
# Two processes: negatives gathered from the other rank, uneven local batches
# ---------------------------------------------------------------------------------------------------------------------

WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = stage1_model().train()
        whole = batch(4, seed=2)
        rows = slice(0, 3) if rank == 0 else slice(3, 4)  # 3 pairs on rank 0, 1 on rank 1
        inputs = {key: value[rows] for key, value in whole.items()}
        ours = losses_and_grads(model, inputs, seed=rank)
        with pytest.MonkeyPatch.context() as patch:
            reference = RepeatedImagesReference(model, patch)
            expected = losses_and_grads(model, inputs, seed=rank)
        cross_layers = sum(layer.has_cross_attention for layer in model.qformer.encoder.layer)
        torch.save(
            {"ours": ours, "expected": expected, "itm_calls": reference.itm_calls, "cross_layers": cross_layers},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_itm_on_distinct_images_equals_repeated_images(tmp_path, record_parity):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank, local_batch in enumerate((3, 1)):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert saved["itm_calls"] == 1
        ours, expected = saved["ours"], saved["expected"]
        assert_same(record_parity, "stage1 2-process ITM distinct images vs repeated", ours[:2], expected[:2])
        assert ours[0]["logits_itm"].shape[0] == 3 * local_batch
        # the local images once for both passes, then the negatives gathered from anywhere (one per local text
        # here), where repeating projects B for the query pass and 3B for ITM
        assert ours[2] == [local_batch] * (2 * saved["cross_layers"])
        assert sorted(expected[2]) == sorted([local_batch, 3 * local_batch] * saved["cross_layers"])
