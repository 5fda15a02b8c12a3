# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""The vocabulary- and context-parallel ops under torch.compile(fullgraph=True): opcheck of
the fake kernels of every sharded op (dpo_kernels/_shard_ops.py) against their CPU kernels,
and two gloo CPU ranks comparing compiled and eager calls (dist_compile_worker.py)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_compile_worker
from dpo_kernels._ops import CONFIG_FIELDS, ops
from test_ops import make

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo")

#: The unsharded vocabulary of the opcheck inputs (each op called as a one-rank "shard").
V = 11
CONFIG = tuple(d for _, _, d in CONFIG_FIELDS)
# opcheck's checks: schema, fake kernel against the CPU kernel (shapes, dtypes, strides,
# devices), and AOT dispatch with dynamic shapes. The ops have no autograd formula of their
# own (distributed.py's autograd.Functions call them), so no input requires grad.
CHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck(op, args, checks=CHECKS):
    torch.library.opcheck(op.default, args, test_utils=checks)


@pytest.mark.parametrize("layout", ["strided", "contiguous", "packed"])
def test_opcheck_logits_shard_ops(layout):
    """shard_partials / _rebase / _sequence_partials / _pair_stage / _backward; a strided
    padded view has more view rows than tokens (the records and the gradient say so)."""
    logits, labels, rc, rr = make(dtype=torch.float32, gap=layout == "strided")
    cu = None
    if layout == "packed":
        logits, labels = logits.reshape(-1, V).contiguous(), labels.reshape(-1)
        cu = torch.arange(0, logits.shape[0] + 1, logits.shape[0] // 6)
    row_max, records = ops.shard_partials(logits, labels, cu, -100, 0, V, True)
    opcheck(ops.shard_partials, (logits, labels, cu, -100, 0, V, True))
    # AOT dispatch copies a strided input contiguous, which has fewer view rows than the
    # records of the strided view: the ops reading records get the other two checks there.
    rows_checks = CHECKS[:2] if layout == "strided" else CHECKS
    opcheck(ops.shard_rebase, (row_max, records))
    records = ops.shard_rebase(row_max, records)
    for paired in (False, True):
        opcheck(ops.shard_sequence_partials, (logits, labels, cu, row_max, records, -100, 0, V, 1.0, paired, True),
                rows_checks)
    seq = ops.shard_sequence_partials(logits, labels, cu, row_max, records, -100, 0, V, 1.0, True, True)
    opcheck(ops.shard_pair_stage, (seq, rc, rr) + CONFIG + (True,))
    _, _, _, seq_grad, nll = ops.shard_pair_stage(seq, rc, rr, *CONFIG, True)
    opcheck(ops.shard_backward, (seq_grad, nll, logits, labels, cu, row_max, records, -100, 0, V, 1.0, True),
            rows_checks)


def _head(dtype=torch.float32, H=5):
    logits, labels, rc, rr = make(dtype=dtype)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(*labels.shape, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype)
    bias = torch.randn(V, generator=g, dtype=dtype)
    return hidden, weight, bias, labels, rc, rr


@pytest.mark.parametrize("flags", [(True, True, True, True), (False, False, False, False)])
def test_opcheck_head_shard_ops(flags):
    """linear_shard_partials / _values / _backward (per-token) on [N, H] rows."""
    hidden, weight, bias, labels, _, _ = _head()
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).clamp_min(0)
    common = (1.0, None, 1.0, -100, 0, V)
    opcheck(ops.linear_shard_partials, (h, weight, bias, y) + common + (any(flags), 1 << 20))
    row_max, records = ops.linear_shard_partials(h, weight, bias, y, *common, any(flags), 1 << 20)
    opcheck(ops.linear_shard_values, (row_max, records, y, -100, V) + flags)
    _, ent, *_ = ops.linear_shard_values(row_max, records, y, -100, V, *flags)
    g = torch.linspace(-1, 1, y.shape[0])
    for need in ((True, True, True), (False, True, False)):
        ge, e = (g, ent) if flags[0] else (None, None)
        opcheck(ops.linear_shard_backward,
                (g, ge, h, weight, bias, y, row_max, records, e) + common + need + (1 << 20,))


@pytest.mark.parametrize("packed", [False, True])
def test_opcheck_head_dpo_shard_ops(packed):
    """linear_dpo_shard_partials / _sequences / _backward on [2P, T, H] or packed rows."""
    hidden, weight, bias, labels, rc, rr = _head()
    cu = None
    if packed:
        hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        cu = torch.arange(0, hidden.shape[0] + 1, hidden.shape[0] // 6)
    common = (1.0, None, 1.0, -100, 0, V)
    opcheck(ops.linear_dpo_shard_partials, (hidden, weight, bias, labels, cu) + common + (True, 1 << 20))
    row_max, records = ops.linear_dpo_shard_partials(hidden, weight, bias, labels, cu, *common, True, 1 << 20)
    opcheck(ops.linear_dpo_shard_sequences, (hidden, labels, cu, row_max, records, -100, 0, V, V, 1.0, True))
    seq = ops.linear_dpo_shard_sequences(hidden, labels, cu, row_max, records, -100, 0, V, V, 1.0, True)
    _, _, _, seq_grad, nll = ops.shard_pair_stage(seq, rc, rr, *CONFIG, True)
    for need in ((True, True, True), (True, False, False)):
        opcheck(ops.linear_dpo_shard_backward, (seq_grad, nll, hidden, weight, bias, labels, cu, row_max, records)
                + common + (1.0,) + need + (1 << 20,))


@needs_gloo
def test_compiled_sharded_ops_match_eager(tmp_path):
    """aot_eager, fullgraph: dpo_loss_from_logits with process_group (even, and uneven via a
    vocab_range an eager call checked), with cp_group; sequence_logps with each;
    dpo_loss_from_hidden with process_group (reference log-probs, or ref_hidden on a reference
    head shard) and with cp_group; linear_logprobs with
    process_group: loss, metrics, pair values and gradients as eager's within 1e-6."""
    mp.spawn(dist_compile_worker.run, args=(2, os.path.join(tmp_path, "init")), nprocs=2, join=True)


@needs_gloo
def test_compiled_sharded_logits_with_inductor(tmp_path):
    """The default backend (inductor: C++ code generation, about 30 s on two cores)."""
    mp.spawn(dist_compile_worker.inductor, args=(2, os.path.join(tmp_path, "init")), nprocs=2, join=True)
