// Attention of one query per row over a KV cache, for CPU decode steps (AVX2 + FMA).
//
// Scheme (see minimind/infer/decode_attention.py for why and the measured figures):
//   * q [B, H, d]; k, v [B, KV, S, d] read in place with any strides but a contiguous last dim (the
//     cache's [slots, KV, max_len, d] slices); mask [B, S], true = attend; H a multiple of KV;
//   * each (row, KV head) is one task: its H / KV query heads, for each
//       s_t = (q . k_t) / sqrt(d)            (masked positions: -inf)
//       p_t = exp(s_t - max s) / sum exp(s - max s)
//       o   = sum_t p_t v_t
//     in float32 (scores, softmax and sums), written back in q's dtype;
//   * a row that attends to nothing gets zeros (a softmax over no positions has no value);
//   * the query heads of a group (up to 4 at a time) share every K and V load; exp is vectorised.
//   * keys are scored four positions at a time, and K and V rows are prefetched ahead (the cache
//     usually comes from memory: a decode step streams all the weights between two uses of it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const at::BFloat16* x) {  // bf16 is the upper half of a float32
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) of 8 floats, x <= 0 (scores minus their maximum): 2^n p(r) with r = x - n ln 2 and the
// Cephes expf polynomial, ~2 ulp; below -87 the result is ~1e-38 where exp underflows to 0.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Query heads [0, R) of one (row, KV head) task: qf [R][d] (already scaled by 1/sqrt(d)), scores
// scratch [R][S]; writes the R output heads to acc [R][d] (unnormalised) and their softmax sums.
// Each K and V position is loaded once for all R heads.
template <int R, typename T>
void heads(const float* qf, const T* kbase, int64_t ks, const T* vbase, int64_t vs, const bool* m, int64_t s_len,
           int64_t d, float* scores, float* acc, float* total) {
  const int64_t d8 = d - d % 8;
  float top[R];
  for (int j = 0; j < R; ++j) top[j] = kNegInf;
  // s = q . k_t, four positions at a time: 4R independent sums (more loads in flight than one
  // position's R chains), and the next positions' keys prefetched, as K usually comes from memory.
  constexpr int kPos = 4;
  int64_t t = 0;
  for (; t + kPos <= s_len; t += kPos) {
    if (!(m[t] | m[t + 1] | m[t + 2] | m[t + 3])) {
      for (int j = 0; j < R; ++j)
        for (int u = 0; u < kPos; ++u) scores[j * s_len + t + u] = kNegInf;
      continue;
    }
    const T* k = kbase + t * ks;
    for (int u = 0; u < kPos && t + 4 * kPos + u < s_len; ++u)
      for (int64_t i = 0; i < d; i += 64 / static_cast<int64_t>(sizeof(T)))
        _mm_prefetch(reinterpret_cast<const char*>(k + (4 * kPos + u) * ks + i), _MM_HINT_T0);
    __m256 a[R][kPos];
    for (int j = 0; j < R; ++j)
      for (int u = 0; u < kPos; ++u) a[j][u] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d8; i += 8) {
      __m256 kv[kPos];
      for (int u = 0; u < kPos; ++u) kv[u] = load8(k + u * ks + i);
      for (int j = 0; j < R; ++j) {
        const __m256 qv = _mm256_loadu_ps(qf + j * d + i);
        for (int u = 0; u < kPos; ++u) a[j][u] = _mm256_fmadd_ps(qv, kv[u], a[j][u]);
      }
    }
    for (int j = 0; j < R; ++j)
      for (int u = 0; u < kPos; ++u) {
        float sc = hsum(a[j][u]);
        for (int64_t i = d8; i < d; ++i) sc += qf[j * d + i] * static_cast<float>(k[u * ks + i]);
        sc = m[t + u] ? sc : kNegInf;
        scores[j * s_len + t + u] = sc;
        top[j] = std::fmax(top[j], sc);
      }
  }
  for (; t < s_len; ++t) {  // the last positions, one at a time
    if (!m[t]) {
      for (int j = 0; j < R; ++j) scores[j * s_len + t] = kNegInf;
      continue;
    }
    const T* k = kbase + t * ks;
    __m256 a[R];
    for (int j = 0; j < R; ++j) a[j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d8; i += 8) {
      const __m256 kv = load8(k + i);
      for (int j = 0; j < R; ++j) a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + j * d + i), kv, a[j]);
    }
    for (int j = 0; j < R; ++j) {
      float sc = hsum(a[j]);
      for (int64_t i = d8; i < d; ++i) sc += qf[j * d + i] * static_cast<float>(k[i]);
      scores[j * s_len + t] = sc;
      top[j] = std::fmax(top[j], sc);
    }
  }
  const int64_t s8 = s_len - s_len % 8;
  for (int j = 0; j < R; ++j) {  // p = exp(s - max), 0 where masked (or everywhere: no position)
    float* sc = scores + j * s_len;
    if (top[j] == kNegInf) {
      std::fill(sc, sc + s_len, 0.0f);
      total[j] = 0.0f;
      continue;
    }
    const __m256 vtop = _mm256_set1_ps(top[j]), ninf = _mm256_set1_ps(kNegInf);
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t t = 0; t < s8; t += 8) {
      const __m256 x = _mm256_loadu_ps(sc + t);
      const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(x, ninf, _CMP_EQ_OQ), exp256(_mm256_sub_ps(x, vtop)));
      _mm256_storeu_ps(sc + t, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum(vsum);
    for (int64_t t = s8; t < s_len; ++t) {
      sc[t] = sc[t] == kNegInf ? 0.0f : std::exp(sc[t] - top[j]);
      sum += sc[t];
    }
    total[j] = sum;
  }
  constexpr int64_t kVec = R <= 2 ? 4 : 2;  // output vectors per head kept in registers
  for (int64_t c = 0; c + 8 * kVec <= d8; c += 8 * kVec) {  // o = sum_t p_t v_t
    __m256 o[R][kVec];
    for (int j = 0; j < R; ++j)
      for (int u = 0; u < kVec; ++u) o[j][u] = _mm256_setzero_ps();
    for (int64_t t = 0; t < s_len; ++t) {
      if (!m[t]) continue;
      if (c == 0 && t + 16 < s_len)  // the first pass pulls whole rows in, for the later passes
        for (int64_t i = 0; i < d; i += 64 / static_cast<int64_t>(sizeof(T)))
          _mm_prefetch(reinterpret_cast<const char*>(vbase + (t + 16) * vs + i), _MM_HINT_T0);
      const T* v = vbase + t * vs + c;
      __m256 vv[kVec];
      for (int u = 0; u < kVec; ++u) vv[u] = load8(v + 8 * u);
      for (int j = 0; j < R; ++j) {
        const __m256 pj = _mm256_set1_ps(scores[j * s_len + t]);
        for (int u = 0; u < kVec; ++u) o[j][u] = _mm256_fmadd_ps(pj, vv[u], o[j][u]);
      }
    }
    for (int j = 0; j < R; ++j)
      for (int u = 0; u < kVec; ++u) _mm256_storeu_ps(acc + j * d + c + 8 * u, o[j][u]);
  }
  for (int64_t i = d8 - d8 % (8 * kVec); i < d; ++i)  // what the register blocks left (and the tail)
    for (int j = 0; j < R; ++j) {
      float o = 0.0f;
      for (int64_t t = 0; t < s_len; ++t)
        if (m[t]) o += scores[j * s_len + t] * static_cast<float>(vbase[t * vs + i]);
      acc[j * d + i] = o;
    }
}

