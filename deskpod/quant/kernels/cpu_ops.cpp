// The engine's small fused CPU operations, where PyTorch's chain of small ops costs more than the arithmetic
// at decode's few rows: RMSNorm, and attention of one query per sequence over a paged KV cache read in place.
// The cache holds float32, float16 or bfloat16 (Cache below); queries and all arithmetic are float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HAVE_AVX2 1
#else
#define HAVE_AVX2 0
#endif

namespace {

// The cache's element types, each read and written through float (rounded to nearest even on the way in, as
// torch's own conversions round, so the kernels store exactly what `store_kv` would).
#define FOR_CACHE_TYPE(tensor, NAME, ...)                                                              \
  [&] {                                                                                               \
    switch ((tensor).scalar_type()) {                                                                 \
      case torch::kFloat32: { using Cache = float; return __VA_ARGS__(); }                            \
      case torch::kFloat16: { using Cache = at::Half; return __VA_ARGS__(); }                         \
      case torch::kBFloat16: { using Cache = at::BFloat16; return __VA_ARGS__(); }                    \
      default: TORCH_CHECK(false, NAME ": a float32, float16 or bfloat16 cache expected, got ", (tensor).scalar_type()); \
    }                                                                                                 \
  }()

// y = x / rms(x) * weight over the last dimension, in one pass (PyTorch's version is a chain of small ops,
// which at decode's one row per call costs more than the arithmetic).
inline void norm_row(const float* x, const float* weight, int64_t D, double eps, float* out) {
  float ss = 0.f;
  for (int64_t i = 0; i < D; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / float(D) + float(eps));
  for (int64_t i = 0; i < D; ++i) out[i] = x[i] * inv * weight[i];
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous float32");
  const int64_t D = x.size(-1), rows = x.numel() / D;
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) norm_row(xp + r * D, wp, D, eps, op + r * D);
  return out;
}

// Qwen3's and Gemma 3's per-head norms of queries and keys in one call: qk [T, H + KV, D] (its tokens' rows may
// be strided: a slice of the fused qkv projection) -> [T, H + KV, D], the first H heads of each token normed with
// q_weight, the others with k_weight, each as rms_norm computes it (PyTorch: two copies, two norms, a concat).
torch::Tensor head_norms(torch::Tensor qk, torch::Tensor q_weight, torch::Tensor k_weight, int64_t H, double q_eps,
                         double k_eps) {
  TORCH_CHECK(qk.dtype() == torch::kFloat32 && qk.dim() == 3 && qk.stride(2) == 1 && qk.stride(1) == qk.size(2),
              "qk must be float32 [T, heads, D] with each token's heads contiguous");
  const int64_t T = qk.size(0), heads = qk.size(1), D = qk.size(2);
  TORCH_CHECK(q_weight.numel() == D && k_weight.numel() == D && 0 <= H && H <= heads, "weights of ", D, " and H <= heads");
  auto out = torch::empty({T, heads, D}, qk.options());
  const torch::Tensor q = q_weight.contiguous(), k = k_weight.contiguous();  // held: their memory is read below
  const float *xp = qk.data_ptr<float>(), *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < heads; ++h)
      norm_row(xp + t * qk.stride(0) + h * D, h < H ? qp : kp, D, h < H ? q_eps : k_eps, op + (t * heads + h) * D);
  return out;
}

// RoPE on a step's queries and keys, and the keys and values stored in the paged cache, in one pass (in
// PyTorch a dozen small ops a layer: complex views, a product, casts, two index copies).
// qk: [T, H + KV, D] (rows may be strided, as slices of the fused qkv projection), adjacent pairs rotated;
// v: [T, KV, D] likewise; rot: [T, D/2] (cos, sin) pairs (a complex rotation seen as floats), times the rope's
// magnitude; caches: [num_blocks, block_size, KV, D]; slots [T]: each token's flat slot. Returns the rotated
// queries [T, H, D]. (rope_store, below, after its pieces.)

// a * b rounded to float before whatever uses it: a compiler fusing it into a multiply-add would round once
// instead (volatile keeps it apart on every compiler; a few hundred products a layer, so its cost is nothing)
inline float rounded_product(float a, float b) {
  volatile float p = a * b;
  return p;
}

