"""Turns a scheduled batch into flat tensors + attention metadata, runs the model, and
returns only the logits rows someone needs (the next-token rows, and prompt rows of
requests that asked for prompt logprobs)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bastion.engine.kv_cache.base import AttentionMetadata, KVCache, PrefillSegment, SeqSpan
from bastion.engine.request import ReferenceView, Request
from bastion.engine.scheduler import ScheduledBatch


@dataclass
class StepLogits:
    sample_reqs: list[Request] = field(default_factory=list)
    sample_logits: torch.Tensor | None = None  # [S, V] fp32, row i -> sample_reqs[i]
    # request -> (position of the first token these rows predict from, logits [n, V])
    prompt_logits: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)
    ref_logits: torch.Tensor | None = None  # [S, V] base-model rows for sample_reqs with a token filter


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, device: torch.device):
        self.model, self.kv, self.device = model, kv_cache, device
        self.lora = None  # the AdapterRegistry, set when adapters are enabled
        self.block_size = kv_cache.block_size

    def _slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(block_ids, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare(self, batch: ScheduledBatch) -> tuple[list[tuple[Request, int]], torch.Tensor, torch.Tensor, AttentionMetadata]:
        # NOTE: single-token items first (one batched SDPA), then prompt chunks. Requests
        # with a token filter bring their reference track (base model) into the same batch.
        items = [(r, n) for req, n in batch.items for r in ((req, ReferenceView(req)) if req.token_filter else (req,))]
        # NOTE: single-token items sorted by adapter slot, so 8 decodes on 8 adapters are one
        # contiguous LoRA group (adapters/lora.py: no gather, no scatter).
        items = sorted((it for it in items if it[1] == 1), key=lambda it: it[0].lora_slot) + [
            it for it in items if it[1] > 1]
        ids, pos = [], []
        for req, n in items:
            c = req.num_computed_tokens
            ids += req.token_ids[c : c + n]
            pos += range(c, c + n)
        num_decodes = sum(1 for _, n in items if n == 1)
        meta = self._slot_metadata(items, num_decodes) if self.kv.uses_slots else AttentionMetadata(
            slot_mapping=torch.empty(0, dtype=torch.long), num_decodes=num_decodes)
        row = 0
        for req, n in items:
            meta.spans.append(SeqSpan(req.seq_slot, req.block_ids, req.num_computed_tokens, n, row))
            row += n
        self.kv.begin_step(meta)
        return (items, torch.tensor(ids, device=self.device), torch.tensor(pos, device=self.device), meta)

    def _slot_metadata(self, items, num_decodes: int) -> AttentionMetadata:
        """Slot-addressed metadata (fp pools): where new K/V go, what each row attends to."""
        meta = AttentionMetadata(slot_mapping=torch.cat(
            [self._slots(req.block_ids, req.num_computed_tokens, req.num_computed_tokens + n) for req, n in items]
        ).to(self.device))
        decodes = [req for req, _ in items[:num_decodes]]
        if decodes:
            ctx = torch.tensor([r.num_computed_tokens + 1 for r in decodes])
            max_ctx = int(ctx.max())
            nblk = -(-max_ctx // self.block_size)
            table = torch.zeros(len(decodes), nblk, dtype=torch.long)  # padded with block 0
            for i, r in enumerate(decodes):
                b = r.block_ids[:nblk]
                table[i, : len(b)] = torch.tensor(b)
            p = torch.arange(max_ctx)
            meta.num_decodes = len(decodes)
            meta.decode_slots = (table[:, p // self.block_size] * self.block_size + p % self.block_size).to(self.device)
            meta.decode_mask = (p[None, :] < ctx[:, None]).to(self.device)
            meta.decode_ctx_lens = ctx.to(self.device)
        row = len(decodes)
        for req, n in items[len(decodes) :]:
            end = req.num_computed_tokens + n
            meta.prefills.append(PrefillSegment(row, n, self._slots(req.block_ids, 0, end).to(self.device)))
            row += n
        return meta

    def _lora_step(self, items):
        if self.lora is None:
            return None
        from bastion.adapters.lora import LoraBatch, LoraStep

        segments = [(req.lora_slot, n) for req, n in items]
        batch = LoraBatch.build(segments, self.device)
        if batch is None:
            return None
        return LoraStep(self.lora.stacks, batch, self.lora.plan(frozenset(s for s, _ in segments) - {0}))

    def execute(self, batch: ScheduledBatch) -> StepLogits:
        items, input_ids, positions, meta = self.prepare(batch)
        hidden = self.model(input_ids, positions, meta, self.kv, self._lora_step(items))  # [T, hidden]
        out, rows, ref_rows, row = StepLogits(), [], {}, 0
        for req, n in items:
            if isinstance(req, ReferenceView):
                if req.num_computed_tokens + n == req.num_tokens:
                    ref_rows[req.request_id] = row + n - 1
                row += n
                continue
            if req.wants_prompt_logprobs:
                c = req.num_computed_tokens
                upto = min(n, req.num_prompt_tokens - 1 - c)  # rows that predict prompt tokens
                if upto > 0:
                    out.prompt_logits[req.request_id] = (c + 1, self.model.compute_logits(hidden[row : row + upto]).cpu())
            if req.num_computed_tokens + n == req.num_tokens:
                out.sample_reqs.append(req)
                rows.append(row + n - 1)
            row += n
        if ref_rows:  # NOTE: aligned with sample_reqs; rows of unfiltered requests repeat their own
            rows += [ref_rows.get(r.request_id, rows[i]) for i, r in enumerate(out.sample_reqs)]
        if rows:
            logits = self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)]).cpu()
            s = len(out.sample_reqs)
            out.sample_logits, out.ref_logits = logits[:s], (logits[s:] if ref_rows else None)
        return out
