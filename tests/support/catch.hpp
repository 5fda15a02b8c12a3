// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// One include for Catch2 v2 (Debian's 2.13, single header) and v3 (split headers), so the
// tests build on both. Test files include this and never <catch2/...> directly.
#pragma once

#if __has_include(<catch2/catch_all.hpp>)
#include <catch2/catch_all.hpp>
#define DPO_CATCH_V3 1
using Catch::Approx;
#else
#include <catch2/catch.hpp>
#define DPO_CATCH_V3 0
#endif
