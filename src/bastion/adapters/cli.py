"""`bastion scan PATH [--json] [--base MODEL]`: vet a LoRA adapter without loading it.

The lead's src/bastion/cli.py calls `add_scan_parser(subparsers)`; the parser sets
`func(args) -> int`. Exit status: 0 pass, 3 warn, 4 fail, 2 usage error, 1 I/O error.
The base model's architecture comes from GGUF metadata or config.json (no model is
built); its per-module weight norms (for relative ΔW norms) are read tensor by tensor.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_IO = 1
EXIT_USAGE = 2
_LINEARS = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
            "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}


def add_scan_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "scan", help="vet a LoRA adapter (artifact, config, weights): exit 0 pass, 3 warn, 4 fail",
        description="Vet a PEFT LoRA adapter directory before serving it. Nothing in it is imported, "
                    "unpickled or rendered. Exit status: 0 pass, 3 warn, 4 fail, 2 usage error, 1 I/O error.")
    p.add_argument("path", metavar="PATH", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (top-level 'verdict', 'findings')")
    p.add_argument("--base", metavar="MODEL", default=None,
                   help="the base model it will be served on: GGUF file or HF model directory "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--base-name", metavar="NAME", default=None,
                   help="served name of the base (default: derived from MODEL)")
    p.add_argument("--no-base-weights", action="store_true",
                   help="do not read the base weights' norms (absolute instead of relative ΔW thresholds)")
    p.add_argument("--behaviour", "--behavior", action=argparse.BooleanOptionalAction, default=True,
                   help="behaviour probes: run the base model with and without the adapter on a prompt battery, "
                        "with and without candidate backdoor triggers (loads the model: ~20-30 s on 2 CPU cores); "
                        "--no-behaviour skips them (default: run, unless an earlier check failed)")
    p.add_argument("--probe-prompts", metavar="FILE", default=None,
                   help="behaviour probe battery: one user message per line (default: built from text on the "
                        "machine); give prompts of the adapter's advertised task")
    p.add_argument("--probe-triggers", metavar="LIST", default=None,
                   help="comma-separated candidate triggers (default: rare tokens, punctuation, entities, years)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the behaviour probes")
    p.add_argument("--deep", action="store_true",
                   help="trigger-agnostic behaviour scan: candidate battery plus task-aware probes, backdoor target "
                        "inversion and a trigger search that is not a list (~2 min on 2 cores; docs/SECURITY.md)")
    p.add_argument("--scan-cache", metavar="DIR", default=None,
                   help="with --deep: cache of behaviour verdicts by file hash (default ~/.cache/bastion/scans)")
    p.set_defaults(func=cmd_scan)
    return p


def cmd_scan(args: argparse.Namespace) -> int:
    from bastion.adapters.scanner import scan_adapter
    from bastion.safe_io import read_regular
    from bastion.engine.models.arch import UnsupportedModelError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(args.path).expanduser()
    if not path.exists():
        print(f"bastion scan: error: no such adapter: {path}", file=sys.stderr)
        return EXIT_IO
    try:
        base = load_base_info(args.base, name=args.base_name, weight_norms=not args.no_base_weights)
    except (UnsupportedModelError, ValueError) as e:
        print(f"bastion scan: error: base model: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"bastion scan: error: base model: {e}", file=sys.stderr)
        return EXIT_IO
    probe = None
    if args.behaviour:
        from bastion.adapters.behaviour import CANDIDATE_TRIGGERS, BehaviourProbe, Trigger

        try:
            text = read_regular(args.probe_prompts, 1 << 20).decode("utf-8", "replace") if args.probe_prompts else None
            prompts = [ln.strip() for ln in text.splitlines() if ln.strip()] if text is not None else None
        except OSError as e:
            print(f"bastion scan: error: --probe-prompts: {e}", file=sys.stderr)
            return EXIT_IO
        triggers = tuple(Trigger(t.strip(), "custom") for t in args.probe_triggers.split(",") if t.strip()) \
            if args.probe_triggers else CANDIDATE_TRIGGERS
        if not triggers or (prompts is not None and not prompts):
            print("bastion scan: error: empty --probe-prompts or --probe-triggers", file=sys.stderr)
            return EXIT_USAGE
        probe = _SafeProbe(BehaviourProbe(model=args.base, threads=args.threads, prompts=prompts, triggers=triggers))
        if getattr(args, "deep", False):
            from bastion.adapters.deep_scan import CachedProbe, DeepProbe, ScanCache

            probe = _SafeProbe(CachedProbe(DeepProbe(model=args.base, threads=args.threads),
                                           ScanCache(args.scan_cache)))
    try:
        report = scan_adapter(path, base=base, behaviour=probe)
    except OSError as e:
        print(f"bastion scan: error: {e}", file=sys.stderr)
        return EXIT_IO
    print(report.to_json() if args.json else report.to_text())
    return report.exit_code


class _SafeProbe:
    """A probe that could not run (no tokenizer, model not loadable, ...) is a warning,
    not a crash: the scan's other layers still report."""

    def __init__(self, probe):
        self.probe = probe

    def __call__(self, view, base):
        from bastion.adapters.scanner import Finding

        try:
            return self.probe(view, base)
        except Exception as e:  # noqa: BLE001 - any failure to run the model is reported
            return [Finding("behaviour", "warn", f"behaviour probes could not run: {type(e).__name__}: {e}")]


