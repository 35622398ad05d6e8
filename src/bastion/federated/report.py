"""The JSON training report: privacy guarantee and its scope, utility, leakage, bytes, log."""

from __future__ import annotations

import math

from bastion.federated import modeling, privacy
from bastion.federated.config import FedConfig


def build_report(cfg: FedConfig, log, export_notes: dict, total_s: float) -> dict:
    rounds = [log.rounds[r] for r in sorted(log.rounds)]
    base, final = log.rounds.get(0, {}).get("evaluation", {}), rounds[-1].get("evaluation", {})
    last_owners = rounds[-1].get("owners", {})
    eps = {o: (v["epsilon-prv"], v["epsilon-rdp"]) for o, v in last_owners.items()}
    full = modeling.full_model_bytes(cfg.model)
    up = max((r.get("upload_bytes_per_client", 0) for r in rounds), default=0)
    down = max((r.get("download_bytes_per_client", 0) for r in rounds), default=0)
    return {
        "config": cfg.to_record(),
        "base_model": modeling.BASE_NAME if cfg.model == "smollm2" else "tiny-random-llama",
        "privacy": {
            "target_epsilon": cfg.epsilon,
            "delta": "1/n per owner (n = owner's training records)",
            "per_owner": {o: {"epsilon_prv": e if e >= 0 else math.inf, "epsilon_rdp_crosscheck": r if r >= 0 else math.inf,
                              "delta": last_owners[o]["delta"], "noise_multiplier": last_owners[o]["noise-multiplier"]}
                          for o, (e, r) in eps.items()},
            "accountant": "PRV (Opacus) reported; RDP (dp-accounting) cross-check",
            "mechanism": "DP-SGD (Poisson sampling, per-record clipping, Gaussian noise) on LoRA params only",
            "max_grad_norm": cfg.max_grad_norm,
            "protects": privacy.protection_statement(cfg.epsilon, cfg.client_dp_noise, cfg.seq_len),
        },
        "utility": {
            "base_union_perplexity": base.get("union_perplexity"),
            "final_union_perplexity": final.get("union_perplexity"),
            "base_perplexity_per_owner": base.get("per_owner"),
            "final_perplexity_per_owner": final.get("per_owner"),
        },
        "leakage": {"base_mean_exposure": base.get("mean_exposure"), "final_mean_exposure": final.get("mean_exposure"),
                    "base_canary_auc": base.get("mean_canary_auc"), "final_canary_auc": final.get("mean_canary_auc"),
                    "final_exposure_se": final.get("exposure_se"), "final_canary_auc_se": final.get("canary_auc_se"),
                    "canary_gap_increase_se": final.get("canary_gap_increase_se"),
                    "canaries_scored": cfg.canaries * cfg.clients,
                    "max_exposure_bits": math.log2(cfg.canary_refs + 1),
                    # how many more nats training favoured the inserted secrets than unseen ones
                    "canary_gap_increase_nats": (final["mean_canary_gap"] - base["mean_canary_gap"]
                                                 if "mean_canary_gap" in base and "mean_canary_gap" in final
                                                 else None)},
        "communication": {"full_model_bytes": full, "max_upload_bytes_per_client_round": up,
                          "max_download_bytes_per_client_round": down,
                          "upload_reduction_vs_full_model": full / up if up else None,
                          "download_reduction_vs_full_model": full / down if down else None},
        "adapter": export_notes,
        "rounds": rounds,
        "wall_time_s": round(total_s, 1),
    }
