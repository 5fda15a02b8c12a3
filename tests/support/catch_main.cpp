// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
// The test runner's main for Catch2 v2; with v3 it comes from Catch2::Catch2WithMain.
#if !__has_include(<catch2/catch_all.hpp>)
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
#endif
