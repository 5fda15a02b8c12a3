# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""dpo_kernels.trl.patch_chunked_logprobs: TRL's own DPOTrainer, trained for several steps on a
tiny random Llama built in code (CPU, fp32), gives the same losses, logged metrics and
parameters with TRL's chunked head replaced by dk.linear_logprobs as without, to 1e-5."""
import pytest
import torch

trl = pytest.importorskip("trl")

import dpo_kernels.trl as dkt  # noqa: E402
import trl_harness  # noqa: E402
from trl_harness import STEPS  # noqa: E402


def train(patched: bool, bf16: bool = False, **dpo_args):
    """TRL's DPOTrainer for STEPS steps; with `patched`, under patch_chunked_logprobs, and
    checked to have run our head."""
    if not patched:
        return trl_harness.train(bf16=bf16, **dpo_args)
    calls = []
    inner = dkt.linear_logprobs

    def counting(*a, **k):
        calls.append(a[0].shape)
        return inner(*a, **k)

    def run(trainer):
        dkt.linear_logprobs = counting
        try:
            with dkt.patch_chunked_logprobs():
                assert dkt.is_patched()
                trainer.train()
        finally:
            dkt.linear_logprobs = inner
        assert not dkt.is_patched()

    result = trl_harness.train(bf16=bf16, run=run, **dpo_args)
    # Policy and reference heads, every step: the trainer really ran ours.
    assert len(calls) >= 2 * STEPS
    return result


@pytest.mark.parametrize("case", [dict(), dict(use_weighting=True), dict(loss_type=["ipo"], ld_alpha=0.5)],
                         ids=["sigmoid", "sigmoid+WPO", "ipo+ld_alpha"])
def test_dpo_trainer_parity(case):
    # WPO's weights (products of per-token probabilities) are ~e-70 on a random model: no step.
    trl_harness.assert_same_training(train(True, **case), train(False, **case), moved=not case.get("use_weighting"))


def test_patch_and_undo():
    import trl.trainer.utils as tu
    from trl.kernels import ChunkedLogProbFunction as original

    assert tu._ChunkedLogProbFunction is original
    handle = dkt.patch_chunked_logprobs()
    assert tu._ChunkedLogProbFunction is dkt.ChunkedLogProbFunction
    second = dkt.patch_chunked_logprobs()  # idempotent: patches nothing more, adds a handle
    handle.undo()
    assert tu._ChunkedLogProbFunction is dkt.ChunkedLogProbFunction  # the second handle holds it
    second.undo()
    assert tu._ChunkedLogProbFunction is original and not dkt.is_patched()
    dkt.unpatch_chunked_logprobs()  # no-op
    with dkt.patch_chunked_logprobs():
        import trl.kernels

        assert trl.kernels.ChunkedLogProbFunction is dkt.ChunkedLogProbFunction
    assert tu._ChunkedLogProbFunction is original


def test_adapter_takes_trl_arguments():
    h = torch.randn(7, 8, dtype=torch.float64)
    w = torch.randn(20, 8, dtype=torch.float64)
    y = torch.randint(0, 20, (7,))
    from trl.kernels import ChunkedLogProbFunction as original

    a = dkt.ChunkedLogProbFunction.apply(h, w, None, y, 0.8, 4096, 5.0, 1.2, ("log_probs", "is_top1"))
    e = original.apply(h, w, None, y, 0.8, 4096, 5.0, 1.2, ("log_probs", "is_top1"))
    assert a[1] is None and a[2] is None and a[3] is None
    assert torch.equal(a[4], e[4])
    torch.testing.assert_close(a[0].float(), e[0].float(), rtol=1e-6, atol=1e-6)


def test_dpo_trainer_bf16_autocast():
    """DPOConfig's default on CPU: bf16 autocast. The head then runs on bf16 inputs in both; TRL
    also rounds each logits tile to bf16 and ours keeps the products in fp32, and the whole
    model runs in bf16: a smoke test that the patched trainer trains in autocast and tracks
    TRL's, to bf16's rounding (each bf16 run is 1-2% off the fp32 one in loss over these
    4 steps, 5e-4 in the summed log-probs), not to 1e-5."""
    trl_harness.assert_tracks_in_bf16(train(True, bf16=True), train(False, bf16=True))


def test_nested_patches_keep_the_outer_one():
    import trl.trainer.utils as tu

    original = tu._ChunkedLogProbFunction
    with dkt.patch_chunked_logprobs():
        with dkt.patch_chunked_logprobs():
            assert dkt.is_patched()
        assert dkt.is_patched() and tu._ChunkedLogProbFunction is dkt.ChunkedLogProbFunction
    assert not dkt.is_patched() and tu._ChunkedLogProbFunction is original
    h1, h2 = dkt.patch_chunked_logprobs(), dkt.patch_chunked_logprobs()
    h2.undo()
    h2.undo()  # a handle undoes once
    assert dkt.is_patched()
    h1.undo()
    assert not dkt.is_patched()
    # unpatch_chunked_logprobs restores at once; older handles are then no-ops.
    h3 = dkt.patch_chunked_logprobs()
    dkt.unpatch_chunked_logprobs()
    h4 = dkt.patch_chunked_logprobs()
    h3.undo()
    assert dkt.is_patched()
    h4.undo()
    assert not dkt.is_patched() and tu._ChunkedLogProbFunction is original
