// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Host-side checks of a loss_config, shared by the CPU API (which throws dpo::error with
// the message) and the CUDA API (which returns it with a status). An empty string means
// the configuration is valid.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>

#include "dpo/core/loss.hpp"

namespace dpo {

/// TRL's name of a loss type ("sigmoid", "aot_unpaired", ...), from the registry.
inline const char* to_string(loss_type t) {
  switch (t) {
#define DPO_X(id, ...) \
  case loss_type::id:  \
    return #id;
    DPO_LOSS_TYPES(DPO_X)
#undef DPO_X
  }
  return "unknown";
}

/// TRL's name of an f-divergence ("reverse_kl", ...), from the registry.
inline const char* to_string(f_divergence f) {
  switch (f) {
#define DPO_X(id)          \
  case f_divergence::id: \
    return #id;
    DPO_F_DIVERGENCES(DPO_X)
#undef DPO_X
  }
  return "unknown";
}

/// Parses TRL's name of a loss type ("aot_pair", the name before TRL 0.28, is accepted for
/// aot_unpaired). Returns false for an unknown name.
inline bool parse_loss_type(const std::string& name, loss_type* out) {
  for (int i = 0; i < num_loss_types; ++i) {
    const auto t = static_cast<loss_type>(i);
    if (name == to_string(t)) {
      *out = t;
      return true;
    }
  }
  if (name == "aot_pair") {
    *out = loss_type::aot_unpaired;
    return true;
  }
  return false;
}

/// Parses TRL's name of an f-divergence. Returns false for an unknown name.
inline bool parse_f_divergence(const std::string& name, f_divergence* out) {
  for (int i = 0; i < num_f_divergences; ++i) {
    const auto f = static_cast<f_divergence>(i);
    if (name == to_string(f)) {
      *out = f;
      return true;
    }
  }
  return false;
}

/// The names of the loss types whose registry row satisfies `pred`, in registry order, as
/// error messages list them: "a, b and c" (`last` joins the last two; ", " gives "a, b, c").
template <class Pred>
std::string loss_type_names(Pred pred, const char* last = " and ") {
  std::string out, pending;
  for (int i = 0; i < num_loss_types; ++i) {
    const auto t = static_cast<loss_type>(i);
    if (!pred(t)) continue;
    if (!pending.empty()) out += (out.empty() ? "" : ", ") + pending;
    pending = to_string(t);
  }
  if (!pending.empty()) out += (out.empty() ? "" : last) + pending;
  return out;
}

/// Every loss type name, in registry order.
inline std::string loss_type_names() {
  return loss_type_names([](loss_type) { return true; }, ", ");
}

/// Every f-divergence name, in registry order.
inline std::string f_divergence_names() {
  std::string out;
  for (int i = 0; i < num_f_divergences; ++i) {
    if (i > 0) out += ", ";
    out += to_string(static_cast<f_divergence>(i));
  }
  return out;
}

namespace detail {

/// The shortest decimal that reads back as v ("0.1", not "0.10000000000000001"), so a
/// message shows the value the caller typed.
inline std::string shortest(double v) {
  char buf[32];
  for (int p = 1; p <= 17; ++p) {
    std::snprintf(buf, sizeof buf, "%.*g", p, v);
    if (std::strtod(buf, nullptr) == v || v != v) break;
  }
  return buf;
}

}  // namespace detail

/// Per-pair weights W_i (WPO's, or weights a caller gives for its pairs; `what` names them)
/// with a configuration: refused when a term sorts pairs (aot, aot_unpaired), whose loss
/// entry i is the i-th sorted position, not pair i. Empty when they are allowed.
inline std::string check_pair_weights(const loss_config& c, const char* what) {
  for (int k = 0; k < c.num_terms; ++k) {
    if (detail::is_batch_type(c.terms[k].type))
      return std::string(what) + " is not supported with loss_type " + to_string(c.terms[k].type) +
             ": it sorts pairs, which would misalign the per-pair weights";
  }
  return {};
}

/// Checks every field of a loss_config; returns "" when valid, else a message naming the
/// argument and its value.
inline std::string validate_config(const loss_config& c) {
  std::ostringstream os;
  auto bad = [&](const char* name, double v, const char* rule) {
    os << name << " = " << detail::shortest(v) << " is invalid: " << rule;
    return os.str();
  };
  if (!std::isfinite(c.beta) || c.beta <= 0.0) return bad("beta", c.beta, "must be finite and > 0");
  if (c.num_terms < 1 || c.num_terms > max_loss_terms) {
    os << "loss_type: " << c.num_terms << " terms given, expected 1 to " << max_loss_terms;
    return os.str();
  }
  bool any_ref_free = false, any_ref_based = false, any_eps = false;
  for (int k = 0; k < c.num_terms; ++k) {
    const int raw = static_cast<int>(c.terms[k].type);
    if (raw < 0 || raw >= num_loss_types) {
      os << "loss_type[" << k << "] = " << raw << " is not a loss type (expected one of "
         << loss_type_names() << ")";
      return os.str();
    }
    if (!std::isfinite(c.terms[k].weight)) {
      os << "loss_weights[" << k << "] = " << c.terms[k].weight << " is invalid: must be finite";
      return os.str();
    }
    const loss_type t = c.terms[k].type;
    if (detail::is_reference_free_type(t)) {
      any_ref_free = true;
    } else if (t != loss_type::sft) {
      any_ref_based = true;
    }
    any_eps = any_eps || detail::uses_label_smoothing(t, c);
  }
  if (any_ref_free && (any_ref_based || c.num_terms > 1)) {
    return "loss_type: " + loss_type_names(detail::is_reference_free_type) +
           " (reference-free) cannot be combined with other loss types";
  }
  const double eps = c.label_smoothing;
  if (!std::isfinite(eps) || eps < 0.0 || eps > 1.0)
    return bad("label_smoothing", eps, "must be in [0, 1]");
  if (eps != 0.0 && !any_eps) {
    os << "label_smoothing = " << eps << " has no effect with loss_type " << to_string(c.terms[0].type)
       << (c.terms[0].type == loss_type::sigmoid
               ? " (TRL >= 1.0 ignores it; set cdpo_smoothing for TRL <= 0.28's cDPO)"
               : "");
    return os.str();
  }
  for (int k = 0; k < c.num_terms; ++k) {
    const loss_type t = c.terms[k].type;
    if (t == loss_type::exo_pair && !(eps > 0.0 && eps < 1.0))
      return bad("label_smoothing", eps, "exo_pair needs 0 < label_smoothing < 1");
    if (t == loss_type::robust && !(eps >= 0.0 && eps < 0.5))
      return bad("label_smoothing", eps, "robust needs 0 <= label_smoothing < 0.5");
  }
  if (!std::isfinite(c.alpha_divergence_coef))
    return bad("alpha_divergence_coef", c.alpha_divergence_coef, "must be finite");
  if (!(c.alpha_exponent_clamp > 0.0) || !std::isfinite(c.alpha_exponent_clamp))
    return bad("alpha_exponent_clamp", c.alpha_exponent_clamp, "must be finite and > 0");
  const int div = static_cast<int>(c.divergence);
  if (div < 0 || div >= num_f_divergences) {
    os << "f_divergence_type = " << div << " is not an f-divergence (expected one of "
       << f_divergence_names() << ")";
    return os.str();
  }
  if (c.divergence != f_divergence::reverse_kl) {
    // The f-DPO reparameterisation only cancels log Z(x) in the chosen-rejected difference.
    for (int k = 0; k < c.num_terms; ++k) {
      if (!detail::supports_f_divergence(c.terms[k].type)) {
        os << "f_divergence_type = " << to_string(c.divergence) << " is not supported with loss_type "
           << to_string(c.terms[k].type)
           << " (only " << loss_type_names(detail::supports_f_divergence) << ")";
        return os.str();
      }
    }
  }
  if (c.use_weighting) {
    const std::string e = check_pair_weights(c, "use_weighting = true");
    if (!e.empty()) return e;
  }
  if (!std::isfinite(c.discopop_tau) || c.discopop_tau <= 0.0)
    return bad("discopop_tau", c.discopop_tau, "must be finite and > 0");
  if (!std::isfinite(c.simpo_gamma)) return bad("simpo_gamma", c.simpo_gamma, "must be finite");
  if (!std::isfinite(c.cpo_alpha) || c.cpo_alpha < 0.0)
    return bad("cpo_alpha", c.cpo_alpha, "must be finite and >= 0");
  if (c.cpo_base != loss_type::sigmoid && c.cpo_base != loss_type::hinge &&
      c.cpo_base != loss_type::ipo) {
    os << "cpo_base = " << static_cast<int>(c.cpo_base)
       << " is invalid: must be sigmoid, hinge or ipo";
    return os.str();
  }
  if (!std::isfinite(c.ld_alpha) || c.ld_alpha < 0.0 || c.ld_alpha > 1.0)
    return bad("ld_alpha", c.ld_alpha, "must be in [0, 1]");
  return {};
}

}  // namespace dpo
