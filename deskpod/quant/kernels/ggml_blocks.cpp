// Matrix kernels over GGUF's block-quantized weights exactly as the file stores them, for CPU decoding.
//
// A decode step reads every weight once, so its speed is set by the bytes per weight and by how cheaply a
// weight meets an activation. The weights keep their stored bytes (Q4_0 4.5 bits, Q5_0 5.5, Q6_K 6.56, ...:
// llama.cpp's own layout, so nothing is repacked or widened), and the activations are quantized to int8 per
// block of 32 (llama.cpp's Q8_0), so a block of 32 weights meets them in one integer multiply-add
// instruction (AVX-VNNI / AVX512-VNNI's dpbusd, or AVX2's maddubs + madd) instead of 32 float multiplies.
//
// Every block type decodes one slice of 32 weights at a time into unsigned codes c (signed for Q8_0) and a
// scale and offset for each half of 16: w = scale * c + offset. Then, with x = dx * xq:
//     sum(w * x) = dx * (scale * sum(c * xq) + offset * sum(xq))
// where sum(c * xq) is the integer dot product and sum(xq) per half is computed once per row of x.
//
// Layouts (ggml-common.h), a row being whole blocks:
//   Q4_0  18 B / 32: f16 d, 16 B nibbles (element j low, j + 16 high)            w = d (c - 8)
//   Q4_1  20 B / 32: f16 d, f16 m, 16 B nibbles                                 w = d c + m
//   Q5_0  22 B / 32: f16 d, 32 high bits, 16 B nibbles                         w = d (c - 16)
//   Q5_1  24 B / 32: f16 d, f16 m, 32 high bits, 16 B nibbles                  w = d c + m
//   Q8_0  34 B / 32: f16 d, 32 int8                                            w = d c
//   Q4_K 144 B / 256: f16 d, f16 dmin, 12 B of 6-bit scales and mins, 128 B nibbles (32 B per two slices)
//   Q5_K 176 B / 256: as Q4_K, plus 32 B of high bits (bit s of byte l: element l of slice s)
//   Q6_K 210 B / 256: 128 B low nibbles, 64 B 2-bit highs, 16 int8 scales (one per 16), f16 d   w = d sc (c - 32)
//   MXFP4 17 B / 32: E8M0 e, 16 B E2M1 nibbles (as Q4_0's)                      w = 2^(e-127) e2m1(c)
//   NVFP4 18 B / 32: E4M3 s0, s1 (elements 0-15, 16-31), 16 B E2M1 nibbles        w = s_h e2m1(c) (times a
//        per-tensor scale the caller applies): deskpod's own block (ggml has none), the id below is its own
// The E2M1 codes become their doubled values (0, ±1, ±2, ±3, ±4, ±6, ±8, ±12: int8, like Q8_0's codes), the
// half going into the scale.
//
// Interleaved (type id + X8): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4 and NVFP4 rows regrouped eight at a time at load (the same
// bits in another order), so that a block column of eight rows meets x in one pass whose output rows are the
// vector lanes (llama.cpp repacks Q4_0 likewise for its x86 GEMV). In a group of rows 8g..8g+7, block column i
// holds the eight blocks' scale fields side by side (one vector load each), Q5's fifth bits regrouped, then the
// code bytes four at a time: bytes 4j..4j+3 of rows 0..7, for j = 0, 1, ... (x8_put). Four code bytes of one row
// then fill one 32-bit lane, which dpbusd sums against four activations broadcast to every lane: a Q4_0 column
// of 8 x 32 weights costs 8 dpbusd and about 30 other instructions, where the row layout spends about 20 on each
// 32 weights. Measured 2-3x faster on one row of x where the weights sit in cache, 1.3x where they come from memory.
//
// Builds for the machine's own instruction sets (-march=native at first use); a portable version of every
// kernel is always compiled too (`portable=true`), so the tests check it on any machine.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HAVE_AVX2 1
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
#define HAVE_VNNI 1  // dpbusd on 256-bit registers
#else
#define HAVE_VNNI 0
#endif
#else
#define HAVE_AVX2 0
#endif
#if defined(__BMI2__)
#include <immintrin.h>
#endif

namespace {

// ggml's type ids
enum Type : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, MXFP4 = 39,
                      NVFP4 = 1000 };
constexpr int64_t SLICE = 32;  // weights per slice, and activations per int8 block
constexpr int64_t X8 = 2000;   // type + X8: that type's blocks interleaved eight rows at a time
constexpr int64_t LANES = 8;   // rows per interleaved group
constexpr bool is_x8(int64_t type) { return type >= X8; }
constexpr int64_t base_type(int64_t type) { return is_x8(type) ? type - X8 : type; }

struct Layout {
  int64_t block_bytes, slices;  // a block holds `slices` slices of 32
};

template <int64_t t>
constexpr Layout layout() {
  constexpr int64_t type = base_type(t);  // an interleaved row has its type's bytes
  return type == Q4_0 ? Layout{18, 1} : type == Q4_1 ? Layout{20, 1} : type == Q5_0 ? Layout{22, 1}
       : type == Q5_1 ? Layout{24, 1} : type == Q8_0 ? Layout{34, 1} : type == Q4_K ? Layout{144, 8}
       : type == Q5_K ? Layout{176, 8} : type == Q6_K ? Layout{210, 8} : type == MXFP4 ? Layout{17, 1}
       : Layout{18, 1};
}

// Whether a type's codes are signed values (int8 in the kernels), not unsigned codes with an offset
constexpr bool signed_codes(int64_t type) { return type == Q8_0 || type == MXFP4 || type == NVFP4; }

