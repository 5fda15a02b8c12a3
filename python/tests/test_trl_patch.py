# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""dpo_kernels.trl.patch_chunked_logprobs: TRL's own DPOTrainer, trained for several steps on a
tiny random Llama built in code (CPU, fp32), gives the same losses, logged metrics and
parameters with TRL's chunked head replaced by dk.linear_logprobs as without, to 1e-5."""
import copy
import tempfile
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")

import dpo_kernels.trl as dkt  # noqa: E402
import trl_harness  # noqa: E402

RTOL = 1e-5
STEPS = 4


def make_models(seed=0):
    model, ref = trl_harness.make_models(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # A random (not identity) head, trained too, so its gradient is compared.
        w = torch.randn(model.lm_head.weight.shape, generator=g) * 0.3
        model.lm_head.weight.copy_(w)
        ref.lm_head.weight.copy_(w + 0.01 * torch.randn(w.shape, generator=g))
    return model, ref


def train(patched: bool, bf16: bool = False, **dpo_args):
    from trl import DPOConfig, DPOTrainer

    model, ref = make_models()
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPOConfig(
            output_dir=out, per_device_train_batch_size=4, max_steps=STEPS, learning_rate=0.05, report_to=[],
            # Plain SGD: a parameter moves by lr x its gradient, so the comparison of the
            # parameters is one of the gradients. Adam's g / (sqrt(v) + eps) turns the fp32
            # rounding of gradient elements that are ~0 (noise either way) into steps of ~lr.
            optim="sgd",
            use_cpu=True, bf16=bf16, fp16=False, logging_steps=1, save_strategy="no", seed=7,
            lr_scheduler_type="constant", **dpo_args,
        )
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=trl_harness.make_dataset(12),
                             processing_class=trl_harness.make_tokenizer())
        if patched:
            calls = []
            inner = dkt.linear_logprobs

            def counting(*a, **k):
                calls.append(a[0].shape)
                return inner(*a, **k)

            dkt.linear_logprobs = counting
            try:
                with dkt.patch_chunked_logprobs():
                    assert dkt.is_patched()
                    trainer.train()
            finally:
                dkt.linear_logprobs = inner
            assert not dkt.is_patched()
            # Policy and reference heads, every step: the trainer really ran ours.
            assert len(calls) >= 2 * STEPS
        else:
            trainer.train()
    logs = [{k: v for k, v in e.items() if isinstance(v, (int, float))} for e in trainer.state.log_history]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return logs, params


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-6)


@pytest.mark.parametrize("case", [dict(), dict(use_weighting=True), dict(loss_type=["ipo"], ld_alpha=0.5)],
                         ids=["sigmoid", "sigmoid+WPO", "ipo+ld_alpha"])
def test_dpo_trainer_parity(case):
    base_logs, base_params = train(False, **case)
    logs, params = train(True, **case)
    assert len(logs) == len(base_logs) >= STEPS
    checked = 0
    for step, (a, e) in enumerate(zip(logs, base_logs)):
        assert a.keys() == e.keys(), step
        for k in e:
            if k in ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos") or \
                    "time" in k:
                continue
            assert _rel(a[k], e[k]) <= RTOL, f"step {step} {k}: {a[k]} vs {e[k]}"
            checked += 1
    assert checked > 10 * STEPS
    moved = 0.0
    for n, p in base_params.items():
        q = params[n]
        scale = max(p.abs().max().item(), 1e-6)
        assert (q - p).abs().max().item() <= RTOL * scale, n
    if case.get("use_weighting"):
        return  # WPO's weights (products of per-token probabilities) are ~e-70 on a random model: no step
    # The steps really changed the parameters (the comparison is not of the initial values).
    init, _ = make_models()
    for n, p in init.named_parameters():
        moved = max(moved, (base_params[n] - p).abs().max().item())
    assert moved > 1e-3


def test_patch_and_undo():
    import trl.trainer.utils as tu
    from trl.kernels import ChunkedLogProbFunction as original

    assert tu._ChunkedLogProbFunction is original
    handle = dkt.patch_chunked_logprobs()
    assert tu._ChunkedLogProbFunction is dkt.ChunkedLogProbFunction
    dkt.patch_chunked_logprobs()  # idempotent
    handle.undo()
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
    base_logs, _ = train(False, bf16=True)
    logs, _ = train(True, bf16=True)
    steps = 0
    for step, (a, e) in enumerate(zip(logs, base_logs)):
        if "loss" in e:
            steps += 1
            assert _rel(a["loss"], e["loss"]) <= 5e-2, (step, a["loss"], e["loss"])
            for k in ("logps/chosen", "logps/rejected"):
                assert _rel(a[k], e[k]) <= 2e-3, (step, k, a[k], e[k])
    assert steps == STEPS
