"""`bastion bench moe`: expert offload under a RAM budget, four policies on the same traces.

The model: the embedded SmolLM2-135M upcycled to a Mixtral with 8 experts, top-2 (every
expert a copy of its layer's dense MLP, so its logits are the dense model's: upcycle.py),
written once under --work-dir as a bf16 HF directory (or, with --experts Q8_0|Q4_0, as a
GGUF whose experts are stored in that type and run through the weight path's kernels, fp32
activations: a user's quantized Mixtral file). Experts are ~92% of its bytes
(Mixtral's proportions). Random routers route near-uniformly, so the routers are given a
skew: each layer's router rows get a per-expert logit offset along the mean of that
layer's MoE input (measured on the dense model over a profiling text), a shuffled
linspace(+skew, -skew) per layer: "popular" experts, as trained routers have, with the
token-to-token locality of real hidden states. The skew is synthetic, and said so.

Per policy (resident, fiddler, lru, bastion) and page-cache mode (cold: the file's pages
dropped after every read, so the page cache never acts as a second, unbudgeted cache;
warm: the whole file left in the page cache, disk reads = RAM copies), one engine is
built with the experts offloaded under the budget (--budget, a fraction of the expert
bytes); Fiddler and Bastion get the same popularity profile from the profiling prompts
(Fiddler's offline profiling); then the measured prompts are served twice, batch 1,
greedy: pass 1 from the start state ("cold" hit rate), pass 2 ("warm" hit rate, and the
decode ms/token reported). Decode only: prefill steps are excluded from times and bytes.
Every policy must produce the same tokens (checked): the traces are the same by
construction.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

POLICIES = ("resident", "fiddler", "lru", "bastion")
_STAT_KEYS = ("lookups", "hits", "waited", "streamed", "fetched", "bytes_read", "tokens", "wait_ms",
              "prefetch_issued", "prefetch_skipped", "predicted", "predicted_used", "next_used")


def _texts() -> list[str]:
    p = Path("/usr/share/common-licenses/GPL-3")
    text = p.read_text() if p.exists() else " ".join(f"word{i}" for i in range(20000))
    return [text[i * 3000:(i + 1) * 3000] for i in range(8)]


def build_model_dir(work: Path, experts: int = 8, top_k: int = 2, skew: float = 1.0, seed: int = 0,
                    spread: float = 2.0, expert_type: str = "bf16") -> Path:
    """The upcycled, skew-routed SmolLM2 (made once, then reused): a bf16 HF directory, or
    with expert_type Q8_0/Q4_0 a GGUF file whose experts are stored in that type (the rest
    F32), as a user's quantized Mixtral GGUF is."""
    import torch

    from bastion.engine.kv_cache.base import AttentionMetadata, PrefillSegment
    from bastion.engine.kv_cache.fp import FPKVCache
    from bastion.engine.models.llama import LlamaForCausalLM
    from bastion.engine.models.loader import load_checkpoint
    from bastion.engine.models.upcycle import save_gguf, save_hf_dir, upcycle

    out = work / f"smollm2-e{experts}k{top_k}-skew{skew:g}-spread{spread:g}-s{seed}"
    if expert_type != "bf16":
        out = out.with_name(out.name + f"-{expert_type}.gguf")
    if out.is_file() or (out / "model.safetensors.index.json").is_file():
        return out
    ckpt = load_checkpoint(None, show_progress=False, quantize="none")
    a = ckpt.arch
    dense = LlamaForCausalLM(a, 1024)
    dense.load_hf_state_dict(ckpt.weights)
    means = [torch.zeros(a.hidden_size) for _ in range(a.num_layers)]
    sumsq, seen = [0.0] * a.num_layers, [0] * a.num_layers

    def hook(i):
        def f(_mod, args, _out):
            means[i] += args[0].float().sum(0)
            sumsq[i] += float(args[0].float().pow(2).sum())
            seen[i] += args[0].shape[0]
        return f
    for i, layer in enumerate(dense.layers):
        layer.gate_up_proj.register_forward_hook(hook(i))
    ids = _tokenizer().encode(_texts()[7])[:512]
    kv = FPKVCache(num_layers=a.num_layers, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim,
                   num_blocks=32, block_size=16, dtype=torch.float32, device=torch.device("cpu"))
    slots = torch.arange(len(ids))
    meta = AttentionMetadata(slot_mapping=slots, prefills=[PrefillSegment(0, len(ids), slots)])
    with torch.inference_mode():
        dense(torch.tensor(ids), slots, meta, kv)
    gen = torch.Generator().manual_seed(seed)
    routers = []
    for i in range(a.num_layers):
        # NOTE: SmolLM2's MoE inputs share one dominant direction (their mean m); a random
        # router sees mostly m and sends every token to the same two experts. So the random
        # part is taken orthogonal to m and scaled to logits of std `spread` over the
        # token-specific part (h - m), and the popularity offsets go along m.
        m = means[i] / seen[i]
        var = max(sumsq[i] / seen[i] - float(m.dot(m)), 1e-6)  # E|h - m|^2
        r = torch.randn(experts, a.hidden_size, generator=gen)
        r -= (r @ m)[:, None] * (m / m.dot(m))[None, :]
        r *= spread / var ** 0.5
        offsets = torch.linspace(skew, -skew, experts)[torch.randperm(experts, generator=gen)]
        routers.append(r + offsets[:, None] * (m / m.dot(m))[None, :])
    cfg, weights = upcycle(a, ckpt.weights, experts, top_k, routers=routers)
    tmp = out.with_name(out.name + ".tmp")
    work.mkdir(parents=True, exist_ok=True)
    if expert_type != "bf16":
        save_gguf(tmp, cfg, weights, expert_type)
    else:
        save_hf_dir(tmp, cfg, weights, dtype=torch.bfloat16)
    for f in ([tmp] if tmp.is_file() else tmp.glob("*.safetensors")):  # written back: the page cache can be dropped
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    tmp.rename(out)
    return out


