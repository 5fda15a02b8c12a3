// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The demo: trains a tiny softmax language model with DPO through dpo::cpu, on a synthetic
// preference task whose true preference is known, against a frozen reference copy.
//
// Model (Eigen, float): the hidden state of the row that predicts token t+1 and its logits are
//     h_t = E[x_t] + Q[instruction],     z_t = h_t W^T + b
// a bigram model conditioned on the prompt's first token, one of a few "instructions", whose
// LM head W [vocab, dim] (nn.Linear's layout) and b go through the library's fused head.
// Task: each instruction has a hidden utility per vocabulary token; the true score of a
// completion is the sum of its tokens' utilities under the prompt's instruction. A pair is
// two completions sampled from the reference for the same prompt, the higher-scoring one
// chosen. DPO never sees the utilities, only which completion won.
//
// Per training step: the model writes the hidden states of a batch in TRL's padded layout
// (rows of the P chosen sequences, then of the P rejected ones; prompt and padding rows
// labelled -100), and one call of dpo::cpu::linear_dpo (dpo/cpu/linear_dpo.hpp) forms the
// logits chunk by chunk, computes the sigmoid DPO loss against reference log-probs
// precomputed once with dpo::cpu::linear_pair_logps, and returns dLoss/dhidden, dLoss/dW and
// dLoss/db: the [rows, vocab] logits of the batch never exist. The model backpropagates
// dLoss/dhidden by hand into E and Q for an Adam step.
//
// Reported every --eval-every steps: the training loss and reward margin (mean over the
// steps since the last row), the held-out loss and preference accuracy (share of held-out
// pairs whose implicit reward margin beta * ((pi_c - rho_c) - (pi_r - rho_r)) is > 0, ties
// counting one half, so a policy equal to the reference scores 0.5), and the true score: the
// hidden score of completions sampled from the policy on the held-out prompts (step 0 is the
// reference's); the last line adds how often they beat the reference's samples. Exits 1 when the final held-out accuracy is not above 0.75 (the
// demo doubles as a smoke test; --no-check turns that off). Every printed number depends on
// the seed only, not on the thread count.
#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <dpo/dpo.hpp>
#include <string>
#include <thread>
#include <vector>

#ifdef _WIN32
#include <io.h>
#define DPO_DEMO_ISATTY(fd) _isatty(fd)
#else
#include <unistd.h>
#define DPO_DEMO_ISATTY(fd) isatty(fd)
#endif

