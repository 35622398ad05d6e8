"""Runtime defenses that hook in around the engine (the engine knows none of them)."""
