// GGUF blocks -> the kernels' layout (see engine/models/qweights.py): Q4_0, Q4_1 and Q8_0
// store each group of 32 weights as one block, fp16 fields first (d; Q4_1: d, m), codes
// after. The kernels read codes and scales as separate arrays, so every block is split.
// At load numpy does it; an offloaded expert is split again on every read into RAM
// (engine/models/expert_format.py), on the decode path, where numpy's record copy runs
// at ~4 GB/s. Here: fixed-size copies per block, several raw tensors (gate and up of one
// expert) written one after another as one matrix's rows.
// NOTE: ATen headers only (see qlinear.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// One pass over `n` blocks of BB bytes: HB/2 fp16 fields, then BB-HB code bytes.
template <int BB, int HB>
void split(const uint8_t* src, int64_t n, uint8_t* codes, uint8_t** fields) {
  constexpr int CB = BB - HB, NF = HB / 2;
  for (int64_t i = 0; i < n; ++i, src += BB) {
    for (int f = 0; f < NF; ++f) std::memcpy(fields[f] + 2 * i, src + 2 * f, 2);
    std::memcpy(codes + CB * i, src + HB, CB);
  }
}

}  // namespace

// parts: contiguous uint8 tensors of whole blocks. Returns [codes, field 0 (d), field 1 (m)...]:
// codes uint8 [blocks * (BB - HB)], each field fp16 [blocks], in block order across the parts.
std::vector<at::Tensor> gguf_split_blocks(std::vector<at::Tensor> parts, int64_t block_bytes, int64_t head_bytes) {
  int64_t blocks = 0;
  for (const auto& p : parts) {
    TORCH_CHECK(p.scalar_type() == at::kByte && p.is_contiguous() && p.numel() % block_bytes == 0,
                "gguf_split_blocks: parts must be contiguous uint8 tensors of whole ", block_bytes, "-byte blocks");
    blocks += p.numel() / block_bytes;
  }
  const int64_t nf = head_bytes / 2, cb = block_bytes - head_bytes;
  std::vector<at::Tensor> out{at::empty({blocks * cb}, at::kByte)};
  uint8_t* fields[2] = {nullptr, nullptr};
  for (int64_t f = 0; f < nf; ++f) {
    out.push_back(at::empty({blocks}, at::kHalf));
    fields[f] = reinterpret_cast<uint8_t*>(out.back().data_ptr());
  }
  uint8_t* codes = out[0].data_ptr<uint8_t>();
  int64_t at_block = 0;
  for (const auto& p : parts) {
    const int64_t n = p.numel() / block_bytes;
    uint8_t* fd[2] = {fields[0] ? fields[0] + 2 * at_block : nullptr, fields[1] ? fields[1] + 2 * at_block : nullptr};
    uint8_t* cd = codes + cb * at_block;
    const uint8_t* src = p.data_ptr<uint8_t>();
    if (block_bytes == 18 && head_bytes == 2) split<18, 2>(src, n, cd, fd);         // Q4_0
    else if (block_bytes == 20 && head_bytes == 4) split<20, 4>(src, n, cd, fd);    // Q4_1
    else if (block_bytes == 34 && head_bytes == 2) split<34, 2>(src, n, cd, fd);    // Q8_0
    else TORCH_CHECK(false, "gguf_split_blocks: blocks of ", block_bytes, " bytes with a ", head_bytes,
                     "-byte head are not a layout this splits (Q4_0 18/2, Q4_1 20/4, Q8_0 34/2)");
    at_block += n;
  }
  return out;
}