namespace {

using matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using row_vector = Eigen::RowVectorXf;

// ---------------------------------------------------------------------------------------
// Settings and command line

struct settings {
  int steps = 1000;
  std::uint64_t seed = 1;
  int threads = 0;  // 0: every hardware thread
  int batch = 128;  // pairs per step
  int eval_every = 100;
  double beta = 0.1;
  double lr = 0.01;
  bool check = true;
  // The task and model; fixed (not flags) so the accuracy check stays meaningful.
  int vocab = 256;
  int dim = 64;
  int instructions = 4;
  int min_prompt = 3;  // tokens, the instruction included
  int max_prompt = 8;
  int completion = 24;  // tokens per completion
  int train_pairs = 32768;
  int heldout_pairs = 512;
};

void usage(std::FILE* f) {
  std::fprintf(f,
               "usage: train_tiny_dpo [--steps N] [--seed N] [--threads N] [--batch N]\n"
               "                      [--eval-every N] [--beta X] [--lr X] [--no-check]\n"
               "  --steps N       training steps (default 1000)\n"
               "  --seed N        seed of the task, data, model and batch order (default 1)\n"
               "  --threads N     worker threads, 0 = all hardware threads (default 0);\n"
               "                  the results do not depend on it\n"
               "  --batch N       preference pairs per step (default 128)\n"
               "  --eval-every N  steps between table rows (default 100)\n"
               "  --beta X        DPO beta (default 0.1)\n"
               "  --lr X          Adam learning rate (default 0.01)\n"
               "  --no-check      exit 0 even if held-out accuracy ends <= 0.75\n");
}

bool parse_long(const char* s, long lo, long hi, long* out) {
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  if (end == s || *end != '\0' || v < lo || v > hi) return false;
  *out = v;
  return true;
}

bool parse_double(const char* s, double lo, double hi, double* out) {
  char* end = nullptr;
  const double v = std::strtod(s, &end);
  if (end == s || *end != '\0' || !(v > lo) || !(v <= hi)) return false;
  *out = v;
  return true;
}

// Returns false (after printing why) on a bad command line.
bool parse_args(int argc, char** argv, settings* s, bool* help) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      *help = true;
      return true;
    }
    if (a == "--no-check") {
      s->check = false;
      continue;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "train_tiny_dpo: unknown option or missing value: %s\n", a.c_str());
      return false;
    }
    const char* v = argv[++i];
    long n = 0;
    bool ok = true;
    if (a == "--steps") {
      ok = parse_long(v, 1, 10000000, &n);
      s->steps = static_cast<int>(n);
    } else if (a == "--seed") {
      ok = parse_long(v, 0, 2147483647, &n);
      s->seed = static_cast<std::uint64_t>(n);
    } else if (a == "--threads") {
      ok = parse_long(v, 0, 1024, &n);
      s->threads = static_cast<int>(n);
    } else if (a == "--batch") {
      ok = parse_long(v, 1, 4096, &n);
      s->batch = static_cast<int>(n);
    } else if (a == "--eval-every") {
      ok = parse_long(v, 1, 10000000, &n);
      s->eval_every = static_cast<int>(n);
    } else if (a == "--beta") {
      ok = parse_double(v, 0.0, 1e3, &s->beta);
    } else if (a == "--lr") {
      ok = parse_double(v, 0.0, 10.0, &s->lr);
    } else {
      std::fprintf(stderr, "train_tiny_dpo: unknown option %s\n", a.c_str());
      return false;
    }
    if (!ok) {
      std::fprintf(stderr, "train_tiny_dpo: bad value for %s: %s\n", a.c_str(), v);
      return false;
    }
  }
  return true;
}

// ---------------------------------------------------------------------------------------
// Random numbers: counter-based (splitmix64), so a value depends on its key only, never on
// how work is batched or ordered; the same on every platform, unlike <random>'s
// distributions.

std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

std::uint64_t key(std::uint64_t a, std::uint64_t b, std::uint64_t c = 0) {
  return mix(mix(mix(a) ^ b) ^ c);
}

// Uniform in (0, 1).
double uniform(std::uint64_t k) { return (static_cast<double>(mix(k) >> 11) + 0.5) * 0x1.0p-53; }

