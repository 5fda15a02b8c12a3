# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""The fused-head ops under DistributedDataParallel (two processes, gloo, CPU): their gradients
reach DDP's hooks like any op's, so the averaged gradients equal those of the unfused model on
the whole batch. dk.linear_logprobs computes its gradient in the backward; dk.dpo_loss_from_hidden
(three-pass path) computes it inside the forward and hands it to autograd in the backward,
which DDP must see too (TRL issue 7245 is the failure: gradients written in the forward,
never all-reduced), with and without find_unused_parameters. And dpo_kernels.trl.FusedDPOTrainer
under transformers' own DDP (accelerate, two CPU processes) trains as TRL's DPOTrainer does there."""
import gc
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dpo_kernels as dk

H, V, N = 12, 40, 10
P, T = 4, 6  # DPO: pairs of the whole batch (P / 2 per rank), tokens per sequence
BETA = 0.1


class Head(torch.nn.Module):
    """A body and an LM head; forward gives the mean log-prob and entropy loss of tokens."""

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


class DPOHead(Head):
    """forward gives the sigmoid DPO loss of pairs [chosen; rejected] ([2p, T, H] inputs),
    the reference from fixed reference hidden states through the same (frozen) head."""

    def forward(self, x, labels, ref_hidden, fused):
        h = torch.tanh(self.body(x))
        w, b = self.lm_head.weight, self.lm_head.bias
        if fused:
            # Room for one pair's rows (2T rows of V logits, 2H hidden values and 16 scalars,
            # float64; docs/linear.md): a chunk per pair, three passes (sigmoid is separable).
            loss, _ = dk.dpo_loss_from_hidden(h, w, labels, bias=b, ref_hidden=ref_hidden, beta=BETA,
                                              workspace_bytes=2 * T * (V + 2 * H + 16) * 8)
            return loss

        def seq_logps(hidden, weight, bias):
            logp = torch.log_softmax(hidden @ weight.T + bias, -1)
            mask = labels != -100
            return (logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask).sum(-1)

        pc, pr = seq_logps(h, w, b).chunk(2)
        rc, rr = seq_logps(ref_hidden, w.detach(), b.detach()).chunk(2)
        return -torch.nn.functional.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean()


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * N, H, generator=g, dtype=torch.float64), torch.randint(0, V, (2 * N,), generator=g)


def dpo_batch():
    """[2P, T, H] inputs, labels (prompt and padding -100), reference hidden states."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2 * P, T, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    for i in range(2 * P):
        labels[i, : 1 + i % 2] = -100  # prompt
        labels[i, T - i % 3:] = -100  # padding
    return x, labels, torch.randn(2 * P, T, H, generator=g, dtype=torch.float64)


def dpo_shard(rank, *tensors):
    """Rank `rank`'s pairs: its half of the chosen and of the rejected sequences."""
    half = P // 2
    return [torch.cat([t[rank * half:(rank + 1) * half], t[P + rank * half:P + (rank + 1) * half]]) for t in tensors]


#: (file name, module, find_unused_parameters)
CONFIGS = (("logprobs", Head, False), ("dpo", DPOHead, False), ("dpo_find_unused", DPOHead, True))


def worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    for name, module, find_unused in CONFIGS:
        model = torch.nn.parallel.DistributedDataParallel(module(), find_unused_parameters=find_unused)
        if module is Head:
            x, y = batch()
            loss = model(x[rank * N:(rank + 1) * N], y[rank * N:(rank + 1) * N], fused=True)
        else:
            loss = model(*dpo_shard(rank, *dpo_batch()), fused=True)
        loss.backward()
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, os.path.join(out_dir, f"{name}{rank}.pt"))
    # The last DDP model (its reducer holds the group) is freed before the group, and both
    # ranks leave their collectives before either tears gloo down. With only the barrier, CI
    # still saw rank 0 abort at exit once ("terminate called without an active exception",
    # after its results were saved): so the worker also leaves with os._exit(0), skipping the
    # interpreter's teardown, as its results are on disk by then.
    del model, loss
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_grads():
    """Every CONFIGS entry trained one step under DDP in one two-process run: name -> per-rank grads."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed gloo missing")
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(free_port(), d), nprocs=2, join=True)
        return {name: [torch.load(os.path.join(d, f"{name}{r}.pt")) for r in range(2)] for name, _, _ in CONFIGS}


def assert_grads(grads, ref):
    for n, p in ref.named_parameters():
        for r in range(2):
            torch.testing.assert_close(grads[r][n], p.grad, rtol=1e-10, atol=1e-12, msg=f"rank {r} {n}")


def test_ddp_gradients_equal_unfused_full_batch(ddp_grads):
    ref = Head()
    x, y = batch()
    # DDP averages the ranks' gradients of their half-batch means: the full-batch mean's gradient.
    ref(x, y, fused=False).backward()
    assert_grads(ddp_grads["logprobs"], ref)


@pytest.mark.parametrize("name", ["dpo", "dpo_find_unused"])
def test_ddp_dpo_from_hidden_gradients_equal_unfused_full_batch(ddp_grads, name):
    ref = DPOHead()
    x, labels, ref_hidden = dpo_batch()
    loss = ref(x, labels, ref_hidden, fused=False)
    loss.backward()
    # The fused loss of the whole batch agrees with the naive one (the check is of DDP, not the op).
    fused = DPOHead()(x, labels, ref_hidden, fused=True)
    torch.testing.assert_close(fused, loss.detach(), rtol=1e-12, atol=0)
    # Each rank's loss is the mean over its P/2 pairs: the ranks' average is the full batch's.
    assert_grads(ddp_grads[name], ref)
    # Each rank's own gradient differs from the average (the all-reduce really happened).
    local = DPOHead()
    local(*dpo_shard(0, x, labels, ref_hidden), fused=True).backward()
    assert not torch.allclose(local.lm_head.weight.grad, ref.lm_head.weight.grad, rtol=1e-3)


def trainer_worker(rank, port, out_dir):
    """FusedDPOTrainer (with and without find_unused_parameters) and TRL's DPOTrainer, trained by
    accelerate's DDP over two processes, 2 pairs per process."""
    import trl_harness
    from dpo_kernels.trl import FusedDPOTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    runs = {}
    for name, cls, find_unused in (("fused", FusedDPOTrainer, False), ("fused_find_unused", FusedDPOTrainer, True),
                                   ("trl", None, False)):
        wrapped = []

        def run(trainer):
            trainer.train()
            wrapped.append((trainer.accelerator.num_processes, type(trainer.model_wrapped).__name__,
                            trainer.model_wrapped.find_unused_parameters))

        runs[name] = trl_harness.train(cls, run=run, per_device_train_batch_size=2,
                                       ddp_find_unused_parameters=find_unused)
        assert wrapped == [(2, "DistributedDataParallel", find_unused)], wrapped
    torch.save(runs, os.path.join(out_dir, f"{rank}.pt"))


