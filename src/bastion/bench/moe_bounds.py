"""`bastion bench moe-bounds`: how far any expert-offload policy could go on the traces
`bastion bench moe` measures, independent of this machine's speed.

Served once (experts resident, batch 1, greedy: the bench's model, prompts and passes),
the model's decode steps give a trace, every (layer, step)'s experts, and at every layer
the inputs a look-ahead predictor could use. Then, offline:

- hit rates on pass 2 (after pass 1 from the start state, as the bench reports them) of
  the RAM tier's own replacement rules (expert_cache.RamTier) at the bench's budget: LRU
  copy-on-miss from empty, the static popularity placement (Fiddler), LFU-with-aging with
  admission (Bastion); two bounds: the static placement of pass 2's own most used experts
  (what knowing the frequencies, not the order, gives), and Belady's optimum with bypass
  (evict, or do not admit, whatever is used furthest in the future, from the best start):
  the ceiling of any policy's hit rate;
- recall of the next layer's experts (top-k) by four predictors: this layer's MoE input
  through the next router (EdgeMoE's look-ahead, Bastion's), the residual stream after
  this layer through the next layer's norm and router (exact but for the next layer's
  attention; known only after this layer's experts ran), the previous layer's MoE input
  (two layers ahead), and the same layer's experts at the previous token.

Nothing is timed: the bounds are in hits and guesses, the bench turns them into ms.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

Step = tuple[int, list[int]]  # (layer, experts it ran), one per layer per decode step, in order


def hit_rates(trace: list[Step], capacity: int, popularity: dict, measure_from: int) -> dict[str, float]:
    """Hit rates over trace[measure_from:] for each replacement rule at `capacity` experts;
    "static_oracle" places the experts most used in that very stretch (the best placement
    that never changes: what frequency alone could reach)."""
    counts: dict = {}
    for layer, experts in trace[measure_from:]:
        for e in experts:
            counts[(layer, e)] = counts.get((layer, e), 0) + 1
    return {"lru": _tier_hits(trace, capacity, "lru", None, measure_from),
            "static": _tier_hits(trace, capacity, "static", popularity, measure_from),
            "lfu": _tier_hits(trace, capacity, "lfu", popularity, measure_from),
            "static_oracle": _tier_hits(trace, capacity, "static", counts, measure_from),
            "belady": belady_hits(trace[measure_from:], capacity)}


def _tier_hits(trace: list[Step], capacity: int, rule: str, popularity: dict | None, measure_from: int) -> float:
    """The RamTier as the offload drives it (moe_offload.ExpertOffload.schedule and run), one
    unit of budget per expert."""
    from bastion.engine.models.expert_cache import RamTier

    tier = RamTier(capacity, rule)
    if popularity:  # ExpertOffload.place
        top = max(popularity.values())
        tier.seed({k: v / top for k, v in popularity.items()})
        for k in sorted(popularity, key=lambda k: -popularity[k])[:capacity]:
            tier.put(k, (), 1)
    hits = uses = 0
    for i, (layer, experts) in enumerate(trace):
        keys = [(layer, e) for e in experts]
        tier.touch_layer(layer, keys)
        tier.pin(keys)
        for k in keys:
            hit = tier.get(k) is not None
            if not hit and (rule == "lru" or tier.would_admit(k, 1)):
                tier.put(k, (), 1)
            if i >= measure_from:
                uses += 1
                hits += hit
    return hits / max(1, uses)


def belady_hits(trace: list[Step], capacity: int) -> float:
    """Belady's MIN with bypass: on a miss, of the cached experts and the missing one, the one
    used furthest in the future is not kept; the cache starts with the first `capacity`
    experts the trace uses (the best start any earlier pass could have left). The optimal hit
    rate over the trace for `capacity` experts, whatever the start. NOTE: an expert that ran
    earlier in the same step may be evicted (it has run); the tier pins a step's experts, so
    this optimum is an upper bound on what the tier's rules could reach, not always reachable."""
    flat = [(layer, e) for layer, experts in trace for e in experts]  # every use, in run order
    never = len(flat) + 1
    nxt, last = [never] * len(flat), {}
    for j in range(len(flat) - 1, -1, -1):  # the use at which each use's expert is used next
        nxt[j] = last.get(flat[j], never)
        last[flat[j]] = j
    cache: dict = {}  # key -> its next use
    for j, k in enumerate(flat):
        if len(cache) == capacity:
            break
        cache.setdefault(k, j)
    hits = 0
    for j, k in enumerate(flat):
        hit = k in cache
        hits += hit
        if hit:
            cache[k] = nxt[j]
            continue
        if len(cache) < capacity:
            cache[k] = nxt[j]
            continue
        v = max(cache, key=cache.get)
        if cache[v] > nxt[j]:
            del cache[v]
            cache[k] = nxt[j]
    return hits / max(1, len(flat))


