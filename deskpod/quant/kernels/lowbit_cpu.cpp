// Matrix kernels over weights kept in the low-precision float formats of deskpod.quant, for CPU inference.
//
// The weights stay exactly as stored (see docs in deskpod/quant/cpu.py for the layouts):
//   fp4 (NVFP4, MXFP4): two E2M1 codes per byte, element 2j in the low nibble, and one scale byte per block
//       of 16 (NVFP4: E4M3) or 32 (MXFP4: E8M0). The scale byte becomes a float through a 256-entry table
//       the caller passes (the format's own decoding, times the per-tensor scale).
//   fp8 (E4M3FN, E5M2): one code per byte and one float32 scale per output row.
// Decoding a weight costs a few vector instructions per 8-16 weights, done in registers right before the
// multiply: memory traffic stays at the stored bits per weight, which is what bounds decoding speed.
//
// Every kernel has an AVX2/F16C/FMA version and a portable scalar one; `portable=true` selects the latter
// (always compiled, so the tests run it on any machine).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
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

// One call's view of a weight matrix [N, K] (K a whole number of blocks).
struct Matrix {
  const uint8_t* codes;
  int64_t row_bytes;
  const uint8_t* scales;  // fp4: [N, K / BLOCK] scale bytes
  const float* table;     // fp4: scale byte -> float, times the tensor scale and the format's UNIT
  const float* row_scale; // fp8: [N]
  int64_t N, K, G;        // G: blocks per row
};

// ---- formats: how one block decodes --------------------------------------------------------------------
// raw(row, k): element k of a row before scaling; w = raw * UNIT * scale. decode(q, w): the BLOCK raw values
// of the block at q as BLOCK/8 vectors.

template <int B>
struct FP4 {
  static constexpr int BLOCK = B, BYTES = B / 2, REGS = B / 8;
  static constexpr bool BLOCK_SCALED = true;
  static constexpr float UNIT = 0.5f;
  static float raw(const uint8_t* row, int64_t k) { return E2M1_X2[(row[k / 2] >> (4 * (k & 1))) & 15]; }
  static float block_scale(const Matrix& w, int64_t n, int64_t g) { return w.table[w.scales[n * w.G + g]]; }
  static float row_scale(const Matrix&, int64_t) { return 1.f; }
#if HAVE_SIMD
  // 16 codes in element order -> 16 int8 values -> two vectors of 8 floats
  static inline void widen(__m128i codes, __m256* w) {
    const __m128i v = _mm_shuffle_epi8(_mm_load_si128(reinterpret_cast<const __m128i*>(E2M1_X2)), codes);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
  }
  static inline void decode(const uint8_t* q, __m256* w) {
    const __m128i low = _mm_set1_epi8(0x0F);
    if constexpr (B == 16) {
      const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
      const __m128i lo = _mm_and_si128(packed, low), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
      widen(_mm_unpacklo_epi8(lo, hi), w);  // low nibble = even element, high = odd: interleave
    } else {
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
      const __m128i lo = _mm_and_si128(packed, low), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
      widen(_mm_unpacklo_epi8(lo, hi), w);
      widen(_mm_unpackhi_epi8(lo, hi), w + 2);
    }
  }
#endif
};

