# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""The CUDA kernels of the sharded logits ops (csrc/cuda_shard.cu) against their CPU kernels
on the same inputs (shard_partials, shard_rebase, shard_sequence_partials paired and not,
shard_pair_stage, shard_backward; padded and packed; an interior uneven shard; several loss
families), that they never synchronize with the host, that device-data errors give NaN
instead of a read out of bounds (or raise with DPO_KERNELS_CHECK_DEVICE_ERRORS=1), and dpo_loss_from_logits / sequence_logps with a
world-size-1 process group on CUDA against the unsharded CUDA ops. The CPU kernels are checked
against the single-process ops by test_distributed.py. Skipped without a GPU and a CUDA build
of dpo_kernels."""
import os

import pytest
import torch
import torch.distributed as dist

import dist_worker
import dpo_kernels as dk
from dpo_kernels._ops import ops

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and dk.cuda_built()), reason="needs a GPU and a CUDA build of dpo_kernels"
)

#: Relative tolerance of CUDA against CPU on the same inputs (fp64 logits: the kernels differ
#: in summation order and exponential only).
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5}
#: Loss configurations: pairwise, a combination with an NLL term, an f-divergence, a batch
#: loss, reference-free, WPO and LD-DPO.
CONFIGS = dist_worker.CONFIGS + [dict(loss_type="hinge", f_divergence_type="js_divergence")]


def config_args(cfg):
    """The ops' config arguments (schema order) of a dpo_loss_from_logits keyword dict."""
    return dk._config(**cfg)


