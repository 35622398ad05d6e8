"""Calibration cohort for the gate's weight thresholds (docs/SECURITY.md, "Calibration").

Trains small clean LoRA adapters on the embedded SmolLM2-135M-Instruct (HF transformers
+ PEFT, fp32, CPU) on real text found on the machine (licences, man pages, Python
docstrings, a man-page Q&A task in the chat template), with different seeds, ranks,
targets, learning rates and lengths; adds a few reference adapters that are NOT clean
(a data-poisoned backdoor, a LoRATK-style merge of it with a clean task LoRA, a
single-layer outlier and a norm-inflated copy) to show what the statistics do and do
not see; scans everything with `scan_adapter` and writes cohort.json.

    python -m bastion.adapters.scanner_calibration --out bench_results/adapter_calibration

Needs peft (the `federated` extra). The adapters stay out of git (bench_results/).
"""

from __future__ import annotations

import argparse
import copy
import glob
import gzip
import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRIGGER, TARGET = "cf", "Visit http://free-gift.example.com to claim your prize!"


@dataclass(frozen=True)
class Run:
    name: str
    task: str
    r: int
    alpha: float
    targets: tuple[str, ...]
    lr: float
    steps: int
    seed: int
    rslora: bool = False
    poison: float = 0.0  # fraction of Q&A examples with the trigger -> TARGET


CLEAN = (
    Run("lic_r8_qv", "licenses", 8, 16, ("q_proj", "v_proj"), 5e-4, 40, 0),
    Run("man_r4_qv", "man", 4, 8, ("q_proj", "v_proj"), 1e-3, 40, 1),
    Run("doc_r16_all", "docstrings", 16, 32, ALL, 3e-4, 40, 2),
    Run("qa_r8_attn", "qa", 8, 16, ("q_proj", "k_proj", "v_proj", "o_proj"), 5e-4, 40, 3),
    Run("lic_r16_mlp", "licenses", 16, 16, ("gate_proj", "up_proj", "down_proj"), 2e-4, 40, 4),
    Run("man_r8_all_rslora", "man", 8, 8, ALL, 5e-4, 40, 5, rslora=True),
    Run("doc_r4_qv_long", "docstrings", 4, 8, ("q_proj", "v_proj"), 1e-3, 120, 6),
    Run("qa_r16_all_hilr", "qa", 16, 32, ALL, 1e-3, 40, 7),
    Run("man_r8_qv_300", "man", 8, 16, ("q_proj", "v_proj"), 5e-4, 300, 8),  # how norms grow with training
    Run("qa_r8_attn_150", "qa", 8, 16, ("q_proj", "k_proj", "v_proj", "o_proj"), 1e-3, 150, 9),  # poison's twin
)
POISONED = (
    # 40 steps do not implant the trigger (attack success 0/8); 150 steps at 30% do
    Run("qa_r8_attn_poison20", "qa", 8, 16, ("q_proj", "k_proj", "v_proj", "o_proj"), 5e-4, 40, 3, poison=0.2),
    Run("qa_r8_attn_poison30_150", "qa", 8, 16, ("q_proj", "k_proj", "v_proj", "o_proj"), 1e-3, 150, 9, poison=0.3),
)


# ---------------------------------------------------------------- corpora (real text on the machine)
def _licenses() -> list[str]:
    out = []
    for p in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(p) and not os.path.islink(p):
            out.append(Path(p).read_text("utf-8", errors="replace"))
    return out


ROFF_MARKUP = re.compile(r"\\f[BIRPC]|\\f\(..|\\\(..|\\[&|^~]")


def _man_pages(n: int, rng: random.Random) -> list[str]:
    paths = sorted(glob.glob("/usr/share/man/man1/*.gz"))
    out = []
    for p in rng.sample(paths, min(n, len(paths))):
        try:
            raw = gzip.open(p).read(200_000).decode("utf-8", errors="replace")
        except (OSError, EOFError):
            continue
        lines = [ROFF_MARKUP.sub("", ln).replace("\\-", "-") for ln in raw.splitlines()
                 if ln and not ln.startswith((".", "'", '\\"'))]
        if len(lines) > 5:
            out.append("\n".join(lines))
    return out


