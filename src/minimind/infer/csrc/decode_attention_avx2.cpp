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
//   * a row that attends to nothing gets zeros (a softmax over no positions has no value).
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

template <typename T>
float dot(const float* q, const T* k, int64_t d) {
  const int64_t d8 = d - d % 8;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < d8; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), acc);
  float s = hsum(acc);
  for (int64_t i = d8; i < d; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}

// o[0, d) += p * v[0, d)
template <typename T>
void axpy(float p, const T* v, float* o, int64_t d) {
  const int64_t d8 = d - d % 8;
  const __m256 pv = _mm256_set1_ps(p);
  for (int64_t i = 0; i < d8; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(pv, load8(v + i), _mm256_loadu_ps(o + i)));
  for (int64_t i = d8; i < d; ++i) o[i] += p * static_cast<float>(v[i]);
}

template <typename T>
void decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, at::Tensor& out) {
  const int64_t b_rows = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t kv_heads = k.size(1), s_len = k.size(2), group = heads / kv_heads;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const bool* mp = mask.data_ptr<bool>();
  T* op = out.data_ptr<T>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  at::parallel_for(0, b_rows * kv_heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(s_len), qf(d), acc(d);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / kv_heads, g = task % kv_heads;
      const T* kbase = kp + b * ks0 + g * ks1;
      const T* vbase = vp + b * vs0 + g * vs1;
      const bool* m = mp + b * s_len;
      for (int64_t j = 0; j < group; ++j) {
        const int64_t h = g * group + j;
        const T* qh = qp + (b * heads + h) * d;
        for (int64_t i = 0; i < d; ++i) qf[i] = static_cast<float>(qh[i]) * scale;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < s_len; ++t) {
          scores[t] = m[t] ? dot(qf.data(), kbase + t * ks2, d) : -std::numeric_limits<float>::infinity();
          top = std::fmax(top, scores[t]);
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        float total = 0.0f;
        if (top != -std::numeric_limits<float>::infinity()) {
          for (int64_t t = 0; t < s_len; ++t) {
            if (!m[t]) continue;
            const float p = std::exp(scores[t] - top);
            total += p;
            axpy(p, vbase + t * vs2, acc.data(), d);
          }
        }
        const float inv = total > 0.0f ? 1.0f / total : 0.0f;
        T* oh = op + (b * heads + h) * d;
        for (int64_t i = 0; i < d; ++i) oh[i] = static_cast<T>(acc[i] * inv);
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
