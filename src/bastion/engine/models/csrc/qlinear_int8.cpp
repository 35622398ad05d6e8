// Integer-activation paths for q4 weights (VNNI), two precisions:
// - int8 (opt-in: --activations int8), llama.cpp's way: each row of x is quantized per
//   32-block to int8 (scale = absmax / 127), and a 32-group of weight codes (u8, 0..15)
//   meets its x block in one VNNI instruction (vpdpbusd: 64 u8 x s8 products, 4x the
//   MACs of an fp32 FMA), so batch-1 decode is bound by the bytes of W, not arithmetic.
//   Answers differ from fp32 activations by that rounding (docs/BENCHMARKS.md).
// - int16 (the default where VNNI is): x per 32-block to c = round(x * 256 / scale), a
//   16-bit code (|c| <= 32512), split exactly into bytes c = 256 * hi + lo (lo in
//   [-128, 127]); the dot is (dpbusd(W, hi) << 8) + dpbusd(W, lo) in int32: the int8
//   kernel plus one instruction and a shift per 64 weights, with activations 256x finer
//   (measured on SmolLM2: max |logit - fp32's| 0.01, against 2.9 for int8).
//
// Needs AVX512-VNNI + AVX512-BW (compile-time macros, as -march=native sets them) and
// G == 32, K a multiple of 64; q4_linear_i8_supported() says whether this build has it.
// q8 codes (Q8_0, int8 group 32) take the same path (q8_linear_i8) in natural order, made
// unsigned by flipping the sign bit (+128) and corrected by 128 * sum(x codes).
//
// Per pair of 32-groups (A, B) the 32 code bytes unpack to a zmm [A0-15 B0-15 A16-31
// B16-31] (low nibbles, then high ones), so x is quantized into that order; dpbusd's
// int32 lanes 0-3, 8-11 then belong to A and 4-7, 12-15 to B.
// NOTE: ATen headers only, not <torch/extension.h>: its parse alone costs ~17 s a file here;
// the Python bindings live in one file (models/csrc/bindings.cpp)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define BASTION_VNNI 1
#endif

bool q4_linear_i8_supported() {
#ifdef BASTION_VNNI
  return true;
#else
  return false;
#endif
}

#ifdef BASTION_VNNI
namespace {

constexpr int RB = 4;  // rows of x per pass over a weight row
// Software prefetch distance into W's codes (bytes ahead; the scales follow at 1/8 of it for
// q4). Measured on Zen 4 (1.2B Q4_0, every linear of a decode step in order, medians of 3,
// ms): int16 36.3 -> 27.9, int8 31.3 -> 26.5; the hardware prefetcher alone left the code
// loads stalled (perf: ~35% of the kernel's samples on their first use).
constexpr int PF_BYTES = 1024;

// One row of x, quantized and laid out for the kernel (per pair p of 32-groups)
struct QRow {
  std::vector<int8_t> q;      // [K] in pair order (int16 path: the high bytes)
  std::vector<int8_t> lo;     // int16 path only: [K] the low bytes
  std::vector<float> dlane;   // [K/64][16]: the x scale of each dpbusd lane
  std::vector<int32_t> corr;  // [K/64][16]: the lane's code sum * 8 (Q4_0's -8) or * 128 (q8's +128)
  std::vector<float> slane;   // [K/64][16]: x scale * (sum of the lane's 4 codes): the min term
};

inline float tof(float v) { return v; }
inline float tof(at::Half v) { return _cvtsh_ss(v.x); }

// lanes of a dpbusd over 64 bytes -> which of the pair's two 32-groups they sum
inline __m512i lane_groups(bool natural) {
  return natural ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)   // [A0-31 B0-31]
                 : _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);  // [A0-15 B0-15 A16-31 B16-31]
}

