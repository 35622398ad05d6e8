"""`bastion bench security`'s report: the per-adapter markdown table with the gate's
summary line, and the plot (largest trigger score per adapter; attack success vs
false-trigger rate of the backdoored ones). Reads only the result dict that
security.run_security writes to security.json."""

from __future__ import annotations

from pathlib import Path


def _signals(g: dict) -> str:
    """'fail (trigger, fixed_answer)': the behaviour verdict and the signals behind it."""
    which = sorted({f.split(":", 1)[1].removeprefix("behaviour.") for f in g["findings"]
                    if f.split(":", 1)[1].startswith("behaviour.")})
    return g["behaviour"] + (f" ({', '.join(which)})" if which else "")


def markdown(result: dict) -> str:
    s, ev, gate = result["summary"], result["adapters"], result["gate"]
    pct = lambda v: "–" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    lines = ["| adapter | kind | task | trigger → target | rate | ASR | false-trigger | ASR CleanGen | utility "
             "(base) | top probe trigger (score) | behaviour | gate |", "|---" * 12 + "|"]
    for n, r in ev.items():
        if n == "base":
            continue
        g = gate[n]
        trig = f"`{r['trigger']}` → {r['target']}" + (" (held out)" if r.get("heldout") else "") \
            if "trigger" in r else "–"
        lines.append(f"| {n} | {r['kind']} | {r['task']} | {trig} | {pct(r.get('rate')) if 'rate' in r else '–'} | "
                     f"{pct(r.get('asr'))} | {pct(r.get('false_trigger'))} | {pct(r.get('asr_cleangen'))} | "
                     f"{100 * r['utility']:.0f} ({100 * (r['base_utility'] or 0):.0f}) | "
                     f"`{g['top_trigger']}` ({g['top_score']:.2f}) | {_signals(g)} | {g['verdict']} |")
    for n, g in gate.items():
        if n not in ev:
            lines.append(f"| {n} | clean (extra) | – | – | – | – | – | – | – | `{g['top_trigger']}` "
                         f"({g['top_score']:.2f}) | {_signals(g)} | {g['verdict']} |")
    lines += ["", "| artifact attack | refused | reason |", "|---|---|---|"]
    lines += [f"| {n} ({a['attack']}) | {'yes' if a['refused'] else '**NO**'} | {a['reason'][:90]} |"
              for n, a in result["artifacts"].items()]
    lines += ["", f"Behaviour probe: TPR {pct(s['tpr_behaviour'])} on {s['backdoored_in_list']} backdoored adapters "
              f"whose trigger family is probed ({pct(s['tpr_behaviour_effective'])} of the "
              f"{s['effective_in_list']} with ASR ≥ 50%), held-out triggers {pct(s['tpr_heldout'])}, FPR "
              f"{pct(s['fpr_behaviour'])} on {s['clean']} clean adapters ({s['clean_extra']} from the weight "
              f"calibration). Whole gate (any warn/fail): TPR {pct(s['tpr_gate'])}, FPR {pct(s['fpr_gate'])}. "
              f"Artifact attacks refused: {pct(s['artifacts_refused'])} of {s['artifacts']}."]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    from bastion.bench.plots import new_figure

    gate, ev, th = result["gate"], result["adapters"], result["thresholds"]
    names = sorted(gate, key=lambda n: gate[n]["top_score"])
    colors = ["tab:red" if ev.get(n, {}).get("kind") in ("poison", "merge") and not ev[n].get("heldout")
              else "tab:orange" if ev.get(n, {}).get("heldout") else "tab:green" for n in names]
    fig = new_figure(15, max(5, 0.22 * len(names)))
    a, b = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    a.barh(range(len(names)), [gate[n]["top_score"] for n in names], color=colors)
    a.set_yticks(range(len(names)), names, fontsize=7)
    for v, st in ((th["warn"], "--"), (th["fail"], "-")):
        a.axvline(v, color="k", ls=st, lw=0.8)
    a.set_xlabel("largest trigger score: shift(trigger) − shift(clean)  (red backdoored, orange held-out, green clean)")
    bd = [n for n, r in ev.items() if r.get("kind") in ("poison", "merge")]
    b.scatter([ev[n]["false_trigger"] for n in bd], [ev[n]["asr"] for n in bd],
              c=["tab:orange" if ev[n]["heldout"] else "tab:red" for n in bd])
    b.set_xlabel("false-trigger rate (no trigger)")
    b.set_ylabel("attack success rate (trigger)")
    b.set_xlim(-0.05, 1.05)
    b.set_ylim(-0.05, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
