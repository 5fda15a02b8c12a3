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

import copy
import tempfile
import warnings

import torch

VOCAB_WORDS = 56  # + 3 special tokens, padded to VOCAB below
VOCAB = 64


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
