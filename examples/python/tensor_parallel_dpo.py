# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""A tiny language model with a vocabulary-parallel LM head, trained with DPO over
torch.distributed (docs/distributed.md).

    torchrun --nproc_per_node 2 examples/python/tensor_parallel_dpo.py [--path hidden|logits]

Each rank holds the rows [rank * V / tp, (rank + 1) * V / tp) of the LM head's weight, as a
column-parallel head in Megatron-LM.

- ``--path hidden`` (default): dpo_kernels.dpo_loss_from_hidden(process_group=...) takes the
  hidden states and the rank's weight shard; no logits exist, not even the shard's. Its
  backward all-reduces the hidden states' gradient over the group itself.
- ``--path logits``: the rank computes its logits shard ``hidden @ weight_shard.T`` (never
  gathered) and dpo_kernels.dpo_loss_from_logits(process_group=...) gives the gradient of
  that shard; the hidden states' gradient is the sum of the ranks' partial ones (the
  all-reduce of ``_CopyToTensorParallel``'s backward, Megatron's
  ``copy_to_tensor_model_parallel_region``).

Every rank gets the batch's loss and metrics. Every step, each rank also runs the same
model unsharded in one process (the whole head) with the single-process op and checks that
the loss and the updated weights agree. Runs on the CPU (gloo).
"""
import argparse
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", choices=("hidden", "logits"), default="hidden",
                        help="the sharded fused head (hidden) or sharded logits (logits)")
    path = parser.parse_args().path
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
        if path == "hidden":
            loss, metrics = dpo_kernels.dpo_loss_from_hidden(hidden, head_tp, labels, rc, rr, beta=0.1,
                                                             process_group=group)
        else:
            logits = _CopyToTensorParallel.apply(hidden, group) @ head_tp.T   # [2P, T, V / world]
            loss, metrics = dpo_kernels.dpo_loss_from_logits(logits, labels, rc, rr, beta=0.1, process_group=group)
        loss.backward()
        with torch.no_grad():
            for w in (embed_tp, head_tp):
                w -= LR * w.grad
                w.grad = None
        # The same step in one process, with the whole head.
        ref_hidden = torch.tanh(ref_embed[tokens])
        if path == "hidden":
            ref_loss, _ = dpo_kernels.dpo_loss_from_hidden(ref_hidden, ref_head, labels, rc, rr, beta=0.1)
        else:
            ref_loss, _ = dpo_kernels.dpo_loss_from_logits(ref_hidden @ ref_head.T, labels, rc, rr, beta=0.1)
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
            print(f"{path} step {step}: loss {float(loss):.6f} (single process {float(ref_loss):.6f}) "
                  f"accuracy {float(metrics['rewards/accuracies']):.2f} {'MATCH' if ok else 'MISMATCH'}", flush=True)
        assert ok, f"rank {rank}: the tensor-parallel step {step} differs from the single-process one"
    dist.barrier()  # no rank tears gloo down while its peer is still in a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
