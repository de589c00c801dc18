// Int8 weight x float activation products of a few rows: AVX2, and AVX-512 VNNI where the CPU has it.
//
// Scheme (see minimind/infer/avx2_int8.py for why and the measured figures):
//   * weights: the per-row int8 codes q [N, K] of Int8Linear, stored once as u8 = q + 128 in tiles
//     of 8 output rows x 4 inputs, [N/8][K/4][8][4], so one 32-byte load feeds 8 outputs;
//   * activations: each row x [K] written as two 7-bit digits, x = a (hi + lo / 127) with
//     a = max|x| / 63, |hi| <= 63, |lo| <= 64 (error <= a / 254, 1/16002 of the row maximum);
//   * product: vpmaddubsw (u8 x s8, pairs summed to int16) then vpmaddwd by 1 (int32). With
//     |u8| <= 255 and |digit| <= 64 a pair is at most 2 * 255 * 64 = 32640 < 2^15: no saturation;
//     the +128 offset is removed at the end with the digit sums: sum (q + 128) d = q.d + 128 sum d.
//   y[m, n] = a_m s_n ((H - 128 sum hi) + (L - 128 sum lo) / 127), exact in int32 up to the final
//   float scaling (|H| <= K/4 * 2 * 32640 < 2^31 for K < 65000).
//   * on CPUs with AVX-512 VNNI the product is one vpdpbusd (u8 x s8, four products summed into
//     int32) instead of three instructions: the same integer sums, so the same results, with a
//     third of the multiply work, and tiles of up to 8 activation rows (32 vector registers).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kCols = 8;   // output rows per tile (one int32 lane each)
constexpr int64_t kGroup = 4;  // inputs per lane in one 32-byte load

at::Tensor pack(const at::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar, "pack: int8 codes [N, K]");
  const int64_t n = codes.size(0), k = codes.size(1);
  TORCH_CHECK(n % kCols == 0 && k % kGroup == 0, "pack: N must be a multiple of 8 and K of 4");
  const at::Tensor c = codes.contiguous();
  at::Tensor out = at::empty({n * k}, codes.options().dtype(at::kByte));
  const int8_t* src = c.data_ptr<int8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n / kCols, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t g = 0; g < k / kGroup; ++g)
        for (int64_t c8 = 0; c8 < kCols; ++c8)
          for (int64_t i = 0; i < kGroup; ++i)
            dst[((j * (k / kGroup) + g) * kCols + c8) * kGroup + i] =
                static_cast<uint8_t>(src[(j * kCols + c8) * k + g * kGroup + i] + 128);
  });
  return out;
}

