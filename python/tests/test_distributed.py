# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""Vocabulary- and context-parallel ops over torch.distributed (gloo, CPU): four spawned
ranks run the scenarios of dist_worker.py, each checking loss, every metric, the pair values
and the gradient of its shard against the single-process op within 1e-6 relative."""
import os
import subprocess
import sys

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


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_tensor_parallel_example_matches_single_process():
    """examples/python/tensor_parallel_dpo.py under torchrun: a vocabulary-parallel head
    trained with DPO on 2 ranks, checked against one process at every step."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    example = os.path.join(repo, "examples", "python", "tensor_parallel_dpo.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    out = subprocess.run(torchrun + [example], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("MATCH") == 6 and "MISMATCH" not in out.stdout, out.stdout


def test_arguments_without_a_group():
    z = torch.randn(2, 3, 5)
    y = torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match="vocab_range needs process_group"):
        dpo_kernels.sequence_logps(z, y, vocab_range=(0, 5))


def test_shard_fields_come_from_the_library():
    from dpo_kernels import distributed

    assert distributed.SHARD_FIELDS[0] == "sum_exp" and distributed.SHARD_FIELDS[-1] == "shard_max"
    assert "tokens" in distributed.SEQ_FIELDS and "logps" in distributed.SEQ_FIELDS
