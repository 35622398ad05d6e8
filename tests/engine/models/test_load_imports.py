"""What building the engine on the embedded GGUF imports, in a fresh interpreter.

Issue 18's memory goal (peak RSS <= 1.3 x file + KV + 300 MB) is ~50 MB of headroom on
SmolLM2; torch._dynamo (with sympy) is ~40 MB of it and transformers' config modules
(torch.distributed, sympy) ~30 MB. Neither is used by the engine; both used to come in
by accident (nn.Embedding's init and Module.to_empty on meta tensors, LlamaConfig for a
GGUF's hyper-parameters)."""

from __future__ import annotations

import json
import subprocess
import sys

_SCRIPT = """
import json, sys
from bastion.config import CacheConfig, Config, ModelConfig
from bastion.engine.builder import build_engine
from bastion.engine.models.loader import embedded_model_path
cfg = Config(model=ModelConfig(path=str(embedded_model_path()), threads=1, max_model_len=64),
             cache=CacheConfig(num_blocks=8, block_size=16))
engine, _ = build_engine(cfg, eos_token_id=2, show_progress=False)
heavy = ("sympy", "torch._dynamo", "torch.distributed.tensor", "transformers.models.llama.configuration_llama")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def test_engine_build_imports_neither_dynamo_nor_transformers_configs():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
