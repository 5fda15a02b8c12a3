# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""The fused LM head, forward + backward into hidden and weight, same inputs, one run, two
comparisons (ratios within each, as the machine is shared and noisy):

``head``: per-token log-probs plus the entropy, mean logit and top-1 flag (what DPOTrainer asks
its policy head for): dpo_kernels.linear_logprobs against TRL 1.16's ChunkedLogProbFunction
(its torch fallback on the CPU, the path TRL's DPOTrainer takes there) and against the
materialising path (the whole [N, V] logits, log_softmax, gather, entropy, autograd).

``dpo``: the sigmoid DPO loss of 2P sequences of T tokens (N = 2P * T rows; a 16-token prompt
masked in each) from the last hidden states: dpo_kernels.dpo_loss_from_hidden (loss, TRL's
metrics and the gradients in one call) and dk.FusedLinearDPOLoss (the Liger drop-in on it),
against TRL's chunked function + the DPO loss in torch, Liger-Kernel 0.8.5's
LigerFusedLinearDPOLoss (its chunked torch path; ``--liger-compiled`` for torch.compile), and
the materialising path. Every path but Liger's takes precomputed reference log-probs (zeros);
Liger cannot, so it runs with use_ref_model=False, which means reference log-probs 0: the same
loss, the same work.

Reported: median time of several repetitions (round-robin, so a noisy machine slows every path
alike), its ratio to TRL's path in the same run, and the peak extra memory of one step: the
growth of the process's peak resident set (getrusage ru_maxrss) over one step, each path in a
fresh process after a small warm-up. RSS sees every allocation, torch's and the C++ library's
own workspaces alike (torch.profiler's memory profile sees only torch's allocator).

  python bench/python/bench_linear_head.py     # CPU, 2 threads: N = 1024, H = 512, V = 32000, fp32
"""
import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import dpo_kernels as dk

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
BETA = 0.1
PROMPT = 16  # masked prompt tokens per sequence in the dpo comparison
LIGER_COMPILED = False


# ---- head: per-token log-probs and metrics ----------------------------------------------------

def materialised(h, w, y):
    z = (h @ w.T).float()
    logp_all = torch.log_softmax(z, -1)
    logp = logp_all.gather(-1, y[:, None])[:, 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def trl_fn(h, w, y):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    out = ChunkedLogProbFunction.apply(h, w, None, y, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, OUTPUTS)
    return out[0], out[1]


def ours(h, w, y):
    out = dk.linear_logprobs(h, w, None, y, outputs=OUTPUTS)
    return out[0], out[1]


def head_inputs(N, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, y


def head_step(fn, h, w, y):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    t0 = time.perf_counter()
    lp, ent = fn(hh, ww, y)
    (lp.sum() - 0.1 * ent.sum()).backward()
    return time.perf_counter() - t0, (lp.detach(), hh.grad, ww.grad)


# ---- dpo: the sigmoid DPO loss from hidden states ---------------------------------------------

def _sigmoid_dpo(token_logps, y, rc, rr):
    seq = (token_logps.view(y.shape) * (y != -100)).sum(-1)
    P = y.shape[0] // 2
    return -F.logsigmoid(BETA * ((seq[:P] - rc) - (seq[P:] - rr))).mean()


def dpo_trl(h, w, y, rc, rr):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    B, T, H = h.shape
    out = ChunkedLogProbFunction.apply(h.reshape(B * T, H), w, None, y.clamp(min=0).reshape(-1), 1.0,
                                       _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, OUTPUTS)
    return _sigmoid_dpo(out[0], y, rc, rr)


def dpo_ours_head(h, w, y, rc, rr):
    B, T, H = h.shape
    return _sigmoid_dpo(dk.linear_logprobs(h.reshape(B * T, H), w, None, y.reshape(-1), outputs=OUTPUTS)[0], y, rc, rr)


def dpo_ours(h, w, y, rc, rr):
    return dk.dpo_loss_from_hidden(h, w, y, rc, rr, beta=BETA)[0]


_MODULES = {}


def dpo_ours_module(h, w, y, rc, rr):
    m = _MODULES.setdefault("ours", dk.FusedLinearDPOLoss(beta=BETA))
    return m(w, h, y, ref_chosen_logps=rc, ref_rejected_logps=rr)[0]


def dpo_liger(h, w, y, rc, rr):
    if "liger" not in _MODULES:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        _MODULES["liger"] = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False, compiled=LIGER_COMPILED)
    return _MODULES["liger"](w, h, y)[0]


def dpo_materialised(h, w, y, rc, rr):
    z = (h @ w.T).float()
    logp = torch.log_softmax(z, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return _sigmoid_dpo(logp, y, rc, rr)


def dpo_inputs(N, H, V, dtype, seed=0):
    T = min(128, N // 2)
    B = max(2, N // T) // 2 * 2
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, : min(PROMPT, T - 1)] = -100
    # Reference log-probs 0, which Liger's use_ref_model=False means: every path computes the same loss.
    rc = rr = torch.zeros(B // 2)
    return h, w, y, rc, rr


def dpo_step(fn, h, w, y, rc, rr):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    t0 = time.perf_counter()
    loss = fn(hh, ww, y, rc, rr)
    loss.backward()
    return time.perf_counter() - t0, (loss.detach(), hh.grad, ww.grad)


SECTIONS = {
    "head": (head_inputs, head_step, [
        ("TRL ChunkedLogProbFunction (torch fallback)", trl_fn),
        ("dpo_kernels.linear_logprobs", ours),
        ("materialised logits + autograd", materialised)]),
    "dpo": (dpo_inputs, dpo_step, [
        ("TRL ChunkedLogProbFunction + DPO in torch", dpo_trl),
        ("dk.linear_logprobs + DPO in torch", dpo_ours_head),
        ("dk.dpo_loss_from_hidden", dpo_ours),
        ("dk.FusedLinearDPOLoss", dpo_ours_module),
        ("Liger LigerFusedLinearDPOLoss", dpo_liger),
        ("materialised logits + autograd", dpo_materialised)]),
}


def memory_peaks(section, a) -> dict:
    """Each path's peak extra memory, each in a fresh process. Call before this process has run
    anything large: a child starts with its parent's peak RSS (Linux carries it across fork and
    exec), so a child of a process that already peaked higher would see no growth."""
    args = [f"--tokens={a.tokens}", f"--hidden={a.hidden}", f"--vocab={a.vocab}", f"--dtype={a.dtype}",
            f"--threads={a.threads}"] + (["--liger-compiled"] if a.liger_compiled else [])
    peaks = {}
    for i, (name, _) in enumerate(SECTIONS[section][2]):
        out = subprocess.run([sys.executable, __file__, "--memory-child", f"{section}:{i}"] + args, capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        peaks[name] = float(out)
    return peaks


def run_section(section, a, dtype, peaks):
    make, step, paths = SECTIONS[section]
    inputs = make(a.tokens, a.hidden, a.vocab, dtype)
    h, w = inputs[0], inputs[1]
    print(f"\n== {section}: cpu ({torch.get_num_threads()} threads) torch={torch.__version__} N={a.tokens} "
          f"H={a.hidden} V={a.vocab} dtype={dtype}" + (f" ({h.shape[0]} sequences of {h.shape[1]} tokens)"
                                                       if section == "dpo" else "")
          + f"; the [N, V] fp32 logits would be {a.tokens * a.vocab * 4 / 2**20:.0f} MiB")
    # Agreement with the materialising path (the loss; the log-probs for the head) and its gradients.
    _, ref = step(paths[-1][1], *inputs)
    for name, fn in paths[:-1]:
        _, got = step(fn, *inputs)
        errs = [((g.float() - r.float()).abs().max() / r.float().abs().max()).item() for g, r in zip(got, ref)]
        print(f"  {name:45s} vs materialised, max rel diff: value {errs[0]:.1e}, d hidden {errs[1]:.1e}, "
              f"d weight {errs[2]:.1e}")
    times = {name: [] for name, _ in paths}
    for rep in range(a.reps + 1):
        for name, fn in paths:
            dt, _ = step(fn, *inputs)
            if rep > 0:
                times[name].append(dt)
    t_trl = statistics.median(times[paths[0][0]])
    print("peak extra MiB: growth of the peak RSS over one step in a fresh process (includes the step's copies of "
          f"hidden and weight, {(h.numel() + w.numel()) * h.element_size() / 2**20:.0f} MiB, and their gradients)")
    print(f"{'path (forward + backward)':45s} {'median ms':>10s} {'vs TRL':>8s} {'peak extra MiB':>15s}")
    for name, _ in paths:
        t = statistics.median(times[name])
        print(f"{name:45s} {t * 1e3:10.1f} {t_trl / t:7.2f}x {peaks[name] / 2**20:15.1f}")


def main():
    global LIGER_COMPILED
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", choices=sorted(SECTIONS), help="run one comparison (default: both)")
    ap.add_argument("--liger-compiled", action="store_true",
                    help="Liger with compiled=True (torch.compile of its chunk step; inductor on the CPU)")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    LIGER_COMPILED = a.liger_compiled
    dtype = getattr(torch, a.dtype)
    if a.memory_child is not None:
        section, i = a.memory_child.split(":")
        make, step, paths = SECTIONS[section]
        fn = paths[int(i)][1]
        step(fn, *make(8, 16, 64, dtype))  # warm-up at a tiny shape: libraries, pools
        inputs = make(a.tokens, a.hidden, a.vocab, dtype)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step(fn, *inputs)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
        return
    sections = [a.only] if a.only else list(SECTIONS)
    peaks = {section: memory_peaks(section, a) for section in sections}  # first: see memory_peaks
    for section in sections:
        run_section(section, a, dtype, peaks[section])


if __name__ == "__main__":
    main()
