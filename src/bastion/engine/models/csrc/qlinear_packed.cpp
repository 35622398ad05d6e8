// q4 weights (group 32) repacked once at load into tiles of 16 interleaved rows, for the
// VNNI kernel of every decode batch (llama.cpp repacks Q4_0 into interleaved rows the same way).
//
// Layout: P uint8 [N/16, K/32, REC], one record per (tile of 16 rows, 32-group):
//   bytes [0, 256): four 64-byte chunks; in chunk i, bytes 4j..4j+3 are row j's group bytes
//     4i..4i+3 (byte e = element e | element e+16 << 4, GGUF's order), so the low nibbles of
//     chunk i are elements 4i..4i+3 of all 16 rows and the high nibbles elements 16+4i..+3;
//   then the 16 rows' scales (fp16 or fp32), then their mins (only where the weight has them).
// One record is one dpbusd per (chunk, nibble): lane j sums row j's 4 products with 4 bytes
// of x broadcast, so the 16 rows' sums land in the 16 lanes: no horizontal reduction, x read
// once per 16 rows, one scale conversion per 16 rows, and W read as one stream. The old
// per-row kernel (qlinear_int8.cpp) spent ~16 instructions per 64 weights; this one ~5.
// Activations are quantized per 32-block as there: int16 (two bytes: hi, lo) or int8.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define BASTION_VNNI 1
#endif

namespace {

constexpr int64_t TR = 16;   // rows per tile
constexpr int64_t CB = 256;  // code bytes per record
constexpr int64_t PF_RECORDS = 4;  // software prefetch distance, in records (~1.2 KB, as the per-row kernel's)

int64_t record_bytes(bool has_min, bool f32) { return CB + TR * (f32 ? 4 : 2) * (has_min ? 2 : 1); }

void check_packed(const at::Tensor& P, bool has_min, bool f32) {
  TORCH_CHECK(P.dim() == 3 && P.scalar_type() == at::kByte && P.is_contiguous() &&
              P.size(2) == record_bytes(has_min, f32), "packed q4: uint8 [N/16, K/32, record] for these flags");
}

}  // namespace

at::Tensor q4p_pack(at::Tensor codes, at::Tensor scale, at::Tensor minv) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(), "q4 codes: uint8 [N, K/2]");
  const int64_t N = codes.size(0), K = codes.size(1) * 2, nb = K / 32;
  TORCH_CHECK(N % TR == 0 && K % 32 == 0, "packing needs N a multiple of 16 and K of 32");
  const bool f32 = scale.scalar_type() == at::kFloat, has_min = minv.numel() > 0;
  TORCH_CHECK((f32 || scale.scalar_type() == at::kHalf) && scale.is_contiguous() && scale.numel() == N * nb,
              "q4 scale: fp16/fp32 [N, K/32] (group 32)");
  TORCH_CHECK(!has_min || (minv.scalar_type() == scale.scalar_type() && minv.is_contiguous() &&
              minv.numel() == scale.numel()), "q4 min: like scale");
  const int64_t ss = f32 ? 4 : 2, REC = record_bytes(has_min, f32);
  auto P = at::empty({N / TR, nb, REC}, codes.options());
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const auto* s = static_cast<const uint8_t*>(scale.data_ptr());
  const auto* m = has_min ? static_cast<const uint8_t*>(minv.data_ptr()) : nullptr;
  uint8_t* out = P.data_ptr<uint8_t>();
  at::parallel_for(0, N / TR, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* r = out + (t * nb + b) * REC;
        for (int64_t j = 0; j < TR; ++j) {
          const int64_t n = t * TR + j;
          for (int i = 0; i < 4; ++i) std::memcpy(r + 64 * i + 4 * j, c + n * (K / 2) + b * 16 + 4 * i, 4);
          std::memcpy(r + CB + j * ss, s + (n * nb + b) * ss, ss);
          if (m) std::memcpy(r + CB + TR * ss + j * ss, m + (n * nb + b) * ss, ss);
        }
      }
  });
  return P;
}

