"""Turns a scheduled batch into flat tensors + attention metadata, runs the model, and
returns only the logits rows someone needs: the next-token rows (track 0 of each request
that samples, and its extra tracks' rows at the same position, for its token filter) and
prompt rows of requests that asked for prompt logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bastion.config import AdapterConfig
from bastion.engine.kv_cache.base import AttentionMetadata, KVCache, PrefillSegment, SeqSpan
from bastion.engine.request import Request, Track
from bastion.engine.scheduler import ScheduledBatch


@dataclass
class StepLogits:
    sample_reqs: list[Request] = field(default_factory=list)
    sample_logits: torch.Tensor | None = None  # [S, V] fp32, row i -> sample_reqs[i] (track 0)
    # request -> (position of the first token these rows predict from, logits [n, V])
    prompt_logits: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)
    # per sample_reqs[i]: its extra tracks' rows [K, V] at the same position (None: no
    # extra tracks); the list itself is None when no request of the step has any
    track_logits: list[torch.Tensor | None] | None = None


@dataclass
class _Item:
    """One track's share of a step: n new tokens of `req` through `track`."""

    req: Request
    track: Track
    index: int  # 0: the sampled track
    n: int


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, device: torch.device):
        self.model, self.kv, self.device = model, kv_cache, device
        self.block_size = kv_cache.block_size
        self.adapters = None  # engine/lora AdapterRegistry once enabled
        self._lora = None  # its LoraContext (the wrapped projections read it)

    def enable_adapters(self, config: AdapterConfig):
        """Adapter slots for multi-LoRA batches; the model's projections are wrapped."""
        from bastion.engine.lora.linear import install
        from bastion.engine.lora.registry import AdapterRegistry

        p = next(self.model.parameters())
        self.adapters = AdapterRegistry(self.model.arch, config, p.dtype, p.device)
        self._lora = install(self.model, self.adapters)
        return self.adapters

    def _slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(block_ids, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare(self, batch: ScheduledBatch) -> tuple[list[_Item], torch.Tensor, torch.Tensor, AttentionMetadata]:
        items = [_Item(req, track, i, n) for req, n in batch.items for i, track in enumerate(req.tracks)]
        # NOTE: single-token items first (one batched decode attention), then prompt chunks;
        # single-token items sorted by adapter slot, so 8 decodes on 8 adapters are one
        # contiguous LoRA group (lora/batch.py: no gather, no scatter).
        items = sorted((it for it in items if it.n == 1), key=lambda it: it.track.adapter_slot) + [
            it for it in items if it.n > 1]
        ids, pos = [], []
        for it in items:
            c = it.req.num_computed_tokens
            ids += it.req.token_ids[c : c + it.n]
            pos += range(c, c + it.n)
        num_decodes = sum(1 for it in items if it.n == 1)
        meta = self._slot_metadata(items, num_decodes) if self.kv.uses_slots else AttentionMetadata(
            slot_mapping=torch.empty(0, dtype=torch.long), num_decodes=num_decodes)
        row = 0
        for it in items:
            meta.spans.append(SeqSpan(it.track.seq_slot, it.track.block_ids, it.req.num_computed_tokens, it.n, row))
            row += it.n
        self.kv.begin_step(meta)
        return items, torch.tensor(ids, device=self.device), torch.tensor(pos, device=self.device), meta

    def _slot_metadata(self, items: list[_Item], num_decodes: int) -> AttentionMetadata:
        """Slot-addressed metadata (fp pools): where new K/V go, what each row attends to."""
        meta = AttentionMetadata(slot_mapping=torch.cat([
            self._slots(it.track.block_ids, it.req.num_computed_tokens, it.req.num_computed_tokens + it.n)
            for it in items]).to(self.device))
        decodes = items[:num_decodes]
        if decodes:
            ctx = torch.tensor([it.req.num_computed_tokens + 1 for it in decodes])
            max_ctx = int(ctx.max())
            nblk = -(-max_ctx // self.block_size)
            table = torch.zeros(len(decodes), nblk, dtype=torch.long)  # padded with block 0
            for i, it in enumerate(decodes):
                b = it.track.block_ids[:nblk]
                table[i, : len(b)] = torch.tensor(b)
            p = torch.arange(max_ctx)
            meta.num_decodes = len(decodes)
            meta.decode_slots = (table[:, p // self.block_size] * self.block_size + p % self.block_size).to(self.device)
            meta.decode_mask = (p[None, :] < ctx[:, None]).to(self.device)
            meta.decode_ctx_lens = ctx.to(self.device)
        row = len(decodes)
        for it in items[len(decodes) :]:
            end = it.req.num_computed_tokens + it.n
            meta.prefills.append(PrefillSegment(row, it.n, self._slots(it.track.block_ids, 0, end).to(self.device)))
            row += it.n
        return meta

    def _forward(self, items: list[_Item], input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        if self._lora is None:
            return self.model(input_ids, positions, meta, self.kv)
        self._lora.begin([(it.track.adapter_slot, it.n) for it in items], self.device)
        try:
            return self.model(input_ids, positions, meta, self.kv)
        finally:
            self._lora.end()

    def execute(self, batch: ScheduledBatch) -> StepLogits:
        items, input_ids, positions, meta = self.prepare(batch)
        hidden = self._forward(items, input_ids, positions, meta)  # [T, hidden]
        out, rows, extra, row = StepLogits(), [], {}, 0
        for it in items:
            req, n = it.req, it.n
            last = req.num_computed_tokens + n == req.num_tokens  # this step's rows end in a sampled position
            if it.index:
                if last:
                    extra.setdefault(req.request_id, {})[it.index] = row + n - 1
            else:
                if req.wants_prompt_logprobs:
                    c = req.num_computed_tokens
                    upto = min(n, req.num_prompt_tokens - 1 - c)  # rows that predict prompt tokens
                    if upto > 0:
                        out.prompt_logits[req.request_id] = (
                            c + 1, self.model.compute_logits(hidden[row : row + upto]).cpu())
                if last:
                    out.sample_reqs.append(req)
                    rows.append(row + n - 1)
            row += n
        if not rows:
            return out
        # NOTE: one lm_head call: track 0 rows first, then each request's extra track rows
        extra_rows = [[extra[r.request_id][k] for k in sorted(extra[r.request_id])] if r.request_id in extra else []
                      for r in out.sample_reqs]
        flat = rows + [x for e in extra_rows for x in e]
        logits = self.model.compute_logits(hidden[torch.tensor(flat, device=hidden.device)]).cpu()
        s = len(rows)
        out.sample_logits = logits[:s]
        if extra:
            out.track_logits, at = [], s
            for e in extra_rows:
                out.track_logits.append(logits[at : at + len(e)] if e else None)
                at += len(e)
        return out