def _format(path: Path):
    """How the model's experts run: bf16 dense (the HF directory), or a GGUF's quantized
    experts in fp32 activations through the weight path's kernel."""
    import torch

    from bastion.engine.models.expert_format import ExpertFormat
    from bastion.engine.models.quant_linear import load_qkernel

    return ExpertFormat(torch.float32, load_qkernel()) if path.is_file() else ExpertFormat(torch.bfloat16)


def _engine(path: Path, policy: str, budget: int, cold: bool, cost, threads: int):
    import torch

    from bastion.config import CacheConfig, Config, ModelConfig, SchedulerConfig
    from bastion.engine.kv_cache.factory import build_kv_cache
    from bastion.engine.llm_engine import LLMEngine
    from bastion.engine.models.loader import load_checkpoint
    from bastion.engine.models.moe_offload import build_offloaded

    torch.set_num_threads(threads)
    config = Config(model=ModelConfig(path=str(path), threads=threads, max_model_len=512),
                    cache=CacheConfig(num_blocks=64, block_size=16, prefix_caching=False),
                    scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=512))
    ckpt = load_checkpoint(str(path), show_progress=False, skip_experts=True)
    fmt = _format(path)
    model, off = build_offloaded(ckpt, dtype=fmt.dtype, max_len=512, policy=policy, budget_bytes=budget,
                                 drop_page_cache=cold, cost=cost, kernel=fmt.kernel)
    kv = build_kv_cache(config, ckpt.arch, fmt.dtype, torch.device("cpu"))
    engine = LLMEngine(config, model, kv, vocab_size=ckpt.arch.vocab_size, eos_token_id=None, max_model_len=512)
    return engine, off


def _serve(engine, off, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float, dict]:
    """Each prompt alone, greedy, EOS ignored: (tokens, decode ms/token, decode-only stats)."""
    from bastion.engine.sampling_params import SamplingParams

    tokens, decode_s, n_decode = [], 0.0, 0
    totals = dict.fromkeys(_STAT_KEYS, 0)
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}-{time.monotonic_ns()}", ids, SamplingParams(max_tokens=new, temperature=0,
                                                                               ignore_eos=True))
        out, first = [], True
        while engine.has_unfinished():
            before = {k: getattr(off.stats, k) for k in _STAT_KEYS}
            t0 = time.perf_counter()
            res = engine.step()
            dt = time.perf_counter() - t0
            for r in res:
                out += r.new_token_ids
            if not first:  # prefill (and its first token) is not decode
                decode_s += dt
                n_decode += 1
                for k in _STAT_KEYS:
                    totals[k] += getattr(off.stats, k) - before[k]
            first = False
        tokens.append(out)
    s = totals
    s["hit_rate"] = s["hits"] / s["lookups"] if s["lookups"] else 0.0
    s["bytes_per_token"] = s["bytes_read"] / n_decode if n_decode else 0.0
    s["prefetch_recall"] = s["predicted_used"] / s["next_used"] if s["next_used"] else 0.0
    s["prefetch_precision"] = s["predicted_used"] / s["predicted"] if s["predicted"] else 0.0
    return tokens, 1e3 * decode_s / max(1, n_decode), s


