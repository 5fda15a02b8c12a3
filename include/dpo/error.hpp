// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace dpo {

/// Thrown by every host (CPU) entry point when an argument is rejected. The message names
/// the argument and the offending value. When it is thrown, no output has been written.
class error : public std::invalid_argument {
 public:
  explicit error(const std::string& what) : std::invalid_argument(what) {}
};

namespace detail {

template <class... Parts>
[[noreturn]] inline void fail(const Parts&... parts) {
  std::ostringstream os;
  os << "dpo: ";
  (os << ... << parts);
  throw error(os.str());
}

}  // namespace detail
}  // namespace dpo
