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

import dist_head_worker
import dist_worker
import dpo_kernels

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo")


@needs_gloo
def test_sharded_ops_match_single_process(tmp_path):
    init = os.path.join(tmp_path, "init")
    mp.spawn(dist_worker.run, args=(4, init), nprocs=4, join=True)


@needs_gloo
def test_sharded_head_matches_single_process(tmp_path):
    """linear_logprobs and dpo_loss_from_hidden on weight shards (even, uneven via
    vocab_range), context slices and both, against the single-process ops (dist_head_worker)."""
    init = os.path.join(tmp_path, "init")
    mp.spawn(dist_head_worker.run, args=(4, init), nprocs=4, join=True)


@needs_gloo
def test_dtensor_weight_is_gathered(tmp_path):
    """A DTensor weight / bias (FSDP2) over 2 ranks: gathered whole, the same result and
    gradient as the plain tensors (dist_head_worker.dtensor)."""
    init = os.path.join(tmp_path, "init")
    mp.spawn(dist_head_worker.dtensor, args=(2, init), nprocs=2, join=True)


@needs_gloo
@pytest.mark.parametrize("op", ["head", "logits"])
def test_ranks_disagreeing_on_shapes_end_the_job_instead_of_hanging(op):
    """Without vocab_range nothing checks that the ranks hold the same rows (the caller's
    contract, docs/distributed.md): a mismatch must still end the job (gloo aborts; NCCL
    times out), never deadlock. With vocab_range it is a ValueError on every rank
    (dist_worker / dist_head_worker)."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import dist_head_worker; dist_head_worker.mismatch_main({op!r})"
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, timeout=120,
                             env=dict(os.environ))
    except subprocess.TimeoutExpired:
        pytest.fail("ranks that disagree on the rows hung instead of failing")
    assert out.returncode != 0, out.stdout + out.stderr
    assert "no error" not in out.stdout, out.stdout


@needs_gloo
@pytest.mark.parametrize("path", ["hidden", "logits"])
def test_tensor_parallel_example_matches_single_process(path):
    """examples/python/tensor_parallel_dpo.py under torchrun: a vocabulary-parallel head
    (the sharded fused head, or sharded logits) trained with DPO on 2 ranks, checked against
    one process at every step."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    example = os.path.join(repo, "examples", "python", "tensor_parallel_dpo.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    out = subprocess.run(torchrun + [example, "--path", path], capture_output=True, text=True, timeout=300, env=dict(os.environ))
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


@needs_gloo
def test_one_ranks_bad_input_raises_on_every_rank_without_waiting(tmp_path):
    """A context rank's own bad input (a ref_hidden of the wrong shape or dtype, int16
    labels, float64 hidden with a float32 weight, reference log-probs of the wrong shape) and
    an empty vocab_range shard: every rank raises at once (a collective timeout of 20 s, so
    a rank left waiting fails the test quickly instead of hanging it)."""
    init = os.path.join(tmp_path, "init")
    mp.spawn(dist_head_worker.rejections, args=(3, init), nprocs=3, join=True)
