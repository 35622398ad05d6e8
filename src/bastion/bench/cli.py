"""`bastion bench serving|offline|lora|kv-quality|kv-memory|...`: argument parsing and the glue that starts servers,
runs a benchmark and writes JSON + PNG + a Markdown table to --out.

`add_bench_parsers(subparsers)` is what `bastion.cli` wires under `bastion bench`;
`python -m bastion.bench.cli serving|offline` runs the same thing stand-alone.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bastion.bench import peers
from bastion.bench.report import write_report


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _peer(text: str) -> tuple[str, str]:
    kind, sep, python = text.partition("=")
    if not sep or kind not in peers.PEER_KINDS or not python:
        raise argparse.ArgumentTypeError(f"--peer wants KIND=/path/to/python with KIND in {peers.PEER_KINDS}")
    return kind, python


def add_bench_parsers(subparsers: Any) -> None:
    s = subparsers.add_parser("serving", help="HTTP load test of Bastion (and peers) over /v1/completions")
    s.add_argument("--url", help="benchmark this running server instead of starting Bastion")
    s.add_argument("--model-name", help="model id to send with --url (default: first of /v1/models)")
    s.add_argument("--api-key", help="Bearer key for --url")
    s.add_argument("--model", help="model Bastion serves (default: the embedded SmolLM2 GGUF)")
    s.add_argument("--tokenizer", help="tokenizer for the prompts (default: --model's)")
    s.add_argument("--bastion-python", default=sys.executable, help="python that runs `bastion.cli serve`")
    s.add_argument("--bastion-arg", action="append", default=[], help="extra arg for `bastion serve` (repeat)")
    s.add_argument("--no-bastion", action="store_true", help="only the peers (first peer is the reference)")
    s.add_argument("--peer", action="append", type=_peer, default=[], metavar="KIND=PYTHON",
                   help=f"also start a peer from that venv's python; KIND in {peers.PEER_KINDS}")
    s.add_argument("--hf-dir", default=peers.DEFAULT_HF_DIR, help="HF-format export for transformers/vLLM")
    s.add_argument("--hf-dtype", default="auto", help="transformers serve --dtype (auto = fp32 export)")
    s.add_argument("--vllm-compiled", action="store_true", help="vLLM without --enforce-eager (slow start)")
    s.add_argument("--concurrency", type=_ints, default=(1, 4, 16, 32), help="levels, e.g. 1,4,16,32")
    s.add_argument("--input-len", type=int, default=256)
    s.add_argument("--output-len", type=int, default=128)
    s.add_argument("--range-ratio", type=float, default=0.25, help="lengths uniform in len*(1±r)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--prompt-format", choices=("ids", "text"), default="ids",
                   help="prompt as token ids or text (peers without id support always get text)")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--rounds", type=int, default=2, help="requests per level = max(min, rounds*concurrency)")
    s.add_argument("--min-requests", type=int, default=4)
    s.add_argument("--warmup", type=int, default=2, help="warm-up requests per server")
    s.add_argument("--request-timeout", type=float, default=300.0)
    s.add_argument("--level-timeout", type=float, default=600.0)
    s.add_argument("--time-limit", type=float, default=3 * 3600.0, help="whole run, seconds")
    s.add_argument("--threads", type=int, default=2, help="threads for every server started")
    s.add_argument("--text-dir", default="/usr/share/common-licenses")
    s.add_argument("--out", default="bench_results/serving")
    s.add_argument("--replicas", type=_ints, default=None, metavar="N,N",
                   help="Bastion on Ray Serve with these replica counts (0: the plain server), --threads each: "
                        "throughput, prefix-affinity hit rate (bench/serving_cluster.py)")
    s.add_argument("--kill", action="store_true", help="with --replicas: also kill a replica under load")
    s.set_defaults(func=run_serving_cmd)

    o = subparsers.add_parser("offline", help="prefill/decode tok/s of the engine vs HF generate")
    o.add_argument("--model", help="GGUF file (default: the embedded SmolLM2)")
    o.add_argument("--engines", default="bastion,hf-fp32,hf-bf16",
                   help="comma list of bastion, hf-fp32, hf-bf16; the first is the reference")
    o.add_argument("--bastion-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    o.add_argument("--prompt-len", type=int, default=256)
    o.add_argument("--new-tokens", type=int, default=128)
    o.add_argument("--batch", type=int, default=8)
    o.add_argument("--runs", type=int, default=3)
    o.add_argument("--threads", type=int, default=2)
    o.add_argument("--time-limit", type=float, default=3600.0)
    o.add_argument("--text-dir", default="/usr/share/common-licenses")
    o.add_argument("--out", default="bench_results/offline")
    o.set_defaults(func=run_offline_cmd)

    from bastion.bench.weights import add_bench_parser as add_weights_parser

    add_weights_parser(subparsers)

    from bastion.bench.moe import add_bench_parser as add_moe_parser

    add_moe_parser(subparsers)

    from bastion.bench.moe_bounds import add_bench_parser as add_moe_bounds_parser

    add_moe_bounds_parser(subparsers)

    lo = subparsers.add_parser("lora", help="batch of N requests on N adapters vs the base model")
    lo.add_argument("--batch", type=int, default=8)
    lo.add_argument("--rank", type=int, default=16)
    lo.add_argument("--prompt-len", type=int, default=256)
    lo.add_argument("--new-tokens", type=int, default=64)
    lo.add_argument("--runs", type=int, default=5)
    lo.add_argument("--threads", type=int, default=2)
    lo.add_argument("--targets", default="q_proj,v_proj",
                    help="comma-separated projections each adapter targets (default PEFT's for Llama; 'all' = 7)")
    lo.add_argument("--out", default="bench_results/lora")
    lo.set_defaults(func=run_lora_cmd)

    q = subparsers.add_parser("kv-quality", help="quantized KV cache: delta PPL, top-1 agreement, passkey, bytes")
    q.add_argument("--configs", type=_variants, default=None, metavar="LIST",
                   help="comma list of kind or name=kind[:gG][:vgN][:rR][:sS][:had][:clip][:torch] (default: fp16, int8, kivi4, "
                        "kivi2, k4v2, k2v4, kivi and variants); the fp32 reference always runs")
    q.add_argument("--contexts", type=_ints, default=(2048, 4096, 8192), help="teacher-forcing contexts")
    q.add_argument("--steps", type=int, default=128, help="teacher-forced decode steps per context")
    q.add_argument("--chunk", type=int, default=512, help="prefill chunk")
    q.add_argument("--passkey-contexts", type=_ints, default=(4096, 8192))
    q.add_argument("--passkey-depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths (fractions)")
    q.add_argument("--model", help="GGUF file or HF dir (default: the embedded SmolLM2)")
    q.add_argument("--max-model-len", type=int, default=8192)
    q.add_argument("--hf-python", help="python of a venv with transformers + optimum-quanto: adds HF "
                   "QuantizedCache int4/int2 peers (see bastion/bench/kv_quality.py)")
    q.add_argument("--hf-dir", default=peers.DEFAULT_HF_DIR, help="HF-format export of the model for the peers")
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--text-dir", default="/usr/share/common-licenses")
    q.add_argument("--out", default="bench_results/kv_quality")
    q.set_defaults(func=run_kv_quality_cmd)

    m = subparsers.add_parser("kv-memory", help="quantized KV cache: decode latency vs context, tokens and "
                              "throughput at a fixed KV byte budget")
    m.add_argument("--configs", type=_variants, default=None, metavar="LIST",
                   help="comma list like --configs of kv-quality (default: bf16, fp16, int8, kivi4, kivi2, kivi)")
    m.add_argument("--contexts", type=_ints, default=(512, 1024, 2048, 4096, 8192))
    m.add_argument("--steps", type=int, default=64, help="timed decode steps per context")
    m.add_argument("--kv-memory", type=float, default=0.05, metavar="GB", help="KV budget for the batch sweep")
    m.add_argument("--batches", type=_ints, default=(1, 2, 4, 8, 16, 32, 64))
    m.add_argument("--repeats", type=int, default=3, help="interleaved runs per batch size (median reported)")
    m.add_argument("--prompt-len", type=int, default=512)
    m.add_argument("--new-tokens", type=int, default=64)
    m.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    m.add_argument("--model", help="GGUF file or HF dir (default: the embedded SmolLM2)")
    m.add_argument("--max-model-len", type=int, default=8192)
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--text-dir", default="/usr/share/common-licenses")
    m.add_argument("--out", default="bench_results/kv_memory")
    m.set_defaults(func=run_kv_memory_cmd)

    from bastion.bench.cleangen import add_cleangen_parser
    from bastion.bench.fairness import add_fairness_parser
    from bastion.bench.guard import add_guard_parser
    from bastion.bench.hardening import add_hardening_parsers
    from bastion.bench.security_cli import add_security_parser

    add_security_parser(subparsers)
    add_cleangen_parser(subparsers)
    add_fairness_parser(subparsers)
    add_guard_parser(subparsers)
    add_hardening_parsers(subparsers)


def _variants(text: str) -> tuple[Any, ...]:
    from bastion.bench.kv_quality import parse_variant

    try:
        return tuple(parse_variant(x.strip()) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def run_kv_quality_cmd(args: argparse.Namespace) -> int:
    from bastion.bench import kv_quality as kq
    from bastion.bench import plots

    try:
        cfg = kq.KVQualityConfig(contexts=args.contexts, steps=args.steps, chunk=args.chunk,
                                 passkey_contexts=args.passkey_contexts, passkey_depths=_floats(args.passkey_depths),
                                 max_model_len=args.max_model_len, threads=args.threads, text_dir=args.text_dir,
                                 model=args.model, variants=args.configs or kq.DEFAULT_VARIANTS)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hf_dir = ""
    if args.hf_python:
        gguf = args.model if args.model and args.model.endswith(".gguf") else None
        hf_dir = str(peers.export_hf_model(gguf, args.hf_dir).resolve())
    result = kq.run_kv_quality(cfg, hf_python=args.hf_python, hf_dir=hf_dir)
    write_report(Path(args.out), "kv_quality", result, plots.kv_quality_table(result), plots.plot_kv_quality)
    return 0


def run_kv_memory_cmd(args: argparse.Namespace) -> int:
    from bastion.bench import kv_memory as km

    try:
        cfg = km.KVMemoryConfig(contexts=args.contexts, steps=args.steps, kv_memory_gb=args.kv_memory,
                                batches=args.batches, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                dtype=args.dtype, max_model_len=args.max_model_len, threads=args.threads,
                                text_dir=args.text_dir, model=args.model, variants=args.configs or km.DEFAULT_VARIANTS,
                                repeats=args.repeats)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = km.run_kv_memory(cfg)
    write_report(Path(args.out), "kv_memory", result, km.kv_memory_table(result), km.plot_kv_memory)
    return 0


def _lora_targets(text: str) -> tuple[str, ...]:
    from bastion.engine.lora.peft import SUB_TO_FUSED

    return tuple(SUB_TO_FUSED) if text.strip() == "all" else tuple(t.strip() for t in text.split(",") if t.strip())


def run_lora_cmd(args: argparse.Namespace) -> int:
    from bastion.bench.lora import LoraBenchConfig, plot_lora, run_lora_bench
    from bastion.bench.workload import load_corpus_text

    cfg = LoraBenchConfig(batch=args.batch, rank=args.rank, prompt_len=args.prompt_len,
                          new_tokens=args.new_tokens, runs=args.runs, threads=args.threads,
                          targets=_lora_targets(args.targets))
    result = run_lora_bench(cfg, load_corpus_text())
    table = (f"| batch | rank | targets | base decode tok/s | {cfg.batch} adapters decode tok/s | "
             f"ratio (median of paired runs) | ratio of medians |\n"
             f"|---|---|---|---|---|---|---|\n| {cfg.batch} | {cfg.rank} | {','.join(cfg.targets)} | "
             f"{result['median_decode_tok_s']['base']:.1f} | {result['median_decode_tok_s']['lora']:.1f} | "
             f"{result['lora_over_base']:.2f} | {result['ratio_of_medians']:.2f} |")
    write_report(Path(args.out), "lora", result, table, plot_lora)
    return 0


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so `with` blocks run and the servers we started die too."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _specs(args: argparse.Namespace) -> list[peers.ServerSpec]:
    specs = []
    if not args.url and not args.no_bastion:
        specs.append(peers.bastion_spec(args.bastion_python, peers.free_port(), args.model,
                                        args.threads, args.bastion_arg))
    kinds = {k for k, _ in args.peer}
    hf_dir = str(peers.export_hf_model(args.model if args.model and args.model.endswith(".gguf") else None,
                                       args.hf_dir).resolve()) if kinds & {"transformers", "vllm"} else ""
    gguf = args.model if args.model and args.model.endswith(".gguf") else str(peers.default_gguf_path())
    for kind, python in args.peer:
        port = peers.free_port()
        if kind == "transformers":
            specs.append(peers.transformers_spec(python, port, hf_dir, args.threads, args.hf_dtype))
        elif kind == "llamacpp":
            specs.append(peers.llamacpp_spec(python, port, gguf, args.threads))
        else:
            specs.append(peers.vllm_spec(python, port, hf_dir, args.threads, eager=not args.vllm_compiled))
    return specs


def run_serving_cmd(args: argparse.Namespace) -> int:
    from bastion.bench import plots, serving

    try:
        workload = serving.WorkloadConfig(args.input_len, args.output_len, args.range_ratio, args.seed,
                                          args.text_dir)
        cfg = serving.ServingConfig(args.concurrency, args.rounds, args.min_requests, args.repeats,
                                    args.warmup, args.request_timeout, args.level_timeout, args.time_limit)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.url is None and args.no_bastion and not args.peer:
        print("error: nothing to benchmark (--no-bastion and no --peer)", file=sys.stderr)
        return 2
    tokenizer = peers.load_tokenizer(args.tokenizer or args.model)
    corpus = tokenizer.encode(serving.load_corpus_text(args.text_dir), add_special_tokens=False)
    out = Path(args.out)
    if args.replicas:
        return _run_cluster_bench(args, corpus, tokenizer, workload, cfg, out)
    with _sigterm_unwinds(), contextlib.ExitStack() as stack:
        endpoints = []
        if args.url:
            url = args.url.rstrip("/")
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            name = args.model_name or _first_model(url, headers)
            endpoints.append(peers.Endpoint("bastion", url, name, prompt_format=args.prompt_format,
                                            headers=headers))
        # Start every server first, then wait: their start-ups overlap.
        procs = [stack.enter_context(_owned(peers.ServerProcess(spec, out / "logs")))
                 for spec in _specs(args)]
        for proc in procs:
            print(f"waiting for {proc.spec.name} ({' '.join(proc.spec.argv[:4])} ...)", flush=True)
            proc.wait_ready()
            endpoints.append(peers.Endpoint(proc.spec.name, proc.spec.base_url, proc.model_name(),
                                            proc.spec.dialect, args.prompt_format,
                                            peers.end_token_ids(tokenizer)))
        result = serving.run_serving(endpoints, corpus, tokenizer, workload, cfg)
    write_report(out, "serving", result, plots.serving_table(result), plots.plot_serving)
    return 0


def _run_cluster_bench(args: argparse.Namespace, corpus, tokenizer, workload, cfg, out: Path) -> int:
    from bastion.bench import serving_cluster

    try:
        bench = serving_cluster.ClusterBenchConfig(replicas=args.replicas, threads=args.threads, kill=args.kill)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with _sigterm_unwinds():
        result = serving_cluster.run_cluster_bench(args.bastion_python, corpus, tokenizer, workload, cfg, bench,
                                                   out, args.bastion_arg)
    write_report(out, "serving_cluster", result, serving_cluster.table(result), serving_cluster.plot)
    return 0


@contextlib.contextmanager
def _owned(proc: peers.ServerProcess) -> Iterator[peers.ServerProcess]:
    try:
        yield proc
    finally:
        proc.stop()


def _first_model(url: str, headers: dict[str, str]) -> str:
    import httpx

    resp = httpx.get(f"{url}/v1/models", headers=headers, timeout=10.0, trust_env=False)
    resp.raise_for_status()
    return str(resp.json()["data"][0]["id"])


def run_offline_cmd(args: argparse.Namespace) -> int:
    from bastion.bench import offline, plots

    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    bad = [n for n in names if n not in offline.ENGINE_NAMES]
    if bad or not names:
        print(f"error: unknown engines {bad}; choose from {offline.ENGINE_NAMES}", file=sys.stderr)
        return 2
    try:
        cfg = offline.OfflineConfig(args.prompt_len, args.new_tokens, args.batch, args.runs, args.threads,
                                    args.text_dir, args.time_limit)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch  # after validation: a bad flag should not wait for torch to import

    gguf = args.model or str(peers.default_gguf_path())
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # HF and Bastion share this process: same pool for both
    try:
        prompts = offline.make_prompts(peers.load_tokenizer(gguf), cfg)
        hf = {e.name: e for e in offline.load_hf_engines(
            gguf, [d for n, d in (("hf-fp32", "float32"), ("hf-bf16", "bfloat16")) if n in names])}
        engines: list[Any] = []
        for n in names:
            if n == "bastion":
                try:
                    engines.append(offline.BastionEngine(gguf, args.bastion_dtype, cfg.threads))
                except ImportError as exc:
                    print(f"error: Bastion's engine is not importable ({exc}); "
                          "use --engines hf-fp32,hf-bf16 to measure HF alone", file=sys.stderr)
                    return 2
            else:
                engines.append(hf[n])
        result = offline.run_offline(engines, prompts, cfg)
    finally:
        torch.set_num_threads(previous_threads)
    write_report(Path(args.out), "offline", result, plots.offline_table(result), plots.plot_offline)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bastion bench")
    add_bench_parsers(parser.add_subparsers(dest="bench", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
