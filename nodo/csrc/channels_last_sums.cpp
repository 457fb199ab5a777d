// Per-(sample, channel) sums of a channels_last activation in one read: nodo's own CPU kernel.
//
// An activation (B, C, *) stored channels_last is, per sample, an (L, C) row-major matrix, and the
// sums nodo's norm layers need are taken down its columns, about a per-channel shift k:
//     without grad:  dot[b, c] = sum_l u^2,          total[b, c] = sum_l u,        u = x[b, l, c] - k[c]
//     with grad:     dot[b, c] = sum_l g[b, l, c] u,  total[b, c] = sum_l g[b, l, c]
// torch has no op that takes these per sample in one pass over channels_last memory (its
// reductions over the rows need u or g*u written out first); this loop reads each row once,
// contiguously, into C accumulators. Blocks of kBlockRows rows are summed in the input's type,
// then added into double totals, so for float32 the rounding grows with the block, not with L.
//
// Built by nodo/functional/cpu_sums.py with the system C++ compiler on first use and loaded
// with ctypes; the entry point is a plain C function taking pointers that the Python side has
// checked (dtype, device, shapes, contiguity). Parallel over samples on torch's intra-op threads.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlockRows = 64;

// x86-64: one baseline clone and one for AVX2 + FMA, picked by the loader on the CPU that runs it
// (a cache directory shared by cluster nodes of different CPUs stays valid). GCC only: clang's
// target_clones does not take function templates.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NODO_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define NODO_CLONES
#endif

// Adds the sums of rows [0, rows) of one sample into block_dot and block_total (C values each).
template <typename T>
NODO_CLONES void accumulate_block(const T* __restrict__ input, const T* __restrict__ grad,
                                  const T* __restrict__ center, T* __restrict__ block_dot,
                                  T* __restrict__ block_total, int64_t rows, int64_t channels) {
  for (int64_t row = 0; row < rows; ++row) {
    const T* x = input + row * channels;
    if (grad != nullptr) {
      const T* g = grad + row * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        block_dot[c] += g[c] * (x[c] - center[c]);
        block_total[c] += g[c];
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        const T u = x[c] - center[c];
        block_dot[c] += u * u;
        block_total[c] += u;
      }
    }
  }
}

template <typename T>
void sample_sums(const T* input, const T* grad, const T* center, T* dot, T* total, int64_t batch,
                 int64_t values, int64_t channels) {
  const int64_t sample_size = values * channels;
  // about 32K elements per task, as ATen's own grain size, so small tensors run on one thread
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, sample_size));
  at::parallel_for(0, batch, grain, [&](int64_t first, int64_t last) {
    std::vector<T> block_dot(channels), block_total(channels);
    std::vector<double> sample_dot(channels), sample_total(channels);
    for (int64_t b = first; b < last; ++b) {
      std::fill(sample_dot.begin(), sample_dot.end(), 0.0);
      std::fill(sample_total.begin(), sample_total.end(), 0.0);
      for (int64_t row = 0; row < values; row += kBlockRows) {
        const int64_t rows = std::min(kBlockRows, values - row);
        const int64_t offset = b * sample_size + row * channels;
        std::fill(block_dot.begin(), block_dot.end(), T(0));
        std::fill(block_total.begin(), block_total.end(), T(0));
        accumulate_block<T>(input + offset, grad == nullptr ? nullptr : grad + offset, center,
                            block_dot.data(), block_total.data(), rows, channels);
        for (int64_t c = 0; c < channels; ++c) {
          sample_dot[c] += block_dot[c];
          sample_total[c] += block_total[c];
        }
      }
      for (int64_t c = 0; c < channels; ++c) {
        dot[b * channels + c] = static_cast<T>(sample_dot[c]);
        total[b * channels + c] = static_cast<T>(sample_total[c]);
      }
    }
  });
}

}  // namespace

// dtype: 0 float32, 1 float64. input and grad (null for the sums of u and u^2): (B, L, C)
// contiguous; center: (C,); dot and total: (B, C) contiguous. Returns 0, or 1 for an unknown dtype.
extern "C" int nodo_channels_last_sums(int dtype, const void* input, const void* grad, const void* center,
                                       void* dot, void* total, int64_t batch, int64_t values,
                                       int64_t channels) {
  if (dtype == 0) {
    sample_sums(static_cast<const float*>(input), static_cast<const float*>(grad),
                static_cast<const float*>(center), static_cast<float*>(dot), static_cast<float*>(total),
                batch, values, channels);
  } else if (dtype == 1) {
    sample_sums(static_cast<const double*>(input), static_cast<const double*>(grad),
                static_cast<const double*>(center), static_cast<double*>(dot), static_cast<double*>(total),
                batch, values, channels);
  } else {
    return 1;
  }
  return 0;
}
