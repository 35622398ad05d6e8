"""`bastion` command line: serve, chat, generate, bench, finetune.

Sub-commands of other subsystems (bench, finetune) register their own parsers; this
file only composes them. Every user error ends as one line naming the problem and a
non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from bastion.config import AdapterConfig, CacheConfig, Config, GuardConfig, ModelConfig, SchedulerConfig, ServerConfig

EXIT_USAGE = 2


def _add_engine_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--activations", default="fp32", choices=["fp32", "int8"],
                   help="quantized matmuls: fp32 activations (default, exact to the dequantized model) or int8 "
                        "per 32-block with VNNI (llama.cpp's way; faster decode, slightly different answers)")
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
                        "unless --kv-value-group)")
    p.add_argument("--kv-value-group", type=int, default=None, metavar="GV",
                   help="KIVI: channels per value scale/min (default G; 64 = one range per head on SmolLM2)")
    p.add_argument("--kv-residual", type=int, default=None, metavar="R", help="KIVI full-precision window")
    p.add_argument("--kv-sink", type=int, default=None, metavar="S",
                   help="KIVI: first S tokens kept in full precision (multiple of G)")
    p.add_argument("--kv-hadamard", action=argparse.BooleanOptionalAction, default=None,
                   help="KIVI: rotate K and V by a Hadamard matrix before quantizing")
    p.add_argument("--kv-clip", action=argparse.BooleanOptionalAction, default=None,
                   help="KIVI: per-group range by least squared error instead of min-max")
    p.add_argument("--kv-kernel", default="auto", choices=["auto", "native", "torch"],
                   help="KIVI decode attention: fused C++ kernel (built on first use; auto falls back to "
                        "torch ops if it cannot build) or torch ops")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--max-num-seqs", type=int, default=64, help="max concurrently running requests")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget per engine step")
    p.add_argument("--max-waiting", type=int, default=256, help="queue bound (HTTP 429 beyond it)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--served-model-name", default=None, help="model id in /v1/models")


def _config(args: argparse.Namespace) -> Config:
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
    )
    loras = tuple(_parse_lora(spec) for spec in flag("lora", None) or ())
    return Config(
        model=ModelConfig(path=args.model, dtype=args.dtype, device=args.device, served_name=args.served_model_name,
                          max_model_len=args.max_model_len, threads=args.threads, quantize=args.quantize,
                          quant_group=args.quant_group, weight_kernel=args.weight_kernel, activations=args.activations,
                          fp16_gemv=args.fp16_gemv, packed_gemm=args.packed_gemm),
        cache=CacheConfig(block_size=args.block_size, kv_memory_gb=args.kv_memory,
                          prefix_caching=not args.no_prefix_caching, kind=args.kv_cache,
                          kv_group_size=args.kv_group_size, kv_residual=args.kv_residual, kv_sink=args.kv_sink,
                          kv_hadamard=args.kv_hadamard, kv_clip=args.kv_clip,
                          kv_value_group=args.kv_value_group, kv_kernel=args.kv_kernel),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_waiting=args.max_waiting),
        server=server,
        adapters=AdapterConfig(
            # the admin key is for loading adapters at run time: it needs the slots
            enabled=bool(flag("enable_lora", False) or server.admin_key), loras=loras,
            max_loras=flag("max_loras", 8), max_lora_rank=flag("max_lora_rank", 16),
            allow_unvetted=flag("allow_unvetted", False),
            cleangen=tuple(parse_cleangen(spec) for spec in flag("cleangen", None) or ())),
        guard=GuardConfig(leak_guard=flag("leak_guard", False), leak_min_words=flag("leak_guard_words", 8),
                          canaries=tuple(flag("canary", None) or ())),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from bastion.server import run_server
    from bastion.serving.async_engine import AsyncEngine
    from bastion.serving.policy import ServingPolicy

    config = _config(args)  # every flag is checked before the model loads
    engine = AsyncEngine.from_config(config, background=False)  # run_server gives it the main thread
    gate = None
    if config.adapters.enabled:
        from bastion.adapters.gate import VettingGate

        gate = VettingGate.for_model(config.model.path, served_name=engine.model_name,
                                     allow_unvetted=config.adapters.allow_unvetted)
        engine.engine.enable_adapters(config.adapters)
    policy = ServingPolicy.from_config(config, gate)
    for name, path in config.adapters.loras:
        policy.vet(name, path)
        engine.load_adapter_before_start(name, path)
    print(f"bastion: serving {engine.model_name!r} on http://{config.server.host}:{config.server.port}/v1"
          + (" (API key required)" if config.server.api_key else ""), file=sys.stderr)
    run_server(engine, config.server, policy=policy)
    return 0


def _parse_lora(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora expects NAME=PATH, got {spec!r}")
    return name, path


def cmd_generate(args: argparse.Namespace) -> int:
    from bastion.engine.sampling_params import SamplingParams
    from bastion.serving.chat_template import encode_chat
    from bastion.serving.llm import LLM

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop=tuple(args.stop or ()))
    llm = LLM(_config(args))
    if args.chat:
        prompt = encode_chat(llm.tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        prompt = llm.tokenizer.encode(args.prompt)
    out = llm.generate([prompt], params)[0]
    print(out.text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from bastion.chat import run_chat

    return run_chat(_config(args), system=args.system, max_tokens=args.max_tokens, temperature=args.temperature)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bastion", description="Run open LLMs privately on your own hardware.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this Bearer key (or set BASTION_API_KEY)")
    p.add_argument("--log-requests", action="store_true", help="log prompts and outputs (off: privacy)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve a PEFT LoRA adapter under model id NAME (repeatable)")
    p.add_argument("--enable-lora", action="store_true", help="allow adapters (also implied by --lora)")
    p.add_argument("--max-loras", type=int, default=8, help="adapter slots")
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--cleangen", action="append", default=[], metavar="NAME[=ALPHA]",
                   help="CleanGen defended decoding by default for adapter NAME (requests may still send "
                        "\"cleangen\": false); ALPHA = probability-ratio threshold (default 20)")
    p.add_argument("--allow-unvetted", action="store_true",
                   help="load adapters that fail the vetting gate (logged as an override)")
    p.add_argument("--leak-guard", action="store_true",
                   help="cut chat answers that copy a run of their request's system prompt (finish_reason "
                        "\"content_filter\"); see docs/SECURITY.md")
    p.add_argument("--leak-guard-words", type=int, default=8, metavar="N",
                   help="consecutive system-prompt words that count as a leak (default 8)")
    p.add_argument("--canary", action="append", default=[], metavar="STRING",
                   help="a marker planted in confidential text: no answer may contain it (repeatable)")
    p.add_argument("--max-body-mb", type=float, default=4.0, metavar="MB",
                   help="refuse request bodies larger than this with HTTP 413 (default 4)")
    p.add_argument("--openapi", action="store_true",
                   help="publish the API schema at /openapi.json (for fuzzers and client generators)")
    p.add_argument("--engine-stall-s", type=float, default=120.0, metavar="S",
                   help="/health answers 503 while one engine step has run longer than this (default 120)")
    p.add_argument("--admin-key", default=None,
                   help="enables POST /v1/load_lora_adapter and /v1/unload_lora_adapter (X-Admin-Key header)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="interactive terminal chat with streaming")
    _add_engine_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="generate a completion for one prompt")
    _add_engine_args(p)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.set_defaults(func=cmd_generate)

    from bastion.adapters.cli import add_scan_parser

    add_scan_parser(sub)

    bench = sub.add_parser("bench", help="benchmarks (write JSON + PNG)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from bastion.bench.cli import add_bench_parsers

    add_bench_parsers(bench_sub)
    _optional_parsers(sub, bench_sub)
    return parser


def _optional_parsers(sub, bench_sub) -> None:
    """Federated fine-tuning needs the `federated` extra (Flower, Opacus); without it the
    commands still exist and say what to install."""
    ft_sub = sub.add_parser("finetune", help="private fine-tuning").add_subparsers(dest="finetune", required=True)
    from bastion.bench.federated import add_bench_parser
    from bastion.federated.cli import add_finetune_parser

    for add, target in ((add_finetune_parser, ft_sub), (add_bench_parser, bench_sub)):
        try:
            add(target)
        except ImportError as e:
            target.add_parser("federated", help="(needs the 'federated' extra)").set_defaults(
                func=lambda _args, missing=str(e): _needs_federated(missing))


def _needs_federated(missing: str) -> int:
    print(f"bastion: federated fine-tuning needs the 'federated' extra ({missing}): "
          "pip install 'bastion[federated]'", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bastion.engine.models.arch import UnsupportedModelError
    from bastion.engine.outputs import EngineError

    try:
        return int(args.func(args) or 0)
    except (ValueError, UnsupportedModelError, EngineError, OSError) as e:
        print(f"bastion {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, ValueError) else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
