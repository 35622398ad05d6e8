// Quantized-weight linear layers for CPU: y = x @ W^T with W kept as 4- or 8-bit codes.
//
// Layouts (see engine/models/qweights.py, which repacks GGUF blocks into them at load):
//   q4: codes  uint8 [N, K/32, 16]: byte j of a 32-group holds element j (low nibble)
//              and element j+16 (high nibble), GGUF's own Q4_0/Q4_1 order;
//       scale  [N, K/G], minv [N, K/G] (empty: symmetric, min = -8 * scale), fp16 or fp32;
//       w[n, k] = scale[n, k/G] * code + min[n, k/G]        (G a multiple of 32)
//   q8: codes  int8 [N, K]; scale fp16/fp32 [N, K/G];  w = scale * code  (G a multiple of 16)
// (fp16 scales where the source's are fp16, so the resident bytes are the file's.)
// x: [M, K] fp32, contiguous rows -> y: [M, N] fp32.
//
// Why dequantize in registers and multiply in fp32 (not int8 activations as llama.cpp):
// the answers then equal an fp32 model on the dequantized weights up to summation order
// (the project's oracle), and batch-1 decode is bound by the bytes of W read per token,
// not by arithmetic. Rows of x are taken MB at a time so each dequantized weight vector
// feeds MB FMAs (batched decode). Compiled with -march=native: the AVX-512 or AVX2 body
// is chosen by the compiler's own macros, with a scalar body for anything else.
// NOTE: ATen headers only, not <torch/extension.h>: its parse alone costs ~17 s a file here;
// the Python bindings live in one file (models/csrc/bindings.cpp)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <string>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int MB = 4;  // rows of x per pass over a weight row

inline float tof(float v) { return v; }
inline float tof(at::Half v) {
#if defined(__F16C__)
  return _cvtsh_ss(v.x);
#else
  return static_cast<float>(v);
#endif
}

template <typename S>
struct Q4 {
  const uint8_t* codes;
  const S* scale;
  const S* minv;  // nullptr: symmetric
  int64_t K, G;
};

template <typename S>
struct Q8 {
  const int8_t* codes;
  const S* scale;
  int64_t K, G;
};

#if defined(__AVX512F__)
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// software prefetch distance into W's codes, as in qlinear_int8.cpp (measured there)
constexpr int PF_BYTES = 1024;

// One weight row n against rows x[0..mb) -> y[r * ldy]
template <int R, typename S>
inline void q4_row(const Q4<S>& w, int64_t n, const float* x, int64_t ldx, float* y, int64_t ldy) {
  const uint8_t* c = w.codes + n * (w.K / 2);
  const S* s = w.scale + n * (w.K / w.G);
  const S* m = w.minv ? w.minv + n * (w.K / w.G) : nullptr;
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  const __m128i low = _mm_set1_epi8(0x0f);
  for (int64_t k = 0; k < w.K; k += 32) {
    const int64_t g = k / w.G;
    _mm_prefetch(reinterpret_cast<const char*>(c + k / 2) + PF_BYTES, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(s + g) + PF_BYTES / 8, _MM_HINT_T0);
    if (m) _mm_prefetch(reinterpret_cast<const char*>(m + g) + PF_BYTES / 8, _MM_HINT_T0);
    const __m512 d = _mm512_set1_ps(tof(s[g]));
    const __m512 mn = _mm512_set1_ps(m ? tof(m[g]) : -8.0f * tof(s[g]));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k / 2));
    const __m128i lo = _mm_and_si128(b, low);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
    const __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), d, mn);
    const __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), d, mn);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + k;
      acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc0[r]);
      acc1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc1[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * ldy] = hsum(_mm512_add_ps(acc0[r], acc1[r]));
}

