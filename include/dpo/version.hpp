// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The one place the version lives; CMakeLists.txt parses these three lines.
#define DPO_VERSION_MAJOR 0
#define DPO_VERSION_MINOR 1
#define DPO_VERSION_PATCH 0

#define DPO_VERSION_STRING_(a, b, c) #a "." #b "." #c
#define DPO_VERSION_STRING_X(a, b, c) DPO_VERSION_STRING_(a, b, c)
#define DPO_VERSION_STRING \
  DPO_VERSION_STRING_X(DPO_VERSION_MAJOR, DPO_VERSION_MINOR, DPO_VERSION_PATCH)
