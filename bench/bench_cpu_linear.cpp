// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// CPU benchmark of the linear head (dpo/cpu/linear.hpp) at N = 1024 tokens, H = 512,
// V = 32000, fp32, forward + backward (dHidden, dWeight), against, in the same run:
// - floor: the three Eigen GEMMs alone (logits, dHidden, dWeight), the least any head does
//   (ours does four: the backward recomputes the logits);
// - materialize: the logits GEMM to a full [N, V] fp32 buffer, the library's logits path
//   (sequence_logps, then sequence_logps_backward in place), then the two backward GEMMs.
// The GEMMs of floor and materialize run on the same pool and thread count as ours: each
// thread one Eigen product over its static slice of rows (vocab rows for dWeight). The
// counter extra_bytes is the memory each path needs beyond the inputs and the gradients:
// the [N, V] logits for the other two, the workspace for ours.
//
// DPO from hidden states (dpo/cpu/linear_dpo.hpp), same sizes as 4 pairs x 2 x 128 rows in
// TRL's padded layout (every row a completion token, so every path multiplies all N rows),
// sigmoid loss against reference log-probs, loss + dHidden + dWeight, against:
// - floor: the same three GEMMs alone (dpo_floor_3gemm);
// - materialize: the logits GEMM to a full [N, V] buffer, the logits path's dpo_forward and
//   dpo_backward (in place), the two backward GEMMs (dpo_materialize);
// ours in three-pass mode (whole pairs per chunk: the default budget holds the batch, 64 MiB
// one pair) and four-pass mode (log-probs first, then the recomputing backward).
//
// Defaults: 3 repetitions, aggregates only, interleaved; every --benchmark_* flag overrides
// them. --dpo_threads=N sets the threads of every path (default 2).
#define EIGEN_DONT_PARALLELIZE
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "dpo/cpu/dpo.hpp"
#include "dpo/cpu/linear.hpp"
#include "dpo/cpu/linear_dpo.hpp"

namespace {

constexpr std::int64_t N = 1024, H = 512, V = 32000;
int g_threads = 2;

using mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

using dpo_bench::splitmix;
using dpo_bench::uniform;

struct data {
  mat hidden{N, H}, weight{V, H}, dhidden{N, H}, dweight{V, H};
  mat logits;  // [N, V]: floor and materialize only
  std::vector<std::int64_t> labels;
  std::vector<double> gl, logps, lse;
  data() {
    for (std::int64_t i = 0; i < N * H; ++i) hidden.data()[i] = 2.0f * uniform(i);
    const float a = 3.0f / std::sqrt(static_cast<float>(H));
    for (std::int64_t i = 0; i < V * H; ++i) weight.data()[i] = a * uniform(i + (1ll << 40));
    labels.resize(N);
    gl.resize(N);
    for (std::int64_t r = 0; r < N; ++r) {
      labels[r] = static_cast<std::int64_t>(splitmix(~static_cast<std::uint64_t>(r)) % V);
      gl[r] = 1.0 + 0.5 * uniform(r + (1ll << 50));
    }
    logps.resize(N);
    lse.resize(N);
  }
  dpo::cpu::linear_view<float, std::int64_t> view() const {
    return dpo::linear_view_of(hidden.data(), N, H, dpo::make_linear_head(weight.data(), V, H, H), labels.data());
  }
};

data& get() {
  static data d;
  return d;
}

/// out[rows of the slice] = a[slice] * b^T, one Eigen product per thread.
void gemm_rows_abt(const mat& a, const mat& b, mat& out) {
  dpo::cpu::detail::parallel_for(g_threads, g_threads, [&](std::int64_t t0, std::int64_t t1) {
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t r0 = a.rows() * t / g_threads, r1 = a.rows() * (t + 1) / g_threads;
      out.middleRows(r0, r1 - r0).noalias() = a.middleRows(r0, r1 - r0) * b.transpose();
    }
  });
}

/// The backward GEMMs from G = d logits [N, V]: dhidden = G W, dweight += G^T hidden.
void backward_gemms(data& d) {
  dpo::cpu::detail::parallel_for(g_threads, g_threads, [&](std::int64_t t0, std::int64_t t1) {
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t r0 = N * t / g_threads, r1 = N * (t + 1) / g_threads;
      d.dhidden.middleRows(r0, r1 - r0).noalias() = d.logits.middleRows(r0, r1 - r0) * d.weight;
      const std::int64_t v0 = V * t / g_threads, v1 = V * (t + 1) / g_threads;
      d.dweight.middleRows(v0, v1 - v0).noalias() += d.logits.middleCols(v0, v1 - v0).transpose() * d.hidden;
    }
  });
}

