"""`bastion` command line: serve, chat, generate, models, scan, bench, finetune.

Sub-commands of other subsystems (bench, finetune) register their own parsers; this
file only composes them. Every user error ends as one line naming the problem and a
non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from bastion.cli_args import (
    add_engine_args,
    add_local_adapter_args,
    add_serve_args,
    config_from_args,
)
from bastion.cli_config import ConfigFileParser, add_config_arg
from bastion.config import Config

EXIT_USAGE = 2


def _config(args: argparse.Namespace) -> Config:
    """The whole Config from flags (see cli_args.py)."""
    return config_from_args(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from bastion.server import run_server
    from bastion.server.adapter_loads import vet_at_start
    from bastion.server.bind import bind_socket
    from bastion.serving.async_engine import AsyncEngine
    from bastion.serving.policy import ServingPolicy

    config = _config(args)  # every flag is checked before the model loads
    if config.cluster.enabled:  # N engines on Ray Serve behind one front (server/cluster/)
        from bastion.server.cluster import run_cluster

        return run_cluster(config, gate_factory=serve_gate)
    if config.adapters.enabled and config.adapters.behaviour_scan and config.adapters.scan_cache:
        Path(config.adapters.scan_cache).expanduser().mkdir(parents=True, exist_ok=True)  # a bad DIR fails now
    # the address too: a taken port fails now, in one line, not after the model loaded
    sock = bind_socket(config.server.host, config.server.port)
    try:
        engine = AsyncEngine.from_config(config, background=False)  # run_server gives it the main thread
        gate = serve_gate(config, engine.model_name)
        if gate is not None:
            engine.engine.enable_adapters(config.adapters)
        policy = ServingPolicy.from_config(config, gate)
        # a static fail stops the start here; the others are served once their scan passes
        pending = vet_at_start(policy, engine, config.adapters.loras)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    print(f"bastion: serving {engine.model_name!r} on http://{config.server.host}:{port}/v1"
          + (" (API key required)" if config.server.api_key else ""), file=sys.stderr)
    if pending:
        print(f"bastion: adapter(s) {', '.join(n for n, _, _ in pending)} pending: each is served once its "
              "behaviour scan passes (~2 min each on 2 cores; GET /v1/lora_adapters shows them)", file=sys.stderr)
    if config.server.web:
        print(f"bastion: chat in a browser at http://{config.server.host}:{port}/", file=sys.stderr)
    state = run_server(engine, config.server, policy=policy, sockets=[sock], pending_adapters=pending)
    if state.adapter_loads.scanning:
        _exit_under_a_scan()
    return 0


def _exit_under_a_scan() -> None:
    """The server shut down cleanly, but a behaviour scan still runs in its daemon thread,
    inside torch's C++ code. Finalizing the interpreter under it aborts the process
    (CPython ends such a thread by unwinding it through C++ frames: std::terminate, exit
    134 for a clean SIGTERM), so leave without finalizing: the scan's verdict is not
    needed, and nothing of it is half-written (the scan cache writes by rename)."""
    logging.getLogger("bastion.serve").info("a behaviour scan was still running: abandoned")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _gate(config: Config, served_name: str | None):
    """chat's and generate's vetting gate: the static checks (None: adapters are off)."""
    if not config.adapters.enabled:
        return None
    from bastion.adapters.gate import VettingGate

    return VettingGate.for_model(config.model.path, served_name=served_name,
                                 allow_unvetted=config.adapters.allow_unvetted)


def serve_gate(config: Config, served_name: str | None):
    """serve's vetting gate (None: adapters are off): static checks, and the behaviour
    scan unless --no-behaviour-scan (its model is built on the first scan)."""
    if not config.adapters.enabled:
        return None
    from bastion.adapters.gate import VettingGate

    scan, cache = config.adapters.behaviour_scan, config.adapters.scan_cache
    if not scan:
        logging.getLogger("bastion.serve").warning(
            "--no-behaviour-scan: adapters are served on the vetting gate's static checks only (artifact, config, "
            "weights); no behaviour scan runs, so a backdoor that shows only in behaviour is served "
            "(docs/SECURITY.md)")
    return VettingGate.for_model(config.model.path, served_name=served_name,
                                 allow_unvetted=config.adapters.allow_unvetted, deep=scan, cache_dir=cache,
                                 threads=config.model.threads)


def _local_llm(config: Config):
    """(LLM, adapter name or None) for chat and generate: the --lora adapter is vetted by
    the same gate as serve's (before the model loads, so a refusal is quick)."""
    from dataclasses import replace

    from bastion.serving.llm import LLM
    from bastion.serving.policy import ServingPolicy

    if not config.adapters.loras:
        return LLM(config), None
    (name, path), = config.adapters.loras
    ServingPolicy.from_config(config, _gate(config, config.model.served_name)).vet(name, path)
    llm = LLM(config)
    llm.engine.enable_adapters(replace(config.adapters, max_loras=1))  # one slot: the one adapter
    llm.engine.adapters.load(name, path)
    return llm, name


def cmd_generate(args: argparse.Namespace) -> int:
    from bastion.engine.sampling_params import SamplingParams
    from bastion.serving.chat_template import encode_chat

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop=tuple(args.stop or ()))
    llm, adapter = _local_llm(_config(args))
    if args.chat:
        prompt = encode_chat(llm.tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        prompt = llm.tokenizer.encode(args.prompt)
    out = llm.generate([prompt], params, adapter=adapter)[0]
    print(out.text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from bastion.chat import run_chat

    llm, adapter = _local_llm(_config(args))
    return run_chat(llm, adapter=adapter, system=args.system, max_tokens=args.max_tokens,
                    temperature=args.temperature)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bastion")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = ConfigFileParser(prog="bastion", description="Run open LLMs privately on your own hardware.")
    parser.add_argument("--version", action="version", version=f"bastion {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(p)
    add_serve_args(p)
    add_config_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="interactive terminal chat with streaming (/help at the prompt)")
    add_engine_args(p)
    add_local_adapter_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    add_config_arg(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="generate a completion for one prompt")
    add_engine_args(p)
    add_local_adapter_args(p)
    p.add_argument("--prompt", "-p", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=64, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    add_config_arg(p)
    p.set_defaults(func=cmd_generate)

    from bastion.cli_models import add_models_parser

    add_models_parser(sub)

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
