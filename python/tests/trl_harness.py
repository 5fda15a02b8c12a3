# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""Runs TRL's own DPOTrainer loss on a tiny in-memory model and captures what it scored.

TRL 1.x never materialises the logits: its fused LM head multiplies the backbone's last
hidden states by lm_head.weight in chunks. The harness makes the logits observable exactly
by giving the model hidden_size == vocab_size and an identity LM head, so the logits TRL
scores ARE the backbone's last hidden states (h @ I^T = h exactly), and TRL's gradient with
respect to the logits IS the gradient of those hidden states (captured with retain_grad).
Nothing is downloaded: the tokenizer, model and dataset are built in code.
"""
from __future__ import annotations

import contextlib
import copy
import tempfile
import warnings

import torch

VOCAB_WORDS = 56  # + 3 special tokens, padded to VOCAB below
VOCAB = 64


#: DPOConfig fields of the cases the TRL comparisons run: every loss type TRL 1.16 has, the
#: f-divergences, loss_weights combinations, WPO and LD-DPO.
CASES = {
    "sigmoid": dict(loss_type=["sigmoid"]),
    "hinge": dict(loss_type=["hinge"]),
    "ipo": dict(loss_type=["ipo"]),
    "exo_pair": dict(loss_type=["exo_pair"], label_smoothing=1e-3),
    "nca_pair": dict(loss_type=["nca_pair"]),
    "robust": dict(loss_type=["robust"], label_smoothing=0.1),
    "bco_pair": dict(loss_type=["bco_pair"]),
    "sppo_hard": dict(loss_type=["sppo_hard"]),
    "aot": dict(loss_type=["aot"], label_smoothing=0.1),
    "aot_unpaired": dict(loss_type=["aot_unpaired"], label_smoothing=0.1),
    "apo_zero": dict(loss_type=["apo_zero"]),
    "apo_down": dict(loss_type=["apo_down"]),
    "discopop": dict(loss_type=["discopop"], beta=0.5),
    "sft": dict(loss_type=["sft"]),
    "sigmoid_norm": dict(loss_type=["sigmoid_norm"], beta=2.0),
    "sigmoid/forward_kl": dict(loss_type=["sigmoid"], f_divergence_type="forward_kl"),
    "sigmoid/js_divergence": dict(loss_type=["sigmoid"], f_divergence_type="js_divergence"),
    "sigmoid/alpha_divergence": dict(loss_type=["sigmoid"], f_divergence_type="alpha_divergence"),
    "ipo/alpha_divergence(0.3)": dict(
        loss_type=["ipo"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3
    ),
    "sigmoid_norm/forward_kl": dict(loss_type=["sigmoid_norm"], f_divergence_type="forward_kl", beta=2.0),
    "hinge/js_divergence": dict(loss_type=["hinge"], f_divergence_type="js_divergence"),
    "exo_pair/forward_kl": dict(loss_type=["exo_pair"], f_divergence_type="forward_kl", label_smoothing=0.01),
    "robust/js_divergence": dict(loss_type=["robust"], f_divergence_type="js_divergence", label_smoothing=0.2),
    "discopop/alpha_divergence(0.8)": dict(
        loss_type=["discopop"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.8, beta=0.5
    ),
    "mpo(sigmoid,bco_pair,sft)": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "sigmoid+use_weighting(WPO)": dict(loss_type=["sigmoid"], use_weighting=True),
    "ipo+use_weighting(WPO)": dict(loss_type=["ipo"], use_weighting=True),
    "sigmoid+ld_alpha=0.5": dict(loss_type=["sigmoid"], ld_alpha=0.5),
    "ipo+ld_alpha=0.3": dict(loss_type=["ipo"], ld_alpha=0.3),
    "apo_zero+sft+ld_alpha=0.5": dict(loss_type=["apo_zero", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.5),
}


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for i in range(VOCAB_WORDS):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_dataset(num_pairs: int = 4, seed: int = 0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)

    def words(n):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB_WORDS, (n,), generator=g))

    rows = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(num_pairs):
        # Different prompt and completion lengths, so padding, LD-DPO and the length-normalised
        # losses all matter.
        rows["prompt"].append(words(2 + i % 3) + " ")
        rows["chosen"].append(words(3 + (2 * i) % 5))
        rows["rejected"].append(words(2 + (3 * i) % 6))
    return Dataset.from_dict(rows)


def make_models(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=VOCAB, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=None, eos_token_id=1,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.eye(VOCAB))
        # Spread the logits beyond RMSNorm's unit scale so the softmax is not nearly flat.
        model.model.norm.weight.mul_(3.0)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lm_head" not in name and "norm" not in name:
                p.add_(0.05 * torch.randn_like(p))
    return model, ref


class Captured:
    """The backbone's last hidden states (= logits) of the policy and reference forwards."""

    def __init__(self, model, ref_model):
        self.policy = None
        self.reference = None
        self._handles = [
            model.model.register_forward_hook(self._policy_hook),
            ref_model.model.register_forward_hook(self._ref_hook),
        ]

    def _policy_hook(self, module, args, out):
        h = out.last_hidden_state
        if h.requires_grad:
            h.retain_grad()
        self.policy = h

    def _ref_hook(self, module, args, out):
        self.reference = out.last_hidden_state.detach()

    def remove(self):
        for h in self._handles:
            h.remove()