// One head's D values rotated in adjacent pairs into y (the queries' float32, or the cache's type): each product
// rounded, then the sum, exactly as PyTorch's complex product, so the rotation is bit for bit the plain path's
// (and transformers').
template <typename Out>
inline void rotate_pairs(const float* x, const float* rt, int64_t D, Out* y) {
  for (int64_t i = 0; i < D / 2; ++i) {
    const float x0 = x[2 * i], x1 = x[2 * i + 1], c = rt[2 * i], s = rt[2 * i + 1];
    y[2 * i] = Out(rounded_product(x0, c) - rounded_product(x1, s));
    y[2 * i + 1] = Out(rounded_product(x0, s) + rounded_product(x1, c));
  }
}

template <typename Cache>
void rope_store_into(const torch::Tensor& qk, const torch::Tensor& v, const torch::Tensor& rot, Cache* kc, Cache* vc,
                     int64_t num_slots, const torch::Tensor& slots, int64_t H, float* qp) {
  const int64_t T = qk.size(0), KV = qk.size(1) - H, D = qk.size(2);
  const float* src = qk.data_ptr<float>();
  const float* vsrc = v.data_ptr<float>();
  const float* r = rot.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t slot = sp[t];
    TORCH_CHECK(0 <= slot && slot < num_slots, "rope_store: slot ", slot, " is outside the cache");
    const float* rt = r + t * D;
    const float* x = src + t * qk.stride(0);
    for (int64_t head = 0; head < H; ++head) rotate_pairs(x + head * D, rt, D, qp + (t * H + head) * D);
    for (int64_t head = 0; head < KV; ++head) rotate_pairs(x + (H + head) * D, rt, D, kc + (slot * KV + head) * D);
    const float* vt = vsrc + t * v.stride(0);
    Cache* vy = vc + slot * KV * D;
    for (int64_t i = 0; i < KV * D; ++i) vy[i] = Cache(vt[i]);
  }
}

torch::Tensor rope_store(torch::Tensor qk, torch::Tensor v, torch::Tensor rot, torch::Tensor k_cache,
                         torch::Tensor v_cache, torch::Tensor slots, int64_t H) {
  const int64_t T = qk.size(0), KV = qk.size(1) - H, D = qk.size(2);
  TORCH_CHECK(qk.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32 && rot.dtype() == torch::kFloat32 &&
              k_cache.dtype() == v_cache.dtype() && slots.dtype() == torch::kInt64,
              "rope_store: float32 activations, caches of one type and int64 slots expected");
  TORCH_CHECK(qk.stride(2) == 1 && qk.stride(1) == D && v.stride(2) == 1 && v.stride(1) == D && v.size(1) == KV &&
              rot.is_contiguous() && rot.numel() == T * D && k_cache.is_contiguous() &&
              v_cache.is_contiguous() && k_cache.size(2) == KV && k_cache.size(3) == D && slots.numel() == T,
              "rope_store: shapes or strides not as expected");
  auto q = torch::empty({T, H, D}, qk.options());
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  FOR_CACHE_TYPE(k_cache, "rope_store", [&] {
    rope_store_into<Cache>(qk, v, rot, k_cache.data_ptr<Cache>(), v_cache.data_ptr<Cache>(), num_slots, slots, H,
                           q.data_ptr<float>());
  });
  return q;
}

#if HAVE_AVX2
// The horizontal sums of 8 vectors, as the 8 lanes of one: three rounds of pairwise adds instead of a full
// reduction per vector.
inline __m256 sums_of_8(const __m256* a) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  // lanes: s0123 = [a0 a1 a2 a3 | a0 a1 a2 a3] halves, s4567 likewise for a4..a7
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// e^x for 8 floats (Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2, a degree-6 polynomial for e^r; within 2 ulp
// of std::exp over the range a softmax uses, x <= 0).
inline __m256 exp_8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365447504f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

