# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""The rank side of test_distributed.py: one gloo process group of four CPU ranks runs every
scenario (vocabulary shards, even and uneven; context slices, padded and packed; both
together; bad input), each against the single-process op on the full batch, which every rank
also computes. A failed check raises in the rank, and torch.multiprocessing.spawn re-raises it
in the test."""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

import dpo_kernels

P, T = 3, 7
#: Loss configurations covering each family: pairwise (sigmoid, ipo with lengths), batch
#: (aot), NLL-coupled (sft mix, cpo), reference-free (simpo), WPO and LD-DPO.
CONFIGS = [
    dict(loss_type="sigmoid"),
    dict(loss_type="ipo", beta=0.5),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    dict(loss_type="aot", label_smoothing=0.1),
    dict(loss_type="simpo", beta=2.0),
    dict(loss_type="cpo", cpo_alpha=0.7),
    dict(loss_type="sigmoid", use_weighting=True),
    dict(loss_type="sigmoid", ld_alpha=0.5),
]



def leave() -> None:
    """The end of a spawned worker: both ranks leave their collectives, the group is torn
    down, and the process exits with os._exit(0), skipping the interpreter's teardown. gloo's
    threads have aborted a rank at exit ("terminate called without an active exception")
    after every check had passed (CI, and a run here); the checks' results are the
    assertions above, so nothing is lost by not running the interpreter's teardown."""
    import os
    import sys

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