// Eight elements of x as float32.
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const at::BFloat16* x) {  // bf16 is the upper half of a float32
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// int32 lanes of four vectors (32 values in order) narrowed to 32 int8 in order.
inline __m256i narrow(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);  // per-128-bit-lane order
  return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// Rows of x as two 7-bit digits, with each row's scale a and digit sums (vectorised: this runs on
// every call, and a scalar loop cost 15-40 us per product, as much as a small product itself).
template <typename T>
void to_digits(const T* x, int64_t m_rows, int64_t k, int8_t* hi, int8_t* lo, float* a, int32_t* sum_hi,
               int32_t* sum_lo) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  // half to even, as nearbyint
  const int64_t k32 = k - k % 32, k8 = k - k % 8;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t m = 0; m < m_rows; ++m) {
    const T* row = x + m * k;
    __m256 vmax = _mm256_setzero_ps(), vnan = _mm256_setzero_ps();
    for (int64_t i = 0; i < k8; i += 8) {
      const __m256 v = load8(row + i);
      vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, abs_mask));
      vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));  // max_ps drops NaNs: track them
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    float amax = 0.f;
    for (float v : lanes) amax = std::fmax(amax, v);
    bool nan = _mm256_movemask_ps(vnan) != 0;
    for (int64_t i = k8; i < k; ++i) {
      const float v = static_cast<float>(row[i]);
      amax = std::fmax(amax, std::fabs(v));
      nan = nan || std::isnan(v);
    }
    const float inv = amax > 0.f && std::isfinite(amax) ? 63.f / amax : 0.f;
    // a NaN or infinite input makes its whole output row NaN (the digits are 0, a is NaN), as a float
    // product would propagate it, rather than a finite answer that hides it
    a[m] = nan || !std::isfinite(amax) ? std::numeric_limits<float>::quiet_NaN() : amax / 63.f;
    const __m256 vinv = _mm256_set1_ps(inv), c127 = _mm256_set1_ps(127.f);
    const __m256 lo_min = _mm256_set1_ps(-64.f), lo_max = _mm256_set1_ps(64.f);
    __m256i s_hi = _mm256_setzero_si256(), s_lo = _mm256_setzero_si256();
    for (int64_t i = 0; i < k32; i += 32) {
      __m256i h[4], l[4];
      for (int q = 0; q < 4; ++q) {
        const __m256 u = _mm256_mul_ps(load8(row + i + 8 * q), vinv);
        const __m256 hf = _mm256_round_ps(u, kRound);
        const __m256 lf = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(u, hf), c127), kRound),
                                                      lo_min), lo_max);
        h[q] = _mm256_cvtps_epi32(hf);
        l[q] = _mm256_cvtps_epi32(lf);
        s_hi = _mm256_add_epi32(s_hi, h[q]);
        s_lo = _mm256_add_epi32(s_lo, l[q]);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + m * k + i), narrow(h[0], h[1], h[2], h[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + m * k + i), narrow(l[0], l[1], l[2], l[3]));
    }
    int32_t tail_hi = 0, tail_lo = 0;
    for (int64_t i = k32; i < k; ++i) {
      const float u = static_cast<float>(row[i]) * inv;
      const float h = std::nearbyint(u);
      const float l = std::fmin(std::fmax(std::nearbyint((u - h) * 127.f), -64.f), 64.f);
      hi[m * k + i] = static_cast<int8_t>(h);
      lo[m * k + i] = static_cast<int8_t>(l);
      tail_hi += static_cast<int32_t>(h);
      tail_lo += static_cast<int32_t>(l);
    }
    sum_hi[m] = hsum_i32(s_hi) + tail_hi;
    sum_lo[m] = hsum_i32(s_lo) + tail_lo;
  }
}

struct Digits {
  const int8_t* hi;
  const int8_t* lo;
  const float* a;
  const int32_t* sum_hi;
  const int32_t* sum_lo;
};

// y[m, 8 j ...] from a tile's digit sums: the +128 offset removed, the digits and scales applied.
template <int MT>
inline void store_tile(const __m256i* acc_hi, const __m256i* acc_lo, const float* scale, const Digits& d, float* y,
                       int64_t n, int64_t j, int64_t m0) {
  const __m256 s = _mm256_loadu_ps(scale + j * kCols);
  for (int t = 0; t < MT; ++t) {
    const int64_t m = m0 + t;
    const __m256 h = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc_hi[t], _mm256_set1_epi32(128 * d.sum_hi[m])));
    const __m256 l = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc_lo[t], _mm256_set1_epi32(128 * d.sum_lo[m])));
    const __m256 v = _mm256_fmadd_ps(l, _mm256_set1_ps(1.f / 127.f), h);
    _mm256_storeu_ps(y + m * n + j * kCols, _mm256_mul_ps(_mm256_mul_ps(v, _mm256_set1_ps(d.a[m])), s));
  }
}

// Group g of a column block's packed weights (8 columns x 4 bytes), with a read 4 KB ahead in the
// thread's sequential stream: 18.6 against 17.2 GB/s over a minimind-3 step's products at one row
// (past the end of the buffer a prefetch is only a hint: it never faults).
inline __m256i weight_group(const uint8_t* w, int64_t g) {
  _mm_prefetch(reinterpret_cast<const char*>(w + g * kCols * kGroup + 4096), _MM_HINT_T0);
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * kCols * kGroup));
}

