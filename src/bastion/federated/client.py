"""Flower ClientApp: one data owner. Its text never leaves this function; only LoRA factors
(and scalar metrics) go back to the ServerApp.

Message contents (Message API):
  train    in : "arrays" (global LoRA state, see below), "config" (FedConfig.to_record + server-round)
           out: "arrays" (this owner's factors), "metrics" (num-examples, loss, sigma, epsilon, ...)
  evaluate in : same as train; out: "metrics" (held-out NLL sums; canary leakage on full rounds)

Global state per strategy:
  fedavg  arrays = {A, B} at rank r. Owner starts from them, trains A and B, sends A and B.
  ffa     arrays = {B}. A is never sent: both sides rebuild it from the shared seed. Sends B.
  flora   arrays = this round's stacked {A_stack, B_stack} (scale folded in). The owner keeps
          every round's stack in its Context.state, merges sum_t B_t A_t into its base weights,
          then trains a *fresh* rank-r_k LoRA (heterogeneous r_k) and sends it.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from bastion.federated import modeling, privacy
from bastion.federated.config import FedConfig
from bastion.federated.data import OwnerData, build_owner
from bastion.federated.train import canary_gaps, canary_leakage, heldout_nll, local_train

client_app = ClientApp()


@functools.lru_cache(maxsize=8)
def owner_data(cfg: FedConfig, owner: int) -> OwnerData:
    """Deterministic per (data settings, owner); memoised per process."""
    return build_owner(owner, cfg.clients, modeling.load_tokenizer(cfg.model), seq_len=cfg.seq_len,
                       train_records=cfg.train_records, heldout_records=cfg.heldout_records,
                       canaries=cfg.canaries, canary_repeats=cfg.canary_repeats,
                       canary_refs=cfg.canary_refs, seed=cfg.seed)


def _unpack(msg: Message, context: Context) -> tuple[FedConfig, int, int, dict[str, torch.Tensor]]:
    record = dict(msg.content["config"])
    server_round = int(record.pop("server-round", 0))
    cfg = FedConfig.from_record(record)
    owner = int(context.node_config.get("partition-id", context.node_id % cfg.clients))
    torch.set_num_threads(cfg.threads)
    arrays = msg.content["arrays"].to_torch_state_dict() if "arrays" in msg.content else {}
    return cfg, owner, server_round, dict(arrays)


def _model_for_round(cfg: FedConfig, owner: int, server_round: int, arrays: dict, context: Context,
                     fresh_seed: int):
    """Base model with the current global adapter applied, as a PEFT model ready to train.

    Returns (peft_model, rank). For FLoRA the global delta is merged into the base weights
    and the trainable LoRA is fresh (A random from `fresh_seed`, B = 0)."""
    model = modeling.load_base(cfg.model)
    shapes = modeling.linear_shapes(model.config, cfg.target_modules, cfg.lora_layers)
    rank = cfg.client_rank(owner)
    if cfg.strategy == "flora":  # callers have stored every stack received so far
        stacks = sorted(k for k in context.state.array_records if k.startswith("flora-"))
        for key in stacks:
            modeling.merge_deltas(model, context.state[key].to_torch_state_dict())
        weights = modeling.init_lora(shapes, rank, fresh_seed)
    elif cfg.strategy == "ffa":
        weights = {k: v for k, v in modeling.init_lora(shapes, rank, cfg.seed).items() if ".lora_A." in k}
        weights.update(arrays or {k: v for k, v in modeling.init_lora(shapes, rank, cfg.seed).items()
                                  if ".lora_B." in k})
    else:
        weights = arrays or modeling.init_lora(shapes, rank, cfg.seed)
    peft_model = modeling.add_lora(model, cfg.target_modules, rank, cfg.lora_alpha, weights,
                                   train_a=cfg.trains_a, last_layers=cfg.lora_layers)
    return peft_model, rank


def _keep_stack(cfg: FedConfig, context: Context, stack_round: int, arrays: dict) -> dict:
    """FLoRA: file the received stack under its round (idempotent) and consume it."""
    if cfg.strategy == "flora" and arrays:
        context.state[f"flora-{stack_round:04d}"] = ArrayRecord(OrderedDict(arrays))
        return {}
    return arrays


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, owner, server_round, arrays = _unpack(msg, context)
    data = owner_data(cfg, owner)
    n = data.train.shape[0]
    fresh_seed = cfg.seed * 1_000_003 + server_round * 1_009 + owner
    arrays = _keep_stack(cfg, context, server_round - 1, arrays)  # stack of the previous round
    peft_model, rank = _model_for_round(cfg, owner, server_round, arrays, context, fresh_seed)
    plan = privacy.plan(cfg.epsilon, n, cfg.batch_size, cfg.rounds * cfg.local_steps)
    stats = local_train(peft_model, data.train, steps=cfg.local_steps, batch_size=cfg.batch_size,
                        lr=cfg.lr, noise_multiplier=plan.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
                        private=cfg.private, micro_batch=cfg.micro_batch)  # secret sampling / noise seeds
    out = modeling.get_lora(peft_model, "B" if cfg.strategy == "ffa" else "AB")
    steps_done = server_round * cfg.local_steps
    eps_prv = privacy.epsilon_prv(plan.noise_multiplier, plan.sample_rate, steps_done, plan.delta)
    eps_rdp = privacy.epsilon_rdp(plan.noise_multiplier, plan.sample_rate, steps_done, plan.delta)
    record = ArrayRecord(OrderedDict(out))
    metrics = MetricRecord({
        "num-examples": n, "owner": owner, "rank": rank, **stats,
        "noise-multiplier": plan.noise_multiplier, "sample-rate": plan.sample_rate, "delta": plan.delta,
        "epsilon-prv": eps_prv if math.isfinite(eps_prv) else -1.0,  # -1: no DP (inf)
        "epsilon-rdp": eps_rdp if math.isfinite(eps_rdp) else -1.0,
        "upload-bytes": record.count_bytes(),
    })
    return Message(content=RecordDict({"arrays": record, "metrics": metrics}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, owner, server_round, arrays = _unpack(msg, context)
    full = server_round == 0 or server_round >= cfg.rounds  # base model and final adapter
    data = owner_data(cfg, owner)
    arrays = _keep_stack(cfg, context, server_round, arrays)  # stack of this round
    peft_model, _ = _model_for_round(cfg, owner, server_round, arrays, context, fresh_seed=0)
    heldout = data.heldout if full else data.heldout[: cfg.eval_records]
    nll_sum, tokens = heldout_nll(peft_model, heldout)
    values = {"num-examples": heldout.shape[0], "owner": owner, "nll-sum": nll_sum, "tokens": tokens,
              "perplexity": math.exp(nll_sum / tokens)}
    if full:
        pad = modeling.load_tokenizer(cfg.model).eos_id
        canaries = (data.canary_prefixes, data.canary_secrets, data.reference_secrets, pad)
        base_gaps = canary_gaps(modeling.load_base(cfg.model), *canaries) if server_round > 0 else None
        values.update(canary_leakage(peft_model, *canaries, base_gaps=base_gaps))
    return Message(content=RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)
