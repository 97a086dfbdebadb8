// Matrix-vector kernels over weights kept in ggml's compact block formats, for CPU decoding.
//
// Decoding one token reads every weight once, so speed is set by how few bytes a weight takes and how
// cheaply it turns back into a float. Two layouts cover the common GGUF types exactly:
//   u4: 4-bit codes q in [0, 15], w = scale * q + min per group of 32 (Q4_0, Q4_1; Q4_K fits too)
//   i8: 8-bit codes q in [-128, 127], w = scale * q per group of 32 (Q8_0)
// Codes stay packed as in the file (a u4 group is 16 bytes: low nibbles hold elements 0..15, high
// nibbles 16..31); scales and mins are widened to float32 once at load time.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t GROUP = 32;

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m256 bytes_to_ps(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
inline __m256 sbytes_to_ps(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }

// sum_j scale[g] * q[j] * x[j] over G groups of one u4 row (mins handled by the caller)
inline float u4_row_dot(const uint8_t* q, const float* s, const float* x, int64_t G) {
  const __m128i low = _mm_set1_epi8(0x0F);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g, q += 16, x += GROUP) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i lo = _mm_and_si128(packed, low), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
    __m256 d = _mm256_mul_ps(bytes_to_ps(lo), _mm256_loadu_ps(x));
    d = _mm256_fmadd_ps(bytes_to_ps(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(x + 8), d);
    __m256 e = _mm256_mul_ps(bytes_to_ps(hi), _mm256_loadu_ps(x + 16));
    e = _mm256_fmadd_ps(bytes_to_ps(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(x + 24), e);
    const __m256 sc = _mm256_set1_ps(s[g]);
    acc0 = _mm256_fmadd_ps(sc, d, acc0);
    acc1 = _mm256_fmadd_ps(sc, e, acc1);
  }
  return hsum(_mm256_add_ps(acc0, acc1));
}

inline float i8_row_dot(const int8_t* q, const float* s, const float* x, int64_t G) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g, q += GROUP, x += GROUP) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16));
    __m256 d = _mm256_mul_ps(sbytes_to_ps(a), _mm256_loadu_ps(x));
    d = _mm256_fmadd_ps(sbytes_to_ps(_mm_srli_si128(a, 8)), _mm256_loadu_ps(x + 8), d);
    __m256 e = _mm256_mul_ps(sbytes_to_ps(b), _mm256_loadu_ps(x + 16));
    e = _mm256_fmadd_ps(sbytes_to_ps(_mm_srli_si128(b, 8)), _mm256_loadu_ps(x + 24), e);
    const __m256 sc = _mm256_set1_ps(s[g]);
    acc0 = _mm256_fmadd_ps(sc, d, acc0);
    acc1 = _mm256_fmadd_ps(sc, e, acc1);
  }
  return hsum(_mm256_add_ps(acc0, acc1));
}
// Several rows of x at once (batched decoding): each group of weights is expanded to floats once and
// used for up to ROWS rows, whose accumulators stay in registers.
constexpr int ROWS = 8;

inline void u4_rows_dot(const uint8_t* q, const float* s, const float* mn, const float* x, int64_t K, int64_t G,
                        int rows, float* out, int64_t out_stride) {
  const __m128i low = _mm_set1_epi8(0x0F);
  __m256 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g, q += 16) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i lo = _mm_and_si128(packed, low), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
    const __m256 sc = _mm256_set1_ps(s[g]), m = _mm256_set1_ps(mn[g]);
    const __m256 w0 = _mm256_fmadd_ps(bytes_to_ps(lo), sc, m), w1 = _mm256_fmadd_ps(bytes_to_ps(_mm_srli_si128(lo, 8)), sc, m);
    const __m256 w2 = _mm256_fmadd_ps(bytes_to_ps(hi), sc, m), w3 = _mm256_fmadd_ps(bytes_to_ps(_mm_srli_si128(hi, 8)), sc, m);
    const float* xg = x + g * GROUP;
    for (int r = 0; r < rows; ++r, xg += K) {
      acc[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xg), acc[r]);
      acc[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xg + 8), acc[r]);
      acc[r] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xg + 16), acc[r]);
      acc[r] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xg + 24), acc[r]);
    }
  }
  for (int r = 0; r < rows; ++r) out[r * out_stride] = hsum(acc[r]);
}

