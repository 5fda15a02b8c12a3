// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The whole CPU library for a plain C++17 compiler (no CUDA needed). CUDA users include
// <dpo/cuda/dpo.cuh> as well, under nvcc.
#pragma once

#include "dpo/core/layout.hpp"
#include "dpo/core/linear_plan.hpp"
#include "dpo/core/loss.hpp"
#include "dpo/core/math.hpp"
#include "dpo/core/metrics.hpp"
#include "dpo/core/outputs.hpp"
#include "dpo/core/pair_batch.hpp"
#include "dpo/core/shard.hpp"
#include "dpo/core/transforms.hpp"
#include "dpo/core/validate.hpp"
#include "dpo/cpu/dpo.hpp"
#include "dpo/cpu/linear.hpp"
#include "dpo/cpu/linear_dpo.hpp"
#include "dpo/cpu/shard.hpp"
#include "dpo/error.hpp"
#include "dpo/version.hpp"
