"""The `bastion` command line as a newcomer meets it (issue 23): --version, defaults in
every --help, each command's own flags, --lora parsing, the adapter slots sized from
the adapters given, and a taken port failing at once in one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from bastion.cli import _config, build_parser, main
from bastion.cli_args import parse_lora
from bastion.serving.adapter_rank import declared_rank, rank_too_large, slot_rank


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"bastion {version('bastion')}"


def test_every_help_shows_defaults(capsys):
    out = " ".join(_help(capsys, "generate").split())  # argparse wraps lines
    assert "stop after this many new tokens (default: 64)" in out
    assert "(default: 0.0)" in out and "(default: auto)" in out
    assert "(default: 0.7)" in " ".join(_help(capsys, "chat").split())
    assert "(default: 8000)" in " ".join(_help(capsys, "serve").split())
    # parsers registered by other subsystems get the formatter too
    assert "(default:" in _help(capsys, "scan") and "(default:" in _help(capsys, "bench", "serving")


def test_chat_and_generate_show_only_their_flags(capsys):
    for command in ("chat", "generate"):
        out = _help(capsys, command)
        assert "--max-waiting" not in out and "--served-model-name" not in out and "--port" not in out
        assert "--lora" in out
    serve = _help(capsys, "serve")
    assert "--max-waiting" in serve and "--served-model-name" in serve


def test_parse_lora():
    assert parse_lora("mine=/a/b") == ("mine", "/a/b")
    assert parse_lora("/a/my-adapter/", bare_path=True) == ("my-adapter", "/a/my-adapter/")
    assert parse_lora("mine=/a/b", bare_path=True) == ("mine", "/a/b")
    assert parse_lora("./runs/x=1", bare_path=True) == ("adapter", "./runs/x=1")  # not NAME=PATH: a path
    assert parse_lora("/a/@odd", bare_path=True) == ("adapter", "/a/@odd")
    for bad in ("/a/b", "=x", "x="):
        with pytest.raises(ValueError, match="NAME=PATH"):
            parse_lora(bad)
    with pytest.raises(ValueError, match="path"):
        parse_lora(" ", bare_path=True)


def _adapter_config(path, **cfg):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **cfg}))
    return path


def test_adapter_slots_are_sized_from_the_adapters_given(tmp_path):
    flora = _adapter_config(tmp_path / "flora", r=30)
    small = _adapter_config(tmp_path / "small", r=4, rank_pattern={"v_proj": 12})
    parse = build_parser().parse_args
    assert _config(parse(["serve", "--lora", f"a={flora}", "--lora", f"b={small}"])).adapters.max_lora_rank == 30
    assert _config(parse(["serve", "--lora", f"b={small}"])).adapters.max_lora_rank == 16  # never below 16
    assert _config(parse(["serve", "--admin-key", "k"])).adapters.max_lora_rank == 16
    # explicit wins (the engine then refuses the adapter, naming the flag)
    assert _config(parse(["serve", "--lora", f"a={flora}", "--max-lora-rank", "8"])).adapters.max_lora_rank == 8
    cfg = _config(parse(["generate", "-p", "x", "--lora", str(flora)])).adapters
    assert cfg.loras == (("flora", str(flora)),) and cfg.max_lora_rank == 30
    assert _config(parse(["generate", "-p", "x"])).adapters.enabled is False


def test_declared_rank_never_trusts_the_file(tmp_path):
    assert declared_rank(tmp_path / "missing") is None
    for i, text in enumerate(["{not json", "[1]", '{"r": "30"}', '{"r": true}', '{"r": -3}']):
        d = tmp_path / f"bad{i}"
        d.mkdir()
        (d / "adapter_config.json").write_text(text)
        assert declared_rank(d) is None
    assert declared_rank(_adapter_config(tmp_path / "no-r")) == 8  # PEFT's default r
    huge = _adapter_config(tmp_path / "huge", r=10**6)
    with pytest.raises(ValueError, match="--max-lora-rank 1000000"):
        slot_rank(None, [huge])
    assert slot_rank(64, [huge]) == 64
    msg = rank_too_large(_adapter_config(tmp_path / "r30", r=30), 16)
    assert "--max-lora-rank 30" in msg and "restart" in msg
    assert rank_too_large(tmp_path / "r30", 30) is None and rank_too_large(tmp_path / "r30", None) is None


def test_serve_on_a_taken_port_exits_at_once_naming_the_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "bastion.cli", "serve", "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 1 and time.monotonic() - start < 30
    assert err.strip().splitlines() == [f"bastion serve: error: port {port} is already in use (--port)"]


def test_serve_runs_the_behaviour_scan_unless_told_not_to(tmp_path, caplog):
    """On by default whenever adapters are on; --no-behaviour-scan says in a WARNING what
    is given up; --scan-cache DIR is created before the model loads. No model (and no
    worker process) is built here: the scan's is built on the first scan, in its worker."""
    from bastion.adapters.deep_scan import CachedProbe, DeepProbe
    from bastion.adapters.scan_worker import ProcessProbe
    from bastion.cli import serve_gate
    from bastion.config import AdapterConfig

    parse = build_parser().parse_args
    cache = tmp_path / "scans"
    config = _config(parse(["serve", "--admin-key", "k", "--scan-cache", str(cache)]))
    assert config.adapters.behaviour_scan and config.adapters.scan_cache == str(cache)
    gate = serve_gate(config, "served")
    assert isinstance(gate.behaviour, CachedProbe) and isinstance(gate.behaviour.probe, ProcessProbe)
    assert gate.behaviour.probe.factory is DeepProbe and gate.behaviour.probe.pid is None
    assert gate.behaviour.cache.root == cache
    assert gate.behaviour.probe._local.battery_probe._llm is None  # settings only: never built here
    assert serve_gate(_config(parse(["serve"])), "served") is None  # adapters off: no gate, no scan
    with caplog.at_level("WARNING"):
        off = serve_gate(_config(parse(["serve", "--admin-key", "k", "--no-behaviour-scan"])), "served")
    assert off.behaviour is None
    assert any("static checks only" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="scan_cache"):
        AdapterConfig(scan_cache=" ")
    (tmp_path / "file").write_text("")
    t0 = time.monotonic()
    assert main(["serve", "--admin-key", "k", "--scan-cache", str(tmp_path / "file"), "--port", "0"]) == 1
    assert time.monotonic() - t0 < 5  # a file is no cache directory: one line, exit 1, before the model loads


