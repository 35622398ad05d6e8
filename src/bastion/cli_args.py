"""The flags of `bastion serve`, `chat` and `generate`, and the Config they make.

Engine flags are shared by the three commands; server flags (--port, --max-waiting,
--served-model-name, ...) belong to `serve` alone. Every flag's default is shown in
`--help` (DefaultsHelpFormatter, used by every parser under `bastion`).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from bastion.config import (
    ACTIVATIONS,
    ADAPTER_NAME_PATTERN,
    MOE_POLICIES,
    SCHEDULING_POLICIES,
    AdapterConfig,
    CacheConfig,
    ClusterConfig,
    Config,
    GuardConfig,
    ModelConfig,
    MoeConfig,
    SchedulerConfig,
    ServerConfig,
)
from bastion.serving.adapter_rank import DEFAULT_SLOT_RANK, slot_rank


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already says its default
    ("(default..."), or there is nothing to show (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text is None or text == argparse.SUPPRESS or "(default" in text:
            return text
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or default in ([], ()):
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose help shows defaults; sub-parsers inherit the class."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF file or HF model directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="compute dtype; auto = float32 over quantized weights; for dense weights bfloat16 on "
                        "GPUs and AVX-512 CPUs, float32 on AVX2-only CPUs")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="auto: a GGUF's Q4_0/Q4_1/Q4_K/Q8_0/Q6_K weights stay quantized in memory; none: "
                        "dequantize everything to --dtype; int8/int4: quantize fp weights group-wise too")
    p.add_argument("--quant-group", type=int, default=32, choices=[32, 128], help="group size of --quantize int8/int4")
    p.add_argument("--weight-kernel", default="auto", choices=["auto", "native", "torch"],
                   help="quantized matmuls: native C++ kernel (auto: when it builds) or torch ops")
    p.add_argument("--activations", default="auto", choices=list(ACTIVATIONS),
                   help="batch-1 decode over quantized weights: int16 per 32-block with VNNI (auto's choice where "
                        "the CPU has it: ~1e-5 of fp32, 2x the fp32 kernel), fp32 (exact to the dequantized model), "
                        "int8 (llama.cpp's way: fastest, answers measurably differ)")
    p.add_argument("--fp16-gemv", default="auto", choices=["auto", "on", "off"],
                   help="dense bf16 on CPU: fp16 weight copies for batch-1 decode (one more copy; auto = off)")
    p.add_argument("--packed-gemm", default="auto", choices=["auto", "on", "off"],
                   help="dense bf16 on CPU: oneDNN-prepacked weight copies (one more copy; auto = off)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--kv-memory", type=float, default=1.0, metavar="GB", help="KV cache budget in GiB")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (fp caches)")
    p.add_argument("--kv-cache", default="auto", metavar="KIND",
                   help="auto (model dtype), fp32, bf16, fp16, or a KIVI-quantized cache: kivi (the measured "
                        "default), int8, kivi4, kivi2, kXvY (X, Y in 2/4/8, e.g. k4v2)")
    p.add_argument("--kv-group-size", type=int, default=None, metavar="G",
                   help="KIVI group size (tokens per key group and per block; channels per value group "
                        "unless --kv-value-group) (default: the --kv-cache preset's)")
    p.add_argument("--kv-value-group", type=int, default=None, metavar="GV",
                   help="KIVI: channels per value scale/min (default G; 64 = one range per head on SmolLM2)")
    p.add_argument("--kv-residual", type=int, default=None, metavar="R", help="KIVI full-precision window (default: the --kv-cache preset's)")
    p.add_argument("--kv-sink", type=int, default=None, metavar="S",
                   help="KIVI: first S tokens kept in full precision (multiple of G) (default: the --kv-cache preset's)")
    p.add_argument("--kv-hadamard", action=argparse.BooleanOptionalAction, default=None,
                   help="KIVI: rotate K and V by a Hadamard matrix before quantizing (default: the --kv-cache preset's)")
    p.add_argument("--kv-clip", action=argparse.BooleanOptionalAction, default=None,
                   help="KIVI: per-group range by least squared error instead of min-max (default: the --kv-cache preset's)")
    p.add_argument("--kv-kernel", default="auto", choices=["auto", "native", "torch"],
                   help="KIVI decode attention: fused C++ kernel (built on first use; auto falls back to "
                        "torch ops if it cannot build) or torch ops")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn off reuse of shared prompt prefixes")
    p.add_argument("--max-num-seqs", type=int, default=64, help="max concurrently running requests")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget per engine step")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--moe-memory", type=float, default=None, metavar="GB",
                   help="mixture-of-experts models: RAM for routed experts in GiB; the rest are run from the model "
                        "file (mmap) or read in as --moe-policy decides (default: every expert resident)")
    p.add_argument("--moe-gpu-memory", type=float, default=None, metavar="GB",
                   help="GPU memory for experts in GiB (refused: the GPU tier is not built, and needs a GPU)")
    p.add_argument("--moe-policy", default="bastion", choices=list(MOE_POLICIES),
                   help="expert offload policy under --moe-memory (docs/BENCHMARKS.md compares them)")


def add_local_adapter_args(p: argparse.ArgumentParser) -> None:
    """`chat` and `generate`: one adapter, vetted as `serve` vets them."""
    p.add_argument("--lora", metavar="[NAME=]PATH", default=None,
                   help="answer with this PEFT LoRA adapter (scanned by the vetting gate first, as by serve)")
    p.add_argument("--allow-unvetted", action="store_true",
                   help="load an adapter that fails the vetting gate (logged as an override)")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--served-model-name", default=None, help="model id in /v1/models (default: from the model file)")
    p.add_argument("--max-waiting", type=int, default=256, help="queue bound (HTTP 429 beyond it)")
    p.add_argument("--api-key", default=None, help="require this Bearer key (or set BASTION_API_KEY)")
    p.add_argument("--log-requests", action="store_true", help="log prompts and outputs (off: privacy)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve a PEFT LoRA adapter under model id NAME (repeatable)")
    p.add_argument("--enable-lora", action="store_true", help="allow adapters (also implied by --lora)")
    p.add_argument("--max-loras", type=int, default=8, help="adapter slots")
    p.add_argument("--max-lora-rank", type=int, default=None, metavar="R",
                   help="rank of the adapter slots, fixed at start (default: the largest rank of the --lora "
                        f"adapters, at least {DEFAULT_SLOT_RANK}); raise it to hot-load larger adapters")
    p.add_argument("--cleangen", action="append", default=[], metavar="NAME[=ALPHA]",
                   help="CleanGen defended decoding by default for adapter NAME (requests may still send "
                        "\"cleangen\": false); ALPHA = probability-ratio threshold (default 20)")
    p.add_argument("--allow-unvetted", action="store_true",
                   help="load adapters that fail the vetting gate (logged as an override)")
    p.add_argument("--no-behaviour-scan", action="store_true",
                   help="serve adapters on the gate's static checks alone (artifact, config, weights), without "
                        "the behaviour scan that otherwise runs in the background before an adapter is served "
                        "(~1 min per adapter on 2 cores, on a second copy of the model; docs/SECURITY.md)")
    p.add_argument("--scan-cache", metavar="DIR", default=None,
                   help="behaviour scan verdicts by adapter file hash, so a restart does not rescan "
                        "(default: ~/.cache/bastion/scans)")
    p.add_argument("--leak-guard", action="store_true",
                   help="cut chat answers that copy a run of their request's system prompt (finish_reason "
                        "\"content_filter\"); see docs/SECURITY.md")
    p.add_argument("--leak-guard-words", type=int, default=8, metavar="N",
                   help="consecutive system-prompt words that count as a leak")
    p.add_argument("--canary", action="append", default=[], metavar="STRING",
                   help="a marker planted in confidential text: no answer may contain it (repeatable)")
    p.add_argument("--max-body-mb", type=float, default=4.0, metavar="MB",
                   help="refuse request bodies larger than this with HTTP 413")
    p.add_argument("--openapi", action="store_true",
                   help="publish the API schema at /openapi.json (for fuzzers and client generators)")
    p.add_argument("--engine-stall-s", type=float, default=120.0, metavar="S",
                   help="/health answers 503 while one engine step has run longer than this")
    p.add_argument("--no-web", action="store_true", help="do not serve the chat page at / (the API is unchanged)")
    p.add_argument("--admin-key", default=None,
                   help="enables POST /v1/load_lora_adapter and /v1/unload_lora_adapter (X-Admin-Key header)")
    p.add_argument("--api-keys", metavar="FILE", default=None,
                   help="per-tenant API keys (TOML: [[keys]] name, key, max_concurrent, tokens_per_min, adapters, "
                        "weight); every request then needs one of them (docs/DEPLOY.md)")
    p.add_argument("--scheduling-policy", default="fcfs", choices=list(SCHEDULING_POLICIES),
                   help="fcfs: arrival order; priority: the request's \"priority\" (lower first), preempting lower "
                        "priorities under KV pressure; fair: tenants (API keys) share by a virtual token counter")
    g = p.add_argument_group("cluster (Ray Serve; needs the 'cluster' extra)")
    g.add_argument("--replicas", type=int, default=0, metavar="N",
                   help="serve N engines as a Ray Serve deployment behind this API (0: one engine in this process)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a local one")
    g.add_argument("--min-replicas", type=int, default=None, metavar="N", help="autoscaling lower bound")
    g.add_argument("--max-replicas", type=int, default=None, metavar="N", help="autoscaling upper bound")


def parse_lora(spec: str, *, bare_path: bool = False) -> tuple[str, str]:
    """--lora NAME=PATH -> (NAME, PATH). With `bare_path` (chat, generate) a spec that is
    not NAME=PATH is a path, named after its directory."""
    name, sep, path = spec.partition("=")
    if not bare_path:
        if not sep or not name or not path:
            raise ValueError(f"--lora expects NAME=PATH, got {spec!r}")
        return name, path
    if sep and path and re.match(ADAPTER_NAME_PATTERN, name):
        return name, path
    if not spec.strip():
        raise ValueError("--lora expects a path to an adapter directory, got ''")
    base = Path(spec).name
    return (base if re.match(ADAPTER_NAME_PATTERN, base) and len(base) <= 128 else "adapter"), spec


def lora_specs(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """(name, path) of the adapters named on the command line: serve's repeatable
    NAME=PATH, or chat's and generate's single [NAME=]PATH."""
    spec = getattr(args, "lora", None)
    if spec is None:
        return ()
    if isinstance(spec, str):
        return (parse_lora(spec, bare_path=True),)
    return tuple(parse_lora(s) for s in spec)


def read_api_keys(path: str) -> tuple:
    """--api-keys FILE (TOML) -> ApiKeyConfig per [[keys]] table; a bad file is a ValueError
    naming it (the CLI's one-line error), never a traceback."""
    import tomllib

    from bastion.config import ApiKeyConfig
    from bastion.safe_io import read_regular

    try:
        doc = tomllib.loads(read_regular(path, max_bytes=2**20).decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"--api-keys {path}: {e}") from None
    keys = doc.get("keys")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) for k in keys):
        raise ValueError(f"--api-keys {path}: expected one or more [[keys]] tables")
    fields = {"name", "key", "max_concurrent", "tokens_per_min", "adapters", "weight"}
    out = []
    for i, entry in enumerate(keys):
        unknown = set(entry) - fields
        if unknown or "name" not in entry or "key" not in entry:
            raise ValueError(f"--api-keys {path}: keys[{i}] needs name and key; unknown fields "
                             f"{sorted(unknown)} (allowed: {sorted(fields)})")
        types = {"name": str, "key": str, "max_concurrent": int, "tokens_per_min": int, "weight": (int, float)}
        for name, kind in types.items():
            if name in entry and (not isinstance(entry[name], kind) or isinstance(entry[name], bool)):
                raise ValueError(f"--api-keys {path}: keys[{i}].{name} has the wrong type")
        adapters = entry.get("adapters")
        if adapters is not None and (not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters)):
            raise ValueError(f"--api-keys {path}: keys[{i}].adapters must be a list of adapter names")
        out.append(ApiKeyConfig(name=entry["name"], key=entry["key"], max_concurrent=entry.get("max_concurrent"),
                                tokens_per_min=entry.get("tokens_per_min"),
                                adapters=tuple(adapters) if adapters is not None else None,
                                weight=float(entry.get("weight", 1.0))))
    return tuple(out)


