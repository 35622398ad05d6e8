"""`--config FILE` (issue 21): serve's (and chat's, generate's) flags from a TOML file.
Command line > file > defaults; every kind of flag settable; an unknown key or a wrong
type is one line naming the key and exit status 2, never a traceback. Parsing only: no
model is loaded (Config comes from cli_args.config_from_args)."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

from bastion.cli import build_parser, main
from bastion.cli_args import config_from_args
from bastion.cli_config import settable_actions

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "bastion.example.toml"


def _write(tmp_path, text: str, name: str = "bastion.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def _command_parser(command: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[command]


def _usage_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_command_line_beats_file_beats_defaults(tmp_path):
    cfg = _write(tmp_path, 'port = 8080\nkv-cache = "kivi"\ncanary = ["from-file"]\nmax_num_seqs = 3\n')
    defaults = config_from_args(_parse("serve"))
    from_file = config_from_args(_parse("serve", "--config", cfg))
    both = config_from_args(_parse("serve", "--port", "9000", "--config", cfg, "--canary", "cli-1", "--canary",
                                   "cli-2", "--kv-cache", "int8"))
    assert (defaults.server.port, defaults.cache.kind, defaults.guard.canaries) == (8000, "auto", ())
    assert (from_file.server.port, from_file.cache.kind, from_file.guard.canaries) == (8080, "kivi", ("from-file",))
    # a repeatable flag on the command line replaces the file's list
    assert (both.server.port, both.cache.kind, both.guard.canaries) == (9000, "int8", ("cli-1", "cli-2"))
    assert from_file.scheduler.max_num_seqs == both.scheduler.max_num_seqs == 3
    assert _parse("serve", f"--config={cfg}").port == 8080


def test_every_kind_of_flag_from_a_file(tmp_path):
    adapter = tmp_path / "adapter"
    cfg = _write(tmp_path, f"""