// E2M1 code -> twice its value: bits sign(3) exponent(2..1) mantissa(0), magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6
alignas(16) constexpr int8_t E2M1_X2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// E8M0 byte e -> 2^(e - 128) (its value halved, for the doubled codes); 255 is NaN
inline float e8m0_half(uint8_t e) {
  if (e == 255) return NAN;
  const uint32_t bits = e ? uint32_t(e - 1) << 23 : 0x00200000u;  // e = 0: 2^-128, a subnormal
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

// E4M3 byte -> its value halved (for the doubled codes): a table made when the module loads
const std::vector<float> E4M3_HALF = [] {
  std::vector<float> t(256);
  for (int i = 0; i < 256; ++i) t[i] = 0.5f * float(c10::Float8_e4m3fn(uint8_t(i), c10::Float8_e4m3fn::from_bits()));
  return t;
}();
inline float e4m3_half(uint8_t b) { return E4M3_HALF[b]; }

// Kernel<type>::run for a type id known only at run time: one switch per call, none per slice. The one list of
// the types at run time: their layouts and factors are looked up through it too.
template <template <int64_t> class Kernel>
auto for_type(int64_t type) -> decltype(&Kernel<Q4_0>::run) {
  switch (type) {
    case Q4_0: return &Kernel<Q4_0>::run;
    case Q4_1: return &Kernel<Q4_1>::run;
    case Q5_0: return &Kernel<Q5_0>::run;
    case Q5_1: return &Kernel<Q5_1>::run;
    case Q8_0: return &Kernel<Q8_0>::run;
    case Q4_K: return &Kernel<Q4_K>::run;
    case Q5_K: return &Kernel<Q5_K>::run;
    case Q6_K: return &Kernel<Q6_K>::run;
    case MXFP4: return &Kernel<MXFP4>::run;
    case NVFP4: return &Kernel<NVFP4>::run;
  }
  TORCH_CHECK(false, "ggml type ", type, " has no kernel here");
}

// The interleaved types: their matmul kernels only (their rows are expanded through their base type's code).
constexpr bool interleavable(int64_t type) {
  return type == Q4_0 || type == Q4_1 || type == Q5_0 || type == Q5_1 || type == Q8_0 || type == MXFP4 || type == NVFP4;
}

template <template <int64_t> class Kernel>
auto for_any_type(int64_t type) -> decltype(&Kernel<Q4_0>::run) {
  switch (type) {
    case X8 + Q4_0: return &Kernel<X8 + Q4_0>::run;
    case X8 + Q4_1: return &Kernel<X8 + Q4_1>::run;
    case X8 + Q5_0: return &Kernel<X8 + Q5_0>::run;
    case X8 + Q5_1: return &Kernel<X8 + Q5_1>::run;
    case X8 + Q8_0: return &Kernel<X8 + Q8_0>::run;
    case X8 + MXFP4: return &Kernel<X8 + MXFP4>::run;
    case X8 + NVFP4: return &Kernel<X8 + NVFP4>::run;
  }
  return for_type<Kernel>(type);
}

template <int64_t type>
struct LayoutOf {
  static Layout run() { return layout<type>(); }
};

Layout layout_of(int64_t type) { return for_type<LayoutOf>(base_type(type))(); }

// An interleaved column of eight blocks, in order: each scale field of the eight side by side (float16 d, and m
// for Q4_1 and Q5_1; MXFP4's E8M0 byte; NVFP4's two E4M3 bytes); Q5's fifth bits, regrouped (high_bit_element);
// the codes, four bytes of each lane at a time.
struct X8Parts {
  int field_bytes, fields, high_bits, codes;  // per block: scale fields and their size, bytes of fifth bits and of codes
  constexpr int head() const { return LANES * field_bytes * fields; }  // where the fifth bits start
  constexpr int codes_at() const { return head() + LANES * high_bits; }
};
constexpr X8Parts x8_parts(int64_t type) {
  return {type == MXFP4 || type == NVFP4 ? 1 : 2, type == Q4_1 || type == Q5_1 || type == NVFP4 ? 2 : 1,
          type == Q5_0 || type == Q5_1 ? 4 : 0, type == Q8_0 ? 32 : 16};
}

// Q5's fifth bits: bit j of byte 4 * lane + b holds that lane's element high_bit_element(j, b) = 4j + b, the element
// that code register j holds in that byte (low nibbles, elements 0-15, in registers 0-3; high nibbles in 4-7).
// Register j then takes its fifth bits with one shift and one mask.
constexpr int high_bit_element(int j, int b) { return 4 * j + b; }

// Byte b of a lane's regrouped fifth bits from the block's 32 (bits b, b + 4, ..., b + 28), and back.
inline uint8_t high_bits_of(uint32_t qh, int b) {
#if defined(__BMI2__)
  return uint8_t(_pext_u32(qh, 0x11111111u << b));
#else
  uint8_t byte = 0;
  for (int j = 0; j < 8; ++j) byte |= uint8_t(((qh >> high_bit_element(j, b)) & 1) << j);
  return byte;
#endif
}

inline uint32_t high_bits_to(uint8_t byte, int b) {
#if defined(__BMI2__)
  return _pdep_u32(byte, 0x11111111u << b);
#else
  uint32_t qh = 0;
  for (int j = 0; j < 8; ++j) qh |= uint32_t((byte >> j) & 1) << high_bit_element(j, b);
  return qh;
#endif
}

// One lane's block (the type's own layout) into an interleaved column...
inline void x8_put(int64_t type, const uint8_t* block, int lane, uint8_t* column) {
  const X8Parts x = x8_parts(type);
  const int fb = x.field_bytes, field_end = fb * x.fields;
  for (int f = 0; f < x.fields; ++f) std::memcpy(column + LANES * fb * f + fb * lane, block + fb * f, fb);
  const uint8_t* codes = block + field_end + x.high_bits;
  for (int p = 0; p < x.codes; p += 4) std::memcpy(column + x.codes_at() + LANES * p + 4 * lane, codes + p, 4);
  if (x.high_bits) {
    uint32_t qh;
    std::memcpy(&qh, block + field_end, 4);
    for (int b = 0; b < 4; ++b) column[x.head() + 4 * lane + b] = high_bits_of(qh, b);
  }
}

// ... and back out of it.
inline void x8_get(int64_t type, const uint8_t* column, int lane, uint8_t* block) {
  const X8Parts x = x8_parts(type);
  const int fb = x.field_bytes, field_end = fb * x.fields;
  for (int f = 0; f < x.fields; ++f) std::memcpy(block + fb * f, column + LANES * fb * f + fb * lane, fb);
  uint8_t* codes = block + field_end + x.high_bits;
  for (int p = 0; p < x.codes; p += 4) std::memcpy(codes + p, column + x.codes_at() + LANES * p + 4 * lane, 4);
  if (x.high_bits) {
    uint32_t qh = 0;
    for (int b = 0; b < 4; ++b) qh |= high_bits_to(column[x.head() + 4 * lane + b], b);
    std::memcpy(block + field_end, &qh, 4);
  }
}

// Row `lane` of an interleaved group, `columns` blocks of it, in the type's own layout.
template <int64_t type>
struct X8Row {  // the type known when compiled: its parts' copies become a few moves
  static void run(const uint8_t* group, int64_t columns, int lane, uint8_t* out) {
    constexpr int64_t bytes = layout<type>().block_bytes;
    for (int64_t c = 0; c < columns; ++c) x8_get(type, group + c * LANES * bytes, lane, out + c * bytes);
  }
};

inline void x8_row(int64_t type, const uint8_t* group, int64_t columns, int lane, uint8_t* out) {
  for_type<X8Row>(type)(group, columns, lane, out);
}

inline float f16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
#if HAVE_AVX2
  return _cvtsh_ss(bits);
#else
  return float(c10::Half(bits, c10::Half::from_bits()));
#endif
}