template <typename T>
void decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, at::Tensor& out) {
  const int64_t b_rows = q.size(0), n_heads = q.size(1), d = q.size(2);
  const int64_t kv_heads = k.size(1), s_len = k.size(2), group = n_heads / kv_heads;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const bool* mp = mask.data_ptr<bool>();
  T* op = out.data_ptr<T>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  at::parallel_for(0, b_rows * kv_heads, 1, [&](int64_t t0, int64_t t1) {
    constexpr int64_t kMax = 4;  // query heads handled together
    std::vector<float> qf(kMax * d), scores(kMax * s_len), acc(kMax * d);
    float total[kMax];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / kv_heads, g = task % kv_heads;
      const T* kbase = kp + b * k.stride(0) + g * k.stride(1);
      const T* vbase = vp + b * v.stride(0) + g * v.stride(1);
      const bool* m = mp + b * s_len;
      for (int64_t j0 = 0; j0 < group; j0 += kMax) {
        const int64_t r = std::min(kMax, group - j0);
        const int64_t h0 = g * group + j0;
        for (int64_t j = 0; j < r; ++j)
          for (int64_t i = 0; i < d; ++i) qf[j * d + i] = static_cast<float>(qp[(b * n_heads + h0 + j) * d + i]) * scale;
        switch (r) {
          case 1: heads<1>(qf.data(), kbase, k.stride(2), vbase, v.stride(2), m, s_len, d, scores.data(), acc.data(), total); break;
          case 2: heads<2>(qf.data(), kbase, k.stride(2), vbase, v.stride(2), m, s_len, d, scores.data(), acc.data(), total); break;
          case 3: heads<3>(qf.data(), kbase, k.stride(2), vbase, v.stride(2), m, s_len, d, scores.data(), acc.data(), total); break;
          default: heads<4>(qf.data(), kbase, k.stride(2), vbase, v.stride(2), m, s_len, d, scores.data(), acc.data(), total);
        }
        for (int64_t j = 0; j < r; ++j) {
          const float inv = total[j] > 0.0f ? 1.0f / total[j] : 0.0f;
          T* oh = op + (b * n_heads + h0 + j) * d;
          for (int64_t i = 0; i < d; ++i) oh[i] = static_cast<T>(acc[j * d + i] * inv);
        }
      }
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 2,
              "decode_attention: q [B, H, d], k and v [B, KV, S, d], mask [B, S]");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(2), "decode_attention: shapes differ");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "decode_attention: query heads must be a multiple of KV heads");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.size(0) == q.size(0) && mask.size(1) == k.size(2),
              "decode_attention: mask must be bool [B, S]");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "decode_attention: dtypes differ");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: K and V need a contiguous last dim");
  const at::Tensor qc = q.contiguous(), mc = mask.contiguous();
  at::Tensor out = at::empty_like(qc);
  if (q.scalar_type() == at::kFloat) {
    decode<float>(qc, k, v, mc, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode<at::BFloat16>(qc, k, v, mc, out);
  } else {
    TORCH_CHECK(false, "decode_attention: float32 or bfloat16 only");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(minimind_attention_avx2, m) {
  m.def("decode(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(minimind_attention_avx2, CPU, m) { m.impl("decode", &decode_attention); }