// FP8 blocks are only the unit of work (32 codes = 4 vectors); the scale is per row.
template <bool E5M2>
struct FP8 {
  static constexpr int BLOCK = 32, BYTES = 32, REGS = 4;
  static constexpr bool BLOCK_SCALED = false;
  // In registers a code becomes an fp16 and then a float (F16C). E5M2 is exactly the top byte of an fp16.
  // E4M3 with its exponent and mantissa moved one bit right is an fp16 of the same bits with bias 15 instead
  // of 7, i.e. the value / 2^8, subnormals included: UNIT puts the 2^8 back.
  static constexpr float UNIT = E5M2 ? 1.f : 256.f;
  static float raw(const uint8_t* row, int64_t k) {
    return E5M2 ? minifloat(row[k], 5, 2, 15, true) : minifloat(row[k], 4, 3, 7, false) / 256.f;
  }
  static float block_scale(const Matrix&, int64_t, int64_t) { return 1.f; }
  static float row_scale(const Matrix& w, int64_t n) { return w.row_scale[n] * UNIT; }
#if HAVE_SIMD
  static inline __m128i to_half(__m128i bytes8) {  // 8 codes in the low half -> 8 fp16
    const __m128i h = _mm_unpacklo_epi8(_mm_setzero_si128(), bytes8);  // code << 8
    if constexpr (E5M2) return h;
    // S EEEE MMM 00000000 -> S 0 EEEE MMM 0000000: arithmetic shift copies S into bit 14, then clear it
    return _mm_and_si128(_mm_srai_epi16(h, 1), _mm_set1_epi16(int16_t(0xBFFF)));
  }
  static inline void decode(const uint8_t* q, __m256* w) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16));
    w[0] = _mm256_cvtph_ps(to_half(a));
    w[1] = _mm256_cvtph_ps(to_half(_mm_srli_si128(a, 8)));
    w[2] = _mm256_cvtph_ps(to_half(b));
    w[3] = _mm256_cvtph_ps(to_half(_mm_srli_si128(b, 8)));
  }
#endif
};

// ---- portable kernels ------------------------------------------------------------------------------------

template <class F>
float row_dot_portable(const Matrix& w, int64_t n, const float* x) {
  const uint8_t* q = w.codes + n * w.row_bytes;
  float total = 0.f;
  for (int64_t g = 0; g < w.G; ++g) {
    float block = 0.f;
    for (int64_t k = g * F::BLOCK; k < (g + 1) * F::BLOCK; ++k) block += F::raw(q, k) * x[k];
    total += block * F::block_scale(w, n, g);
  }
  return total * F::row_scale(w, n);
}

template <class F>
void dequantize_row_portable(const Matrix& w, int64_t n, float* out) {
  const uint8_t* q = w.codes + n * w.row_bytes;
  for (int64_t g = 0; g < w.G; ++g) {
    const float s = F::block_scale(w, n, g) * F::row_scale(w, n);
    for (int64_t k = g * F::BLOCK; k < (g + 1) * F::BLOCK; ++k) out[k] = F::raw(q, k) * s;
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

// The products of one block with one row of x, added into two accumulators (two dependency chains).
template <class F>
inline void block_fma(const Matrix& w, int64_t n, int64_t g, const uint8_t* q, const float* x, __m256& a, __m256& b) {
  __m256 v[F::REGS];
  F::decode(q, v);
  if constexpr (F::BLOCK_SCALED) {  // sum the block, then scale it once
    __m256 d = _mm256_mul_ps(v[0], _mm256_loadu_ps(x));
    for (int i = 1; i < F::REGS; ++i) d = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(x + 8 * i), d);
    a = _mm256_fmadd_ps(_mm256_set1_ps(F::block_scale(w, n, g)), d, a);
  } else {
    for (int i = 0; i < F::REGS; i += 2) {
      a = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(x + 8 * i), a);
      b = _mm256_fmadd_ps(v[i + 1], _mm256_loadu_ps(x + 8 * i + 8), b);
    }
  }
}

// One row of x against weight row n. Blocks go in pairs so that consecutive blocks feed different
// accumulators, all of them named registers (an accumulator array indexed at run time lives in memory).
template <class F>
float row_dot(const Matrix& w, int64_t n, const float* x) {
  const uint8_t* q = w.codes + n * w.row_bytes;
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 1 < w.G; g += 2, q += 2 * F::BYTES, x += 2 * F::BLOCK) {
    block_fma<F>(w, n, g, q, x, a0, a1);
    block_fma<F>(w, n, g + 1, q + F::BYTES, x + F::BLOCK, b0, b1);
  }
  if (g < w.G) block_fma<F>(w, n, g, q, x, a0, a1);
  return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(b0, b1))) * F::row_scale(w, n);
}