template <int R, typename S>
inline void q8_row(const Q8<S>& w, int64_t n, const float* x, int64_t ldx, float* y, int64_t ldy) {
  const int8_t* c = w.codes + n * w.K;
  const S* s = w.scale + n * (w.K / w.G);
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < w.K; k += 32) {  // K is a multiple of 32 (checked)
    _mm_prefetch(reinterpret_cast<const char*>(c + k) + PF_BYTES, _MM_HINT_T0);
    const __m512 d0 = _mm512_set1_ps(tof(s[k / w.G]));
    const __m512 d1 = _mm512_set1_ps(tof(s[(k + 16) / w.G]));
    const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k)))), d0);
    const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k + 16)))), d1);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + k;
      acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc0[r]);
      acc1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc1[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * ldy] = hsum(_mm512_add_ps(acc0[r], acc1[r]));
}

#elif defined(__AVX2__)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 u8x8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
inline __m256 i8x8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }

template <int R, typename S>
inline void q4_row(const Q4<S>& w, int64_t n, const float* x, int64_t ldx, float* y, int64_t ldy) {
  const uint8_t* c = w.codes + n * (w.K / 2);
  const S* s = w.scale + n * (w.K / w.G);
  const S* m = w.minv ? w.minv + n * (w.K / w.G) : nullptr;
  __m256 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  const __m128i low = _mm_set1_epi8(0x0f);
  for (int64_t k = 0; k < w.K; k += 32) {
    const int64_t g = k / w.G;
    const __m256 d = _mm256_set1_ps(tof(s[g]));
    const __m256 mn = _mm256_set1_ps(m ? tof(m[g]) : -8.0f * tof(s[g]));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k / 2));
    const __m128i lo = _mm_and_si128(b, low);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
    const __m256 w[4] = {_mm256_fmadd_ps(u8x8(lo), d, mn), _mm256_fmadd_ps(u8x8(_mm_srli_si128(lo, 8)), d, mn),
                         _mm256_fmadd_ps(u8x8(hi), d, mn), _mm256_fmadd_ps(u8x8(_mm_srli_si128(hi, 8)), d, mn)};
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + k;
      acc0[r] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xr), acc0[r]);
      acc1[r] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xr + 8), acc1[r]);
      acc0[r] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xr + 16), acc0[r]);
      acc1[r] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xr + 24), acc1[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * ldy] = hsum(_mm256_add_ps(acc0[r], acc1[r]));
}

template <int R, typename S>
inline void q8_row(const Q8<S>& w, int64_t n, const float* x, int64_t ldx, float* y, int64_t ldy) {
  const int8_t* c = w.codes + n * w.K;
  const S* s = w.scale + n * (w.K / w.G);
  __m256 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < w.K; k += 16) {
    const __m256 d = _mm256_set1_ps(tof(s[k / w.G]));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k));
    const __m256 w0 = _mm256_mul_ps(i8x8(b), d);
    const __m256 w1 = _mm256_mul_ps(i8x8(_mm_srli_si128(b, 8)), d);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + k;
      acc0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc0[r]);
      acc1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc1[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * ldy] = hsum(_mm256_add_ps(acc0[r], acc1[r]));
}

#else
template <int R, typename S>
inline void q4_row(const Q4<S>& w, int64_t n, const float* x, int64_t ldx, float* y, int64_t ldy) {
  const uint8_t* c = w.codes + n * (w.K / 2);
  const S* s = w.scale + n * (w.K / w.G);
  const S* m = w.minv ? w.minv + n * (w.K / w.G) : nullptr;
  float acc[R] = {};
  for (int64_t k = 0; k < w.K; k += 32) {
    const int64_t g = k / w.G;
    const float d = tof(s[g]), mn = m ? tof(m[g]) : -8.0f * tof(s[g]);
    for (int j = 0; j < 16; ++j) {
      const float w0 = d * (c[k / 2 + j] & 0x0f) + mn, w1 = d * (c[k / 2 + j] >> 4) + mn;
      for (int r = 0; r < R; ++r) acc[r] += w0 * x[r * ldx + k + j] + w1 * x[r * ldx + k + j + 16];
    }
  }
  for (int r = 0; r < R; ++r) y[r * ldy] = acc[r];
}