double normal(std::uint64_t k) {
  const double u1 = uniform(k), u2 = uniform(k ^ 0x5851f42d4c957f2dULL);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

// A sequential stream for the few places that draw in order (data set, batch order).
class stream {
 public:
  explicit stream(std::uint64_t seed) : state_(mix(seed)) {}
  std::uint64_t next() { return mix(state_++); }
  int below(int n) { return static_cast<int>(next() % static_cast<std::uint64_t>(n)); }

 private:
  std::uint64_t state_;
};

// Key domains, so that no two uses of the seed share random numbers.
enum domain : std::uint64_t { d_model = 1, d_utility, d_data, d_order, d_eval };

// ---------------------------------------------------------------------------------------
// Threads: work is cut into a fixed number of chunks whatever the thread count, and partial
// sums are added in chunk order, so results never depend on --threads (like dpo::cpu's).

constexpr int num_chunks = 16;

int resolve_threads(int requested) {
  if (requested > 0) return requested;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

template <class Fn>
void for_chunks(int threads, const Fn& fn) {
  const int t = std::min(threads, num_chunks);
  const auto worker = [&](int w) {
    for (int c = w; c < num_chunks; c += t) fn(c);
  };
  std::vector<std::thread> pool;
  for (int w = 1; w < t; ++w) pool.emplace_back(worker, w);
  worker(0);
  for (std::thread& th : pool) th.join();
}

// The first row of chunk c when n rows are cut into num_chunks chunks.
std::int64_t chunk_begin(std::int64_t n, int c) { return n * c / num_chunks; }

// ---------------------------------------------------------------------------------------
// Model, task and data

struct model {
  matrix embed;     // E [vocab, dim]: the context token
  matrix instruct;  // Q [instructions, dim]: the prompt's instruction
  matrix out;       // W [vocab, dim]: the LM head, nn.Linear's layout
  row_vector bias;  // b [vocab]

  void zeros_like(const model& m) {
    embed = matrix::Zero(m.embed.rows(), m.embed.cols());
    instruct = matrix::Zero(m.instruct.rows(), m.instruct.cols());
    out = matrix::Zero(m.out.rows(), m.out.cols());
    bias = row_vector::Zero(m.bias.size());
  }
  std::int64_t parameters() const {
    return embed.size() + instruct.size() + out.size() + bias.size();
  }
};

// The reference, which stands in for an SFT model: random weights scaled so that each
// next-token distribution is peaked (logit std ~2, entropy ~3.5 nats of log(256) = 5.5).
model reference_model(const settings& s) {
  model m;
  const auto fill = [&](matrix& x, std::int64_t rows, std::int64_t cols, double scale,
                        std::uint64_t part) {
    x.resize(rows, cols);
    for (std::int64_t i = 0; i < x.size(); ++i)
      x.data()[i] = static_cast<float>(scale * normal(key(s.seed, d_model, part << 32 | i)));
  };
  fill(m.embed, s.vocab, s.dim, 1.0, 1);
  fill(m.instruct, s.instructions, s.dim, 1.0, 2);
  fill(m.out, s.vocab, s.dim, 2.0 / std::sqrt(2.0 * s.dim), 3);
  matrix b;
  fill(b, 1, s.vocab, 0.5, 4);
  m.bias = b.row(0);
  return m;
}

struct task {
  int instructions = 0;
  Eigen::MatrixXd utility;  // [instructions, vocab], hidden from training

  double score(int instruction, const std::vector<int>& completion) const {
    double sum = 0;
    for (int t : completion) sum += utility(instruction, t);
    return sum;
  }
};

task make_task(const settings& s) {
  task t;
  t.instructions = s.instructions;
  t.utility.resize(s.instructions, s.vocab);
  for (int k = 0; k < s.instructions; ++k)
    for (int v = 0; v < s.vocab; ++v) t.utility(k, v) = normal(key(s.seed, d_utility, k << 16 | v));
  return t;
}

struct pair_example {
  std::vector<int> prompt;  // prompt[0] is the instruction, a token in [0, instructions)
  std::vector<int> chosen, rejected;
  double ref_chosen = 0, ref_rejected = 0;  // reference sequence log-probs
};

// Next-token CDFs of `m` for every (instruction, context token) pair, the only inputs of the
// model, as a [instructions * vocab, vocab] table in double, so sampling is a lookup.
std::vector<double> next_token_cdfs(const model& m, int threads) {
  const std::int64_t instructions = m.instruct.rows(), vocab = m.out.rows();
  const std::int64_t rows = instructions * vocab;
  matrix hidden(rows, m.embed.cols());
  for (std::int64_t r = 0; r < rows; ++r)
    hidden.row(r) = m.embed.row(r % vocab) + m.instruct.row(r / vocab);
  std::vector<double> cdf(static_cast<std::size_t>(rows * vocab));
  for_chunks(threads, [&](int c) {
    const std::int64_t r0 = chunk_begin(rows, c), n = chunk_begin(rows, c + 1) - r0;
    matrix z = hidden.middleRows(r0, n) * m.out.transpose();
    for (std::int64_t i = 0; i < n; ++i) {
      z.row(i) += m.bias;
      const double zmax = z.row(i).maxCoeff();
      double* out = cdf.data() + (r0 + i) * vocab;
      double total = 0;
      for (std::int64_t v = 0; v < vocab; ++v) out[v] = total += std::exp(z(i, v) - zmax);
      for (std::int64_t v = 0; v < vocab; ++v) out[v] /= total;
      out[vocab - 1] = 1.0;  // so that every uniform in (0, 1) finds a token
    }
  });
  return cdf;
}

// Samples one completion per prompt from `m`. The uniform for (prompt i, position j) is
// uniform(key(stream_key, i, j)): two models given the same key use the same random numbers,
// so identical models give identical samples.
std::vector<std::vector<int>> sample(const model& m, const std::vector<std::vector<int>>& prompts,
                                     int length, std::uint64_t stream_key, int threads) {
  const std::int64_t vocab = m.out.rows();
  const std::vector<double> cdf = next_token_cdfs(m, threads);
  const std::int64_t n = static_cast<std::int64_t>(prompts.size());
  std::vector<std::vector<int>> out(prompts.size());
  for_chunks(threads, [&](int c) {
    for (std::int64_t i = chunk_begin(n, c); i < chunk_begin(n, c + 1); ++i) {
      int last = prompts[i].back();
      for (int j = 0; j < length; ++j) {
        // Inverse CDF; upper_bound never lands on a zero-probability token.
        const double* row = cdf.data() + (prompts[i][0] * vocab + last) * vocab;
        const double u = uniform(key(stream_key, static_cast<std::uint64_t>(i), j));
        last = static_cast<int>(std::upper_bound(row, row + vocab, u) - row);
        out[i].push_back(last);
      }
    }
  });
  return out;
}

std::vector<std::vector<int>> make_prompts(const settings& s, stream& rng, int n) {
  std::vector<std::vector<int>> prompts(n);
  for (auto& p : prompts) {
    const int len = s.min_prompt + rng.below(s.max_prompt - s.min_prompt + 1);
    p.push_back(rng.below(s.instructions));
    while (static_cast<int>(p.size()) < len)
      p.push_back(s.instructions + rng.below(s.vocab - s.instructions));
  }
  return prompts;
}

// Pairs for `n` prompts: two reference samples each, the higher true score chosen (a tie,
// which needs two identical completions, is redrawn).
std::vector<pair_example> make_pairs(const settings& s, const task& t, const model& ref,
                                     stream& rng, int n, int threads) {
  const std::vector<std::vector<int>> prompts = make_prompts(s, rng, n);
  std::vector<pair_example> pairs(prompts.size());
  std::vector<std::size_t> todo(prompts.size());
  for (std::size_t i = 0; i < todo.size(); ++i) todo[i] = i;
  for (std::uint64_t round = 0; !todo.empty(); ++round) {
    std::vector<std::vector<int>> p;
    for (std::size_t i : todo) p.push_back(prompts[i]);
    const std::uint64_t k = rng.next();
    const auto a = sample(ref, p, s.completion, key(k, 0), threads);
    const auto b = sample(ref, p, s.completion, key(k, 1), threads);
    std::vector<std::size_t> again;
    for (std::size_t j = 0; j < todo.size(); ++j) {
      const double sa = t.score(p[j][0], a[j]), sb = t.score(p[j][0], b[j]);
      if (sa == sb) {
        again.push_back(todo[j]);
        continue;
      }
      pair_example& e = pairs[todo[j]];
      e.prompt = p[j];
      e.chosen = sa > sb ? a[j] : b[j];
      e.rejected = sa > sb ? b[j] : a[j];
    }
    todo = again;
  }
  return pairs;
}

// ---------------------------------------------------------------------------------------
// A batch in TRL's padded layout

struct batch {
  std::int64_t pairs = 0;
  std::int64_t seq_len = 0;          // rows per sequence
  std::vector<int> context;          // per row: the token the row conditions on
  std::vector<int> instruction;      // per sequence
  std::vector<std::int64_t> labels;  // per row: the next token, or -100 (prompt, padding)
  std::vector<double> ref_chosen, ref_rejected;
  matrix hidden;    // [rows, dim]
  matrix d_hidden;  // [rows, dim]: dLoss/dhidden from the fused head

  dpo::cpu::hidden_pairs<float, std::int64_t> pairs_view() const {
    return dpo::cpu::linear_padded_pairs(hidden.data(), hidden.cols(), hidden.cols(),
                                         labels.data(), 2 * pairs, seq_len);
  }
};

// The model's LM head as the library sees it: W [vocab, dim] and b, no logit transforms.
dpo::cpu::linear_head<float> head_of(const model& m) {
  return dpo::make_linear_head(m.out.data(), m.out.rows(), m.out.cols(), m.out.cols(), m.bias.data());
}

// Fills the token rows of the pairs [first, first + count) of `order` (or of `pairs` in
// order when `order` is empty): sequences [0, P) are chosen, [P, 2P) rejected. Row t of a
// sequence x_0..x_{n-1} predicts x_{t+1} from x_t; rows past n - 1 are padding.
void fill_batch(const settings& s, const std::vector<pair_example>& pairs,
                const std::vector<int>& order, std::size_t first, std::size_t count, batch& b) {
  b.pairs = static_cast<std::int64_t>(count);
  b.seq_len = s.max_prompt + s.completion - 1;
  const std::int64_t rows = 2 * b.pairs * b.seq_len;
  b.context.assign(rows, 0);
  b.labels.assign(rows, -100);
  b.instruction.assign(2 * count, 0);
  b.ref_chosen.resize(count);
  b.ref_rejected.resize(count);
  for (std::size_t i = 0; i < count; ++i) {
    const pair_example& e = pairs[order.empty() ? first + i : order[first + i]];
    b.ref_chosen[i] = e.ref_chosen;
    b.ref_rejected[i] = e.ref_rejected;
    for (int side = 0; side < 2; ++side) {
      const std::size_t seq = side * count + i;
      std::vector<int> x = e.prompt;
      const std::vector<int>& c = side == 0 ? e.chosen : e.rejected;
      x.insert(x.end(), c.begin(), c.end());
      b.instruction[seq] = e.prompt[0];
      const std::int64_t base = static_cast<std::int64_t>(seq) * b.seq_len;
      for (std::size_t t = 0; t + 1 < x.size(); ++t) {
        b.context[base + t] = x[t];
        if (t + 1 >= e.prompt.size()) b.labels[base + t] = x[t + 1];
      }
    }
  }
}

// hidden = E[context] + Q[instruction]; the logits are the fused head's business. Padding
// rows get hidden states too; the library never reads rows labelled -100.
void model_forward(const model& m, batch& b, int threads) {
  const std::int64_t rows = static_cast<std::int64_t>(b.context.size());
  b.hidden.resize(rows, m.embed.cols());
  for_chunks(threads, [&](int c) {
    for (std::int64_t r = chunk_begin(rows, c); r < chunk_begin(rows, c + 1); ++r)
      b.hidden.row(r) = m.embed.row(b.context[r]) + m.instruct.row(b.instruction[r / b.seq_len]);
  });
}

// Backpropagates dLoss/dhidden (b.d_hidden) into the embeddings of `g` (the head's gradients
// g.out and g.bias come from the library).
void model_backward(const batch& b, model& g) {
  g.embed.setZero();
  g.instruct.setZero();
  for (std::int64_t r = 0; r < b.hidden.rows(); ++r) {
    if (b.labels[r] == -100) continue;  // the library wrote exact zeros there
    g.embed.row(b.context[r]) += b.d_hidden.row(r);
    g.instruct.row(b.instruction[r / b.seq_len]) += b.d_hidden.row(r);
  }
}

class adam {
 public:
  adam(const model& m, double lr) : lr_(lr) {
    m1_.zeros_like(m);
    m2_.zeros_like(m);
  }
  void step(model& p, const model& g) {
    ++t_;
    const double b1 = 0.9, b2 = 0.999;
    const float lr_t = static_cast<float>(lr_ * std::sqrt(1 - std::pow(b2, t_)) /
                                          (1 - std::pow(b1, t_)));
    update(p.embed, g.embed, m1_.embed, m2_.embed, lr_t);
    update(p.instruct, g.instruct, m1_.instruct, m2_.instruct, lr_t);
    update(p.out, g.out, m1_.out, m2_.out, lr_t);
    update(p.bias, g.bias, m1_.bias, m2_.bias, lr_t);
  }

 private:
  template <class M>
  static void update(M& p, const M& g, M& m1, M& m2, float lr_t) {
    m1.array() = 0.9f * m1.array() + 0.1f * g.array();
    m2.array() = 0.999f * m2.array() + 0.001f * g.array().square();
    p.array() -= lr_t * m1.array() / (m2.array().sqrt() + 1e-8f);
  }
  double lr_;
  int t_ = 0;
  model m1_, m2_;
};

// Runs `m` on every pair, in batches of up to 256 in order: fn(b, first, count) with batch b
// holding pairs [first, first + count) and m's hidden states.
template <class Fn>
void for_batches(const settings& s, const model& m, const std::vector<pair_example>& pairs,
                 int threads, const Fn& fn) {
  batch b;
  const std::size_t chunk = 256;
  for (std::size_t first = 0; first < pairs.size(); first += chunk) {
    const std::size_t count = std::min(chunk, pairs.size() - first);
    fill_batch(s, pairs, {}, first, count, b);
    model_forward(m, b, threads);
    fn(b, first, count);
  }
}

// Reference sequence log-probs of every pair, computed once (TRL's precompute_ref_log_probs).
void precompute_reference(const settings& s, const model& ref, std::vector<pair_example>& pairs,
                          const dpo::cpu::linear_dpo_options& opt) {
  for_batches(s, ref, pairs, opt.num_threads, [&](batch& b, std::size_t first, std::size_t count) {
    dpo::cpu::linear_pair_logps(b.pairs_view(), head_of(ref), 1.0, b.ref_chosen.data(),
                                b.ref_rejected.data(), opt);
    for (std::size_t i = 0; i < count; ++i) {
      pairs[first + i].ref_chosen = b.ref_chosen[i];
      pairs[first + i].ref_rejected = b.ref_rejected[i];
    }
  });
}

struct heldout_stats {
  double loss = 0, margin = 0, accuracy = 0;
  double true_score = 0, win_rate = 0;  // of policy samples, see true_preference()
};

heldout_stats evaluate(const settings& s, const model& policy,
                       const std::vector<pair_example>& pairs, const dpo::loss_config& cfg,
                       const dpo::cpu::linear_dpo_options& opt) {
  heldout_stats h;
  for_batches(s, policy, pairs, opt.num_threads, [&](batch& b, std::size_t, std::size_t count) {
    // Forward only: the loss and the rewards, no gradient.
    double loss = 0;
    std::vector<double> rc(count), rr(count);
    dpo::forward_outputs out;
    out.loss = &loss;
    out.chosen_rewards = rc.data();
    out.rejected_rewards = rr.data();
    dpo::cpu::linear_dpo_forward(b.pairs_view(), head_of(policy), b.ref_chosen.data(),
                                 b.ref_rejected.data(), cfg, out, opt);
    h.loss += loss * static_cast<double>(count);
    for (std::size_t i = 0; i < count; ++i) {
      const double m = rc[i] - rr[i];
      h.margin += m;
      h.accuracy += m > 0 ? 1.0 : m == 0 ? 0.5 : 0.0;
    }
  });
  const double n = static_cast<double>(pairs.size());
  h.loss /= n;
  h.margin /= n;
  h.accuracy /= n;
  return h;
}

// The true preference, which training never sees: on the held-out prompts, the mean true
// score of completions sampled from the policy, and how often one beats the reference's
// sample drawn with the same random numbers (ties one half).
void true_preference(const settings& s, const task& t, const model& policy,
                     const std::vector<std::vector<int>>& prompts,
                     const std::vector<double>& ref_scores, int threads, heldout_stats* h) {
  const auto samples = sample(policy, prompts, s.completion, key(s.seed, d_eval), threads);
  double total = 0, wins = 0;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    const double sp = t.score(prompts[i][0], samples[i]);
    total += sp;
    wins += sp > ref_scores[i] ? 1.0 : sp == ref_scores[i] ? 0.5 : 0.0;
  }
  h->true_score = total / static_cast<double>(prompts.size());
  h->win_rate = wins / static_cast<double>(prompts.size());
}

// ---------------------------------------------------------------------------------------
// Progress: a \r-redrawn bar on a terminal, nothing in between table rows otherwise (logs, CI).

class progress {
 public:
  progress(int total, bool tty) : total_(total), tty_(tty) {}
  void bar(int step, double loss, double seconds) {
    if (!tty_) return;
    const int width = 30;
    const int filled = static_cast<int>(static_cast<long long>(width) * step / total_);
    std::printf("\r  [");
    for (int i = 0; i < width; ++i) std::putchar(i < filled ? '#' : '.');
    std::printf("] %d/%d  loss %.4f  %.1f s ", step, total_, loss, seconds);
    std::fflush(stdout);
    drawn_ = true;
  }
  void line(const char* text) {
    if (drawn_) std::printf("\r%-79s\r", "");
    drawn_ = false;
    std::printf("%s\n", text);
    std::fflush(stdout);
  }

 private:
  int total_;
  bool tty_;
  bool drawn_ = false;
};

int run(const settings& s) {
  const auto start = std::chrono::steady_clock::now();
  const auto seconds = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  const int threads = resolve_threads(s.threads);
  dpo::cpu::linear_dpo_options opt;
  opt.num_threads = threads;
  opt.metrics = false;  // loss, rewards and margins are always computed; TRL's extras are not needed
  dpo::loss_config cfg;  // sigmoid loss
  cfg.beta = s.beta;

  const task t = make_task(s);
  const model reference = reference_model(s);
  stream data_rng(key(s.seed, d_data));
  std::vector<pair_example> train = make_pairs(s, t, reference, data_rng, s.train_pairs, threads);
  std::vector<pair_example> heldout =
      make_pairs(s, t, reference, data_rng, s.heldout_pairs, threads);
  precompute_reference(s, reference, train, opt);
  precompute_reference(s, reference, heldout, opt);
  std::vector<std::vector<int>> eval_prompts;
  for (const pair_example& e : heldout) eval_prompts.push_back(e.prompt);
  std::vector<double> ref_scores;
  for (const auto& c : sample(reference, eval_prompts, s.completion, key(s.seed, d_eval), threads))
    ref_scores.push_back(t.score(eval_prompts[ref_scores.size()][0], c));

  std::printf("train_tiny_dpo: DPO through dpo %s (dpo::cpu) on a tiny softmax LM\n",
              DPO_VERSION_STRING);
  std::printf("  model  h_t = E[x_t] + Q[instruction], z_t = h_t W^T + b: vocab %d, dim %d,"
              " %d instructions, %lld parameters\n",
              s.vocab, s.dim, s.instructions, static_cast<long long>(reference.parameters()));
  std::printf("  task   hidden per-instruction token utilities; true score = sum over the"
              " completion;\n         chosen = the higher-scoring of two %d-token reference"
              " samples\n",
              s.completion);
  std::printf("  data   %d training pairs, %d held-out pairs, reference log-probs precomputed"
              " (%.1f s)\n",
              s.train_pairs, s.heldout_pairs, seconds());
  std::printf("  train  sigmoid loss, beta %g, Adam lr %g, %d pairs/step, %d steps, %d threads,"
              " seed %llu\n",
              s.beta, s.lr, s.batch, s.steps, threads, static_cast<unsigned long long>(s.seed));
  {
    // What the fused head does with a training batch: its mode and workspace.
    batch probe;
    std::vector<int> first(static_cast<std::size_t>(std::min<int>(s.batch, s.train_pairs)));
    for (std::size_t i = 0; i < first.size(); ++i) first[i] = static_cast<int>(i);
    fill_batch(s, train, first, 0, first.size(), probe);
    model_forward(reference, probe, threads);
    const dpo::cpu::linear_dpo_plan plan =
        dpo::cpu::linear_dpo_workspace_size(probe.pairs_view(), head_of(reference), cfg, opt);
    std::printf("  head   fused LM head (dpo::cpu::linear_dpo), %s GEMM passes over W: logits"
                " of up to %lld\n         completion rows x %d vocab at a time in a %.1f MiB"
                " workspace (of %lld rows per batch)\n\n",
                plan.mode == dpo::linear_mode::three_pass ? "three" : "four",
                static_cast<long long>(plan.chunk_rows), s.vocab,
                static_cast<double>(plan.workspace_bytes) / (1 << 20),
                static_cast<long long>(probe.hidden.rows()));
  }

  progress bar(s.steps, DPO_DEMO_ISATTY(1) != 0);
  char line[160];
  bar.line(" step   train loss  train margin   held-out loss  held-out acc   true score");
  const auto report = [&](int step, double loss, double margin, const model& policy) {
    heldout_stats h = evaluate(s, policy, heldout, cfg, opt);
    true_preference(s, t, policy, eval_prompts, ref_scores, threads, &h);
    std::snprintf(line, sizeof line, "%5d   %10.4f  %12.4f   %13.4f  %12.3f   %10.2f", step, loss,
                  margin, h.loss, h.accuracy, h.true_score);
    bar.line(line);
    return h;
  };

  model policy = reference;  // the reference stays frozen; the policy starts as its copy
  model grad;
  grad.zeros_like(policy);
  adam opt_state(policy, s.lr);
  heldout_stats last = report(0, std::log(2.0), 0.0, policy);

  stream order_rng(key(s.seed, d_order));
  std::vector<int> order(train.size());
  std::size_t cursor = order.size();  // start with a shuffle
  batch b;
  double sum_loss = 0, sum_margin = 0;
  int since = 0;
  for (int step = 1; step <= s.steps; ++step) {
    if (cursor + static_cast<std::size_t>(s.batch) > order.size()) {
      for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
      for (std::size_t i = order.size() - 1; i > 0; --i)
        std::swap(order[i], order[order_rng.below(static_cast<int>(i + 1))]);
      cursor = 0;
    }
    const std::size_t count = std::min<std::size_t>(s.batch, order.size());
    fill_batch(s, train, order, cursor, count, b);
    cursor += count;

    model_forward(policy, b, threads);
    // One call: loss, metrics, dLoss/dhidden (written), dLoss/dW and dLoss/db (added to).
    double loss = 0;
    dpo::metrics metrics;
    dpo::forward_outputs out;
    out.loss = &loss;
    out.metrics = &metrics;
    b.d_hidden.resize(b.hidden.rows(), b.hidden.cols());
    grad.out.setZero();
    grad.bias.setZero();
    dpo::cpu::linear_dpo_grads<float> g;
    g.chosen_hidden = g.rejected_hidden = b.d_hidden.data();
    g.chosen_hidden_stride = g.rejected_hidden_stride = b.d_hidden.cols();
    g.weight = grad.out.data();
    g.weight_stride = grad.out.cols();
    g.bias = grad.bias.data();
    dpo::cpu::linear_dpo(b.pairs_view(), head_of(policy), b.ref_chosen.data(),
                         b.ref_rejected.data(), cfg, out, g, opt);
    model_backward(b, grad);
    opt_state.step(policy, grad);

    sum_loss += loss;
    sum_margin += metrics.rewards_margins;
    ++since;
    bar.bar(step, loss, seconds());
    if (step % s.eval_every == 0 || step == s.steps) {
      last = report(step, sum_loss / since, sum_margin / since, policy);
      sum_loss = sum_margin = 0;
      since = 0;
    }
  }

  std::printf("\nfinal held-out preference accuracy %.3f (chance 0.5), held-out reward margin "
              "%.3f;\npolicy samples beat reference samples on the true preference %.1f%% of the "
              "time; wall time %.1f s\n",
              last.accuracy, last.margin, 100.0 * last.win_rate, seconds());
  if (s.check && !(last.accuracy > 0.75)) {
    std::printf("FAILED: held-out accuracy %.3f is not above 0.75\n", last.accuracy);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  settings s;
  bool help = false;
  if (!parse_args(argc, argv, &s, &help)) {
    usage(stderr);
    return 2;
  }
  if (help) {
    usage(stdout);
    return 0;
  }
  try {
    return run(s);
  } catch (const dpo::error& e) {
    std::fprintf(stderr, "train_tiny_dpo: %s\n", e.what());
    return 1;
  }
}