inline void i8_rows_dot(const int8_t* q, const float* s, const float* x, int64_t K, int64_t G, int rows, float* out,
                        int64_t out_stride) {
  __m256 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g, q += GROUP) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16));
    const __m256 sc = _mm256_set1_ps(s[g]);
    const __m256 w0 = _mm256_mul_ps(sbytes_to_ps(a), sc), w1 = _mm256_mul_ps(sbytes_to_ps(_mm_srli_si128(a, 8)), sc);
    const __m256 w2 = _mm256_mul_ps(sbytes_to_ps(b), sc), w3 = _mm256_mul_ps(sbytes_to_ps(_mm_srli_si128(b, 8)), sc);
    const float* xg = x + g * GROUP;
    for (int r = 0; r < rows; ++r, xg += K) {
      acc[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xg), acc[r]);
      acc[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xg + 8), acc[r]);
      acc[r] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xg + 16), acc[r]);
      acc[r] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xg + 24), acc[r]);
    }
  }
  for (int r = 0; r < rows; ++r) out[r * out_stride] = hsum(acc[r]);
}
#define HAVE_ROWS_KERNELS 1
#else
#define HAVE_ROWS_KERNELS 0
// Portable versions: one accumulator lane per position so the compiler can vectorize without
// reassociating float sums.
inline float u4_row_dot(const uint8_t* q, const float* s, const float* x, int64_t G) {
  float acc[16] = {0};
  for (int64_t g = 0; g < G; ++g, q += 16, x += GROUP)
    for (int j = 0; j < 16; ++j) acc[j] += s[g] * (float(q[j] & 15) * x[j] + float(q[j] >> 4) * x[j + 16]);
  float total = 0.f;
  for (int j = 0; j < 16; ++j) total += acc[j];
  return total;
}

inline float i8_row_dot(const int8_t* q, const float* s, const float* x, int64_t G) {
  float acc[GROUP] = {0};
  for (int64_t g = 0; g < G; ++g, q += GROUP, x += GROUP)
    for (int j = 0; j < GROUP; ++j) acc[j] += s[g] * (float(q[j]) * x[j]);
  float total = 0.f;
  for (int j = 0; j < GROUP; ++j) total += acc[j];
  return total;
}
#endif

// out[m, n] = sum_k x[m, k] * w[n, k]; rows of w are split across threads.
torch::Tensor u4_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor mins) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), G = K / GROUP;
  TORCH_CHECK(K % GROUP == 0 && codes.size(1) == K / 2, "codes must be [N, K/2] with K a multiple of 32");
  // sum of x over each group, so the per-group min costs one multiply: sum(w*x) = scale*sum(q*x) + min*sum(x)
  // (the multi-row kernels expand weights fully, mins included, and need no sums)
  const bool rows_kernel = HAVE_ROWS_KERNELS && M > 1;
  std::vector<float> xsum(rows_kernel ? 0 : M * G, 0.f);
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < int64_t(xsum.size()); ++i)
    for (int j = 0; j < GROUP; ++j) xsum[i] += xp[i * GROUP + j];
  auto out = torch::empty({M, N}, x.options());
  const float* xs = xsum.data();
  const uint8_t* qp = codes.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* mp = mins.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* q = qp + n * (K / 2);
      const float* s = sp + n * G;
      const float* mn = mp + n * G;
#if HAVE_ROWS_KERNELS
      if (rows_kernel) {
        for (int64_t m = 0; m < M; m += ROWS)
          u4_rows_dot(q, s, mn, xp + m * K, K, G, int(std::min<int64_t>(ROWS, M - m)), op + m * N + n, N);
        continue;
      }
#endif
      for (int64_t m = 0; m < M; ++m) {
        const float* xg = xs + m * G;
        float bias = 0.f;
        for (int64_t g = 0; g < G; ++g) bias += mn[g] * xg[g];
        op[m * N + n] = u4_row_dot(q, s, xp + m * K, G) + bias;
      }
    }
  });
  return out;
}

torch::Tensor i8_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scales) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), G = K / GROUP;
  TORCH_CHECK(K % GROUP == 0 && codes.size(1) == K, "codes must be [N, K] with K a multiple of 32");
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* q = qp + n * K;
      const float* s = sp + n * G;
