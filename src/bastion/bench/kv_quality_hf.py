"""HF transformers `QuantizedCache` peers of `bastion bench kv-quality`.

Two sides in one file. `run_hf_peers` (Bastion's process) writes a JSON spec and runs
this file as a script with ANOTHER venv's python (transformers + optimum-quanto, or
hqq); the script side (`main`, module top level: stdlib + torch only) imports neither
Bastion nor anything outside that venv. For each cache in the spec (fp32 DynamicCache,
then QuantizedCache at each nbits) and each context: one-shot prefill of the context
(how HF runs a prompt), `steps` teacher-forced decode steps, logits saved to
OUT/NAME-CTX.pt; then greedy passkey answers. The metrics are computed back in Bastion's
process, with the same functions as for Bastion's caches.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

HF_CACHES = ({"name": "hf-quanto-int4", "nbits": 4}, {"name": "hf-quanto-int2", "nbits": 2})
HF_GROUP, HF_RESIDUAL = 64, 128  # transformers' QuantizedCache defaults


def hf_bytes_per_token(nbits: int | None, num_layers: int, num_kv_heads: int, head_dim: int, ctx: int) -> float:
    """HF QuantizedCache, nominal (as if fp16): codes + fp16 scale and shift per group of
    HF_GROUP elements (per token: it groups along head_dim), plus the fp16 residual
    (0..R-1 tokens, R/2 on average); nbits None = fp32 DynamicCache."""
    fp16_tok = 2 * num_layers * num_kv_heads * head_dim * 2
    if nbits is None:
        return 2.0 * fp16_tok
    return (num_layers * num_kv_heads * 2 * (head_dim * nbits / 8 + 4 * head_dim / HF_GROUP)
            + HF_RESIDUAL / 2 * fp16_tok / ctx)


def run_hf_peers(python: str, hf_dir: str, corpus: list[int], ctxs: list[int], pk_prompts: dict,
                 cfg: Any, tokenizer: Any, arch: Any, log: Callable[[str], None] = print) -> list[dict]:
    """Runs this file as a script with the peer venv's python (its own torch/transformers; it
    does not import Bastion): it saves logits and greedy ids, metrics are computed here
    against the peer's own fp32 DynamicCache run."""
    import os
    import subprocess
    import tempfile

    from bastion.bench.quality_metrics import passkey_found, quality_metrics

    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"hf_dir": hf_dir, "threads": cfg.threads, "steps": cfg.steps, "contexts": ctxs, "out": tmp,
                "corpus": corpus[: max(ctxs, default=0) + cfg.steps + 1], "new_tokens": cfg.passkey_new_tokens,
                "passkey": {str(c): [p[0] for p in ps] for c, ps in pk_prompts.items()},
                "caches": [{"name": "hf-fp32", "nbits": None}, *HF_CACHES], "group": HF_GROUP,
                "residual": HF_RESIDUAL}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        proc = subprocess.run([python, str(Path(__file__).resolve()), str(Path(tmp) / "spec.json")], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if proc.returncode:
            raise RuntimeError(f"HF peer worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
        out = json.loads((Path(tmp) / "result.json").read_text())
        for c in spec["caches"]:
            name = c["name"] if out["backend"] == "quanto" or c["nbits"] is None else c["name"].replace("quanto", "hqq")
            for ctx in ctxs:
                lg = torch.load(Path(tmp) / f"{c['name']}-{ctx}.pt")
                ref = torch.load(Path(tmp) / f"hf-fp32-{ctx}.pt")
                m = quality_metrics(lg, ref, torch.tensor(corpus[ctx + 1 : ctx + 1 + cfg.steps]))
                b = hf_bytes_per_token(c["nbits"], arch.num_layers, arch.num_kv_heads, arch.head_dim, ctx)
                rows.append({"config": name, "kind": "hf", "ctx": ctx, **m, "bytes_per_token": b,
                             "ratio_vs_fp16": 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 2 / b})
                log(f"[{name} ctx={ctx}] ΔPPL {m['delta_ppl_pct']:+.2f}%, top-1 {m['top1_agreement']:.3f}")
            for ctx, prompts in pk_prompts.items():
                hits = []
                for (_, key, depth), ids in zip(prompts, out["passkey"][c["name"]][str(ctx)]):
                    text = tokenizer.decode(ids)
                    hits.append({"depth": depth, "key": key, "answer": text, "ok": passkey_found(text, key)})
                rows.append({"config": name, "kind": "hf", "ctx": ctx, "passkey": hits,
                             "passkey_success": sum(h["ok"] for h in hits) / len(hits)})
                log(f"[{name} passkey ctx={ctx}] {sum(h['ok'] for h in hits)}/{len(hits)}")
    return rows



def make_cache(model, nbits, group, residual, backend):
    from transformers import DynamicCache, QuantizedCache

    if nbits is None:
        return DynamicCache(config=model.config)
    return QuantizedCache(backend, model.config, nbits=nbits, q_group_size=group, residual_length=residual)


def pick_backend(model, spec) -> str:
    try:
        make_cache(model, 4, spec["group"], spec["residual"], "quanto")
        return "quanto"
    except ImportError:
        make_cache(model, 4, spec["group"], spec["residual"], "hqq")  # raises if neither is installed
        return "hqq"


@torch.inference_mode()
def main(spec_path: str) -> None:
    from transformers import AutoModelForCausalLM

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32).eval()
    backend = pick_backend(model, spec) if any(c["nbits"] for c in spec["caches"]) else "none"
    ids, steps = spec["corpus"], spec["steps"]
    passkey: dict[str, dict[str, list[list[int]]]] = {}
    for c in spec["caches"]:
        def fresh():
            return make_cache(model, c["nbits"], spec["group"], spec["residual"], backend)

        for ctx in spec["contexts"]:
            cache = fresh()
            model(input_ids=torch.tensor([ids[:ctx]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
            rows = []
            for i in range(steps):
                o = model(input_ids=torch.tensor([[ids[ctx + i]]]), past_key_values=cache, use_cache=True)
                rows.append(o.logits[0, -1].float())
            torch.save(torch.stack(rows), out / f"{c['name']}-{ctx}.pt")
            print(f"[{c['name']} ctx={ctx}] done", flush=True)
        passkey[c["name"]] = {}
        for ctx, prompts in spec["passkey"].items():
            answers = []
            for prompt in prompts:
                cache, gen = fresh(), []
                o = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
                for _ in range(spec["new_tokens"]):
                    gen.append(int(o.logits[0, -1].argmax()))
                    o = model(input_ids=torch.tensor([[gen[-1]]]), past_key_values=cache, use_cache=True)
                answers.append(gen)
            passkey[c["name"]][ctx] = answers
    (out / "result.json").write_text(json.dumps({"backend": backend, "passkey": passkey}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python kv_quality_hf.py SPEC.json (run by bastion bench kv-quality)")
    main(sys.argv[1])