template <int R, typename S>
inline void q8_row(const Q8<S>& w, int64_t n, const float* x, int64_t ldx, float* y, int64_t ldy) {
  const int8_t* c = w.codes + n * w.K;
  const S* s = w.scale + n * (w.K / w.G);
  float acc[R] = {};
  for (int64_t k = 0; k < w.K; ++k) {
    const float wk = tof(s[k / w.G]) * c[k];
    for (int r = 0; r < R; ++r) acc[r] += wk * x[r * ldx + k];
  }
  for (int r = 0; r < R; ++r) y[r * ldy] = acc[r];
}
#endif

#if defined(__AVX512F__)
// Batch-1 decode: one row of x against NW weight rows at once -- NW independent streams
// of codes in flight (more memory-level parallelism than one row at a time). (Factoring
// the min term out of the loop, sum_g m_g * sum(x_g), measured slower: 7.4 vs 8.8 GB/s.)
template <int NW, typename S>
inline void q4_rows_x1(const Q4<S>& w, int64_t n, const float* x, float* y) {
  const int64_t ng = w.K / w.G;
  __m512 acc[NW][2];
  for (int j = 0; j < NW; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
  const __m128i low = _mm_set1_epi8(0x0f);
  for (int64_t k = 0; k < w.K; k += 32) {
    const int64_t g = k / w.G;
    const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
    for (int j = 0; j < NW; ++j) {
      const int64_t r = n + j;
      const float d = tof(w.scale[r * ng + g]);
      const __m512 vd = _mm512_set1_ps(d);
      const __m512 vm = _mm512_set1_ps(w.minv ? tof(w.minv[r * ng + g]) : -8.0f * d);
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.codes + r * (w.K / 2) + k / 2));
      const __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, low))), vd, vm);
      const __m512 w1 = _mm512_fmadd_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low))), vd, vm);
      acc[j][0] = _mm512_fmadd_ps(w0, x0, acc[j][0]);
      acc[j][1] = _mm512_fmadd_ps(w1, x1, acc[j][1]);
    }
  }
  for (int j = 0; j < NW; ++j) y[n + j] = hsum(_mm512_add_ps(acc[j][0], acc[j][1]));
}

template <int NW, typename S>
inline void q8_rows_x1(const Q8<S>& w, int64_t n, const float* x, float* y) {
  const int64_t ng = w.K / w.G;
  __m512 acc[NW][2];
  for (int j = 0; j < NW; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < w.K; k += 32) {
    const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
    for (int j = 0; j < NW; ++j) {
      const int64_t r = n + j;
      const int8_t* c = w.codes + r * w.K + k;
      const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(c)))), _mm512_set1_ps(tof(w.scale[r * ng + k / w.G])));
      const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16)))), _mm512_set1_ps(tof(w.scale[r * ng + (k + 16) / w.G])));
      acc[j][0] = _mm512_fmadd_ps(w0, x0, acc[j][0]);
      acc[j][1] = _mm512_fmadd_ps(w1, x1, acc[j][1]);
    }
  }
  for (int j = 0; j < NW; ++j) y[n + j] = hsum(_mm512_add_ps(acc[j][0], acc[j][1]));
}
#endif
constexpr int NW = 4;  // weight rows per pass at batch 1 (AVX-512 body)
constexpr int64_t NW_GRAIN = 16;  // rows per parallel chunk at least (a multiple of NW)

// y[m, n] for all m, n in [n0, n1): each weight row is read once per MB rows of x (and
// once for the 1-3 rows left over: Row1/Row2/Row3)
template <typename W, void (*Row1)(const W&, int64_t, const float*, int64_t, float*, int64_t),
          void (*Row2)(const W&, int64_t, const float*, int64_t, float*, int64_t),
          void (*Row3)(const W&, int64_t, const float*, int64_t, float*, int64_t),
          void (*RowMB)(const W&, int64_t, const float*, int64_t, float*, int64_t),
          void (*RowsX1)(const W&, int64_t, const float*, float*)>
