# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""Train a tiny causal LM with TRL's DPOTrainer three times from the same start: with TRL's own
loss path, with TRL's chunked LM head replaced by dpo_kernels.linear_logprobs (the one-line
`dpo_kernels.trl.patch_chunked_logprobs()`), and with dpo_kernels' fused loss op; print the loss
curves and the time of each run.

The hook is a DPOTrainer subclass that overrides `_compute_loss`: it runs the backbone, the
LM head on the shifted positions, and `dpo_kernels.dpo_loss_from_logits` (reference logits
from the frozen reference model), then logs the metrics TRL logs. Everything is built in
code (tokenizer, model, preference data); nothing is downloaded. About a minute on 2 CPU cores.
Both runs are fp32 (bf16=False): TRL's DPOConfig turns on bf16 autocast by default, even on
CPU, and the two paths then round the logits at different points.

  python examples/python/train_dpo_trl.py [--steps 20] [--vocab 4096] [--loss-type sigmoid]
"""
import argparse
import copy
import tempfile
import time
import warnings

import torch

import dpo_kernels


def make_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_dataset(n, words, seed=0):
    """Chosen completions continue the prompt's arithmetic sequence; rejected ones are random."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        start, step = int(torch.randint(0, words, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        seq = [(start + k * step) % words for k in range(24)]
        cut = int(torch.randint(4, 10, (1,), generator=g))
        rows["prompt"].append(" ".join(f"w{i}" for i in seq[:cut]) + " ")
        rows["chosen"].append(" ".join(f"w{i}" for i in seq[cut:]))
        rnd = torch.randint(0, words, (len(seq) - cut,), generator=g)
        rows["rejected"].append(" ".join(f"w{int(i)}" for i in rnd))
    return Dataset.from_dict(rows)


def make_model(vocab, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=1)
    return LlamaForCausalLM(cfg)


def fused_trainer_class():
    from trl import DPOTrainer

    class FusedDPOTrainer(DPOTrainer):
        """DPOTrainer whose loss is dpo_kernels.dpo_loss_from_logits (same config fields)."""

        def _compute_loss(self, model, inputs, return_outputs=False):
            mode = "train" if self.model.training else "eval"
            model_kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
            # TRL patched model.forward with its fused LM head; call the backbone and head directly.
            hidden = model.model(**model_kwargs, use_cache=False).last_hidden_state
            logits = model.lm_head(hidden[:, :-1])
            with torch.no_grad():
                ref_hidden = self.ref_model.model(**model_kwargs, use_cache=False).last_hidden_state
                ref_logits = self.ref_model.lm_head(ref_hidden[:, :-1])
            loss, metrics = dpo_kernels.dpo_loss_from_logits(
                logits, labels, ref_logits=ref_logits, loss_type=self.loss_types, loss_weights=self.loss_weights,
                beta=self.beta, label_smoothing=self.label_smoothing, f_divergence_type=self.f_divergence_type,
                f_alpha_divergence_coef=self.f_alpha_divergence_coef, discopop_tau=self.args.discopop_tau,
                use_weighting=self.use_weighting, ld_alpha=self.ld_alpha,
                inplace_backward=True,  # the gradient overwrites the logits buffer: no second copy
            )
            for name, value in metrics.items():
                if name != "nll_loss":
                    self._metrics[mode][name].append(value.item())
            return loss

    return FusedDPOTrainer


def train(trainer_cls, args_kwargs, steps, vocab, words, pairs):
    from trl import DPOConfig

    model = make_model(vocab)
    ref = copy.deepcopy(model)
    losses, logs = [], []

    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPOConfig(output_dir=out, per_device_train_batch_size=pairs, max_steps=steps, learning_rate=3e-3, bf16=False,
                         logging_steps=1, report_to=[], use_cpu=True, gradient_checkpointing=False,
                         save_strategy="no", seed=0, lr_scheduler_type="constant", disable_tqdm=True,
                         **args_kwargs)
        trainer = trainer_cls(model=model, ref_model=ref, args=args, train_dataset=make_dataset(steps * pairs, words),
                              processing_class=make_tokenizer(words))
        t0 = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - t0
    for rec in trainer.state.log_history:
        if "loss" in rec:
            losses.append(rec["loss"])
            logs.append(rec)
    return losses, logs, elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--loss-type", default="sigmoid")
    a = ap.parse_args()
    from trl import DPOTrainer

    words = a.vocab - 3
    cfg = {"loss_type": a.loss_type.split(",")}
    print(f"tiny Llama, vocab {a.vocab}, {a.pairs} pairs per step, {a.steps} steps, loss_type={cfg['loss_type']}")
    trl_losses, trl_logs, trl_time = train(DPOTrainer, cfg, a.steps, a.vocab, words, a.pairs)
    import dpo_kernels.trl

    with dpo_kernels.trl.patch_chunked_logprobs():  # TRL's own trainer, our LM head
        head_losses, _, head_time = train(DPOTrainer, cfg, a.steps, a.vocab, words, a.pairs)
    our_losses, our_logs, our_time = train(fused_trainer_class(), cfg, a.steps, a.vocab, words, a.pairs)
    print(f"{'step':>4s} {'TRL loss':>10s} {'patched head':>12s} {'fused loss':>10s} {'TRL margin':>11s} "
          f"{'fused margin':>12s}")
    for i, (x, h, y) in enumerate(zip(trl_losses, head_losses, our_losses)):
        print(f"{i + 1:4d} {x:10.5f} {h:12.5f} {y:10.5f} {trl_logs[i]['rewards/margins']:11.5f} "
              f"{our_logs[i]['rewards/margins']:12.5f}")
    for name, curve in (("patched head", head_losses), ("fused loss", our_losses)):
        diff = max(abs(x - y) / max(abs(x), 1e-6) for x, y in zip(trl_losses, curve))
        print(f"max relative loss difference over the curve, {name} vs TRL: {diff:.2e}")
    print(f"training time: TRL {trl_time:.1f} s, patched head {head_time:.1f} s ({trl_time / head_time:.2f}x), "
          f"fused loss {our_time:.1f} s ({trl_time / our_time:.2f}x) "
          "(the whole step: model forward/backward and optimizer included)")


if __name__ == "__main__":
    main()
