// Fused fp32 ops of a decoder layer (engine/models/layer_ops.py says when they are used):
// each replaces a handful of torch ops whose per-op dispatch, not arithmetic, dominates a
// decode step of a small model (SmolLM2 at batch 1: ~5000 aten calls per step, 30 layers).
//
//   rms_norm(x, w, eps)             -> x / rms(x) * w                          x: [T, H]
//   add_rms_norm_(x, d, w, eps)     -> x += d (in place), returns norm(x)      (residual + norm)
//   rope_(qkv, cos, sin, n, D)      -> rotates heads 0..n-1 of qkv in place    qkv: [T, *, D]
//                                      (HF rotate-half: x*cos + [-x2, x1]*sin; cos/sin: [T, D])
// Loops are written for the compiler's vectoriser (-O3 -march=native), no intrinsics.
// NOTE: ATen headers only, not <torch/extension.h>: its parse alone costs ~17 s a file here;
// the Python bindings live in one file (models/csrc/bindings.cpp)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace {

void check_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), what,
              " must be a contiguous fp32 [T, H] tensor");
}

inline void norm_row(const float* x, const float* w, float* y, int64_t H, float eps) {
  float ss = 0.0f;
  for (int64_t i = 0; i < H; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
  for (int64_t i = 0; i < H; ++i) y[i] = x[i] * r * w[i];
}

}  // namespace

at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps) {
  check_rows(x, "x");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(w.numel() == H && w.scalar_type() == at::kFloat && w.is_contiguous(), "weight: fp32 [H]");
  auto y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) norm_row(xp + t * H, wp, yp + t * H, H, static_cast<float>(eps));
  return y;
}

at::Tensor add_rms_norm_(at::Tensor x, at::Tensor d, at::Tensor w, double eps) {
  check_rows(x, "x");
  check_rows(d, "delta");
  TORCH_CHECK(d.sizes() == x.sizes(), "delta must match x");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(w.numel() == H && w.scalar_type() == at::kFloat && w.is_contiguous(), "weight: fp32 [H]");
  auto y = at::empty_like(x);
  float* xp = x.data_ptr<float>();
  const float *dp = d.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    float* xr = xp + t * H;
    const float* dr = dp + t * H;
    for (int64_t i = 0; i < H; ++i) xr[i] += dr[i];
    norm_row(xr, wp, yp + t * H, H, static_cast<float>(eps));
  }
  return y;
}

void rope_(at::Tensor qkv, at::Tensor cos, at::Tensor sin, int64_t n_heads, int64_t D) {
  check_rows(qkv, "qkv");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  const int64_t T = qkv.size(0), W = qkv.size(1), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && n_heads * D <= W && cos.size(0) == T && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "rope_: qkv [T, >= n*D], cos/sin [T, D]");
  float* p = qkv.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* c = cp + t * D;
    const float* s = sp + t * D;
    for (int64_t h = 0; h < n_heads; ++h) {
      float* x = p + t * W + h * D;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c[i] - x2 * s[i];
        x[i + half] = x2 * c[i + half] + x1 * s[i + half];
      }
    }
  }
}
