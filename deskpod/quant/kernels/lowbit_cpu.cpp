// Matrix kernels over FP8 weights (deskpod.quant's fp8 and fp8_e5m2 schemes), for CPU inference.
//
// The weights keep their stored bits (deskpod/quant/cpu.py pads rows to whole units of 32 elements, nothing
// else): one E4M3FN or E5M2 code per byte and one float32 scale per output row. Codes turn into floats a few
// vector instructions per 8 weights, in registers right before the multiply: memory traffic stays at 8 bits
// per weight. Up to 8 rows of x share each decoded unit. The 4-bit schemes and int8 are blocks of the GGUF
// kernels (ggml_blocks.cpp), which multiply int8-rounded activations in integer arithmetic; FP8's values are
// not small integers, so its products stay float.
//
// Every kernel has an AVX2/F16C/FMA version and a portable scalar one; `portable=true` selects the latter
// (always compiled, so the tests run it on any machine).
//
// Where the CPU has AVX512-BF16 and VBMI (Sapphire Rapids, Zen 4 and later) the matvec kernels take another
// road: 64 codes become bfloat16 weights (exact: an fp8 value has at most 3 significant bits) through two
// 128-entry byte tables, and vdpbf16ps multiplies them with activations rounded once to bfloat16 (8
// significant bits), two products per float32 lane: about 6 instructions per 32 weights and row of x where the
// float road spends about 25 (1.2-1.5x its speed measured from cache: the lookups and vdpbf16ps are not cheap
// instructions). Such a build rounds the activations to bfloat16 in every path (`activations_bf16()`), so that
// its paths agree with each other.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HAVE_SIMD 1
#else
#define HAVE_SIMD 0
#endif
#if HAVE_SIMD && defined(__AVX512BF16__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
#define HAVE_BF16 1
#else
#define HAVE_BF16 0
#endif