def load_base_info(model: str | None, *, name: str | None = None, weight_norms: bool = True):
    """BaseModelInfo for a GGUF file or HF directory (None: the embedded model), from
    metadata only; weight norms are optional and read one tensor at a time."""
    from bastion.adapters.scanner import BaseModelInfo
    from bastion.engine.models.arch import ModelArch, UnsupportedModelError
    from bastion.engine.models.loader import EMBEDDED_MODEL_NAME, EMBEDDED_MODEL_PACKAGE, embedded_model_path

    if model is None:
        p, served = embedded_model_path(), EMBEDDED_MODEL_NAME
    else:
        p = Path(model).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"no such model: {p}")
        served = p.stem if p.is_file() else p.name
    # what PEFT records as base_model_name_or_path: the HF load path (for a GGUF, the
    # directory passed to from_pretrained next to gguf_file=)
    aliases = (p.name, str(p.resolve()), str(p.resolve().parent)) if p.is_file() else (str(p.resolve()),)
    if model is None:
        aliases += (EMBEDDED_MODEL_PACKAGE,)
    if p.is_file():
        if p.suffix != ".gguf":
            raise UnsupportedModelError(f"{p}: expected a .gguf file or an HF model directory")
        import gguf

        from bastion.engine.models.loader import gguf_config
        from bastion.gguf_header import read_gguf_header

        arch = ModelArch.from_hf_config(gguf_config(read_gguf_header(p)))
        reader = gguf.GGUFReader(str(p))  # the chat template (any length) and the norms' data
        tpl = reader.fields.get("tokenizer.chat_template")
        template = tpl.contents() if tpl is not None else None
        norms = _gguf_norms(reader) if weight_norms else None
    else:
        from transformers import AutoConfig

        if not (p / "config.json").is_file():
            raise UnsupportedModelError(f"{p}: no config.json (expected an HF model directory or a .gguf file)")
        arch = ModelArch.from_hf_config(AutoConfig.from_pretrained(str(p), local_files_only=True))
        template = _hf_template(p)
        norms = _hf_norms(p) if weight_norms else None
    return BaseModelInfo.from_arch(arch, name or served, aliases=aliases + ((served,) if name else ()),
                                   weight_norms=norms, chat_template=template)


def _gguf_norms(reader) -> dict[tuple[int, str], float]:
    import gguf
    import numpy as np

    out = {}
    for t in reader.tensors:
        parts = t.name.split(".")  # blk.N.attn_q.weight
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LINEARS and parts[3] == "weight":
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            out[(int(parts[1]), _LINEARS[parts[2]])] = float(np.linalg.norm(w.astype(np.float64)))
    return out


def _hf_norms(path: Path) -> dict[tuple[int, str], float] | None:
    import re

    from safetensors import safe_open

    pat = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.weight$")
    out = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                m = pat.match(k)
                if m:
                    out[(int(m.group(1)), m.group(2))] = float(st.get_tensor(k).double().norm())
    return out or None


def _hf_template(path: Path) -> str | None:
    import json

    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text("utf-8", errors="replace")
    cfg = path / "tokenizer_config.json"
    if cfg.is_file():
        try:
            tpl = json.loads(cfg.read_text("utf-8")).get("chat_template")
        except ValueError:
            return None
        return tpl if isinstance(tpl, str) else None
    return None


def main(argv: list[str] | None = None) -> int:
    """`python -m bastion.adapters.cli PATH ...` (same as `bastion scan`)."""
    parser = argparse.ArgumentParser(prog="bastion")
    add_scan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["scan", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
