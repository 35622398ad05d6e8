"""`bastion bench lora`: decode tokens/s of one batch of N requests on N different
LoRA adapters vs the same batch on the base model, same engine, same run.

Adapters are random PEFT-format LoRAs (rank r on the `targets` projections of every
layer, B non-zero; by default PEFT's own default for Llama, q_proj + v_proj) on the
embedded model, written to a temporary directory; the speed of a LoRA delta does not
depend on what it learned. Greedy, EOS ignored, prefix caching off; decode time = the
steps after every request of the batch has its first token, timed within the same run
(N - 1 tokens each; a difference of two runs' times can go negative on a busy machine);
base and LoRA runs alternate; the ratio
reported is the median over runs of each run's LoRA / base rate.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class LoraBenchConfig:
    batch: int = 8
    rank: int = 16
    prompt_len: int = 256
    new_tokens: int = 64
    runs: int = 5
    threads: int = 2
    targets: tuple[str, ...] = ("q_proj", "v_proj")   # PEFT's default target modules for Llama

    def __post_init__(self) -> None:
        from bastion.engine.lora.peft import SUB_TO_FUSED

        for name in ("batch", "rank", "prompt_len", "runs", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        bad = [t for t in self.targets if t not in SUB_TO_FUSED]
        if not self.targets or bad:
            raise ValueError(f"targets must be a non-empty subset of {tuple(SUB_TO_FUSED)}, got {bad or '()'}")
        if self.new_tokens < 2:
            raise ValueError("new_tokens must be >= 2")


def write_random_adapter(path: Path, arch, rank: int, seed: int, targets: tuple[str, ...] | None = None) -> Path:
    from safetensors.torch import save_file

    from bastion.engine.lora.peft import module_shapes

    g = torch.Generator().manual_seed(seed)
    shapes = {m: s for m, s in module_shapes(arch).items() if targets is None or m in targets}
    tensors = {}
    for i in range(arch.num_layers):
        for mod, (fan_in, fan_out) in shapes.items():
            part = "self_attn" if mod.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            pre = f"base_model.model.model.layers.{i}.{part}.{mod}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
            tensors[f"{pre}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(shapes)}))
    return path


def run_lora_bench(cfg: LoraBenchConfig, text: str) -> dict:
    from bastion.config import AdapterConfig
    from bastion.config import CacheConfig, Config, ModelConfig
    from bastion.serving.llm import LLM
    from bastion.engine.sampling_params import SamplingParams

    llm = LLM(Config(model=ModelConfig(threads=cfg.threads), cache=CacheConfig(prefix_caching=False)),
              show_progress=False)
    engine = llm.engine
    engine.enable_adapters(AdapterConfig(enabled=True, max_loras=cfg.batch, max_lora_rank=cfg.rank))
    names = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(cfg.batch):
            names.append(f"bench-{i}")
            engine.adapters.load(names[-1], str(write_random_adapter(Path(tmp) / names[-1],
                                                                     engine.runner.model.arch, cfg.rank, i, cfg.targets)))
    ids = llm.tokenizer.encode(text)
    prompts = [ids[i * 37 : i * 37 + cfg.prompt_len] for i in range(cfg.batch)]

    def timed(adapters: list[str | None], n: int) -> float:
        """Seconds of decode: from the step that gave the batch's last first token to the end."""
        p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        for i, (prompt, a) in enumerate(zip(prompts, adapters)):
            engine.add_request(f"t{time.monotonic_ns()}-{i}", prompt, p, adapter=a)
        started: set[str] = set()
        while len(started) < len(prompts) and engine.has_unfinished():  # prefill (chunked past the step budget)
            started.update(o.request_id for o in engine.step() if o.new_token_ids)
        t = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        return time.perf_counter() - t

    modes = {"base": [None] * cfg.batch, "lora": names}
    timed(modes["lora"], 2)  # warm-up
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for run in range(cfg.runs):
        for m in (("base", "lora") if run % 2 == 0 else ("lora", "base")):
            samples[m].append(cfg.batch * (cfg.new_tokens - 1) / timed(modes[m], cfg.new_tokens))
            print(f"[run {run + 1}] {m}: {samples[m][-1]:.1f} decode tok/s (batch {cfg.batch})")
    med = {m: statistics.median(v) for m, v in samples.items()}
    # NOTE: each run times base and LoRA back to back, so their ratio sees the same machine
    # load; the median of those paired ratios is the headline (robust to a slow stretch
    # that a ratio of two medians mixes in).
    paired = [lo / ba for lo, ba in zip(samples["lora"], samples["base"])]
    return {"config": asdict(cfg), "decode_tok_s": samples, "median_decode_tok_s": med,
            "paired_ratios": paired, "lora_over_base": statistics.median(paired),
            "ratio_of_medians": med["lora"] / med["base"], "torch_threads": torch.get_num_threads()}


def plot_lora(result: dict, path: Path) -> None:
    from bastion.bench.plots import new_figure

    fig = new_figure(6, 4)
    ax = fig.subplots()
    med = result["median_decode_tok_s"]
    ax.bar(list(med), list(med.values()), color=["#777", "#2a7"])
    for m, v in result["decode_tok_s"].items():
        ax.scatter([m] * len(v), v, color="k", s=10, zorder=3)
    b = result["config"]["batch"]
    ax.set_ylabel("decode tokens/s (batch total)")
    ax.set_title(f"{b} requests: base vs {b} different LoRA adapters (ratio {result['lora_over_base']:.2f})")
    fig.savefig(path)