// NAT: x in natural order (q8 codes) rather than q4's pair order
template <bool HL, bool NAT>
void quantize_row(const float* x, int64_t K, QRow& r) {
  const int64_t np = K / 64;
  r.q.resize(K), r.dlane.resize(np * 16), r.corr.resize(np * 16), r.slane.resize(np * 16);
  if (HL) r.lo.resize(K);
  const float levels = HL ? 127.0f * 256.0f : 127.0f;
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t p = 0; p < np; ++p) {
    float d[2];
    __m512i qv[4];  // A0-15, A16-31, B0-15, B16-31 as int32
    for (int h = 0; h < 2; ++h) {
      const float* xb = x + p * 64 + h * 32;
      const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
      d[h] = amax / levels;
      const __m512 inv = _mm512_set1_ps(amax > 0.0f ? levels / amax : 0.0f);
      qv[2 * h] = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v0, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      qv[2 * h + 1] = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v1, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    int8_t* q = r.q.data() + p * 64;  // pair order: A0-15, B0-15, A16-31, B16-31 (or natural)
    const int order[4] = {0, NAT ? 1 : 2, NAT ? 2 : 1, 3};
    __m512i sums = _mm512_setzero_si512();
    for (int i = 0; i < 4; ++i) {
      __m512i c = qv[order[i]];
      if (HL) {  // c = 256 * hi + lo, lo in [-128, 127]
        const __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(c, _mm512_set1_epi32(128)), 8);
        const __m512i lo = _mm512_sub_epi32(c, _mm512_slli_epi32(hi, 8));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(r.lo.data() + p * 64 + 16 * i), _mm512_cvtsepi32_epi8(lo));
        c = hi;
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * i), _mm512_cvtsepi32_epi8(c));
    }
    sums = _mm512_dpbusd_epi32(sums, _mm512_set1_epi8(1), _mm512_loadu_si512(q));  // per-lane sums
    if (HL) {
      sums = _mm512_slli_epi32(sums, 8);
      sums = _mm512_dpbusd_epi32(sums, _mm512_set1_epi8(1), _mm512_loadu_si512(r.lo.data() + p * 64));
    }
    const __m512 dl = _mm512_permutexvar_ps(lane_groups(NAT), _mm512_castps128_ps512(_mm_setr_ps(d[0], d[1], 0.0f, 0.0f)));
    _mm512_storeu_ps(r.dlane.data() + p * 16, dl);
    _mm512_storeu_si512(r.corr.data() + p * 16, _mm512_slli_epi32(sums, NAT ? 7 : 3));
    _mm512_storeu_ps(r.slane.data() + p * 16, _mm512_mul_ps(dl, _mm512_cvtepi32_ps(sums)));
  }
}

// two adjacent group values (scale or min) of one weight row, spread over the lanes
template <typename S, bool NAT = false>
inline __m512 pair_lanes(const S* v) {
  __m128 two;
  if constexpr (std::is_same_v<S, float>) {
    two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(v)));
  } else {
    int32_t bits;
    std::memcpy(&bits, v, 4);
    two = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
  }
  return _mm512_permutexvar_ps(lane_groups(NAT), _mm512_castps128_ps512(two));
}

template <int R, bool HL, typename S>
void row_i8(const uint8_t* codes, const S* scale, const S* minv, int64_t K, const QRow* xr, float* y, int64_t ldy) {
  const int64_t np = K / 64;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0f);
  for (int64_t p = 0; p < np; ++p) {
    _mm_prefetch(reinterpret_cast<const char*>(codes + p * 32) + PF_BYTES, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(scale + 2 * p) + PF_BYTES / 8, _MM_HINT_T0);
    if (minv) _mm_prefetch(reinterpret_cast<const char*>(minv + 2 * p) + PF_BYTES / 8, _MM_HINT_T0);
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + p * 32));
    const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low)),
                                         _mm256_and_si256(_mm256_srli_epi16(b, 4), low), 1);
    const __m512 wd = pair_lanes(scale + 2 * p);
    const __m512 wm = minv ? pair_lanes(minv + 2 * p) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), z, _mm512_loadu_si512(xr[r].q.data() + p * 64));
      if (HL) dot = _mm512_dpbusd_epi32(_mm512_slli_epi32(dot, 8), z, _mm512_loadu_si512(xr[r].lo.data() + p * 64));
      if (!minv) dot = _mm512_sub_epi32(dot, _mm512_loadu_si512(xr[r].corr.data() + p * 16));
      const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), wd);
      acc[r] = _mm512_fmadd_ps(t, _mm512_loadu_ps(xr[r].dlane.data() + p * 16), acc[r]);
      if (minv) acc[r] = _mm512_fmadd_ps(wm, _mm512_loadu_ps(xr[r].slane.data() + p * 16), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * ldy] = _mm512_reduce_add_ps(acc[r]);
}

template <bool HL, typename S>
void run_i8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& minv,
            at::Tensor& y) {
  const int64_t N = codes.size(0), K = codes.size(1) * 2, M = x.size(0), ng = K / 32;
  std::vector<QRow> xr(M);
  for (int64_t m = 0; m < M; ++m) quantize_row<HL, false>(x.data_ptr<float>() + m * K, K, xr[m]);
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const S* s = scale.data_ptr<S>();
  const S* mn = minv.numel() ? minv.data_ptr<S>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(16, 64 / M), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* cn = c + n * (K / 2);
      const S* sn = s + n * ng;
      const S* mnn = mn ? mn + n * ng : nullptr;
      int64_t m = 0;
      for (; m + RB <= M; m += RB) row_i8<RB, HL, S>(cn, sn, mnn, K, xr.data() + m, yp + m * N + n, N);
      for (; m < M; ++m) row_i8<1, HL, S>(cn, sn, mnn, K, xr.data() + m, yp + m * N + n, N);
    }
  });
}