#if HAVE_ROWS_KERNELS
      if (M > 1) {
        for (int64_t m = 0; m < M; m += ROWS)
          i8_rows_dot(q, s, xp + m * K, K, G, int(std::min<int64_t>(ROWS, M - m)), op + m * N + n, N);
        continue;
      }
#endif
      for (int64_t m = 0; m < M; ++m) op[m * N + n] = i8_row_dot(q, s, xp + m * K, G);
    }
  });
  return out;
}

// The float32 matrix [N, K], for prefill, where a dense GEMM beats re-decoding codes per row of x.
torch::Tensor u4_dequantize(torch::Tensor codes, torch::Tensor scales, torch::Tensor mins) {
  const int64_t N = codes.size(0), K = codes.size(1) * 2, G = K / GROUP;
  auto w = torch::empty({N, K}, scales.options());
  const uint8_t* qp = codes.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* mp = mins.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N * G, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* qb = qp + b * 16;
      float* wb = wp + b * GROUP;
      for (int j = 0; j < 16; ++j) {
        wb[j] = sp[b] * float(qb[j] & 15) + mp[b];
        wb[j + 16] = sp[b] * float(qb[j] >> 4) + mp[b];
      }
    }
  });
  return w;
}

torch::Tensor i8_dequantize(torch::Tensor codes, torch::Tensor scales) {
  const int64_t N = codes.size(0), K = codes.size(1), G = K / GROUP;
  auto w = torch::empty({N, K}, scales.options());
  const int8_t* qp = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N * G, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int j = 0; j < GROUP; ++j) wp[b * GROUP + j] = sp[b] * float(qp[b * GROUP + j]);
  });
  return w;
}

// y = x / rms(x) * weight over the last dimension, in one pass (PyTorch's version is a chain of small ops,
// which at decode's one row per call costs more than the arithmetic).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous float32");
  const int64_t D = x.size(-1), rows = x.numel() / D;
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * D;
    float ss = 0.f;
    for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / float(D) + float(eps));
    for (int64_t i = 0; i < D; ++i) op[r * D + i] = xr[i] * inv * wp[i];
  }
  return out;
}

// Attention of one new query per sequence over its keys in a paged cache, read in place.
// q: [B, H, D]; caches: [num_blocks, block_size, KV, D]; block_tables: [B, max_blocks]; context_lens: [B].
// window > 0: a query sees only its sequence's last `window` keys (itself included). softcap > 0: scores are
// squashed to softcap * tanh(score / softcap) before the softmax (Gemma 2).
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                                     int64_t window, double softcap) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_decode_attention: contiguous float32 tensors expected");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), KV = k_cache.size(2), G = H / KV, width = block_tables.size(1);
  auto out = torch::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float cap = float(softcap);
  at::parallel_for(0, B * KV, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KV, h = i % KV, end = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, end - window) : 0, L = end - first;
      scores.assign(G * L, 0.f);
      for (int64_t t = first; t < end; ++t) {
        const int64_t slot = tables[b * width + t / bs] * bs + t % bs;
        const float* k = kp + (slot * KV + h) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qv = qp + (b * H + h * G + g) * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qv[d] * k[d];
          const float s = dot * float(scale);
          scores[g * L + t - first] = cap > 0.f ? cap * std::tanh(s / cap) : s;
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // softmax over the visible context
        float* row = scores.data() + g * L;
        const float top = *std::max_element(row, row + L);
        float total = 0.f;
        for (int64_t t = 0; t < L; ++t) total += (row[t] = std::exp(row[t] - top));
        for (int64_t t = 0; t < L; ++t) row[t] /= total;
      }
      for (int64_t t = first; t < end; ++t) {
        const int64_t slot = tables[b * width + t / bs] * bs + t % bs;
        const float* v = vp + (slot * KV + h) * D;
        for (int64_t g = 0; g < G; ++g) {
          float* o = op + (b * H + h * G + g) * D;
          const float p = scores[g * L + t - first];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) o[d] += p * v[d];
        }
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("u4_matmul", &u4_matmul);
  m.def("i8_matmul", &i8_matmul);
  m.def("u4_dequantize", &u4_dequantize);
  m.def("i8_dequantize", &i8_dequantize);
  m.def("rms_norm", &rms_norm);
  m.def("paged_decode_attention", &paged_decode_attention);
}
