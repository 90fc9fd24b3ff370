"""The training loop on two processes (gloo on loopback, plain torch): 2 ranks with a global batch b train the
same adapter as one process with batch b -- even batches, uneven ones, a rank with nothing to do, gradient
accumulation, two buckets -- and a NaN or a Cancel on one rank stops both at the same step."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing

import distributed_toy
from lora_lab.trainer.distributed.data_parallel import contiguous_share

# Both sides sum the same float32 terms in another order (one batch of b on one process; two shares of it and
# gloo's sum of the two gradients on two), so roundings differ by about 6e-8 relative per operation. The adapter's
# weights are about 0.12 in size (1e-8 per rounding) and take 4 AdamW steps of lr = 1e-2 with eps = 1e-2, so a
# gradient's rounding changes a step by at most lr / eps times it (torch's eps, 1e-8, would let a gradient within
# rounding of zero flip sign and move a weight a whole step the other way; tests/support/training.py saw that
# happen on a real UNet). Measured, the largest difference is 1.5e-8 (every case below); 1e-6 leaves 60x room for
# that and none for a wrong weighting, which the negative control shows is off by 1.2e-2.
TOLERANCE = 1e-6


def two_ranks(tmp_path, case: dict) -> list[dict]:
    port = distributed_toy.free_port()
    torch.multiprocessing.start_processes(distributed_toy.rank_main, args=(2, port, str(tmp_path), case), nprocs=2,
                                          join=True, start_method="spawn")
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def one_process(case: dict) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)             # as each rank: one arithmetic path
    try:
        return distributed_toy.toy_run(case)
    finally:
        torch.set_num_threads(threads)


def largest_difference(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(first, second))


@pytest.mark.parametrize("count, expected", [(4, [range(0, 2), range(2, 4)]), (3, [range(0, 2), range(2, 3)]),
                                             (1, [range(0, 1), range(1, 1)])])
def test_a_global_batch_splits_into_contiguous_shares(count, expected):
    assert [contiguous_share(count, rank, 2) for rank in range(2)] == expected
    assert [len(contiguous_share(7, rank, 3)) for rank in range(3)] == [3, 2, 2]


@pytest.mark.parametrize("case", [
    {"batch_size": 4},                                          # even
    {"batch_size": 3, "accumulation": 2},                       # uneven shares, accumulated
    {"batch_size": 1, "accumulation": 2},                       # rank 1 has nothing: it runs at weight 0
    {"batch_size": 3, "pictures": 7, "buckets": ((64, 64), (64, 48))},   # batches from two buckets, some short
], ids=["even", "uneven-accumulated", "empty-share", "two-buckets"])
def test_two_ranks_train_the_adapter_one_process_trains(tmp_path, case):
    ranks = two_ranks(tmp_path, case)
    alone = one_process(case)
    assert all(rank["ddp_holds_the_adapter_only"] for rank in ranks)               # the frozen base never crosses
    assert largest_difference(ranks[0]["weights"], ranks[1]["weights"]) == 0      # DDP keeps the ranks equal
    assert largest_difference(ranks[0]["weights"], alone["weights"]) <= TOLERANCE
    assert largest_difference(alone["weights"], distributed_toy.toy_run({**case, "steps": 0})["weights"]) > 1e-3
    # the reported loss is the global batch's, on every rank
    for rank in ranks:
        assert rank["losses"] == pytest.approx(alone["losses"], rel=1e-5, abs=1e-7)


def test_negative_control_each_rank_s_own_mean_trains_another_adapter(tmp_path):
    """Averaging the ranks' plain means weighs the picture alone on rank 1 as much as the two on rank 0."""
    case = {"batch_size": 3, "per_rank_mean": True}
    ranks = two_ranks(tmp_path, case)
    assert largest_difference(ranks[0]["weights"], one_process(case)["weights"]) > 1e-4


def test_a_nan_on_one_rank_stops_both_at_the_same_step(tmp_path):
    """Picture 5's latent is NaN; whichever rank gets it, both raise before any weight changes at that step."""
    case = {"batch_size": 2, "steps": 6, "nan_picture": 5}
    ranks = two_ranks(tmp_path, case)
    alone_steps = []
    with pytest.raises(Exception) as raised:
        distributed_toy.toy_run(case, on_step=lambda report: alone_steps.append(report.step))
    assert type(raised.value).__name__ == "NonFiniteLoss"
    assert ranks[0]["non_finite_at"] == ranks[1]["non_finite_at"] == raised.value.step
    assert ranks[0]["steps_seen"] == ranks[1]["steps_seen"] == alone_steps


def test_a_cancel_reaching_one_rank_stops_both_after_the_same_step(tmp_path):
    ranks = two_ranks(tmp_path, {"batch_size": 2, "steps": 6, "cancel": (1, 2)})
    assert ranks[0]["stopped_after"] == ranks[1]["stopped_after"] == 2
    assert ranks[0]["steps_seen"] == ranks[1]["steps_seen"] == [1, 2]
