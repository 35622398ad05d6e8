// Fused CPU decode attention over a KIVI-quantized paged prefix plus a full-precision
// window (the same math as quant_attention._attend for M <= G query rows per kv head).
//
// Why native: in torch ops the codes must be unpacked to an fp32 tile, scaled, multiplied
// and reduced in separate passes over memory; here each token's codes are unpacked into
// registers-sized scratch and consumed at once (one pass over the packed bytes), and the
// work is split over (sequence, kv head, context split) so one sequence uses every core.
//
// Math (quant.py layouts; H kv heads, D head dim, G tokens per block, Gv value channels):
//   key  t of block j: k_td = s_jd c_td + z_jd  ->  q.k_t = sum_d (q_d s_jd) c_td + q.z_j
//   value t:           v_td = s_te c_td + z_te  ->  sum_t p_t v_td = sum_t (p_t s_te) c_td + p_t z_te
// Softmax is split-K (flash-decoding): each split keeps its own max, sum and accumulator,
// merged at the end; masked tokens get weight exactly 0.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// Planar order: with PER = 8/bits codes per byte, channel d = PER*i + j is stored at
// plane position j*(D/PER) + i. Unpacking a row into planes is one contiguous shift-and-mask
// loop per bit position (vectorises); queries and value accumulators are kept in the same
// order so dot products and axpys need no interleaving. Bits and D are template constants
// so every inner loop has a fixed trip count (measured ~2x faster than runtime counts).
template <int BITS, int D>
inline void unpack_planar(const uint8_t* __restrict src, float* __restrict c) {
  constexpr int PER = 8 / BITS, MASK = (1 << BITS) - 1, NB = D / PER;
  for (int j = 0; j < PER; ++j)
    for (int i = 0; i < NB; ++i) c[j * NB + i] = static_cast<float>((src[i] >> (j * BITS)) & MASK);
}

template <int BITS, int D>
constexpr int planar(int d) {
  return (d % (8 / BITS)) * (D / (8 / BITS)) + d / (8 / BITS);
}

struct Args {
  int64_t B, H, M, G, Gv, n, w, splits;
  const float* q;        // [B, H, M, D]
  const uint8_t* kc;     // [N, G, H, D*kb/8]
  const at::Half* ks;    // [N, H, D]
  const at::Half* kz;
  const uint8_t* vc;     // [N, G, H, D*vb/8]
  const at::Half* vs;    // [N, G, H, D/Gv]
  const at::Half* vz;
  const int64_t* table;  // [B, n]
  const bool* bmask;     // [B, n]
  const float* kf;       // [B, w, H, D]
  const float* vf;
  const bool* wmask;     // [B, w]
  float* part_m;         // [B, H, S, M] running max
  float* part_l;         // [B, H, S, M] running sum
  float* part_acc;       // [B, H, S, M, D]
};

inline float h2f(at::Half x) {
#ifdef __F16C__
  return _cvtsh_ss(x.x);
#else
  return static_cast<float>(x);
#endif
}

template <int N>
inline float dot(const float* __restrict x, const float* __restrict y) {
  float r = 0.f;
  for (int i = 0; i < N; ++i) r += x[i] * y[i];
  return r;
}