// fp32 rows [(t1 - t0) * 16, K] of tiles [t0, t1) (the prefill GEMM's tiles); the values of
// QuantWeight.dequantize (each product code * scale is exact in fp32).
at::Tensor q4p_dequant(at::Tensor P, int64_t t0, int64_t t1, bool has_min, bool f32) {
  check_packed(P, has_min, f32);
  TORCH_CHECK(0 <= t0 && t0 <= t1 && t1 <= P.size(0), "q4p_dequant: bad tile range");
  const int64_t nb = P.size(1), REC = P.size(2), K = nb * 32;
  auto out = at::empty({(t1 - t0) * TR, K}, at::kFloat);
  const uint8_t* p = P.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  auto value = [&](const uint8_t* v, int64_t j) {
    if (f32) {
      float x;
      std::memcpy(&x, v + 4 * j, 4);
      return x;
    }
    at::Half h;
    std::memcpy(&h, v + 2 * j, 2);
    return static_cast<float>(h);
  };
  at::parallel_for(t0, t1, 1, [&](int64_t a, int64_t e) {
    for (int64_t t = a; t < e; ++t)
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* r = p + (t * nb + b) * REC;
        for (int64_t j = 0; j < TR; ++j) {
          const float d = value(r + CB, j), mn = has_min ? value(r + CB + TR * (f32 ? 4 : 2), j) : -8.0f * d;
          float* row = o + ((t - t0) * TR + j) * K + b * 32;
          for (int i = 0; i < 4; ++i)
            for (int u = 0; u < 4; ++u) {
              const uint8_t byte = r[64 * i + 4 * j + u];
              row[4 * i + u] = static_cast<float>(byte & 0x0f) * d + mn;
              row[16 + 4 * i + u] = static_cast<float>(byte >> 4) * d + mn;
            }
        }
      }
  });
  return out;
}

#ifdef BASTION_VNNI
namespace {

// One row of x quantized per 32-block, natural order
struct XRow {
  std::vector<int8_t> hi, lo;  // [K]: int8 codes, or the int16 codes' high / low bytes
  std::vector<float> d;        // [K/32] the block's scale
  std::vector<int32_t> corr;   // [K/32] 8 * the block's code sum (Q4_0's implicit -8)
  std::vector<float> s;        // [K/32] scale * code sum (the mins' term)
};

template <bool HL>
void quantize(const float* x, int64_t K, XRow& r) {
  const int64_t nb = K / 32;
  r.hi.resize(K), r.d.resize(nb), r.corr.resize(nb), r.s.resize(nb);
  if (HL) r.lo.resize(K);
  const float levels = HL ? 127.0f * 256.0f : 127.0f;
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? levels / amax : 0.0f);
    __m512i c[2] = {_mm512_cvt_roundps_epi32(_mm512_mul_ps(v0, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                    _mm512_cvt_roundps_epi32(_mm512_mul_ps(v1, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(c[0], c[1]));
    for (int h = 0; h < 2; ++h) {
      __m512i q = c[h];
      if (HL) {  // c = 256 * hi + lo, lo in [-128, 127]
        const __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(128)), 8);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(r.lo.data() + 32 * b + 16 * h),
                         _mm512_cvtsepi32_epi8(_mm512_sub_epi32(q, _mm512_slli_epi32(hi, 8))));
        q = hi;
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(r.hi.data() + 32 * b + 16 * h), _mm512_cvtsepi32_epi8(q));
    }
    r.d[b] = amax / levels;
    r.corr[b] = 8 * sum;
    r.s[b] = r.d[b] * static_cast<float>(sum);
  }
}

// sum over one record of the 16 rows' code . x bytes (8 dpbusd; two chains for latency)
// NOTE: x's 4-byte groups are read as broadcast memory operands (vpdpbusd m32{1to16}): the
// load unit does the broadcast. Read through a GPR (memcpy) they cost a vpbroadcastd each on
// the vector pipes the dot products need (measured, 1 thread, Zen 4, [11264, 2048] Q4_0, 256
// rows: int16 57 -> 93 GMAC/s, int8 106 -> 164).
typedef int32_t __attribute__((may_alias, aligned(1))) i32u;
inline __m512i dot16(const __m512i* w, const int8_t* xb) {
  const i32u* xi = reinterpret_cast<const i32u*>(xb);
  __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
  for (int i = 0; i < 4; ++i) {
    a = _mm512_dpbusd_epi32(a, w[i], _mm512_set1_epi32(xi[i]));          // elements 4i..4i+3
    b = _mm512_dpbusd_epi32(b, w[4 + i], _mm512_set1_epi32(xi[4 + i]));  // elements 16+4i..
  }
  return _mm512_add_epi32(a, b);
}

