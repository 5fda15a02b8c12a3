#!/usr/bin/env python3
# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""PyTorch baselines of the DPO log-prob + loss path on one GPU, in one run.

Paths, each timed forward+backward (the sigmoid DPO loss of TRL's concatenated batch) and
forward only (the reference pass, no grad):
  eager     log_softmax(x.float()).gather  (what a plain implementation does)
  trl_loop  TRL's selective_log_softmax for half inputs: a loop over sequences, each
            log_softmax'ed on its own (re-implemented here; trl is not needed)
  compiled  torch.compile of the eager path
  ours      dpo_kernels.dpo_loss_from_logits (in-place backward) and
            dpo_kernels.sequence_logps, when the package is importable with CUDA
  copy      a device-to-device copy of the logits (the bandwidth reference)

Forward+backward is torch.autograd.grad(loss, logits) for every path: the gradient as the
layer below the logits gets it. (.backward() into a leaf would make AccumulateGrad clone an
in-place gradient, which aliases the leaf: a copy of the logits no trainer pays, since its
logits are never a leaf.)

Times: CUDA events, median of --repeat runs after warm-up. Extra memory: peak
torch.cuda.max_memory_allocated minus what was allocated before the call (inputs excluded).
Prints a table; --json writes the numbers. Without CUDA it prints SKIPPED and exits 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F


def dpo_sigmoid_loss(chosen, rejected, ref_c, ref_r, beta=0.1):
    logits = beta * ((chosen - ref_c) - (rejected - ref_r))
    return -F.logsigmoid(logits).mean()


def seq_logps_eager(logits, labels):
    mask = labels != -100
    safe = labels.masked_fill(~mask, 0)
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def seq_logps_trl_loop(logits, labels):
    # TRL's selective_log_softmax for bf16/fp16: log_softmax one sequence at a time, so only
    # one [T, V] fp32 temporary is alive.
    mask = labels != -100
    safe = labels.masked_fill(~mask, 0)
    rows = []
    for row_logits, row_labels in zip(logits, safe):
        row_lp = F.log_softmax(row_logits, dim=-1)
        rows.append(row_lp.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1))
    lp = torch.stack(rows).float()
    return (lp * mask).sum(-1)


def make_loss(seq_fn):
    def loss_fn(logits, labels, ref_c, ref_r):
        s = seq_fn(logits, labels)
        p = s.shape[0] // 2
        return dpo_sigmoid_loss(s[:p], s[p:], ref_c, ref_r)

    return loss_fn


