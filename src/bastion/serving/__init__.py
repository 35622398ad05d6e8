"""The serving layer, above the token-id engine: the engine loop in a thread with
asyncio streams (AsyncEngine), the offline LLM API, tokenizers and chat templates,
detokenization and stop strings, adapter views, and the request-level policy (which
adapters pass the vetting gate, which requests CleanGen defends)."""