namespace {

// Rows of x that share one decoded block of weights in the multi-row (small batch) kernels.
constexpr int ROWS = 8;

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

// One call's view of a weight matrix [N, K], K a whole number of units of 32 elements (4 vectors of 8).
struct Matrix {
  const uint8_t* codes;
  int64_t row_bytes;
  int64_t N, K;
  const float* row_scale;  // [N]
};

// One weight row as the kernels read it: its codes and its scale.
struct Row {
  const uint8_t* q;
  float row_scale;
  int64_t K;
};

// ---- the format: how one unit of 32 weights decodes ---------------------------------------------------
// raw(q, k): element k of a row before scaling, w = raw * row_scale.
// decode(q, v): the unit at q as 4 vectors of 8 raw values, elements 0-7, 8-15, 16-23, 24-31.

// FP8: one byte per weight in element order, one scale per row.
template <bool E5M2>
struct FP8 {
  static constexpr bool E5M2_CODES = E5M2;
  static constexpr int BYTES = 32;
  // In registers a code becomes an fp16 and then a float (F16C). E5M2 is exactly the top byte of an fp16.
  // E4M3 with its exponent and mantissa moved one bit right is an fp16 of the same bits with bias 15 instead
  // of 7, i.e. the value / 2^8, subnormals included: UNIT puts the 2^8 back.
  static constexpr float UNIT = E5M2 ? 1.f : 256.f;
  static float raw(const uint8_t* q, int64_t k) {
    return E5M2 ? minifloat(q[k], 5, 2, 15, true) : minifloat(q[k], 4, 3, 7, false) / UNIT;
  }
  static float row_scale(const Matrix& w, int64_t n) { return w.row_scale[n] * UNIT; }
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

// A thread's run of weight rows n0..n1, each handed to the kernels with its codes and scale.
template <class F, class Body>
void for_rows(const Matrix& w, int64_t n0, int64_t n1, Body body) {
  for (int64_t n = n0; n < n1; ++n) body(n, Row{w.codes + n * w.row_bytes, F::row_scale(w, n), w.K});
}

// ---- portable kernels ------------------------------------------------------------------------------------

template <class F>
float row_dot_portable(const Row& row, const float* x) {
  float total = 0.f;
  for (int64_t u = 0; u < row.K / 32; ++u) {  // a sum per unit of 32, then the whole row's
    float dot = 0.f;
    for (int64_t k = 32 * u; k < 32 * (u + 1); ++k) dot += F::raw(row.q, k) * x[k];
    total += dot;
  }
  return total * row.row_scale;
}

template <class F>
void dequantize_row_portable(const Row& row, float* out) {
  for (int64_t k = 0; k < row.K; ++k) out[k] = F::raw(row.q, k) * row.row_scale;
}

// ---- AVX2 kernels ----------------------------------------------------------------------------------------
#if HAVE_SIMD
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The rows of a matrix lie end to end: the codes 4 KB ahead are fetched into L2 while these are multiplied
// (a decode step's weights come from L3 or memory; the hardware prefetcher alone keeps fewer in flight).
constexpr int PREFETCH_AHEAD = 4096;

// Unit u's weights as floats (unscaled), the codes ahead of them prefetched.
template <class F>
inline void unit_weights(const Row& row, int64_t u, __m256* v) {
  _mm_prefetch(reinterpret_cast<const char*>(row.q + u * F::BYTES) + PREFETCH_AHEAD, _MM_HINT_T1);
  F::decode(row.q + u * F::BYTES, v);
}

// Unit u times one row of x (at x), added into the accumulators (the row's scale comes once, at the end).
template <class F>
inline void unit_fma(const Row& row, int64_t u, const float* x, __m256& a, __m256& b) {
  __m256 v[4];
  unit_weights<F>(row, u, v);
  __m256 p[4];
  for (int i = 0; i < 4; ++i) p[i] = _mm256_loadu_ps(x + 8 * i);
  a = _mm256_fmadd_ps(v[2], p[2], _mm256_fmadd_ps(v[0], p[0], a));
  b = _mm256_fmadd_ps(v[3], p[3], _mm256_fmadd_ps(v[1], p[1], b));
}

// One row of x against a weight row. Units go in pairs so that consecutive units feed different
// accumulators, all of them named registers (an accumulator array indexed at run time lives in memory).
template <class F>
float row_dot(const Row& row, const float* x) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  const int64_t U = row.K / 32;
  int64_t u = 0;
  for (; u + 1 < U; u += 2, x += 64) {
    unit_fma<F>(row, u, x, a0, a1);
    unit_fma<F>(row, u + 1, x + 32, b0, b1);
  }
  if (u < U) unit_fma<F>(row, u, x, a0, a1);
  const float dot = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(b0, b1)));
  return dot * row.row_scale;
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

// 1 to ROWS rows of x against a weight row (one row: the dot product kernel).
template <class F>
void rows_dot_any(const Row& row, const float* x, int rows, float* out, int64_t out_stride) {
  switch (rows) {
    case 1: *out = row_dot<F>(row, x); break;
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

// ---- AVX512-BF16 kernels -----------------------------------------------------------------------------------
#if HAVE_BF16
// A code's magnitude (its low 7 bits) -> the low and the high byte of its value as a bfloat16; the sign bit
// is copied into the high byte. Four registers: VBMI's two-register byte permute reads 128 entries.
struct BF16Tables {
  __m512i lo[2], hi[2];
};

template <bool E5M2>
const BF16Tables& bf16_tables() {
  static const BF16Tables tables = [] {
    alignas(64) uint8_t lo[128], hi[128];
    for (int i = 0; i < 128; ++i) {
      const float v = E5M2 ? minifloat(uint8_t(i), 5, 2, 15, true) : minifloat(uint8_t(i), 4, 3, 7, false);
      uint32_t bits;
      std::memcpy(&bits, &v, sizeof bits);
      lo[i] = uint8_t(bits >> 16), hi[i] = uint8_t(bits >> 24);  // exact: the low 16 bits are zero
    }
    BF16Tables t;
    for (int h = 0; h < 2; ++h) t.lo[h] = _mm512_load_si512(lo + 64 * h), t.hi[h] = _mm512_load_si512(hi + 64 * h);
    return t;
  }();
  return tables;
}

// 64 codes -> 64 bfloat16 weights in two vectors: the even elements and the odd ones (activations are laid out
// to match: bf16_activations). Each byte is looked up in place; the 16-bit lanes then take their low and high
// bytes apart with shifts and bitwise selects, which leave the shuffle port to the two lookups.
inline void fp8_to_bf16(__m512i codes, const BF16Tables& t, __m512i& even, __m512i& odd) {
  const __m512i lo = _mm512_permutex2var_epi8(t.lo[0], codes, t.lo[1]);
  const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t.hi[0], codes, t.hi[1]), codes,
                                               _mm512_set1_epi8(char(0x80)), 0xF8);  // a | b & c: the sign
  const __m512i low_bytes = _mm512_set1_epi16(0x00FF);
  even = _mm512_ternarylogic_epi32(lo, _mm512_slli_epi16(hi, 8), low_bytes, 0xE4);  // c ? a : b, bitwise
  odd = _mm512_ternarylogic_epi32(_mm512_srli_epi16(lo, 8), hi, low_bytes, 0xE4);
}

