"""lookahead beyond one process, on Ray: one trie of past answers shared by every worker, distributed summarization
(Ray Data) and replicated serving (Ray Serve).

Modules, each with one job: :mod:`.hub` (the :class:`~.hub.TrieHub` actor that holds the shared trie and saves it),
:mod:`.sync` (:class:`~.sync.TrieSync`: a worker's background push/pull to the hub), :mod:`.spec`
(:class:`~.spec.GeneratorSpec`: how a worker builds its engine), :mod:`.cluster` (connecting to Ray),
:mod:`.worker` (:class:`~.worker.GenerateWorker`: one engine as a Ray actor), :mod:`.summarize` (``lookahead
summarize --ray``), :mod:`.serve` (``lookahead serve --ray``).

Importing this package loads nothing heavy: Ray is imported by the modules that need it (``pip install
'lookahead-rag[ray]'``).
"""

from __future__ import annotations

import importlib.util

INSTALL_HINT = "pip install 'lookahead-rag[ray]'"


def missing_dependencies() -> list[str]:
    """Distribution names of the ray extra that are not installed."""
    needed = {"ray": "ray", "ray.data": "ray[data]", "ray.serve": "ray[serve]"}
    missing = []
    for module, dist in needed.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package is missing
            found = False
        if not found:
            missing.append(dist)
    return missing


def require_ray(what: str) -> None:
    """Raise ``RuntimeError`` naming the install command when Ray (with Data and Serve) is not installed."""
    missing = missing_dependencies()
    if missing:
        raise RuntimeError(f"{what} needs {', '.join(missing)}: {INSTALL_HINT}")


__all__ = ["INSTALL_HINT", "missing_dependencies", "require_ray"]
