# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: Filled by test_trl_parity: case -> {quantity: relative error}.
TRL_REPORT: dict = {}


def pytest_terminal_summary(terminalreporter):
    if not TRL_REPORT:
        return
    tr = terminalreporter
    tr.section("dpo_kernels vs TRL DPOTrainer (fp32, max relative error)")
    tr.write_line(f"{'case':38s} {'loss':>9s} {'metrics':>9s} {'grad':>9s}  {'pair-level loss/grad':>20s}")
    for case, e in sorted(TRL_REPORT.items()):
        pair = f"{e['pair_loss']:.1e}/{e['pair_grad']:.1e}" if "pair_loss" in e else "(token-level only)"
        tr.write_line(f"{case:38s} {e['loss']:9.1e} {e['metrics']:9.1e} {e['grad']:9.1e}  {pair:>20s}")
