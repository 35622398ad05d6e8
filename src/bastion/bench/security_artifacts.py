"""Artifact-attack samples for the security benchmark: copies of a clean adapter with one
attack each. Payloads are harmless (they print or name a module that does not exist);
the gate must refuse every sample without executing, importing or rendering anything.

    make_samples(clean_adapter_dir, out_dir) -> {name: (path, what it attacks)}
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path


class _Payload:
    """Unpickling this would call print(...): proof of code execution, nothing more."""

    def __reduce__(self):
        return (print, ("bastion security sample: this pickle was executed",))


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    for junk in ("README.md",):
        (dst / junk).unlink(missing_ok=True)
    return dst


def _cfg(d: Path, **changes) -> None:
    p = d / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg, indent=2))


def _tensors(d: Path, fn) -> None:
    from safetensors.numpy import load_file, save_file

    p = d / "adapter_model.safetensors"
    t = fn(load_file(str(p)))
    save_file(t, str(p), metadata={"format": "pt"})


def _pickle_bin(d: Path) -> None:
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"weights": _Payload()}))


def _pickle_extra(d: Path) -> None:
    (d / "training_args.bin").write_bytes(pickle.dumps(_Payload()))


def _pickle_renamed(d: Path) -> None:   # a torch.save-style pickle under the safetensors name
    (d / "adapter_model.safetensors").write_bytes(pickle.dumps(_Payload(), protocol=2))


def _torch_zip(d: Path) -> None:
    import zipfile

    with zipfile.ZipFile(d / "optimizer.pt", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Payload()))


def _code_file(d: Path) -> None:
    (d / "modeling_lora.py").write_text('print("bastion security sample: imported")\n')


def _header_bomb(d: Path) -> None:
    p = d / "adapter_model.safetensors"
    data = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 2**50) + data[8:])


def _smuggled_bytes(d: Path) -> None:
    with open(d / "adapter_model.safetensors", "ab") as f:
        f.write(b"\x00hidden payload\x00" * 8)


def _nan(d: Path) -> None:
    def fn(t):
        k = sorted(x for x in t if "lora_B" in x)[0]
        t[k] = t[k].copy()
        t[k][0, 0] = float("nan")
        return t
    _tensors(d, fn)


def _wrong_shape(d: Path) -> None:
    import numpy as np

    def fn(t):
        k = sorted(x for x in t if "lora_A" in x)[0]
        t[k] = np.zeros((t[k].shape[0], t[k].shape[1] + 7), np.float32)
        return t
    _tensors(d, fn)


def _embed_lora(d: Path) -> None:
    import numpy as np

    def fn(t):
        r = next(v.shape[0] for k, v in t.items() if "lora_A" in k)
        t["base_model.model.lm_head.lora_A.weight"] = np.zeros((r, 576), np.float32)
        t["base_model.model.lm_head.lora_B.weight"] = np.zeros((49152, r), np.float32)
        return t
    _tensors(d, fn)


def _symlink_dev(d: Path) -> None:
    os.symlink("/dev/zero", d / "tokenizer.model")


def _template(d: Path) -> None:
    (d / "chat_template.jinja").write_text(
        "{{ cycler.__init__.__globals__.os.popen('echo bastion security sample').read() }}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}")


def _tokenizer_hook(d: Path) -> None:
    (d / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
        "tokenizer_class": "EvilTokenizer"}))


SAMPLES = {
    # name: (what it attacks, how)
    "pickle_adapter_bin": ("code execution: pickled weights instead of safetensors", _pickle_bin),
    "pickle_extra_file": ("code execution: a pickled training_args.bin next to the weights", _pickle_extra),
    "pickle_as_safetensors": ("code execution: a pickle under the safetensors name", _pickle_renamed),
    "torch_zip_optimizer": ("code execution: torch.save zip with data.pkl", _torch_zip),
    "python_file": ("code execution: a .py module shipped with the adapter", _code_file),
    "auto_mapping_hook": ("code execution: PEFT auto_mapping parent_library import",
                          lambda d: _cfg(d, auto_mapping={"base_model_class": "EvilModel",
                                                          "parent_library": "bastion_security_sample"})),
    "megatron_hook": ("code execution: megatron_core import", lambda d: _cfg(
        d, megatron_config={"tensor_model_parallel_size": 1}, megatron_core="bastion_security_sample")),
    "trust_remote_code": ("code execution: trust_remote_code in the config", lambda d: _cfg(d, trust_remote_code=True)),
    "tokenizer_auto_map": ("code execution: tokenizer auto_map to remote code", _tokenizer_hook),
    "chat_template_injection": ("code execution: Jinja SSTI in chat_template.jinja", _template),
    "swapped_base_model": ("wrong model: base_model_name_or_path of another model",
                           lambda d: _cfg(d, base_model_name_or_path="meta-llama/Llama-2-7b-hf")),
    "modules_to_save": ("weight replacement: modules_to_save lm_head", lambda d: _cfg(d, modules_to_save=["lm_head"])),
    "lm_head_lora": ("weight replacement: LoRA tensors on lm_head", _embed_lora),
    "header_bomb": ("DoS: safetensors header length 2^50", _header_bomb),
    "smuggled_bytes": ("parser differential: bytes after the last tensor", _smuggled_bytes),
    "symlink_dev_zero": ("DoS: symlink to /dev/zero", _symlink_dev),
    "nan_weights": ("degenerate weights: NaN", _nan),
    "wrong_shape": ("structure: A of the wrong width", _wrong_shape),
}


def make_samples(clean: str | Path, out: str | Path) -> dict[str, tuple[Path, str]]:
    out = Path(out)
    made = {}
    for name, (what, fn) in SAMPLES.items():
        d = _copy(Path(clean), out / name)
        fn(d)
        made[name] = (d, what)
    return made
