# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""The rank side of test_distributed_compile.py: two gloo CPU ranks run the vocabulary- and
context-parallel ops under torch.compile(fullgraph=True) and check the loss, every metric, the
pair values and the gradients against the same call in eager mode (1e-6 relative, float32).
A failed check raises in the rank, and torch.multiprocessing.spawn re-raises it in the test."""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

import dpo_kernels
from dist_head_worker import head, leaf, ref_head
from dist_worker import CONFIGS, T, batch, close, leave


def _join(rank: int, world: int, init_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    torch._dynamo.reset()
    return dist.new_group([0, 1])


def _same(tag, got, want):
    """(loss, metrics, pair values, gradients...) of a compiled call against the eager one's."""
    loss, metrics, pv, *grads = got
    want_loss, want_m, want_pv, *want_grads = want
    close(f"{tag} loss", loss, want_loss)
    assert metrics.keys() == want_m.keys() and pv.keys() == want_pv.keys(), tag
    for k in want_m:
        close(f"{tag} {k}", metrics[k], want_m[k], floor=1e-6 if k.startswith("logits/") else 1e-12)
    for k in want_pv:
        close(f"{tag} {k}", pv[k], want_pv[k])
    for k, (g, w) in enumerate(zip(grads, want_grads)):
        close(f"{tag} grad {k}", g, w)


def _compare_logits(tag, backend, local, ref_c, ref_r, cfg, **groups):
    z, labels = local

    def step(lz):
        return dpo_kernels.dpo_loss_from_logits(lz, labels, ref_c, ref_r, return_pair_values=True, **cfg, **groups)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=backend)):
        lz = leaf(z)
        loss, metrics, pv = fn(lz)
        # The backward of the compiled forward runs the compiled backward graph.
        (loss * 1.5).backward()
        results.append((loss.detach(), metrics, pv, lz.grad))
    _same(f"{tag} [{backend}]", results[1], results[0])


def _compare_head(tag, backend, local, weight, bias, labels, ref_c, ref_r, cfg, **groups):
    def step(h, w, b):
        loss, metrics, pv = dpo_kernels.dpo_loss_from_hidden(h, w, labels, ref_c, ref_r, bias=b, return_pair_values=True,
                                                             **cfg, **groups)
        return loss, metrics, pv

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=backend)):
        h, w, b = leaf(local), leaf(weight), leaf(bias)
        loss, metrics, pv = fn(h, w, b)
        loss.backward()
        results.append((loss.detach(), metrics, pv, h.grad, w.grad, b.grad))
    _same(f"{tag} [{backend}]", results[1], results[0])


def _compare_head_logps(tag, backend, hidden, weight, bias, targets, **groups):
    """linear_logprobs with every optional output; the loss reads the log-probs and the entropy."""
    u = torch.linspace(-1, 1, targets.shape[0], device=targets.device)

    def step(h, w, b):
        lp, ent, lssp, mean, top1 = dpo_kernels.linear_logprobs(h, w, b, targets, **groups)
        return (lp * u).sum() + 0.3 * ent.sum(), lssp, mean, top1

    got = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=backend)):
        h, w, b = leaf(hidden), leaf(weight), leaf(bias)
        out, *extra = fn(h, w, b)
        out.backward()
        got.append((out.detach(), *extra, h.grad, w.grad, b.grad))
    for k, (a, b) in enumerate(zip(got[1], got[0])):
        if b.dtype == torch.bool:
            assert torch.equal(a, b), f"{tag} [{backend}] is_top1"
        else:
            close(f"{tag} [{backend}] output {k}", a, b, floor=1e-6)


def _compare_logps(tag, backend, z, labels, **groups):
    w = torch.linspace(-1, 2, z.shape[0], device=z.device)

    def step(lz):
        return (dpo_kernels.sequence_logps(lz, labels, average=True, **groups) * w).sum()

    got = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=backend)):
        lz = leaf(z)
        out = fn(lz)
        out.backward()
        got.append((out.detach(), lz.grad))
    close(f"{tag} [{backend}] logps", got[1][0], got[0][0])
    close(f"{tag} [{backend}] logps grad", got[1][1], got[0][1])


def _expect_compile_error(call, needle, otherwise):
    """call() raises an error whose message holds `needle` (Dynamo may wrap the ValueError)."""
    try:
        call()
    except Exception as e:  # noqa: BLE001
        assert needle in str(e), str(e)
    else:
        raise AssertionError(otherwise)


