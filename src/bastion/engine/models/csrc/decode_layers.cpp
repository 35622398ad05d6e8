// Every decoder layer of a decode step in one call (engine/models/fused_decode.py says when):
//   plan = DecodePlan(heads, kv_heads, head_dim, eps)   built once from the model's weights
//   plan.run(x, k_pool, v_pool, slots, table, lens, block, scale, cos, sin, integer)
//     x: [T, H] fp32 residual stream of T single-token rows, updated in place;
//     k_pool, v_pool: [layers, slots, Hkv, D] fp32 (the FP KV cache); slots: [T] int64 where each
//     row's new K/V goes; table [T, nblk] / lens [T]: the decode attention plan; cos/sin: [T, D].
// Why: at batch 1 a small model's step is bound by Python and op dispatch (SmolLM2: ~70% of a
// step before this). The arithmetic is the per-op path's, call for call (same kernels, same
// order, same ATen ops for SiLU and the bias), so the answers are bit-identical to it: the
// per-op path is this one's oracle (tests/engine/models/test_fused_decode.py).
#include <torch/extension.h>

#include <cstring>
#include <vector>

// qlinear.cpp / qlinear_int8.cpp / decode_ops.cpp / kv_cache/csrc/fp_decode.cpp
torch::Tensor q4_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor minv, int64_t G);
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, int64_t G);
torch::Tensor q4_linear_i8(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor minv, bool int16);
torch::Tensor q8_linear_i8(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, bool int16);
torch::Tensor q4p_linear(torch::Tensor x, torch::Tensor P, bool has_min, bool f32, bool int16);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor add_rms_norm_(torch::Tensor x, torch::Tensor d, torch::Tensor w, double eps);
void rope_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t n_heads, int64_t D);
torch::Tensor silu_mul(torch::Tensor gu);
torch::Tensor fp_decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor table,
                                  torch::Tensor lens, int64_t block, double scale);

namespace {

enum Mode : int64_t { kFp32 = 0, kInt16 = 1, kInt8 = 2 };

struct Part {  // one QuantWeight of a projection (a fused projection may hold several)
  torch::Tensor codes, scale, minv;  // minv empty: symmetric
  bool q4;
  int64_t group;
  int64_t mode;  // the activations its integer call uses; kFp32: it has none
  bool packed = false;  // codes are q4p_pack's tiles (every batch size on the integer path)
  bool has_min = false, f32 = false;
};

struct Linear {
  std::vector<Part> parts;  // output columns in parts' order
  torch::Tensor bias;       // undefined: none
};

struct Layer {
  torch::Tensor ln1, ln2;
  Linear proj[4];  // qkv, o, gate_up, down
};

torch::Tensor apply(const Part& p, const torch::Tensor& x, bool integer) {
  if (p.packed) return q4p_linear(x, p.codes, p.has_min, p.f32, p.mode == kInt16);
  if (integer && p.mode != kFp32)
    return p.q4 ? q4_linear_i8(x, p.codes, p.scale, p.minv, p.mode == kInt16)
                : q8_linear_i8(x, p.codes, p.scale, p.mode == kInt16);
  return p.q4 ? q4_linear(x, p.codes, p.scale, p.minv, p.group) : q8_linear(x, p.codes, p.scale, p.group);
}

torch::Tensor apply(const Linear& l, const torch::Tensor& x, bool integer) {
  torch::Tensor y;
  if (l.parts.size() == 1) {
    y = apply(l.parts[0], x, integer);
  } else {
    std::vector<torch::Tensor> ys;
    for (const auto& p : l.parts) ys.push_back(apply(p, x, integer));
    y = torch::cat(ys, -1);
  }
  return l.bias.defined() ? y + l.bias : y;
}

}  // namespace

