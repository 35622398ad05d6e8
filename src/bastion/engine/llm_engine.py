"""LLMEngine: token ids in, token ids out. One `step()` = schedule, run, sample, postprocess.

Failure containment: an exception raised for one request fails that request alone
(finish_reason "error") and the engine goes on serving the others. Sampling and
postprocessing are per request, so a failure there is attributed at once (the batched
sampler is retried row by row). A failure in the batched forward pass names no request:
every request of that step is rolled back (preemption by recompute) and runs alone until
it samples a token, so the one that fails again is the one failed.
"""

from __future__ import annotations

import logging

import torch

from bastion.config import AdapterConfig, Config
from bastion.engine.kv_cache.block_manager import BlockManager
from bastion.engine.model_runner import ModelRunner, StepLogits
from bastion.engine.models.moe_offload import moe_stats
from bastion.engine.models.quantized_model import resident_bytes
from bastion.engine.outputs import EngineStats, PromptTooLongError, RequestOutput
from bastion.engine.request import Request, Scheduling, TokenFilter, Track
from bastion.engine.sampler import Sampler, token_logprobs
from bastion.engine.sampling_params import SamplingParams
from bastion.engine.scheduler import ScheduledBatch, Scheduler

log = logging.getLogger("bastion.engine")


class LLMEngine:
    def __init__(self, config: Config, model: torch.nn.Module, kv_cache, *, vocab_size: int,
                 eos_token_id: int | None, max_model_len: int):
        self.config = config
        self.kv_cache = kv_cache
        # the block manager is built from what the cache declares it can do
        self.block_manager = BlockManager(
            kv_cache.num_blocks, kv_cache.block_size, config.cache.prefix_caching and kv_cache.supports_prefix_cache,
            num_seq_slots=kv_cache.num_seq_slots if kv_cache.uses_seq_slots else None, blocks_for=kv_cache.blocks_for)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.runner = ModelRunner(model, kv_cache, next(model.parameters()).device)
        self.sampler = Sampler()
        self.vocab_size, self.eos_token_id, self.max_model_len = vocab_size, eos_token_id, max_model_len
        self.requests: dict[str, Request] = {}
        self.adapters = None  # the adapter registry once enable_adapters() is called
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.weight_bytes = resident_bytes(model)  # what the weights hold in memory (/metrics)

    # ------------------------------------------------------------------ adapters
    def enable_adapters(self, config: AdapterConfig) -> None:
        """Stacked adapter slots (see AdapterConfig) for batches that mix adapters;
        `self.adapters.load(name, path)` fills them."""
        self.adapters = self.runner.enable_adapters(config)

    def unload_adapter(self, name: str) -> None:
        slot = self.adapters.slot(name) if self.adapters else 0
        if any(t.adapter_slot == slot for r in self.requests.values() for t in r.tracks):
            raise ValueError(f"adapter {name!r} is serving requests; retry when they finish")
        self.adapters.unload(name)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    adapter: str | None = None, cache_salt: str = "", token_filter: TokenFilter | None = None,
                    scheduling: Scheduling | None = None) -> None:
        """`adapter` names the weights of track 0 (None: the base model). `cache_salt`
        separates prefix-cache namespaces (e.g. per tenant, so one tenant cannot probe
        another's cached prompts through time-to-first-token). `token_filter` sees every
        sampled token with the logits of the extra tracks it asks for (`tracks`), which
        run in the same batch, and may replace it. `scheduling`: priority and tenant, for
        the scheduler's policy (default: priority 0, no tenant)."""
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if any(not 0 <= t < self.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {self.vocab_size})")
        if params.top_k > self.vocab_size:
            raise ValueError(f"top_k must be at most the vocabulary size {self.vocab_size}, got {params.top_k}")
        if len(prompt_token_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(prompt_token_ids)} tokens; the context holds {self.max_model_len} "
                "(prompt plus at least one generated token)")
        names = [adapter, *(token_filter.tracks if token_filter is not None else ())]
        tracks = [self._track(name, cache_salt) for name in names]
        total = min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)
        bm = self.block_manager
        if len(tracks) * bm.blocks_for(total) > bm.num_blocks or len(tracks) > (bm.num_seq_slots or len(tracks)):
            raise PromptTooLongError(f"prompt + max_tokens = {total} tokens on {len(tracks)} track(s) cannot fit "
                                     f"the KV cache ({bm.num_blocks * bm.block_size} tokens)")
        req = Request(request_id, list(prompt_token_ids), params, eos_token_id=self.eos_token_id, tracks=tracks,
                      token_filter=token_filter, scheduling=scheduling or Scheduling())
        self.requests[request_id] = req
        self.scheduler.add(req)
        self.prompt_tokens_total += len(prompt_token_ids)

    def _track(self, adapter: str | None, cache_salt: str) -> Track:
        if not adapter:
            return Track(0, cache_salt)
        if self.adapters is None:
            raise ValueError(f"adapter {adapter!r} requested but adapters are not enabled")
        # NOTE: the salt keeps an adapter's KV (which differs from the base's) out of other
        # models' prefix-cache namespace; it names this load of the adapter, so a different
        # adapter loaded later under the same name never hits its blocks.
        return Track(self.adapters.slot(adapter), f"{cache_salt}|adapter:{self.adapters.cache_key(adapter)}")

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request now: its KV blocks return to the pool at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        try:
            logits = self.runner.execute(batch)
        except Exception as exc:  # noqa: BLE001 - names no request: see the module docstring
            return self._contain(batch, exc)
        samples = self._sample(logits)
        return self._postprocess(batch, logits, samples)

    def _sample(self, logits: StepLogits) -> list:
        """(token, logprob) per sampling request, or the exception sampling it raised."""
        reqs = logits.sample_reqs
        if not reqs:
            return []
        try:
            return list(zip(*self.sampler(logits.sample_logits, reqs, logits.track_logits)))
        except Exception:  # noqa: BLE001 - find the row that raises, sample the others
            out = []
            for i, req in enumerate(reqs):
                tracks = None if logits.track_logits is None else logits.track_logits[i : i + 1]
                try:
                    toks, lps = self.sampler(logits.sample_logits[i : i + 1], [req], tracks)
                    out.append((toks[0], lps[0]))
                except Exception as exc:  # noqa: BLE001
                    out.append(exc)
            return out

    def _contain(self, batch: ScheduledBatch, exc: Exception) -> list[RequestOutput]:
        reqs = [req for req, _ in batch.items]
        if len(reqs) == 1:
            return [self._fail(reqs[0], exc)]
        log.warning("a step of %d requests raised %s; running them one at a time to find the cause",
                    len(reqs), type(exc).__name__)
        self.scheduler.isolate(reqs)
        return []

    def _fail(self, req: Request, exc: BaseException) -> RequestOutput:
        log.error("request %s failed in the engine (%s); the engine goes on", req.request_id,
                  type(exc).__name__, exc_info=exc)
        self.scheduler.finish(req, "error")
        self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, req.prompt_token_ids, finished=True, finish_reason="error",
                             num_generated_tokens=req.num_output_tokens, error=f"{type(exc).__name__}: {exc}")

    def _postprocess(self, batch: ScheduledBatch, logits: StepLogits, samples: list) -> list[RequestOutput]:
        failed: dict[str, RequestOutput] = {}
        for req, n in batch.items:
            try:
                if req.request_id in logits.prompt_logits:
                    self._record_prompt_logprobs(req, *logits.prompt_logits[req.request_id])
                req.num_computed_tokens += n
                self.block_manager.cache_full_blocks(req)
            except Exception as exc:  # noqa: BLE001
                failed[req.request_id] = self._fail(req, exc)
        outputs = list(failed.values())
        for req, sample in zip(logits.sample_reqs, samples):
            if req.request_id in failed:
                continue
            if isinstance(sample, Exception):
                outputs.append(self._fail(req, sample))
                continue
            try:
                outputs.append(self._append(req, *sample))
            except Exception as exc:  # noqa: BLE001
                outputs.append(self._fail(req, exc))
        return outputs

    def _append(self, req: Request, tok: int, lp) -> RequestOutput:
        req.isolated = False  # it sampled: it was not the culprit of a failed step
        req.token_ids.append(tok)
        self.generation_tokens_total += 1
        out = RequestOutput(req.request_id, req.prompt_token_ids, new_token_ids=[tok],
                            new_logprobs=[lp] if lp is not None else None,
                            num_generated_tokens=req.num_output_tokens,
                            num_cached_prompt_tokens=req.num_cached_tokens,
                            num_replaced_tokens=req.num_replaced_tokens if req.token_filter else None)
        if req.num_output_tokens == 1 and req.prompt_logprobs is not None:
            out.prompt_logprobs = req.prompt_logprobs
        reason = self._finish_reason(req, tok)
        if reason:
            self.scheduler.finish(req, reason)
            self.requests.pop(req.request_id, None)
            out.finished, out.finish_reason = True, reason
        return out

    def _finish_reason(self, req: Request, tok: int) -> str | None:
        p = req.params
        if req.num_output_tokens >= p.min_tokens and (
            tok in p.stop_token_ids or (tok == self.eos_token_id and not p.ignore_eos)
        ):
            return "stop"
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _record_prompt_logprobs(self, req: Request, first_pos: int, rows: torch.Tensor) -> None:
        # rows[i] predicts the prompt token at position first_pos + i
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None] * req.num_prompt_tokens
        targets = torch.tensor(req.token_ids[first_pos : first_pos + rows.shape[0]])
        lp = torch.log_softmax(rows, dim=-1)
        n = req.params.prompt_logprobs
        for i, tl in enumerate(token_logprobs(lp, targets, [n] * rows.shape[0])):
            req.prompt_logprobs[first_pos + i] = tl

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_waiting=len(self.scheduler.waiting), num_running=len(self.scheduler.running),
            kv_blocks_total=bm.num_blocks, kv_blocks_used=bm.num_used_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total, generation_tokens_total=self.generation_tokens_total,
            weight_bytes=self.weight_bytes, **moe_stats(self.runner.model),
        )