void bm_floor(benchmark::State& state) {
  data& d = get();
  d.logits.resize(N, V);
  for (auto _ : state) {
    gemm_rows_abt(d.hidden, d.weight, d.logits);
    backward_gemms(d);
    benchmark::ClobberMemory();
  }
  state.counters["extra_bytes"] = static_cast<double>(N * V * sizeof(float));
}

void bm_materialize(benchmark::State& state) {
  data& d = get();
  d.logits.resize(N, V);
  dpo::token_view<float, std::int64_t> tv;
  tv.labels = d.labels.data();
  tv.vocab = V;
  tv.row_stride = V;
  tv.num_seqs = N;  // one row per sequence: seq_grad is the per-token gradient
  tv.seq_len = 1;
  std::vector<double> sums(N);
  std::vector<std::int64_t> counts(N);
  dpo::cpu::options opt;
  opt.num_threads = g_threads;
  opt.metrics = false;
  for (auto _ : state) {
    gemm_rows_abt(d.hidden, d.weight, d.logits);
    tv.logits = d.logits.data();
    dpo::cpu::sequence_logps(tv, sums.data(), counts.data(), nullptr, d.lse.data(), opt);
    dpo::cpu::sequence_logps_backward(tv, d.lse.data(), d.gl.data(), d.logits.data(), V, opt);
    backward_gemms(d);
    benchmark::ClobberMemory();
  }
  state.counters["extra_bytes"] = static_cast<double>(N * V * sizeof(float) + N * sizeof(double));
}

void bm_ours(benchmark::State& state) {
  data& d = get();
  d.logits.resize(0, 0);  // ours never needs it
  dpo::cpu::linear_options opt;
  opt.num_threads = g_threads;
  opt.workspace_bytes = state.range(0) << 20;
  const auto v = d.view();
  dpo::cpu::linear_grads<float> g;
  g.hidden = d.dhidden.data();
  g.hidden_stride = H;
  g.weight = d.dweight.data();
  g.weight_stride = H;
  for (auto _ : state) {
    dpo::cpu::linear_logps(v, d.logps.data(), nullptr, d.lse.data(), opt);
    dpo::cpu::linear_logps_backward(v, d.lse.data(), d.gl.data(), nullptr, nullptr, g, opt);
    benchmark::ClobberMemory();
  }
  const auto ch = dpo::cpu::linear_workspace_size(v, opt);
  state.counters["extra_bytes"] = static_cast<double>(ch.workspace_bytes);
  state.counters["chunk_rows"] = static_cast<double>(ch.rows);
  state.counters["chunk_vocab"] = static_cast<double>(ch.vocab);
}

// ---------------------------------------------------------------------------------------
// DPO from hidden states

constexpr std::int64_t pairs = 4, seq_len = N / (2 * pairs);

std::vector<double>& ref_logps(int side) {
  static std::vector<double> r[2] = {std::vector<double>(pairs), std::vector<double>(pairs)};
  static const bool filled = [] {
    for (std::int64_t i = 0; i < pairs; ++i) {
      r[0][i] = -10.0 * seq_len * (1.0 + 0.1 * uniform(i + (1ll << 52)));
      r[1][i] = -10.0 * seq_len * (1.0 + 0.1 * uniform(i + (1ll << 53)));
    }
    return true;
  }();
  (void)filled;
  return r[side];
}

dpo::cpu::hidden_pairs<float, std::int64_t> hidden_view(const data& d) {
  return dpo::cpu::linear_padded_pairs(d.hidden.data(), H, H, d.labels.data(), 2 * pairs, seq_len);
}

dpo::cpu::linear_head<float> head_view(const data& d) {
  dpo::cpu::linear_head<float> h;
  h.weight = d.weight.data();
  h.vocab = V;
  h.hidden = H;
  h.weight_stride = H;
  return h;
}

void bm_dpo_materialize(benchmark::State& state) {
  data& d = get();
  d.logits.resize(N, V);
  const dpo::loss_config cfg;
  dpo::cpu::options opt;
  opt.num_threads = g_threads;
  double loss = 0;
  dpo::metrics m;
  dpo::forward_outputs out;
  out.loss = &loss;
  out.metrics = &m;
  for (auto _ : state) {
    gemm_rows_abt(d.hidden, d.weight, d.logits);
    const auto view = dpo::padded_pairs(d.logits.data(), d.labels.data(), 2 * pairs, seq_len, V, V);
    const dpo::cpu::forward_result r = dpo::cpu::dpo_forward(view, ref_logps(0).data(), ref_logps(1).data(), cfg, opt);
    dpo::cpu::dpo_backward(view, r, dpo::pair_grad_view<float>{d.logits.data(), V, d.logits.data(), V}, 1.0, opt);
    backward_gemms(d);
    benchmark::ClobberMemory();
  }
  state.counters["extra_bytes"] = static_cast<double>(N * V * sizeof(float) + 3 * N * sizeof(double));
}

