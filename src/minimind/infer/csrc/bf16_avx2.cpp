// bf16 weight x float activation products for CPUs with AVX2 and no native bf16 arithmetic.
//
// Scheme (see minimind/infer/avx2_bf16.py for why and the measured figures):
//   * weights: the layer's own bf16 matrix W [N, K], row-major, read in place (no packed copy, so an
//     in-place weight update is seen at once);
//   * a 32-byte load holds 16 consecutive bf16 of one row; as 32-bit words, shifting left by 16 gives
//     the even elements as float32 and masking the low half gives the odd ones (bf16 is the upper
//     half of a float32), so the conversion costs two integer ops per 16 weights;
//   * activations: each row of x converted once to float32 with every 16-value block de-interleaved
//     (its 8 even values, then its 8 odd values), to line up with the weights' even / odd halves;
//   * y[m, n] = sum_k x[m, k] W[n, k], accumulated in float32 with FMA, 4 weight rows at a time for
//     up to 2 activation rows (the 4 rows stay in L1 while further activation rows reuse them), the
//     next 4 rows prefetched while these are read.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kRows = 4;    // weight rows per block
constexpr int64_t kBlock = 16;  // bf16 values per 32-byte load

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Row m of x as float32, each full 16-block de-interleaved (even values, then odd), the tail as is.
template <typename T>
void deinterleave(const T* x, int64_t m_rows, int64_t k, float* out) {
  const int64_t k16 = k - k % kBlock;
  for (int64_t m = 0; m < m_rows; ++m) {
    const T* row = x + m * k;
    float* dst = out + m * k;
    for (int64_t c = 0; c < k16; c += kBlock)
      for (int64_t j = 0; j < 8; ++j) {
        dst[c + j] = static_cast<float>(row[c + 2 * j]);
        dst[c + 8 + j] = static_cast<float>(row[c + 2 * j + 1]);
      }
    for (int64_t i = k16; i < k; ++i) dst[i] = static_cast<float>(row[i]);
  }
}

// Outputs [m0, m0 + MT) x [n0, n0 + R).
template <int R, int MT>
void block(const uint16_t* w, const float* xd, float* y, int64_t n, int64_t k, int64_t n0, int64_t m0) {
  const __m256i odd_mask = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
  __m256 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) acc[r][t] = _mm256_setzero_ps();
  const int64_t k16 = k - k % kBlock;
  for (int64_t c = 0; c < k16; c += kBlock) {
    __m256 xe[MT], xo[MT];
    for (int t = 0; t < MT; ++t) {
      xe[t] = _mm256_loadu_ps(xd + (m0 + t) * k + c);
      xo[t] = _mm256_loadu_ps(xd + (m0 + t) * k + c + 8);
    }
    for (int r = 0; r < R; ++r) {
      // the next block's rows, one block ahead: each row is a short stream (K bf16) that the hardware
      // prefetcher picks up too late; 16.4 against 13.9 GB/s over a minimind-3 step's products
      _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + R + r) * k + c), _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n0 + r) * k + c));
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, odd_mask));
      for (int t = 0; t < MT; ++t) acc[r][t] = _mm256_fmadd_ps(odd, xo[t], _mm256_fmadd_ps(even, xe[t], acc[r][t]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) {
      float s = hsum(acc[r][t]);
      for (int64_t i = k16; i < k; ++i) s += bf16_to_float(w[(n0 + r) * k + i]) * xd[(m0 + t) * k + i];
      y[(m0 + t) * n + n0 + r] = s;
    }
}

template <int R>
void rows(const uint16_t* w, const float* xd, float* y, int64_t m_rows, int64_t n, int64_t k, int64_t n0) {
  int64_t m = 0;
  for (; m + 2 <= m_rows; m += 2) block<R, 2>(w, xd, y, n, k, n0, m);
  if (m < m_rows) block<R, 1>(w, xd, y, n, k, n0, m);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "linear: x [M, K] and weight [N, K]");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "linear: the weight must be bfloat16");
  const int64_t m_rows = x.size(0), k = x.size(1), n = weight.size(0);
  const at::Tensor wc = weight.contiguous(), xc = x.contiguous();
  // the calling thread's scratch (workers only read it while this thread waits in parallel_for)
  thread_local std::vector<float> xd_buf;
  xd_buf.resize(m_rows * k);
  float* xd = xd_buf.data();
  if (x.scalar_type() == at::kFloat) {
    deinterleave(xc.data_ptr<float>(), m_rows, k, xd);
  } else if (x.scalar_type() == at::kBFloat16) {
    deinterleave(xc.data_ptr<at::BFloat16>(), m_rows, k, xd);
  } else {
    TORCH_CHECK(false, "linear: x must be float32 or bfloat16");
  }
  at::Tensor y = at::empty({m_rows, n}, x.options().dtype(at::kFloat));
  const uint16_t* w = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  const int64_t full = n / kRows;
  at::parallel_for(0, full, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) rows<kRows>(w, xd, yp, m_rows, n, k, b * kRows);
  });
  for (int64_t n0 = full * kRows; n0 < n; ++n0) rows<1>(w, xd, yp, m_rows, n, k, n0);
  return y;
}

}  // namespace

TORCH_LIBRARY(minimind_bf16_avx2, m) { m.def("linear(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(minimind_bf16_avx2, CPU, m) { m.impl("linear", &linear); }
