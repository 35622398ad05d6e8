"""Building an LLMEngine from a Config: the checkpoint loaded, the model built in its
dtype on its device (with its CPU weight shadows), the KV pool sized from its budget."""

from __future__ import annotations

import logging
from types import ModuleType

import torch

from bastion.config import Config
from bastion.engine.kv_cache.factory import build_kv_cache
from bastion.engine.llm_engine import LLMEngine
from bastion.engine.models.fused_decode import FusedDecode
from bastion.engine.models.host_memory import loading_memory
from bastion.engine.models.layer_ops import LayerOps
from bastion.engine.models.linear import packed_gemm_available
from bastion.engine.models.llama import LlamaForCausalLM
from bastion.engine.models.loader import load_checkpoint
from bastion.engine.models.quant_linear import load_qkernel
from bastion.engine.models.quantized_model import build_quantized, has_quantized

log = logging.getLogger("bastion.engine")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, quantized: bool = False) -> torch.dtype:
    """auto: fp32 activations over quantized weights (the kernels' arithmetic; bf16
    activations flip near-tied greedy answers, e.g. SmolLM2's "capital of France");
    for dense weights bf16 on CUDA and where oneDNN runs bf16 GEMMs natively, fp32 on
    AVX2-only CPUs (measured on one, 2 threads, [3072, 576] weight at 64 rows: fp32
    2.0 ms, bf16 12.3 ms; at 1 row about equal)."""
    if name != "auto":
        return _DTYPES[name]
    if quantized:
        return torch.float32
    return torch.bfloat16 if device.type == "cuda" or packed_gemm_available() else torch.float32


def _want_shadow(mode: str, dtype: torch.dtype, device: torch.device) -> bool:
    """fp16_gemv / packed_gemm: only when asked ("on"): each is one more copy of the
    weights, and by default the model's memory is the file's."""
    return mode == "on" and device.type == "cpu" and dtype == torch.bfloat16


def _weight_kernel(mode: str) -> ModuleType | None:
    if mode == "torch":
        return None
    kernel = load_qkernel()
    if kernel is None and mode == "native":
        raise RuntimeError("the native quantized-linear kernel did not build (see the log); "
                           "use --weight-kernel torch or auto")
    return kernel


def _check_moe(moe, device: torch.device) -> bool:
    """Whether experts are offloaded; the GPU expert tier is refused (not built, untested)."""
    if moe.gpu_memory_gb is not None:
        if not torch.cuda.is_available():
            raise ValueError("--moe-gpu-memory: no GPU is available here (experts can be offloaded to RAM and "
                             "disk with --moe-memory)")
        raise ValueError("--moe-gpu-memory: the GPU expert tier is not built yet; use --moe-memory (CPU RAM)")
    if moe.memory_gb is not None and device.type != "cpu":
        raise ValueError("--moe-memory offloads experts for CPU inference; it needs --device cpu")
    return moe.memory_gb is not None


def build_engine(config: Config, *, eos_token_id: int | None, show_progress: bool = True) -> tuple[LLMEngine, str]:
    """Load the checkpoint and build model + KV pool. Returns (engine, model name).
    `eos_token_id` comes from the tokenizer (serving/tokenizer.py: load_engine)."""
    if config.model.threads:
        torch.set_num_threads(config.model.threads)
    device = resolve_device(config.model.device)
    mc = config.model
    quantize = mc.quantize if device.type == "cpu" else "none"  # NOTE: the kernels are CPU-only so far
    offload = _check_moe(config.moe, device)
    with loading_memory():  # freed load buffers go back to the OS: resident = the model
        ckpt = load_checkpoint(mc.path, show_progress=show_progress, quantize=quantize, group=mc.quant_group,
                               skip_experts=offload)
        quantized = has_quantized(ckpt.weights)
        dtype = resolve_dtype(mc.dtype, device, quantized)
        max_len = min(mc.max_model_len or ckpt.arch.max_context(), ckpt.arch.max_context())
        if offload and ckpt.arch.num_experts:
            from bastion.engine.models.moe_offload import build_offloaded

            model, moe = build_offloaded(ckpt, dtype=dtype, max_len=max_len, policy=config.moe.policy,
                                         budget_bytes=int(config.moe.memory_gb * 2**30), prefetch=config.moe.prefetch,
                                         kernel=_weight_kernel(mc.weight_kernel), activations=mc.activations)
            log.info("experts offloaded (%s policy): %.0f of %.0f MiB resident at most; cost model %s",
                     config.moe.policy, moe.budget / 2**20, moe.store.total_bytes / 2**20, moe.cost.as_dict())
        elif quantized:
            model = build_quantized(ckpt.arch, max_len, ckpt.weights, _weight_kernel(mc.weight_kernel),
                                    activations=mc.activations)
        else:
            model = LlamaForCausalLM(ckpt.arch, max_len)
            model.load_hf_state_dict(ckpt.weights)
        del ckpt.weights
        model = model.to(device=device, dtype=dtype).eval()
    model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()  # keep tables fp32
    if device.type == "cpu" and dtype == torch.float32 and mc.weight_kernel != "torch":
        model.ops = LayerOps(load_qkernel())  # fused RMSNorm / residual / RoPE (None: torch ops)
        if quantized:  # decode steps in one native call where every projection has a kernel
            model.fused_decode = FusedDecode.build(model, load_qkernel())
    if _want_shadow(mc.fp16_gemv, dtype, device):
        model.enable_fp16_gemv()
    if _want_shadow(mc.packed_gemm, dtype, device):  # (a no-op where it cannot run)
        model.enable_packed_gemm()
    a = ckpt.arch
    kv = build_kv_cache(config, a, dtype, device)
    engine = LLMEngine(config, model, kv, vocab_size=a.vocab_size, eos_token_id=eos_token_id, max_model_len=max_len)
    log.info("engine ready: %s on %s/%s, weights %.1f MB resident (%s), KV cache %s: %d blocks x %d tokens "
             "(%.0f bytes/token), max_model_len %d", ckpt.name, device, dtype, engine.weight_bytes / 2**20,
             "quantized" if quantized else "dense", config.cache.kind, kv.num_blocks, kv.block_size,
             kv.token_bytes, max_len)
    return engine, ckpt.name
