"""Tokenizer and chat-template files shipped inside an adapter directory.

Bastion's serving never applies them (an adapter changes LoRA weights only), but other
tools (transformers' `AutoTokenizer.from_pretrained(adapter_dir)`, llama.cpp front-ends)
do, so they are flagged: any override warns; a template with server-side template
injection constructs, or a tokenizer config naming remote code, fails.

The template check is static (Jinja AST, never rendered) and defence in depth only: a
determined attacker can build attribute names at run time, so templates must still be
rendered in a sandbox (transformers uses jinja2's ImmutableSandboxedEnvironment).
"""

from __future__ import annotations

import json
from pathlib import Path

from bastion.adapters.scanner_files import strict_json

# Globals that exist only as SSTI gadgets in chat templates (their __init__.__globals__
# reach os/builtins); `namespace` is legitimate when called, suspicious otherwise.
GADGET_NAMES = {"cycler", "joiner", "lipsum", "self", "config", "request", "session", "g", "url_for",
                "get_flashed_messages", "__builtins__", "builtins"}
DANGEROUS_ATTRS = {"mro", "format_map", "func_globals", "f_globals", "f_locals", "f_back", "gi_frame",
                   "gi_code", "cr_frame", "tb_frame", "co_code", "load_module", "system", "popen",
                   "im_func", "func_code", "subclasses", "globals", "builtins", "import_module"}
DANGEROUS_FILTERS = {"attr"}  # |attr('__class__') bypasses the '.' syntax


def _environment():
    """The parser transformers renders chat templates with: loop controls and the
    {% generation %} block (parsed into a plain scope: we never render)."""
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    return ImmutableSandboxedEnvironment(extensions=[GenerationTag, loopcontrols])


def template_problems(source: str, *, max_bytes: int) -> list[str]:
    """Reasons this chat template looks like template injection (empty: none found)."""
    from jinja2 import TemplateSyntaxError, nodes

    if len(source.encode("utf-8", "replace")) > max_bytes:
        return [f"template is {len(source)} characters (limit {max_bytes} bytes)"]
    try:
        ast = _environment().parse(source)
    except TemplateSyntaxError as e:
        return [f"template does not parse (line {e.lineno}: {e.message}); it cannot be vetted"]
    out: list[str] = []
    called = {id(c.node) for c in ast.find_all(nodes.Call)}
    for n in ast.find_all((nodes.Import, nodes.FromImport, nodes.Include, nodes.Extends)):
        out.append(f"line {n.lineno}: {{% {type(n).__name__.lower()} %}} loads other templates")
    for n in ast.find_all(nodes.Getattr):
        if n.attr.startswith("_") or n.attr in DANGEROUS_ATTRS:
            out.append(f"line {n.lineno}: attribute access .{n.attr}")
    for n in ast.find_all(nodes.Getitem):
        if isinstance(n.arg, nodes.Const) and isinstance(n.arg.value, str) and n.arg.value.startswith("_"):
            out.append(f"line {n.lineno}: item access [{n.arg.value!r}]")
    for n in ast.find_all(nodes.Const):
        if isinstance(n.value, str) and ("__" in n.value or (n.value and set(n.value) == {"_"})):
            out.append(f"line {n.lineno}: string literal {n.value[:40]!r} (dunder construction)")
    for n in ast.find_all(nodes.Name):
        if n.name in GADGET_NAMES:
            out.append(f"line {n.lineno}: reference to {n.name!r} (SSTI gadget)")
        elif n.name == "namespace" and id(n) not in called:
            out.append(f"line {n.lineno}: 'namespace' used other than as namespace(...)")
    for n in ast.find_all(nodes.Filter):
        if n.name in DANGEROUS_FILTERS:
            out.append(f"line {n.lineno}: filter |{n.name}")
    return sorted(set(out), key=out.index)


def inspect_tokenizer_file(path: Path, rel: str, *, max_bytes: int, base_template: str | None):
    """Findings (check, severity, message, details) for one tokenizer/template file."""
    findings: list[tuple[str, str, str, dict]] = []
    name = Path(rel).name
    size = path.stat().st_size
    templates: list[tuple[str, str]] = []  # (where, source)
    if name == "chat_template.jinja":
        if size > max_bytes:
            return [("chat_template.injection", "fail", f"{rel}: {size} bytes exceeds the template limit", {})]
        templates.append((rel, path.read_text("utf-8", errors="replace")))
    elif name.endswith(".json"):
        if size > max_bytes * 64:  # tokenizer.json of a 50k vocab is a few MB
            return [("tokenizer.override", "warn", f"{rel}: {size} bytes, too large to inspect", {"file": rel})]
        try:
            data = strict_json(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            return [("tokenizer.override", "fail", f"{rel}: not valid JSON ({e})", {"file": rel})]
        if isinstance(data, dict):
            if data.get("auto_map") is not None:
                findings.append(("tokenizer.code_hook", "fail",
                                 f"{rel}: 'auto_map' points tokenizer loading at remote Python code",
                                 {"file": rel, "auto_map": _short(data["auto_map"])}))
            if data.get("trust_remote_code"):
                findings.append(("tokenizer.code_hook", "fail", f"{rel}: sets trust_remote_code", {"file": rel}))
            tpl = data.get("chat_template")
            if isinstance(tpl, str):
                templates.append((f"{rel}:chat_template", tpl))
            elif isinstance(tpl, list):
                for i, t in enumerate(tpl):
                    if isinstance(t, dict) and isinstance(t.get("template"), str):
                        templates.append((f"{rel}:chat_template[{t.get('name', i)}]", t["template"]))
            elif tpl is not None:
                findings.append(("chat_template.injection", "fail", f"{rel}: chat_template is not a string", {}))
            added = data.get("added_tokens_decoder") or data.get("added_tokens")
            if added and name != "tokenizer.json":
                findings.append(("tokenizer.override", "warn",
                                 f"{rel}: defines {len(added)} added/special tokens (possible trigger tokens)",
                                 {"file": rel}))
    for where, src in templates:
        problems = template_problems(src, max_bytes=max_bytes)
        if problems:
            findings.append(("chat_template.injection", "fail",
                             f"{where}: chat template has template-injection constructs: {'; '.join(problems[:5])}",
                             {"file": rel, "problems": problems}))
        elif base_template is not None and src.strip() == base_template.strip():
            findings.append(("chat_template.override", "info", f"{where}: identical to the base model's template",
                             {"file": rel}))
        else:
            findings.append(("chat_template.override", "warn",
                             f"{where}: overrides the chat template (can inject hidden instructions); "
                             "Bastion serving ignores it, other tools may not",
                             {"file": rel, "chars": len(src)}))
    if not templates:
        findings.append(("tokenizer.override", "warn",
                         f"{rel}: tokenizer/generation file inside the adapter (overrides the base "
                         "tokenizer in tools that load it; Bastion serving ignores it)", {"file": rel}))
    return findings


def _short(value) -> str:
    s = json.dumps(value) if not isinstance(value, str) else value
    return s if len(s) <= 200 else s[:200] + "..."
