"""Non-IID data owners built from real text on this machine, with held-out splits and canaries.

Four domains, one per owner (owner i gets domain i % 4; with more than 4 owners a domain's
documents are sharded among its owners by document index):

  0 python-docs   docstrings of Python standard-library modules, classes and functions (from source)
  1 man-pages     troff manual pages under /usr/share/man, macros stripped
  2 licences      /usr/share/common-licenses/* and /usr/share/doc/*/copyright
  3 package-docs  README / NEWS / changelog files under /usr/share/doc

Split is by *document*: held-out records come from documents that never reach training.
Every record is exactly `seq_len` tokens. Canaries ("... access code is 492817") are
inserted `canary_repeats` times each into the owner's training records; exposure is
measured against reference secrets of the same format that were never inserted.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

_DOC_CHARS = 8000  # cap per document: more documents, more diversity per owner
DOMAINS = ("python-docs", "man-pages", "licences", "package-docs")
_STDLIB = (
    "abc argparse ast asyncio base64 bisect calendar cmd codecs collections colorsys "
    "concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib "
    "dis doctest email enum filecmp fnmatch fractions ftplib functools getopt gettext glob "
    "gzip hashlib heapq hmac html html.parser http.client http.server imaplib inspect io "
    "ipaddress itertools json keyword linecache locale logging lzma mailbox mimetypes "
    "netrc numbers operator optparse os pathlib pickle pkgutil platform plistlib poplib "
    "pprint queue quopri random re reprlib sched secrets selectors shelve shlex shutil "
    "signal smtplib socket socketserver sqlite3 ssl stat statistics string struct "
    "subprocess symtable sysconfig tarfile tempfile textwrap threading timeit token "
    "tokenize tomllib trace traceback types typing unittest urllib.parse urllib.request "
    "uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree zipfile zipimport"
).split()


class Tokenizer:
    """Minimal interface shared by the HF tokenizer and the CI byte tokenizer."""

    def __init__(self, encode: Callable[[str], list[int]], eos_id: int, vocab_size: int):
        self.encode = encode
        self.eos_id = eos_id
        self.vocab_size = vocab_size


def byte_tokenizer() -> Tokenizer:
    """UTF-8 bytes 0..255, EOS = 256 (tiny CI model, vocab 257)."""
    return Tokenizer(lambda text: list(text.encode("utf-8")), 256, 257)


# --- document sources: each yields (doc_id, text) in a deterministic order -------------

def _python_docs() -> Iterator[tuple[str, Callable[[], str]]]:
    """Docstrings read from the modules' *source* with `ast`, never from live objects:
    what a running process has imported or monkeypatched (Ray replaces
    `inspect.isgenerator`, for one) must not change an owner's data, or a ClientApp and
    the process that checks it would split train / held-out differently."""
    for mod_name in _STDLIB:
        try:
            spec = importlib.util.find_spec(mod_name)
        except (ImportError, ValueError):
            continue
        origin = getattr(spec, "origin", None)
        if not origin or not origin.endswith(".py"):  # built-in / C modules have no source
            continue
        try:
            tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        doc = ast.get_docstring(tree)
        if doc:
            yield mod_name, (lambda t=f"Module {mod_name}\n\n{doc}": t)
        defs = {node.name: node for node in tree.body  # top level, last definition wins
                if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))}
        for name, node in sorted(defs.items()):
            doc = ast.get_docstring(node)
            if not name.startswith("_") and doc and len(doc) > 80:
                yield f"{mod_name}.{name}", (lambda t=f"{mod_name}.{name}\n\n{doc}": t)


_TROFF_ESC = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\\(..|\\\[[^\]]*\]|\\[&|^%:]|\\s[-+]?\d")


def _strip_troff(src: str) -> str:
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            if not parts or parts[0] in ("TH", "PD", "IX", "so", "de", "ds", "nr", "if", "ie", "el"):
                continue
            line = parts[1] if len(parts) > 1 else ""
            line = line.replace('"', "")
        line = _TROFF_ESC.sub("", line).replace("\\-", "-").replace("\\e", "\\")
        if line.strip():
            out.append(line.strip())
    return "\n".join(out)


def _man_text(path: Path) -> str:
    try:
        return _strip_troff(gzip.open(path, "rt", errors="replace").read())
    except (OSError, EOFError):
        return ""


def _man_pages() -> Iterator[tuple[str, Callable[[], str]]]:
    root = Path("/usr/share/man")
    for section in ("man1", "man5", "man8", "man3", "man7"):
        for path in sorted((root / section).glob("*.gz")):
            if not path.name.startswith("gcloud"):  # ~16k generated pages would drown the rest
                yield str(path), (lambda p=path: _man_text(p))


def _read(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", errors="replace") as f:
            return f.read(200_000)
    except (OSError, EOFError):
        return ""


def _licences() -> Iterator[tuple[str, Callable[[], str]]]:
    for path in sorted(Path("/usr/share/common-licenses").glob("*")):
        if path.is_file() and not path.is_symlink():
            yield str(path), (lambda p=path: _read(p))
    for path in sorted(Path("/usr/share/doc").glob("*/copyright")):
        yield str(path), (lambda p=path: _read(p))


def _package_docs() -> Iterator[tuple[str, Callable[[], str]]]:
    for path in sorted(Path("/usr/share/doc").rglob("*")):
        name = path.name.lower()
        if path.is_file() and name != "copyright" and name.startswith(("readme", "news", "changelog")):
            yield str(path), (lambda p=path: _read(p))


# Each source yields (doc_id, read) in a fixed order; `read()` loads the text lazily.
SOURCES: dict[str, Callable[[], Iterator[tuple[str, Callable[[], str]]]]] = {
    "python-docs": _python_docs, "man-pages": _man_pages,
    "licences": _licences, "package-docs": _package_docs,
}


# --- owners -----------------------------------------------------------------------------

@dataclass(frozen=True)
class OwnerData:
    """One owner's private data. All token tensors are int64."""

    domain: str
    train: torch.Tensor  # [n_train, seq_len], canary records included, shuffled
    heldout: torch.Tensor  # [n_heldout, seq_len], from held-out documents only
    canary_prefixes: tuple[tuple[int, ...], ...]  # [canaries] token ids before the secret
    canary_secrets: tuple[tuple[int, ...], ...]  # [canaries] inserted secret token ids
    reference_secrets: tuple[tuple[tuple[int, ...], ...], ...]  # [canaries][refs] never inserted


