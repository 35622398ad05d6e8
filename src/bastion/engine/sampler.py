"""Batched sampling: masks (min_tokens), greedy / temperature / top-k / top-p, per-request
seeded generators, and logprobs with top-n.

Logprobs are those of the model's distribution (log-softmax of the raw logits, after
masking), not of the temperature-scaled one, as in vLLM.
"""

from __future__ import annotations

import torch

from bastion.engine.request import Request
from bastion.engine.sampling_params import TokenLogprob


def token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, top_n: list[int]) -> list[TokenLogprob]:
    """logprobs: [N, V] fp32; token_ids: [N]; top_n[i] alternatives for row i."""
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    ranks = (logprobs > chosen[:, None]).sum(1) + 1
    k = max(top_n) if top_n else 0
    top_v, top_i = logprobs.topk(k, dim=-1) if k else (None, None)
    out = []
    for r in range(logprobs.shape[0]):
        top = list(zip(top_i[r, : top_n[r]].tolist(), top_v[r, : top_n[r]].tolist())) if top_n[r] else []
        out.append(TokenLogprob(int(token_ids[r]), float(chosen[r]), int(ranks[r]), top))
    return out


class Sampler:
    def __init__(self, seed: int = 0):
        # NOTE: unseeded requests share this generator; seeded ones carry their own.
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, reqs: list[Request],
                 track_logits: list[torch.Tensor | None] | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
        # logits: [N, V] fp32, row i belongs to reqs[i]; track_logits[i]: [K, V] rows of
        # reqs[i]'s extra tracks at the same position (read by its token filter)
        logits = self._apply_masks(logits, reqs)
        temps = torch.tensor([r.params.temperature for r in reqs], dtype=torch.float32)
        greedy = temps == 0
        next_ids = logits.argmax(-1)
        if not bool(greedy.all()):
            next_ids = torch.where(greedy, next_ids, self._sample(logits, temps, reqs, greedy))
        for i, r in enumerate(reqs):
            if r.token_filter is not None:
                extra = track_logits[i] if track_logits is not None else None
                extra = self._apply_masks(extra, [r] * extra.shape[0]) if extra is not None else None
                tok = r.token_filter(int(next_ids[i]), logits[i], extra, r)
                if tok != int(next_ids[i]):
                    r.num_replaced_tokens += 1
                    next_ids[i] = tok
        logps: list[TokenLogprob | None] = [None] * len(reqs)
        want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        if want:
            idx = torch.tensor(want)
            lp = torch.log_softmax(logits[idx], dim=-1)
            for i, tl in zip(want, token_logprobs(lp, next_ids[idx], [reqs[i].params.logprobs for i in want])):
                logps[i] = tl
        return next_ids.tolist(), logps

    @staticmethod
    def _apply_masks(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        rows, cols = [], []
        vocab = logits.shape[-1]
        for i, r in enumerate(reqs):
            if r.num_output_tokens < r.params.min_tokens:
                # NOTE: add_request rejects ids outside the vocabulary; they are skipped
                # here too, because an index error in this batched op would fail the step.
                banned = [t for t in r.params.stop_token_ids if 0 <= t < vocab]
                if r.eos_token_id is not None:
                    banned.append(r.eos_token_id)
                rows += [i] * len(banned)
                cols += banned
        if rows:
            logits = logits.clone()
            logits[rows, cols] = float("-inf")
        return logits

    def _sample(self, logits, temps, reqs, greedy) -> torch.Tensor:
        scaled = logits / torch.where(greedy, torch.ones_like(temps), temps)[:, None]
        vocab = logits.shape[-1]
        top_k = [r.params.top_k if 0 < r.params.top_k < vocab else 0 for r in reqs]
        top_p = [r.params.top_p for r in reqs]
        if any(top_k) or any(p < 1.0 for p in top_p):
            scaled = _top_k_top_p(scaled, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)
        # Exponential race (Gumbel-max equivalent): argmax(p / E), E ~ Exp(1) per token.
        noise = torch.empty_like(probs)
        for i, r in enumerate(reqs):
            noise[i].exponential_(generator=r.generator or self.generator)
        return (probs / noise).argmax(-1)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.tensor([k if k > 0 else vocab for k in top_k])
    pos = torch.arange(vocab)[None, :]
    drop = pos >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # keep the smallest prefix whose mass reaches p (the first token always stays)
    before = probs.cumsum(-1) - probs
    drop |= before >= torch.tensor(top_p)[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
