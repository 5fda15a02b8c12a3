# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""The fused head's GEMM variants (csrc/gemm_isa.h): each instruction-set level this CPU
supports, run directly through the private op _cpu_gemm, against a float64 GEMM; and the
fused head forced to each level by DPO_CPU_ISA (in a fresh process: the level is read once)
against the float64 reference of test_linear.py."""
import os
import subprocess
import sys

import pytest
import torch

import dpo_kernels  # noqa: F401  (loads the extension's ops)

OPS = torch.ops.dpo_kernels


def levels():
    return list(OPS._cpu_gemm_levels())


def test_levels_start_with_baseline():
    got = levels()
    assert got[0] == "baseline"
    assert set(got) <= {"baseline", "avx2", "avx512"}


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_each_level_against_float64(dtype, rtol, transpose_a, transpose_b):
    g = torch.Generator().manual_seed(3)
    m, n, k = 67, 45, 515  # past Eigen's blocking in every dimension's direction
    a = torch.randn(*((k, m) if transpose_a else (m, k)), generator=g, dtype=torch.float64)
    b = torch.randn(*((n, k) if transpose_b else (k, n)), generator=g, dtype=torch.float64)
    c = torch.randn(m, n, generator=g, dtype=torch.float64)
    opa = a.T if transpose_a else a
    opb = b.T if transpose_b else b
    for alpha, beta in [(1.0, 0.0), (1.0, 1.0), (-0.5, 0.25)]:
        cin = c.to(dtype)
        if beta == 0.0:
            cin = torch.full_like(cin, float("nan"))  # beta = 0: C is never read
        want = alpha * (opa.to(dtype).double() @ opb.to(dtype).double()) + (beta * cin.double() if beta else 0.0)
        for level in levels():
            got = OPS._cpu_gemm(a.to(dtype), b.to(dtype), cin, transpose_a, transpose_b, alpha, beta, level)
            assert got.dtype == dtype and got.shape == (m, n)
            err = (got.double() - want).abs().max().item()
            tol = rtol * want.abs().max().item()
            assert err <= tol, f"{level}, alpha {alpha}, beta {beta}: max error {err} > {tol}"


def test_bad_level_and_shapes():
    a = torch.ones(3, 4)
    with pytest.raises(ValueError, match="level"):
        OPS._cpu_gemm(a, a.T.contiguous(), torch.zeros(3, 3), False, False, 1.0, 0.0, "sse9")
    with pytest.raises(ValueError, match="shapes"):
        OPS._cpu_gemm(a, a, torch.zeros(3, 3), False, False, 1.0, 0.0, "baseline")


@pytest.mark.parametrize("level", ["baseline", "avx2", "avx512"])
def test_fused_head_at_each_level(level):
    """test_linear.py's float64-reference and repeatability tests, unchanged, with the row
    kernels and the GEMM forced to `level`."""
    if level not in levels():
        pytest.skip(f"{level}: not supported by this CPU")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, DPO_CPU_ISA=level)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           os.path.join(here, "test_linear.py") + "::test_against_float64_reference",
           os.path.join(here, "test_linear.py") + "::test_repeated_calls_are_bitwise_identical"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        # The failure stands; a second run only says whether it repeats (a wrong result) or
        # not (a result that changed from one process to the next: a race, or the machine).
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        repeat = "failed again" if again.returncode != 0 else "PASSED (the first run's failure did not repeat)"
        assert run.returncode == 0, (f"DPO_CPU_ISA={level}:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}\n"
                                     f"the same command run once more: {repeat}")


def test_invalid_cpu_isa_is_a_value_error_naming_it():
    """A bad DPO_CPU_ISA is the row kernels' ValueError (naming DPO_CPU_ISA) from every CPU op,
    the fused head's included, whose GEMM choice reads the level before any row kernel does.
    In a fresh process: the level is read once."""
    script = """
import torch
import dpo_kernels

g = torch.Generator().manual_seed(0)
hidden, weight = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g)
labels = torch.tensor([[0, 1], [2, 3]])
calls = {
    "sequence_logps": lambda: dpo_kernels.sequence_logps(torch.randn(2, 2, 5, generator=g), labels),
    "linear_logprobs": lambda: dpo_kernels.linear_logprobs(hidden, weight, None, labels.reshape(-1)),
    "dpo_loss_from_hidden": lambda: dpo_kernels.dpo_loss_from_hidden(
        hidden.reshape(2, 2, 3), weight, labels, torch.zeros(1), torch.zeros(1)),
}
for name, call in calls.items():
    try:
        call()
    except ValueError as e:
        assert "DPO_CPU_ISA=sse9 is invalid" in str(e), (name, str(e))
        print(name, "ValueError")
    else:
        raise AssertionError(name + ": no error")
"""
    env = dict(os.environ, DPO_CPU_ISA="sse9")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    assert run.stdout.split() == ["sequence_logps", "ValueError", "linear_logprobs", "ValueError",
                                  "dpo_loss_from_hidden", "ValueError"]
