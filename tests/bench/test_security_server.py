"""bench security --held-out --server: its summary, table and plot (the run itself trains
adapters and starts a server: minutes, so it is a benchmark, not a test)."""

from __future__ import annotations

from bastion.bench.security_cli import add_security_parser
from bastion.bench.security_server import GOAL_S, plot, summarize, table


def test_summary_table_and_plot(tmp_path):
    rows = [{"name": "s2_p00_port_punct_url", "kind": "poison", "state": "refused", "vetting": "fail",
             "scan_seconds": 190.0},
            {"name": "s2_c00_module", "kind": "clean", "state": "served", "vetting": "warn", "scan_seconds": 100.0},
            {"name": "s2_c01_port", "kind": "clean", "state": "served", "vetting": "pass", "scan_seconds": 110.0},
            {"name": "s2_p01_bad", "kind": "poison", "state": "refused", "vetting": "fail", "scan_seconds": None}]
    s = summarize(rows, threads=2)
    assert (s["adapters"], s["scanned"], s["median_s"], s["max_s"], s["within_goal"]) == (4, 3, 110.0, 190.0, 2)
    assert s["flagged"] == {"poison": 2, "clean": 1} and s["goal_s"] == GOAL_S
    result = {"summary": s, "rows": rows}
    md = table(result)
    assert "| s2_c00_module | clean | served | warn | 100.0 |" in md and "| - |" in md
    assert "median 110.0 s, max 190.0 s; 2 of 3 within 120 s" in md
    assert plot(result, tmp_path / "p.png").stat().st_size > 1000


def test_cli_takes_server_flag():
    import argparse

    ap = argparse.ArgumentParser()
    add_security_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["security", "--held-out", "--server", "--seeds", "2", "--size", "2,2"])
    assert args.held_out and args.server and args.size == "2,2"
