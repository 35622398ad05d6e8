"""LoRA inside the engine, as a Linear-level concern: adapters read from PEFT files
(peft.py) into stacked slots (registry.py); while adapters are enabled, the model's
projections are wrapped (linear.py) and add each row's adapter delta (batch.py). The
model code never branches on LoRA."""
