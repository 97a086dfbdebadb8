// Matrix kernels over weights kept compact in deskpod.quant's schemes, for CPU inference.
//
// The weights keep their stored bits (deskpod/quant/cpu.py pads rows to whole units of 32 elements and puts
// 4-bit codes in unit order, see below; nothing else):
//   fp4 (NVFP4, MXFP4): two E2M1 codes per byte and one scale byte per block of 16 (NVFP4: E4M3) or 32
//       (MXFP4: E8M0). The scale byte becomes a float through a 256-entry table the caller passes (the
//       format's own decoding, times the per-tensor scale).
//   fp8 (E4M3FN, E5M2): one code per byte and one float32 scale per output row.
//   int4: two codes q in 0..15 per byte, w = q * scale + min, float16 scale and min per 32.
//   int8: int8 codes, w = q * scale, float16 scale per 32.
// Codes turn into floats a few vector instructions per 8-16 weights, in registers right before the multiply:
// memory traffic stays at the stored bits per weight. Up to 8 rows of x share each decoded block.
//
// Every kernel has an AVX2/F16C/FMA version and a portable scalar one; `portable=true` selects the latter
// (always compiled, so the tests run it on any machine).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HAVE_SIMD 1
#else
#define HAVE_SIMD 0
#endif

namespace {

// Rows of x that share one decoded block of weights in the multi-row (small batch) kernels.
constexpr int ROWS = 8;

// E2M1 code -> twice its value, so every value is a small integer (the 0.5 goes into the block scale).
// Bits: sign(3) exponent(2..1) mantissa(0); magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
alignas(16) constexpr int8_t E2M1_X2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// A small float with `ebits` exponent bits, `mbits` mantissa bits and the given bias, as in OCP FP8:
// E5M2 keeps IEEE inf/NaN (exponent all ones); E4M3FN has no inf and only S.1111.111 as NaN.
float minifloat(uint8_t b, int ebits, int mbits, int bias, bool ieee_specials) {
  const int e = (b >> mbits) & ((1 << ebits) - 1), m = b & ((1 << mbits) - 1);
  const float sign = (b & 0x80) ? -1.f : 1.f;
  const bool top = e == (1 << ebits) - 1;
  if (ieee_specials && top) return m ? NAN : sign * INFINITY;
  if (!ieee_specials && top && m == (1 << mbits) - 1) return NAN;
  const float frac = float(m) / float(1 << mbits);
  return sign * (e ? std::ldexp(1.f + frac, e - bias) : std::ldexp(frac, 1 - bias));
}

// float16 -> float32 for n values (scales and mins are stored as float16).
void halves_to_floats(const uint16_t* h, float* out, int64_t n, bool simd) {
  int64_t i = 0;
#if HAVE_SIMD
  if (simd)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
  for (; i < n; ++i) out[i] = float(c10::Half(h[i], c10::Half::from_bits()));
}

// One call's view of a weight matrix [N, K], K a whole number of units of 32 elements (4 vectors of 8).
struct Matrix {
  const uint8_t* codes;
  int64_t row_bytes;
  int64_t N, K, G;             // G: scale blocks per row
  const uint8_t* scale_bytes;  // fp4: [N, G]
  const float* table;          // fp4: scale byte -> float, times the tensor scale and UNIT
  const float* row_scale;      // fp8: [N]
  const uint16_t* scales;      // int4, int8: [N, G] float16
  const uint16_t* mins;        // int4: [N, G] float16
};

// One weight row as the kernels read it: its codes and its block scales (float16 ones, and mins, converted
// to float32 into a per-thread buffer first, so that the inner loops only broadcast them).
struct Row {
  const uint8_t* q;
  const float* scale;        // [G], formats with float16 scales (converted)
  const float* min;          // [G], formats with a min
  const uint8_t* scale_byte; // [G], fp4: looked up in table where used (cheaper than converting first)
  const float* table;
  float row_scale;
  int64_t G, K;
};

// ---- formats: how one unit of 32 weights decodes ------------------------------------------------------
// Every format is read in units of 32 elements. 4-bit codes are kept in the order of ggml's blocks (cpu.py
// reorders them once at load): byte j of a unit holds element j in its low nibble and element j + 16 in its
// high one, so that splitting the nibbles yields elements in order with no interleaving shuffle.
// SCALES: scale blocks per unit (2: NVFP4's blocks of 16; 1: blocks of 32; 0: one scale per row).
// raw(q, k): element k of a row before scaling, w = raw * scale[k / BLOCK] * row_scale (+ min[k / BLOCK]).
// decode(q, v): the unit at q as 4 vectors of 8 raw values, elements 0-7, 8-15, 16-23, 24-31.
// params(w, n0, rows, scale, min, simd): the float16 block scales (and mins) of rows n0.. as float32;
// scale(row, g): block g's scale.

inline int nibble(const uint8_t* q, int64_t k) {  // element k of a row of 4-bit codes in unit order
  const int64_t j = k % 32;
  return (q[(k / 32) * 16 + j % 16] >> (j < 16 ? 0 : 4)) & 15;
}

#if HAVE_SIMD
// 16 code bytes -> their low nibbles (elements 0..15) and high nibbles (16..31), each as 16 bytes
inline void split_nibbles(const uint8_t* q, __m128i& lo, __m128i& hi) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)), low = _mm_set1_epi8(0x0F);
  lo = _mm_and_si128(packed, low);
  hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
}
inline __m256 i8_to_ps(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }  // low 8 bytes
inline __m256i widen_u8(const uint8_t* q) {  // 8 bytes -> 8 32-bit lanes
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
}
#endif