def batch(V: int, seed: int, dtype=torch.float32):
    """TRL's concatenated padded batch: logits [2P, T, V], labels with a prompt and padding
    masked by -100, reference log-probs [P] each."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2 * P, T, V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    for s in range(2 * P):
        prompt = 1 + s % 2
        end = T - (s % 3)
        labels[s, :prompt] = -100
        labels[s, end:] = -100
    ref_c = torch.randn(P, generator=g) - 20
    ref_r = torch.randn(P, generator=g) - 20
    return logits, labels, ref_c, ref_r


def packed(logits, labels):
    """The padded batch as packed rows [N, V] with cu_seqlens (each sequence trimmed of its
    trailing padding, so lengths differ)."""
    rows, ys, cu = [], [], [0]
    for s in range(logits.shape[0]):
        n = int((labels[s] != -100).nonzero().max()) + 1
        rows.append(logits[s, :n])
        ys.append(labels[s, :n])
        cu.append(cu[-1] + n)
    return torch.cat(rows), torch.cat(ys), torch.tensor(cu)


def close(name, got, want, rel=1e-6, floor=1e-12):
    """Within `rel` relative: value by value for scalars and per-pair vectors, and for a
    gradient (more than one row) relative to its largest magnitude, since an element such as
    coef * (1 - p_y) with p_y near 1 cancels and carries float32's absolute error, not a
    relative one. `floor`: the magnitude below which a value is compared absolutely (a mean
    logit near 0 is a sum of terms that cancel: its error scales with the terms)."""
    got, want = got.double(), want.double()
    if want.numel() == 0:  # a rank holding no row: an empty gradient of the logits' shape
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        return
    if want.dim() >= 2:
        scale = want.abs().max().clamp_min(1e-300)
        worst = float((got - want).abs().max() / scale)
    else:
        worst = float(((got - want).abs() / want.abs().clamp_min(floor)).max()) if want.numel() else 0.0
    assert worst <= rel, f"{name}: max relative error {worst:.3e} > {rel:.1e}"


def unsharded(cfg, logits, labels, ref_c, ref_r, cu=None):
    z = logits.clone().requires_grad_()
    loss, metrics, pv = dpo_kernels.dpo_loss_from_logits(
        z, labels, ref_c, ref_r, cu_seqlens=cu, return_pair_values=True, **cfg)
    loss.backward()
    return loss.detach(), metrics, pv, z.grad


def check_dpo(tag, cfg, full, local, cols, rows, tp=None, cp=None, vocab_range=None):
    """The sharded loss on `local` (this rank's (logits, labels, cu_seqlens)) against the
    unsharded one on `full`; the gradient against the full gradient's [rows][..., cols]."""
    logits, labels, ref_c, ref_r, cu = full
    want_loss, want_m, want_pv, want_g = unsharded(cfg, logits, labels, ref_c, ref_r, cu)
    z, y, lcu = local
    z = z.clone().requires_grad_()
    loss, metrics, pv = dpo_kernels.dpo_loss_from_logits(
        z, y, ref_c, ref_r, cu_seqlens=lcu, return_pair_values=True, process_group=tp, cp_group=cp,
        vocab_range=vocab_range, **cfg)
    loss.backward()
    name = f"{tag} {cfg}"
    close(f"{name} loss", loss.detach(), want_loss)
    for k in want_m:
        floor = float(logits.abs().mean()) if k.startswith("logits/") else 1e-12
        close(f"{name} {k}", metrics[k], want_m[k], floor=floor)
    for k in want_pv:
        close(f"{name} {k}", pv[k], want_pv[k])
    close(f"{name} grad", z.grad, rows(want_g)[..., cols])


def check_logps(tag, full, local, cols, rows, tp=None, cp=None, vocab_range=None, average=False):
    logits, labels, cu = full
    z = logits.clone().requires_grad_()
    want = dpo_kernels.sequence_logps(z, labels, average=average, cu_seqlens=cu)
    w = torch.linspace(-1, 2, want.numel())
    (want * w).sum().backward()
    lz, ly, lcu = local
    lz = lz.clone().requires_grad_()
    got = dpo_kernels.sequence_logps(lz, ly, average=average, cu_seqlens=lcu, process_group=tp, cp_group=cp,
                                     vocab_range=vocab_range)
    (got * w).sum().backward()
    close(f"{tag} logps", got.detach(), want.detach())
    close(f"{tag} logps grad", lz.grad, rows(z.grad)[..., cols])


def expect_error(tag, fn, needle):
    try:
        fn()
    except ValueError as e:
        assert needle in str(e), f"{tag}: message {e!s} lacks {needle!r}"
        return
    raise AssertionError(f"{tag}: no ValueError")


def groups(rank: int, world: int, init_file: str):
    """Joins the gloo group of `world` (4) ranks and creates the scenarios' groups:
    (g2, r2): {0, 1} or {2, 3} and the rank in it; (gx, rx): {0, 2} or {1, 3} and the rank
    in it; three: {0, 1, 2}."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    # Every rank creates every group, in the same order (torch.distributed's rule).
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    across = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    three = dist.new_group([0, 1, 2])
    return pairs[rank // 2], rank % 2, across[rank % 2], rank // 2, three


def same(g):
    return g


def run(rank: int, world: int, init_file: str) -> None:
    g2, r2, gx, rx, three = groups(rank, world, init_file)

    # Vocabulary shards, Megatron's even split over 2 ranks (V = 1000), padded and packed.
    V = 1000
    logits, labels, ref_c, ref_r = batch(V, 1)
    cols = slice(r2 * V // 2, (r2 + 1) * V // 2)
    for cfg in CONFIGS:
        check_dpo("tp2", cfg, (logits, labels, ref_c, ref_r, None), (logits[..., cols], labels, None), cols, same,
                  tp=g2)
    pz, py, pcu = packed(logits, labels)
    for cfg in CONFIGS[:4]:
        check_dpo("tp2 packed", cfg, (pz, py, ref_c, ref_r, pcu), (pz[..., cols], py, pcu), cols, same, tp=g2)
    check_logps("tp2", (logits, labels, None), (logits[..., cols], labels, None), cols, same, tp=g2)
    check_logps("tp2 packed avg", (pz, py, pcu), (pz[..., cols], py, pcu), cols, same, tp=g2, average=True)

    # Uneven shards over 3 ranks via vocab_range (V = 1001); rank 3 sits this one out.
    if rank < 3:
        V = 1001
        logits, labels, ref_c, ref_r = batch(V, 2)
        bounds = [0, 200, 650, V]
        cols = slice(bounds[rank], bounds[rank + 1])
        vr = (bounds[rank], bounds[rank + 1])
        for cfg in CONFIGS:
            check_dpo("tp3 uneven", cfg, (logits, labels, ref_c, ref_r, None), (logits[..., cols], labels, None),
                      cols, same, tp=three, vocab_range=vr)
        check_logps("tp3 uneven", (logits, labels, None), (logits[..., cols], labels, None), cols, same, tp=three,
                    vocab_range=vr)
        # float64 logits
        ld, yd, cd, rd = batch(V, 3, torch.float64)
        check_dpo("tp3 fp64", CONFIGS[0], (ld, yd, cd, rd, None), (ld[..., cols], yd, None), cols, same, tp=three,
                  vocab_range=vr)
        # Bad input raises on every rank, no hang: a label past the global vocabulary ...
        bad = labels.clone()
        bad[0, 3] = V
        expect_error("label", lambda: dpo_kernels.dpo_loss_from_logits(
            logits[..., cols], bad, ref_c, ref_r, process_group=three, vocab_range=vr), "outside [0, vocab = 1001)")
        # ... ranges that overlap ...
        wrong = [(0, 200), (150, 600), (600, 1001)][rank]
        expect_error("vocab_range", lambda: dpo_kernels.dpo_loss_from_logits(
            logits[..., wrong[0]:wrong[1]], labels, ref_c, ref_r, process_group=three, vocab_range=wrong),
            "do not tile")
        # ... and a range whose width is not the logits'.
        short = (bounds[rank], bounds[rank + 1] - (rank == 1))
        expect_error("width", lambda: dpo_kernels.dpo_loss_from_logits(
            logits[..., cols], labels, ref_c, ref_r, process_group=three, vocab_range=short), "holds")
        # ... and ranks that disagree on the batch's rows.
        n = 2 * P - (2 if rank == 2 else 0)
        expect_error("rows", lambda: dpo_kernels.sequence_logps(
            logits[:n, :, cols], labels[:n], process_group=three, vocab_range=vr), "disagree on the logits' rows")

    # Context parallelism over 2 ranks: rank k holds rows [k T/2, (k+1) T/2) of every sequence.
    V = 300
    logits, labels, ref_c, ref_r = batch(V, 4)
    t0, t1 = rx * T // 2, (rx + 1) * T // 2
    rows = lambda g: g[:, t0:t1]  # noqa: E731
    full_cols = slice(0, V)
    for cfg in CONFIGS[:7]:  # LD-DPO needs whole sequences
        check_dpo("cp2", cfg, (logits, labels, ref_c, ref_r, None),
                  (logits[:, t0:t1].contiguous(), labels[:, t0:t1].contiguous(), None), full_cols, rows, cp=gx)
    check_logps("cp2 avg", (logits, labels, None), (logits[:, t0:t1].contiguous(), labels[:, t0:t1].contiguous(), None),
                full_cols, rows, cp=gx, average=True)
    expect_error("cp ld_alpha", lambda: dpo_kernels.dpo_loss_from_logits(
        logits[:, t0:t1], labels[:, t0:t1], ref_c, ref_r, cp_group=gx, ld_alpha=0.5), "ld_alpha")
    # A bad label in one context rank's slice only: that rank names it, its peer raises too
    # (no rank waits in the context all-reduce).
    bad = labels[:, t0:t1].clone()
    if rx == 1:
        bad[1, 0] = V + 5
    for fn in (lambda: dpo_kernels.dpo_loss_from_logits(logits[:, t0:t1], bad, ref_c, ref_r, cp_group=gx),
               lambda: dpo_kernels.sequence_logps(logits[:, t0:t1], bad, cp_group=gx)):
        expect_error("cp label", fn, "outside [0, vocab = 300)" if rx == 1 else "rank(s) of cp_group rejected")

    # A context rank holding no row (context rank 1: padded [2P, 0, V], packed with every
    # slice empty): its buffers are empty tensors (null data pointers); the result and rank
    # 0's gradient are the single-process op's, rank 1's gradient is empty.
    e0, e1 = (0, T) if rx == 0 else (T, T)
    erows = lambda g: g[:, e0:e1]  # noqa: E731
    elocal = (logits[:, e0:e1].contiguous(), labels[:, e0:e1].contiguous(), None)
    for cfg in CONFIGS[:3] + [CONFIGS[6]]:
        check_dpo("cp2 empty rank", cfg, (logits, labels, ref_c, ref_r, None), elocal, full_cols, erows, cp=gx)
    check_logps("cp2 empty rank", (logits, labels, None), elocal, full_cols, erows, cp=gx, average=True)
    pz, py, pcu = packed(logits, labels)
    eidx = torch.arange(int(pcu[-1])) if rx == 0 else torch.zeros(0, dtype=torch.long)
    ecu = pcu if rx == 0 else torch.zeros_like(pcu)
    for cfg in CONFIGS[:2]:
        check_dpo("cp2 packed empty rank", cfg, (pz, py, ref_c, ref_r, pcu), (pz[eidx], py[eidx], ecu), full_cols,
                  lambda g: g[eidx], cp=gx)
    check_logps("cp2 packed empty rank", (pz, py, pcu), (pz[eidx], py[eidx], ecu), full_cols, lambda g: g[eidx],
                cp=gx)

    # Vocabulary x context: 2 x 2 (vocabulary group {0,1}/{2,3}, context group {0,2}/{1,3}).
    cols = slice(r2 * V // 2, (r2 + 1) * V // 2)
    for cfg in (CONFIGS[0], CONFIGS[2], CONFIGS[6]):
        check_dpo("tp2 x cp2", cfg, (logits, labels, ref_c, ref_r, None),
                  (logits[:, t0:t1, cols].contiguous(), labels[:, t0:t1].contiguous(), None), cols, rows, tp=g2,
                  cp=gx)
    check_dpo("tp2 x cp2 empty rank", CONFIGS[0], (logits, labels, ref_c, ref_r, None),
              (logits[:, e0:e1, cols].contiguous(), labels[:, e0:e1].contiguous(), None), cols, erows, tp=g2, cp=gx)

    # Context parallelism of packed sequences over 3 ranks: each sequence's rows split in
    # three (some slices empty), each rank's slices packed back to back.
    if rank < 3:
        pz, py, pcu = packed(logits, labels)
        idx, lcu = [], [0]
        for s in range(2 * P):
            a, b = int(pcu[s]), int(pcu[s + 1])
            n = b - a
            lo, hi = a + n * rank // 3, a + n * (rank + 1) // 3
            idx.extend(range(lo, hi))
            lcu.append(lcu[-1] + hi - lo)
        idx_t = torch.tensor(idx, dtype=torch.long)
        rows3 = lambda g: g[idx_t]  # noqa: E731
        for cfg in CONFIGS[:4]:
            check_dpo("cp3 packed", cfg, (pz, py, ref_c, ref_r, pcu), (pz[idx_t], py[idx_t], torch.tensor(lcu)),
                      full_cols, rows3, cp=three)
    leave()