def recall(guesses: list[set[int]], used: list[list[int]]) -> float:
    """Share of the experts used that the guesses (same length, one set per step) named."""
    named = sum(len(g & set(u)) for g, u in zip(guesses, used))
    return named / max(1, sum(len(u) for u in used))


def record(path: Path, prompts: list[list[int]], profile: list[list[int]], new_tokens: int,
           threads: int) -> dict[str, Any]:
    """Serve the prompts twice with every expert resident; return the trace, each decode
    step's per-layer predictor guesses, and the popularity of the profile prompts' experts
    (Fiddler's offline profile, as bench moe takes it)."""
    import torch

    from bastion.bench.moe import _engine, _serve  # the bench's own engine and serving
    from bastion.engine.models.expert_store import ExpertStore
    from bastion.engine.models.moe_cost import CostModel

    store = ExpertStore.open(path)
    cost = CostModel((1,), (0.0,), (0.0,), 0.0, 1)  # resident: the cost model is never asked
    engine, off = _engine(path, "resident", store.total_bytes, False, cost, threads)
    model = engine.runner.model
    layers, top_k = model.layers, off.top_k
    _serve(engine, off, profile, 8)
    popularity = dict(off.counts)
    steps: list[dict[int, dict[str, torch.Tensor]]] = []
    cur: dict[int, dict[str, torch.Tensor]] = {}

    def on_moe(i):
        def hook(_mod, args):
            if args[0].shape[0] == 1:
                cur.setdefault(i, {})["x"] = args[0].detach().clone()
        return hook

    def on_layer(i):
        def hook(_mod, _args, out):
            if out.shape[0] == 1:
                cur.setdefault(i, {})["r"] = out.detach().clone()
                if i == len(layers) - 1:
                    steps.append(dict(cur))
                    cur.clear()
        return hook
    handles = [h for i, layer in enumerate(layers) if layer.mlp is not None
               for h in (layer.mlp.register_forward_pre_hook(on_moe(i)), layer.register_forward_hook(on_layer(i)))]
    with torch.inference_mode():
        for _ in range(2):
            _serve(engine, off, prompts, new_tokens)
    for h in handles:
        h.remove()

    def top(i, v) -> set[int]:
        return set(torch.topk(layers[i].mlp.gate(v).float(), top_k, dim=-1).indices.reshape(-1).tolist())

    moe = [i for i, layer in enumerate(layers) if layer.mlp is not None]
    guesses: dict[str, list[set[int]]] = {"this layer's MoE input": [], "residual after this layer": [],
                                          "two layers ahead": [], "previous token": []}
    used = []
    with torch.inference_mode():
        ran = [{i: top(i, s[i]["x"]) for i in moe} for s in steps]  # what each MoE layer ran, per step
        for t, s in enumerate(steps):
            for n, (a, b) in enumerate(zip(moe, moe[1:])):
                used.append(sorted(ran[t][b]))
                normed = model.ops.rms_norm(s[a]["r"], layers[b].post_attention_layernorm, layers[b].eps)
                guesses["this layer's MoE input"].append(top(b, s[a]["x"]))
                guesses["residual after this layer"].append(top(b, normed))  # the model's own norm
                guesses["two layers ahead"].append(top(b, s[moe[n - 1] if n else a]["x"]))
                guesses["previous token"].append(ran[t - 1][b] if t else top(b, s[a]["x"]))
    trace = [(i, sorted(r[i])) for r in ran for i in moe]
    off.close()
    return {"trace": trace, "popularity": popularity, "guesses": guesses, "used": used,
            "expert_count": len(store.spans), "expert_bytes_total": store.total_bytes}


