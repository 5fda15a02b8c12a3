// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// What the CPU benchmarks share: their command line and how they draw their inputs.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace dpo_bench {

inline std::uint64_t splitmix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/// Uniform in [-1, 1), a pure function of i so inputs do not depend on the thread count.
inline float uniform(std::uint64_t i) {
  return static_cast<float>(splitmix(i) >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

/// Initializes Google Benchmark with this bench's defaults (`repetitions` repetitions,
/// aggregates only, random interleaving) ahead of the command line, so that every
/// --benchmark_* flag overrides them, and takes --dpo_threads=N (at least 1) into *threads.
/// Returns false when a flag is not recognized (benchmark has reported it).
inline bool initialize(int argc, char** argv, int repetitions, int* threads) {
  // benchmark may keep pointers into its argv: the strings live as long as the program.
  static std::vector<std::string> defaults;
  defaults = {"--benchmark_repetitions=" + std::to_string(repetitions),
              "--benchmark_report_aggregates_only=true",
              "--benchmark_enable_random_interleaving=true"};
  static std::vector<char*> args;
  args = {argv[0]};
  for (std::string& d : defaults) args.push_back(&d[0]);
  const std::string threads_flag = "--dpo_threads=";
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], threads_flag.c_str(), threads_flag.size()) == 0) {
      *threads = std::max(1, std::atoi(argv[i] + threads_flag.size()));
    } else {
      args.push_back(argv[i]);
    }
  }
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  return !benchmark::ReportUnrecognizedArguments(n, args.data());
}

}  // namespace dpo_bench