class DecodePlan {
 public:
  DecodePlan(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), eps_(eps) {
    TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && head_dim % 2 == 0,
                "DecodePlan: bad head shapes");
  }

  void add_layer(torch::Tensor ln1, torch::Tensor ln2) { layers_.push_back(Layer{ln1, ln2, {}}); }

  void add_part(int64_t layer, int64_t which, torch::Tensor codes, torch::Tensor scale, torch::Tensor minv, bool q4,
                int64_t group, int64_t mode) {
    TORCH_CHECK(layer >= 0 && layer < (int64_t)layers_.size() && which >= 0 && which < 4, "add_part: bad index");
    TORCH_CHECK(mode >= kFp32 && mode <= kInt8, "add_part: bad mode");
    layers_[layer].proj[which].parts.push_back(Part{codes, scale, minv, q4, group, mode});
  }

  void add_packed(int64_t layer, int64_t which, torch::Tensor packed, bool has_min, bool f32, int64_t mode) {
    TORCH_CHECK(layer >= 0 && layer < (int64_t)layers_.size() && which >= 0 && which < 4, "add_packed: bad index");
    TORCH_CHECK(mode == kInt16 || mode == kInt8, "add_packed: packed parts take int16 or int8 activations");
    Part p{packed, torch::Tensor(), torch::Tensor(), true, 32, mode};
    p.packed = true, p.has_min = has_min, p.f32 = f32;
    layers_[layer].proj[which].parts.push_back(p);
  }

  void set_bias(int64_t layer, int64_t which, torch::Tensor bias) {
    TORCH_CHECK(layer >= 0 && layer < (int64_t)layers_.size() && which >= 0 && which < 4, "set_bias: bad index");
    layers_[layer].proj[which].bias = bias;
  }

  int64_t num_layers() const { return layers_.size(); }

  void run(torch::Tensor x, torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor slots, torch::Tensor table,
           torch::Tensor lens, int64_t block, double scale, torch::Tensor cos, torch::Tensor sin, bool integer) {
    const int64_t T = x.size(0), L = layers_.size(), H = heads_, Hkv = kv_heads_, D = head_dim_;
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: fp32 [T, H]");
    TORCH_CHECK(k_pool.dim() == 4 && k_pool.size(0) == L && k_pool.size(2) == Hkv && k_pool.size(3) == D &&
                k_pool.scalar_type() == torch::kFloat32 && k_pool.is_contiguous() && v_pool.sizes() == k_pool.sizes() &&
                v_pool.scalar_type() == torch::kFloat32 && v_pool.is_contiguous(), "k/v pools: fp32 [layers, slots, Hkv, D]");
    TORCH_CHECK(slots.dim() == 1 && slots.size(0) == T && slots.scalar_type() == torch::kLong && slots.is_contiguous(),
                "slots: int64 [T]");
    const int64_t nslots = k_pool.size(1), row = Hkv * D;
    const int64_t* sp = slots.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < nslots, "slot outside the KV pool");
    for (int64_t i = 0; i < L; ++i) {
      const Layer& ly = layers_[i];
      auto qkv = apply(ly.proj[0], rms_norm(x, ly.ln1, eps_), integer);  // [T, (H + 2 Hkv) D]
      TORCH_CHECK(qkv.size(1) == (H + 2 * Hkv) * D, "qkv width disagrees with the head shapes");
      rope_(qkv, cos, sin, H + Hkv, D);
      auto kl = k_pool.select(0, i), vl = v_pool.select(0, i);  // [slots, Hkv, D]
      const float* qp = qkv.data_ptr<float>();
      float *kp = kl.data_ptr<float>(), *vp = vl.data_ptr<float>();
      for (int64_t t = 0; t < T; ++t) {  // the new token's K/V into its slot
        const float* r = qp + t * qkv.size(1) + H * D;
        std::memcpy(kp + sp[t] * row, r, row * sizeof(float));
        std::memcpy(vp + sp[t] * row, r + row, row * sizeof(float));
      }
      auto q = qkv.narrow(1, 0, H * D).reshape({T, H, D}).contiguous();
      auto attn = fp_decode_attention(q, kl, vl, table, lens, block, scale);  // [T, H, D]
      auto h = add_rms_norm_(x, apply(ly.proj[1], attn.view({T, H * D}), integer), ly.ln2, eps_);
      auto gu = apply(ly.proj[2], h, integer);  // [T, 2I]
      x.add_(apply(ly.proj[3], silu_mul(gu), integer));  // as LayerOps.silu_mul (bit-identical)
    }
  }

 private:
  int64_t heads_, kv_heads_, head_dim_;
  double eps_;
  std::vector<Layer> layers_;
};

void register_decode_plan(pybind11::module& m) {
  // module_local: the same class is in every ISA build of this module (tests load native,
  // avx2 and scalar in one process), and pybind11 registers classes process-wide otherwise
  pybind11::class_<DecodePlan>(m, "DecodePlan", pybind11::module_local())
      .def(pybind11::init<int64_t, int64_t, int64_t, double>())
      .def("add_layer", &DecodePlan::add_layer)
      .def("add_part", &DecodePlan::add_part)
      .def("add_packed", &DecodePlan::add_packed)
      .def("set_bias", &DecodePlan::set_bias)
      .def("num_layers", &DecodePlan::num_layers)
      .def("run", &DecodePlan::run, pybind11::call_guard<pybind11::gil_scoped_release>());
}