// The 4 high and 4 low digits of one activation row at element offset `at`, each broadcast to all
// 8 lanes: the operands both tiles multiply a weight group by.
inline void activation_digits(const Digits& d, int64_t at, __m256i& xh, __m256i& xl) {
  int32_t h, l;
  std::memcpy(&h, d.hi + at, 4);
  std::memcpy(&l, d.lo + at, 4);
  xh = _mm256_set1_epi32(h);
  xl = _mm256_set1_epi32(l);
}

// Outputs [m0, m0 + MT) x [8 j, 8 j + 8): each weight load serves MT activation rows.
template <int MT>
void tile(const uint8_t* packed, const float* scale, const Digits& d, float* y, int64_t n, int64_t k, int64_t j,
          int64_t m0) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc_hi[MT], acc_lo[MT];
  for (int t = 0; t < MT; ++t) acc_hi[t] = acc_lo[t] = _mm256_setzero_si256();
  const uint8_t* w = packed + j * k * kCols;
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const __m256i wv = weight_group(w, g);
    for (int t = 0; t < MT; ++t) {
      __m256i xh, xl;
      activation_digits(d, (m0 + t) * k + g * kGroup, xh, xl);
      acc_hi[t] = _mm256_add_epi32(acc_hi[t], _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xh), ones));
      acc_lo[t] = _mm256_add_epi32(acc_lo[t], _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xl), ones));
    }
  }
  store_tile<MT>(acc_hi, acc_lo, scale, d, y, n, j, m0);
}

// The same tile with vpdpbusd (AVX-512 VNNI on 256-bit vectors), built for that target only and
// called only where the CPU has it.
#define VNNI_TARGET __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))

template <int MT>
VNNI_TARGET void tile_vnni(const uint8_t* packed, const float* scale, const Digits& d, float* y, int64_t n,
                           int64_t k, int64_t j, int64_t m0) {
  __m256i acc_hi[MT], acc_lo[MT];
  for (int t = 0; t < MT; ++t) acc_hi[t] = acc_lo[t] = _mm256_setzero_si256();
  const uint8_t* w = packed + j * k * kCols;
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const __m256i wv = weight_group(w, g);
    for (int t = 0; t < MT; ++t) {
      __m256i xh, xl;
      activation_digits(d, (m0 + t) * k + g * kGroup, xh, xl);
      acc_hi[t] = _mm256_dpbusd_epi32(acc_hi[t], wv, xh);
      acc_lo[t] = _mm256_dpbusd_epi32(acc_lo[t], wv, xl);
    }
  }
  store_tile<MT>(acc_hi, acc_lo, scale, d, y, n, j, m0);
}

// Whether this CPU runs tile_vnni, and whether the products use it (use_vnni switches, for tests
// and A/B timing; on by default where it runs).
bool cpu_has_vnni() {
  static const bool has = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bw");
  return has;
}
bool& vnni_on() {
  static bool on = cpu_has_vnni();
  return on;
}

bool use_vnni(bool on) {
  vnni_on() = on && cpu_has_vnni();
  return vnni_on();
}

bool vnni() { return vnni_on(); }