template <int B>
struct FP4 {
  static constexpr int BLOCK = B, BYTES = 16, SCALES = 32 / B;
  static constexpr bool HAS_MIN = false;
  static constexpr float UNIT = 0.5f;  // raw values are doubled
  static float raw(const uint8_t* q, int64_t k) { return E2M1_X2[nibble(q, k)]; }
  static float row_scale(const Matrix&, int64_t) { return 1.f; }
  static void params(const Matrix&, int64_t, int64_t, float*, float*, bool) {}
  static float scale(const Row& row, int64_t g) { return row.table[row.scale_byte[g]]; }
#if HAVE_SIMD
  static inline void decode(const uint8_t* q, __m256* v) {
    const __m128i table = _mm_load_si128(reinterpret_cast<const __m128i*>(E2M1_X2));
    __m128i lo, hi;
    split_nibbles(q, lo, hi);
    lo = _mm_shuffle_epi8(table, lo);  // codes -> doubled values, int8
    hi = _mm_shuffle_epi8(table, hi);
    v[0] = i8_to_ps(lo), v[1] = i8_to_ps(_mm_srli_si128(lo, 8));
    v[2] = i8_to_ps(hi), v[3] = i8_to_ps(_mm_srli_si128(hi, 8));
  }
#endif
};

// FP8: one byte per weight in element order, one scale per row.
template <bool E5M2>
struct FP8 {
  static constexpr int BLOCK = 32, BYTES = 32, SCALES = 0;
  static constexpr bool HAS_MIN = false;
  // In registers a code becomes an fp16 and then a float (F16C). E5M2 is exactly the top byte of an fp16.
  // E4M3 with its exponent and mantissa moved one bit right is an fp16 of the same bits with bias 15 instead
  // of 7, i.e. the value / 2^8, subnormals included: UNIT puts the 2^8 back.
  static constexpr float UNIT = E5M2 ? 1.f : 256.f;
  static float raw(const uint8_t* q, int64_t k) {
    return E5M2 ? minifloat(q[k], 5, 2, 15, true) : minifloat(q[k], 4, 3, 7, false) / UNIT;
  }
  static float row_scale(const Matrix& w, int64_t n) { return w.row_scale[n] * UNIT; }
  static void params(const Matrix&, int64_t, int64_t, float*, float*, bool) {}
  static float scale(const Row&, int64_t) { return 1.f; }
#if HAVE_SIMD
  static inline __m256 to_float(__m128i shifted) {  // 8 codes, each in the top byte of a 16-bit lane
    if constexpr (E5M2) return _mm256_cvtph_ps(shifted);
    // S EEEE MMM 00000000 -> S 0 EEEE MMM 0000000: arithmetic shift copies S into bit 14, then clear it
    return _mm256_cvtph_ps(_mm_and_si128(_mm_srai_epi16(shifted, 1), _mm_set1_epi16(int16_t(0xBFFF))));
  }
  static inline void decode(const uint8_t* q, __m256* v) {
    const __m128i zero = _mm_setzero_si128();
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16));
    v[0] = to_float(_mm_unpacklo_epi8(zero, a)), v[1] = to_float(_mm_unpackhi_epi8(zero, a));  // code << 8
    v[2] = to_float(_mm_unpacklo_epi8(zero, b)), v[3] = to_float(_mm_unpackhi_epi8(zero, b));
  }