// Q4_K / Q5_K: the 6-bit scale and min of slice j (ggml's get_scale_min_k4)
inline void scale_min_k4(int j, const uint8_t* q, int& sc, int& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// The factors of one slice: w = scale[h] * c + offset[h] for its halves h = 0, 1.
struct Factors {
  float scale[2], offset[2];
};

template <int64_t type>
inline Factors factors_of(const uint8_t* b, int s) {
  switch (type) {
    case Q4_0: { const float d = f16(b); return {{d, d}, {-8 * d, -8 * d}}; }
    case Q5_0: { const float d = f16(b); return {{d, d}, {-16 * d, -16 * d}}; }
    case Q4_1: case Q5_1: { const float d = f16(b), m = f16(b + 2); return {{d, d}, {m, m}}; }
    case Q8_0: { const float d = f16(b); return {{d, d}, {0, 0}}; }
    case Q4_K: case Q5_K: {
      int sc, m;
      scale_min_k4(s, b + 4, sc, m);
      const float d = f16(b) * sc, o = -f16(b + 2) * m;
      return {{d, d}, {o, o}};
    }
    case Q6_K: {
      const float d = f16(b + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      const float d0 = d * sc[2 * s], d1 = d * sc[2 * s + 1];
      return {{d0, d1}, {-32 * d0, -32 * d1}};
    }
    case MXFP4: { const float d = e8m0_half(b[0]); return {{d, d}, {0, 0}}; }
    case NVFP4: return {{e4m3_half(b[0]), e4m3_half(b[1])}, {0, 0}};
  }
  return {{0, 0}, {0, 0}};
}

template <int64_t type>
struct FactorsOf {
  static Factors run(const uint8_t* b, int s) { return factors_of<type>(b, s); }
};

// The 32 codes of slice s of block b, portable: c[j] for element j.
inline void codes_scalar(int64_t type, const uint8_t* b, int s, uint8_t* c) {
  switch (type) {
    case Q4_0: case Q4_1: {
      const uint8_t* qs = b + (type == Q4_0 ? 2 : 4);
      for (int j = 0; j < 16; ++j) c[j] = qs[j] & 15, c[j + 16] = qs[j] >> 4;
      return;
    }
    case Q5_0: case Q5_1: {
      const uint8_t* p = b + (type == Q5_0 ? 2 : 4);
      uint32_t qh;
      std::memcpy(&qh, p, 4);
      const uint8_t* qs = p + 4;
      for (int j = 0; j < 16; ++j) {
        c[j] = (qs[j] & 15) | (((qh >> j) & 1) << 4);
        c[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      }
      return;
    }
    case Q8_0: std::memcpy(c, b + 2, 32); return;
    case Q4_K: case Q5_K: {
      const uint8_t* qs = b + (type == Q4_K ? 16 : 48) + 32 * (s / 2);
      const int shift = 4 * (s & 1);
      for (int l = 0; l < 32; ++l) c[l] = (qs[l] >> shift) & 15;
      if (type == Q5_K)
        for (int l = 0; l < 32; ++l) c[l] |= ((b[16 + l] >> s) & 1) << 4;
      return;
    }
    case Q6_K: {
      const int h = s / 4, k = s % 4;
      const uint8_t* ql = b + 64 * h + 32 * (k & 1);
      const uint8_t* qh = b + 128 + 32 * h;
      for (int l = 0; l < 32; ++l) c[l] = ((ql[l] >> (4 * (k >> 1))) & 15) | (((qh[l] >> (2 * k)) & 3) << 4);
      return;
    }
    case MXFP4: case NVFP4: {  // the doubled values, as int8 bytes
      const uint8_t* qs = b + (type == MXFP4 ? 1 : 2);
      for (int j = 0; j < 16; ++j) c[j] = uint8_t(E2M1_X2[qs[j] & 15]), c[j + 16] = uint8_t(E2M1_X2[qs[j] >> 4]);
      return;
    }
  }
}

// --- activations --------------------------------------------------------------------------------------

// x [M, K] float -> int8 per block of 32 (q = round(x / d), d = max|x| / 127), and the sum of q over each
// half-block of 16 (the offsets' term).
struct QuantizedRows {
  std::vector<int8_t> q;     // [M, K]
  std::vector<float> d;      // [M, K / 32]
  std::vector<int32_t> sum;  // [M, K / 16]
  std::vector<float> xsum;   // [M, K / 32]: d * sum of q over the block (what a per-block offset multiplies)
};

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K) {
  QuantizedRows r{std::vector<int8_t>(M * K), std::vector<float>(M * K / SLICE), std::vector<int32_t>(M * K / 16),
                  std::vector<float>(M * K / SLICE)};
  for (int64_t b = 0; b < M * K / SLICE; ++b) {
    const float* xb = x + b * SLICE;
    float amax = 0.f;
    for (int j = 0; j < SLICE; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.f, inv = d > 0 ? 1.f / d : 0.f;
    r.d[b] = d;
    int32_t s0 = 0, s1 = 0;
    for (int j = 0; j < SLICE; ++j) {
      const int8_t q = int8_t(std::nearbyint(xb[j] * inv));
      r.q[b * SLICE + j] = q;
      (j < 16 ? s0 : s1) += q;
    }
    r.sum[2 * b] = s0, r.sum[2 * b + 1] = s1;
    r.xsum[b] = d * float(s0 + s1);
  }
  return r;
}

// --- the dot products ---------------------------------------------------------------------------------

constexpr int ROWS = 8;  // rows of x sharing each decoded slice (batched decoding)
constexpr int64_t PREFETCH_AHEAD = 2048;  // bytes: about 3 rows of a 896-wide Q5_0 matrix (measured best of 1, 2 and 4 KB)
// The interleaved kernel's, which reads about 3x faster: into L2, whose queue holds more misses in flight than L1's
// (measured 1.1x from memory against 2 KB into L1; best of 1-16 KB)
constexpr int64_t X8_PREFETCH_AHEAD = 4096;

// One output n for `rows` rows of x starting at m0: out[r * out_stride] = sum_k w[n, k] x[m0 + r, k]. Portable:
// plain loops that the compiler vectorizes for whatever CPU it targets (ARM's included).
template <int64_t type>
void dot_rows_portable(const uint8_t* row, const QuantizedRows& xq, int64_t m0, int rows, int64_t K, float* out,
                       int64_t out_stride) {
  constexpr Layout TL = layout<type>();
  const int64_t slices = K / SLICE;
  double acc[ROWS] = {0};
  uint8_t c[SLICE];
  for (int64_t i = 0; i < slices; ++i) {
    const uint8_t* b = row + (i / TL.slices) * TL.block_bytes;
    const int s = int(i % TL.slices);
    codes_scalar(type, b, s, c);
    const Factors f = factors_of<type>(b, s);
    for (int r = 0; r < rows; ++r) {
      const int8_t* q = xq.q.data() + (m0 + r) * K + i * SLICE;
      int32_t dot0 = 0, dot1 = 0;
      for (int j = 0; j < 16; ++j) {
        const int c0 = signed_codes(type) ? int(int8_t(c[j])) : int(c[j]);
        const int c1 = signed_codes(type) ? int(int8_t(c[j + 16])) : int(c[j + 16]);
        dot0 += c0 * q[j], dot1 += c1 * q[j + 16];
      }
      const int32_t* sums = xq.sum.data() + (m0 + r) * (K / 16) + 2 * i;
      const float dx = xq.d[(m0 + r) * slices + i];
      acc[r] += dx * (f.scale[0] * float(dot0) + f.scale[1] * float(dot1) + f.offset[0] * float(sums[0]) +
                      f.offset[1] * float(sums[1]));
    }
  }
  for (int r = 0; r < rows; ++r) out[r * out_stride] = float(acc[r]);
}

// An interleaved group: each of its eight rows restored to its type's layout, then as above (outputs n..n+7).
template <int64_t type>
struct Portable {
  static void run(const uint8_t* row, const QuantizedRows& xq, int64_t m0, int rows, int64_t K, float* out, int64_t stride) {
    if constexpr (is_x8(type)) {
      constexpr Layout TL = layout<type>();
      std::vector<uint8_t> own(K / SLICE * TL.block_bytes);
      for (int lane = 0; lane < LANES; ++lane) {
        X8Row<base_type(type)>::run(row, K / SLICE, lane, own.data());
        dot_rows_portable<base_type(type)>(own.data(), xq, m0, rows, K, out + lane, stride);
      }
    } else {
      dot_rows_portable<type>(row, xq, m0, rows, K, out, stride);
    }
  }
};

#if HAVE_AVX2
inline __m256i bytes_from_bits(uint32_t bits) {  // byte j = 0xFF where bit j is set
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(int(bits)),
                                             _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                               0x0101010101010101, 0x0000000000000000));
  const __m256i others = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(others, _mm256_set1_epi64x(-1));
}

inline __m256i nibbles(const uint8_t* qs) {  // 16 bytes -> elements 0..15 (low nibbles), 16..31 (high)
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i low = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low));
}