def test_api_keys_file_and_scheduling_flags(tmp_path, capsys):
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nname = "alice"\nkey = "sk-alice-123"\nmax_concurrent = 2\nadapters = ["sql"]\n\n'
                    '[[keys]]\nname = "bob"\nkey = "sk-bob-4567"\ntokens_per_min = 1000\nweight = 2\n')
    args = build_parser().parse_args(["serve", "--api-keys", str(keys), "--scheduling-policy", "fair"])
    config = _config(args)
    assert [(k.name, k.max_concurrent, k.tokens_per_min, k.adapters, k.weight) for k in config.server.api_keys] == [
        ("alice", 2, None, ("sql",), 1.0), ("bob", None, 1000, None, 2.0)]
    assert config.scheduler.policy == "fair"
    bad = {
        "nokeys": 'name = "x"\n',
        "typo": '[[keys]]\nname = "a"\nkey = "sk-aaaaaaaa"\nmax_concurent = 2\n',
        "type": '[[keys]]\nname = "a"\nkey = "sk-aaaaaaaa"\nmax_concurrent = "2"\n',
        "short": '[[keys]]\nname = "a"\nkey = "short"\n',
        "dup": '[[keys]]\nname = "a"\nkey = "sk-aaaaaaaa"\n[[keys]]\nname = "b"\nkey = "sk-aaaaaaaa"\n',
        "toml": "[[keys]\n",
    }
    for name, text in bad.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        assert main(["serve", "--api-keys", str(path)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("bastion serve: error:"), (name, err)
    assert main(["serve", "--api-keys", str(tmp_path / "missing.toml")]) == 2
    assert main(["serve", "--min-replicas", "2"]) == 2  # both bounds or neither
