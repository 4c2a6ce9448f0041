"""``lookahead serve``: the command-line entry of the server. Imports nothing heavy until the command runs.

:func:`add_parser` is registered through the ``lookahead.commands`` entry point (``pyproject.toml``), so the core CLI
finds it without importing this package by name.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from lookahead.argtypes import (
    RunnerUnavailable,
    add_ray_options,
    load_runner,
    non_negative_float,
    port,
    positive_float,
    positive_int,
)

INSTALL_HINT = "pip install 'lookahead-rag[serve]'"
#: the entry point group whose ``ray`` runner (``run(args, settings) -> exit status``) runs ``--ray``: the
#: lookahead_ray integration registers it (``pip install 'lookahead-rag[ray]'``)
RUNNERS = "lookahead_server.runners"
_NEEDED = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client"}


def missing_dependencies() -> list[str]:
    """Distribution names of the serve extra that are not installed."""
    return [dist for module, dist in _NEEDED.items() if importlib.util.find_spec(module) is None]


def add_parser(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None],
               build: Callable[[argparse.Namespace], tuple]) -> argparse.ArgumentParser:
    """Register ``lookahead serve`` on the CLI's subparsers."""
    parser = sub.add_parser("serve", help=f"OpenAI-compatible HTTP server (needs: {INSTALL_HINT})",
                            description="OpenAI-compatible server: /v1/completions, /v1/chat/completions, "
                                        "/v1/models, /v1/documents, /health, /metrics. Requests without a "
                                        "temperature (or with 0) are answered greedily.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=port, default=8000, help="port (default: 8000)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                             "(default: $LOOKAHEAD_API_KEY; prefer the variable: arguments show in ps)")
    parser.add_argument("--trie", default=None, metavar="PATH",
                        help="load the shared trie from PATH at start, save it there periodically and at shutdown "
                             "(.gz: compressed); a corrupt file is moved to PATH.corrupt-<time>")
    parser.add_argument("--trie-save-interval", type=non_negative_float, default=300.0, metavar="SECONDS",
                        help="seconds between trie saves when it changed (0: only at shutdown; default 300)")
    tenants = parser.add_mutually_exclusive_group()
    tenants.add_argument("--tenant-header", default=None, metavar="NAME",
                         help="header naming each request's tenant (set by a trusted gateway): every tenant drafts "
                              "from a trie of its own (past answers and documents), saved next to --trie")
    tenants.add_argument("--tenant-keys", default=None, metavar="FILE",
                         help="file of 'API-KEY TENANT' lines (# comments): each listed key is accepted and decides "
                              "the request's tenant, which drafts from a trie of its own")
    parser.add_argument("--max-tenants", type=positive_int, default=64, metavar="N",
                        help="most tenant tries held in memory (default 64); with --trie the least recently used "
                             "idle tenant is saved to its file and unloaded to make room, without --trie a new "
                             "tenant past N is refused (403)")
    parser.add_argument("--stream-chunk", default=None, metavar="{run,token,fixed:N}[@R]",
                        help="how streamed answers are cut: 'run' (one chunk per accepted run, fastest; chunk sizes "
                             "and times show how much was drafted), 'token' or 'fixed:N' (N tokens per chunk at a "
                             "steady cadence, hiding it; clients see the speed of decoding without drafts); '@R' "
                             "sets that cadence to R tokens per second (token@10: nothing of the drafts shows while "
                             "decoding keeps ahead of R). Default: token with --tenant-header/--tenant-keys, else run")
    parser.add_argument("--max-batch-size", type=positive_int, default=8, help="most requests decoded together")
    parser.add_argument("--max-queue", type=positive_int, default=64,
                        help="most requests waiting for a batch slot; more get HTTP 429")
    parser.add_argument("--max-kv-gib", type=positive_float, default=None, metavar="GIB",
                        help="most KV cache (GiB) the running requests may reserve together; each reserves "
                             "(prompt + max_tokens + decoding length + 1) tokens' worth and waits in the queue until "
                             "it fits (default: 90%% of the free GPU memory at start; no limit on CPU)")
    parser.add_argument("--served-model-name", default=None,
                        help="model id in /v1/models and responses (default: the --model value)")
    parser.add_argument("--default-max-tokens", type=positive_int, default=256,
                        help="max_tokens of requests that give none (default 256, capped by the context left)")
    parser.add_argument("--max-body-mb", type=positive_int, default=16, help="largest request body in MiB")
    parser.add_argument("--max-request-tokens", type=positive_int, default=32768, metavar="N",
                        help="most tokens of a request's prompt, prediction and documents together; past it a 413 "
                             "(default: 32768)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_ray_args(parser)
    add_model_args(parser)
    parser.set_defaults(func=lambda args: cmd_serve(args, build))
    return parser


def _add_ray_args(parser: argparse.ArgumentParser) -> None:
    """``--ray`` and its options (run by the runner registered in :data:`RUNNERS`)."""
    add_ray_options(parser, "replica", "serve as a Ray Serve deployment: --replicas replicas with a model and "
                                       "scheduler each, sharing one trie (--trie persists it)", "answers")


def _serve_on_ray(args: argparse.Namespace, settings: Any) -> int:
    """Run the deployment, or say how to install Ray."""
    try:
        run = load_runner(RUNNERS, "ray", "lookahead serve --ray")
    except RunnerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return int(run(args, settings))


def cmd_serve(args: argparse.Namespace, build: Callable[[argparse.Namespace], tuple]) -> int:
    """Check the options and the serve extra, load the model, then serve until interrupted."""
    missing = missing_dependencies()
    if missing:
        print(f"error: lookahead serve needs {', '.join(missing)}: {INSTALL_HINT}", file=sys.stderr)
        return 2
    api_key = args.api_key if args.api_key is not None else os.environ.get("LOOKAHEAD_API_KEY") or None
    if api_key is not None and not api_key.strip():
        print("error: --api-key is empty", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from .app import ServeSettings, create_app
    from .persistence import TrieFileError, TrieStore
    from .tenants import read_tenant_keys

    if args.trie:
        try:
            TrieStore(args.trie).check()  # before the model loads
        except TrieFileError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    try:
        tenant_keys = read_tenant_keys(args.tenant_keys) if args.tenant_keys else None
        settings = ServeSettings(
            model_name=args.served_model_name or args.model, model_aliases=(args.model,), api_key=api_key,
            max_batch_size=args.max_batch_size, max_queue=args.max_queue,
            max_kv_bytes=None if args.max_kv_gib is None else max(1, int(args.max_kv_gib * 2**30)),
            default_max_tokens=args.default_max_tokens,
            max_body_bytes=args.max_body_mb * 2**20, max_request_tokens=args.max_request_tokens,
            trie_path=args.trie, trie_save_interval=args.trie_save_interval,
            tenant_header=args.tenant_header, tenant_keys=tenant_keys, stream_chunk=args.stream_chunk,
            max_tenants=args.max_tenants,
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("lookahead_server").warning(
            "serving on %s without an API key: anyone who reaches this port can use it", args.host)
    if getattr(args, "ray", False):
        return _serve_on_ray(args, settings)
    _, _, generator = build(args)
    _ = generator.budget  # measure (or load) the cost curve now, not in the first request
    app = create_app(generator, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0
