"""`bastion models [--dir DIR]... [--json]`: the models `bastion serve` can run here.

What is looked at is model_catalog.py's business (the embedded model, the model
directories); this file prints it: a table, or JSON for machines. An unreadable file is
listed with its error (exit status 0: the listing worked); a --dir that does not exist
is a usage error (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = ("NAME", "FORMAT", "ARCH", "QUANT", "PARAMS", "SIZE", "PATH")


def add_models_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "models", help="list the models this machine can serve (GGUF files, HF model directories)",
        description="List the models `bastion serve` can run here: the embedded default model, and GGUF files "
                    "and HF model directories (config.json + *.safetensors) under the model directories. Only "
                    "file headers are read: nothing is downloaded or loaded. A file that cannot be read is "
                    "listed with its error.")
    p.add_argument("--dir", action="append", default=None, metavar="DIR", dest="dirs",
                   help="look in this directory (or at this .gguf file) instead of the default ones: "
                        "$BASTION_CACHE/models (~/.cache/bastion/models) and the Hugging Face hub cache "
                        "(~/.cache/huggingface/hub), where they exist (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="print JSON: {\"dirs\": [...], \"models\": [{name, path, format, size_bytes, default, arch, "
                        "quantization, parameters, tensor_types, context_length, error}, ...]}")
    p.set_defaults(func=cmd_models)
    return p


def cmd_models(args: argparse.Namespace) -> int:
    from bastion.model_catalog import candidate_dirs, default_dirs, list_models

    dirs = default_dirs() if args.dirs is None else [Path(d).expanduser() for d in args.dirs]
    entries = list_models(dirs)  # ValueError (a --dir that does not exist) -> exit 2 in cli.main
    if args.json:
        print(json.dumps({"dirs": [str(d.absolute()) for d in dirs], "models": [e.to_json() for e in entries]},
                         indent=2))
        return 0
    print(format_table(entries))
    if args.dirs is None and not dirs:
        print("bastion models: no model directory here (looked for "
              + ", ".join(str(d) for d in candidate_dirs()) + "); --dir DIR looks elsewhere", file=sys.stderr)
    return 0


def format_table(entries) -> str:
    rows = [COLUMNS]
    for e in entries:
        name = f"{e.name} (default)" if e.default else e.name
        path = e.path + (f"  [error: {e.error}]" if e.error else "")
        rows.append((name, e.format, e.arch or "-", e.quantization or "-", human_count(e.parameters),
                     human_bytes(e.size_bytes), path))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(n)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n} B"