// All activation rows against output tile j: VNNI tiles of 8 rows (each weight read once for 8), or
// the AVX2 tiles of 4.
void tiles(const uint8_t* wp, const float* sp, const Digits& d, float* yp, int64_t n, int64_t k, int64_t j,
           int64_t m_rows, bool vnni) {
  int64_t m = 0;
  if (vnni) {
    for (; m + 8 <= m_rows; m += 8) tile_vnni<8>(wp, sp, d, yp, n, k, j, m);
    switch (m_rows - m) {
      case 7: tile_vnni<7>(wp, sp, d, yp, n, k, j, m); break;
      case 6: tile_vnni<6>(wp, sp, d, yp, n, k, j, m); break;
      case 5: tile_vnni<5>(wp, sp, d, yp, n, k, j, m); break;
      case 4: tile_vnni<4>(wp, sp, d, yp, n, k, j, m); break;
      case 3: tile_vnni<3>(wp, sp, d, yp, n, k, j, m); break;
      case 2: tile_vnni<2>(wp, sp, d, yp, n, k, j, m); break;
      case 1: tile_vnni<1>(wp, sp, d, yp, n, k, j, m); break;
      default: break;
    }
    return;
  }
  for (; m + 4 <= m_rows; m += 4) tile<4>(wp, sp, d, yp, n, k, j, m);
  switch (m_rows - m) {
    case 3: tile<3>(wp, sp, d, yp, n, k, j, m); break;
    case 2: tile<2>(wp, sp, d, yp, n, k, j, m); break;
    case 1: tile<1>(wp, sp, d, yp, n, k, j, m); break;
    default: break;
  }
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && scale.dim() == 1 && scale.scalar_type() == at::kFloat, "linear: x [M, K], scale float32 [N]");
  const int64_t m_rows = x.size(0), k = x.size(1), n = scale.size(0);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == n * k && n % kCols == 0 && k % kGroup == 0,
              "linear: packed weight of another shape");
  TORCH_CHECK(k < 65000, "linear: K too large for int32 accumulation");
  const at::Tensor xc = x.contiguous(), sc = scale.contiguous();
  // the calling thread's scratch (workers only read it while this thread waits in parallel_for):
  // three tensor allocations per product were measurable in a 57-product decode step
  thread_local std::vector<int8_t> digits;
  thread_local std::vector<float> row_scale;
  thread_local std::vector<int32_t> sums;
  digits.resize(2 * m_rows * k);
  row_scale.resize(m_rows);
  sums.resize(2 * m_rows);
  int8_t* hi = digits.data();
  int32_t* sum_hi = sums.data();
  const Digits d{hi, hi + m_rows * k, row_scale.data(), sum_hi, sum_hi + m_rows};
  if (x.scalar_type() == at::kFloat) {
    to_digits(xc.data_ptr<float>(), m_rows, k, hi, hi + m_rows * k, row_scale.data(), sum_hi, sum_hi + m_rows);
  } else if (x.scalar_type() == at::kBFloat16) {
    to_digits(xc.data_ptr<at::BFloat16>(), m_rows, k, hi, hi + m_rows * k, row_scale.data(), sum_hi,
              sum_hi + m_rows);
  } else {
    TORCH_CHECK(false, "linear: x must be float32 or bfloat16");
  }
  at::Tensor y = at::empty({m_rows, n}, x.options().dtype(at::kFloat));
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool vnni = vnni_on();
  at::parallel_for(0, n / kCols, 4, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) tiles(wp, sp, d, yp, n, k, j, m_rows, vnni);
  });
  return y;
}

// How many threads at::parallel_for gives n items here.  at::parallel_for is inline code: built
// without -fopenmp its "#pragma omp parallel" is dropped and every product silently runs on one thread.
int64_t parallel_threads(int64_t n) {
  std::vector<int> seen(at::get_num_threads() + 1, 0);
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { seen.at(at::get_thread_num()) = 1; });
  int64_t used = 0;
  for (int v : seen) used += v;
  return used;
}

}  // namespace

TORCH_LIBRARY(minimind_int8_avx2, m) {
  m.def("pack(Tensor codes) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, Tensor scale) -> Tensor");
  m.def("parallel_threads(int n) -> int");
  m.def("use_vnni(bool on) -> bool");
  m.def("vnni() -> bool");
}

TORCH_LIBRARY_IMPL(minimind_int8_avx2, CPU, m) {
  m.impl("pack", &pack);
  m.impl("linear", &linear);
}

TORCH_LIBRARY_IMPL(minimind_int8_avx2, CompositeExplicitAutograd, m) {
  m.impl("parallel_threads", &parallel_threads);
  m.impl("use_vnni", &use_vnni);
  m.impl("vnni", &vnni);
}