def run_trl(num_pairs: int = 4, **dpo_args):
    """Builds TRL's DPOTrainer with `dpo_args` (DPOConfig fields) and runs its compute_loss
    and backward on one collated batch. Returns a dict with TRL's loss, logged metrics, the
    logits it scored, its gradient with respect to them, the labels and the reference logits."""
    from trl import DPOConfig, DPOTrainer

    model, ref_model = make_models()
    tok = make_tokenizer()
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPOConfig(
            output_dir=out, per_device_train_batch_size=num_pairs, report_to=[], use_cpu=True, bf16=False,
            fp16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no", **dpo_args,
        )
        trainer = DPOTrainer(
            model=model, ref_model=ref_model, args=args, train_dataset=make_dataset(num_pairs), processing_class=tok
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(num_pairs)])
        cap = Captured(trainer.model, trainer.ref_model)
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        cap.remove()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    return {
        "loss": loss.detach(),
        "metrics": metrics,
        "logits": cap.policy[:, :-1].detach(),
        "grad": cap.policy.grad[:, :-1].detach(),
        "ref_logits": cap.reference[:, :-1],
        "labels": labels,
        "completion_mask": batch["completion_mask"],
    }


# --- Several training steps, compared (test_trl_patch, test_fused_trainer) -------------------

STEPS = 4
RTOL = 1e-5
#: Log entries that measure time, not numbers.
_TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos")


