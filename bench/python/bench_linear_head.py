# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""The fused LM head, forward + backward into hidden and weight, same inputs, one run:
dpo_kernels.linear_logprobs against TRL 1.16's ChunkedLogProbFunction (its torch fallback on
the CPU, the path TRL's DPOTrainer takes there) and against the materialising path (the whole
[N, V] logits, log_softmax, gather, entropy, autograd). Outputs: log-probs plus the entropy,
mean logit and top-1 flag (what DPOTrainer asks its policy head for). Reported: median time of
several repetitions (round-robin, so a noisy machine slows every path alike), its ratio to
TRL's function in the same run, and the peak extra memory of one step.

  python bench/python/bench_linear_head.py     # CPU, 2 threads: N = 1024, H = 512, V = 32000, fp32
"""
import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch

import dpo_kernels as dk

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


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


PATHS = [("TRL ChunkedLogProbFunction (torch fallback)", trl_fn),
         ("dpo_kernels.linear_logprobs", ours),
         ("materialised logits + autograd", materialised)]


def make_inputs(N, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, y


def step(fn, h, w, y):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    t0 = time.perf_counter()
    lp, ent = fn(hh, ww, y)
    (lp.sum() - 0.1 * ent.sum()).backward()
    return time.perf_counter() - t0, (lp.detach(), hh.grad, ww.grad)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    shape = (a.tokens, a.hidden, a.vocab)
    if a.memory_child is not None:
        fn = PATHS[a.memory_child][1]
        step(fn, *make_inputs(8, 16, 64, dtype))  # warm-up: libraries, pools
        inputs = make_inputs(*shape, dtype)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step(fn, *inputs)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
        return
    # Peak memory first, each path in a fresh process (Linux carries the peak RSS across fork).
    args = [f"--tokens={a.tokens}", f"--hidden={a.hidden}", f"--vocab={a.vocab}", f"--dtype={a.dtype}",
            f"--threads={a.threads}"]
    peaks = {}
    for i, (name, _) in enumerate(PATHS):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(i)] + args, capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        peaks[name] = float(out)
    h, w, y = make_inputs(*shape, dtype)
    print(f"cpu ({torch.get_num_threads()} threads) torch={torch.__version__} N={a.tokens} H={a.hidden} "
          f"V={a.vocab} dtype={dtype}; the [N, V] fp32 logits would be {a.tokens * a.vocab * 4 / 2**20:.0f} MiB")
    _, ref = step(PATHS[0][1], h, w, y)
    _, got = step(ours, h, w, y)
    errs = [((g.float() - r.float()).abs().max() / r.float().abs().max()).item() for g, r in zip(got, ref)]
    print("ours vs TRL, max rel diff: log_probs {:.1e}, d hidden {:.1e}, d weight {:.1e}".format(*errs))
    times = {name: [] for name, _ in PATHS}
    for rep in range(a.reps + 1):
        for name, fn in PATHS:
            dt, _ = step(fn, h, w, y)
            if rep > 0:
                times[name].append(dt)
    t_trl = statistics.median(times[PATHS[0][0]])
    print("peak extra MiB: RSS growth of one step in a fresh process (includes the step's copies of hidden and "
          f"weight, {(h.numel() + w.numel()) * h.element_size() / 2**20:.0f} MiB, and their gradients)")
    print(f"{'path (forward + backward)':45s} {'median ms':>10s} {'vs TRL':>8s} {'peak extra MiB':>15s}")
    for name, _ in PATHS:
        t = statistics.median(times[name])
        print(f"{name:45s} {t * 1e3:10.1f} {t_trl / t:7.2f}x {peaks[name] / 2**20:15.1f}")


if __name__ == "__main__":
    main()