// 8 cached elements as 8 floats
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const at::BFloat16* p) {  // a bfloat16 is a float's upper 16 bits
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// Ask for a cached row of D elements (its cache lines) now: the cache's blocks lie anywhere in memory, so the
// hardware cannot guess the next ones
template <typename Cache>
inline void prefetch_row(const Cache* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < D * int64_t(sizeof(Cache)); off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

// Keys per piece: a sequence's keys are attended to in pieces of this many, each by any thread, and the pieces
// combined (flash-decoding), so that one long sequence keeps every core busy. Fixed, never derived from the
// batch or the thread count: a row's arithmetic depends on its own context only.
constexpr int64_t KEYS_PER_PIECE = 128;

// One piece of a sequence: the G query heads sharing kv head h over keys t_begin..t_end, vectorised: scores 8
// keys at a time, their exponentials 8 at a time, the weighted values summed in registers. Writes the piece's
// unnormalised output [G, D], and per head its largest score and the sum of its exponentials. D % 16 == 0.
template <typename Cache>
void attend_piece_avx2(const float* q, const Cache* kp, const Cache* vp, const int64_t* table, int64_t bs, int64_t KV,
                       int64_t h, int64_t G, int64_t D, int64_t t_begin, int64_t t_end, float scale, float cap,
                       float* out, float* maxima, float* totals, std::vector<float>& scores) {
  const int64_t L = t_end - t_begin, Lpad = (L + 7) / 8 * 8;
  scores.resize(G * Lpad);
  auto row_of = [&](const Cache* cache, int64_t t) {
    return cache + ((table[t / bs] * bs + t % bs) * KV + h) * D;
  };
  for (int64_t t0 = t_begin; t0 < t_end; t0 += 8) {
    const int n = int(std::min<int64_t>(8, t_end - t0));
    const Cache* k[8];
    for (int j = 0; j < 8; ++j) k[j] = row_of(kp, t0 + std::min(j, n - 1));  // a short tail repeats its last key
    for (int64_t t = t0 + 8; t < std::min(t0 + 16, t_end); ++t) prefetch_row(row_of(kp, t), D);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qg + d);
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, load8(k[j] + d), acc[j]);
      }
      _mm256_storeu_ps(scores.data() + g * Lpad + (t0 - t_begin), _mm256_mul_ps(sums_of_8(acc), _mm256_set1_ps(scale)));
    }
  }
  for (int64_t g = 0; g < G; ++g) {  // the softmax's numerators, in place
    float* row = scores.data() + g * Lpad;
    if (cap > 0.f)
      for (int64_t t = 0; t < L; ++t) row[t] = cap * std::tanh(row[t] / cap);
    float top = -INFINITY;
    for (int64_t t = 0; t < L; ++t) top = std::max(top, row[t]);
    __m256 total = _mm256_setzero_ps();
    for (int64_t t = 0; t < Lpad; t += 8) {
      __m256 e = exp_8(_mm256_sub_ps(_mm256_loadu_ps(row + t), _mm256_set1_ps(top)));
      if (t + 8 > L) {  // the padding lanes (scores of a repeated key) count for nothing
        alignas(32) float keep[8];
        for (int j = 0; j < 8; ++j) keep[j] = t + j < L ? 1.f : 0.f;
        e = _mm256_mul_ps(e, _mm256_load_ps(keep));
      }
      _mm256_storeu_ps(row + t, e);
      total = _mm256_add_ps(total, e);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, total);
    float sum = 0.f;
    for (int j = 0; j < 8; ++j) sum += lanes[j];
    maxima[g] = top, totals[g] = sum;
  }
  for (int64_t g0 = 0; g0 < G; g0 += 4) {  // weighted values: 4 heads x 16 columns in 8 registers at a time
    const int gn = int(std::min<int64_t>(4, G - g0));
    for (int64_t d = 0; d < D; d += 16) {
      __m256 acc[4][2];
      for (int g = 0; g < 4; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
      for (int64_t t = t_begin; t < t_end; ++t) {
        const Cache* v = row_of(vp, t) + d;
        if (t + 8 < t_end) _mm_prefetch(reinterpret_cast<const char*>(row_of(vp, t + 8) + d), _MM_HINT_T0);
        const __m256 v0 = load8(v), v1 = load8(v + 8);
        for (int g = 0; g < gn; ++g) {
          const __m256 p = _mm256_set1_ps(scores[(g0 + g) * Lpad + t - t_begin]);
          acc[g][0] = _mm256_fmadd_ps(p, v0, acc[g][0]);
          acc[g][1] = _mm256_fmadd_ps(p, v1, acc[g][1]);
        }
      }
      for (int g = 0; g < gn; ++g) {
        _mm256_storeu_ps(out + (g0 + g) * D + d, acc[g][0]);
        _mm256_storeu_ps(out + (g0 + g) * D + d + 8, acc[g][1]);
      }
    }
  }
}

