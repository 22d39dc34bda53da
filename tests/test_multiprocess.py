"""The process-group harness (``mano_dist.multiprocess``): results by rank, the caller's
environment in every child, failures and hangs reported instead of hanging the suite."""

from __future__ import annotations

import os
import time

import pytest

from dist import run_distributed


def _report(rank, world_size):
    import torch
    import torch.distributed as dist

    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    return {"rank": rank, "world": world_size, "sum": total.item(), "value": os.environ.get("MANO_TEST_VALUE"),
            "override": os.environ.get("MANO_TEST_OVERRIDE"), "threads": torch.get_num_threads()}


def _raise_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("rank 1 was told to fail")
    return rank


def _hang_on_rank_0(rank, world_size):
    if rank == 0:
        time.sleep(60)
    return rank


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_children_get_results_by_rank_and_the_callers_environment_now(tmp_path, monkeypatch, method):
    """A fork server starts once per caller; a child must still see the environment as it is
    at the call (a monkeypatched variable set after the server started), with ``env`` on top."""
    monkeypatch.setenv("MANO_START_METHOD", method)
    monkeypatch.setenv("MANO_TEST_VALUE", "before")
    first = run_distributed(_report, 2, tmp_path)
    monkeypatch.setenv("MANO_TEST_VALUE", "after")
    second = run_distributed(_report, 3, tmp_path, env={"MANO_TEST_OVERRIDE": "given"})
    assert [r["value"] for r in first] == ["before"] * 2 and [r["override"] for r in first] == [None] * 2
    assert [(r["rank"], r["world"], r["sum"]) for r in second] == [(0, 3, 6.0), (1, 3, 6.0), (2, 3, 6.0)]
    assert [r["value"] for r in second] == ["after"] * 3 and [r["override"] for r in second] == ["given"] * 3
    assert all(r["threads"] == 1 for r in first + second)


@pytest.mark.distributed
def test_a_raising_rank_is_reported_and_a_hung_rank_is_killed(tmp_path):
    with pytest.raises(AssertionError, match=r"(?s)rank 1 raised:.*ValueError: rank 1 was told to fail"):
        run_distributed(_raise_on_rank_1, 2, tmp_path)
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"ranks \[0\] did not finish within 3 s \(hang\)"):
        run_distributed(_hang_on_rank_0, 2, tmp_path, timeout=3)
    assert time.monotonic() - start < 30