// x [M, K] float32 -> bfloat16 (round to nearest even, as torch's cast) [M, K64] in fp8_to_bf16's order per
// 64 elements (the 32 even ones, then the 32 odd ones), zeros past K.
std::vector<uint16_t> bf16_activations(const float* x, int64_t M, int64_t K, int64_t K64) {
  std::vector<uint16_t> out(M * K64);
  alignas(64) static const int16_t order[64] = {
      0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42,
      44, 46, 48, 50, 52, 54, 56, 58, 60, 62, 1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23,
      25, 27, 29, 31, 33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
  const __m512i first = _mm512_load_si512(order), second = _mm512_load_si512(order + 32);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    for (int64_t k = 0; k < K64; k += 64) {
      __m512 part[4];
      for (int i = 0; i < 4; ++i) {
        const int64_t at = k + 16 * i, left = std::clamp<int64_t>(K - at, 0, 16);
        part[i] = _mm512_maskz_loadu_ps(__mmask16((1u << left) - 1), row + std::min(at, K));
      }
      const __m512i a = (__m512i)_mm512_cvtne2ps_pbh(part[1], part[0]);  // elements 0-31
      const __m512i b = (__m512i)_mm512_cvtne2ps_pbh(part[3], part[2]);  // elements 32-63
      _mm512_storeu_si512(out.data() + m * K64 + k, _mm512_permutex2var_epi16(a, first, b));
      _mm512_storeu_si512(out.data() + m * K64 + k + 32, _mm512_permutex2var_epi16(a, second, b));
    }
  }
  return out;
}

inline __m512 dot_bf16(__m512 acc, __m512i w, const uint16_t* x) {
  return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)_mm512_loadu_si512(x));
}

// R rows of x (bfloat16, stride K64) against a weight row, 64 codes at a time (the last 32 may stand alone:
// the load stops at the row's end and the missing codes decode to zero).
template <bool E5M2, int R>
void rows_dot_bf16(const Row& row, const uint16_t* x, int64_t K64, float* out, int64_t out_stride) {
  const BF16Tables& t = bf16_tables<E5M2>();
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K64; k += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(row.q + k) + PREFETCH_AHEAD, _MM_HINT_T1);
    const __m512i codes = k + 64 <= row.K ? _mm512_loadu_si512(row.q + k)
                                          : _mm512_maskz_loadu_epi8(__mmask64(0xFFFFFFFFu), row.q + k);
    __m512i w0, w1;
    fp8_to_bf16(codes, t, w0, w1);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = dot_bf16(acc[r][0], w0, x + r * K64 + k);
      acc[r][1] = dot_bf16(acc[r][1], w1, x + r * K64 + k + 32);
    }
  }
  for (int r = 0; r < R; ++r) out[r * out_stride] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) * row.row_scale;
}