def make_trainable_models(seed: int = 0, dtype=torch.float32, head_bias: bool = False, **config):
    """make_models with a random (not identity) LM head (with a random bias if `head_bias`),
    trained too so its gradient is compared, the reference's head a little off the policy's,
    in `dtype`; `config` sets model config attributes (e.g. final_logit_softcapping) on both."""
    model, ref = make_models(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        w = torch.randn(model.lm_head.weight.shape, generator=g) * 0.3
        model.lm_head.weight.copy_(w)
        ref.lm_head.weight.copy_(w + 0.01 * torch.randn(w.shape, generator=g))
        if head_bias:
            b = torch.randn(w.shape[0], generator=g)
            for m, bias in ((model, b), (ref, b + 0.1 * torch.randn(b.shape, generator=g))):
                m.lm_head.bias = torch.nn.Parameter(bias)
    model.to(dtype)
    ref.to(dtype)
    for m in (model, ref):
        for k, v in config.items():
            setattr(m.config, k, v)
    return model, ref


class NaiveHead:
    """The float64 oracle of TRL's ``ChunkedLogProbFunction`` (same arguments and outputs): the
    logits materialised in the inputs' dtype, plain autograd. TRL's own head computes in
    float32 whatever its inputs, so with float64 models this head makes the whole of TRL's
    trainer float64 (its loss and metric code then rounds nowhere near 1e-5)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size=None, softcap=None, logit_scale=1.0,
              outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        z = hidden @ weight.T
        if bias is not None:
            z = z + bias
        z = z * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        logp = torch.log_softmax(z, -1)
        return (
            logp.gather(-1, targets[:, None])[:, 0],
            -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None,
            torch.logsumexp(2 * logp, -1).detach() if "log_sum_sq_probs" in outputs else None,
            z.mean(-1).detach() if "mean_logits" in outputs else None,
            z.argmax(-1) == targets if "is_top1" in outputs else None,  # the first maximum, as TRL's
        )


@contextlib.contextmanager
def naive_head():
    """TRL's trainers use NaiveHead (for the float64 comparisons) inside the block."""
    import trl.trainer.utils as tu

    original = tu._ChunkedLogProbFunction
    tu._ChunkedLogProbFunction = NaiveHead
    try:
        yield
    finally:
        tu._ChunkedLogProbFunction = original


def train(trainer_cls=None, bf16: bool = False, run=None, model_config=None, steps: int = STEPS, ref_fn=None,
          **dpo_args):
    """Trains `trainer_cls` (default trl.DPOTrainer) for `steps` SGD steps of 4 pairs on
    make_trainable_models(**model_config) with `dpo_args` (DPOConfig fields, overriding the
    defaults below); `ref_fn(ref)`, if given, returns the reference model to use (e.g. in
    another dtype or with its own config); `run(trainer)`,
    if given, replaces `trainer.train()`. float64 models (model_config dtype) train with
    NaiveHead. Returns (numeric log entries, final parameters)."""
    from trl import DPOConfig, DPOTrainer

    model_config = model_config or {}
    model, ref = make_trainable_models(**model_config)
    if ref_fn is not None:
        ref = ref_fn(ref)
    float64 = model_config.get("dtype") == torch.float64
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings(), \
            (naive_head() if float64 else contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        args = DPOConfig(**{
            "output_dir": out, "per_device_train_batch_size": 4, "max_steps": steps, "learning_rate": 0.05,
            "report_to": [],
            # Plain SGD: a parameter moves by lr x its gradient, so the comparison of the
            # parameters is one of the gradients. Adam's g / (sqrt(v) + eps) turns the fp32
            # rounding of gradient elements that are ~0 (noise either way) into steps of ~lr.
            "optim": "sgd",
            "use_cpu": True, "bf16": bf16, "fp16": False, "logging_steps": 1, "save_strategy": "no", "seed": 7,
            "lr_scheduler_type": "constant", "disable_tqdm": True, **dpo_args,
        })
        trainer = (trainer_cls or DPOTrainer)(model=model, ref_model=ref, args=args,
                                              train_dataset=make_dataset(4 * steps), processing_class=make_tokenizer())
        threads = torch.get_num_threads()
        # One thread: at these sizes more only adds synchronisation (and spinning on a busy
        # machine, 5-10x slower); every run of a comparison uses the same count.
        torch.set_num_threads(1)
        try:
            (run or (lambda t: t.train()))(trainer)
        finally:
            torch.set_num_threads(threads)
    logs = [{k: v for k, v in e.items() if isinstance(v, (int, float))} for e in trainer.state.log_history]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return logs, params


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-6)


def assert_same_training(run, base, rtol: float = RTOL, steps: int = STEPS, moved: bool = True, model_config=None):
    """`run` and `base` ((logs, params) of train) logged the same keys and values at every step
    and ended with the same parameters, to `rtol` relative; with `moved`, the steps really
    changed the parameters, by 100 x rtol at least (the comparison is not of the initial values)."""
    (logs, params), (base_logs, base_params) = run, base
    assert len(logs) == len(base_logs) >= steps
    checked = 0
    for step, (a, e) in enumerate(zip(logs, base_logs)):
        assert a.keys() == e.keys(), (step, set(a) ^ set(e))
        for k in e:
            if k in _TIMING or "time" in k:
                continue
            assert rel(a[k], e[k]) <= rtol, f"step {step} {k}: {a[k]} vs {e[k]}"
            checked += 1
    assert checked > 10 * steps
    for n, p in base_params.items():
        scale = max(p.abs().max().item(), 1e-6)
        err = (params[n] - p).abs().max().item()
        assert err <= rtol * scale, f"{n}: max |difference| {err:.3g}, scale {scale:.3g}"
    if moved:
        init, _ = make_trainable_models(**(model_config or {}))
        change = max((base_params[n] - p).abs().max().item() for n, p in init.named_parameters())
        assert change > 100 * rtol, change


def assert_tracks_in_bf16(run, base, steps: int = STEPS):
    """`run` tracks `base` ((logs, params) of train with bf16=True) to bf16's rounding: each
    bf16 run is 1-2% off the fp32 one in loss over a few steps, 5e-4 in the summed log-probs."""
    checked = 0
    for step, (a, e) in enumerate(zip(run[0], base[0])):
        if "loss" in e:
            checked += 1
            assert rel(a["loss"], e["loss"]) <= 5e-2, (step, a["loss"], e["loss"])
            for k in ("logps/chosen", "logps/rejected"):
                assert rel(a[k], e[k]) <= 2e-3, (step, k, a[k], e[k])
    assert checked == steps