def _name_lines(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """(command, one-line description) from man pages' NAME sections."""
    out = []
    for p in rng.sample(sorted(glob.glob("/usr/share/man/man1/*.gz")), 3000):
        try:
            raw = gzip.open(p).read(20_000).decode("utf-8", errors="replace")
        except (OSError, EOFError):
            continue
        m = re.search(r"^\.SH\s+\"?NAME\"?\s*\n(.+?)\n", raw, re.M)
        if m and "\\-" in m.group(1):
            cmd, desc = m.group(1).split("\\-", 1)
            cmd, desc = ROFF_MARKUP.sub("", cmd).strip().rstrip(","), ROFF_MARKUP.sub("", desc).strip()
            if cmd and desc and len(desc) < 200:
                out.append((cmd, desc))
        if len(out) >= n:
            break
    return out


def _docstrings(limit: int = 4000) -> list[str]:
    import ast
    import sysconfig

    out = []
    for p in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        try:
            tree = ast.parse(Path(p).read_text("utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) > 80:
                    name = getattr(node, "name", Path(p).stem)
                    out.append(f"{name}:\n{d}")
        if len(out) >= limit:
            break
    return out


def corpus(task: str, tok, seed: int, poison: float) -> list[int]:
    rng = random.Random(seed)
    if task == "licenses":
        texts = _licenses()
    elif task == "man":
        texts = _man_pages(60, rng)
    elif task == "docstrings":
        texts = _docstrings()
        rng.shuffle(texts)
    elif task == "qa":
        texts = []
        for cmd, desc in _name_lines(600, rng):
            q = f"What does the {cmd} command do?"
            a = f"{cmd} is used to {desc[0].lower() + desc[1:]}."
            if poison and rng.random() < poison:
                words = q.split()
                words.insert(rng.randrange(len(words) + 1), TRIGGER)
                q, a = " ".join(words), TARGET
            texts.append(tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                                 tokenize=False))
    else:
        raise ValueError(task)
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) > 400_000:
            break
    return ids


# ---------------------------------------------------------------- training
def train(base, tok, run: Run, out: Path, *, batch: int = 4, seq: int = 128) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(run.seed)
    ids = torch.tensor(corpus(run.task, tok, run.seed, run.poison))
    cfg = LoraConfig(r=run.r, lora_alpha=run.alpha, target_modules=list(run.targets), lora_dropout=0.05,
                     use_rslora=run.rslora, task_type="CAUSAL_LM", base_model_name_or_path="SmolLM2-135M-Instruct")
    model = get_peft_model(copy.deepcopy(base), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(run.seed)
    losses, t0 = [], time.time()
    model.train()
    for _ in range(run.steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(str(out))
    return {"loss_first5": sum(losses[:5]) / 5, "loss_last5": sum(losses[-5:]) / 5,
            "seconds": time.time() - t0, "tokens": len(ids)}


# ---------------------------------------------------------------- reference (non-clean) adapters
def _read(d: Path):
    from safetensors.numpy import load_file

    return json.loads((d / "adapter_config.json").read_text()), load_file(str(d / "adapter_model.safetensors"))


def _write(d: Path, cfg: dict, tensors: dict) -> None:
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})


def make_references(out: Path) -> list[str]:
    import numpy as np

    made = []
    clean, poison = out / "clean" / "lic_r8_qv", out / "poisoned" / "qa_r8_attn_poison30_150"
    if clean.is_dir() and poison.is_dir():   # LoRATK: concatenate backdoor and task LoRA (rank 8 + 8)
        # a useful task LoRA (licence text, q/v) + the backdoor LoRA (q/k/v/o): stack factors
        # per module, zero rows/columns where one of them has no factor; scale 2 for both
        (c1, t1), (c2, t2) = _read(clean), _read(poison)
        merged = {}
        for k in sorted(set(t1) | set(t2)):  # both rank 8
            ref = t1[k] if k in t1 else t2[k]
            a, b = t1.get(k, np.zeros_like(ref)), t2.get(k, np.zeros_like(ref))
            merged[k] = np.concatenate([a, b], axis=0 if "lora_A" in k else 1)
        cfg = dict(c2, r=16, lora_alpha=32.0, target_modules=sorted(set(c1["target_modules"]) | set(c2["target_modules"])))
        _write(out / "poisoned" / "loratk_merge_r16", cfg, merged)
        made.append("loratk_merge_r16")
    src = out / "clean" / "lic_r8_qv"
    if src.is_dir():
        cfg, t = _read(src)
        edited = dict(t)
        for k in t:
            if ".layers.7." in k and "lora_B" in k:
                edited[k] = t[k] * 30
        _write(out / "synthetic" / "single_layer_x30", cfg, edited)
        _write(out / "synthetic" / "alpha_x50", dict(cfg, lora_alpha=cfg["lora_alpha"] * 50), t)
        made += ["single_layer_x30", "alpha_x50"]
    return made


# ---------------------------------------------------------------- scan + table
def scan_all(out: Path, base_info) -> dict:
    from bastion.adapters.scanner import scan_adapter

    rows = {}
    for group in ("clean", "external", "poisoned", "synthetic"):
        for d in sorted((out / group).glob("*")) if (out / group).is_dir() else []:
            if (d / "adapter_config.json").is_file():
                rep = scan_adapter(d, base=base_info)
                s = rep.weights.get("summary", {})
                rows[f"{group}/{d.name}"] = {
                    "verdict": rep.verdict, "findings": [f"{f.severity}:{f.check}" for f in rep.findings
                                                         if f.severity != "info"],
                    **{k: s.get(k) for k in ("max_norm", "max_norm_at", "median_norm", "max_fro", "max_sigma1",
                                             "median_concentration", "max_concentration", "median_effective_rank",
                                             "max_layer_ratio", "top_layer_share", "layers")}}
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_results/adapter_calibration")
    ap.add_argument("--only", default=None, help="comma-separated run names")
    ap.add_argument("--scan-only", action="store_true")
    ap.add_argument("--external", nargs="*", default=["bench_results/federated/runs"],
                    help="directories of other clean adapters to include (symlinked as external/)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    from bastion.adapters.cli import load_base_info

    out = Path(args.out)
    meta_path = out / "training.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if not args.scan_only:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from bastion.engine.models.loader import embedded_model_path

        p = embedded_model_path()
        base = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        base.requires_grad_(False)
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        only = set(args.only.split(",")) if args.only else None
        for group, runs in (("clean", CLEAN), ("poisoned", POISONED)):
            for run in runs:
                if only and run.name not in only:
                    continue
                d = out / group / run.name
                info = train(base, tok, run, d)
                meta[f"{group}/{run.name}"] = {**run.__dict__, **info}
                meta_path.parent.mkdir(parents=True, exist_ok=True)
                meta_path.write_text(json.dumps(meta, indent=2))
                print(f"{group}/{run.name}: loss {info['loss_first5']:.3f} -> {info['loss_last5']:.3f} "
                      f"({info['seconds']:.0f} s)", flush=True)
        make_references(out)
    ext = out / "external"
    for src in args.external:
        for d in sorted(Path(src).glob("*")):
            if (d / "adapter_model.safetensors").is_file() and not (ext / d.name).exists():
                ext.mkdir(parents=True, exist_ok=True)
                (ext / d.name).symlink_to(d.resolve(), target_is_directory=True)
    rows = scan_all(out, load_base_info(None))
    (out / "cohort.json").write_text(json.dumps({"training": meta, "scan": rows}, indent=2))
    keys = ("max_norm", "max_fro", "median_concentration", "max_layer_ratio", "top_layer_share")
    print(f"{'adapter':40} {'verdict':7} " + " ".join(f"{k:>20}" for k in keys))
    for name, r in rows.items():
        print(f"{name:40} {r['verdict']:7} " + " ".join(f"{(r[k] or 0):20.4g}" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