def config_from_args(args: argparse.Namespace) -> Config:
    """The whole Config from flags (commands without a flag get its default)."""
    from bastion.guard.cleangen import parse_cleangen

    def flag(name: str, default=None):
        return getattr(args, name, default)

    server = ServerConfig(
        host=flag("host", "127.0.0.1"), port=flag("port", 8000),
        api_key=flag("api_key") or os.environ.get("BASTION_API_KEY") or None,
        log_requests=flag("log_requests", False),
        admin_key=flag("admin_key") or os.environ.get("BASTION_ADMIN_KEY") or None,
        max_body_bytes=int(flag("max_body_mb", 4.0) * 2**20),
        openapi=flag("openapi", False),
        engine_stall_s=flag("engine_stall_s", 120.0),
        web=not flag("no_web", False),
        api_keys=read_api_keys(flag("api_keys")) if flag("api_keys") else (),
    )
    loras = lora_specs(args)
    return Config(
        model=ModelConfig(path=args.model, dtype=args.dtype, device=args.device, served_name=flag("served_model_name"),
                          max_model_len=args.max_model_len, threads=args.threads, quantize=args.quantize,
                          quant_group=args.quant_group, weight_kernel=args.weight_kernel, activations=args.activations,
                          fp16_gemv=args.fp16_gemv, packed_gemm=args.packed_gemm),
        cache=CacheConfig(block_size=args.block_size, kv_memory_gb=args.kv_memory,
                          prefix_caching=not args.no_prefix_caching, kind=args.kv_cache,
                          kv_group_size=args.kv_group_size, kv_residual=args.kv_residual, kv_sink=args.kv_sink,
                          kv_hadamard=args.kv_hadamard, kv_clip=args.kv_clip,
                          kv_value_group=args.kv_value_group, kv_kernel=args.kv_kernel),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_waiting=flag("max_waiting", 256),
                                  policy=flag("scheduling_policy", "fcfs")),
        server=server,
        adapters=AdapterConfig(
            # the admin key is for loading adapters at run time: it needs the slots
            enabled=bool(flag("enable_lora", False) or server.admin_key), loras=loras,
            max_loras=flag("max_loras", 8), max_lora_rank=slot_rank(flag("max_lora_rank"), (p for _, p in loras)),
            allow_unvetted=flag("allow_unvetted", False),
            behaviour_scan=not flag("no_behaviour_scan", False), scan_cache=flag("scan_cache"),
            cleangen=tuple(parse_cleangen(spec) for spec in flag("cleangen", None) or ())),
        guard=GuardConfig(leak_guard=flag("leak_guard", False), leak_min_words=flag("leak_guard_words", 8),
                          canaries=tuple(flag("canary", None) or ())),
        cluster=ClusterConfig(replicas=flag("replicas", 0) or 0, ray_address=flag("ray_address"),
                              min_replicas=flag("min_replicas"), max_replicas=flag("max_replicas")),
        moe=MoeConfig(memory_gb=flag("moe_memory"), gpu_memory_gb=flag("moe_gpu_memory"),
                      policy=flag("moe_policy", "bastion")),
    )