// All of paged_decode_attention on the vectorised path: every (sequence, kv head, piece of keys) is a task for
// any thread; then each sequence's pieces are combined, each scaled by e^(its maximum - the overall maximum),
// with the head's sink in the denominator.
template <typename Cache>
void paged_decode_attention_avx2(const float* qp, const Cache* kp, const Cache* vp, const int64_t* tables,
                                 const int64_t* lens, int64_t width, int64_t B, int64_t KV, int64_t G, int64_t D,
                                 int64_t bs, int64_t window, float scale, float cap, const float* sinks, float* op) {
  std::vector<int64_t> firsts(B), piece_start(B + 1, 0);  // where each sequence's pieces begin in the task list
  for (int64_t b = 0; b < B; ++b) {
    firsts[b] = window > 0 ? std::max<int64_t>(0, lens[b] - window) : 0;
    piece_start[b + 1] = piece_start[b] + std::max<int64_t>(1, (lens[b] - firsts[b] + KEYS_PER_PIECE - 1) / KEYS_PER_PIECE);
  }
  const int64_t pieces = piece_start[B], H = KV * G;
  std::vector<float> outs(pieces * KV * G * D), maxima(pieces * KV * G), totals(pieces * KV * G);
  std::vector<int64_t> sequence_of(pieces);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = piece_start[b]; p < piece_start[b + 1]; ++p) sequence_of[p] = b;
  at::parallel_for(0, pieces * KV, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t p = i / KV, h = i % KV, b = sequence_of[p];
      const int64_t t_begin = firsts[b] + (p - piece_start[b]) * KEYS_PER_PIECE;
      const int64_t t_end = std::min(lens[b], t_begin + KEYS_PER_PIECE);
      float* m = maxima.data() + i * G;
      float* l = totals.data() + i * G;
      if (t_begin >= t_end) {  // an empty context
        std::fill(m, m + G, -INFINITY), std::fill(l, l + G, 0.f);
        std::fill(outs.begin() + i * G * D, outs.begin() + (i + 1) * G * D, 0.f);
        continue;
      }
      attend_piece_avx2(qp + (b * H + h * G) * D, kp, vp, tables + b * width, bs, KV, h, G, D, t_begin, t_end, scale,
                        cap, outs.data() + i * G * D, m, l, scores);
    }
  });
  at::parallel_for(0, B * H, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b = j / H, head = j % H, h = head / G, g = head % G;
      float top = sinks ? sinks[head] : -INFINITY;
      for (int64_t p = piece_start[b]; p < piece_start[b + 1]; ++p) top = std::max(top, maxima[(p * KV + h) * G + g]);
      float denominator = sinks ? std::exp(sinks[head] - top) : 0.f;
      float* o = op + j * D;
      std::fill(o, o + D, 0.f);
      for (int64_t p = piece_start[b]; p < piece_start[b + 1]; ++p) {
        const int64_t k = (p * KV + h) * G + g;
        if (totals[k] == 0.f) continue;
        const float weight = std::exp(maxima[k] - top);
        denominator += totals[k] * weight;
        const float* part = outs.data() + k * D;
        for (int64_t d = 0; d < D; ++d) o[d] += weight * part[d];
      }
      const float inv = denominator > 0.f ? 1.f / denominator : 0.f;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  });
}
#endif