template <int64_t type>
inline __m256i codes_avx2(const uint8_t* b, int s) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  switch (type) {
    case Q4_0: return nibbles(b + 2);
    case Q4_1: return nibbles(b + 4);
    case Q5_0: case Q5_1: {
      const uint8_t* p = b + (type == Q5_0 ? 2 : 4);
      uint32_t qh;
      std::memcpy(&qh, p, 4);
      return _mm256_or_si256(nibbles(p + 4), _mm256_and_si256(bytes_from_bits(qh), _mm256_set1_epi8(0x10)));
    }
    case Q8_0: return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
    case Q4_K: case Q5_K: {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (type == Q4_K ? 16 : 48) + 32 * (s / 2)));
      __m256i c = _mm256_and_si256(_mm256_srli_epi16(q, 4 * (s & 1)), low4);
      if (type == Q5_K) {
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
        const __m256i bit = _mm256_and_si256(_mm256_srli_epi16(qh, s), _mm256_set1_epi8(1));
        c = _mm256_or_si256(c, _mm256_slli_epi16(bit, 4));
      }
      return c;
    }
    case Q6_K: {
      const int h = s / 4, k = s % 4;
      const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32 * (k & 1)));
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
      const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(ql, 4 * (k >> 1)), low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), _mm256_set1_epi8(3));
      return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
    }
    case MXFP4: case NVFP4: {  // nibbles looked up as their doubled values
      const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(E2M1_X2)));
      return _mm256_shuffle_epi8(table, nibbles(b + (type == MXFP4 ? 1 : 2)));
    }
  }
  return _mm256_setzero_si256();
}

// Types whose offset is a fixed multiple of the scale (w = d (c - k)): their codes are centred to c - k and
// multiplied as signed, which needs no offset term at all.
template <int64_t type>
constexpr int centre() { return type == Q4_0 ? 8 : type == Q5_0 ? 16 : type == Q6_K ? 32 : 0; }

// acc + [sum of c[j] * q[j] over each group of 4 bytes] (c unsigned, q signed) as 8 int32: lanes 0..3 hold
// elements 0..15, 4..7 the rest.
inline __m256i dot_add(__m256i acc, __m256i c, __m256i q) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, c, q);
#elif HAVE_VNNI
  return _mm256_dpbusd_epi32(acc, c, q);
#else  // no overflow: c < 64 or |c| <= 128
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(c, q), _mm256_set1_epi16(1)));
#endif
}