// R rows of x (stride K) against weight row n: each block is decoded and scaled once for all of them.
// R is a compile-time constant so the loops unroll and the R x A accumulators stay in registers; with few
// rows each gets two accumulators, so that the chain of dependent FMAs does not set the pace.
template <class F, int R>
void rows_dot(const Matrix& w, int64_t n, const float* x, float* out, int64_t out_stride) {
  constexpr int A = R <= 3 ? 2 : 1;
  const uint8_t* q = w.codes + n * w.row_bytes;
  __m256 acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.G; ++g, q += F::BYTES, x += F::BLOCK) {
    __m256 v[F::REGS];
    F::decode(q, v);
    if constexpr (F::BLOCK_SCALED) {
      const __m256 s = _mm256_set1_ps(F::block_scale(w, n, g));
      for (int i = 0; i < F::REGS; ++i) v[i] = _mm256_mul_ps(v[i], s);
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < F::REGS; ++i)
        acc[r][i % A] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(x + r * w.K + 8 * i), acc[r][i % A]);
  }
  const float rs = F::row_scale(w, n);
  for (int r = 0; r < R; ++r) {
    __m256 total = acc[r][0];
    for (int a = 1; a < A; ++a) total = _mm256_add_ps(total, acc[r][a]);
    out[r * out_stride] = hsum(total) * rs;
  }
}

// 1 to ROWS rows of x against weight row n.
template <class F>
void rows_dot_any(const Matrix& w, int64_t n, const float* x, int rows, float* out, int64_t out_stride) {
  switch (rows) {
    case 1: *out = row_dot<F>(w, n, x); break;
    case 2: rows_dot<F, 2>(w, n, x, out, out_stride); break;
    case 3: rows_dot<F, 3>(w, n, x, out, out_stride); break;
    case 4: rows_dot<F, 4>(w, n, x, out, out_stride); break;
    case 5: rows_dot<F, 5>(w, n, x, out, out_stride); break;
    case 6: rows_dot<F, 6>(w, n, x, out, out_stride); break;
    case 7: rows_dot<F, 7>(w, n, x, out, out_stride); break;
    default: rows_dot<F, ROWS>(w, n, x, out, out_stride); break;
  }
}

template <class F>
void dequantize_row(const Matrix& w, int64_t n, float* out) {
  const uint8_t* q = w.codes + n * w.row_bytes;
  const __m256 rs = _mm256_set1_ps(F::row_scale(w, n));
  for (int64_t g = 0; g < w.G; ++g, q += F::BYTES, out += F::BLOCK) {
    __m256 v[F::REGS];
    F::decode(q, v);
    const __m256 s = _mm256_mul_ps(rs, _mm256_set1_ps(F::block_scale(w, n, g)));
    for (int i = 0; i < F::REGS; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(v[i], s));
  }
}
#endif

// ---- drivers: split weight rows over threads ---------------------------------------------------------------

template <class F>
torch::Tensor matmul(const torch::Tensor& x, const Matrix& w, bool portable) {
  const int64_t M = x.size(0), N = w.N, K = w.K;
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
#if HAVE_SIMD
      if (!portable) {
        for (int64_t m = 0; m < M; m += ROWS)
          rows_dot_any<F>(w, n, xp + m * K, int(std::min<int64_t>(ROWS, M - m)), op + m * N + n, N);
        continue;
      }
#endif
      for (int64_t m = 0; m < M; ++m) op[m * N + n] = row_dot_portable<F>(w, n, xp + m * K);
    }
  });
  return out;
}

template <class F>
torch::Tensor dequantize(const Matrix& w, bool portable) {
  auto out = torch::empty({w.N, w.K}, torch::kFloat32);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, w.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
#if HAVE_SIMD
      if (!portable) {
        dequantize_row<F>(w, n, op + n * w.K);
        continue;
      }
#endif
      dequantize_row_portable<F>(w, n, op + n * w.K);
    }
  });
  return out;
}

// ---- argument checks and the exported functions ------------------------------------------------------------

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2 && x.size(1) == K,
              "x must be contiguous float32 [M, ", K, "]");
}

void check_u8(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dtype() == torch::kUInt8 && t.is_contiguous() && t.dim() == 2, name, " must be contiguous uint8 [N, *]");
}

