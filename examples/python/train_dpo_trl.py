# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""Train a tiny causal LM with DPO three times from the same start and print the loss curves:

1. TRL's own DPOTrainer;
2. the same trainer with TRL's chunked LM head replaced by dpo_kernels.linear_logprobs, the
   one-line `dpo_kernels.trl.patch_chunked_logprobs()`;
3. `dpo_kernels.trl.FusedDPOTrainer`, a DPOTrainer whose whole loss is
   `dpo_kernels.dpo_loss_from_hidden`: the backbone's hidden states and the LM head in, the
   loss, TRL's metrics and the head's gradients out of one call, the logits never built.

Everything is built in code (tokenizer, model, preference data); nothing is downloaded. About
a minute on 2 CPU cores. The runs are fp32 (bf16=False): TRL's DPOConfig turns on bf16
autocast by default, even on CPU, and the paths then round the logits at different points.

  python examples/python/train_dpo_trl.py [--steps 20] [--vocab 4096] [--loss-type sigmoid]
"""
import argparse
import copy
import tempfile
import time
import warnings

import torch

import dpo_kernels.trl


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


def train(trainer_cls, args_kwargs, steps, vocab, words, pairs):
    from transformers import PrinterCallback
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
        trainer.remove_callback(PrinterCallback)  # the curves are printed below
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
    import datasets
    from trl import DPOTrainer

    datasets.disable_progress_bars()

    words = a.vocab - 3
    cfg = {"loss_type": a.loss_type.split(",")}
    print(f"tiny Llama, vocab {a.vocab}, {a.pairs} pairs per step, {a.steps} steps, loss_type={cfg['loss_type']}")
    runs = {}
    runs["TRL"] = train(DPOTrainer, cfg, a.steps, a.vocab, words, a.pairs)
    with dpo_kernels.trl.patch_chunked_logprobs():  # TRL's own trainer, our LM head
        runs["patched head"] = train(DPOTrainer, cfg, a.steps, a.vocab, words, a.pairs)
    runs["FusedDPOTrainer"] = train(dpo_kernels.trl.FusedDPOTrainer, cfg, a.steps, a.vocab, words, a.pairs)

    names = list(runs)
    header = " ".join(f"{n + ' loss':>20s}" for n in names)
    print(f"{'step':>4s} {header} {'TRL margin':>11s} {'fused margin':>12s}")
    (trl_losses, trl_logs, trl_time) = runs["TRL"]
    fused_logs = runs["FusedDPOTrainer"][1]
    for i in range(len(trl_losses)):
        print(f"{i + 1:4d} " + " ".join(f"{runs[n][0][i]:20.5f}" for n in names) +
              f" {trl_logs[i]['rewards/margins']:11.5f} {fused_logs[i]['rewards/margins']:12.5f}")
    for name in names[1:]:
        curve = runs[name][0]
        diff = max(abs(x - y) / max(abs(x), 1e-6) for x, y in zip(trl_losses, curve))
        print(f"max relative loss difference over the curve, {name} vs TRL: {diff:.2e}")
    print("training time (the whole step: model forward/backward and optimizer included): " + ", ".join(
        f"{n} {runs[n][2]:.1f} s ({trl_time / runs[n][2]:.2f}x)" for n in names))


if __name__ == "__main__":
    main()