void rows(const W& w, const float* x, int64_t M, float* y, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (M == 1 && RowsX1 != nullptr) {
#if defined(__AVX512F__)
    for (; n + NW <= n1; n += NW) RowsX1(w, n, x, y);
#endif
  }
  for (; n < n1; ++n) {
    int64_t m = 0;
    for (; m + MB <= M; m += MB) RowMB(w, n, x + m * w.K, w.K, y + m * N + n, N);
    static_assert(MB == 4, "the tail below takes 1-3 rows");
    const int64_t tail = M - m;
    if (tail == 3) Row3(w, n, x + m * w.K, w.K, y + m * N + n, N);
    else if (tail == 2) Row2(w, n, x + m * w.K, w.K, y + m * N + n, N);
    else if (tail == 1) Row1(w, n, x + m * w.K, w.K, y + m * N + n, N);
  }
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous fp32 [M, K] tensor");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " features, the weight ", K);
}

void check_scale(const at::Tensor& t, int64_t numel, const char* what) {
  TORCH_CHECK((t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf) && t.is_contiguous() &&
              t.numel() == numel, what, ": contiguous fp16/fp32 [N, K/G]");
}

int64_t grain(int64_t M) { return std::max<int64_t>(NW_GRAIN, 64 / std::max<int64_t>(1, M)); }

template <typename S>
void q4_run(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& minv,
            int64_t K, int64_t G, at::Tensor& y) {
  const int64_t N = codes.size(0), M = x.size(0);
  const Q4<S> w{codes.data_ptr<uint8_t>(), scale.data_ptr<S>(), minv.numel() ? minv.data_ptr<S>() : nullptr, K, G};
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#if defined(__AVX512F__)
  constexpr auto x1 = &q4_rows_x1<NW, S>;
#else
  constexpr void (*x1)(const Q4<S>&, int64_t, const float*, float*) = nullptr;
#endif
  at::parallel_for(0, N, grain(M), [&](int64_t n0, int64_t n1) {
    rows<Q4<S>, q4_row<1, S>, q4_row<2, S>, q4_row<3, S>, q4_row<MB, S>, x1>(w, xp, M, yp, N, n0, n1);
  });
}

template <typename S>
void q8_run(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, int64_t K, int64_t G,
            at::Tensor& y) {
  const int64_t N = codes.size(0), M = x.size(0);
  const Q8<S> w{codes.data_ptr<int8_t>(), scale.data_ptr<S>(), K, G};
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#if defined(__AVX512F__)
  constexpr auto x1 = &q8_rows_x1<NW, S>;
#else
  constexpr void (*x1)(const Q8<S>&, int64_t, const float*, float*) = nullptr;
#endif
  at::parallel_for(0, N, grain(M), [&](int64_t n0, int64_t n1) {
    rows<Q8<S>, q8_row<1, S>, q8_row<2, S>, q8_row<3, S>, q8_row<MB, S>, x1>(w, xp, M, yp, N, n0, n1);
  });
}

}  // namespace

at::Tensor q4_linear(at::Tensor x, at::Tensor codes, at::Tensor scale, at::Tensor minv, int64_t G) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(), "q4 codes: uint8 [N, K/2]");
  const int64_t N = codes.size(0), K = codes.size(1) * 2;
  TORCH_CHECK(G % 32 == 0 && K % G == 0, "q4 group size must be a multiple of 32 dividing K");
  check_scale(scale, N * (K / G), "q4 scale");
  if (minv.numel()) {
    check_scale(minv, N * (K / G), "q4 min");
    TORCH_CHECK(minv.scalar_type() == scale.scalar_type(), "q4 min and scale must share a dtype");
  }
  check_x(x, K);
  auto y = at::empty({x.size(0), N}, x.options());
  if (scale.scalar_type() == at::kHalf) q4_run<at::Half>(x, codes, scale, minv, K, G, y);
  else q4_run<float>(x, codes, scale, minv, K, G, y);
  return y;
}