def _digits(rng: random.Random, n: int = 6) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def build_owner(owner: int, num_owners: int, tok: Tokenizer, *, seq_len: int, train_records: int,
                heldout_records: int, canaries: int, canary_repeats: int, canary_refs: int,
                seed: int) -> OwnerData:
    """Deterministic for fixed arguments: every process builds the same owner data."""
    domain = DOMAINS[owner % len(DOMAINS)]
    shard, shards = owner // len(DOMAINS), len(range(owner % len(DOMAINS), num_owners, len(DOMAINS)))
    rng = random.Random(f"{seed}-{owner}")
    docs = [d for i, d in enumerate(SOURCES[domain]()) if i % shards == shard]
    if not docs:
        raise ValueError(f"no text found on this machine for domain {domain!r}")
    rng.shuffle(docs)
    # Document-level split: fill held-out from the first documents, train from the rest.
    n_plain = train_records - canaries * canary_repeats
    heldout: list[list[int]] = []
    train: list[list[int]] = []
    buf: list[int] = []  # packed training tokens, documents joined by EOS
    seen: set[tuple[int, ...]] = set()  # held-out records, filled once held-out is complete
    for _doc_id, read in docs:
        text = read()
        if len(text) < 200:
            continue
        ids = tok.encode(text[:_DOC_CHARS]) + [tok.eos_id]
        if len(heldout) < heldout_records:  # whole document goes to held-out (tail dropped)
            for i in range(0, len(ids) - seq_len + 1, seq_len):
                if len(heldout) < heldout_records:
                    heldout.append(ids[i : i + seq_len])
            continue
        seen = seen or {tuple(r) for r in heldout}
        buf += ids
        while len(buf) >= seq_len and len(train) < n_plain:
            if tuple(buf[:seq_len]) not in seen:  # boilerplate (e.g. Debian copyright headers)
                train.append(buf[:seq_len])   # repeats across documents: never train on held-out
            buf = buf[seq_len:]
        if len(train) >= n_plain:
            break
    if len(heldout) < heldout_records or len(train) < max(8, n_plain // 4):
        raise ValueError(f"domain {domain!r} has too little text for owner {owner}")

    prefixes, secrets, refs = [], [], []
    for c in range(canaries):
        prefix = tok.encode(f"access code {rng.randrange(10**5):05d} is ")
        secret = tok.encode(_digits(rng))
        ref = []
        while len(ref) < canary_refs:
            cand = tok.encode(_digits(rng))
            if cand != secret:
                ref.append(tuple(cand))
        prefixes.append(tuple(prefix))
        secrets.append(tuple(secret))
        refs.append(tuple(ref))
        canary = prefix + secret + [tok.eos_id]
        if len(canary) > seq_len:
            raise ValueError(f"seq_len {seq_len} is shorter than a canary ({len(canary)} tokens)")
        for rep in range(canary_repeats):
            filler = train[(c * canary_repeats + rep) % len(train)]
            train.append((canary + filler)[:seq_len])
    rng.shuffle(train)
    return OwnerData(domain, torch.tensor(train, dtype=torch.long),
                     torch.tensor(heldout, dtype=torch.long), tuple(prefixes), tuple(secrets), tuple(refs))