#endif
};

// int4 (asymmetric, 4-bit codes in unit order) and int8 (symmetric), float16 scale (and min) per 32.
template <bool FOUR_BIT>
struct Int {
  static constexpr int BLOCK = 32, BYTES = FOUR_BIT ? 16 : 32, SCALES = 1;
  static constexpr bool HAS_MIN = FOUR_BIT;
  static constexpr float UNIT = 1.f;
  static float raw(const uint8_t* q, int64_t k) { return FOUR_BIT ? float(nibble(q, k)) : float(int8_t(q[k])); }
  static float row_scale(const Matrix&, int64_t) { return 1.f; }
  static void params(const Matrix& w, int64_t n0, int64_t rows, float* scale, float* min, bool simd) {
    halves_to_floats(w.scales + n0 * w.G, scale, rows * w.G, simd);
    if constexpr (FOUR_BIT) halves_to_floats(w.mins + n0 * w.G, min, rows * w.G, simd);
  }
  static float scale(const Row& row, int64_t g) { return row.scale[g]; }
#if HAVE_SIMD
  static inline void decode(const uint8_t* q, __m256* v) {
    // Bytes are widened to 32-bit lanes straight from memory (the load folds into the widening), and the
    // nibbles are split there with plain integer ops: two byte shuffles per unit instead of six.
    if constexpr (FOUR_BIT) {
      const __m256i a = widen_u8(q), b = widen_u8(q + 8), low = _mm256_set1_epi32(15);
      v[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, low)), v[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b, low));
      v[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), v[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
    } else {
      for (int i = 0; i < 4; ++i)
        v[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i))));
    }
  }
#endif
};

// A thread's run of weight rows n0..n1, PARAM_ROWS at a time: their float16 scales (and mins) are converted to
// float32 together (they are contiguous), then each row is handed to the kernels.
constexpr int64_t PARAM_ROWS = 64;

template <class F, class Body>
void for_rows(const Matrix& w, int64_t n0, int64_t n1, bool simd, Body body) {
  std::vector<float> buf(2 * PARAM_ROWS * w.G);
  float *scale = buf.data(), *min = buf.data() + PARAM_ROWS * w.G;
  for (int64_t c0 = n0; c0 < n1; c0 += PARAM_ROWS) {
    const int64_t c1 = std::min(n1, c0 + PARAM_ROWS);
    F::params(w, c0, c1 - c0, scale, min, simd);
    for (int64_t n = c0; n < c1; ++n) {
      const int64_t i = (n - c0) * w.G;
      const uint8_t* scale_byte = w.scale_bytes ? w.scale_bytes + n * w.G : nullptr;
      body(n, Row{w.codes + n * w.row_bytes, scale + i, min + i, scale_byte, w.table, F::row_scale(w, n), w.G, w.K});
    }
  }
}

// Per block of each row of x, the sum of its elements: with them a block's min costs one multiply per block,
// sum(w * x) = scale * sum(q * x) + min * sum(x). x: [M, K] -> [M, G]; empty for formats without a min.
template <class F>
std::vector<float> block_sums(const float* x, int64_t M, int64_t K) {
  if constexpr (!F::HAS_MIN) return {};
  std::vector<float> sums(M * (K / F::BLOCK), 0.f);
  for (size_t i = 0; i < sums.size(); ++i)
    for (int j = 0; j < F::BLOCK; ++j) sums[i] += x[i * F::BLOCK + j];
  return sums;
}

