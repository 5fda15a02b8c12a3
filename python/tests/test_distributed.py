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


def _group_calls(**kw):
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(4, 3, 7, generator=g), torch.randint(0, 7, (4, 3), generator=g)
    h, w = torch.randn(4, 3, 5, generator=g), torch.randn(7, 5, generator=g)
    rc = torch.zeros(2)
    return {
        "sequence_logps": lambda: dpo_kernels.sequence_logps(z, y, **kw),
        "dpo_loss_from_logits": lambda: dpo_kernels.dpo_loss_from_logits(z, y, rc, rc, **kw),
        "linear_logprobs": lambda: dpo_kernels.linear_logprobs(
            h.reshape(12, 5), w, None, y.reshape(12), **{k: v for k, v in kw.items() if k != "cp_group"}),
        "dpo_loss_from_hidden": lambda: dpo_kernels.dpo_loss_from_hidden(h, w, y, rc, rc, **kw),
    }


@pytest.mark.parametrize("call", list(_group_calls()))
@pytest.mark.parametrize("name,value", [("process_group", "tp"), ("process_group", 0), ("cp_group", "cp"),
                                        ("cp_group", object())])
def test_group_that_is_not_a_process_group_is_named(call, name, value):
    # Not torch's "Group tp is not registered" / "Could not resolve the process group", which
    # name no argument.
    if call == "linear_logprobs" and name == "cp_group":
        pytest.skip("linear_logprobs has no cp_group")
    with pytest.raises(ValueError, match=rf"^{name} must be a torch.distributed ProcessGroup or None, got"):
        _group_calls(**{name: value})[call]()


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@needs_gloo
@pytest.mark.parametrize("call", list(_group_calls()))
@pytest.mark.parametrize("vocab_range", [(2**63, 2**63 + 7), (-(2**63) - 7, -(2**63))])
def test_vocab_range_past_int64_is_named(world_of_one, call, vocab_range):
    # Not "Overflow when unpacking long long" from the ranges' all-gather tensor.
    with pytest.raises(ValueError, match=r"^vocab_range = .* is outside the range of int64"):
        _group_calls(process_group=world_of_one, vocab_range=vocab_range)[call]()
    # In range, the world of one works.
    _group_calls(process_group=world_of_one, vocab_range=(0, 7))[call]()


@needs_gloo
@pytest.mark.parametrize("call", ["sequence_logps", "dpo_loss_from_logits", "linear_logprobs", "dpo_loss_from_hidden"])
@pytest.mark.parametrize("group", ["process_group", "cp_group"])
def test_double_backward_through_a_sharded_op_raises(world_of_one, call, group):
    """As the unsharded ops: a gradient taken with create_graph=True raises when differentiated
    again. It was silently first-order only: a gradient penalty's second-order term was
    dropped (d/dx of sum(grad^2) + sum(x) came back as ones)."""
    if call == "linear_logprobs" and group == "cp_group":
        pytest.skip("linear_logprobs has no cp_group")
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(4, 3, 7, generator=g).requires_grad_(), torch.randint(0, 7, (4, 3), generator=g)
    h, w = torch.randn(4, 3, 5, generator=g).requires_grad_(), torch.randn(7, 5, generator=g).requires_grad_()
    rc = torch.zeros(2)
    kw = {group: world_of_one}
    x, f = {
        "sequence_logps": (z, lambda: dpo_kernels.sequence_logps(z, y, **kw).sum()),
        "dpo_loss_from_logits": (z, lambda: dpo_kernels.dpo_loss_from_logits(z, y, rc, rc, **kw)[0]),
        "linear_logprobs": (h, lambda: dpo_kernels.linear_logprobs(h.reshape(12, 5), w, None, y.reshape(12),
                                                                    **kw)[0].sum()),
        "dpo_loss_from_hidden": (h, lambda: dpo_kernels.dpo_loss_from_hidden(h, w, y, rc, rc, **kw)[0]),
    }[call]
    (gx,) = torch.autograd.grad(f(), x, create_graph=True)
    # The first-order gradient itself is right (the unsharded op's, bitwise on one rank).
    kw.clear()
    (want,) = torch.autograd.grad(f(), x)
    torch.testing.assert_close(gx.detach(), want, rtol=1e-5, atol=1e-6)
    kw[group] = world_of_one
    with pytest.raises(RuntimeError, match=f"dpo_kernels.{call}: double backward is not supported"):
        torch.autograd.grad((gx ** 2).sum() + x.sum(), x)


@needs_gloo
@pytest.mark.parametrize("loss_type", ["sigmoid", ["sigmoid", "sft"]])
def test_nan_logits_with_wpo_propagate_as_unsharded(world_of_one, loss_type):
    """A NaN logit in pair 0 under use_weighting: the sharded backward returns NaN where the
    unsharded one does (it raised "nll_token_grad = nan is invalid"), and without an NLL term
    pair 1's gradient stays finite in both (the NaN mean weight reached it through 0 * NaN)."""
    g = torch.Generator().manual_seed(3)
    z0, y = torch.randn(4, 3, 7, generator=g, dtype=torch.float64), torch.randint(0, 7, (4, 3), generator=g)
    z0[0, :, 2] = float("nan")
    rc = torch.zeros(2, dtype=torch.float64)
    grads = []
    for kw in ({}, {"process_group": world_of_one}):
        z = z0.clone().requires_grad_()
        loss = dpo_kernels.dpo_loss_from_logits(z, y, rc, rc, loss_type=loss_type, use_weighting=True, **kw)[0]
        assert torch.isnan(loss)
        loss.backward()
        grads.append(z.grad)
    want, got = grads
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, equal_nan=True)
    # Pair 1 is sequences 1 (chosen) and 3 (rejected).
    assert torch.isfinite(want[3]).all()
    assert torch.isfinite(want[1]).all() == (loss_type == "sigmoid")