inline __m256i dot_u8s8(__m256i c, __m256i q) { return dot_add(_mm256_setzero_si256(), c, q); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Never fused: GCC would fuse the offsets' multiply-add in some of the R-row variants and not in others, and a
// row's result must not depend on how many rows share its step (speculative decoding checks its guesses as
// rows of one step, and must give the reply decoding a token a step gives).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
// R rows of x against one row of weights, two slices at a time with separate accumulators (so the FMA chains
// overlap); R is a compile-time constant so every accumulator stays in a register.
template <int64_t type, int R>
void dot_rows_avx2(const uint8_t* row, const QuantizedRows& xq, int64_t m0, int64_t K, float* out, int64_t out_stride) {
  const int64_t slices = K / SLICE;
  constexpr bool is_signed = signed_codes(type) || centre<type>() != 0, has_offset = !is_signed;
  constexpr bool two_scales = type == Q6_K || type == NVFP4;
  __m256 acc[2][R];
  float offsets[2][R];
  for (int u = 0; u < 2; ++u)
    for (int r = 0; r < R; ++r) acc[u][r] = _mm256_setzero_ps(), offsets[u][r] = 0.f;
  const int8_t* xq_row = xq.q.data() + m0 * K;
  const float* dx_row = xq.d.data() + m0 * slices;
  const float* xsum_row = xq.xsum.data() + m0 * slices;
  constexpr Layout TL = layout<type>();  // compile-time: the block arithmetic below is shifts, not divisions
  auto slice = [&](int64_t i, int u) {
    const uint8_t* b = row + (i / TL.slices) * TL.block_bytes;
    const int s = int(i % TL.slices);
    // rows are contiguous and read in order: ask for the bytes a few rows ahead now, so that streaming a
    // matrix larger than the caches waits on memory bandwidth, not on its latency row after row
    _mm_prefetch(reinterpret_cast<const char*>(b) + PREFETCH_AHEAD, _MM_HINT_T0);
    __m256i raw = codes_avx2<type>(b, s);
    if (centre<type>()) raw = _mm256_sub_epi8(raw, _mm256_set1_epi8(centre<type>()));
    const __m256i c = is_signed ? _mm256_sign_epi8(raw, raw) : raw;  // |w| for signed codes: their sign goes to x
    const Factors f = factors_of<type>(b, s);
    const __m256 scale = two_scales ? _mm256_set_m128(_mm_set1_ps(f.scale[1]), _mm_set1_ps(f.scale[0]))
                                    : _mm256_set1_ps(f.scale[0]);
    for (int r = 0; r < R; ++r) {
      __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq_row + r * K + i * SLICE));
      if (is_signed) q = _mm256_sign_epi8(q, raw);
      const __m256 isum = _mm256_cvtepi32_ps(dot_u8s8(c, q));
      acc[u][r] = _mm256_fmadd_ps(isum, _mm256_mul_ps(scale, _mm256_set1_ps(dx_row[r * slices + i])), acc[u][r]);
      if (has_offset) offsets[u][r] += f.offset[0] * xsum_row[r * slices + i];  // one offset per slice here
    }
  };
  int64_t i = 0;
  for (; i + 1 < slices; i += 2) slice(i, 0), slice(i + 1, 1);
  if (i < slices) slice(i, 0);
  for (int r = 0; r < R; ++r) out[r * out_stride] = hsum(_mm256_add_ps(acc[0][r], acc[1][r])) + offsets[0][r] + offsets[1][r];
}

// The scales of an interleaved column, a lane per row: of codes 0-15 and of 16-31 (equal but for NVFP4), and the
// offsets' (Q4_1 and Q5_1's m).
struct ColumnScales {
  __m256 first, second, offset;
};

template <int64_t base>
inline ColumnScales column_scales(const uint8_t* b) {
  auto float16s = [](const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); };
  auto bytes = [](const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); };
  if constexpr (base == MXFP4) {  // E8M0 e -> 2^(e - 128), as e8m0_half: e = 0 a subnormal, 255 NaN
    const __m256i e = bytes(b);
    __m256i bits = _mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23);
    bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x00200000), _mm256_cmpeq_epi32(e, _mm256_setzero_si256()));
    bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x7FC00000), _mm256_cmpeq_epi32(e, _mm256_set1_epi32(255)));
    const __m256 d = _mm256_castsi256_ps(bits);
    return {d, d, d};
  } else if constexpr (base == NVFP4) {  // E4M3 bytes (of codes 0-15, then of 16-31) -> their halved values
    auto e4m3_half = [&](const uint8_t* p) {  // as E4M3_HALF holds them (computed: 1.3x a table gather here)
      const __m256i x = bytes(p), em = _mm256_and_si256(x, _mm256_set1_epi32(0x7F));  // exponent and mantissa
      // normal: 2^(e - 8) (1 + m / 8), its exponent field e + 119; e = 0: m 2^-10; 0x7F: NaN
      const __m256 normal = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(em, 20), _mm256_set1_epi32(119 << 23)));
      const __m256 subnormal = _mm256_mul_ps(_mm256_cvtepi32_ps(em), _mm256_set1_ps(1.0f / 1024));
      __m256 v = _mm256_blendv_ps(normal, subnormal, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), em)));
      v = _mm256_blendv_ps(v, _mm256_set1_ps(NAN), _mm256_castsi256_ps(_mm256_cmpeq_epi32(em, _mm256_set1_epi32(0x7F))));
      return _mm256_or_ps(v, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x80)), 24)));
    };
    return {e4m3_half(b), e4m3_half(b + LANES), _mm256_setzero_ps()};
  } else {
    const __m256 d = float16s(b);
    return {d, d, base == Q4_1 || base == Q5_1 ? float16s(b + 2 * LANES) : d};
  }
}

// E2M1 code -> its doubled value + 12 (0..24): unsigned, for dpbusd; the 12 is taken off through the sum of x
alignas(16) constexpr int8_t E2M1_X2_PLUS_12[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};