// codes [N, K/2] uint8, scales [N, K/block] uint8, scale_values [256] float32 (scale byte -> float).
template <int B>
Matrix fp4_matrix(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& scale_values,
                  double tensor_scale, std::vector<float>& table) {
  check_u8(codes, "codes");
  check_u8(scales, "scales");
  const int64_t N = codes.size(0), K = codes.size(1) * 2, G = K / B;
  TORCH_CHECK(K % B == 0 && scales.size(0) == N && scales.size(1) == G, "codes [N, K/2] and scales [N, K/", B,
              "] must agree, with K a multiple of ", B);
  TORCH_CHECK(scale_values.dtype() == torch::kFloat32 && scale_values.numel() == 256 && scale_values.is_contiguous(),
              "scale_values must be 256 contiguous float32");
  table.resize(256);
  const float* sv = scale_values.data_ptr<float>();
  for (int i = 0; i < 256; ++i) table[i] = sv[i] * float(tensor_scale) * FP4<B>::UNIT;
  return {codes.data_ptr<uint8_t>(), K / 2, scales.data_ptr<uint8_t>(), table.data(), nullptr, N, K, G};
}

template <int B>
torch::Tensor fp4_matmul_b(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor scale_values,
                           double tensor_scale, bool portable) {
  std::vector<float> table;
  const Matrix w = fp4_matrix<B>(codes, scales, scale_values, tensor_scale, table);
  check_x(x, w.K);
  return matmul<FP4<B>>(x, w, portable);
}

template <int B>
torch::Tensor fp4_dequantize_b(torch::Tensor codes, torch::Tensor scales, torch::Tensor scale_values,
                               double tensor_scale, bool portable) {
  std::vector<float> table;
  return dequantize<FP4<B>>(fp4_matrix<B>(codes, scales, scale_values, tensor_scale, table), portable);
}

torch::Tensor fp4_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor scale_values,
                         double tensor_scale, int64_t block, bool portable) {
  TORCH_CHECK(block == 16 || block == 32, "fp4 block must be 16 or 32");
  return block == 16 ? fp4_matmul_b<16>(x, codes, scales, scale_values, tensor_scale, portable)
                     : fp4_matmul_b<32>(x, codes, scales, scale_values, tensor_scale, portable);
}

torch::Tensor fp4_dequantize(torch::Tensor codes, torch::Tensor scales, torch::Tensor scale_values,
                             double tensor_scale, int64_t block, bool portable) {
  TORCH_CHECK(block == 16 || block == 32, "fp4 block must be 16 or 32");
  return block == 16 ? fp4_dequantize_b<16>(codes, scales, scale_values, tensor_scale, portable)
                     : fp4_dequantize_b<32>(codes, scales, scale_values, tensor_scale, portable);
}

// codes [N, K] uint8 (the fp8 bytes), row_scales [N] float32.
Matrix fp8_matrix(const torch::Tensor& codes, const torch::Tensor& row_scales) {
  check_u8(codes, "codes");
  const int64_t N = codes.size(0), K = codes.size(1);
  TORCH_CHECK(K % 32 == 0, "fp8 codes must be [N, K] with K a multiple of 32");
  TORCH_CHECK(row_scales.dtype() == torch::kFloat32 && row_scales.is_contiguous() && row_scales.numel() == N,
              "row_scales must be contiguous float32 [N]");
  return {codes.data_ptr<uint8_t>(), K, nullptr, nullptr, row_scales.data_ptr<float>(), N, K, K / 32};
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
  m.def("fp4_matmul", &fp4_matmul, "x"_a, "codes"_a, "scales"_a, "scale_values"_a, "tensor_scale"_a, "block"_a,
        "portable"_a = false);
  m.def("fp4_dequantize", &fp4_dequantize, "codes"_a, "scales"_a, "scale_values"_a, "tensor_scale"_a, "block"_a,
        "portable"_a = false);
  m.def("fp8_matmul", &fp8_matmul, "x"_a, "codes"_a, "row_scales"_a, "e5m2"_a, "portable"_a = false);
  m.def("fp8_dequantize", &fp8_dequantize, "codes"_a, "row_scales"_a, "e5m2"_a, "portable"_a = false);
  m.def("simd", [] { return bool(HAVE_SIMD); });
}
