"""The chat page at GET / (on unless `ServerConfig.web` is off: `bastion serve --no-web`).

Static files shipped in the package (server/web/: hand-written HTML, CSS and JS, no
build step, nothing fetched from elsewhere) and served with a strict Content-Security-
Policy: scripts and styles from this origin only, no inline script, so even a renderer
bug could not run script that came from model output. The page holds no data and asks
for the API key itself, so these paths are open (auth.py); every API call it makes
carries the key.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from starlette.responses import Response

_FILES = {  # URL path -> (file under server/web/, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/web/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/web/markdown.js": ("markdown.js", "text/javascript; charset=utf-8"),
    "/web/app.css": ("app.css", "text/css; charset=utf-8"),
}
PATHS = frozenset(_FILES)
_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # an upgraded server serves its new page at once
}

router = APIRouter(include_in_schema=False)


def _read(name: str) -> bytes:
    return resources.files("bastion.server").joinpath("web", name).read_bytes()


def _route(path: str, name: str, media_type: str) -> None:
    body = _read(name)  # read once, at import: a missing file fails at start, not per request

    @router.get(path)
    async def static_file() -> Response:
        return Response(body, media_type=media_type, headers=_HEADERS)


for _path, (_name, _media) in _FILES.items():
    _route(_path, _name, _media)
