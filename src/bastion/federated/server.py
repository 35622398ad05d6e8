"""Flower ServerApp and LoRA strategies (Message API), plus the per-round run log.

Strategies subclass Flower's message-based FedAvg so Flower does sampling, messaging,
timeouts and the round loop (`Strategy.start`); we only change what is aggregated:
  LoraFedAvg  fedavg: p-weighted mean of A and B (FedIT);  ffa: mean of B only (A frozen)
  FLoRA       stacks heterogeneous-rank factors (exact), keeps every round's stack
Client-level DP (fedavg/ffa only) wraps LoraFedAvg in Flower's
DifferentialPrivacyServerSideFixedClipping.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from bastion.federated import lora_math, modeling
from bastion.federated.config import FedConfig


class RunLog:
    """Everything the report needs, filled in as rounds complete; drives the progress bar."""

    def __init__(self, cfg: FedConfig, progress: bool):
        self.cfg = cfg
        self.rounds: dict[int, dict] = {}
        self.t0 = time.time()
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.rounds, desc=f"federated {cfg.strategy} eps={cfg.epsilon:g}", unit="round")

    def row(self, server_round: int) -> dict:
        return self.rounds.setdefault(server_round, {"round": server_round})

    def on_train(self, server_round: int, download_bytes: int, replies: list[Message]) -> None:
        owners = {}
        for msg in replies:
            m = msg.content["metrics"]
            owners[int(m["owner"])] = {k: m[k] for k in ("rank", "train-loss", "mean-batch", "noise-multiplier",
                                                         "delta", "epsilon-prv", "epsilon-rdp", "upload-bytes")}
        row = self.row(server_round)
        row.update(owners=dict(sorted(owners.items())), download_bytes_per_client=download_bytes,
                   upload_bytes_per_client=max((o["upload-bytes"] for o in owners.values()), default=0))

    def on_evaluate(self, server_round: int, replies: list[Message]) -> dict:
        per_owner, nll, tokens = {}, 0.0, 0
        for msg in replies:
            m = msg.content["metrics"]
            per_owner[int(m["owner"])] = {k: m[k] for k in ("perplexity", "exposure", "canary-auc", "canary-gap",
                                                            "exposure-sq", "canary-auc-sq", "canaries",
                                                            "gap-increase", "gap-increase-sq") if k in m}
            nll, tokens = nll + m["nll-sum"], tokens + int(m["tokens"])
        ev = {"per_owner": dict(sorted(per_owner.items())),
              "union_perplexity": math.exp(nll / tokens) if tokens else float("nan")}
        leaks = [o["exposure"] for o in per_owner.values() if "exposure" in o]
        if leaks:
            ev["mean_exposure"] = sum(leaks) / len(leaks)
            ev["mean_canary_auc"] = sum(o["canary-auc"] for o in per_owner.values()) / len(leaks)
            if all("canary-gap" in o for o in per_owner.values()):
                ev["mean_canary_gap"] = sum(o["canary-gap"] for o in per_owner.values()) / len(leaks)
            for key, name in (("exposure", "exposure_se"), ("canary-auc", "canary_auc_se"),
                              ("gap-increase", "canary_gap_increase_se")):
                se = pooled_se([(o["canaries"], o[key], o[f"{key}-sq"]) for o in per_owner.values()
                                if f"{key}-sq" in o])
                if se is not None:
                    ev[name] = se
        row = self.row(server_round)
        row.update(evaluation=ev, elapsed_s=round(time.time() - self.t0, 1))
        if self.bar is not None and server_round > 0:
            self.bar.update(1)
            self.bar.write(self.summary_line(server_round))
        return ev

    def summary_line(self, server_round: int) -> str:
        row = self.rounds[server_round]
        owners = row.get("owners", {})
        loss = sum(o["train-loss"] for o in owners.values()) / max(1, len(owners))
        eps = max((o["epsilon-prv"] for o in owners.values()), default=-1)
        ev = row["evaluation"]
        return (f"round {server_round}/{self.cfg.rounds}: train loss {loss:.3f}  held-out ppl (union) "
                f"{ev['union_perplexity']:.2f}  eps spent {'inf' if eps < 0 else f'{eps:.2f}'}  "
                f"up {row.get('upload_bytes_per_client', 0) / 1e6:.2f} MB/client  {row['elapsed_s']:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def pooled_se(groups: list[tuple[int, float, float]]) -> float | None:
    """Standard error of the mean over all canaries of all owners, from per-owner
    (count, mean, mean of squares): the estimator noise of exposure / canary AUC for one
    trained adapter (sample sd / sqrt(N)); None below 2 canaries."""
    n = sum(int(c) for c, _, _ in groups)
    if n < 2:
        return None
    mean = sum(c * m for c, m, _ in groups) / n
    var = max(0.0, sum(c * sq for c, _, sq in groups) / n - mean * mean) * n / (n - 1)
    return math.sqrt(var / n)


def _complete(cfg: FedConfig, replies: Iterable[Message], what: str) -> list[Message]:
    """All owners must answer: a partial round would silently change p_k and the report."""
    replies = list(replies)
    ok = [r for r in replies if not r.has_error()]
    if len(ok) < cfg.clients:
        reasons = "; ".join(r.error.reason[:300] for r in replies if r.has_error()) or "no reply"
        raise RuntimeError(f"{what}: {len(ok)}/{cfg.clients} owners replied ({reasons})")
    return ok


class LoraFedAvg(FedAvg):
    """FedAvg over whatever LoRA arrays the owners send (A and B, or only B for FFA)."""

    def __init__(self, cfg: FedConfig, log: RunLog):
        n = cfg.clients
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n,
                         min_evaluate_nodes=n, min_available_nodes=n)
        self.cfg, self.log = cfg, log

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._download = arrays.count_bytes()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = _complete(self.cfg, replies, f"round {server_round} training")
        self.log.on_train(server_round, self._download, replies)
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = _complete(self.cfg, replies, f"round {server_round} evaluation")
        self.log.on_evaluate(server_round, replies)
        return super().aggregate_evaluate(server_round, replies)


class FLoRA(LoraFedAvg):
    """Stacking aggregation (arXiv 2409.05976). The new global arrays are this round's
    stack only; owners accumulate stacks, the server keeps them all for export."""

    def __init__(self, cfg: FedConfig, log: RunLog):
        super().__init__(cfg, log)
        self.stacks: list[lora_math.Factors] = []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = _complete(self.cfg, replies, f"round {server_round} training")
        self.log.on_train(server_round, self._download, replies)
        replies.sort(key=lambda r: int(r.content["metrics"]["owner"]))
        factors = [dict(r.content["arrays"].to_torch_state_dict()) for r in replies]
        sizes = [float(r.content["metrics"]["num-examples"]) for r in replies]
        weights = [s / sum(sizes) for s in sizes]  # p_k
        scales = [self.cfg.lora_alpha / int(r.content["metrics"]["rank"]) for r in replies]  # s_k
        stack = lora_math.flora_stack(factors, scales, weights)
        self.stacks.append(stack)
        # Oracle on real client updates: exact stacking vs what FedAvg of A,B would give.
        ideal = lora_math.ideal_delta(factors, scales, weights)
        avg = lora_math.fedavg(factors, weights)  # zero-padded to the max rank
        self.log.row(server_round)["aggregation_error"] = {
            "flora_stack": lora_math.relative_error(lora_math.product(stack), ideal),
            "fedavg_of_A_B": lora_math.relative_error(lora_math.product(avg, self.cfg.lora_alpha / max(
                int(r.content["metrics"]["rank"]) for r in replies)), ideal),
        }
        metrics = self.train_metrics_aggr_fn([r.content for r in replies], self.weighted_by_key)
        return ArrayRecord(OrderedDict(stack)), metrics


def initial_arrays(cfg: FedConfig) -> ArrayRecord:
    """Round-1 global state: FedAvg sends A (seeded init) and B = 0, FFA only B = 0, FLoRA
    nothing (owners start from the base model)."""
    if cfg.strategy == "flora":
        return ArrayRecord()
    shapes = modeling.linear_shapes(modeling.model_config(cfg.model), cfg.target_modules, cfg.lora_layers)
    init = modeling.init_lora(shapes, cfg.rank, cfg.seed)
    if cfg.strategy == "ffa":
        init = {k: v for k, v in init.items() if ".lora_B." in k}
    return ArrayRecord(OrderedDict(init))


def global_adapter(cfg: FedConfig, strategy, final: ArrayRecord) -> tuple[lora_math.Factors, int, float, dict]:
    """(factors, rank, lora_alpha, notes) of the trained global update, PEFT conventions."""
    if cfg.strategy == "flora":
        merged = lora_math.concat_rounds(strategy.stacks)  # scale folded in: alpha = rank
        rank = next(v.shape[0] for k, v in merged.items() if ".lora_A." in k)
        notes = {"export": "exact stacked factors of all rounds", "rank": rank}
        if cfg.export_rank and rank > cfg.export_rank:
            merged, err = lora_math.svd_truncate(merged, cfg.export_rank)
            rank, notes = cfg.export_rank, {"export": "truncated SVD", "rank": cfg.export_rank,
                                            "relative_frobenius_error": err}
        return merged, rank, float(rank), notes
    factors = dict(final.to_torch_state_dict())
    if cfg.strategy == "ffa":  # A was never sent: rebuild the shared frozen A from the seed
        shapes = modeling.linear_shapes(modeling.model_config(cfg.model), cfg.target_modules, cfg.lora_layers)
        factors.update({k: v for k, v in modeling.init_lora(shapes, cfg.rank, cfg.seed).items() if ".lora_A." in k})
    return factors, cfg.rank, cfg.lora_alpha, {"export": "global factors", "rank": cfg.rank}


def run_federation(grid: Grid, cfg: FedConfig, out_dir: str, progress: bool = True) -> dict:
    """The ServerApp body: base evaluation, `cfg.rounds` Flower rounds, export + report."""
    from bastion.federated.report import build_report

    torch.set_num_threads(1)  # the server only aggregates; leave the cores to the ClientApps
    log = RunLog(cfg, progress)
    inner = FLoRA(cfg, log) if cfg.strategy == "flora" else LoraFedAvg(cfg, log)
    strategy = inner
    if cfg.client_dp_noise > 0:
        strategy = DifferentialPrivacyServerSideFixedClipping(inner, cfg.client_dp_noise, cfg.client_clip,
                                                              num_sampled_clients=cfg.clients)
    arrays = initial_arrays(cfg)
    config = ConfigRecord(cfg.to_record())
    # Round 0: every owner scores the untouched base model on its full held-out set.
    base = grid.send_and_receive(inner.configure_evaluate(0, arrays, ConfigRecord(cfg.to_record()), grid))
    inner.aggregate_evaluate(0, base)
    result = strategy.start(grid, arrays, num_rounds=cfg.rounds, train_config=config,
                            evaluate_config=ConfigRecord(cfg.to_record()))
    log.close()
    factors, rank, alpha, notes = global_adapter(cfg, inner, result.arrays)
    from bastion.federated.export import write_adapter, write_report

    layers = modeling.peft_layers(modeling.model_config(cfg.model), cfg.lora_layers)
    write_adapter(out_dir, factors, rank=rank, alpha=alpha, targets=cfg.target_modules, layers=layers)
    report = build_report(cfg, log, notes, total_s=time.time() - log.t0)
    write_report(f"{out_dir}/training_report.json", report)
    return report


def make_server_app(cfg: FedConfig | None = None, out_dir: str | None = None, progress: bool = True) -> ServerApp:
    """cfg/out_dir given: simulation from Python. None: read the Flower run_config
    (`flwr run`, SuperLink), where the key `out-dir` names the adapter directory."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        out = out_dir or str(run_config.pop("out-dir", "federated-adapter"))
        run_federation(grid, cfg or FedConfig.from_record(run_config), out, progress)

    return app


server_app = make_server_app()  # `flwr run` / SuperLink entry point (see docs/FEDERATED.md)