// Attention of one new query per sequence over its keys in a paged cache, read in place.
// q: [B, H, D]; caches: [num_blocks, block_size, KV, D]; block_tables: [B, max_blocks]; context_lens: [B].
// window > 0: a query sees only its sequence's last `window` keys (itself included). softcap > 0: scores are
// squashed to softcap * tanh(score / softcap) before the softmax (Gemma 2). sinks [H] (gpt-oss): a logit per
// head that joins each softmax's denominator and attends to nothing.
// The same without vector instructions (any CPU, any head size).
template <typename Cache>
void paged_decode_attention_scalar(const float* qp, const Cache* kp, const Cache* vp, const int64_t* tables,
                                   const int64_t* lens, int64_t width, int64_t B, int64_t KV, int64_t G, int64_t D,
                                   int64_t bs, int64_t window, float scale, float cap, const float* sp, float* op) {
  const int64_t H = KV * G;
  at::parallel_for(0, B * KV, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KV, h = i % KV, end = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, end - window) : 0, L = end - first;
      scores.assign(G * L, 0.f);
      for (int64_t t = first; t < end; ++t) {
        const int64_t slot = tables[b * width + t / bs] * bs + t % bs;
        const Cache* k = kp + (slot * KV + h) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qv = qp + (b * H + h * G + g) * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qv[d] * float(k[d]);
          const float s = dot * scale;
          scores[g * L + t - first] = cap > 0.f ? cap * std::tanh(s / cap) : s;
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // softmax over the visible context (and the head's sink)
        float* row = scores.data() + g * L;
        const float sink = sp ? sp[h * G + g] : -INFINITY;
        const float top = std::max(*std::max_element(row, row + L), sink);
        float total = sp ? std::exp(sink - top) : 0.f;
        for (int64_t t = 0; t < L; ++t) total += (row[t] = std::exp(row[t] - top));
        for (int64_t t = 0; t < L; ++t) row[t] /= total;
      }
      for (int64_t t = first; t < end; ++t) {
        const int64_t slot = tables[b * width + t / bs] * bs + t % bs;
        const Cache* v = vp + (slot * KV + h) * D;
        for (int64_t g = 0; g < G; ++g) {
          float* o = op + (b * H + h * G + g) * D;
          const float p = scores[g * L + t - first];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) o[d] += p * float(v[d]);
        }
      }
    }
  });
}

// Attention of one new query per sequence over its keys in a paged cache, read in place.
// q: [B, H, D]; caches: [num_blocks, block_size, KV, D]; block_tables: [B, max_blocks]; context_lens: [B].
// window > 0: a query sees only its sequence's last `window` keys (itself included). softcap > 0: scores are
// squashed to softcap * tanh(score / softcap) before the softmax (Gemma 2). sinks [H] (gpt-oss): a logit per
// head that joins each softmax's denominator and attends to nothing.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                                     int64_t window, double softcap, c10::optional<torch::Tensor> sinks) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.dtype() == v_cache.dtype(),
              "paged_decode_attention: contiguous tensors expected: float32 queries, caches of one type");
  torch::Tensor sink_values;
  if (sinks.has_value()) {
    sink_values = sinks->to(torch::kFloat32).contiguous();
    TORCH_CHECK(sink_values.numel() == q.size(1), "paged_decode_attention: one sink per head expected");
  }
  const float* sp = sinks.has_value() ? sink_values.data_ptr<float>() : nullptr;
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), KV = k_cache.size(2), G = H / KV, width = block_tables.size(1);
  const float* qp = q.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const float cap = float(softcap);
  // every row is written on the vectorised path (the pieces' combination fills it); the plain one adds into it
  auto out = HAVE_AVX2 && D % 16 == 0 ? torch::empty_like(q) : torch::zeros_like(q);
  float* op = out.data_ptr<float>();
  FOR_CACHE_TYPE(k_cache, "paged_decode_attention", [&] {
    const Cache* kp = k_cache.data_ptr<Cache>();
    const Cache* vp = v_cache.data_ptr<Cache>();
#if HAVE_AVX2
    if (D % 16 == 0)
      return paged_decode_attention_avx2<Cache>(qp, kp, vp, tables, lens, width, B, KV, G, D, bs, window, float(scale),
                                                cap, sp, op);
#endif
    paged_decode_attention_scalar<Cache>(qp, kp, vp, tables, lens, width, B, KV, G, D, bs, window, float(scale), cap,
                                         sp, op);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm);
  m.def("head_norms", &head_norms, py::arg("qk"), py::arg("q_weight"), py::arg("k_weight"), py::arg("H"),
        py::arg("q_eps"), py::arg("k_eps"));
  m.def("rope_store", &rope_store, py::arg("qk"), py::arg("v"), py::arg("rot"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slots"), py::arg("H"));
  m.def("paged_decode_attention", &paged_decode_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"), py::arg("window"), py::arg("softcap"),
        py::arg("sinks") = py::none());
}