// R rows of x against one interleaved group of eight weight rows: lane l of each accumulator is output row l.
// Each lane's 32-bit integer sums run over a whole block column, in two chains (codes 0-15 and 16-31); the
// codes meet x as unsigned (nibbles; E2M1's doubled values + 12; Q8_0's bytes + 128 where the CPU has VNNI),
// their centre taken off once per column through the sum of x's codes.
template <int64_t type, int R>
void dot8_rows_avx2(const uint8_t* group, const QuantizedRows& xq, int64_t m0, int64_t K, float* out, int64_t out_stride) {
  constexpr int64_t base = base_type(type);
  constexpr int64_t column_bytes = LANES * layout<base>().block_bytes;
  constexpr X8Parts parts = x8_parts(base);
  constexpr bool e2m1 = base == MXFP4 || base == NVFP4, two_scales = base == NVFP4;
  // with VNNI, int8 codes + 128 as unsigned: one xor per column, not a sign per row (without it maddubs's int16
  // pairs would saturate at 255 * 127 * 2: codes keep their sign)
  constexpr bool biased = HAVE_VNNI && base == Q8_0;
  constexpr int centre = base == Q4_0 ? 8 : base == Q5_0 ? 16 : e2m1 ? 12 : biased ? 128 : 0;
  constexpr bool has_offset = base == Q4_1 || base == Q5_1;
  const int64_t slices = K / SLICE;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 acc[R], offsets[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), offsets[r] = _mm256_setzero_ps();
  const int8_t* xq_row = xq.q.data() + m0 * K;
  const float* dx_row = xq.d.data() + m0 * slices;
  const float* xsum_row = xq.xsum.data() + m0 * slices;
  const int32_t* sum_row = xq.sum.data() + m0 * (K / 16);
  for (int64_t i = 0; i < slices; ++i) {
    const uint8_t* b = group + i * column_bytes;
    for (int64_t ahead = 0; ahead < column_bytes; ahead += 64)
      _mm_prefetch(reinterpret_cast<const char*>(b) + X8_PREFETCH_AHEAD + ahead, _MM_HINT_T1);
    const ColumnScales scales = column_scales<base>(b);
    __m256i c[8];  // c[j]: bytes 4j..4j+3 of every lane's codes (elements 4j..4j+3)
    if constexpr (base == Q8_0) {
      for (int j = 0; j < 8; ++j) {
        c[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + parts.codes_at() + 32 * j));
        if (biased) c[j] = _mm256_xor_si256(c[j], _mm256_set1_epi8(char(0x80)));
      }
    } else {  // nibbles: byte j holds elements j (low) and j + 16 (high)
      for (int j = 0; j < 4; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + parts.codes_at() + 32 * j));
        c[j] = _mm256_and_si256(v, low4), c[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      }
      if constexpr (parts.high_bits != 0) {  // bit j of each byte: register j's fifth bit, moved to bit 4
        const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + parts.head()));
        const __m256i bit4 = _mm256_set1_epi8(0x10);
        for (int j = 0; j < 8; ++j) {
          const __m256i moved = j < 4 ? _mm256_slli_epi16(high, 4 - j) : _mm256_srli_epi16(high, j - 4);
          c[j] = _mm256_or_si256(c[j], _mm256_and_si256(moved, bit4));
        }
      }
      if constexpr (e2m1) {
        const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(E2M1_X2_PLUS_12)));
        for (int j = 0; j < 8; ++j) c[j] = _mm256_shuffle_epi8(table, c[j]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* x = xq_row + r * K + i * SLICE;
      auto four = [&](int e) { int32_t v; std::memcpy(&v, x + e, 4); return _mm256_set1_epi32(v); };
      __m256i first = _mm256_setzero_si256(), second = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        if constexpr (base == Q8_0 && !biased) {
          first = dot_add(first, _mm256_sign_epi8(c[j], c[j]), _mm256_sign_epi8(four(4 * j), c[j]));
          second = dot_add(second, _mm256_sign_epi8(c[j + 4], c[j + 4]), _mm256_sign_epi8(four(16 + 4 * j), c[j + 4]));
        } else {
          first = dot_add(first, c[j], four(4 * j));
          second = dot_add(second, c[j + 4], four(16 + 4 * j));
        }
      }
      const int32_t* sums = sum_row + r * (K / 16) + 2 * i;  // of x's codes 0-15 and 16-31
      const __m256 dx = _mm256_set1_ps(dx_row[r * slices + i]);
      if constexpr (two_scales) {
        first = _mm256_sub_epi32(first, _mm256_set1_epi32(centre * sums[0]));
        second = _mm256_sub_epi32(second, _mm256_set1_epi32(centre * sums[1]));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(first), _mm256_mul_ps(scales.first, dx), acc[r]);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(second), _mm256_mul_ps(scales.second, dx), acc[r]);
      } else {
        __m256i isum = _mm256_add_epi32(first, second);
        if (centre) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(centre * (sums[0] + sums[1])));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(scales.first, dx), acc[r]);
      }
      if constexpr (has_offset) offsets[r] = _mm256_fmadd_ps(scales.offset, _mm256_set1_ps(xsum_row[r * slices + i]), offsets[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * out_stride, _mm256_add_ps(acc[r], offsets[r]));
}
#pragma GCC pop_options

template <int64_t type>
struct Avx2 {
  static void run(const uint8_t* row, const QuantizedRows& xq, int64_t m0, int rows, int64_t K, float* out, int64_t stride) {
    if constexpr (is_x8(type)) {
      for (int done = 0; done < rows;) {  // 4, 2 and 1 rows at a time: each holds eight accumulators' worth of codes
        const int left = rows - done;
        float* o = out + done * stride;
        if (left >= 4) dot8_rows_avx2<type, 4>(row, xq, m0 + done, K, o, stride), done += 4;
        else if (left >= 2) dot8_rows_avx2<type, 2>(row, xq, m0 + done, K, o, stride), done += 2;
        else dot8_rows_avx2<type, 1>(row, xq, m0 + done, K, o, stride), done += 1;
      }
      return;
    }
    for (int done = 0; done < rows;) {  // 8, 4, 2 and 1 rows at a time
      const int left = rows - done;
      float* o = out + done * stride;
      if (left >= 8) dot_rows_avx2<type, 8>(row, xq, m0 + done, K, o, stride), done += 8;
      else if (left >= 4) dot_rows_avx2<type, 4>(row, xq, m0 + done, K, o, stride), done += 4;
      else if (left >= 2) dot_rows_avx2<type, 2>(row, xq, m0 + done, K, o, stride), done += 2;
      else dot_rows_avx2<type, 1>(row, xq, m0 + done, K, o, stride), done += 1;
    }
  }
};