// One (sequence b, kv head h, split s): blocks [j0, j1) and, for the last split, the window.
template <int KB, int VB, int D>
void run_split(const Args& a, int64_t b, int64_t h, int64_t s, int64_t j0, int64_t j1, bool window) {
  constexpr int DPK = D * KB / 8, DPV = D * VB / 8, VPER = 8 / VB, NBV = D / VPER;
  const int64_t M = a.M, G = a.G, H = a.H, Gv = a.Gv, ng = D / Gv;
  const int64_t nq_tok = (j1 - j0) * G, nw = window ? a.w : 0, T = nq_tok + nw;
  const int64_t gvp = Gv / VPER;  // a value group = gvp consecutive entries of each plane
  const float* q = a.q + ((b * H + h) * M) * D;  // [M, D]
  std::vector<float> sc(M * std::max<int64_t>(T, 1));  // scores, then weights [M, T]
  std::vector<float> qp(M * D), qs(M * D), zq(M), acc(M * D, 0.f), accw(M * D, 0.f);
  alignas(64) float c[D], ksd[D], kzd[D], sv[NBV], zv[NBV], vh[D];
  for (int64_t m = 0; m < M; ++m)
    for (int d = 0; d < D; ++d) qp[m * D + planar<KB, D>(d)] = q[m * D + d];  // keys' planar order
  const float NEG = -std::numeric_limits<float>::infinity();
  // ---- scores: scale folded into q once per block, the minimum as one dot per block
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t tt0 = (j - j0) * G;
    if (!a.bmask[b * a.n + j]) {
      for (int64_t m = 0; m < M; ++m) std::fill_n(&sc[m * T + tt0], G, NEG);
      continue;
    }
    const int64_t blk = a.table[b * a.n + j];
    const at::Half* s_ = a.ks + (blk * H + h) * D;
    const at::Half* z_ = a.kz + (blk * H + h) * D;
    for (int d = 0; d < D; ++d) {
      ksd[planar<KB, D>(d)] = h2f(s_[d]);
      kzd[planar<KB, D>(d)] = h2f(z_[d]);
    }
    for (int64_t m = 0; m < M; ++m) {
      for (int d = 0; d < D; ++d) qs[m * D + d] = qp[m * D + d] * ksd[d];
      zq[m] = dot<D>(&qp[m * D], kzd);
    }
    for (int64_t t = 0; t < G; ++t) {
      unpack_planar<KB, D>(a.kc + ((blk * G + t) * H + h) * DPK, c);
      for (int64_t m = 0; m < M; ++m) sc[m * T + tt0 + t] = dot<D>(&qs[m * D], c) + zq[m];
    }
  }
  for (int64_t t = 0; t < nw; ++t) {
    const bool ok = a.wmask[b * a.w + t];
    const float* k = a.kf + ((b * a.w + t) * H + h) * D;
    for (int64_t m = 0; m < M; ++m) sc[m * T + nq_tok + t] = ok ? dot<D>(&q[m * D], k) : NEG;
  }
  // ---- local softmax (unnormalised): p = exp(s - max)
  float* pm = a.part_m + ((b * H + h) * a.splits + s) * M;
  float* pl = a.part_l + ((b * H + h) * a.splits + s) * M;
  for (int64_t m = 0; m < M; ++m) {
    float* row = &sc[m * T];
    float mx = NEG;
    for (int64_t t = 0; t < T; ++t) mx = std::max(mx, row[t]);
    float l = 0.f;
    if (mx != NEG) {
      for (int64_t t = 0; t < T; ++t) {
        row[t] = std::exp(row[t] - mx);  // exp(-inf) = 0 for masked tokens
        l += row[t];
      }
    } else {
      std::fill_n(row, T, 0.f);
    }
    pm[m] = mx;
    pl[m] = l;
  }
  // ---- values: each token's row dequantized once in planar order (v = s_e c + z_e,
  // scales broadcast over their group), then one axpy per query row
  for (int64_t j = j0; j < j1; ++j) {
    if (!a.bmask[b * a.n + j]) continue;
    const int64_t blk = a.table[b * a.n + j], tt0 = (j - j0) * G;
    for (int64_t t = 0; t < G; ++t) {
      const int64_t row = (blk * G + t) * H + h;
      unpack_planar<VB, D>(a.vc + row * DPV, c);
      const at::Half* s_ = a.vs + row * ng;
      const at::Half* z_ = a.vz + row * ng;
      for (int64_t e = 0; e < ng; ++e) {
        const float se = h2f(s_[e]), ze = h2f(z_[e]);
        std::fill_n(sv + e * gvp, gvp, se);
        std::fill_n(zv + e * gvp, gvp, ze);
      }
      for (int pj = 0; pj < VPER; ++pj)
        for (int i = 0; i < NBV; ++i) vh[pj * NBV + i] = sv[i] * c[pj * NBV + i] + zv[i];
      for (int64_t m = 0; m < M; ++m) {
        const float p = sc[m * T + tt0 + t];
        float* __restrict am = &acc[m * D];
        for (int d = 0; d < D; ++d) am[d] += p * vh[d];
      }
    }
  }
  for (int64_t t = 0; t < nw; ++t) {
    const float* v = a.vf + ((b * a.w + t) * H + h) * D;
    for (int64_t m = 0; m < M; ++m) {
      const float p = sc[m * T + nq_tok + t];
      float* __restrict am = &accw[m * D];
      for (int d = 0; d < D; ++d) am[d] += p * v[d];
    }
  }
  float* out = a.part_acc + (((b * H + h) * a.splits + s) * M) * D;
  for (int64_t m = 0; m < M; ++m)
    for (int d = 0; d < D; ++d) out[m * D + d] = acc[m * D + planar<VB, D>(d)] + accw[m * D + d];
}

using SplitFn = void (*)(const Args&, int64_t, int64_t, int64_t, int64_t, int64_t, bool);

template <int D>
SplitFn pick_bits(int64_t kb, int64_t vb) {
#define BASTION_KV_CASE(K, V) \
  if (kb == K && vb == V) return &run_split<K, V, D>;
  BASTION_KV_CASE(2, 2) BASTION_KV_CASE(2, 4) BASTION_KV_CASE(2, 8)
  BASTION_KV_CASE(4, 2) BASTION_KV_CASE(4, 4) BASTION_KV_CASE(4, 8)
  BASTION_KV_CASE(8, 2) BASTION_KV_CASE(8, 4) BASTION_KV_CASE(8, 8)
#undef BASTION_KV_CASE
  return nullptr;
}

SplitFn pick(int64_t kb, int64_t vb, int64_t d) {
  if (d == 64) return pick_bits<64>(kb, vb);
  if (d == 128) return pick_bits<128>(kb, vb);
  return nullptr;
}

}  // namespace