template <bool E5M2>
void rows_dot_bf16_any(const Row& row, const uint16_t* x, int64_t K64, int rows, float* out, int64_t out_stride) {
  switch (rows) {
    case 1: rows_dot_bf16<E5M2, 1>(row, x, K64, out, out_stride); break;
    case 2: rows_dot_bf16<E5M2, 2>(row, x, K64, out, out_stride); break;
    case 3: rows_dot_bf16<E5M2, 3>(row, x, K64, out, out_stride); break;
    case 4: rows_dot_bf16<E5M2, 4>(row, x, K64, out, out_stride); break;
    case 5: rows_dot_bf16<E5M2, 5>(row, x, K64, out, out_stride); break;
    case 6: rows_dot_bf16<E5M2, 6>(row, x, K64, out, out_stride); break;
    case 7: rows_dot_bf16<E5M2, 7>(row, x, K64, out, out_stride); break;
    default: rows_dot_bf16<E5M2, ROWS>(row, x, K64, out, out_stride); break;
  }
}
#endif

// ---- drivers: split weight rows over threads ---------------------------------------------------------------

#if HAVE_BF16
template <bool E5M2>
torch::Tensor matmul_bf16(const torch::Tensor& x, const Matrix& w) {
  const int64_t M = x.size(0), N = w.N, K = w.K, K64 = (K + 63) / 64 * 64;
  auto out = torch::empty({M, N}, x.options());
  const std::vector<uint16_t> xb = bf16_activations(x.data_ptr<float>(), M, K, K64);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for_rows<FP8<E5M2>>(w, n0, n1, [&](int64_t n, const Row& row) {
      const Row exact{row.q, w.row_scale[n], row.K};  // the tables hold the values themselves: no UNIT
      for (int64_t m = 0; m < M; m += ROWS)
        rows_dot_bf16_any<E5M2>(exact, xb.data() + m * K64, K64, int(std::min<int64_t>(ROWS, M - m)), op + m * N + n, N);
    });
  });
  return out;
}
#endif

template <class F>
torch::Tensor matmul(const torch::Tensor& x_in, const Matrix& w, bool portable) {
#if HAVE_BF16
  if (!portable) return matmul_bf16<F::E5M2_CODES>(x_in, w);
  // the same activations as the bfloat16 kernels multiply
  const torch::Tensor x = x_in.to(torch::kBFloat16).to(torch::kFloat32);
#else
  const torch::Tensor& x = x_in;
#endif
  const int64_t M = x.size(0), N = w.N, K = w.K;
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for_rows<F>(w, n0, n1, [&](int64_t n, const Row& row) {
#if HAVE_SIMD
      if (!portable) {
        for (int64_t m = 0; m < M; m += ROWS)
          rows_dot_any<F>(row, xp + m * K, int(std::min<int64_t>(ROWS, M - m)), op + m * N + n, N);
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
    for_rows<F>(w, n0, n1, [&](int64_t n, const Row& row) {
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

// codes: [N, K] fp8 bytes; K a multiple of 32.
template <class F>
Matrix matrix(const torch::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.element_size() == 1,
              "codes must be contiguous bytes [N, *]");
  TORCH_CHECK(codes.size(1) % F::BYTES == 0, "codes must hold whole units of 32 elements per row");
  const int64_t N = codes.size(0), K = codes.size(1) / F::BYTES * 32;
  Matrix w{};
  w.codes = static_cast<const uint8_t*>(codes.data_ptr());
  w.row_bytes = codes.size(1);
  w.N = N, w.K = K;
  return w;
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pybind11::literals;
  m.def("fp8_matmul", &fp8_matmul, "x"_a, "codes"_a, "row_scales"_a, "e5m2"_a, "portable"_a = false);
  m.def("fp8_dequantize", &fp8_dequantize, "codes"_a, "row_scales"_a, "e5m2"_a, "portable"_a = false);
  m.def("simd", [] { return bool(HAVE_SIMD); });
  // whether the kernels multiply activations rounded to bfloat16 (the AVX512-BF16 build), else float32 ones
  m.def("activations_bf16", [] { return bool(HAVE_BF16); });
}
