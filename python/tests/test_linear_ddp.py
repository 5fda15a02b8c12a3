# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""dk.linear_logprobs under DistributedDataParallel (two processes, gloo, CPU): its gradients
reach DDP's hooks like any op's (the backward is an autograd node, not work done inside the
forward), so the averaged gradients equal those of the unfused model on the whole batch."""
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dpo_kernels as dk

H, V, N = 12, 40, 10


class Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(H, H, dtype=torch.float64)
        self.lm_head = torch.nn.Linear(H, V, bias=True, dtype=torch.float64)

    def forward(self, x, y, fused):
        h = torch.tanh(self.body(x))
        if fused:
            lp, ent, *_ = dk.linear_logprobs(h, self.lm_head.weight, self.lm_head.bias, y, outputs=("entropy",))
        else:
            logp_all = torch.log_softmax(self.lm_head(h), -1)
            lp = logp_all.gather(-1, y[:, None])[:, 0]
            ent = -(logp_all.exp() * logp_all).sum(-1)
        return -(lp.mean() + 0.1 * ent.mean())


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * N, H, generator=g, dtype=torch.float64), torch.randint(0, V, (2 * N,), generator=g)


def worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(Head())
    x, y = batch()
    model(x[rank * N:(rank + 1) * N], y[rank * N:(rank + 1) * N], fused=True).backward()
    torch.save({n: p.grad for n, p in model.module.named_parameters()}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed gloo missing")
def test_ddp_gradients_equal_unfused_full_batch():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(free_port(), d), nprocs=2, join=True)
        grads = [torch.load(os.path.join(d, f"{r}.pt")) for r in range(2)]
    ref = Head()
    x, y = batch()
    # DDP averages the ranks' gradients of their half-batch means: the full-batch mean's gradient.
    ref(x, y, fused=False).backward()
    for n, p in ref.named_parameters():
        for r in range(2):
            torch.testing.assert_close(grads[r][n], p.grad, rtol=1e-10, atol=1e-12, msg=f"rank {r} {n}")