def run(rank: int, world: int, init_file: str) -> None:
    """aot_eager: vocabulary shards (even; uneven via vocab_range after one eager call),
    context slices, both head paths; bad vocab_range use under compile."""
    g = _join(rank, world, init_file)
    V = 400
    logits, labels, ref_c, ref_r = batch(V, 11)
    cols = slice(rank * V // 2, (rank + 1) * V // 2)
    cfg = CONFIGS[2]  # sigmoid + sft: the NLL term's gradient too
    _compare_logits("tp2", "aot_eager", (logits[..., cols], labels), ref_c, ref_r, cfg, process_group=g)
    _compare_logits("tp2 wpo", "aot_eager", (logits[..., cols], labels), ref_c, ref_r, CONFIGS[6], process_group=g)
    _compare_logps("tp2", "aot_eager", logits[..., cols], labels, process_group=g)

    # Uneven shards: vocab_range is checked by the eager call, then read by the compiled one.
    bounds = [0, 130, V]
    vr = (bounds[rank], bounds[rank + 1])
    _compare_logits("tp2 vocab_range", "aot_eager", (logits[..., vr[0]:vr[1]], labels), ref_c, ref_r, cfg,
                    process_group=g, vocab_range=vr)
    # The checked range on rows no eager call has seen (2 sequences): the check is per range,
    # not per shape, so a compiled call on a new batch shape needs no new eager call.
    new_rows = torch.compile(lambda z: dpo_kernels.sequence_logps(z, labels[:2], average=True, process_group=g,
                                                                  vocab_range=vr), fullgraph=True, backend="aot_eager")
    close("tp2 vocab_range new rows [aot_eager]", new_rows(logits[:2, :, vr[0]:vr[1]]),
          dpo_kernels.sequence_logps(logits[:2], labels[:2], average=True))
    # A range no eager call has checked: a clear error on every rank, before any collective.
    other = [(0, 131), (131, V)][rank]
    fn = torch.compile(lambda z: dpo_kernels.dpo_loss_from_logits(z, labels, ref_c, ref_r, process_group=g,
                                                                   vocab_range=other)[0], fullgraph=True,
                       backend="aot_eager")
    _expect_compile_error(lambda: fn(logits[..., other[0]:other[1]]), "has not been checked on this rank",
                          "an unchecked vocab_range compiled")
    # Rank 0's range (0, 130) checked again as part of another tiling (V = 300): a compiled call
    # cannot tell which vocabulary holds and raises (it took the last one checked: a mean logit
    # off by 300 / 400 on that rank only). Rank 0 alone compiles it: it raises while tracing,
    # before any collective.
    bounds2 = [0, 130, 300]
    vr2 = (bounds2[rank], bounds2[rank + 1])
    labels2 = torch.where(labels >= 0, labels % 300, labels)
    dpo_kernels.sequence_logps(logits[..., vr2[0]:vr2[1]].contiguous(), labels2, process_group=g, vocab_range=vr2)
    if rank == 0:
        fn = torch.compile(lambda z: dpo_kernels.sequence_logps(z, labels, process_group=g, vocab_range=vr),
                           fullgraph=True, backend="aot_eager")
        _expect_compile_error(lambda: fn(logits[..., vr[0]:vr[1]]),
                              "as part of global vocabularies of [300, 400] columns",
                              "a vocab_range checked in two tilings compiled")

    # Context slices: rank k holds rows [k T/2, (k+1) T/2) of every sequence.
    t0, t1 = rank * T // 2, (rank + 1) * T // 2
    cslice = (logits[:, t0:t1].contiguous(), labels[:, t0:t1].contiguous())
    _compare_logits("cp2", "aot_eager", cslice, ref_c, ref_r, cfg, cp_group=g)
    _compare_logps("cp2", "aot_eager", *cslice, cp_group=g)

    # The fused head on a weight shard.
    hidden, weight, bias, hl, hc, hr = head(V, 12)
    _compare_head("head tp2", "aot_eager", hidden, weight[cols], bias[cols], hl, hc, hr, cfg, process_group=g)
    # The reference from its hidden states on its head's shard (forward only, no_grad).
    rh, rw, rb = ref_head(hidden, weight, bias, 14)
    _compare_head("head tp2 ref_hidden", "aot_eager", hidden, weight[cols], bias[cols], hl, None, None, cfg,
                  process_group=g, ref_hidden=rh, ref_weight=rw[cols], ref_bias=rb[cols])
    _compare_head_logps("head logps tp2", "aot_eager", hidden.reshape(-1, hidden.shape[-1]), weight[cols],
                        bias[cols], hl.reshape(-1).clamp_min(0), process_group=g)
    _compare_head("head cp2", "aot_eager", hidden[:, t0:t1].contiguous(), weight, bias, hl[:, t0:t1].contiguous(), hc,
                  hr, CONFIGS[0], cp_group=g)
    leave()


def world_one(group, device: str, backend: str) -> None:
    """One rank on `device` (test_cuda_distributed.py: CUDA with NCCL): its shard is the whole
    vocabulary and its context slice every row. The vocabulary-parallel logits (sigmoid + sft,
    WPO), the context-parallel logits, sequence_logps and both head ops, compiled against eager."""
    torch._dynamo.reset()
    V = 40
    logits, labels, ref_c, ref_r = (t.to(device) for t in batch(V, 7))
    _compare_logits("tp1", backend, (logits, labels), ref_c, ref_r, CONFIGS[2], process_group=group)
    _compare_logits("tp1 wpo", backend, (logits, labels), ref_c, ref_r, CONFIGS[6], process_group=group)
    _compare_logits("cp1", backend, (logits, labels), ref_c, ref_r, CONFIGS[2], cp_group=group)
    _compare_logps("tp1", backend, logits, labels, process_group=group)
    hidden, weight, bias, hl, hc, hr = (t.to(device) for t in head(V, 12))
    _compare_head("head tp1", backend, hidden, weight, bias, hl, hc, hr, CONFIGS[2], process_group=group)
    _compare_head_logps("head logps tp1", backend, hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                        hl.reshape(-1).clamp_min(0), process_group=group)


def inductor(rank: int, world: int, init_file: str) -> None:
    """The default backend (inductor, C++ code generation) on the vocabulary-parallel logits."""
    g = _join(rank, world, init_file)
    V = 200
    logits, labels, ref_c, ref_r = batch(V, 13)
    cols = slice(rank * V // 2, (rank + 1) * V // 2)
    _compare_logits("tp2", "inductor", (logits[..., cols], labels), ref_c, ref_r, CONFIGS[2], process_group=g)
    leave()