model = "{tmp_path / 'model.gguf'}"          # the positional
no_prefix_caching = true                      # store_true
log_requests = true
kv_hadamard = false                           # --flag / --no-flag
kv_clip = true
port = 0                                      # int
max_lora_rank = 32
quant_group = 128                             # int with choices
kv_memory = 2                                 # float (an integer is a number too)
max_body_mb = 0.5
api_key = "s3cret"                            # str
dtype = "float32"                             # str with choices
kv_cache = "kivi"
lora = ["mine={adapter}"]                     # append
cleangen = ["mine=15"]
canary = ["ZX-CANARY"]
""")
    args = _parse("serve", "--config", cfg)
    assert args.kv_hadamard is False and args.kv_clip is True and args.no_prefix_caching is True
    c = config_from_args(args)
    assert c.model.path == str(tmp_path / "model.gguf") and c.model.dtype == "float32" and c.model.quant_group == 128
    assert c.cache.prefix_caching is False and c.cache.kv_memory_gb == 2.0 and c.cache.kind == "kivi"
    assert c.cache.kv_hadamard is False and c.cache.kv_clip is True
    assert c.server.port == 0 and c.server.api_key == "s3cret" and c.server.log_requests is True
    assert c.server.max_body_bytes == 2**19
    assert c.adapters.loras == (("mine", str(adapter)),) and c.adapters.max_lora_rank == 32
    assert c.adapters.cleangen == (("mine", 15.0),) and c.guard.canaries == ("ZX-CANARY",)
    # false for an on/off flag: as if it were not given; a bare value for a repeatable flag: a list of one
    args = _parse("serve", "--config", _write(tmp_path, 'log_requests = false\ncanary = "one"\n', "b.toml"))
    assert args.log_requests is False and args.canary == ["one"]


def test_every_serve_flag_can_be_set(tmp_path):
    """A value for each of serve's flags, by the kind of its action: a flag added later
    that a file could not set fails here."""
    parser = _command_parser("serve")
    keys = settable_actions(parser)
    given = {a.dest for a in keys.values()}
    flags = {a.dest for a in parser._actions if a.dest not in ("help", "config")}
    assert flags == given
    lines, expected = [], {}
    for key, action in keys.items():
        if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
            toml, value = "true", True
        elif isinstance(action, argparse._AppendAction):
            toml, value = '["x=1", "y=2"]', ["x=1", "y=2"]
        elif action.choices:
            value = list(action.choices)[-1]
            toml = repr(value) if action.type is int else f'"{value}"'
        elif action.type is int:
            toml, value = "7", 7
        elif action.type is float:
            toml, value = "1.5", 1.5
        else:
            toml, value = f'"{key}-value"', f"{key}-value"
        lines.append(f"{key.replace('_', '-')} = {toml}")
        expected[action.dest] = value
    args = _parse("serve", "--config", _write(tmp_path, "\n".join(lines)))
    assert {dest: getattr(args, dest) for dest in expected} == expected


def test_unknown_keys_and_wrong_types_name_the_key(capsys, tmp_path):
    cases = {
        "prot = 8080": "unknown key 'prot' (did you mean 'port'?)",
        "model_path = 'x'": "unknown key 'model_path'",
        "help = true": "unknown key 'help'",
        "config = 'other.toml'": "unknown key 'config'",
        'port = "8080"': "key 'port': expected an integer, got '8080'",
        "port = 80.5": "key 'port': expected an integer, got 80.5",
        "kv_memory = true": "key 'kv_memory': expected a number, got True",
        "api_key = 123": "key 'api_key': expected a string, got 123",
        'no_prefix_caching = "yes"': "key 'no_prefix_caching': expected true or false, got 'yes'",
        "kv_hadamard = 1": "key 'kv_hadamard': expected true or false, got 1",
        'dtype = "fp8"': "key 'dtype': 'fp8' is not one of 'auto', 'bfloat16', 'float16', 'float32'",
        "quant_group = 64": "key 'quant_group': 64 is not one of 32, 128",
        'lora = ["a=b", 5]': "key 'lora[1]': expected a string, got 5",
        "port = [8000]": "key 'port': expected one value, got an array",
        "[server]\nport = 1": "key 'server': tables are not flags",
        'kv-cache = "kivi"\nkv_cache = "int8"': "key 'kv_cache' is given twice",
        "port = \n": "not valid TOML: Invalid value (at line 1, column 8)",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = _write(tmp_path, text, f"{i}.toml")
        line = _usage_error(capsys, "serve", "--config", path)
        assert line.startswith(f"bastion serve: error: --config {path}: {message}"), line


def test_unreadable_files_are_usage_errors(capsys, tmp_path):
    missing = tmp_path / "missing.toml"
    assert _usage_error(capsys, "serve", "--config", str(missing)).endswith("No such file or directory")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"port = \xff\xfe")
    assert _usage_error(capsys, "serve", "--config", str(binary)).endswith("not UTF-8 text")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # never blocks: refused before it is read
    assert "not a regular file" in _usage_error(capsys, "serve", "--config", str(fifo))
    assert _usage_error(capsys, "serve", "--conf", str(missing)) == \
        "bastion serve: error: --config: write the flag out in full"


def test_chat_and_generate_take_their_own_flags(capsys, tmp_path):
    cfg = _write(tmp_path, 'prompt = "from the file"\nmax_tokens = 3\nstop = ["x"]\nchat = true\n'
                           'lora = "some/adapter"\n')
    args = _parse("generate", "--config", cfg)  # --prompt is required: the file gives it
    assert (args.prompt, args.max_tokens, args.stop, args.chat, args.lora) == (
        "from the file", 3, ["x"], True, "some/adapter")
    args = _parse("generate", "--config", cfg, "-p", "cli", "--stop", "y")
    assert (args.prompt, args.stop) == ("cli", ["y"])
    assert _parse("chat", "--config", _write(tmp_path, "temperature = 0\n", "c.toml")).temperature == 0.0
    serve_only = _write(tmp_path, "port = 1\n", "s.toml")
    assert "unknown key 'port'" in _usage_error(capsys, "chat", "--config", serve_only)


def test_the_parser_is_unchanged_after_a_config(tmp_path):
    parser = build_parser()
    assert parser.parse_args(["serve", "--config", _write(tmp_path, "port = 1\n", "s.toml")]).port == 1
    assert parser.parse_args(["serve"]).port == 8000
    assert parser.parse_args(["generate", "--config", _write(tmp_path, 'prompt = "p"\n', "g.toml")]).prompt == "p"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate"])  # --prompt is required again


def test_serve_help_documents_it(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--config FILE" in out and "docs/bastion.example.toml" in out and "override the file" in out


def test_the_example_file_covers_every_serve_flag_and_parses(tmp_path):
    keys = settable_actions(_command_parser("serve"))
    text = EXAMPLE.read_text()
    c = config_from_args(_parse("serve", "--config", str(EXAMPLE)))
    assert c.server.port == 8000 and c.model.path is None  # as shipped: the defaults
    named = set(re.findall(r"^#? ?([a-z0-9_]+) = ", text, flags=re.MULTILINE))
    assert named == set(keys), f"docs/bastion.example.toml: add {sorted(set(keys) - named)}"
    uncommented = re.sub(r"^# ([a-z0-9_]+ = )", r"\1", text, flags=re.MULTILINE)
    _parse("serve", "--config", _write(tmp_path, uncommented))  # every commented value has the right type
