// Decode attention over the full-precision (fp32) paged cache, straight from the pool:
//   fp_decode_attention(q, k, v, table, lens, block, scale) -> [B, Hq, D]
//   q: [B, Hq, D]; k, v: one layer's pool [slots, Hkv, D] (slot = block id * block + offset);
//   table: [B, nblk] int64 block ids; lens: [B] context lengths (incl. the new token).
// The torch path gathers each sequence's K and V into a copy, then runs ~12 ops (matmul,
// mask, softmax, matmul); here each (sequence, kv head) is one task that reads its rows
// once for its G query heads (GQA) with a two-pass fp32 softmax. Loops are left to the
// vectoriser (-O3 -march=native).
// NOTE: ATen headers only, not <torch/extension.h>: its parse alone costs ~17 s a file here;
// the Python bindings live in one file (models/csrc/bindings.cpp)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

at::Tensor fp_decode_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor table,
                                     at::Tensor lens, int64_t block, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: fp32 [B, Hq, D]");
  TORCH_CHECK(k.dim() == 3 && k.scalar_type() == at::kFloat && k.is_contiguous() && v.sizes() == k.sizes() &&
              v.scalar_type() == at::kFloat && v.is_contiguous(), "k, v: fp32 [slots, Hkv, D]");
  TORCH_CHECK(table.dim() == 2 && table.scalar_type() == at::kLong && table.is_contiguous() &&
              lens.scalar_type() == at::kLong && lens.numel() == q.size(0) && table.size(0) == q.size(0),
              "table: int64 [B, nblk], lens: int64 [B]");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), G = Hq / Hkv, nblk = table.size(1);
  const int64_t slots = k.size(0);
  TORCH_CHECK(k.size(2) == D && Hq % Hkv == 0, "head shapes disagree");
  auto out = at::empty_like(q);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const int64_t *tp = table.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {  // NOTE: checked here: no exception may leave the parallel region
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= nblk * block, "context length outside the block table");
    for (int64_t j = 0; j < (lp[b] + block - 1) / block; ++j)
      TORCH_CHECK(tp[b * nblk + j] >= 0 && (tp[b * nblk + j] + 1) * block <= slots, "block table points outside the pool");
  }
  const float sc = static_cast<float>(scale);
  // one task per (sequence, kv head): its G query heads share every K/V row read
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s;
    std::vector<float> acc(G * D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv, n = lp[b];
      s.assign(G * n, 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t slot = tp[b * nblk + j / block] * block + j % block;
        const float* kr = kp + (slot * Hkv + h) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qr = qp + (b * Hq + h * G + g) * D;
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
          s[g * n + j] = dot * sc;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = s.data() + g * n;
        float m = sg[0];
        for (int64_t j = 1; j < n; ++j) m = std::max(m, sg[j]);
        float z = 0.0f;
        for (int64_t j = 0; j < n; ++j) z += (sg[j] = std::exp(sg[j] - m));
        const float inv = 1.0f / z;
        for (int64_t j = 0; j < n; ++j) sg[j] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t slot = tp[b * nblk + j / block] * block + j % block;
        const float* vr = vp + (slot * Hkv + h) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = s[g * n + j];
          float* a = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) a[d] += p * vr[d];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        std::copy(acc.data() + g * D, acc.data() + (g + 1) * D, op + (b * Hq + h * G + g) * D);
    }
  });
  return out;
}