def close(got, want, rtol, what):
    assert got.device.type == "cuda", f"{what}: on {got.device}"
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.dtype}{tuple(got.shape)} vs " \
                                                                f"{want.dtype}{tuple(want.shape)}"
    got, want = got.detach().cpu().double(), want.detach().double()
    same_nonfinite = (got.isnan() == want.isnan()).all() and (got.isinf() == want.isinf()).all()
    assert same_nonfinite and (got[got.isinf()] == want[want.isinf()]).all(), f"{what}: non-finite values differ"
    fin = want.isfinite()
    err = (got[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
    tol = rtol * max(want[fin].abs().max().item() if fin.any() else 0.0, 1.0)
    assert err <= tol, f"{what}: max error {err} > {tol}"


def shard_case(layout, dtype, seed=0):
    """(logits shard, labels, cu_seqlens, start, vocab): columns [5, 5 + 23) of a global
    vocabulary of 40, padded [2P, T, 23] or packed [N, 23], labels global."""
    logits, labels, _, _ = dist_worker.batch(40, seed, dtype)
    cu = None
    if layout == "packed":
        logits, labels, cu = dist_worker.packed(logits, labels)
    return logits[..., 5:28].contiguous(), labels, cu, 5, 40


def both(fn, *tensors):
    """fn on the CPU tensors and on their CUDA copies: (cpu result, cuda result)."""
    dev = [None if t is None else t.cuda() for t in tensors]
    return fn(*tensors), fn(*dev)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("metrics", [True, False])
def test_row_and_sequence_ops_match_cpu(layout, dtype, metrics):
    z, y, cu, start, vocab = shard_case(layout, dtype)
    rtol = RTOL[dtype]
    (m_cpu, r_cpu), (m_gpu, r_gpu) = both(
        lambda z, y, cu: ops.shard_partials(z, y, cu, -100, start, vocab, metrics), z, y, cu)
    close(m_gpu, m_cpu, 0.0, "row_max")  # a max is exact
    close(r_gpu, r_cpu, rtol, "records")
    # The rebase to a larger "global" max, as after the MAX all-reduce of another shard's.
    glob = m_cpu + 0.5
    rb_cpu, rb_gpu = both(ops.shard_rebase, glob, r_cpu)
    close(rb_gpu, rb_cpu, 1e-13, "rebased records")
    for paired, ld_alpha in ((False, 1.0), (True, 1.0), (True, 0.4)):
        s_cpu, s_gpu = both(lambda z, y, cu, m, r: ops.shard_sequence_partials(
            z, y, cu, m, r, -100, start, vocab, ld_alpha, paired, metrics), z, y, cu, glob, rb_cpu)
        close(s_gpu, s_cpu, 1e-12, f"sequence sums (paired {paired}, ld_alpha {ld_alpha})")
        seqs = s_cpu.shape[1]
        g = torch.linspace(-1.5, 2.0, seqs, dtype=torch.float64)
        nll = torch.tensor(0.3 if paired else 0.0, dtype=torch.float64)
        b_cpu, b_gpu = both(lambda g, n, z, y, cu, m, r: ops.shard_backward(
            g, n, z, y, cu, m, r, -100, start, vocab, ld_alpha, paired), g, nll, z, y, cu, glob, rb_cpu)
        close(b_gpu, b_cpu, rtol, f"gradient (paired {paired}, ld_alpha {ld_alpha})")


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("metrics", [True, False])
def test_pair_stage_matches_cpu(cfg, metrics):
    z, y, ref_c, ref_r = dist_worker.batch(40, 3, torch.float64)
    ref_c, ref_r = ref_c.double(), ref_r.double()
    row_max, records = ops.shard_partials(z, y, None, -100, 0, 40, True)
    records = ops.shard_rebase(row_max, records)
    totals = ops.shard_sequence_partials(z, y, None, row_max, records, -100, 0, 40, cfg.get("ld_alpha", 1.0), True,
                                         True)
    args = config_args(cfg)
    want, got = both(lambda t, rc, rr: ops.shard_pair_stage(t, rc, rr, *args, metrics), totals, ref_c, ref_r)
    for name, g, w in zip(("loss", "metrics", "pair values", "seq_grad", "nll_token_grad"), got, want):
        close(g, w, 1e-12, name)


def test_ops_do_not_synchronize():
    """A whole sharded step of the ops (forward, pair stage, backward) under
    torch.cuda.set_sync_debug_mode("error"): any host synchronization raises."""
    z, y, cu, start, vocab = (t.cuda() if isinstance(t, torch.Tensor) else t
                              for t in shard_case("packed", torch.float32))
    ref = torch.full((3,), -20.0, dtype=torch.float64, device="cuda")
    args = config_args(dict(loss_type="sigmoid", ld_alpha=0.5))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m, r = ops.shard_partials(z, y, cu, -100, start, vocab, True)
        r = ops.shard_rebase(m, r)
        seq = ops.shard_sequence_partials(z, y, cu, m, r, -100, start, vocab, 0.5, True, True)
        _, _, _, seq_grad, nll = ops.shard_pair_stage(seq, ref, ref, *args, True)
        ops.shard_backward(seq_grad, nll, z, y, cu, m, r, -100, start, vocab, 0.5, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_device_data_errors_give_nan():
    """A completion label outside the global vocabulary, and a decreasing cu_seqlens: each op's
    device check (dpo::cuda::shard_check) gates its kernels, so the records and sums are NaN and
    the gradient zeros (no exception, no host sync, no read out of bounds), as the unsharded
    CUDA ops; a label of another rank's shard is valid."""
    z, y, cu, start, vocab = shard_case("packed", torch.float32)
    z, y, cu = z.cuda(), y.cuda(), cu.cuda()
    rows = (y != -100).nonzero().flatten()
    other = y.clone()
    other[int(rows[0])] = vocab - 1  # outside this shard [5, 28), inside the vocabulary
    m, rec = ops.shard_partials(z, other, cu, -100, start, vocab, True)
    assert not rec.isnan().any()
    bad_y = y.clone()
    bad_y[int(rows[1])] = vocab + 3
    for labels, offsets in ((bad_y, cu), (y, torch.cat([cu[:2], cu[1:2] - 1, cu[3:]]))):
        m, rec = ops.shard_partials(z, labels, offsets, -100, start, vocab, True)
        assert rec.isnan().all()
        good_m, good_rec = ops.shard_partials(z, y, cu, -100, start, vocab, True)
        for paired in (True, False):
            seq = ops.shard_sequence_partials(z, labels, offsets, good_m, good_rec, -100, start, vocab, 1.0, paired,
                                              True)
            assert seq.isnan().all()
            g = ops.shard_backward(torch.ones(seq.shape[1], dtype=torch.float64, device="cuda"),
                                   torch.zeros((), dtype=torch.float64, device="cuda"), z, labels, offsets, good_m,
                                   good_rec, -100, start, vocab, 1.0, paired)
            assert not g.any()
    torch.cuda.synchronize()


def test_device_data_errors_raise_with_opt_in_check():
    """DPO_KERNELS_CHECK_DEVICE_ERRORS=1: the sharded ops raise the ValueError that names the
    bad label (with the global vocabulary) or cu_seqlens entry."""
    from test_cuda import value_errors_with_device_checks
    setup = ("import torch, dpo_kernels\n"
             "from dpo_kernels._ops import ops\n"
             "z = torch.randn(6, 7, device='cuda'); y = torch.tensor([-100, 3, 39, -100, 40, 2], device='cuda')\n"
             "cu = torch.tensor([0, 3, 6], device='cuda')\n"
             "m, r = ops.shard_partials(z, y.clamp(max=39), cu, -100, 5, 40, True)\n")
    msgs = value_errors_with_device_checks(setup, [
        "ops.shard_partials(z, y, cu, -100, 5, 40, True)",
        "ops.shard_sequence_partials(z, y, cu, m, r, -100, 5, 40, 1.0, True, True)",
        "ops.shard_partials(z, y.clamp(max=39), torch.tensor([0, 4, 3], device='cuda'), -100, 5, 40, True)",
        "ops.shard_partials(z, y.clamp(max=39), cu, -100, 5, 40, True)",
    ])
    assert msgs[0] is not None and "labels[4] = 40 is outside [0, vocab = 40)" in msgs[0], msgs[0]
    assert msgs[1] is not None and "rejected.labels[4] = 40" in msgs[1], msgs[1]
    assert msgs[2] is not None and "cu_seqlens[2] = 3 < cu_seqlens[1] = 4" in msgs[2], msgs[2]
    assert msgs[3] is None


def test_argument_errors_name_the_argument():
    z, y, cu, start, vocab = shard_case("padded", torch.float32)
    z, y = z.cuda(), y.cuda()
    m, r = ops.shard_partials(z, y, None, -100, start, vocab, True)
    with pytest.raises(ValueError, match="row_max"):
        ops.shard_sequence_partials(z, y, None, m[:-1], r, -100, start, vocab, 1.0, True, True)
    with pytest.raises(ValueError, match="ld_alpha"):
        ops.shard_sequence_partials(z, y, None, m, r, -100, start, vocab, 1.5, True, True)
    with pytest.raises(ValueError, match="records"):
        ops.shard_sequence_partials(z, y, None, m, r.cpu(), -100, start, vocab, 1.0, True, True)
    with pytest.raises(ValueError, match="seq_totals"):
        ops.shard_pair_stage(torch.zeros(7, 3, dtype=torch.float64, device="cuda"), None, None,
                             *config_args(dict(loss_type="sigmoid", reference_free=True)), True)
    with pytest.raises(ValueError, match="reference_chosen_logps"):
        ops.shard_pair_stage(torch.zeros(7, 6, dtype=torch.float64, device="cuda"), None, None,
                             *config_args(dict(loss_type="sigmoid")), True)
    with pytest.raises(ValueError, match="seq_grad"):
        ops.shard_backward(torch.zeros(2, dtype=torch.float64, device="cuda"), torch.zeros((), device="cuda"), z, y,
                           None, m, r, -100, start, vocab, 1.0, True)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """A world-size-1 process group (NCCL, or gloo where NCCL is unavailable)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is unavailable")
    backend = "nccl" if dist.is_nccl_available() else "gloo"
    created = not dist.is_initialized()
    if created:
        init = os.path.join(tmp_path_factory.mktemp("dist"), "init")
        dist.init_process_group(backend, init_method=f"file://{init}", rank=0, world_size=1,
                                device_id=torch.device("cuda", torch.cuda.current_device())
                                if backend == "nccl" else None)
    yield dist.new_group([0], backend=backend)
    if created:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_world_size_one_matches_unsharded(group, cfg, layout):
    """dpo_loss_from_logits(process_group=, cp_group=) on CUDA with one rank against the
    unsharded CUDA op: loss, metrics, pair values and the logits gradient."""
    logits, labels, ref_c, ref_r = (t.cuda() for t in dist_worker.batch(40, 7))
    cu = None
    if layout == "packed":
        logits, labels, cu = (t.cuda() for t in dist_worker.packed(logits.cpu(), labels.cpu()))
    cp = None if cfg.get("ld_alpha", 1.0) != 1.0 else group
    # One rank holds every column and row: its "shard" is the whole batch.
    dist_worker.check_dpo(f"world size 1, {layout}", cfg, (logits, labels, ref_c, ref_r, cu), (logits, labels, cu),
                          slice(None), lambda g: g, tp=group, cp=cp)
    # sequence_logps over the same groups, and its gradient.
    z, lz = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    w = torch.linspace(-1, 2, 2 * dist_worker.P, device="cuda")
    want = dk.sequence_logps(z, labels, cu_seqlens=cu, average=True)
    got = dk.sequence_logps(lz, labels, cu_seqlens=cu, average=True, process_group=group, cp_group=group)
    (want * w).sum().backward()
    (got * w).sum().backward()
    assert got.device.type == "cuda"
    dist_worker.close("sequence_logps", got.detach(), want.detach())
    dist_worker.close("sequence_logps grad", lz.grad, z.grad)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_world_size_one_matches_eager(group, backend):
    """torch.compile(fullgraph=True) of the sharded ops on CUDA, the all-reduces functional
    collectives of the world-size-1 group (NCCL) in the graph: dpo_loss_from_logits with
    process_group (sigmoid + sft, WPO) and with cp_group, sequence_logps, dpo_loss_from_hidden
    and linear_logprobs: loss, metrics, pair values and gradients as eager's within 1e-6
    (the CPU's two-rank version: test_distributed_compile.py)."""
    import dist_compile_worker

    dist_compile_worker.world_one(group, "cuda", backend)
