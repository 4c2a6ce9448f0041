"""``lookahead serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the lookahead engine.

Endpoints: ``/v1/completions``, ``/v1/chat/completions`` (streaming by server-sent events or whole), ``/v1/models``,
``/v1/documents`` (feed the shared trie), ``/health`` and ``/metrics`` (Prometheus). All generation goes through
:class:`lookahead.scheduler.Scheduler`, which batches concurrent requests.

Importing this package loads nothing heavy: FastAPI is imported by :func:`create_app` (``pip install
'lookahead-rag[serve]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
