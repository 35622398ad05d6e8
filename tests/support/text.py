"""Real text for tests: the machine's licence texts (no downloads)."""

from __future__ import annotations

GPL_PATH = "/usr/share/common-licenses/GPL-3"


def gpl_text(start: str = "  The GNU General Public License is a free", chars: int = 4000) -> str:
    text = open(GPL_PATH, encoding="utf-8").read()
    i = text.index(start)
    return text[i : i + chars]
