"""`--config FILE`: a command's flags from a TOML file (serve, chat, generate).

The file's keys are the command's long flag names, with `-` or `_` (`kv-cache` or
`kv_cache`; `model` for the positional model), and its values are TOML scalars of the
flag's type (a boolean for an on/off flag, an array for a repeatable one). They become
the parser's defaults before the command line is parsed, so a flag given on the command
line wins (a repeatable flag given there replaces the file's list). A key that is no
flag of the command, or a value of the wrong type, ends in one line naming the key and
exit status 2, as a wrong flag does; paths are used as written, like flags (relative to
the working directory).
"""

from __future__ import annotations

import argparse
import difflib
import sys

from bastion.cli_args import Parser

MAX_CONFIG_BYTES = 2**20
CONFIG_HELP = ("read flags from this TOML file: keys are long flag names (kv_cache or kv-cache, model for the "
               "model), values of the flag's type (true for on/off flags, arrays for repeatable ones); flags "
               "given on the command line win (example: docs/bastion.example.toml)")


def add_config_arg(p: argparse.ArgumentParser) -> None:
    """Give a command `--config FILE` (the parser must be a ConfigFileParser)."""
    p.add_argument("--config", metavar="FILE", default=None, help=CONFIG_HELP)
    p.epilog = (p.epilog or "") + (
        "Every flag above can also come from a TOML file given with --config FILE: one key per flag, named "
        "as the flag without its dashes (kv_cache = \"kivi\", port = 8080, no_prefix_caching = true, "
        "lora = [\"mine=path/to/adapter\"]); flags on the command line override the file. "
        "Example: docs/bastion.example.toml.")


class ConfigFileParser(Parser):
    """A Parser that applies `--config FILE` before it parses the rest of the command line.

    The file is found by its flag in the arguments (spelled out: `--config FILE` or
    `--config=FILE`), its values are checked against this parser's own flags and set as
    defaults for this one parse, then restored, so the parser can be used again."""

    def parse_known_args(self, args=None, namespace=None):
        action = next((a for a in self._actions if "--config" in a.option_strings), None)
        if action is None:
            return super().parse_known_args(args, namespace)
        argv = list(sys.argv[1:] if args is None else args)
        path = _config_path(argv)
        values = self._read_config(path) if path is not None else {}
        saved = [(a, a.default, a.required) for a in self._actions]
        saved_defaults = dict(self._defaults)
        try:
            self.set_defaults(**values)
            for a in self._actions:
                if a.dest in values:
                    a.required = False  # the file gives it
            parsed, rest = super().parse_known_args(argv, namespace)
        finally:
            for a, default, required in saved:
                a.default, a.required = default, required
            self._defaults = saved_defaults
        if getattr(parsed, action.dest, None) != path:  # an abbreviation (--conf) would go unread
            self.error("--config: write the flag out in full")
        appended = {a.dest for a in self._actions if isinstance(a, argparse._AppendAction)}
        for dest in appended & set(values):
            value, got = values[dest], getattr(parsed, dest, None)
            if got is not value and isinstance(got, list) and got[:len(value)] == value:
                setattr(parsed, dest, got[len(value):])  # given on the command line too: it replaces the file's
        return parsed, rest

    def _read_config(self, path: str) -> dict:
        try:
            return config_values(self, load_toml(path))
        except ValueError as e:
            self.error(f"--config {path}: {e}")


def _config_path(argv: list[str]) -> str | None:
    """The last `--config FILE` / `--config=FILE` before a `--` (None if there is none)."""
    path = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--config" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.partition("=")[2]
    return path


def load_toml(path: str) -> dict:
    """The parsed file; ValueError if it cannot be read or is not TOML."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise ValueError("reading a TOML file needs Python 3.11 or newer") from None
    from bastion.safe_io import read_regular

    try:
        text = read_regular(path, MAX_CONFIG_BYTES).decode("utf-8")
    except OSError as e:
        raise ValueError(e.strerror or str(e)) from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"not valid TOML: {e}") from None


def settable_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config key (long flag name, `_` for `-`; a positional's name) -> its action."""
    out = {}
    for action in parser._actions:
        if action.dest in (argparse.SUPPRESS, "config", "help") or isinstance(action, (
                argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        names = [s for s in action.option_strings if s.startswith("--")] or ([] if action.option_strings
                                                                              else [action.dest])
        if isinstance(action, argparse.BooleanOptionalAction):
            names = names[:1]  # --kv-hadamard (true/false), not --no-kv-hadamard
        for name in names:
            out[name.removeprefix("--").replace("-", "_")] = action
    return out


def config_values(parser: argparse.ArgumentParser, table: dict) -> dict:
    """The file's values as parser defaults: {dest: value}, each checked and converted as
    the flag's own value would be; ValueError naming the first bad key."""
    actions = settable_actions(parser)
    out: dict[str, object] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            msg = f"key {key!r}: tables are not flags (write the flags at the top level)"
            raise ValueError(msg)  # noqa: TRY004 (user input: ValueError, exit status 2)
        norm = key.replace("-", "_")
        action = actions.get(norm)
        if action is None:
            close = difflib.get_close_matches(norm, list(actions), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown key {key!r}{hint}: keys are the long names of this command's flags")
        if action.dest in out:
            raise ValueError(f"key {key!r} is given twice (as - and _ spellings)")
        out[action.dest] = _convert(key, action, value)
    return out


def _convert(key: str, action: argparse.Action, value):
    if isinstance(action, argparse.BooleanOptionalAction):
        return _expect_bool(key, value)
    if isinstance(action, argparse._StoreConstAction):  # store_true / store_false: as if the flag were given
        return action.const if _expect_bool(key, value) else action.default
    if isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        return [_scalar(f"{key}[{i}]", action, v) for i, v in enumerate(items)]
    if isinstance(action, argparse._StoreAction):
        if isinstance(value, list):
            msg = f"key {key!r}: expected one value, got an array (the flag is not repeatable)"
            raise ValueError(msg)  # noqa: TRY004
        return _scalar(key, action, value)
    raise ValueError(f"key {key!r}: the {'/'.join(action.option_strings)} flag cannot be set from a file")


def _expect_bool(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"key {key!r}: expected true or false, got {value!r}")  # noqa: TRY004
    return value


def _scalar(key: str, action: argparse.Action, value):
    kind = action.type
    if isinstance(value, (bool, list, dict)):
        ok = False
    elif kind is int:
        ok = isinstance(value, int)
    elif kind is float:
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        want = {int: "an integer", float: "a number"}.get(kind, "a string")
        raise ValueError(f"key {key!r}: expected {want}, got {value!r}")
    if kind not in (None, str, int, float):
        try:
            value = kind(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise ValueError(f"key {key!r}: {e}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(repr, action.choices))
        raise ValueError(f"key {key!r}: {value!r} is not one of {choices}")
    return value