// Slice s of block b as 32 floats: w = scale * c + offset, 8 at a time.
template <int64_t type>
void dequantize_slice_avx2(const uint8_t* b, int s, float* out) {
  __m256i raw = codes_avx2<type>(b, s);
  if (centre<type>()) raw = _mm256_sub_epi8(raw, _mm256_set1_epi8(centre<type>()));
  const Factors f = factors_of<type>(b, s);
  constexpr bool is_signed = signed_codes(type) || centre<type>() != 0;
  alignas(32) int8_t c[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(c), raw);
  for (int h = 0; h < 2; ++h) {  // halves of 16: each its own scale and offset
    const __m256 scale = _mm256_set1_ps(f.scale[h]), offset = _mm256_set1_ps(is_signed ? 0.f : f.offset[h]);
    for (int g = 0; g < 2; ++g) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 16 * h + 8 * g));
      const __m256i wide = is_signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
      _mm256_storeu_ps(out + 16 * h + 8 * g, _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide), scale, offset));
    }
  }
}

template <int64_t type>
struct Avx2Dequantize {
  static void run(const uint8_t* b, int s, float* out) { dequantize_slice_avx2<type>(b, s, out); }
};
#endif

void check_weights(const torch::Tensor& blocks, int64_t type, int64_t K) {
  TORCH_CHECK(blocks.dtype() == torch::kUInt8 && blocks.is_contiguous() && blocks.dim() == 2, "blocks must be contiguous uint8 [N, bytes]");
  TORCH_CHECK(!is_x8(type) || (interleavable(base_type(type)) && blocks.size(0) % LANES == 0),
              "type ", type, " is no interleaved type, or its ", blocks.size(0), " rows are not groups of ", LANES);
  const Layout L = layout_of(type);
  TORCH_CHECK(K % (L.slices * SLICE) == 0 && blocks.size(1) == K / (L.slices * SLICE) * L.block_bytes,
              "blocks of type ", type, " do not hold rows of ", K, " weights");
}

// What one call of a type's kernel covers: a row of weights, or an interleaved group of eight.
inline int64_t rows_per_unit(int64_t type) { return is_x8(type) ? LANES : 1; }

using Dot = void (*)(const uint8_t*, const QuantizedRows&, int64_t, int, int64_t, float*, int64_t);

Dot dot_kernel(int64_t type, bool portable) {
#if HAVE_AVX2
  if (!portable) return for_any_type<Avx2>(type);
#endif
  return for_any_type<Portable>(type);
}

// y [M, N] = x [M, K] @ W^T, W [N, K] in blocks of `type`.
// `scale` multiplies every weight (NVFP4's per-tensor scale): it joins the activations' block scales, which every
// product meets anyway.
torch::Tensor matmul(torch::Tensor x, torch::Tensor blocks, int64_t type, bool portable, double scale) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = blocks.size(0);
  check_weights(blocks, type, K);
  QuantizedRows xq = quantize_rows(x.data_ptr<float>(), M, K);
  if (scale != 1.0) {
    for (float& d : xq.d) d *= float(scale);
    for (float& s : xq.xsum) s *= float(scale);
  }
  auto out = torch::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  const uint8_t* wp = blocks.data_ptr<uint8_t>();
  const int64_t lanes = rows_per_unit(type), unit_bytes = lanes * blocks.size(1);
  const Dot dot = dot_kernel(type, portable);
  at::parallel_for(0, N / lanes, 16 / lanes, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u)
      for (int64_t m = 0; m < M; m += ROWS) {
        const int rows = int(std::min<int64_t>(ROWS, M - m));
        dot(wp + u * unit_bytes, xq, m, rows, K, op + m * N + u * lanes, N);
      }
  });
  return out;
}

// Several matrices in one pass of the threads, each over a run of x's rows into its own block of one output
// [out_rows, N]: out[out_row[i] + r, col[i] + n] = x[x_row[i] + r] @ W_i[n] for r < count[i]. A MoE layer's
// experts (each over its tokens, sorted by expert) cost one call rather than one per matrix; every product
// is exactly `matmul`'s (rows are quantized alone and taken ROWS at a time from the run's start).
torch::Tensor multi_matmul(torch::Tensor x, std::vector<torch::Tensor> weights, std::vector<int64_t> types,
                           std::vector<int64_t> x_row, std::vector<int64_t> out_row, std::vector<int64_t> count,
                           std::vector<int64_t> col, int64_t out_rows, int64_t N, bool portable) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 [M, K]");
  const size_t W = weights.size();
  TORCH_CHECK(types.size() == W && x_row.size() == W && out_row.size() == W && count.size() == W && col.size() == W,
              "weights, types, x_row, out_row, count and col must be as many");
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<int64_t> start(W + 1, 0);  // each weight's first unit (row, or group of rows) among all units
  std::vector<Dot> dots(W);
  std::vector<const uint8_t*> rows_of(W);
  std::vector<int64_t> unit_bytes(W), lanes(W);
  for (size_t i = 0; i < W; ++i) {
    check_weights(weights[i], types[i], K);
    TORCH_CHECK(count[i] >= 0 && 0 <= x_row[i] && x_row[i] + count[i] <= M && 0 <= out_row[i] &&
                out_row[i] + count[i] <= out_rows && 0 <= col[i] && col[i] + weights[i].size(0) <= N,
                "weight ", i, "'s rows or columns fall outside x or the output");
    lanes[i] = rows_per_unit(types[i]);
    rows_of[i] = weights[i].data_ptr<uint8_t>(), unit_bytes[i] = lanes[i] * weights[i].size(1);
    start[i + 1] = start[i] + weights[i].size(0) / lanes[i];
    dots[i] = dot_kernel(types[i], portable);
  }
  const QuantizedRows xq = quantize_rows(x.data_ptr<float>(), M, K);
  auto out = torch::zeros({out_rows, N}, x.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, start[W], 4, [&](int64_t u0, int64_t u1) {  // over (weight, unit of output columns) pairs
    int64_t i = int64_t(std::upper_bound(start.begin(), start.end(), u0) - start.begin()) - 1;
    for (int64_t u = u0; u < u1; ++u) {
      while (u >= start[i + 1]) ++i;
      const int64_t unit = u - start[i], n = unit * lanes[i];  // its first output column
      for (int64_t m = 0; m < count[i]; m += ROWS) {
        const int rows = int(std::min<int64_t>(ROWS, count[i] - m));
        dots[i](rows_of[i] + unit * unit_bytes[i], xq, x_row[i] + m, rows, K, op + (out_row[i] + m) * N + col[i] + n, N);
      }
    }
  });
  return out;
}

