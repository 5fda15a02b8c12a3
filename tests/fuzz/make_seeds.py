#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets: fuzz_dpo's (tests/fuzz/corpus/: one valid
case per loss type over the layouts and dtypes, the TRL combinations (MPO, WPO, LD-DPO,
f-divergences), special values, and one case per deliberately bad argument) and
fuzz_linear_dpo's (tests/fuzz/corpus_linear/: one case per loss type over layouts, dtypes,
modes, chunk sizes, masks, bias, transforms and both reference forms, the combinations, and
bad configurations). The byte layouts are documented at the top of each target. Rerun after
changing one: python3 tests/fuzz/make_seeds.py"""
import pathlib
import struct

OUT = pathlib.Path(__file__).resolve().parent / "corpus"
OUT_LINEAR = pathlib.Path(__file__).resolve().parent / "corpus_linear"
SIGMOID, IPO, EXO_PAIR, BCO_PAIR, SPPO_HARD, AOT, AOT_UNPAIRED, DISCOPOP, SFT, ORPO = (
    0, 2, 3, 6, 7, 8, 9, 12, 14, 17)
# Edit codes (fuzz_dpo.cpp): a special value, the label logit to -inf, a tie with the row
# max, a shift of the whole row.
NEG_INF_LABEL, TIE, SHIFT = 96, 104, 112
SPECIAL_1E7, SHIFT_1E5, SHIFT_1E7, SHIFT_1E17, SHIFT_1E30 = 22, 2, 3, 5, 7
REF_1E300, REF_1E15 = 224 + 7, 192 + 31  # special_value(b) for a reference byte b >= 200
PACKED, PADDED = 1 << 2, 0


def case(flags=0, pairs=2, seq_len=4, vocab=37, extra_stride=1, scale=0, seed=1, labels=0,
         num_terms=0, terms=(0,), beta=0, eps=0, div=0, misc=0, cfg_flags=0, knob=0, grad=0,
         refs=None, edits=()):
    b = bytes([flags, pairs - 1, seq_len - 1]) + struct.pack("<H", vocab - 1)
    b += bytes([extra_stride, scale]) + struct.pack("<I", seed) + bytes([labels, num_terms])
    b += bytes(terms) + bytes([beta, eps, div, misc, cfg_flags, knob, grad])
    b += bytes(refs if refs is not None else [0] * (2 * pairs))
    for code, row, col in edits:
        b += bytes([code]) + struct.pack("<HH", row, col)
    return b


def main():
    OUT.mkdir(exist_ok=True)
    seeds = {}
    for t in range(18):
        flags = (t % 4) | ((t // 4) % 3) << 2 | (16 if t % 2 else 0) | (32 if t % 5 == 0 else 0)
        # ORPO's loss is infinite for a sequence without completion tokens: use them all.
        if t == ORPO:
            flags &= ~16
        seeds[f"loss_{t:02d}"] = case(flags=flags, pairs=1 + t % 4, seq_len=1 + (t * 3) % 8,
                                      vocab=1 + (t * 37) % 300, scale=t % 4, seed=t,
                                      labels=1 if t == ORPO else 0, terms=(t,),
                                      eps=2 if t == EXO_PAIR else 0)
    seeds["mpo"] = case(num_terms=13, terms=(SIGMOID + 20, BCO_PAIR + 40, SFT))
    seeds["wpo"] = case(flags=4, cfg_flags=4)
    seeds["ld_dpo"] = case(flags=8, cfg_flags=32)
    for d in (1, 2, 3):
        seeds[f"f_divergence_{d}"] = case(flags=d, div=d, beta=3)
    seeds["specials"] = case(flags=2, scale=4, edits=[(0, 0, 0), (1, 3, 5), (2, 9, 1), (3, 12, 2),
                                                      (7, 1, 1), (10, 2, 0), (141, 4, 0),
                                                      (200, 5, 0)])
    seeds["bad_label"] = case(flags=1, edits=[(136 + 37, 3, 0)])
    seeds["big_vocab"] = case(flags=1, pairs=4, seq_len=8, vocab=300, extra_stride=2)
    for k in range(20, 29):
        layout = PACKED if k == 27 else PADDED if k == 28 else (k % 3) << 2
        seeds[f"bad_arg_{k}"] = case(flags=k % 4 | layout, knob=k)
    seeds["bad_config"] = case(beta=11)
    # Issue 16. Tied large maxima: a 1e7 logit copied into three more columns of row 0,
    # whole rows shifted by 1e5 / 1e7 (fp32) and 1e17 / 1e30 (fp64).
    seeds["tied_maxima_f32"] = case(flags=0, edits=[(SPECIAL_1E7, 0, 3), (TIE, 0, 5), (TIE, 0, 7),
                                                    (TIE, 0, 9), (SHIFT + SHIFT_1E5, 1, 0),
                                                    (SHIFT + SHIFT_1E7, 2, 0), (SHIFT + SHIFT_1E7, 9, 0)])
    seeds["tied_maxima_f64"] = case(flags=2, cfg_flags=4, edits=[
        (SHIFT + SHIFT_1E17, 1, 0), (SHIFT + SHIFT_1E17, 2, 0), (SHIFT + SHIFT_1E30, 9, 0),
        (SHIFT + SHIFT_1E30, 10, 0)])
    # -inf label logits on the rejected side (rows 8-15 of 2 pairs x 4 rows), per loss type.
    for t in (SIGMOID, IPO, EXO_PAIR, SPPO_HARD, AOT, AOT_UNPAIRED, DISCOPOP):
        seeds[f"neg_inf_label_{t:02d}"] = case(
            flags=t % 4, labels=1, terms=(t,), eps=2 if t in (EXO_PAIR, AOT, AOT_UNPAIRED) else 0,
            edits=[(NEG_INF_LABEL, 8, 0), (NEG_INF_LABEL, 12, 0), (NEG_INF_LABEL + 3, 13, 0)])
    seeds["neg_inf_label_wpo"] = case(flags=2, labels=1, cfg_flags=4, edits=[(NEG_INF_LABEL, 9, 0)])
    # Infinite margins: rejected reference log-probs 1e300 and 1e15 under each f-divergence.
    for d in (0, 1, 2, 3):
        seeds[f"inf_margin_{d}"] = case(flags=2, div=d, refs=[10, REF_1E300, 20, REF_1E15])
    # Several batch-coupled terms: aot with aot_unpaired in both orders (eps 0.1), MPO.
    seeds["aot_combo"] = case(flags=2, num_terms=10, terms=(AOT, AOT_UNPAIRED + 20), eps=2)
    seeds["aot_combo_swapped"] = case(flags=2, num_terms=10, terms=(AOT_UNPAIRED + 20, AOT), eps=2)
    seeds["aot_combo_inf"] = case(flags=0, num_terms=10, terms=(AOT + 40, AOT_UNPAIRED), labels=1,
                                  edits=[(NEG_INF_LABEL, 8, 0)])
    seeds["mpo_wpo_inf"] = case(flags=2, num_terms=13, terms=(SIGMOID + 20, BCO_PAIR + 40, SFT),
                                cfg_flags=4, labels=1, edits=[(NEG_INF_LABEL, 10, 0)])
    # The sharded check (the seed picks 1 + seed % 3 vocabulary shards; one context rank for
    # seeds below 3): a NaN logit in pair 0's
    # chosen rows under WPO, without and with an NLL term (the sharded backward threw on the
    # NaN NLL token gradient), and a 1e7 maximum tied in three columns of 3 shards.
    seeds["shard_wpo_nan"] = case(flags=2, cfg_flags=4, seed=1, edits=[(0, 0, 3), (0, 1, 30)])
    seeds["shard_mpo_wpo_nan"] = case(flags=2, num_terms=13, terms=(SIGMOID + 20, BCO_PAIR + 40, SFT),
                                      cfg_flags=4, seed=2, edits=[(0, 0, 3)])
    seeds["shard_ties"] = case(flags=0, seed=2, edits=[(SPECIAL_1E7, 0, 2), (TIE, 0, 18), (TIE, 0, 35),
                                                       (SPECIAL_1E7, 9, 36), (TIE, 9, 0)])
    # The context-parallel check (1 + (seed / 3) % 3 context ranks): LD-DPO (refused there),
    # a packed masked batch over 2 x 3 ranks, and the NaN and tie cases over 3 x 2 / 3 x 3.
    seeds["context_ld_dpo"] = case(flags=8, cfg_flags=32, seed=4)
    seeds["context_packed_mask"] = case(flags=PACKED | 16 | 2, pairs=3, seq_len=5, seed=7)
    seeds["context_wpo_nan"] = case(flags=2, cfg_flags=4, seed=5, edits=[(0, 0, 3), (0, 1, 30)])
    seeds["context_ties"] = case(flags=0, seed=8, edits=[(SPECIAL_1E7, 0, 2), (TIE, 0, 18), (TIE, 0, 35),
                                                         (SPECIAL_1E7, 9, 36), (TIE, 9, 0)])
    for name, data in seeds.items():
        (OUT / name).write_bytes(data)
    print(f"wrote {len(seeds)} seeds to {OUT}")
    linear_seeds()


def linear_case(flags=0, pairs=2, rows=4, hidden=4, vocab=37, chunk=0, mode=0, seed=1, labels=0,
                transforms=0, num_terms=0, terms=(0,), beta=0, eps=0, div=0, misc=0, cfg_flags=0,
                lens=None, refs=None):
    """fuzz_linear_dpo.cpp's input: flags (bit 0 double, bits 1-2 layout, 3 mask, 4 bias,
    5 transforms, 6 accumulated dHidden, 7 reference from hidden states), shape, chunk rows,
    mode, seed, label mode, transforms byte, the loss config, the sequences' rows, the
    reference log-probs."""
    b = bytes([flags, pairs - 1, rows - 1, hidden - 1]) + struct.pack("<H", vocab - 1)
    b += bytes([chunk, mode]) + struct.pack("<I", seed) + bytes([labels, transforms, num_terms])
    b += bytes(terms) + bytes([beta, eps, div, misc, cfg_flags])
    b += bytes(lens if lens is not None else [rows - 1 - (i % 2) for i in range(2 * pairs)])
    b += bytes(refs if refs is not None else [8 * (i + 1) for i in range(2 * pairs)])
    return b


def linear_seeds():
    OUT_LINEAR.mkdir(exist_ok=True)
    seeds = {}
    for t in range(18):
        flags = (t % 2) | ((t % 4) << 1) | (8 if t % 3 == 0 else 0) | (16 if t % 2 else 0) \
            | (32 if t % 5 < 2 else 0) | (64 if t % 7 == 0 else 0) | (128 if t % 4 == 1 else 0)
        seeds[f"loss_{t:02d}"] = linear_case(flags=flags, pairs=1 + t % 3, rows=2 + t % 5, hidden=1 + t % 8,
                                             vocab=1 + (t * 37) % 300, chunk=(0, 1, 5, 4)[t % 4], mode=t % 3,
                                             seed=t, transforms=t * 7, terms=(t,),
                                             labels=1 if t == ORPO else 0,
                                             eps=2 if t == EXO_PAIR else 0)
    seeds["mpo"] = linear_case(flags=2, num_terms=13, terms=(SIGMOID + 20, BCO_PAIR + 40, SFT), chunk=3)
    seeds["wpo_ld"] = linear_case(flags=4 | 16, cfg_flags=4 | 32, chunk=2)
    seeds["aot_combo"] = linear_case(flags=1, num_terms=10, terms=(AOT, AOT_UNPAIRED + 20), eps=2, mode=1)
    for d in (1, 2, 3):
        seeds[f"f_divergence_{d}"] = linear_case(flags=d << 1, div=d, beta=3, mode=2)
    seeds["big"] = linear_case(flags=1 | 16 | 32, pairs=3, rows=6, hidden=8, vocab=300, chunk=7, transforms=5)
    seeds["one_row_chunks_three_pass"] = linear_case(flags=6 | 8, chunk=1, mode=1)
    seeds["bad_config"] = linear_case(beta=11)
    seeds["special_refs"] = linear_case(refs=[224, 225, 226, 227])
    for name, data in seeds.items():
        (OUT_LINEAR / name).write_bytes(data)
    print(f"wrote {len(seeds)} seeds to {OUT_LINEAR}")


if __name__ == "__main__":
    main()