// q8 codes (int8, group 32) as u8 by flipping the sign bit (code + 128), undone by corr
template <int R, bool HL, typename S>
void row_q8(const int8_t* codes, const S* scale, int64_t K, const QRow* xr, float* y, int64_t ldy) {
  const int64_t np = K / 64;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t p = 0; p < np; ++p) {
    _mm_prefetch(reinterpret_cast<const char*>(codes + p * 64) + PF_BYTES, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(scale + 2 * p) + PF_BYTES / 16, _MM_HINT_T0);
    const __m512i z = _mm512_xor_si512(_mm512_loadu_si512(codes + p * 64), flip);
    const __m512 wd = pair_lanes<S, true>(scale + 2 * p);
    for (int r = 0; r < R; ++r) {
      __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), z, _mm512_loadu_si512(xr[r].q.data() + p * 64));
      if (HL) dot = _mm512_dpbusd_epi32(_mm512_slli_epi32(dot, 8), z, _mm512_loadu_si512(xr[r].lo.data() + p * 64));
      dot = _mm512_sub_epi32(dot, _mm512_loadu_si512(xr[r].corr.data() + p * 16));
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), wd), _mm512_loadu_ps(xr[r].dlane.data() + p * 16),
                               acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * ldy] = _mm512_reduce_add_ps(acc[r]);
}

template <bool HL, typename S>
void run_q8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, at::Tensor& y) {
  const int64_t N = codes.size(0), K = codes.size(1), M = x.size(0), ng = K / 32;
  std::vector<QRow> xr(M);
  for (int64_t m = 0; m < M; ++m) quantize_row<HL, true>(x.data_ptr<float>() + m * K, K, xr[m]);
  const int8_t* c = codes.data_ptr<int8_t>();
  const S* s = scale.data_ptr<S>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(16, 64 / M), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      int64_t m = 0;
      for (; m + RB <= M; m += RB) row_q8<RB, HL, S>(c + n * K, s + n * ng, K, xr.data() + m, yp + m * N + n, N);
      for (; m < M; ++m) row_q8<1, HL, S>(c + n * K, s + n * ng, K, xr.data() + m, yp + m * N + n, N);
    }
  });
}

}  // namespace
#endif

at::Tensor q8_linear_i8(at::Tensor x, at::Tensor codes, at::Tensor scale, bool int16) {
#ifdef BASTION_VNNI
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous(), "q8 codes: int8 [N, K]");
  const int64_t N = codes.size(0), K = codes.size(1);
  TORCH_CHECK(K % 64 == 0, "the integer q8 path needs K a multiple of 64");
  TORCH_CHECK((scale.scalar_type() == at::kHalf || scale.scalar_type() == at::kFloat) && scale.is_contiguous() &&
              scale.numel() == N * (K / 32), "q8 scale: fp16/fp32 [N, K/32] (group 32)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) == K,
              "x must be a contiguous fp32 [M, K] tensor");
  auto y = at::empty({x.size(0), N}, x.options());
  const bool half = scale.scalar_type() == at::kHalf;
  if (int16) half ? run_q8<true, at::Half>(x, codes, scale, y) : run_q8<true, float>(x, codes, scale, y);
  else half ? run_q8<false, at::Half>(x, codes, scale, y) : run_q8<false, float>(x, codes, scale, y);
  return y;
#else
  TORCH_CHECK(false, "this build has no AVX512-VNNI integer path");
  return x;
#endif
}

at::Tensor q4_linear_i8(at::Tensor x, at::Tensor codes, at::Tensor scale, at::Tensor minv,
                           bool int16) {
#ifdef BASTION_VNNI
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(), "q4 codes: uint8 [N, K/2]");
  const int64_t N = codes.size(0), K = codes.size(1) * 2;
  TORCH_CHECK(K % 64 == 0, "the int8 path needs K a multiple of 64");
  TORCH_CHECK((scale.scalar_type() == at::kHalf || scale.scalar_type() == at::kFloat) && scale.is_contiguous() &&
              scale.numel() == N * (K / 32), "q4 scale: fp16/fp32 [N, K/32] (group 32)");
  TORCH_CHECK(!minv.numel() || (minv.scalar_type() == scale.scalar_type() && minv.is_contiguous() &&
              minv.numel() == scale.numel()), "q4 min: like scale");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) == K,
              "x must be a contiguous fp32 [M, K] tensor");
  auto y = at::empty({x.size(0), N}, x.options());
  const bool half = scale.scalar_type() == at::kHalf;
  if (int16) half ? run_i8<true, at::Half>(x, codes, scale, minv, y) : run_i8<true, float>(x, codes, scale, minv, y);
  else half ? run_i8<false, at::Half>(x, codes, scale, minv, y) : run_i8<false, float>(x, codes, scale, minv, y);
  return y;
#else
  TORCH_CHECK(false, "this build has no AVX512-VNNI int8 path");
  return x;
#endif
}
