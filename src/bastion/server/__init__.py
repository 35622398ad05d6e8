"""OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of an AsyncEngine."""

from bastion.server.app import BastionServer, build_app, make_server, run_server, serve

__all__ = ["BastionServer", "build_app", "make_server", "run_server", "serve"]
