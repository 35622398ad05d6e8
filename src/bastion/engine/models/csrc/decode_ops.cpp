// Fused fp32 ops of a decoder layer (engine/models/layer_ops.py says when they are used):
// each replaces a handful of torch ops whose per-op dispatch, not arithmetic, dominates a
// decode step of a small model (SmolLM2 at batch 1: ~5000 aten calls per step, 30 layers).
//
//   rms_norm(x, w, eps)             -> x / rms(x) * w                          x: [T, H]
//   add_rms_norm_(x, d, w, eps)     -> x += d (in place), returns norm(x)      (residual + norm)
//   rope_(qkv, cos, sin, n, D)      -> rotates heads 0..n-1 of qkv in place    qkv: [T, *, D]
//                                      (HF rotate-half: x*cos + [-x2, x1]*sin; cos/sin: [T, D])
//   silu_mul(gu)                    -> silu(gu[:, :I]) * gu[:, I:]             gu: [T, 2I] -> [T, I]
// Loops are written for the compiler's vectoriser (-O3 -march=native), no intrinsics, except
// silu_mul's exp under AVX-512 (the compiler calls scalar expf without -ffast-math).
// NOTE: ATen headers only, not <torch/extension.h>: its parse alone costs ~17 s a file here;
// the Python bindings live in one file (models/csrc/bindings.cpp)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>

#include <cmath>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

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

namespace {

#ifdef __AVX512F__
// exp(x) for 16 lanes: x = n ln2 + r (n integer, |r| <= ln2/2), e^r by its degree-6 Taylor
// polynomial (relative error < 2e-7 on that range), times 2^n by vscalefps (which gives inf /
// 0 past the float range itself)
inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 split hi + lo:
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);  // r exact to ~1 ulp
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

void silu_mul_row(const float* g, const float* u, float* y, int64_t I) {
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 lo = _mm512_set1_ps(-87.0f);  // keeps exp(-g) finite; silu is -0 there anyway
  for (; i + 16 <= I; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i);
    const __m512 e = exp16(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv), lo));
    const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
    _mm512_storeu_ps(y + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
  }
#endif
  for (; i < I; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace

at::Tensor silu_mul(at::Tensor gu) {
  check_rows(gu, "gate_up");
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  TORCH_CHECK(gu.size(1) % 2 == 0, "silu_mul: gate_up [T, 2I]");
  auto y = at::empty({T, I}, gu.options());
  const float* p = gu.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // rows split across threads only where there is work for both (a decode row is ~10 us)
  at::parallel_for(0, T, T * I >= (1 << 16) ? 1 : T, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) silu_mul_row(p + t * 2 * I, p + t * 2 * I + I, yp + t * I, I);
  });
  return y;
}