void bm_dpo_ours(benchmark::State& state) {
  data& d = get();
  d.logits.resize(0, 0);
  const dpo::loss_config cfg;
  dpo::cpu::linear_dpo_options opt;
  opt.num_threads = g_threads;
  opt.mode = state.range(0) == 3 ? dpo::linear_mode::three_pass : dpo::linear_mode::four_pass;
  opt.workspace_bytes = state.range(1) << 20;
  double loss = 0;
  dpo::metrics m;
  dpo::forward_outputs out;
  out.loss = &loss;
  out.metrics = &m;
  dpo::cpu::linear_dpo_grads<float> g;
  g.chosen_hidden = g.rejected_hidden = d.dhidden.data();
  g.chosen_hidden_stride = g.rejected_hidden_stride = H;
  g.weight = d.dweight.data();
  g.weight_stride = H;
  for (auto _ : state) {
    dpo::cpu::linear_dpo(hidden_view(d), head_view(d), ref_logps(0).data(), ref_logps(1).data(), cfg, out, g, opt);
    benchmark::ClobberMemory();
  }
  const dpo::cpu::linear_dpo_plan plan = dpo::cpu::linear_dpo_workspace_size(hidden_view(d), head_view(d), cfg, opt);
  // The workspace plus the per-row bookkeeping (row maps, values, coefficients).
  state.counters["extra_bytes"] = static_cast<double>(plan.workspace_bytes + N * 120);
  state.counters["chunk_rows"] = static_cast<double>(plan.chunk_rows);
}

/// Checks ours (three- and four-pass) against materialize once (loss, dHidden, dWeight).
void check_dpo_once() {
  data& d = get();
  const dpo::loss_config cfg;
  double loss[3] = {0, 0, 0};
  mat dh[3], dw[3];
  for (int k = 0; k < 2; ++k) {
    dpo::cpu::linear_dpo_options opt;
    opt.num_threads = g_threads;
    opt.mode = k == 0 ? dpo::linear_mode::three_pass : dpo::linear_mode::four_pass;
    dpo::forward_outputs out;
    out.loss = &loss[k];
    d.dweight.setZero();
    dpo::cpu::linear_dpo_grads<float> g;
    g.chosen_hidden = g.rejected_hidden = d.dhidden.data();
    g.chosen_hidden_stride = g.rejected_hidden_stride = H;
    g.weight = d.dweight.data();
    g.weight_stride = H;
    dpo::cpu::linear_dpo(hidden_view(d), head_view(d), ref_logps(0).data(), ref_logps(1).data(), cfg, out, g, opt);
    dh[k] = d.dhidden;
    dw[k] = d.dweight;
  }
  d.dweight.setZero();
  d.logits.resize(N, V);
  gemm_rows_abt(d.hidden, d.weight, d.logits);
  dpo::cpu::options o;
  o.num_threads = g_threads;
  const auto view = dpo::padded_pairs(d.logits.data(), d.labels.data(), 2 * pairs, seq_len, V, V);
  const dpo::cpu::forward_result r = dpo::cpu::dpo_forward(view, ref_logps(0).data(), ref_logps(1).data(), cfg, o);
  dpo::cpu::dpo_backward(view, r, dpo::pair_grad_view<float>{d.logits.data(), V, d.logits.data(), V}, 1.0, o);
  backward_gemms(d);
  loss[2] = r.loss;
  for (int k = 0; k < 2; ++k)
    std::fprintf(stderr,
                 "check dpo (%s): loss %.9g vs %.9g; max |dhidden diff| %.3g (max %.3g); max "
                 "|dweight diff| %.3g (max %.3g)\n",
                 k == 0 ? "three-pass" : "four-pass", loss[k], loss[2],
                 (dh[k] - d.dhidden).cwiseAbs().maxCoeff(), d.dhidden.cwiseAbs().maxCoeff(),
                 (dw[k] - d.dweight).cwiseAbs().maxCoeff(), d.dweight.cwiseAbs().maxCoeff());
  d.logits.resize(0, 0);
}