// q [B, H, M, D] f32 (softmax scale applied); pools of one layer (see Args); table/bmask
// [B, n]; kf/vf [B, w, H, D] f32; wmask [B, w]. Returns [B, H, M, D] f32.
torch::Tensor kivi_decode_attention(torch::Tensor q, torch::Tensor k_codes, torch::Tensor k_scale,
                                    torch::Tensor k_zero, torch::Tensor v_codes, torch::Tensor v_scale,
                                    torch::Tensor v_zero, torch::Tensor table, torch::Tensor bmask,
                                    torch::Tensor kf, torch::Tensor vf, torch::Tensor wmask,
                                    int64_t k_bits, int64_t v_bits, int64_t splits) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: [B, H, M, D] f32 contiguous");
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3);
  const int64_t n = table.size(1), w = kf.size(1);
  TORCH_CHECK(k_codes.is_contiguous() && v_codes.is_contiguous() && k_scale.is_contiguous() &&
              k_zero.is_contiguous() && v_scale.is_contiguous() && v_zero.is_contiguous() &&
              table.is_contiguous() && bmask.is_contiguous() && kf.is_contiguous() && vf.is_contiguous() &&
              wmask.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(k_scale.scalar_type() == at::kHalf && v_scale.scalar_type() == at::kHalf, "scales must be fp16");
  TORCH_CHECK(kf.scalar_type() == at::kFloat && vf.scalar_type() == at::kFloat, "window must be f32");
  TORCH_CHECK(table.scalar_type() == at::kLong && bmask.scalar_type() == at::kBool && wmask.scalar_type() == at::kBool,
              "table long, masks bool");
  TORCH_CHECK(n == 0 || (k_codes.size(2) == H && k_codes.size(3) * 8 == D * k_bits && v_codes.size(3) * 8 == D * v_bits),
              "code pool shapes do not match q");
  const int64_t G = n ? k_codes.size(1) : 1;
  const int64_t ng = n ? v_scale.size(3) : 1;
  TORCH_CHECK(D % ng == 0, "value groups must divide D");
  const int64_t S = std::max<int64_t>(1, std::min<int64_t>(splits, std::max<int64_t>(n, 1)));
  auto f32 = q.options();
  auto part_m = torch::empty({B, H, S, M}, f32), part_l = torch::empty({B, H, S, M}, f32);
  auto part_acc = torch::empty({B, H, S, M, D}, f32);
  const SplitFn fn = pick(k_bits, v_bits, D);
  TORCH_CHECK(fn != nullptr, "no kernel for K", k_bits, "V", v_bits, " at head_dim ", D, " (64 or 128)");
  Args a{B, H, M, G, D / ng, n, w, S,
         q.data_ptr<float>(), k_codes.data_ptr<uint8_t>(), k_scale.data_ptr<at::Half>(), k_zero.data_ptr<at::Half>(),
         v_codes.data_ptr<uint8_t>(), v_scale.data_ptr<at::Half>(), v_zero.data_ptr<at::Half>(),
         table.data_ptr<int64_t>(), bmask.data_ptr<bool>(), kf.data_ptr<float>(), vf.data_ptr<float>(),
         wmask.data_ptr<bool>(), part_m.data_ptr<float>(), part_l.data_ptr<float>(), part_acc.data_ptr<float>()};
  at::parallel_for(0, B * H * S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = i % S, bh = i / S, b = bh / H, h = bh % H;
      const int64_t j0 = n * s / S, j1 = n * (s + 1) / S;
      fn(a, b, h, s, j0, j1, s == S - 1);
    }
  });
  // merge splits: out = sum_s exp(m_s - M*) acc_s / sum_s exp(m_s - M*) l_s
  auto out = torch::empty({B, H, M, D}, f32);
  float* o = out.data_ptr<float>();
  const float* pm = part_m.data_ptr<float>();
  const float* pl = part_l.data_ptr<float>();
  const float* pa = part_acc.data_ptr<float>();
  const float NEG = -std::numeric_limits<float>::infinity();
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t m = 0; m < M; ++m) {
      float mx = NEG;
      for (int64_t s = 0; s < S; ++s) mx = std::max(mx, pm[(bh * S + s) * M + m]);
      float* om = o + (bh * M + m) * D;
      std::fill_n(om, D, 0.f);
      float l = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        const float ms = pm[(bh * S + s) * M + m];
        if (ms == NEG) continue;
        const float f = std::exp(ms - mx);
        l += f * pl[(bh * S + s) * M + m];
        const float* as = pa + ((bh * S + s) * M + m) * D;
        for (int64_t d = 0; d < D; ++d) om[d] += f * as[d];
      }
      const float inv = 1.f / l;  // l == 0 (row attends to nothing) gives NaN, like softmax
      for (int64_t d = 0; d < D; ++d) om[d] *= inv;
    }
  }
  return out;
}

// fp_decode.cpp
torch::Tensor fp_decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor table,
                                  torch::Tensor lens, int64_t block, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kivi_decode_attention", &kivi_decode_attention, "fused KIVI decode attention (CPU)");
  m.def("fp_decode_attention", &fp_decode_attention, "decode attention over the fp32 paged cache (CPU)");
}