// y[r][0..16) for R rows of x over one tile
template <int R, bool HL, bool MIN, bool F32>
void tile(const uint8_t* P, int64_t nb, int64_t REC, const XRow* xr, float* y, int64_t ldy) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0f);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* rec = P + b * REC;
    for (int64_t l = 0; l < REC; l += 64) _mm_prefetch(reinterpret_cast<const char*>(rec + PF_RECORDS * REC + l), _MM_HINT_T0);
    __m512i w[8];
    for (int i = 0; i < 4; ++i) {
      const __m512i v = _mm512_loadu_si512(rec + 64 * i);
      w[i] = _mm512_and_si512(v, low);
      w[4 + i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
    const __m512 ws = F32 ? _mm512_loadu_ps(rec + CB)
                          : _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + CB)));
    __m512 wm = _mm512_setzero_ps();
    if (MIN) wm = F32 ? _mm512_loadu_ps(rec + CB + 64)
                      : _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + CB + 32)));
    for (int r = 0; r < R; ++r) {
      __m512i dot = dot16(w, xr[r].hi.data() + 32 * b);
      if (HL) dot = _mm512_add_epi32(_mm512_slli_epi32(dot, 8), dot16(w, xr[r].lo.data() + 32 * b));
      if (!MIN) dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(xr[r].corr[b]));
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), ws), _mm512_set1_ps(xr[r].d[b]), acc[r]);
      if (MIN) acc[r] = _mm512_fmadd_ps(wm, _mm512_set1_ps(xr[r].s[b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * ldy, acc[r]);
}

template <bool HL, bool MIN, bool F32>
void run(const at::Tensor& x, const at::Tensor& P, at::Tensor& y) {
  const int64_t M = x.size(0), T = P.size(0), nb = P.size(1), REC = P.size(2), K = nb * 32, N = T * TR;
  std::vector<XRow> xr(M);
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize<HL>(x.data_ptr<float>() + m * K, K, xr[m]);
  });
  const uint8_t* p = P.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* pt = p + t * nb * REC;
      float* yt = yp + t * TR;
      int64_t m = 0;
      // 8 rows per pass where there are 8: each record unpacked once for all (8 rows int16:
      // 2.3 -> 1.9 ms); the r loop stays rolled (unrolled, its accumulators spill)
      for (; m + 8 <= M; m += 8) tile<8, HL, MIN, F32>(pt, nb, REC, xr.data() + m, yt + m * N, N);
      for (; m + 4 <= M; m += 4) tile<4, HL, MIN, F32>(pt, nb, REC, xr.data() + m, yt + m * N, N);
      switch (M - m) {
        case 3: tile<3, HL, MIN, F32>(pt, nb, REC, xr.data() + m, yt + m * N, N); break;
        case 2: tile<2, HL, MIN, F32>(pt, nb, REC, xr.data() + m, yt + m * N, N); break;
        case 1: tile<1, HL, MIN, F32>(pt, nb, REC, xr.data() + m, yt + m * N, N); break;
        default: break;
      }
    }
  });
}

}  // namespace
#endif

// y = x @ W^T for W packed by q4p_pack; x fp32 [M, K] quantized per 32-block to int16 (two
// bytes) or int8 codes, as q4_linear_i8's
at::Tensor q4p_linear(at::Tensor x, at::Tensor P, bool has_min, bool f32, bool int16) {
#ifdef BASTION_VNNI
  check_packed(P, has_min, f32);
  const int64_t K = P.size(1) * 32;
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) == K,
              "x must be a contiguous fp32 [M, K] tensor");
  auto y = at::empty({x.size(0), P.size(0) * TR}, x.options());
  const int which = (int16 ? 4 : 0) + (has_min ? 2 : 0) + (f32 ? 1 : 0);
  switch (which) {
    case 0: run<false, false, false>(x, P, y); break;
    case 1: run<false, false, true>(x, P, y); break;
    case 2: run<false, true, false>(x, P, y); break;
    case 3: run<false, true, true>(x, P, y); break;
    case 4: run<true, false, false>(x, P, y); break;
    case 5: run<true, false, true>(x, P, y); break;
    case 6: run<true, true, false>(x, P, y); break;
    default: run<true, true, true>(x, P, y); break;
  }
  return y;
#else
  TORCH_CHECK(false, "this build has no AVX512-VNNI path for packed q4 weights");
  return x;
#endif
}