def run_bounds(work: Path, *, budget_frac: float, prompts: int, prompt_len: int, new_tokens: int, skew: float,
               expert_type: str, threads: int) -> dict[str, Any]:
    import torch

    from bastion.bench.moe import _texts, _tokenizer, build_model_dir

    torch.set_num_threads(threads)
    path = build_model_dir(work, skew=skew, expert_type=expert_type)
    tok = _tokenizer()
    texts = _texts()
    measured = [tok.encode(t)[:prompt_len] for t in texts[:prompts]]
    profile = [tok.encode(t)[:prompt_len] for t in texts[4:6]]  # as bench moe profiles
    rec = record(path, measured, profile, new_tokens, threads)
    n = rec["expert_count"]
    capacity = int(budget_frac * n)  # every expert is the same size: the budget in experts
    trace = rec["trace"]
    result = {"model": str(path), "budget_frac": budget_frac, "capacity_experts": capacity, "experts": n,
              "prompts": prompts, "prompt_len": prompt_len, "new_tokens": new_tokens, "skew": skew,
              "expert_type": expert_type, "steps": len(trace),
              "hit_rate_pass2": hit_rates(trace, capacity, rec["popularity"], len(trace) // 2),
              "lookahead_recall": {k: recall(g, rec["used"]) for k, g in rec["guesses"].items()}}
    h = result["hit_rate_pass2"]
    print(f"hit rate pass 2 at {capacity}/{n} experts: " + ", ".join(f"{k} {v:.3f}" for k, v in h.items()),
          file=sys.stderr)
    return result


def table(result: dict[str, Any]) -> str:
    h, r = result["hit_rate_pass2"], result["lookahead_recall"]
    names = {"lru": "LRU copy-on-miss", "static": "static popular placement (Fiddler)",
             "lfu": "LFU-aging with admission (Bastion)",
             "static_oracle": "static, placed by the measured pass's own counts (frequency bound)",
             "belady": "Belady's optimum (offline bound)"}
    lines = [f"Budget {result['capacity_experts']} of {result['experts']} experts "
             f"({result['budget_frac']:.0%}); {result['prompts']} prompts x {result['new_tokens']} tokens, "
             f"pass 2 after pass 1.", "", "| replacement | hit rate | misses per 100 uses |", "|---|---|---|"]
    lines += [f"| {names[k]} | {v:.3f} | {100 * (1 - v):.1f} |" for k, v in h.items()]
    lines += ["", "| next layer's experts predicted from | recall |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in r.items()]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    from bastion.bench.plots import new_figure

    fig = new_figure(10, 3.5)
    for j, (key, title) in enumerate((("hit_rate_pass2", "tier hit rate (pass 2)"),
                                      ("lookahead_recall", "look-ahead recall"))):
        ax = fig.add_subplot(1, 2, j + 1)
        d = result[key]
        ax.barh(list(d), list(d.values()))
        ax.set_xlim(0, 1)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    return path


def add_bench_parser(subparsers: Any) -> None:
    from bastion.bench.moe import add_model_arguments

    m = subparsers.add_parser("moe-bounds", help="MoE offload bounds: optimal hit rate, look-ahead recall")
    add_model_arguments(m, prompts=3, prompt_len=48, new_tokens=20, experts="Q4_0")
    m.add_argument("--out", default="bench_results/moe_bounds")
    m.set_defaults(func=run_bounds_cmd)


def run_bounds_cmd(args: Any) -> int:
    from bastion.bench.report import write_report

    if not 0 < args.budget < 1 or min(args.prompts, args.prompt_len, args.new_tokens) < 1:
        print("error: 0 < --budget < 1, and --prompts, --prompt-len, --new-tokens >= 1", file=sys.stderr)
        return 2
    result = run_bounds(Path(args.work_dir), budget_frac=args.budget, prompts=args.prompts,
                        prompt_len=args.prompt_len, new_tokens=args.new_tokens, skew=args.skew,
                        expert_type=args.experts, threads=args.threads)
    write_report(Path(args.out), "moe_bounds", result, table(result), plot)
    return 0
