// The CUDA names that csrc/cuda/ms_deform_attn_kernels.cuh uses, mapped onto HIP-CPU (a header-only HIP runtime:
// one fiber per GPU thread, one TBB task per block, real atomics), so that g++ compiles the kernels unchanged and
// runs them on the CPU (tests/test_ms_deform_attn_emulated.py). Include it before the kernels.
#pragma once

// The ATen types of the real build, parsed as plain host C++ before HIP-CPU defines __HIPCC__ (which would send
// these headers down their ROCm paths): at::opmath_type, c10::Half, c10::BFloat16 and their conversions.
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <hip/hip_runtime.h>

#include <cstdio>
#include <cstdlib>

// CUDA's warp: 32 lanes, the default width of its shuffles. HIP-CPU numbers a shuffle's lanes modulo its own
// warpSize, 64 in the stock headers, where a width-32 shuffle down by lanes 32-63 of each 64 returns the lane's own
// value: the test builds against a private copy patched to 32 (and the stock one is a broken build it must catch).
inline constexpr int kCudaWarpSize = 32;

// HIP-CPU's shuffles synchronise the whole block (each is a barrier over its fibers), so only a full-warp mask,
// with every lane of every live warp taking part, behaves as on the GPU; anything else stops the run.
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = kCudaWarpSize) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "cuda_on_hip_cpu: __shfl_down_sync with a partial mask %#x is not emulated\n", mask);
    std::abort();
  }
  return __shfl_down(v, delta, width);
}

// A failed device assert stops the kernel with the message a GPU prints (c10's host definition would abort too,
// without the block and thread).
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                                                              \
  if (C10_UNLIKELY(!(cond))) {                                                                                \
    std::fprintf(stderr, "%s:%d: %s: block: [%u,0,0], thread: [%u,0,0] Assertion `%s` failed.\n", __FILE__,  \
                 __LINE__, __func__, static_cast<unsigned>(blockIdx.x), static_cast<unsigned>(threadIdx.x), \
                 #cond);                                                                                      \
    std::abort();                                                                                             \
  }

// atomicAdd(float*, float) and atomicAdd(double*, double) are HIP-CPU's (compare-and-swap loops on the host's
// atomics); blockIdx, blockDim, threadIdx and __launch_bounds__ too. Launches: hipLaunchKernelGGL.