at::Tensor q8_linear(at::Tensor x, at::Tensor codes, at::Tensor scale, int64_t G) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous(), "q8 codes: int8 [N, K]");
  const int64_t N = codes.size(0), K = codes.size(1);
  TORCH_CHECK(G % 16 == 0 && K % G == 0 && K % 32 == 0, "q8 group size must be a multiple of 16 dividing K (K a multiple of 32)");
  check_scale(scale, N * (K / G), "q8 scale");
  check_x(x, K);
  auto y = at::empty({x.size(0), N}, x.options());
  if (scale.scalar_type() == at::kHalf) q8_run<at::Half>(x, codes, scale, K, G, y);
  else q8_run<float>(x, codes, scale, K, G, y);
  return y;
}

// Dequantized fp32 rows [N, K] (the prefill GEMM's tiles): the same values as
// QuantWeight.dequantize (every product code * scale is exact in fp32, so FMA or not
// rounds once, at the add), ~10x faster than its torch ops, which pass over memory ~6 times.
at::Tensor q4_dequant(at::Tensor codes, at::Tensor scale, at::Tensor minv, int64_t G) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(), "q4 codes: uint8 [N, K/2]");
  const int64_t N = codes.size(0), K = codes.size(1) * 2, ng = K / G;
  TORCH_CHECK(G % 32 == 0 && K % G == 0, "q4 group size must be a multiple of 32 dividing K");
  check_scale(scale, N * ng, "q4 scale");
  if (minv.numel()) {
    check_scale(minv, N * ng, "q4 min");
    TORCH_CHECK(minv.scalar_type() == scale.scalar_type(), "q4 min and scale must share a dtype");
  }
  auto out = at::empty({N, K}, at::kFloat);
  const at::Tensor sf = scale.to(at::kFloat).contiguous();
  const at::Tensor mf = minv.numel() ? minv.to(at::kFloat).contiguous() : sf.mul(-8.0).contiguous();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float *sp = sf.data_ptr<float>(), *mp = mf.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t b = 0; b < K / 32; ++b) {
        const uint8_t* cb = c + n * (K / 2) + b * 16;
        const float d = sp[n * ng + b * 32 / G], m = mp[n * ng + b * 32 / G];
        float* ob = o + n * K + b * 32;
#if defined(__AVX512F__)
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cb)), low = _mm_set1_epi8(0x0f);
        const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
        _mm512_storeu_ps(ob, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, low))), vd, vm));
        _mm512_storeu_ps(ob + 16, _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low))), vd, vm));
#else
        for (int j = 0; j < 16; ++j) {
          ob[j] = static_cast<float>(cb[j] & 0x0f) * d + m;
          ob[j + 16] = static_cast<float>(cb[j] >> 4) * d + m;
        }
#endif
      }
    }
  });
  return out;
}

at::Tensor q8_dequant(at::Tensor codes, at::Tensor scale, int64_t G) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous(), "q8 codes: int8 [N, K]");
  const int64_t N = codes.size(0), K = codes.size(1), ng = K / G;
  TORCH_CHECK(G % 16 == 0 && K % G == 0, "q8 group size must be a multiple of 16 dividing K");
  check_scale(scale, N * ng, "q8 scale");
  auto out = at::empty({N, K}, at::kFloat);
  const at::Tensor sf = scale.to(at::kFloat).contiguous();
  const int8_t* c = codes.data_ptr<int8_t>();
  const float* sp = sf.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < ng; ++g) {
        const float d = sp[n * ng + g];
        for (int64_t j = 0; j < G; ++j) o[n * K + g * G + j] = static_cast<float>(c[n * K + g * G + j]) * d;
      }
  });
  return out;
}

std::string isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}
