"""``lookahead serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the lookahead engine.

Endpoints: ``/v1/completions``, ``/v1/chat/completions`` (streaming by server-sent events or whole), ``/v1/models``,
``/v1/documents`` (feed the shared trie), ``/health`` and ``/metrics`` (Prometheus). All generation goes through
:class:`lookahead.scheduler.Scheduler`, which batches concurrent requests.

Importing this package loads nothing heavy (the ``lookahead`` command line imports :mod:`.cli` to list ``serve``):
the app is in :mod:`lookahead_server.app` (``from lookahead_server.app import ServeSettings, create_app``; it needs
``pip install 'lookahead-rag[serve]'``).
"""
