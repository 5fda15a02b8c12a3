# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""The fused LM head, forward + backward into hidden and weight, same inputs, one run, three
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

``dpo_ref``: the same loss with the reference a model, its own last hidden states and LM head
(the policy's, slightly perturbed), scored in the same step without gradients: TRL's and our
per-token heads score it under no_grad (log-probs only, as DPOTrainer asks its reference head),
dpo_loss_from_hidden and FusedLinearDPOLoss take ref_hidden / ref_input and ref_weight (one
reference GEMM pass, inside the fused call), Liger runs with use_ref_model=True.

Reported: median time of several repetitions (round-robin, so a noisy machine slows every path
alike), its ratio to TRL's path in the same run, and the peak extra memory of one step: the
growth of the process's peak resident set (getrusage ru_maxrss) over one step, each path in a
fresh process after a small warm-up. RSS sees every allocation, torch's and the C++ library's
own workspaces alike (torch.profiler's memory profile sees only torch's allocator).

  python bench/python/bench_linear_head.py     # CPU, 2 threads: N = 1024, H = 512, V = 32000, fp32

``--device cuda`` (issues 12 and 13's GPU rows; scripts/gpu_check.sh runs it as its linear_head_py
stage): the same comparisons on one GPU, usually at ``--shape large`` (N = 8192 = 4 pairs x 2 x 1024
tokens, 16 prompt tokens masked per sequence, H = 4096, V = 128256, bf16), the dpo comparison twice
(reference log-probs given; a reference model's hidden states and head, forward only), with TRL's
Triton path (as its DPOTrainer runs it on a GPU: only the scored rows, hidden[mask], go through the
head; the reference head asked for log_probs only), Liger compiled (its default), our ops
(dpo_loss_from_hidden with its default CUDA budget, 1022 MiB: one pair per chunk, three passes, and
with 512 MiB, less than one pair: four passes), and the GEMM floor: torch.matmul of hidden @ weight.T,
dZ @ weight and dZ.T @ hidden (+ the reference's hidden @ weight.T) into preallocated buffers.
Reported per path: median ms (CUDA events), x the floor, speed-up over TRL's and Liger's paths, peak
extra GiB (torch.cuda.max_memory_allocated over one step beyond the inputs and the gradient buffers
the step leaves), and the max relative difference from the materialising path (loss, d hidden,
d weight). A path that cannot run (a package missing, an op without a CUDA kernel) is reported
"unavailable (reason)" and the rest go on; any other failure is reported "error (...)" and makes
the exit code 1. ``--json`` writes the numbers after every section. Without a device it prints
"SKIPPED: no CUDA device" and exits 0. ``--wheels DIR`` takes TRL's and Liger's modules from the
folder scripts/fetch_gpu_wheels.sh fills (the GPU machine has no pip), without importing either
package's __init__ (TRL's needs transformers): see _trl_from_wheel.

  python bench/python/bench_linear_head.py --device cuda --shape large --wheels .gpu_wheels --json out.json
"""
import argparse
import contextlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
import types

import torch
import torch.nn.functional as F

try:
    import dpo_kernels as dk

    DK_IMPORT_ERROR = None
except ImportError as e:  # the CPU comparison needs it (main re-raises); on CUDA "ours" is reported unavailable
    DK_IMPORT_ERROR = e

    class _Missing:
        def __getattr__(self, name):
            raise ImportError(f"dpo_kernels is not importable: {DK_IMPORT_ERROR}")

    dk = _Missing()

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
BETA = 0.1
PROMPT = 16  # masked prompt tokens per sequence in the dpo comparison
LIGER_COMPILED = False
WHEELS = None  # --wheels: TRL's and Liger's modules from scripts/fetch_gpu_wheels.sh's folder
_ANCHORS = {}


# ---- the anchors: TRL's chunked head and Liger's fused DPO loss ------------------------------

def trl_anchor():
    """(ChunkedLogProbFunction, the chunk width TRL's trainer passes it): from the installed trl, or
    with --wheels from the unpacked wheel (see _trl_from_wheel)."""
    if "trl" not in _ANCHORS:
        if WHEELS is None:
            from trl.kernels.chunked_logprob import ChunkedLogProbFunction
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

            _ANCHORS["trl"] = (ChunkedLogProbFunction, _CHUNKED_LOGPROB_CHUNK_SIZE)
        else:
            _ANCHORS["trl"] = _trl_from_wheel(_wheel_site())
    return _ANCHORS["trl"]


def liger_anchor():
    """LigerFusedLinearDPOLoss: from the installed liger_kernel, or with --wheels from the unpacked wheel."""
    if "liger" not in _ANCHORS:
        if WHEELS is None:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        else:
            site = _wheel_site()
            _package("liger_kernel", os.path.join(site, "liger_kernel"))
            _package("liger_kernel.chunked_loss", os.path.join(site, "liger_kernel", "chunked_loss"))
            # dpo_loss.py imports torch and liger_kernel.chunked_loss.fused_linear_preference (torch) only.
            LigerFusedLinearDPOLoss = importlib.import_module("liger_kernel.chunked_loss.dpo_loss").LigerFusedLinearDPOLoss
        _ANCHORS["liger"] = LigerFusedLinearDPOLoss
    return _ANCHORS["liger"]


def _wheel_site() -> str:
    site = os.path.join(os.path.abspath(WHEELS), "site")
    if not os.path.isdir(site):
        raise ImportError(f"{site} is missing: run scripts/fetch_gpu_wheels.sh")
    if site not in sys.path:
        sys.path.append(site)  # last: `packaging`, only where this python lacks it
    return site


def _package(name, path):
    """An empty package `name` whose submodules load from `path`: the package's own __init__ (TRL's
    pulls in transformers, Liger's its whole op zoo) never runs."""
    if not os.path.isdir(path):
        raise ImportError(f"{path} is missing: run scripts/fetch_gpu_wheels.sh")
    if name in sys.modules and getattr(sys.modules[name], "__path__", None) != [path]:
        raise ImportError(f"{name} is already imported from elsewhere; --wheels must load it first")
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [path]
    sys.modules[name] = importlib.util.module_from_spec(spec)
    return sys.modules[name]


def _trl_from_wheel(site):
    """trl/kernels/chunked_logprob.py imports torch, packaging, triton and, at import time only,
    transformers.utils.is_triton_available; its backward imports ..trainer.utils.maybe_gather_lm_head_ctx
    (a null context without DeepSpeed ZeRO-3). Without transformers both come from small stand-ins:
    is_triton_available is whether triton imports (as transformers checks it), the gather a null context.
    The stand-in transformers is removed again right after the import."""
    root = os.path.join(site, "trl")
    _package("trl", root)
    _package("trl.kernels", os.path.join(root, "kernels"))
    _package("trl.trainer", os.path.join(root, "trainer"))
    utils = types.ModuleType("trl.trainer.utils")
    utils.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
    sys.modules["trl.trainer.utils"] = utils
    # The chunk width DPOTrainer passes, read from the wheel's trainer/utils.py (importing it needs transformers).
    with open(os.path.join(root, "trainer", "utils.py")) as f:
        found = re.search(r"^_CHUNKED_LOGPROB_CHUNK_SIZE = (\d+)$", f.read(), re.M)
    if not found:
        raise ImportError(f"no _CHUNKED_LOGPROB_CHUNK_SIZE in {root}/trainer/utils.py")
    stand_in = "transformers.utils" not in sys.modules
    try:
        if stand_in:
            sys.modules["transformers"] = types.ModuleType("transformers")
            sys.modules["transformers.utils"] = types.ModuleType("transformers.utils")
            sys.modules["transformers.utils"].is_triton_available = lambda: importlib.util.find_spec("triton") is not None
        mod = importlib.import_module("trl.kernels.chunked_logprob")
    finally:
        if stand_in:
            del sys.modules["transformers.utils"], sys.modules["transformers"]
    return mod.ChunkedLogProbFunction, int(found.group(1))


# ---- head: per-token log-probs and metrics ----------------------------------------------------

def materialised(h, w, y):
    z = (h @ w.T).float()
    logp_all = torch.log_softmax(z, -1)
    logp = logp_all.gather(-1, y[:, None])[:, 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def trl_fn(h, w, y):
    fn, chunk = trl_anchor()
    out = fn.apply(h, w, None, y, 1.0, chunk, None, 1.0, OUTPUTS)
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
    return _dpo_from_seq((token_logps.view(y.shape) * (y != -100)).sum(-1), rc, rr)


def _dpo_from_seq(seq, rc, rr):
    P = seq.shape[0] // 2
    return -F.logsigmoid(BETA * ((seq[:P] - rc) - (seq[P:] - rr))).mean()


def dpo_trl(h, w, y, rc, rr):
    fn, chunk = trl_anchor()
    B, T, H = h.shape
    out = fn.apply(h.reshape(B * T, H), w, None, y.clamp(min=0).reshape(-1), 1.0, chunk, None, 1.0, OUTPUTS)
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
        _MODULES["liger"] = liger_anchor()(beta=BETA, use_ref_model=False, compiled=LIGER_COMPILED)
    return _MODULES["liger"](w, h, y)[0]


def dpo_materialised(h, w, y, rc, rr):
    z = (h @ w.T).float()
    logp = torch.log_softmax(z, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return _sigmoid_dpo(logp, y, rc, rr)


def dpo_inputs(N, H, V, dtype, seed=0, seq_len=None):
    T = seq_len or min(128, N // 2)
    B = max(2, N // T) // 2 * 2
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, : min(PROMPT, T - 1)] = -100
    # Reference log-probs 0, which Liger's use_ref_model=False means: every path computes the same loss.
    rc = rr = torch.zeros(B // 2)
    return h, w, y, rc, rr


def dpo_step(fn, h, w, y, *ref):
    """One step of a dpo path; ``ref``: the reference log-probs (rc, rr), or dpo_ref's dict."""
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    t0 = time.perf_counter()
    loss = fn(hh, ww, y, *ref)
    loss.backward()
    return time.perf_counter() - t0, (loss.detach(), hh.grad, ww.grad)


# ---- dpo_ref: the same loss, the reference a model (its own last hidden states and head) -------

def reference_model(h, w, g):
    """A reference model's own last hidden states and head: the policy's, slightly off."""
    return {"rh": h + 0.1 * torch.randn(h.shape, generator=g, device=h.device, dtype=h.dtype),
            "rw": w + 0.01 * torch.randn(w.shape, generator=g, device=w.device, dtype=w.dtype).mul_(w.shape[1] ** -0.5)}


def dpo_ref_inputs(N, H, V, dtype, seed=0, seq_len=None):
    """dpo's inputs, the reference log-probs replaced by a reference model (its paths are the GPU
    section's, registered in SECTIONS below them)."""
    h, w, y, _, _ = dpo_inputs(N, H, V, dtype, seed, seq_len)
    return h, w, y, reference_model(h, w, torch.Generator().manual_seed(seed + 1))


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
    # "dpo_ref" is registered below the GPU paths it shares.
}


def memory_peaks(section, a) -> dict:
    """Each path's peak extra memory, each in a fresh process. Call before this process has run
    anything large: a child starts with its parent's peak RSS (Linux carries it across fork and
    exec), so a child of a process that already peaked higher would see no growth."""
    args = [f"--tokens={a.tokens}", f"--hidden={a.hidden}", f"--vocab={a.vocab}", f"--dtype={a.dtype}",
            f"--threads={a.threads}"] + (["--liger-compiled"] if a.liger_compiled else [])
    args += ([f"--seq-len={a.seq_len}"] if a.seq_len else []) + ([f"--wheels={a.wheels}"] if a.wheels else [])
    peaks = {}
    for i, (name, _) in enumerate(SECTIONS[section][2]):
        out = subprocess.run([sys.executable, __file__, "--memory-child", f"{section}:{i}"] + args, capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        peaks[name] = float(out)
    return peaks


def run_section(section, a, dtype, peaks):
    make, step, paths = SECTIONS[section]
    inputs = make(a.tokens, a.hidden, a.vocab, dtype, **_seq_len(section, a))
    h, w = inputs[0], inputs[1]
    print(f"\n== {section}: cpu ({torch.get_num_threads()} threads) torch={torch.__version__} N={a.tokens} "
          f"H={a.hidden} V={a.vocab} dtype={dtype}" + (f" ({h.shape[0]} sequences of {h.shape[1]} tokens)"
                                                       if section.startswith("dpo") else "")
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


# ---- GPU (--device cuda): CUDA events and the caching allocator's peak ------------------------
#
# Every path steps the same leaves (hidden and weight require grad; their .grad is reset before
# each step), so no step pays a copy of the 1 GiB weight. Time: CUDA events around forward +
# backward, median over --reps round-robin rounds after one discarded round (the first call,
# which compiles Liger and JITs TRL's Triton kernels, is the warm-up before them). Extra memory:
# torch.cuda.max_memory_allocated over one step, minus what was allocated before it and minus
# the gradient buffers the step leaves (hidden's and weight's); memory outside torch's allocator
# (none of the paths here allocates any) would not be seen.

SHAPES = {"large": dict(tokens=8192, hidden=4096, vocab=128256, seq_len=1024, dtype="bfloat16")}
FOUR_PASS_BUDGET = 512 << 20  # less than one TRL pair of 2 x 1024 rows at V = 128256 (docs/cuda.md)


def _ours_head(h, w, y, outputs):
    return dk.linear_logprobs(h, w, None, y, outputs=outputs)[0]


def _trl_head(h, w, y, outputs):
    fn, chunk = trl_anchor()
    return fn.apply(h, w, None, y, 1.0, chunk, None, 1.0, outputs)[0]


def _compact_seq(head, h, w, y, outputs):
    """Sequence log-probs as TRL's DPOTrainer gets them on a Triton device: only the scored rows
    go through the head (hidden[mask]), then masked_scatter back and a sum per sequence."""
    mask = y != -100
    lp = head(h[mask], w, y[mask], outputs)
    return lp.new_zeros(mask.shape).masked_scatter(mask, lp).sum(-1)


def _materialised_seq(h, w, y):
    z = (h @ w.T).float()
    lp = torch.log_softmax(z, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return (lp * (y != -100)).sum(-1)


def _with_head(head):
    """DPO in torch on a per-token head (TRL's, or ours in its place): the reference's log-probs from
    the reference model under no_grad (log_probs only, as TRL asks its reference head), or given."""
    def fn(h, w, y, ref):
        if "rh" in ref:
            with torch.no_grad():
                rc, rr = _compact_seq(head, ref["rh"], ref["rw"], y, ("log_probs",)).chunk(2)
        else:
            rc, rr = ref["rc"], ref["rr"]
        return _dpo_from_seq(_compact_seq(head, h, w, y, OUTPUTS), rc, rr)
    return fn


def _ref_kwargs(ref, hidden="ref_hidden", weight="ref_weight", chosen="reference_chosen_logps",
                rejected="reference_rejected_logps"):
    return {hidden: ref["rh"], weight: ref["rw"]} if "rh" in ref else {chosen: ref["rc"], rejected: ref["rr"]}


def g_ours(budget):
    def fn(h, w, y, ref):
        return dk.dpo_loss_from_hidden(h, w, y, beta=BETA, workspace_bytes=budget, **_ref_kwargs(ref))[0]
    return fn


def g_ours_module(h, w, y, ref):
    m = _MODULES.setdefault("ours", dk.FusedLinearDPOLoss(beta=BETA))
    return m(w, h, y, **_ref_kwargs(ref, "ref_input", "ref_weight", "ref_chosen_logps", "ref_rejected_logps"))[0]


def g_liger(h, w, y, ref):
    # Liger takes no reference log-probs: use_ref_model=False means 0, which the other paths are given.
    key = "liger_ref" if "rh" in ref else "liger"
    if key not in _MODULES:
        _MODULES[key] = liger_anchor()(beta=BETA, use_ref_model="rh" in ref, compiled=h.is_cuda or LIGER_COMPILED)
    return _MODULES[key](w, h, y, **({"ref_input": ref["rh"], "ref_weight": ref["rw"]} if "rh" in ref else {}))[0]


def g_materialised(h, w, y, ref):
    if "rh" in ref:
        with torch.no_grad():
            rc, rr = _materialised_seq(ref["rh"], ref["rw"], y).chunk(2)
    else:
        rc, rr = ref["rc"], ref["rr"]
    return _dpo_from_seq(_materialised_seq(h, w, y), rc, rr)


class GemmFloor:
    """The GEMMs a fused head cannot avoid, alone, with torch.matmul into preallocated bf16 buffers:
    logits = hidden @ weight.T, d hidden = dZ @ weight, d weight = dZ.T @ hidden (the logits buffer
    stands in for dZ), + reference logits when there is a reference model."""

    def __init__(self, h, w, ref):
        h2 = h.detach().reshape(-1, h.shape[-1])
        self.h, self.w = h2, w.detach()
        self.rh = ref["rh"].reshape(-1, h.shape[-1]) if "rh" in ref else None
        self.rw = ref.get("rw")
        self.z = torch.empty(h2.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
        self.dh, self.dw = torch.empty_like(h2), torch.empty_like(self.w)

    def __call__(self):
        torch.matmul(self.h, self.w.T, out=self.z)
        torch.matmul(self.z, self.w, out=self.dh)
        torch.matmul(self.z.T, self.h, out=self.dw)
        if self.rh is not None:
            torch.matmul(self.rh, self.rw.T, out=self.z)


def gpu_dpo_paths():
    return [
        ("TRL ChunkedLogProbFunction (Triton) + DPO", _with_head(_trl_head)),
        ("dk.dpo_loss_from_hidden (3 passes)", g_ours(None)),
        ("dk.dpo_loss_from_hidden (4 passes)", g_ours(FOUR_PASS_BUDGET)),
        ("dk.FusedLinearDPOLoss", g_ours_module),
        ("dk.linear_logprobs + DPO (TRL's use)", _with_head(_ours_head)),
        ("Liger LigerFusedLinearDPOLoss (compiled)", g_liger),
        ("materialised logits + autograd", g_materialised)]


# The CPU's dpo_ref comparison: the GPU section's paths, reference a model (no GEMM floor row).
SECTIONS["dpo_ref"] = (dpo_ref_inputs, dpo_step, [
    ("TRL ChunkedLogProbFunction + DPO in torch", _with_head(_trl_head)),
    ("dk.linear_logprobs + DPO in torch", _with_head(_ours_head)),
    ("dk.dpo_loss_from_hidden", g_ours(None)),
    ("dk.FusedLinearDPOLoss", g_ours_module),
    ("Liger LigerFusedLinearDPOLoss", g_liger),
    ("materialised logits + autograd", g_materialised)])


def gpu_head_paths():
    return [
        ("TRL ChunkedLogProbFunction (Triton)", lambda h, w, y, ref: trl_fn(h, w, y)),
        ("dpo_kernels.linear_logprobs", lambda h, w, y, ref: ours(h, w, y)),
        ("materialised logits + autograd", lambda h, w, y, ref: materialised(h, w, y))]


def gpu_inputs(N, H, V, T, dtype, ref_model, seed=0, device="cuda"):
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    h = torch.randn(N // T, T, H, generator=g, device=dev, dtype=dtype)
    w = torch.randn(V, H, generator=g, device=dev, dtype=dtype).mul_(H ** -0.5)
    y = torch.randint(0, V, (N // T, T), generator=g, device=dev)
    y[:, : min(PROMPT, T - 1)] = -100
    if ref_model:
        ref = reference_model(h, w, g)
    else:
        ref = {"rc": torch.zeros(N // T // 2, device=dev), "rr": torch.zeros(N // T // 2, device=dev)}
    return h.requires_grad_(), w.requires_grad_(), y, ref


def _why(e: BaseException) -> str:
    # Missing packages or wheels and ops without a CUDA kernel (yet) make a path unavailable; anything
    # else is an error of that path (the run goes on, and exits 1 at the end).
    kind = "unavailable" if isinstance(e, (ImportError, NotImplementedError)) else "error"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{kind} ({type(e).__name__}: {first[:160]})"


def gpu_section(title, paths, h, w, y, ref, reps, floor, head):
    """Agreement with the materialised path, then time and extra memory of every path that runs."""
    leaves = (h, w)

    def step(fn):
        for t in leaves:
            t.grad = None
        if head:
            lp, ent = fn(h.reshape(-1, h.shape[-1]), w, y.reshape(-1).clamp(min=0), ref)
            value = lp
            (lp.sum() - 0.1 * ent.sum()).backward()
        else:
            value = fn(h, w, y, ref)
            value.backward()
        return value.detach(), h.grad, w.grad

    rows = {name: {"section": title, "path": name, "status": "ok"} for name, _ in paths}
    rows = {"GEMM floor (torch.matmul)": {"section": title, "path": "GEMM floor (torch.matmul)",
                                          "status": "ok"}, **rows}
    ok = {}
    ref_out = got = None
    for name, fn in [paths[-1]] + paths[:-1]:  # the materialised path first: the others are compared with it
        try:
            got = step(fn)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - every failure is reported as that path's row
            rows[name]["status"] = _why(e)
            print(f"  {name}: {rows[name]['status']}", flush=True)
            for t in leaves:
                t.grad = None
            torch.cuda.empty_cache()
            continue
        ok[name] = fn
        if name == paths[-1][0]:
            ref_out = got
        elif ref_out is not None:
            rows[name]["max_rel_diff"] = {k: ((g.float() - r.float()).abs().max() / r.float().abs().max()).item()
                                          for k, g, r in zip(("value", "d_hidden", "d_weight"), got, ref_out)}
    del ref_out, got
    timed = {n: (lambda f=f: step(f)) for n, f in ok.items()}
    try:
        timed = {"GEMM floor (torch.matmul)": floor(h, w, ref), **timed}
    except Exception as e:  # noqa: BLE001 - e.g. out of memory for its logits buffer
        rows["GEMM floor (torch.matmul)"]["status"] = _why(e)
    events = {name: [] for name in timed}
    for rep in range(reps + 1):
        for name, run in list(timed.items()):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            try:
                start.record()
                run()
                end.record()
            except Exception as e:  # noqa: BLE001
                rows[name]["status"] = _why(e)
                del timed[name], events[name]
                ok.pop(name, None)
                continue
            if rep > 0:
                events[name].append((start, end))
    torch.cuda.synchronize()
    for name, evs in events.items():
        rows[name]["ms"] = statistics.median(s.elapsed_time(e) for s, e in evs)
    del timed
    for name, fn in ok.items():
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        try:
            step(fn)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            rows[name]["status"] = _why(e)
            continue
        grads = sum(t.grad.numel() * t.grad.element_size() for t in leaves if t.grad is not None)
        rows[name]["extra_GiB"] = (torch.cuda.max_memory_allocated() - before - grads) / 2**30
    for t in leaves:
        t.grad = None
    floor_ms = rows["GEMM floor (torch.matmul)"].get("ms")
    anchors = {"vs_trl": next((r.get("ms") for n, r in rows.items() if n.startswith("TRL")), None),
               "vs_liger": next((r.get("ms") for n, r in rows.items() if n.startswith("Liger")), None)}
    for r in rows.values():
        if r.get("ms"):
            r["x_floor"] = r["ms"] / floor_ms if floor_ms else None
            for key, ms in anchors.items():
                r[key] = ms / r["ms"] if ms else None
    return list(rows.values())


def _fmt(x, spec, suffix=""):
    return "" if x is None else f"{x:{spec}}{suffix}"


def print_gpu_rows(rows):
    print(f"{'path (forward + backward)':45s} {'median ms':>10s} {'x floor':>8s} {'vs TRL':>7s} {'vs Liger':>8s} "
          f"{'extra GiB':>9s}  max rel diff vs materialised (value / dH / dW)")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['path']:45s} {r['status']}")
            continue
        d = r.get("max_rel_diff")
        print(f"{r['path']:45s} {_fmt(r.get('ms'), '10.2f'):>10s} {_fmt(r.get('x_floor'), '.2f', 'x'):>8s} "
              f"{_fmt(r.get('vs_trl'), '.2f', 'x'):>7s} {_fmt(r.get('vs_liger'), '.2f', 'x'):>8s} "
              f"{_fmt(r.get('extra_GiB'), '9.2f'):>9s}  " + (" / ".join(f"{v:.1e}" for v in d.values()) if d else ""))


def gpu_main(a) -> int:
    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device (--device cuda needs one; torch.cuda.is_available() is False)")
        return 0
    dtype = getattr(torch, a.dtype)
    T = a.seq_len or min(128, a.tokens // 2)
    if a.tokens % (2 * T):
        raise SystemExit(f"--tokens {a.tokens} must be a multiple of 2 x the sequence length {T}")
    dev = torch.cuda.get_device_name()
    report = {"device": dev, "torch": torch.__version__, "triton": _version("triton"),
              "shape": {"N": a.tokens, "H": a.hidden, "V": a.vocab, "T": T, "prompt": PROMPT, "dtype": a.dtype},
              "reps": a.reps, "wheels": WHEELS, "anchor_versions": _anchor_versions(),
              "dpo_kernels": None if DK_IMPORT_ERROR else os.path.dirname(dk.__file__),
              "dpo_kernels_error": None if DK_IMPORT_ERROR is None else str(DK_IMPORT_ERROR), "results": []}
    sections = [("dpo", "dpo, reference log-probs", False), ("dpo", "dpo, reference model", True),
                ("head", "head", False)]
    for key, title, ref_model in sections:
        if a.only and a.only != key:
            continue
        h, w, y, ref = gpu_inputs(a.tokens, a.hidden, a.vocab, T, dtype, ref_model)
        print(f"\n== {title}: {dev}, torch {torch.__version__}, N={a.tokens} ({a.tokens // T} sequences of {T} tokens"
              f"{f', {PROMPT} prompt tokens masked' if key == 'dpo' else ''}) H={a.hidden} V={a.vocab} {a.dtype}; "
              f"the [N, V] fp32 logits would be {a.tokens * a.vocab * 4 / 2**30:.2f} GiB", flush=True)
        head = key == "head"
        floor = (lambda h_, w_, r_: GemmFloor(h_, w_, {})) if head else GemmFloor
        try:
            rows = gpu_section(title, gpu_head_paths() if head else gpu_dpo_paths(), h, w, y, ref, a.reps, floor,
                               head)
        except Exception as e:  # noqa: BLE001 - e.g. a CUDA error surfacing at a synchronisation
            rows = [{"section": title, "path": "(the whole section)", "status": _why(e)}]
        print_gpu_rows(rows)
        report["results"] += rows
        report["anchors"] = {k: sys.modules[m].__file__ for k, m in (("trl", "trl.kernels.chunked_logprob"),
                                                                     ("liger", "liger_kernel.chunked_loss.dpo_loss"))
                             if m in sys.modules}
        if a.json:  # after every section, so a timeout keeps what was measured
            with open(a.json, "w") as f:
                json.dump(report, f, indent=1)
        del h, w, y, ref
        _MODULES.clear()
        torch.cuda.empty_cache()
    errors = [r for r in report["results"] if r["status"].startswith("error")]
    if errors:
        print(f"FAILED: {len(errors)} path(s) raised an error (see above)", file=sys.stderr)
    return 1 if errors else 0


def _version(name):
    try:
        return importlib.import_module(name).__version__
    except Exception:  # noqa: BLE001
        return None


def _anchor_versions() -> dict:
    """The versions of TRL and Liger measured: from the wheels' dist-info with --wheels, else installed."""
    from importlib import metadata

    path = [os.path.join(os.path.abspath(WHEELS), "site")] if WHEELS else None
    versions = {}
    for name in ("trl", "liger_kernel"):
        found = [d.version for d in metadata.distributions(name=name, **({"path": path} if path else {}))]
        versions[name] = found[0] if found else None
    return versions


def main():
    global LIGER_COMPILED, WHEELS
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: the GPU comparison (CUDA events, torch's allocator peak; TRL's Triton path, Liger "
                         "compiled, the GEMM floor); prints SKIPPED and exits 0 without a device")
    ap.add_argument("--shape", choices=sorted(SHAPES),
                    help="large: N = 8192 (4 pairs x 2 x 1024), H = 4096, V = 128256, bf16 (sets the next five)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seq-len", type=int, help="tokens per sequence in the dpo comparison (default min(128, N / 2))")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", choices=sorted(SECTIONS), help="run one comparison (default: all three)")
    ap.add_argument("--liger-compiled", action="store_true",
                    help="Liger with compiled=True (torch.compile of its chunk step; inductor on the CPU); "
                         "always on with --device cuda")
    ap.add_argument("--wheels", help="load TRL's and Liger's modules from this folder's site/ "
                                     "(scripts/fetch_gpu_wheels.sh) instead of the installed packages")
    ap.add_argument("--json", help="--device cuda: write the results here (after every section)")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    for key, value in SHAPES.get(a.shape, {}).items():
        setattr(a, key, value)
    torch.set_num_threads(a.threads)
    LIGER_COMPILED = a.liger_compiled
    WHEELS = a.wheels
    if a.device == "cuda":
        return gpu_main(a)
    if DK_IMPORT_ERROR is not None:
        raise DK_IMPORT_ERROR
    dtype = getattr(torch, a.dtype)
    if a.memory_child is not None:
        section, i = a.memory_child.split(":")
        make, step, paths = SECTIONS[section]
        fn = paths[int(i)][1]
        step(fn, *make(8, 16, 64, dtype))  # warm-up at a tiny shape: libraries, pools
        inputs = make(a.tokens, a.hidden, a.vocab, dtype, **_seq_len(section, a))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step(fn, *inputs)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
        return 0
    sections = [a.only] if a.only else list(SECTIONS)
    peaks = {section: memory_peaks(section, a) for section in sections}  # first: see memory_peaks
    for section in sections:
        run_section(section, a, dtype, peaks[section])
    return 0


def _seq_len(section, a) -> dict:
    return {"seq_len": a.seq_len} if section.startswith("dpo") and a.seq_len else {}


if __name__ == "__main__":
    sys.exit(main())