// ---- portable kernels ------------------------------------------------------------------------------------

template <class F>
float row_dot_portable(const Row& row, const float* x) {
  float total = 0.f;
  for (int64_t g = 0; g < row.G; ++g) {
    float dot = 0.f, sum = 0.f;
    for (int64_t k = g * F::BLOCK; k < (g + 1) * F::BLOCK; ++k) dot += F::raw(row.q, k) * x[k], sum += x[k];
    if constexpr (F::SCALES > 0) dot *= F::scale(row, g);
    if constexpr (F::HAS_MIN) dot += sum * row.min[g];
    total += dot;
  }
  return total * row.row_scale;
}

template <class F>
void dequantize_row_portable(const Row& row, float* out) {
  for (int64_t g = 0; g < row.G; ++g) {
    const float s = F::scale(row, g) * row.row_scale, m = F::HAS_MIN ? row.min[g] : 0.f;
    for (int64_t k = g * F::BLOCK; k < (g + 1) * F::BLOCK; ++k) out[k] = F::raw(row.q, k) * s + m;
  }
}

// ---- AVX2 kernels ----------------------------------------------------------------------------------------
#if HAVE_SIMD
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Unit u times one row of x (at x), added into the accumulators: scaled formats sum each block's raw values
// times x and scale the sum once; fp8 (scaled per row) multiplies straight into both accumulators.
template <class F>
inline void unit_fma(const Row& row, int64_t u, const float* x, __m256& a, __m256& b) {
  __m256 v[4];
  F::decode(row.q + u * F::BYTES, v);
  __m256 p[4];
  for (int i = 0; i < 4; ++i) p[i] = _mm256_loadu_ps(x + 8 * i);
  if constexpr (F::SCALES == 0) {
    a = _mm256_fmadd_ps(v[2], p[2], _mm256_fmadd_ps(v[0], p[0], a));
    b = _mm256_fmadd_ps(v[3], p[3], _mm256_fmadd_ps(v[1], p[1], b));
  } else if constexpr (F::SCALES == 1) {
    const __m256 d = _mm256_add_ps(_mm256_fmadd_ps(v[1], p[1], _mm256_mul_ps(v[0], p[0])),
                                   _mm256_fmadd_ps(v[3], p[3], _mm256_mul_ps(v[2], p[2])));
    a = _mm256_fmadd_ps(_mm256_set1_ps(F::scale(row, u)), d, a);
  } else {
    const __m256 d0 = _mm256_fmadd_ps(v[1], p[1], _mm256_mul_ps(v[0], p[0]));
    const __m256 d1 = _mm256_fmadd_ps(v[3], p[3], _mm256_mul_ps(v[2], p[2]));
    a = _mm256_fmadd_ps(_mm256_set1_ps(F::scale(row, 2 * u)), d0, a);
    b = _mm256_fmadd_ps(_mm256_set1_ps(F::scale(row, 2 * u + 1)), d1, b);
  }
}

// The mins' share of one output, sum over blocks of min * sum(x), xsum: this row of x's block sums
// (8 blocks per vector: a scalar loop would be a chain of dependent multiply-adds as long as the row).
template <class F>
inline float min_term(const Row& row, const float* xsum) {
  if constexpr (!F::HAS_MIN) return 0.f;
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= row.G; g += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(row.min + g), _mm256_loadu_ps(xsum + g), acc);
  float total = hsum(acc);
  for (; g < row.G; ++g) total += row.min[g] * xsum[g];
  return total;
}

// One row of x against a weight row. Units go in pairs so that consecutive units feed different
// accumulators, all of them named registers (an accumulator array indexed at run time lives in memory).
template <class F>
float row_dot(const Row& row, const float* x, const float* xsum) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  const int64_t U = row.K / 32;
  int64_t u = 0;
  for (; u + 1 < U; u += 2, x += 64) {
    unit_fma<F>(row, u, x, a0, a1);
    unit_fma<F>(row, u + 1, x + 32, b0, b1);
  }
  if (u < U) unit_fma<F>(row, u, x, a0, a1);
  const float dot = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(b0, b1)));
  return dot * row.row_scale + min_term<F>(row, xsum);
}

