"""The stage-1 losses (`blip2_hf.losses`) each on its own, on hand-made tensors whose answers are known: ITC from a
given similarity matrix, the ITM hard-negative layout from given draws, ITG's labels and shift; and the gathers, in one
process and across two (uneven batches). The same functions inside `Blip2ForPreTraining` are checked against the
formulas in test_pretraining.py."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp

from blip2_hf import losses

# ---------------------------------------------------------------------------------------------------------------------
# ITC
# ---------------------------------------------------------------------------------------------------------------------


def test_itc_similarities_take_the_best_query_over_the_temperature():
    # 2 images x 2 queries, 2 texts, 2-d features: image 0's queries point at text 0 and halfway; image 1's at text 1
    half = math.sqrt(0.5)
    image_feats = torch.tensor([[[1.0, 0.0], [half, half]], [[0.0, -1.0], [0.0, 1.0]]])
    text_feat = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sim_i2t, sim_t2i = losses.itc_similarities(image_feats, text_feat, temperature=0.5)
    expected = torch.tensor([[1.0, half], [0.0, 1.0]]) / 0.5  # [image, text]: max over the image's queries
    torch.testing.assert_close(sim_i2t, expected)
    torch.testing.assert_close(sim_t2i, expected.t())  # one process: the same matrix seen from the texts


def test_itc_loss_on_a_given_similarity_matrix():
    # each row gives its positive probability 3/4: cross-entropy log(4/3)
    sim = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    targets = torch.tensor([0, 1])
    assert losses.itc_loss(sim, sim, targets, label_smoothing=0.0).item() == pytest.approx(math.log(4 / 3))
    # the mean of the two directions: the text->image side all uniform gives log 2
    loss = losses.itc_loss(sim, torch.zeros(2, 2), targets, label_smoothing=0.0)
    assert loss.item() == pytest.approx((math.log(4 / 3) + math.log(2.0)) / 2)
    # label smoothing 0.1 over 2 classes: 0.9 * NLL(positive) + 0.1 * mean NLL over the classes
    smoothed = 0.9 * math.log(4 / 3) + 0.1 * (math.log(4 / 3) + math.log(4.0)) / 2
    assert losses.itc_loss(sim, sim, targets, label_smoothing=0.1).item() == pytest.approx(smoothed)


def test_itc_targets_are_the_local_rows_of_the_global_batch():
    # process 1 of 2 holds pairs 2 and 3 of a global batch of 4: its positives are columns 2 and 3, not 0 and 1
    sim = torch.full((2, 4), -10.0)
    sim[0, 2] = sim[1, 3] = 10.0
    assert losses.itc_loss(sim, sim, torch.tensor([2, 3]), label_smoothing=0.0).item() < 1e-6
    assert losses.itc_loss(sim, sim, torch.tensor([0, 1]), label_smoothing=0.0).item() > 19


# ---------------------------------------------------------------------------------------------------------------------
# ITM
# ---------------------------------------------------------------------------------------------------------------------


def test_itm_layout_in_one_process():
    local_rows = torch.tensor([0, 1, 2])
    negative_images = (torch.tensor([2, 0, 1]), torch.tensor([True, False, True]))  # text 1 has no negative image
    negative_texts = (torch.tensor([1, 2, 0]), torch.tensor([True, True, False]))  # image 2 has no negative text
    batch = losses.itm_batch(local_rows, negative_images, negative_texts, append_negative_images=False)
    # positives (t, i) = (0,0) (1,1) (2,2); texts 0 and 2 with their negative images 2 and 1; images 0 and 1 with
    # their negative texts 1 and 2
    assert batch.text_rows.tolist() == [0, 1, 2, 0, 2, 1, 2]
    assert batch.image_rows.tolist() == [0, 1, 2, 2, 1, 0, 1]
    assert batch.labels.tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert batch.appended_images is None


def test_itm_layout_appends_the_negative_images_of_other_processes():
    # process 1 of 2: local pairs are rows 3..5 of the global batch of 6; its local images are 0..2 of its own
    local_rows = torch.tensor([3, 4, 5])
    negative_images = (torch.tensor([0, 5, 1]), torch.tensor([True, True, True]))  # global image rows
    negative_texts = (torch.tensor([4, 0, 2]), torch.tensor([False, True, True]))  # global text rows
    batch = losses.itm_batch(local_rows, negative_images, negative_texts, append_negative_images=True)
    assert batch.text_rows.tolist() == [3, 4, 5, 3, 4, 5, 0, 2]
    # the 3 negative images are gathered and appended after the 3 local images: ITM images 3, 4, 5
    assert batch.appended_images.tolist() == [0, 5, 1]
    assert batch.image_rows.tolist() == [0, 1, 2, 3, 4, 5, 1, 2]
    assert batch.labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_sampled_itm_batch_of_two_pairs_is_the_swap():
    # a global batch of 2: each row's only candidate is the other pair, whatever the similarities
    sim = torch.tensor([[5.0, -3.0], [0.5, 2.0]])
    batch = losses.sample_itm_batch(sim, sim.t(), torch.tensor([0, 1]), append_negative_images=False)
    pairs = list(zip(batch.image_rows.tolist(), batch.text_rows.tolist()))
    assert pairs == [(0, 0), (1, 1), (1, 0), (0, 1), (0, 1), (1, 0)]
    assert batch.labels.tolist() == [1, 1, 0, 0, 0, 0]
    # one pair: no negative at all, only the positive row
    alone = losses.sample_itm_batch(sim[:1, :1], sim[:1, :1], torch.tensor([0]), append_negative_images=False)
    assert alone.text_rows.tolist() == [0] and alone.image_rows.tolist() == [0] and alone.labels.tolist() == [1]


def test_itm_loss_is_plain_cross_entropy():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])  # both rows give their label 3/4
    assert losses.itm_loss(logits, torch.tensor([1, 0])).item() == pytest.approx(math.log(4 / 3))
    assert losses.itm_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(math.log(4.0))


# ---------------------------------------------------------------------------------------------------------------------
# ITG
# ---------------------------------------------------------------------------------------------------------------------


def test_itg_inputs_put_dec_first_and_ignore_padding():
    ids = torch.tensor([[1, 5, 6, 0], [1, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    decoder_ids, labels = losses.itg_inputs(ids, mask, bos_token_id=98)
    assert decoder_ids.tolist() == [[98, 5, 6, 0], [98, 7, 8, 9]]
    assert labels.tolist() == [[98, 5, 6, -100], [98, 7, 8, 9]]
    assert ids[:, 0].tolist() == [1, 1]  # the captions are not modified


def test_itg_loss_predicts_each_next_token_and_skips_padding():
    # vocabulary of 2; labels [DEC=1, 0, 1, pad]: position 0 predicts 0, position 1 predicts 1, position 2 predicts
    # padding (ignored), position 3 predicts nothing
    labels = torch.tensor([[1, 0, 1, -100]])
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, math.log(3.0)], [100.0, -100.0], [-100.0, 100.0]]])
    assert losses.itg_loss(logits, labels, label_smoothing=0.0).item() == pytest.approx(math.log(4 / 3))
    changed = logits.clone()
    changed[0, 2:] = torch.tensor([[-100.0, 100.0], [100.0, -100.0]])
    assert losses.itg_loss(changed, labels, label_smoothing=0.0).item() == pytest.approx(math.log(4 / 3))
    smoothed = 0.9 * math.log(4 / 3) + 0.1 * (math.log(4 / 3) + math.log(4.0)) / 2
    assert losses.itg_loss(logits, labels, label_smoothing=0.1).item() == pytest.approx(smoothed)


# ---------------------------------------------------------------------------------------------------------------------
# Gathers
# ---------------------------------------------------------------------------------------------------------------------


def test_gathers_are_the_identity_in_one_process():
    tensor = torch.randn(3, 2, requires_grad=True)
    assert losses.world() == (0, 1)
    assert losses.gather_with_grad(tensor) is tensor and losses.gather_no_grad(tensor) is tensor
    ids, mask = torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)
    assert losses.pad_to_world_length(ids, mask, pad_id=0) == (ids, mask)
    assert losses.local_offset(3, tensor.device) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gather_worker(rank: int, port: int, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = 2 if rank == 0 else 1  # uneven local batches
        local = torch.full((rows, 2), float(rank + 1), requires_grad=True)
        gathered = losses.gather_with_grad(local)
        weights = torch.arange(6, dtype=torch.float32).view(3, 2)
        (gathered * weights).sum().backward()
        ids = torch.ones(rows, 3 + rank, dtype=torch.long)  # rank 1's captions are longer
        ids, mask = losses.pad_to_world_length(ids, ids.clone(), pad_id=0)
        result = {
            "gathered": gathered.detach(),
            "grad": local.grad,
            "no_grad": losses.gather_no_grad(local).requires_grad,
            "offset": losses.local_offset(rows, local.device),
            "ids": ids,
            "mask": mask,
        }
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_gathers_across_two_processes_with_uneven_batches(tmp_path):
    mp.spawn(gather_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    weights = torch.arange(6, dtype=torch.float32).view(3, 2)
    for rank, result in enumerate(results):
        assert result["gathered"].tolist() == [[1.0, 1.0], [1.0, 1.0], [2.0, 2.0]]  # rank order, 2 + 1 rows
        # each process's rows get the sum over the processes of their gradient: 2 x weights of their rows
        rows = slice(0, 2) if rank == 0 else slice(2, 3)
        torch.testing.assert_close(result["grad"], 2 * weights[rows])
        assert result["no_grad"] is False
        assert result["ids"].shape[1] == 4 and result["mask"].shape[1] == 4  # padded to the longest
        assert result["mask"][:, 3:].sum() == (0 if rank == 0 else result["mask"].shape[0])
    assert [result["offset"] for result in results] == [0, 2]
