// The engine's small fused CPU operations, where PyTorch's chain of small ops costs more than the arithmetic
// at decode's few rows: RMSNorm, and attention of one query per sequence over a paged KV cache read in place.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

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
// squashed to softcap * tanh(score / softcap) before the softmax (Gemma 2). sinks [H] (gpt-oss): a logit per
// head that joins each softmax's denominator and attends to nothing.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                                     int64_t window, double softcap, c10::optional<torch::Tensor> sinks) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_decode_attention: contiguous float32 tensors expected");
  torch::Tensor sink_values;
  if (sinks.has_value()) {
    sink_values = sinks->to(torch::kFloat32).contiguous();
    TORCH_CHECK(sink_values.numel() == q.size(1), "paged_decode_attention: one sink per head expected");
  }
  const float* sp = sinks.has_value() ? sink_values.data_ptr<float>() : nullptr;
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
  m.def("rms_norm", &rms_norm);
  m.def("paged_decode_attention", &paged_decode_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"), py::arg("window"), py::arg("softcap"),
        py::arg("sinks") = py::none());
}