// Unit u's weights as floats, scaled (and shifted by the min): what the multi-row kernels reuse.
template <class F>
inline void unit_weights(const Row& row, int64_t u, __m256* v) {
  F::decode(row.q + u * F::BYTES, v);
  if constexpr (F::SCALES == 1) {
    const __m256 s = _mm256_set1_ps(F::scale(row, u));
    if constexpr (F::HAS_MIN) {
      const __m256 m = _mm256_set1_ps(row.min[u]);
      for (int i = 0; i < 4; ++i) v[i] = _mm256_fmadd_ps(v[i], s, m);
    } else {
      for (int i = 0; i < 4; ++i) v[i] = _mm256_mul_ps(v[i], s);
    }
  } else if constexpr (F::SCALES == 2) {
    const __m256 s0 = _mm256_set1_ps(F::scale(row, 2 * u)), s1 = _mm256_set1_ps(F::scale(row, 2 * u + 1));
    v[0] = _mm256_mul_ps(v[0], s0), v[1] = _mm256_mul_ps(v[1], s0);
    v[2] = _mm256_mul_ps(v[2], s1), v[3] = _mm256_mul_ps(v[3], s1);
  }
}

// R rows of x (stride K) against a weight row: each block is decoded and scaled once for all of them.
// R is a compile-time constant so the loops unroll and the R x A accumulators stay in registers; with few
// rows each gets two accumulators, so that the chain of dependent FMAs does not set the pace.
template <class F, int R>
void rows_dot(const Row& row, const float* x, float* out, int64_t out_stride) {
  constexpr int A = R <= 3 ? 2 : 1;
  __m256 acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
  for (int64_t u = 0; u < row.K / 32; ++u, x += 32) {
    __m256 v[4];
    unit_weights<F>(row, u, v);
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i)
        acc[r][i % A] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(x + r * row.K + 8 * i), acc[r][i % A]);
  }
  for (int r = 0; r < R; ++r) {
    __m256 total = acc[r][0];
    for (int a = 1; a < A; ++a) total = _mm256_add_ps(total, acc[r][a]);
    out[r * out_stride] = hsum(total) * row.row_scale;
  }
}

// 1 to ROWS rows of x against a weight row (one row: the dot product kernel, which needs x's block sums).
template <class F>
void rows_dot_any(const Row& row, const float* x, const float* xsum, int rows, float* out, int64_t out_stride) {
  switch (rows) {
    case 1: *out = row_dot<F>(row, x, xsum); break;
    case 2: rows_dot<F, 2>(row, x, out, out_stride); break;
    case 3: rows_dot<F, 3>(row, x, out, out_stride); break;
    case 4: rows_dot<F, 4>(row, x, out, out_stride); break;
    case 5: rows_dot<F, 5>(row, x, out, out_stride); break;
    case 6: rows_dot<F, 6>(row, x, out, out_stride); break;
    case 7: rows_dot<F, 7>(row, x, out, out_stride); break;
    default: rows_dot<F, ROWS>(row, x, out, out_stride); break;
  }
}

template <class F>
void dequantize_row(const Row& row, float* out) {
  const __m256 rs = _mm256_set1_ps(row.row_scale);
  for (int64_t u = 0; u < row.K / 32; ++u, out += 32) {
    __m256 v[4];
    unit_weights<F>(row, u, v);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(v[i], rs));
  }
}
#endif

// ---- drivers: split weight rows over threads ---------------------------------------------------------------