/// Checks ours against materialize once (dHidden, log-probs), so a fast wrong head shows.
void check_once() {
  data& d = get();
  const auto v = d.view();
  dpo::cpu::linear_options opt;
  opt.num_threads = g_threads;
  d.dweight.setZero();
  dpo::cpu::linear_grads<float> g;
  g.hidden = d.dhidden.data();
  g.hidden_stride = H;
  g.weight = d.dweight.data();
  g.weight_stride = H;
  dpo::cpu::linear_logps(v, d.logps.data(), nullptr, d.lse.data(), opt);
  dpo::cpu::linear_logps_backward(v, d.lse.data(), d.gl.data(), nullptr, nullptr, g, opt);
  const std::vector<double> ours_lp = d.logps;
  const mat ours_dh = d.dhidden, ours_dw = d.dweight;
  d.dweight.setZero();
  d.logits.resize(N, V);
  gemm_rows_abt(d.hidden, d.weight, d.logits);
  dpo::token_view<float, std::int64_t> tv;
  tv.logits = d.logits.data();
  tv.labels = d.labels.data();
  tv.vocab = V;
  tv.row_stride = V;
  tv.num_seqs = N;
  tv.seq_len = 1;
  std::vector<double> sums(N);
  std::vector<std::int64_t> counts(N);
  dpo::cpu::options o;
  o.num_threads = g_threads;
  dpo::cpu::sequence_logps(tv, sums.data(), counts.data(), nullptr, d.lse.data(), o);
  dpo::cpu::sequence_logps_backward(tv, d.lse.data(), d.gl.data(), d.logits.data(), V, o);
  backward_gemms(d);
  double dlp = 0;
  for (std::int64_t r = 0; r < N; ++r) dlp = std::max(dlp, std::fabs(ours_lp[r] - sums[r]));
  std::fprintf(stderr,
               "check: max |logp diff| %.3g; max |dhidden diff| %.3g (max %.3g); max |dweight "
               "diff| %.3g (max %.3g)\n",
               dlp, (ours_dh - d.dhidden).cwiseAbs().maxCoeff(), d.dhidden.cwiseAbs().maxCoeff(),
               (ours_dw - d.dweight).cwiseAbs().maxCoeff(), d.dweight.cwiseAbs().maxCoeff());
  d.logits.resize(0, 0);
}

/// The console output, then the ratios of the medians of this run.
class ratio_reporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& r : runs) {
      if (r.error_occurred) continue;
      if (r.run_type == Run::RT_Aggregate && r.aggregate_name != "median") continue;
      const double sec = r.GetAdjustedRealTime() / benchmark::GetTimeUnitMultiplier(r.time_unit);
      med_[r.run_name.function_name + (r.run_name.args.empty() ? "" : "/" + r.run_name.args)] = sec;
      const auto it = r.counters.find("extra_bytes");
      if (it != r.counters.end()) bytes_[r.run_name.function_name + (r.run_name.args.empty() ? "" : "/" + r.run_name.args)] = it->second;
    }
  }
  void Finalize() override {
    ConsoleReporter::Finalize();
    std::printf("\nSummary (medians of one run, threads = %d, N = %lld, H = %lld, V = %lld, fp32)\n",
                g_threads, static_cast<long long>(N), static_cast<long long>(H), static_cast<long long>(V));
    std::printf("%-32s %10s %10s %14s %12s\n", "path", "ms", "x floor", "materialize/x", "extra MiB");
    for (const auto& kv : med_) {
      // Each path against the floor and the materializing path of its own group.
      const bool is_dpo = kv.first.rfind("dpo/", 0) == 0;
      const double floor = med_[is_dpo ? "dpo/floor_3gemm" : "linear/floor_3gemm"];
      const double mat = med_[is_dpo ? "dpo/materialize" : "linear/materialize"];
      std::printf("%-32s %10.1f %10.2f %14.2f %12.1f\n", kv.first.c_str(), kv.second * 1e3,
                  floor > 0 ? kv.second / floor : 0.0, kv.second > 0 ? mat / kv.second : 0.0,
                  bytes_[kv.first] / 1048576.0);
    }
    std::fflush(stdout);
  }

 private:
  std::map<std::string, double> med_, bytes_;
};

}  // namespace

int main(int argc, char** argv) {
  if (!dpo_bench::initialize(argc, argv, 3, &g_threads)) return 1;
  const auto cfg = [](benchmark::internal::Benchmark* b) {
    b->UseRealTime()->Unit(benchmark::kMillisecond)->Iterations(1);
  };
  cfg(benchmark::RegisterBenchmark("linear/floor_3gemm", bm_floor));
  cfg(benchmark::RegisterBenchmark("linear/materialize", bm_materialize));
  // Budgets in MiB: the default (256), and 16 MiB (narrower chunks).
  cfg(benchmark::RegisterBenchmark("linear/ours", bm_ours)->Arg(256)->Arg(16));
  cfg(benchmark::RegisterBenchmark("dpo/floor_3gemm", bm_floor));
  cfg(benchmark::RegisterBenchmark("dpo/materialize", bm_dpo_materialize));
  // {passes, budget MiB}: three-pass with the default budget (the whole batch in one chunk)
  // and with 64 MiB (one pair per chunk); four-pass with the default budget.
  cfg(benchmark::RegisterBenchmark("dpo/ours", bm_dpo_ours)->Args({3, 768})->Args({3, 64})->Args({4, 768}));
  check_once();
  check_dpo_once();
  ratio_reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}