def timed(fn, repeat, warmup=3):
    """Median milliseconds of fn() and its peak extra memory in bytes."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeat):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    peak = torch.cuda.max_memory_allocated() - base
    return statistics.median(times), max(peak, 0)


def run_shape(name, pairs, seq_len, vocab, dtype, repeat, paths):
    dev = torch.device("cuda")
    n_seq = 2 * pairs
    gen = torch.Generator(device=dev).manual_seed(0)
    base = torch.randn(n_seq, seq_len, vocab, device=dev, dtype=dtype, generator=gen)
    labels = torch.randint(0, vocab, (n_seq, seq_len), device=dev, generator=gen)
    labels[:, :16] = -100  # prompt
    ref_c = torch.randn(pairs, device=dev, dtype=torch.float32) - 300.0
    ref_r = torch.randn(pairs, device=dev, dtype=torch.float32) - 300.0
    nbytes = base.numel() * base.element_size()
    results = []

    def record(path, mode, ms, mem, moved):
        results.append({"shape": name, "path": path, "mode": mode, "ms": ms,
                        "extra_GiB": mem / 2**30, "TB_s": moved / (ms * 1e-3) / 1e12 if moved else None})
        print(f"  {name} {path} {mode}: {ms:.3f} ms, extra {mem / 2**30:.2f} GiB", flush=True)

    dst = torch.empty_like(base)
    ms, _ = timed(lambda: dst.copy_(base), repeat)
    record("copy", "copy", ms, 0, 2 * nbytes)
    del dst

    fns = {"eager": make_loss(seq_logps_eager), "trl_loop": make_loss(seq_logps_trl_loop)}
    seq_fns = {"eager": seq_logps_eager, "trl_loop": seq_logps_trl_loop}
    if "compiled" in paths:
        fns["compiled"] = torch.compile(make_loss(seq_logps_eager))
        seq_fns["compiled"] = torch.compile(seq_logps_eager)
    for path in [p for p in paths if p in fns]:
        try:
            x = base.clone().requires_grad_(True)

            def fwd_bwd():
                torch.autograd.grad(fns[path](x, labels, ref_c, ref_r), x)

            ms, mem = timed(fwd_bwd, repeat)
            record(path, "fwd+bwd", ms, mem, 3 * nbytes)
            del x
            with torch.no_grad():
                ms, mem = timed(lambda: seq_fns[path](base, labels), repeat)
            record(path, "forward", ms, mem, nbytes)
        except torch.cuda.OutOfMemoryError as e:  # noqa: PERF203 - report and go on
            print(f"{name} {path}: out of memory ({e})", file=sys.stderr)
            torch.cuda.empty_cache()

    if "ours" in paths:
        try:
            import dpo_kernels
        except ImportError as e:
            print(f"dpo_kernels not importable ({e}); skipping ours", file=sys.stderr)
            dpo_kernels = None
        if dpo_kernels is not None and dpo_kernels.cuda_built():
            x = base.clone()

            def ours_fwd_bwd():
                # In place: the gradient overwrites x; refill it outside the timed region
                # would cost a copy, so the logits drift toward gradients between runs.
                xx = x.detach().requires_grad_(True)
                loss, _ = dpo_kernels.dpo_loss_from_logits(xx, labels, ref_c, ref_r, inplace_backward=True)
                torch.autograd.grad(loss, xx)

            ms, mem = timed(ours_fwd_bwd, repeat)
            record("ours", "fwd+bwd", ms, mem, 3 * nbytes)
            with torch.no_grad():
                ms, mem = timed(lambda: dpo_kernels.sequence_logps(base, labels), repeat)
            record("ours", "forward", ms, mem, nbytes)
        elif dpo_kernels is not None:
            print("dpo_kernels was built without CUDA; skipping ours", file=sys.stderr)
    del base
    torch.cuda.empty_cache()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--paths", default="eager,trl_loop,compiled,ours")
    ap.add_argument("--require-ours", action="store_true",
                    help="exit 2 when 'ours' was asked for but dpo_kernels (with CUDA) is missing")
    ap.add_argument("--shapes", choices=["all", "large", "small"], default="all",
                    help="large: 8x1024, V=128256; small: 4x512, V=32000 (both bf16)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device")
        return 0
    paths = args.paths.split(",")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    shapes = []
    if args.shapes in ("all", "large"):
        shapes.append(("8x1024_v128256_bf16", 8, 1024, 128256, torch.bfloat16))
    if args.shapes in ("all", "small"):
        shapes.append(("4x512_v32000_bf16", 4, 512, 32000, torch.bfloat16))
    results = []
    for shape in shapes:
        results += run_shape(*shape, args.repeat, paths)
        if args.json:  # after every shape, so a timeout keeps what was measured
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "results": results}, f, indent=1)
    copy = {r["shape"]: r["TB_s"] for r in results if r["path"] == "copy"}
    print(f"{'shape':<22} {'path':<9} {'mode':<8} {'ms':>9} {'extra GiB':>10} {'TB/s':>7} {'of copy':>8}")
    for r in results:
        tb = r["TB_s"]
        share = f"{tb / copy[r['shape']]:.0%}" if tb and r["path"] != "copy" else ""
        print(f"{r['shape']:<22} {r['path']:<9} {r['mode']:<8} {r['ms']:>9.3f} {r['extra_GiB']:>10.2f} "
              f"{tb if tb else 0:>7.2f} {share:>8}")
    if args.require_ours and "ours" in paths and not any(r["path"] == "ours" for r in results):
        print("FAILED: 'ours' was required but dpo_kernels with CUDA could not be used", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