// Floats to bfloat16, rounded to nearest even as torch rounds. No branch for NaN, so that the compiler vectorizes
// it: a NaN weight (a corrupt scale) comes out NaN or infinite, either of which still poisons its products.
inline void to_bfloat16(const float* in, uint16_t* out) {
  for (int j = 0; j < SLICE; ++j) {
    uint32_t bits;
    std::memcpy(&bits, in + j, 4);
    out[j] = uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
}

// The weights of rows `rows` (any order, repeats allowed) times `scale`, as float32 [len(rows), K], or bfloat16
// (each weight rounded once): prefill's tiles for a GEMM, and the embedding lookup of a token table.
torch::Tensor dequantize_rows(torch::Tensor blocks, int64_t type, int64_t K, torch::Tensor rows, bool portable,
                              double scale, bool bfloat16) {
  check_weights(blocks, type, K);
  TORCH_CHECK(rows.dtype() == torch::kInt64 && rows.dim() == 1, "rows must be int64 [R]");
  const bool interleaved = is_x8(type);
  type = base_type(type);  // an interleaved row's blocks are gathered into the type's layout first
  const Layout L = layout_of(type);
  const int64_t R = rows.size(0), row_bytes = blocks.size(1), N = blocks.size(0);
  auto out = torch::empty({R, K}, bfloat16 ? torch::kBFloat16 : torch::kFloat32);
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t element_bytes = out.element_size();
  const int64_t* ids = rows.data_ptr<int64_t>();
  const uint8_t* wp = blocks.data_ptr<uint8_t>();
  const float weight_scale = float(scale);
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(0 <= ids[r] && ids[r] < N, "row ", ids[r], " is outside the weight's ", N);
#if HAVE_AVX2
  void (*simd)(const uint8_t*, int, float*) = portable ? nullptr : for_type<Avx2Dequantize>(type);
#endif
  const auto factors = for_type<FactorsOf>(type);
  at::parallel_for(0, R * (K / SLICE), 64, [&](int64_t i0, int64_t i1) {
    uint8_t c[SLICE];
    alignas(32) float widened[SLICE];
    std::vector<uint8_t> gathered(interleaved ? row_bytes : 0);  // an interleaved row, in the type's layout
    int64_t gathered_row = -1;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / (K / SLICE), slice = i % (K / SLICE);
      const uint8_t* row = wp + ids[r] * row_bytes;
      if (interleaved) {
        if (r != gathered_row) {
          const int64_t lane = ids[r] % LANES;
          x8_row(type, wp + (ids[r] - lane) * row_bytes, row_bytes / L.block_bytes, int(lane), gathered.data());
          gathered_row = r;
        }
        row = gathered.data();
      }
      const uint8_t* b = row + (slice / L.slices) * L.block_bytes;
      const int s = int(slice % L.slices);
      void* dst = op + (r * K + slice * SLICE) * element_bytes;
      float* o = bfloat16 ? widened : static_cast<float*>(dst);
#if HAVE_AVX2
      if (simd) {
        simd(b, s, o);
      } else
#endif
      {
        codes_scalar(type, b, s, c);
        const Factors f = factors(b, s);
        for (int j = 0; j < SLICE; ++j) {
          const float code = signed_codes(type) ? float(int8_t(c[j])) : float(c[j]);
          o[j] = f.scale[j / 16] * code + f.offset[j / 16];
        }
      }
      if (weight_scale != 1.f)
        for (int j = 0; j < SLICE; ++j) o[j] *= weight_scale;
      if (bfloat16) to_bfloat16(widened, static_cast<uint16_t*>(dst));
    }
  });
  return out;
}

// Rows of `type` regrouped eight at a time into its interleaved layout (x8_put), or back (to_rows).
// `out`: where to write them (any contiguous uint8 tensor of blocks' shape), else a new tensor.
torch::Tensor interleave(torch::Tensor blocks, int64_t type, bool to_rows, std::optional<torch::Tensor> into) {
  TORCH_CHECK(interleavable(type), "type ", type, " has no interleaved layout");
  TORCH_CHECK(blocks.dtype() == torch::kUInt8 && blocks.is_contiguous() && blocks.dim() == 2 && blocks.size(0) % LANES == 0,
              "blocks must be contiguous uint8 [N, bytes] with N a multiple of ", LANES);
  const int64_t bytes = layout_of(type).block_bytes, columns = blocks.size(1) / bytes;
  TORCH_CHECK(columns * bytes == blocks.size(1), "rows of ", blocks.size(1), " bytes are no whole blocks of type ", type);
  TORCH_CHECK(!into || (into->dtype() == torch::kUInt8 && into->is_contiguous() && into->sizes() == blocks.sizes()),
              "out must be contiguous uint8 of the blocks' shape");
  auto out = into ? *into : torch::empty_like(blocks);
  const uint8_t* in = blocks.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  const int64_t row_bytes = blocks.size(1), group_bytes = LANES * row_bytes;
  at::parallel_for(0, blocks.size(0) / LANES, 16, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int lane = 0; lane < LANES; ++lane)
        for (int64_t c = 0; c < columns; ++c) {
          const int64_t row_at = g * group_bytes + lane * row_bytes + c * bytes, column_at = g * group_bytes + c * LANES * bytes;
          if (to_rows) x8_get(type, in + column_at, lane, op + row_at);
          else x8_put(type, in + row_at, lane, op + column_at);
        }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matmul", &matmul, py::arg("x"), py::arg("blocks"), py::arg("type"), py::arg("portable") = false,
        py::arg("scale") = 1.0);
  m.def("multi_matmul", &multi_matmul, py::arg("x"), py::arg("weights"), py::arg("types"), py::arg("x_row"),
        py::arg("out_row"), py::arg("count"), py::arg("col"), py::arg("out_rows"), py::arg("N"),
        py::arg("portable") = false);
  m.def("dequantize_rows", &dequantize_rows, py::arg("blocks"), py::arg("type"), py::arg("K"), py::arg("rows"),
        py::arg("portable") = false, py::arg("scale") = 1.0, py::arg("bfloat16") = false);
  m.def("interleave", &interleave, py::arg("blocks"), py::arg("type"), py::arg("to_rows") = false,
        py::arg("out") = py::none());
  m.def("simd", []() { return bool(HAVE_AVX2); });
  m.attr("X8") = X8;
}
