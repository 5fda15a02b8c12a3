# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""What the Python package reads from the extension instead of keeping its own copy: the
version (include/dpo/version.hpp), the config fields (DPO_CONFIG_FIELDS in csrc/common.h) and
the rule for the rows per sequence of padded logits (view_seq_len in csrc/common.h)."""
import inspect
import re
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing
from torch._subclasses.fake_tensor import FakeTensorMode

import dpo_kernels as dk
from dpo_kernels import _C, _NONE_MEANS_DEFAULT
from dpo_kernels._ops import CONFIG_FIELDS, CONFIG_NAMES, ops

REPO = Path(__file__).resolve().parents[2]


def test_version_is_the_header_version():
    text = (REPO / "include" / "dpo" / "version.hpp").read_text()
    parts = [re.search(rf"#define DPO_VERSION_{p} (\d+)", text).group(1) for p in ("MAJOR", "MINOR", "PATCH")]
    assert dk.__version__ == _C.__version__ == ".".join(parts)


# ---- config fields -----------------------------------------------------------------------------

_SCHEMA_TYPE = {"str": "str", "float": "float", "bool": "bool", "float[]": "List[float]"}


@pytest.mark.parametrize("op", [ops.pair_loss, ops.pair_loss_backward, ops.dpo_forward], ids=str)
def test_op_schemas_hold_the_config_fields(op):
    args = op.default._schema.arguments
    names = [a.name for a in args]
    start = names.index(CONFIG_NAMES[0])
    config = args[start:start + len(CONFIG_FIELDS)]
    assert [(a.name, str(a.type)) for a in config] == [(n, _SCHEMA_TYPE[t]) for n, t, _ in CONFIG_FIELDS]


def test_config_defaults_are_valid():
    defaults = {name: default for name, _, default in CONFIG_FIELDS}
    _C.check_config(*defaults.values())
    assert defaults["loss_type"] == "sigmoid" and defaults["loss_weights"] == [] and defaults["beta"] == 0.1


@pytest.mark.parametrize("fn", [dk.dpo_loss, dk.dpo_loss_from_logits], ids=lambda f: f.__name__)
def test_public_defaults_are_the_table_defaults(fn):
    """The public functions spell their defaults out (they are the documented API); they must
    be the table's, None standing for it where the argument is optional."""
    params = inspect.signature(fn).parameters
    checked = 0
    for name, _, default in CONFIG_FIELDS:
        if name not in params:
            continue
        checked += 1
        public = params[name].default
        assert public == default or (public is None and name in _NONE_MEANS_DEFAULT), name
    assert checked >= len(CONFIG_FIELDS) - 2


def test_missing_config_fields_take_the_table_defaults():
    """dpo_loss has no use_weighting / ld_alpha: the ops get the table's values."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(3, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    config = tuple(default for _, _, default in CONFIG_FIELDS)
    expected = ops.pair_loss(pc, pr, rc, rr, None, None, None, *config)
    for a, b in zip(dk.dpo_loss(pc, pr, rc, rr), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- rows per sequence of padded logits ---------------------------------------------------------

def _views(B, T, V):
    """Padded [B, T, V] logits with the strides the kernels meet, keyed by a name."""
    g = torch.Generator().manual_seed(B * 100 + T * 10 + V)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    yield "contiguous", r(B, T, V)
    yield "[:, :-1]", r(B, T + 1, V)[:, :-1]
    yield "[:, :-3]", r(B, T + 3, V)[:, :-3]
    yield "[:, 1:]", r(B, T + 1, V)[:, 1:]
    yield "vocab slice", r(B, T, V + 2)[:, :, :V]
    yield "vocab slice, [:, :-1]", r(B, T + 1, V + 2)[:, :-1, :V]
    yield "every other sequence", r(2 * B, T, V)[::2]
    yield "every other row", r(B, 2 * T, V)[:, ::2]
    yield "transposed", r(T, B, V).transpose(0, 1)
    yield "vocab-strided", r(B, V, T).transpose(1, 2)
    yield "expanded", r(1, T, V).expand(B, T, V)
    yield "expanded rows", r(B, 1, V).expand(B, T, V)


_SHAPES = [(B, T, V) for B in (1, 2, 3) for T in (1, 2, 5) for V in (1, 3, 7)]


@pytest.mark.parametrize("B,T,V", _SHAPES)
def test_view_seq_len_is_the_kernels_rule(B, T, V):
    """_C.view_seq_len (what the fake kernels use) against the real kernels' gradient strides,
    which come from make_layout, and the fake kernels' outputs against the real ones."""
    fake_mode = FakeTensorMode()
    for name, logits in _views(B, T, V):
        labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
        labels[:, 0] = -100
        k = _C.view_seq_len(logits.shape, logits.stride())
        assert T <= k, name
        _, lse = ops.sequence_logps(logits, labels, None, -100, False)
        grad = ops.sequence_logps_backward(torch.ones(B, dtype=torch.float64), logits, labels, None, lse, -100, False)
        assert grad.stride() == (k * V, V, 1), (name, logits.stride())
        with fake_mode:
            f = fake_mode.from_tensor(logits)
            fg = ops.sequence_logps_backward(torch.ones(B, dtype=torch.float64), f, fake_mode.from_tensor(labels),
                                             None, fake_mode.from_tensor(lse), -100, False)
        assert fg.stride() == grad.stride(), name
        if B % 2 == 0:  # dpo_backward's gradient has the same row indexing
            config = tuple(default for _, _, default in CONFIG_FIELDS)
            ref = torch.zeros(B // 2, dtype=torch.float64)
            out = ops.dpo_forward(logits, labels, None, ref, ref, None, -100, *config, True, False)
            g = torch.ones((), dtype=torch.float64)
            grad = ops.dpo_backward(g, logits, labels, None, out[3], out[4], -100)
            assert grad.stride() == (k * V, V, 1), (name, logits.stride())
            with fake_mode:
                fl = [fake_mode.from_tensor(t) for t in (g, logits, labels, out[3], out[4])]
                fg = ops.dpo_backward(fl[0], fl[1], fl[2], None, fl[3], fl[4], -100)
            assert fg.stride() == grad.stride(), name


def test_view_seq_len_of_a_gap():
    full = torch.empty(4, 9, 5)
    assert _C.view_seq_len(full[:, :-1].shape, full[:, :-1].stride()) == 9
    assert _C.view_seq_len(full.shape, full.stride()) == 9
    with pytest.raises(ValueError, match="padded logits"):
        _C.view_seq_len((4, 5), (5, 1))


def test_compile_dynamic_shapes_uses_the_rule_symbolically():
    """With dynamic shapes the fake kernels see SymInts: the extension's rule runs on them
    (its comparisons become guards), and a second shape reuses the graph."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def step(full, labels):
        return dk.sequence_logps(full[:, :-1], labels).sum()

    fn = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    for B, T, V in ((4, 6, 11), (6, 9, 13)):
        g = torch.Generator().manual_seed(B)
        full = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64)
        labels = torch.randint(0, V, (B, T), generator=g)
        labels[:, :2] = -100
        z1, z2 = full.clone().requires_grad_(), full.clone().requires_grad_()
        fn(z1, labels).backward()
        step(z2, labels).backward()
        torch.testing.assert_close(z1.grad, z2.grad)
    assert counter.frame_count == 1
