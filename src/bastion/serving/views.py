"""The AsyncEngine as seen through one adapter: the same interface, every request runs
with that adapter. The server serves one view per adapter under the adapter's name."""

from __future__ import annotations

from typing import Any


class AdapterView:
    def __init__(self, base: Any, adapter: str):
        self.base, self.adapter, self.model_name = base, adapter, adapter

    def __getattr__(self, name):  # tokenizer, max_model_len, encode_*, abort, stats, ...
        return getattr(self.base, name)

    def generate(self, prompt_token_ids, params, request_id=None, token_filter=None, **kw):
        # kw: scheduling, cache_salt (AsyncEngine.generate)
        return self.base.generate(prompt_token_ids, params, request_id, adapter=self.adapter,
                                  token_filter=token_filter, **kw)