def run_moe(work: Path, *, budget_frac: float, prompts: int, prompt_len: int, new_tokens: int,
            modes: tuple[str, ...], policies: tuple[str, ...], threads: int, skew: float,
            expert_type: str = "bf16") -> dict[str, Any]:
    import torch

    from bastion.engine.models.expert_store import ExpertStore
    from bastion.engine.models.moe_cost import calibrate
    path = build_model_dir(work, skew=skew, expert_type=expert_type)
    tok = _tokenizer()
    texts = _texts()
    measured = [tok.encode(t)[:prompt_len] for t in texts[:prompts]]
    profile = [tok.encode(t)[:prompt_len] for t in texts[4:6]]
    store = ExpertStore.open(path)
    budget = int(budget_frac * store.total_bytes)
    result: dict[str, Any] = {"model": str(path), "expert_bytes_total": store.total_bytes, "budget_bytes": budget,
                              "budget_frac": budget_frac, "experts": len(store.spans), "prompts": prompts,
                              "prompt_len": prompt_len, "new_tokens": new_tokens, "threads": threads,
                              "skew": skew, "expert_type": expert_type, "machine": _machine(), "runs": [],
                              "cost_models": {}}
    torch.set_num_threads(threads)
    popularity = None
    ref_tokens = None
    for mode in modes:
        cold = mode == "cold"
        cstore = ExpertStore.open(path, drop_page_cache=cold)
        if not cold:
            for f in cstore.files:  # the whole file into the page cache
                while os.read(f.fd, 1 << 24):
                    pass
        cost = calibrate(cstore, _format(path))
        result["cost_models"][mode] = cost.as_dict()
        for policy in policies:
            if cold:
                cstore.drop_all()
            engine, off = _engine(path, policy, budget, cold, cost, threads)
            if popularity is None:  # the offline profile (any policy routes the same)
                _serve(engine, off, profile, 8)
                popularity = dict(off.counts)
            if policy in ("fiddler", "bastion"):
                off.place(popularity)
            off.reset_stats()
            toks1, ms1, s1 = _serve(engine, off, measured, new_tokens)
            toks2, ms2, s2 = _serve(engine, off, measured, new_tokens)
            off.close()
            ref_tokens = ref_tokens or toks1
            if toks1 != ref_tokens or toks2 != ref_tokens:
                raise RuntimeError(f"{policy}/{mode}: tokens differ from the first policy's: offload changed numbers")
            run = {"policy": policy, "mode": mode, "decode_ms_per_token": ms2, "decode_ms_per_token_pass1": ms1,
                   "hit_rate_cold": s1["hit_rate"], "hit_rate_warm": s2["hit_rate"],
                   "bytes_per_token": s2["bytes_per_token"], "bytes_per_token_pass1": s1["bytes_per_token"],
                   "prefetch_recall": s2["prefetch_recall"], "prefetch_precision": s2["prefetch_precision"],
                   "stats_pass2": s2}
            result["runs"].append(run)
            print(f"{mode:5s} {policy:9s} decode {ms2:7.1f} ms/tok (pass1 {ms1:7.1f})  hit {s1['hit_rate']:.2f}/"
                  f"{s2['hit_rate']:.2f}  {s2['bytes_per_token'] / 2**20:7.1f} MiB/tok  prefetch recall "
                  f"{s2['prefetch_recall']:.2f} precision {s2['prefetch_precision']:.2f}", file=sys.stderr, flush=True)
            del engine, off
    return result


def _tokenizer():
    from bastion.engine.models.loader import embedded_model_path
    from bastion.serving.tokenizer import load_tokenizer

    return load_tokenizer(embedded_model_path())


