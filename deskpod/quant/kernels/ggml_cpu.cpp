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

namespace {

constexpr int64_t GROUP = 32;

// out[m, n] = sum_k x[m, k] * w[n, k]; rows of w are split across threads.
torch::Tensor u4_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor mins) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), G = K / GROUP;
  TORCH_CHECK(K % GROUP == 0 && codes.size(1) == K / 2, "codes must be [N, K/2] with K a multiple of 32");
  // sum of x over each group, so the per-group min costs one multiply: sum(w*x) = scale*sum(q*x) + min*sum(x)
  auto xsum = x.view({M, G, GROUP}).sum(-1).contiguous();
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* xs = xsum.data_ptr<float>();
  const uint8_t* qp = codes.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* mp = mins.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* q = qp + n * (K / 2);
      const float* s = sp + n * G;
      const float* mn = mp + n * G;
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        const float* xg = xs + m * G;
        float acc[16] = {0};  // one lane per code position: vectorizes without reassociating floats
        float bias = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          const uint8_t* qb = q + g * 16;
          const float* xb = xr + g * GROUP;
          const float sc = s[g];
          for (int j = 0; j < 16; ++j)
            acc[j] += sc * (float(qb[j] & 15) * xb[j] + float(qb[j] >> 4) * xb[j + 16]);
          bias += mn[g] * xg[g];
        }
        float total = bias;
        for (int j = 0; j < 16; ++j) total += acc[j];
        op[m * N + n] = total;
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
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        float acc[GROUP] = {0};
        for (int64_t g = 0; g < G; ++g) {
          const int8_t* qb = q + g * GROUP;
          const float* xb = xr + g * GROUP;
          const float sc = s[g];
          for (int j = 0; j < GROUP; ++j) acc[j] += sc * (float(qb[j]) * xb[j]);
        }
        float total = 0.f;
        for (int j = 0; j < GROUP; ++j) total += acc[j];
        op[m * N + n] = total;
      }
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("u4_matmul", &u4_matmul);
  m.def("i8_matmul", &i8_matmul);
  m.def("u4_dequantize", &u4_dequantize);
  m.def("i8_dequantize", &i8_dequantize);
}