template <class F>
torch::Tensor matmul(const torch::Tensor& x, const Matrix& w, bool portable) {
  const int64_t M = x.size(0), N = w.N, K = w.K;
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const std::vector<float> xsum = block_sums<F>(xp, M, K);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for_rows<F>(w, n0, n1, !portable, [&](int64_t n, const Row& row) {
#if HAVE_SIMD
      if (!portable) {
        for (int64_t m = 0; m < M; m += ROWS)
          rows_dot_any<F>(row, xp + m * K, xsum.data() + (F::HAS_MIN ? m * w.G : 0),
                          int(std::min<int64_t>(ROWS, M - m)), op + m * N + n, N);
        return;
      }
#endif
      for (int64_t m = 0; m < M; ++m) op[m * N + n] = row_dot_portable<F>(row, xp + m * K);
    });
  });
  return out;
}

template <class F>
torch::Tensor dequantize(const Matrix& w, bool portable) {
  auto out = torch::empty({w.N, w.K}, torch::kFloat32);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, w.N, 16, [&](int64_t n0, int64_t n1) {
    for_rows<F>(w, n0, n1, !portable, [&](int64_t n, const Row& row) {
#if HAVE_SIMD
      if (!portable) return dequantize_row<F>(row, op + n * w.K);
#endif
      dequantize_row_portable<F>(row, op + n * w.K);
    });
  });
  return out;
}

// ---- argument checks and the exported functions ------------------------------------------------------------

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2 && x.size(1) == K,
              "x must be contiguous float32 [M, ", K, "]");
}

// A contiguous [rows, cols] tensor of `dtype`.
void check(const torch::Tensor& t, const char* name, torch::ScalarType dtype, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.dim() == 2 && t.size(0) == rows && t.size(1) == cols,
              name, " must be contiguous ", dtype, " [", rows, ", ", cols, "], got ", t.scalar_type(), " ", t.sizes());
}

// codes: [N, K/2] 4-bit codes in unit order, or [N, K] bytes; K a multiple of 32.
template <class F>
Matrix matrix(const torch::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.element_size() == 1,
              "codes must be contiguous bytes [N, *]");
  TORCH_CHECK(codes.size(1) % F::BYTES == 0, "codes must hold whole units of 32 elements per row");
  const int64_t N = codes.size(0), K = codes.size(1) / F::BYTES * 32;
  Matrix w{};
  w.codes = static_cast<const uint8_t*>(codes.data_ptr());
  w.row_bytes = codes.size(1);
  w.N = N, w.K = K, w.G = K / F::BLOCK;
  return w;
}

// scales [N, K/block] uint8, scale_values [256] float32 (scale byte -> float).
template <int B>
Matrix fp4_matrix(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& scale_values,
                  double tensor_scale, std::vector<float>& table) {
  Matrix w = matrix<FP4<B>>(codes);
  check(scales, "scales", torch::kUInt8, w.N, w.G);
  TORCH_CHECK(scale_values.dtype() == torch::kFloat32 && scale_values.numel() == 256 && scale_values.is_contiguous(),
              "scale_values must be 256 contiguous float32");
  table.resize(256);
  const float* sv = scale_values.data_ptr<float>();
  for (int i = 0; i < 256; ++i) table[i] = sv[i] * float(tensor_scale) * FP4<B>::UNIT;
  w.scale_bytes = scales.data_ptr<uint8_t>();
  w.table = table.data();
  return w;
}

torch::Tensor fp4_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor scale_values,
                         double tensor_scale, int64_t block, bool portable) {
  TORCH_CHECK(block == 16 || block == 32, "fp4 block must be 16 or 32");
  std::vector<float> table;
  if (block == 16) {
    const Matrix w = fp4_matrix<16>(codes, scales, scale_values, tensor_scale, table);
    check_x(x, w.K);
    return matmul<FP4<16>>(x, w, portable);
  }
  const Matrix w = fp4_matrix<32>(codes, scales, scale_values, tensor_scale, table);
  check_x(x, w.K);
  return matmul<FP4<32>>(x, w, portable);
}

torch::Tensor fp4_dequantize(torch::Tensor codes, torch::Tensor scales, torch::Tensor scale_values,
                             double tensor_scale, int64_t block, bool portable) {
  TORCH_CHECK(block == 16 || block == 32, "fp4 block must be 16 or 32");
  std::vector<float> table;
  return block == 16 ? dequantize<FP4<16>>(fp4_matrix<16>(codes, scales, scale_values, tensor_scale, table), portable)
                     : dequantize<FP4<32>>(fp4_matrix<32>(codes, scales, scale_values, tensor_scale, table), portable);
}