def _machine() -> dict[str, Any]:
    import platform

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def table(result: dict[str, Any]) -> str:
    runs = result["runs"]
    lines = [f"Budget {result['budget_bytes'] / 2**20:.0f} MiB = {result['budget_frac']:.0%} of "
             f"{result['expert_bytes_total'] / 2**20:.0f} MiB of {result.get('expert_type', 'bf16')} experts; "
             f"{result['prompts']} prompts x "
             f"{result['new_tokens']} decoded tokens, batch 1, {result['threads']} threads; ms/token and bytes "
             "from pass 2; hit rate pass 1 (cold start) / pass 2 (warm).", "",
             "| page cache | policy | decode ms/token | vs resident | bastion speed-up | hit rate cold / warm | "
             "MiB read/token | prefetch recall / precision |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        base = next((x for x in runs if x["mode"] == r["mode"] and x["policy"] == "resident"), None)
        ours = next((x for x in runs if x["mode"] == r["mode"] and x["policy"] == "bastion"), None)
        vs = f"{r['decode_ms_per_token'] / base['decode_ms_per_token']:.2f}x" if base else "-"
        up = f"{r['decode_ms_per_token'] / ours['decode_ms_per_token']:.2f}x" if ours else "-"
        pf = f"{r['prefetch_recall']:.2f} / {r['prefetch_precision']:.2f}" if r["policy"] == "bastion" else "-"
        lines.append(f"| {r['mode']} | {r['policy']} | {r['decode_ms_per_token']:.1f} | {vs} | {up} | "
                     f"{r['hit_rate_cold']:.2f} / {r['hit_rate_warm']:.2f} | "
                     f"{r['bytes_per_token'] / 2**20:.1f} | {pf} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    from bastion.bench.plots import new_figure

    fig = new_figure(10, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    modes = sorted({r["mode"] for r in result["runs"]})
    for j, mode in enumerate(modes):
        rows = [r for r in result["runs"] if r["mode"] == mode]
        xs = [i + 0.4 * j for i in range(len(rows))]
        ax.bar(xs, [r["decode_ms_per_token"] for r in rows], width=0.4, label=f"page cache {mode}")
        ax.set_xticks([i + 0.2 for i in range(len(rows))], [r["policy"] for r in rows])
    ax.set_ylabel("decode ms/token (lower is better)")
    ax.set_title(f"MoE expert offload, budget {result['budget_frac']:.0%} of expert bytes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def add_model_arguments(m: Any, *, prompts: int, prompt_len: int, new_tokens: int, experts: str) -> None:
    """The model, budget and workload options `bench moe` and `bench moe-bounds` share."""
    m.add_argument("--work-dir", default="/tmp/bastion-moe-bench", help="where the upcycled model is written once")
    m.add_argument("--budget", type=float, default=0.5, help="RAM for experts, as a fraction of the expert bytes")
    m.add_argument("--prompts", type=int, default=prompts)
    m.add_argument("--prompt-len", type=int, default=prompt_len)
    m.add_argument("--new-tokens", type=int, default=new_tokens)
    m.add_argument("--skew", type=float, default=1.0, help="router logit offsets +-skew along the mean input")
    m.add_argument("--experts", choices=("bf16", "Q8_0", "Q4_0"), default=experts,
                   help="how the experts are stored: bf16 (an HF directory) or quantized in a GGUF")
    m.add_argument("--threads", type=int, default=2)


def add_bench_parser(subparsers: Any) -> None:
    m = subparsers.add_parser("moe", help="MoE expert offload under a RAM budget: resident / Fiddler / LRU / Bastion")
    add_model_arguments(m, prompts=4, prompt_len=64, new_tokens=32, experts="bf16")
    m.add_argument("--modes", default="cold,warm", help="page-cache modes: cold (dropped after reads), warm")
    m.add_argument("--policies", default=",".join(POLICIES))
    m.add_argument("--out", default="bench_results/moe")
    m.set_defaults(func=run_moe_cmd)


def run_moe_cmd(args: Any) -> int:
    from bastion.bench.report import write_report

    modes = tuple(x for x in args.modes.split(",") if x)
    policies = tuple(x for x in args.policies.split(",") if x)
    bad = [x for x in modes if x not in ("cold", "warm")] + [x for x in policies if x not in POLICIES]
    if bad or not 0 < args.budget <= 1 or min(args.prompts, args.prompt_len, args.new_tokens) < 1:
        print(f"error: bad arguments {bad or ''} (modes cold,warm; policies {POLICIES}; 0 < budget <= 1)",
              file=sys.stderr)
        return 2
    result = run_moe(Path(args.work_dir), budget_frac=args.budget, prompts=args.prompts, prompt_len=args.prompt_len,
                     new_tokens=args.new_tokens, modes=modes, policies=policies, threads=args.threads, skew=args.skew,
                     expert_type=args.experts)
    write_report(Path(args.out), "moe", result, table(result), plot)
    return 0
