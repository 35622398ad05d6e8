// The Python module of the model's CPU kernels: declarations of what the kernel files
// define, and their bindings. The only file of the module besides decode_layers.cpp that
// includes <torch/extension.h> (pybind11 and torch's Python glue: ~17 s to parse), so the
// kernel files build from ATen's headers alone.
#include <torch/extension.h>

#include <string>
#include <vector>

// qlinear.cpp
at::Tensor q4_linear(at::Tensor x, at::Tensor codes, at::Tensor scale, at::Tensor minv, int64_t G);
at::Tensor q8_linear(at::Tensor x, at::Tensor codes, at::Tensor scale, int64_t G);
at::Tensor q4_dequant(at::Tensor codes, at::Tensor scale, at::Tensor minv, int64_t G);
at::Tensor q8_dequant(at::Tensor codes, at::Tensor scale, int64_t G);
std::string isa();

// qlinear_int8.cpp
bool q4_linear_i8_supported();
at::Tensor q4_linear_i8(at::Tensor x, at::Tensor codes, at::Tensor scale, at::Tensor minv, bool int16);
at::Tensor q8_linear_i8(at::Tensor x, at::Tensor codes, at::Tensor scale, bool int16);

// qlinear_packed.cpp
at::Tensor q4p_pack(at::Tensor codes, at::Tensor scale, at::Tensor minv);
at::Tensor q4p_linear(at::Tensor x, at::Tensor P, bool has_min, bool f32, bool int16);
at::Tensor q4p_dequant(at::Tensor P, int64_t t0, int64_t t1, bool has_min, bool f32);

// gguf_blocks.cpp
std::vector<at::Tensor> gguf_split_blocks(std::vector<at::Tensor> parts, int64_t block_bytes, int64_t head_bytes);

// decode_ops.cpp
at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps);
at::Tensor add_rms_norm_(at::Tensor x, at::Tensor d, at::Tensor w, double eps);
void rope_(at::Tensor qkv, at::Tensor cos, at::Tensor sin, int64_t n_heads, int64_t D);
at::Tensor silu_mul(at::Tensor gu);

#ifndef BASTION_KERNELS_ONLY  // (the kernels alone: the lower-ISA builds that test fallbacks)
// decode_layers.cpp
void register_decode_plan(pybind11::module& m);
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifndef BASTION_KERNELS_ONLY
  register_decode_plan(m);
#endif
  m.def("rms_norm", &rms_norm, "RMSNorm of fp32 rows");
  m.def("add_rms_norm_", &add_rms_norm_, "x += delta in place, then RMSNorm(x)");
  m.def("silu_mul", &silu_mul, "silu(gu[:, :I]) * gu[:, I:] of fp32 rows [T, 2I] -> [T, I]");
  m.def("rope_", &rope_, "rotate the first n heads of [T, *, D] rows in place (HF rotate-half)");
  m.def("q4_linear_i8", &q4_linear_i8, "y = x @ W^T with x quantized per 32-block to int8, or int16 as two bytes (VNNI)");
  m.def("q8_linear_i8", &q8_linear_i8, "y = x @ W^T, W int8 codes (group 32), x as for q4_linear_i8");
  m.def("q4_linear_i8_supported", &q4_linear_i8_supported, "whether this build has the int8/int16 paths");
  m.def("q4p_pack", &q4p_pack, "q4 codes/scales/mins (group 32) -> tiles of 16 interleaved rows");
  m.def("q4p_linear", &q4p_linear, "y = x @ W^T, W packed by q4p_pack, x as for q4_linear_i8 (VNNI)");
  m.def("q4p_dequant", &q4p_dequant, "fp32 rows of the packed tiles [t0, t1) (prefill tiles)");
  m.def("q4_linear", &q4_linear, "y = x @ W^T, W 4-bit codes with group scale/min");
  m.def("q8_linear", &q8_linear, "y = x @ W^T, W int8 codes with group scale");
  m.def("gguf_split_blocks", &gguf_split_blocks,
        "GGUF Q4_0/Q4_1/Q8_0 blocks -> [codes, d (, m)], the parts as one matrix's rows");
  m.def("isa", &isa, "the instruction set this build uses");
  m.def("q4_dequant", &q4_dequant, "fp32 rows of q4 codes (prefill tiles)");
  m.def("q8_dequant", &q8_dequant, "fp32 rows of q8 codes (prefill tiles)");
}