// codes [N, K] (the fp8 bytes), row_scales [N] float32.
Matrix fp8_matrix(const torch::Tensor& codes, const torch::Tensor& row_scales) {
  Matrix w = matrix<FP8<false>>(codes);
  TORCH_CHECK(row_scales.dtype() == torch::kFloat32 && row_scales.is_contiguous() && row_scales.numel() == w.N,
              "row_scales must be contiguous float32 [N]");
  w.row_scale = row_scales.data_ptr<float>();
  return w;
}

torch::Tensor fp8_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor row_scales, bool e5m2, bool portable) {
  const Matrix w = fp8_matrix(codes, row_scales);
  check_x(x, w.K);
  return e5m2 ? matmul<FP8<true>>(x, w, portable) : matmul<FP8<false>>(x, w, portable);
}

torch::Tensor fp8_dequantize(torch::Tensor codes, torch::Tensor row_scales, bool e5m2, bool portable) {
  const Matrix w = fp8_matrix(codes, row_scales);
  return e5m2 ? dequantize<FP8<true>>(w, portable) : dequantize<FP8<false>>(w, portable);
}

// codes [N, K/2] uint8 (int4) or [N, K] int8; scales (and mins, int4) [N, K/32] float16.
template <bool FOUR_BIT>
Matrix int_matrix(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor* mins) {
  Matrix w = matrix<Int<FOUR_BIT>>(codes);
  check(scales, "scales", torch::kHalf, w.N, w.G);
  w.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  if (mins) {
    check(*mins, "mins", torch::kHalf, w.N, w.G);
    w.mins = reinterpret_cast<const uint16_t*>(mins->data_ptr());
  }
  return w;
}

torch::Tensor int4_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor mins,
                          bool portable) {
  const Matrix w = int_matrix<true>(codes, scales, &mins);
  check_x(x, w.K);
  return matmul<Int<true>>(x, w, portable);
}

torch::Tensor int4_dequantize(torch::Tensor codes, torch::Tensor scales, torch::Tensor mins, bool portable) {
  return dequantize<Int<true>>(int_matrix<true>(codes, scales, &mins), portable);
}

torch::Tensor int8_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, bool portable) {
  const Matrix w = int_matrix<false>(codes, scales, nullptr);
  check_x(x, w.K);
  return matmul<Int<false>>(x, w, portable);
}

torch::Tensor int8_dequantize(torch::Tensor codes, torch::Tensor scales, bool portable) {
  return dequantize<Int<false>>(int_matrix<false>(codes, scales, nullptr), portable);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pybind11::literals;
  m.def("fp4_matmul", &fp4_matmul, "x"_a, "codes"_a, "scales"_a, "scale_values"_a, "tensor_scale"_a, "block"_a,
        "portable"_a = false);
  m.def("fp4_dequantize", &fp4_dequantize, "codes"_a, "scales"_a, "scale_values"_a, "tensor_scale"_a, "block"_a,
        "portable"_a = false);
  m.def("fp8_matmul", &fp8_matmul, "x"_a, "codes"_a, "row_scales"_a, "e5m2"_a, "portable"_a = false);
  m.def("fp8_dequantize", &fp8_dequantize, "codes"_a, "row_scales"_a, "e5m2"_a, "portable"_a = false);
  m.def("int4_matmul", &int4_matmul, "x"_a, "codes"_a, "scales"_a, "mins"_a, "portable"_a = false);
  m.def("int4_dequantize", &int4_dequantize, "codes"_a, "scales"_a, "mins"_a, "portable"_a = false);
  m.def("int8_matmul", &int8_matmul, "x"_a, "codes"_a, "scales"_a, "portable"_a = false);
  m.def("int8_dequantize", &int8_dequantize, "codes"_a, "scales"_a, "portable"_a = false);
  m.def("simd", [] { return bool(HAVE_SIMD); });
}
