"""Builds the configured KV cache and sizes it from the byte budget.

Admission is by real bytes: the block count is (budget - fixed reservations) divided by
the bytes one block really occupies (fp: 2*L*H*D*dtype bytes per token; KIVI: packed
codes + fp16 scales/minima per token, see quant.bytes_per_token), so a fixed
`--kv-memory` admits proportionally more tokens with a smaller cache. KIVI also reserves
one full-precision region (sink + window of R + G tokens) per possible running sequence
(`max_num_seqs`), which is charged to the same budget.
"""

from __future__ import annotations

import torch

from bastion.config import CacheConfig, Config
from bastion.engine.kv_cache.base import KVCache
from bastion.engine.kv_cache.fp import FPKVCache
from bastion.engine.kv_cache.kivi import KIVIKVCache
from bastion.engine.kv_cache.quant import KVQuantSpec, bytes_per_token

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quant_spec(c: CacheConfig) -> KVQuantSpec:
    """The quantizer settings of a quantized cache config (preset defaults filled in)."""
    opts = c.quant_options()
    k_bits, v_bits = c.kv_bits
    return KVQuantSpec(k_bits, v_bits, opts["group_size"], opts["residual"], clip=opts["clip"],
                       v_group_size=opts["value_group"])


def build_kv_cache(config: Config, arch, model_dtype: torch.dtype, device: torch.device) -> KVCache:
    c = config.cache
    L, H, D = arch.num_layers, arch.num_kv_heads, arch.head_dim
    budget = c.kv_memory_gb * 2**30
    fp_dtype = model_dtype if c.fp_dtype == "auto" else _DTYPES[c.fp_dtype]
    if not c.quantized:
        per_block = FPKVCache.bytes_per_token(L, H, D, fp_dtype) * c.block_size
        num_blocks = c.num_blocks or int(budget // per_block)
        if num_blocks < 1:
            raise ValueError("kv_memory_gb is too small for a single KV block")
        return FPKVCache(num_layers=L, num_kv_heads=H, head_dim=D, num_blocks=num_blocks,
                         block_size=c.block_size, dtype=fp_dtype, device=device, kernel=c.kv_kernel)
    opts = c.quant_options()
    spec = quant_spec(c)
    spec.check_head_dim(D)
    slots = config.scheduler.max_num_seqs
    reserved = KIVIKVCache.reserved_for(spec, opts["sink"], slots, FPKVCache.bytes_per_token(L, H, D, fp_dtype))
    per_block = bytes_per_token(spec, L, H, D) * spec.group_size
    num_blocks = c.num_blocks or int((budget - reserved) // per_block)
    if num_blocks < 1:
        raise ValueError(f"kv_memory_gb={c.kv_memory_gb} is too small: the full-precision windows of "
                         f"max_num_seqs={slots} sequences alone take {reserved / 2**30:.3f} GiB "
                         "(lower --max-num-seqs or --kv-residual, or raise --kv-memory)")
    return KIVIKVCache(num_layers=L, num_kv_heads=H, head_dim=D, num_blocks=num_blocks, spec=spec,
                       num_seq_slots=slots, sink=opts["sink"], use_hadamard=opts["hadamard"],
                       fp_dtype=fp_dtype, device=device, kernel=c.kv_kernel)
