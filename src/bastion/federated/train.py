"""One owner's local work: DP-SGD on LoRA parameters, held-out perplexity, canary exposure.

Shapes: records x: [b, L] int64; logits: [b, L, V]; per-sample loss: [b] (mean next-token
NLL over the L-1 predicted positions of that record).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F


def per_sample_nll(model, x: torch.Tensor) -> torch.Tensor:
    """[b, L] -> [b]: mean next-token NLL per record (the unit DP protects)."""
    logits = model(input_ids=x).logits[:, :-1]  # [b, L-1, V]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
    return nll.view(x.shape[0], -1).mean(dim=1)


def local_train(peft_model, train: torch.Tensor, *, steps: int, batch_size: int, lr: float,
                noise_multiplier: float, max_grad_norm: float, private: bool,
                seed: int | None = None, micro_batch: int = 32) -> dict[str, float]:
    """`steps` steps of Poisson-sampled (DP-)Adam over `train` [n, L].

    Private: Opacus per-sample gradients on the trainable (LoRA) parameters only, each
    clipped to `max_grad_norm`, summed, N(0, (sigma C)^2) added, divided by the expected
    batch size. Non-private: plain Adam on the batch mean (same sampling).

    A sampled batch is processed `micro_batch` records at a time (memory: the logits alone
    are micro_batch x L x vocab floats); the step is the same as one pass over the whole
    batch: per-record clipped gradients are summed across micro-batches (Opacus
    `signal_skip_step`), and noise is added once per step.

    seed=None (what ClientApps use): sampling and noise come from generators seeded by
    os.urandom, because subsampling amplification and the noise both assume the server
    cannot predict them (a seed in the shared config would void the guarantee). Opacus'
    secure_mode (needs torchcsprng) is off: noise is Mersenne-Twister Gaussian.
    """
    n = train.shape[0]
    q = min(1.0, batch_size / n)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed ^ 0x5DEECE66D)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    module = peft_model
    if private:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        module = GradSampleModule(peft_model, batch_first=True, loss_reduction="mean")
        optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                expected_batch_size=batch_size, loss_reduction="mean", generator=noise_gen)
    peft_model.train()
    losses, sizes = [], []
    for _ in range(steps):
        idx = (torch.rand(n, generator=gen) < q).nonzero().squeeze(1)  # Poisson sample
        optimizer.zero_grad()
        if idx.numel() == 0:
            if private:  # an empty batch is still a (pure-noise) DP step
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape))
                optimizer.step()
            continue
        chunks = idx.split(micro_batch)
        loss_sum = 0.0
        for j, chunk in enumerate(chunks):
            nll = per_sample_nll(module, train[chunk])  # [len(chunk)]
            loss_sum += float(nll.detach().sum())
            if private:  # Opacus recovers per-record gradients from the chunk mean
                nll.mean().backward()
                if j < len(chunks) - 1:  # clip and sum this chunk's per-record gradients only
                    optimizer.signal_skip_step(do_skip=True)
                    optimizer.step()
                    optimizer.zero_grad()  # drops grad_sample, keeps the clipped sum
            else:  # mean over the whole batch, accumulated in .grad
                (nll.sum() / idx.numel()).backward()
        optimizer.step()
        losses.append(loss_sum / idx.numel())
        sizes.append(idx.numel())
    if private:
        module._close()  # remove Opacus hooks; the PEFT model is used afterwards
    peft_model.eval()
    return {"train-loss": sum(losses) / max(1, len(losses)), "mean-batch": sum(sizes) / max(1, len(sizes))}


@torch.no_grad()
def heldout_nll(model, x: torch.Tensor, batch: int = 16) -> tuple[float, int]:
    """(sum of token NLLs, number of predicted tokens) over records x [m, L]."""
    total = 0.0
    for i in range(0, x.shape[0], batch):
        chunk = x[i : i + batch]
        total += float(per_sample_nll(model, chunk).sum()) * (x.shape[1] - 1)
    return total, x.shape[0] * (x.shape[1] - 1)


@torch.no_grad()
def secret_nll(model, prefix: tuple[int, ...], secrets: list[tuple[int, ...]], pad_id: int) -> torch.Tensor:
    """[len(secrets)] summed NLL of each secret's tokens following `prefix`."""
    length = len(prefix) + max(len(s) for s in secrets)
    x = torch.full((len(secrets), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(secrets), length - 1)  # mask over predicted positions 1..length-1
    for row, s in enumerate(secrets):
        x[row, : len(prefix) + len(s)] = torch.tensor(prefix + s)
        mask[row, len(prefix) - 1 : len(prefix) - 1 + len(s)] = 1.0
    logits = model(input_ids=x).logits[:, :-1]  # causal: right padding never affects the secret
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
    return (nll.view(len(secrets), -1) * mask).sum(dim=1)


def _canary_scores(model, prefixes, secrets, references, pad_id: int):
    """Per canary: (exposure bits, AUC, gap nats); see canary_leakage."""
    for prefix, secret, refs in zip(prefixes, secrets, references):
        scores = secret_nll(model, prefix, [secret, *refs], pad_id)  # [1 + |R|]
        lower = float((scores[1:] < scores[0]).sum()) + 0.5 * float((scores[1:] == scores[0]).sum())
        yield (math.log2(len(refs) + 1) - math.log2(1 + lower), 1.0 - lower / len(refs),
               float(scores[1:].mean() - scores[0]))  # gap: nats the secret is favoured by


def canary_gaps(model, prefixes, secrets, references, pad_id: int) -> list[float]:
    """[canaries] gap (nats) of each canary under `model` (e.g. the base model)."""
    return [g for _, _, g in _canary_scores(model, prefixes, secrets, references, pad_id)]


def canary_leakage(model, prefixes, secrets, references, pad_id: int,
                   base_gaps: list[float] | None = None) -> dict[str, float]:
    """Exposure (Carlini et al. 2019) and membership AUC of the inserted canaries.

    For canary c with reference secrets R_c (never inserted): rank = 1 + #{r in R_c : nll(r)
    < nll(c)} (ties count half); exposure = log2(|R_c| + 1) - log2(rank), in [0, log2(|R_c|+1)];
    ~1 bit expected for an untouched model. AUC = P(nll(c) < nll(r)), 0.5 when nothing leaks.
    gap = mean_r nll(r) - nll(c) in nats; its change from the base model (same canaries, so
    the prior on particular digit strings cancels) is the low-variance memorisation signal.
    "*-sq" are the per-canary means of squares and "canaries" the count, so the server can
    pool owners and report the estimator's standard error over canaries. With `base_gaps`
    (the same canaries under the base model) "gap-increase" is the paired per-canary
    increase, whose spread is the gap's estimator noise.
    """
    if not secrets:
        return {"exposure": 0.0, "canary-auc": 0.5, "canary-gap": 0.0, "exposure-sq": 0.0, "canary-auc-sq": 0.25,
                "canaries": 0}
    exposures, aucs, gaps = map(list, zip(*_canary_scores(model, prefixes, secrets, references, pad_id)))
    k = len(exposures)
    out = {"exposure": sum(exposures) / k, "canary-auc": sum(aucs) / k, "canary-gap": sum(gaps) / k,
           "exposure-sq": sum(e * e for e in exposures) / k, "canary-auc-sq": sum(a * a for a in aucs) / k,
           "canaries": k}
    if base_gaps is not None:
        inc = [g - b for g, b in zip(gaps, base_gaps, strict=True)]
        out.update({"gap-increase": sum(inc) / k, "gap-increase-sq": sum(i * i for i in inc) / k})
    return out
