"""Stage 1 across two processes (gloo on CPU): the ITC loss and its gradients for a batch split over 2 ranks equal
the one-process run on the whole batch, and ITM negatives come from the other rank."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_pretraining import batch, stage1_model

WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = stage1_model().eval()  # same seed: the same weights on every rank

        # ITC: global batch of 4, two pairs per rank
        whole = batch(4)
        local = {key: value[2 * rank : 2 * rank + 2] for key, value in whole.items()}
        output = model(**local)
        output.loss_itc.backward()
        grads = {}
        for name, param in model.named_parameters():
            if param.grad is not None:  # what DDP does: average the gradients over the ranks
                torch.distributed.all_reduce(param.grad)
                grads[name] = param.grad / WORLD
        loss = output.loss_itc.detach().clone()
        torch.distributed.all_reduce(loss)

        # unequal local batches (a collator skipped an image): 2 rows on rank 0, 1 on rank 1
        three = batch(3)
        rows = slice(0, 2) if rank == 0 else slice(2, 3)
        with torch.no_grad():
            uneven = model(**{key: value[rows] for key, value in three.items()})

        # ITM: one pair per rank, so the only negative of each row lives on the other rank
        pairs = batch(2)
        mine = {key: value[rank : rank + 1] for key, value in pairs.items()}
        # and again with rank 1's caption cut to its 4 real tokens: the ranks' texts then differ in length
        short = {key: value[:, :4] if rank == 1 and key != "pixel_values" else value for key, value in mine.items()}
        with torch.no_grad():
            torch.manual_seed(0)
            itm = model(**mine)
            torch.manual_seed(0)
            itm_short = model(**short)
        torch.save(
            {
                "loss_itc": loss / WORLD,
                "grads": grads,
                "sim_i2t": output.sim_i2t.detach(),
                "sim_t2i": output.sim_t2i.detach(),
                "logits_itm": itm.logits_itm,
                "itm_short": {name: getattr(itm_short, name) for name in ("logits_itm", "loss_itc", "loss_itg")},
                "itm_full": {name: getattr(itm, name) for name in ("loss_itc", "loss_itg")},
                "uneven_sim_i2t": uneven.sim_i2t,
                "uneven_sim_t2i": uneven.sim_t2i,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path, record_parity):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    model = stage1_model().eval()
    output = model(**batch(4))
    output.loss_itc.backward()
    expected_grads = {name: param.grad for name, param in model.named_parameters() if param.grad is not None}

    assert record_parity("stage1 2-process ITC loss", ranks[0]["loss_itc"], output.loss_itc) < 1e-6
    for r in range(WORLD):  # each rank saw its rows against the global batch
        rows = slice(2 * r, 2 * r + 2)
        assert record_parity("stage1 2-process sim_i2t", ranks[r]["sim_i2t"], output.sim_i2t[rows]) < 1e-5
        assert record_parity("stage1 2-process sim_t2i", ranks[r]["sim_t2i"], output.sim_t2i[rows]) < 1e-5
    assert set(ranks[0]["grads"]) == set(expected_grads)
    assert "query_tokens" in expected_grads and "temp" in expected_grads
    for name, grad in expected_grads.items():
        record_parity("stage1 2-process ITC gradients", ranks[0]["grads"][name], grad)
        # Float32 rounding of a different summation order only: `temp`'s gradient (|g| ~ 2) sums over every logit of
        # the global batch and moves by ~1.6e-5 relative on some CPUs; a missing or gradient-less gather is off by
        # the size of the gradient itself.
        torch.testing.assert_close(
            ranks[0]["grads"][name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )

    with torch.no_grad():
        uneven = model(**batch(3))
    for r, rows in enumerate((slice(0, 2), slice(2, 3))):
        assert record_parity("stage1 2-process uneven sim", ranks[r]["uneven_sim_i2t"], uneven.sim_i2t[rows]) < 1e-5
        assert record_parity("stage1 2-process uneven sim", ranks[r]["uneven_sim_t2i"], uneven.sim_t2i[rows]) < 1e-5

    # ITM: rank r's rows are (positive r, text r + image of the other rank, image r + text of the other rank)
    with torch.no_grad():
        reference = model(**batch(2)).logits_itm  # rows: pos0, pos1, t0+i1, t1+i0, i0+t1, i1+t0
    for r in range(WORLD):
        assert ranks[r]["logits_itm"].shape == (3, 2)
        expected = reference[[r, 2 + r, 4 + r]]
        assert record_parity("stage1 2-process ITM logits", ranks[r]["logits_itm"], expected) < 1e-5
        # texts of different lengths per rank: padded to the longest to be gathered, the same rows and losses
        short = ranks[r]["itm_short"]
        assert record_parity("stage1 2-process ITM logits, uneven text", short["logits_itm"], expected) < 1e-5
        for name, value in ranks[r]["itm_full"].items():
            assert record_parity(f"stage1 2-process {name}, uneven text", short[name], value) < 1e-5, name