def test_fused_trainer_under_ddp_matches_trl():
    """Metrics reduced over the processes as TRL reduces them; the head's gradient all-reduced
    (find_unused_parameters=True included: the loss runs inside the model's forward, so DDP sees
    the head used); both ranks end with TRL's parameters."""
    pytest.importorskip("trl")
    import trl_harness

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed gloo missing")
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(trainer_worker, args=(free_port(), d), nprocs=2, join=True)
        runs = [torch.load(os.path.join(d, f"{r}.pt")) for r in range(2)]
    for r in range(2):
        for name in ("fused", "fused_find_unused"):
            trl_harness.assert_same_training(runs[r][name], runs[0]["trl"])


def length_worker(rank, port, out_dir):
    """ipo with keep_end truncation (float64): per step, each process records whether its own
    batch has a completion token at position 0 and whether the fused head ran."""
    import trl_harness
    import dpo_kernels
    from dpo_kernels.trl import FusedDPOTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    steps, fused_calls = [], []
    inner = dpo_kernels.dpo_loss_from_hidden

    def counting(*a, **k):
        fused_calls.append(1)
        return inner(*a, **k)

    dpo_kernels.dpo_loss_from_hidden = counting
    original = FusedDPOTrainer.compute_loss

    def recording(self, model, inputs, *a, **k):
        before = len(fused_calls)
        out = original(self, model, inputs, *a, **k)
        steps.append((bool(inputs["completion_mask"][:, 0].any()), len(fused_calls) > before))
        return out

    FusedDPOTrainer.compute_loss = recording
    args = dict(model_config=dict(dtype=torch.float64), per_device_train_batch_size=2, loss_type=["ipo"],
                max_length=8, truncation_mode="keep_end")
    runs = {"fused": trl_harness.train(FusedDPOTrainer, **args), "trl": trl_harness.train(None, **args)}
    torch.save((runs, steps), os.path.join(out_dir, f"{rank}.pt"))


def test_fused_trainer_length_fallback_agrees_across_processes():
    """FusedDPOTrainer hands an ipo batch with a completion at position 0 to DPOTrainer's loss;
    under DDP every process must take the same path (the paths gather different metrics: a
    process alone on the other path would hang the collectives or mix up the logs). Here some
    steps have such a completion on one process only: both take TRL's path there, and the
    training equals DPOTrainer's on both."""
    pytest.importorskip("trl")
    import trl_harness

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed gloo missing")
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(length_worker, args=(free_port(), d), nprocs=2, join=True)
        (runs0, steps0), (runs1, steps1) = [torch.load(os.path.join(d, f"{r}.pt")) for r in range(2)]
    assert len(steps0) == len(steps1) == trl_harness.STEPS
    for (zero0, fused0), (zero1, fused1) in zip(steps0, steps1):
        assert fused0 == fused1 == (not (zero0 or zero1))
    assert any(z0 != z1 for (z0, _), (z1, _) in zip(steps0, steps1)), "no step where the processes disagree"
    assert any(f for _, f in steps0), "no step on the fused head"
    for runs in (runs0, runs1):
        trl_harness.assert_same_training(runs["fused"], runs0["trl"], rtol=1e-7, steps=trl_harness.STEPS,
                                         model_config=dict(dtype=torch.float64))
