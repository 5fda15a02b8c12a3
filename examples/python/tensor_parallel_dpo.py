# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""A tiny language model with a vocabulary-parallel LM head, trained with DPO over
torch.distributed (docs/distributed.md).

    torchrun --nproc_per_node 2 examples/python/tensor_parallel_dpo.py

Each rank holds the rows [rank * V / tp, (rank + 1) * V / tp) of the LM head's weight, as a
column-parallel head in Megatron-LM: its logits are a vocabulary shard, never gathered.
dpo_kernels.dpo_loss_from_logits(process_group=...) gives every rank the batch's loss and
metrics and the gradient of its own logits; the hidden states' gradient is the sum of the
ranks' partial ones (the all-reduce of `_copy_to_tensor_parallel`'s backward). Every step,
rank 0 also runs the same model unsharded in one process (the full head gathered) with the
single-process op, and checks that loss and updated weights agree. Runs on the CPU (gloo).
"""
import os

import torch
import torch.distributed as dist

import dpo_kernels

V, H, P, T, STEPS, LR = 1024, 32, 4, 12, 6, 2.0


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; the backward sums the ranks' partial input gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def batch(seed):
    """TRL's concatenated batch of P preference pairs: tokens [2P, T], shifted labels with
    the prompt masked, reference log-probs [P]."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (2 * P, T), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, :3] = -100
    labels[:, -1] = -100
    ref = torch.randn(2, P, generator=g) - 40
    return tokens, labels, ref[0], ref[1]


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert V % world == 0
    torch.manual_seed(0)  # the same initial weights on every rank
    embed = torch.randn(V, H) * 0.1
    head = torch.randn(V, H) * 0.1
    shard = slice(rank * V // world, (rank + 1) * V // world)
    embed_tp = embed.clone().requires_grad_()           # replicated
    head_tp = head[shard].clone().requires_grad_()      # this rank's rows of the head
    ref_embed, ref_head = embed.clone().requires_grad_(), head.clone().requires_grad_()
    group = dist.group.WORLD
    for step in range(STEPS):
        tokens, labels, rc, rr = batch(step % 2)
        hidden = torch.tanh(embed_tp[tokens])
        logits = _CopyToTensorParallel.apply(hidden, group) @ head_tp.T   # [2P, T, V / world]
        loss, metrics = dpo_kernels.dpo_loss_from_logits(logits, labels, rc, rr, beta=0.1, process_group=group)
        loss.backward()
        with torch.no_grad():
            for w in (embed_tp, head_tp):
                w -= LR * w.grad
                w.grad = None
        # The same step in one process, with the whole head.
        ref_logits = torch.tanh(ref_embed[tokens]) @ ref_head.T
        ref_loss, ref_metrics = dpo_kernels.dpo_loss_from_logits(ref_logits, labels, rc, rr, beta=0.1)
        ref_loss.backward()
        with torch.no_grad():
            for w in (ref_embed, ref_head):
                w -= LR * w.grad
                w.grad = None
        loss, ref_loss = loss.detach(), ref_loss.detach()
        ok = abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
        ok &= torch.allclose(head_tp, ref_head[shard], rtol=1e-5, atol=1e-6)
        ok &= torch.allclose(embed_tp, ref_embed, rtol=1e-5, atol=1e-6)
        if rank == 0:
            print(f"step {step}: loss {float(loss):.6f} (single process {float(ref_loss):.6f}) "
                  f"accuracy {float(metrics['rewards/accuracies']):.2f} {'MATCH' if ok else 'MISMATCH'}", flush=True)
        assert ok, f"rank {rank}: the tensor-parallel step {step} differs from the single-process one"
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
