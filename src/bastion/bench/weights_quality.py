"""`bastion bench weights --quality`: what each serving path of a GGUF answers, against
llama.cpp and HF transformers on the same file and the same token ids.

Per engine (one child process each, as the speed benchmark):
- perplexity over windows of the machine's licence texts (teacher forced), the ΔPPL
  against llama.cpp on the same file, and top-1 agreement with the reference engine;
- greedy answers to the project's chat prompts (bench/chat_prompts.py), compared token
  for token with HF transformers fp32 and bf16 (when transformers can load the file).
Bastion scores the text one token per step (`chunk` = 1) and answers each chat prompt
alone: the rows of batch-1 decode, so what is measured is the decode path (int16 / int8 /
fp32 activations), not the prefill GEMM.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

QUALITY_ENGINES = ("hf-fp32", "hf-bf16", "bastion", "bastion-fp32", "bastion-int16", "bastion-int8", "llamacpp")
_BASTION_EXTRA = {"bastion": {}, "bastion-fp32": {"activations": "fp32"}, "bastion-int16": {"activations": "int16"},
                  "bastion-int8": {"activations": "int8"}}
_TEXTS = ("GPL-3", "Apache-2.0", "MPL-2.0", "Artistic")


@dataclass(frozen=True)
class QualityConfig:
    windows: int = 4
    window: int = 512
    chunk: int = 1  # Bastion's tokens per step: 1 = the batch-1 decode kernels
    new_tokens: int = 16
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("windows", "window", "chunk", "new_tokens", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def text_windows(encode, cfg: QualityConfig) -> list[list[int]]:
    text = "\n\n".join(p.read_text(errors="replace") for p in (Path("/usr/share/common-licenses") / n for n in _TEXTS)
                       if p.is_file()) or " ".join(f"line {i} of a generated text." for i in range(4000))
    ids = encode(text)
    need = cfg.windows * cfg.window
    ids = (ids * (need // max(1, len(ids)) + 1))[:need]
    return [ids[i * cfg.window:(i + 1) * cfg.window] for i in range(cfg.windows)]


def _chat_ids(tok) -> list[list[int]]:
    from bastion.bench.chat_prompts import CHAT_PROMPTS
    from bastion.serving.chat_template import encode_chat

    return [encode_chat(tok, [{"role": "user", "content": p}]) for p in CHAT_PROMPTS]


def _tokenizer(model: str):
    from bastion.serving.tokenizer import load_tokenizer

    return load_tokenizer(Path(model))


def _score_rows(logits, window: list[int]) -> tuple[list[float], list[int]]:
    """logits [n, V] (row i predicts window[i + 1]) -> (target logprobs, argmax ids)."""
    import torch

    lp = torch.log_softmax(torch.as_tensor(logits).double(), -1)
    tgt = torch.tensor(window[1:])
    return lp[:-1].gather(1, tgt.view(-1, 1)).view(-1).tolist(), lp[:-1].argmax(-1).tolist()


# ---------------------------------------------------------------- workers (child processes)
def _bastion(model: str, cfg: QualityConfig, extra: dict[str, Any]) -> dict[str, Any]:
    import torch

    from bastion.config import CacheConfig, Config, ModelConfig, SchedulerConfig
    from bastion.engine.sampling_params import SamplingParams
    from bastion.serving.tokenizer import load_engine

    torch.set_num_threads(cfg.threads)
    ctx = max(cfg.window, 256) + cfg.new_tokens + 16
    config = Config(model=ModelConfig(path=model, threads=cfg.threads, max_model_len=ctx, **extra),
                    cache=CacheConfig(num_blocks=-(-ctx // 16) * 16, block_size=16, prefix_caching=False),
                    scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=cfg.chunk))
    engine, tok, _ = load_engine(config, show_progress=False)

    def drain() -> dict[str, list]:
        outs: dict[str, list] = {}
        while engine.has_unfinished():
            for o in engine.step():
                d = outs.setdefault(o.request_id, [None, []])
                d[0] = d[0] or o.prompt_logprobs
                d[1] += o.new_token_ids
        return outs

    lps, top1 = [], []
    for i, w in enumerate(text_windows(tok.encode, cfg)):
        engine.add_request(f"w{i}", w, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
        plp = drain()[f"w{i}"][0]
        lps += [t.logprob for t in plp[1:]]
        top1 += [t.top[0][0] if t.top else t.token_id for t in plp[1:]]
    answers = []
    for i, ids in enumerate(_chat_ids(tok)):  # alone: batch-1 decode rows
        engine.add_request(f"c{i}", ids, SamplingParams(max_tokens=cfg.new_tokens, temperature=0, ignore_eos=True))
        answers.append(drain()[f"c{i}"][1])
    return {"logprobs": lps, "top1": top1, "answers": answers}


def _llamacpp(model: str, cfg: QualityConfig, extra: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from llama_cpp import Llama

    tok = _tokenizer(model)  # the same ids as Bastion's: one tokenizer for every engine
    llm = Llama(model_path=model, n_ctx=cfg.window + 64, n_threads=cfg.threads, n_threads_batch=cfg.threads,
                n_batch=cfg.window, logits_all=True, verbose=False)
    lps, top1 = [], []
    for w in text_windows(tok.encode, cfg):
        llm.reset()
        llm.eval(w)
        a, b = _score_rows(np.array(llm.scores[: len(w)]), w)
        lps += a
        top1 += b
    answers = []
    for ids in _chat_ids(tok):
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(cfg.new_tokens):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(t)
            llm.eval([t])
        answers.append(out)
    return {"logprobs": lps, "top1": top1, "answers": answers}


def _hf(model: str, cfg: QualityConfig, extra: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(cfg.threads)
    tok = _tokenizer(model)
    p = Path(model)
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=extra["dtype"]).eval()
    lps, top1, answers = [], [], []
    with torch.no_grad():
        for w in text_windows(tok.encode, cfg):
            a, b = _score_rows(hf(torch.tensor([w])).logits[0].float(), w)
            lps += a
            top1 += b
        for ids in _chat_ids(tok):
            out = hf.generate(torch.tensor([ids]), max_new_tokens=cfg.new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            answers.append(out[0, len(ids):].tolist())
    return {"logprobs": lps, "top1": top1, "answers": answers}


def worker(engine: str, model: str, cfg: QualityConfig) -> dict[str, Any]:
    import torch

    if engine.startswith("hf-"):
        return _hf(model, cfg, {"dtype": {"hf-fp32": torch.float32, "hf-bf16": torch.bfloat16}[engine]})
    if engine == "llamacpp":
        return _llamacpp(model, cfg, {})
    return _bastion(model, cfg, _BASTION_EXTRA[engine])


def run_json_child(args: list[str], threads: int, timeout: float) -> dict[str, Any]:
    """`python -m <args>` in a fresh process (its own memory and threads); its last stdout
    line is the JSON result, or {"error": why}. Shared with the speed benchmark."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    try:
        p = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env,
                           check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _child(engine: str, model: str, cfg: QualityConfig, timeout: float) -> dict[str, Any]:
    return run_json_child(["bastion.bench.weights_quality", engine, model, json.dumps(asdict(cfg))], cfg.threads, timeout)


def llamacpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


# ---------------------------------------------------------------- the comparison
def run_quality(models: list[str], cfg: QualityConfig, engines: tuple[str, ...] = QUALITY_ENGINES,
                timeout: float = 3600.0) -> dict[str, Any]:
    engines = tuple(e for e in engines if e != "llamacpp" or llamacpp_available())
    rows = []
    for model in models:
        res = {e: _child(e, model, cfg, timeout) for e in engines}
        ok = {e: r for e, r in res.items() if "error" not in r}
        ref = next((e for e in ("hf-fp32", "bastion-fp32") if e in ok), None)  # top-1 reference
        tok = _tokenizer(model) if ok else None  # once per file, for the answers' text
        for e in engines:
            row: dict[str, Any] = {"model": Path(model).name, "engine": e}
            if e not in ok:
                rows.append({**row, "error": res[e]["error"]})
                continue
            r = ok[e]
            row["ppl"] = math.exp(-sum(r["logprobs"]) / len(r["logprobs"]))
            if ref is not None:
                row["top1_vs_" + ref] = sum(a == b for a, b in zip(r["top1"], ok[ref]["top1"])) / len(r["top1"])
            for h in ("hf-fp32", "hf-bf16"):
                if h in ok:
                    row["greedy_vs_" + h] = sum(a == b for a, b in zip(r["answers"], ok[h]["answers"])) / len(r["answers"])
            row["paris"] = "Paris" in tok.decode(r["answers"][0])
            rows.append(row)
        lc = next((r for r in rows if r["model"] == Path(model).name and r["engine"] == "llamacpp" and "ppl" in r), None)
        for row in rows:
            if lc is not None and row["model"] == lc["model"] and "ppl" in row:
                row["dppl_vs_llamacpp_pct"] = 100.0 * (row["ppl"] - lc["ppl"]) / lc["ppl"]
    return {"config": asdict(cfg), "engines": list(engines), "rows": rows}


def quality_table(result: dict[str, Any]) -> str:
    cols = ["ppl", "dppl_vs_llamacpp_pct", "top1_vs_hf-fp32", "top1_vs_bastion-fp32", "greedy_vs_hf-fp32",
            "greedy_vs_hf-bf16", "paris"]
    cols = [c for c in cols if any(c in r for r in result["rows"])]
    lines = ["| file | engine | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    fmt = {"ppl": "{:.3f}", "dppl_vs_llamacpp_pct": "{:+.2f}%"}
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['engine']} | error: {r['error']} |" + " |" * (len(cols) - 1))
            continue
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("—" if v is None else str(v) if isinstance(v, bool) else fmt.get(c, "{:.1%}").format(v))
        lines.append(f"| {r['model']} | {r['engine']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quality_plot(result: dict[str, Any], path: Path) -> Path:
    from bastion.bench.plots import new_figure

    rows = [r for r in result["rows"] if "ppl" in r]
    fig = new_figure(11, 4)
    axes = fig.subplots(1, 2)
    labels = [f"{r['model'][:18]}\n{r['engine']}" for r in rows]
    colors = ["C1" if r["engine"] == "llamacpp" else "C2" if r["engine"].startswith("hf") else "C0" for r in rows]
    axes[0].bar(range(len(rows)), [r["ppl"] for r in rows], color=colors)
    axes[0].set_title("perplexity (licence texts)")
    axes[1].bar(range(len(rows)), [100 * r.get("greedy_vs_hf-fp32", 0.0) for r in rows], color=colors)
    axes[1].set_title("greedy chat answers equal to HF fp32 (%)")
    for ax in axes:
        ax.set_xticks(range(len(rows)), labels, fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    return path


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1], sys.argv[2], QualityConfig(**json.loads(sys.argv[3])))))
