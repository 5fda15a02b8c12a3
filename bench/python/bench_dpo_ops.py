# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""dpo_kernels against TRL's path, forward + backward into the logits, same inputs, one run.

TRL's path: trl.trainer.utils.selective_log_softmax (its row-loop log-softmax gather for
bf16/fp16, logsumexp for fp32), the masked sums per sequence, then TRL 1.x's sigmoid loss;
the gradient flows back through autograd. Ours: dpo_kernels.dpo_loss_from_logits (fused
forward with every metric, fused backward). Reported: median time of several repetitions
and the peak extra memory of one step, with the ratio to TRL's path measured in the same run.

  python bench/python/bench_dpo_ops.py            # CPU: 2 pairs x 256 tokens, V = 32000, fp32
  python bench/python/bench_dpo_ops.py --device cuda   # 8 pairs x 1024, V = 128256, bf16 (+ torch.compile)
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import dpo_kernels as dk


def trl_path(logits, labels, ref_c, ref_r, beta=0.1):
    from trl.trainer.utils import selective_log_softmax

    mask = labels != -100
    per_token = selective_log_softmax(logits, labels.clamp(min=0))
    logps = (per_token * mask).sum(-1)
    pc, pr = logps.chunk(2)
    loss = -F.logsigmoid(beta * ((pc - ref_c) - (pr - ref_r))).mean()
    return loss


def ours(logits, labels, ref_c, ref_r, beta=0.1, inplace=False):
    return dk.dpo_loss_from_logits(logits, labels, ref_c, ref_r, beta=beta, inplace_backward=inplace)[0]


def make_inputs(P, T, V, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # Generated in place, so building the inputs leaves no larger high-water mark than the logits.
    logits = torch.empty(2 * P, T, V).normal_(generator=g).mul_(2).to(dtype=dtype, device=device)
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    labels[:, : T // 4] = -100  # prompt
    ref = -torch.rand(2 * P, generator=g) * 50 - T
    return logits, labels.to(device), ref[:P].to(device), ref[P:].to(device)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def step(fn, base, labels, rc, rr, device, inplace=False):
    """Seconds of one forward+backward and, on CUDA, its peak extra bytes."""
    z = base.clone().requires_grad_()
    # In place, the gradient overwrites z's buffer and becomes z.grad: no second logits-sized
    # buffer (in training z is the LM head's output, whose gradient flows on to the weights).
    x = z
    sync(device)
    start_mem = 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    fn(x, labels, rc, rr).backward()
    sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - start_mem if device == "cuda" else 0
    return dt, peak


def cpu_peak_rss(path_index, args):
    """Peak RSS growth (bytes) of one step of a path, in a fresh process (CPU has no allocator
    statistics; the child's high-water mark after building the inputs is the baseline)."""
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--memory-child", str(path_index)] + args
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return float(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", type=int)
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    passthrough = [f"--{k}={v}" for k, v in (("pairs", a.pairs), ("tokens", a.tokens), ("vocab", a.vocab),
                                               ("dtype", a.dtype)) if v is not None]
    cuda = a.device == "cuda"
    if cuda and not dk.cuda_built():
        raise SystemExit("dpo_kernels was built without CUDA kernels: nothing of ours to time on the GPU")
    P = a.pairs or (8 if cuda else 2)
    T = a.tokens or (1024 if cuda else 256)
    V = a.vocab or (128256 if cuda else 32000)
    dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    base, labels, rc, rr = make_inputs(P, T, V, dtype, a.device)
    paths = [("TRL selective_log_softmax + sigmoid loss", trl_path, False),
             ("dpo_kernels.dpo_loss_from_logits", ours, False),
             ("dpo_kernels, compute_metrics=False", lambda *x: dk.dpo_loss_from_logits(
                 *x, compute_metrics=False)[0], False),
             ("dpo_kernels, inplace_backward=True", lambda *x: ours(*x, inplace=True), True)]
    if not cuda and a.memory_child is None:
        # Measured first: Linux carries a process's peak RSS across fork + exec, so the
        # children must start while this process is still small.
        del base
        cpu_peaks = {name: cpu_peak_rss(i, passthrough) for i, (name, _, _) in enumerate(paths)}
        base, labels, rc, rr = make_inputs(P, T, V, dtype, a.device)
    if a.memory_child is not None:
        import resource

        _, fn, inplace = paths[a.memory_child]
        step(fn, *make_inputs(1, 8, 64, dtype, "cpu"), "cpu", inplace)  # warm-up: libraries, pools
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step(fn, base, labels, rc, rr, "cpu", inplace)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
        return
    print(f"device={a.device} ({torch.cuda.get_device_name() if cuda else f'{torch.get_num_threads()} threads'}) "
          f"torch={torch.__version__} P={P} T={T} V={V} dtype={dtype} logits={base.numel() * base.element_size() / 2**20:.0f} MiB")

    # Same inputs, same loss: check before timing.
    z1, z2 = base.clone().requires_grad_(), base.clone().requires_grad_()
    l1, l2 = trl_path(z1, labels, rc, rr), ours(z2, labels, rc, rr)
    l1.backward()
    l2.backward()
    gerr = ((z1.grad.float() - z2.grad.float()).abs().max() / z1.grad.float().abs().max()).item()
    print(f"loss TRL {l1.item():.6f}  ours {l2.item():.6f}  grad max rel diff {gerr:.2e}")
    del z1, z2

    if cuda and not a.no_compile:
        paths.append(("torch.compile(TRL path)", torch.compile(trl_path), False))
        paths.append(("torch.compile(dpo_kernels)", torch.compile(ours, fullgraph=True), False))
    # Round-robin over the paths so a noisy, shared machine slows them all alike.
    times = {name: [] for name, _, _ in paths}
    peaks = {name: 0 for name, _, _ in paths}
    for rep in range(a.reps + 1):
        for name, fn, inplace in paths:
            dt, peak = step(fn, base, labels, rc, rr, a.device, inplace)
            if rep > 0:
                times[name].append(dt)
            peaks[name] = max(peaks[name], peak)
    if not cuda:
        peaks = cpu_peaks
    results = {name: (statistics.median(times[name]), peaks[name]) for name, _, _ in paths}
    t_trl = results[paths[0][0]][0]
    if not cuda:
        print("peak extra MiB: RSS growth of one step in a fresh process, including the step's own copy "
              f"of the logits ({base.numel() * base.element_size() / 2**20:.0f} MiB) that stands for the model's output")
    print(f"{'path (forward + backward)':45s} {'median ms':>10s} {'speedup':>8s} {'peak extra MiB':>15s}"
          f"   (min..max ms over {a.reps} reps)")
    for name, (t, peak) in results.items():
        print(f"{name:45s} {t * 1e3:10.2f} {t_trl / t:7.2f}x {peak / 2**20:15.1f}"
              f"   ({min(times[name]) * 1e3:.0f}..{max(times[name]) * 1e3:.0f})")


if __name__ == "__main__":
    main()
