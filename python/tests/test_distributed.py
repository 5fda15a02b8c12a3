# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""Vocabulary- and context-parallel ops over torch.distributed (gloo, CPU): four spawned
ranks run the scenarios of dist_worker.py, each checking loss, every metric, the pair values
and the gradient of its shard against the single-process op within 1e-6 relative."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_worker
import dpo_kernels


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_sharded_ops_match_single_process(tmp_path):
    init = os.path.join(tmp_path, "init")
    mp.spawn(dist_worker.run, args=(4, init), nprocs=4, join=True)


def test_arguments_without_a_group():
    z = torch.randn(2, 3, 5)
    y = torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match="vocab_range needs process_group"):
        dpo_kernels.sequence_logps(z, y, vocab_range=(0, 5))


def test_shard_fields_come_from_the_library():
    from dpo_kernels import distributed

    assert distributed.SHARD_FIELDS[0] == "sum_exp" and distributed.SHARD_FIELDS[-1] == "shard_max"
    assert "tokens" in distributed.SEQ_FIELDS and "logps" in distributed.SEQ_FIELDS
