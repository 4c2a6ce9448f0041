"""Write the sample document folder of the examples (``examples/docs``) from Python standard-library docstrings.

Docstrings are real documentation written by others and present on every machine; each file gathers the docstrings
of one module's main functions. Run it again to rebuild the folder (the examples ship its output).
"""

from __future__ import annotations

import argparse
import bisect
import functools
import heapq
import inspect
import itertools
import json
import textwrap
from pathlib import Path

TOPICS = {
    "textwrap": (textwrap, ["dedent", "indent", "wrap", "fill", "shorten"]),
    "heapq": (heapq, ["heappush", "heappop", "heapify", "heapreplace", "nlargest", "nsmallest", "merge"]),
    "bisect": (bisect, ["bisect_left", "bisect_right", "insort_left", "insort_right"]),
    "functools": (functools, ["lru_cache", "partial", "reduce", "wraps", "cached_property", "total_ordering"]),
    "json": (json, ["dumps", "loads", "dump", "load"]),
    "itertools": (itertools, ["chain", "groupby", "accumulate", "islice", "product", "permutations"]),
}


def render(module, names: list[str]) -> str:
    parts = [f"{module.__name__} module\n\n{inspect.getdoc(module) or ''}".strip()]
    for name in names:
        obj = getattr(module, name)
        doc = inspect.getdoc(obj) or ""
        parts.append(f"{module.__name__}.{name}\n\n{doc}".strip())
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).with_name("docs")))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for topic, (module, names) in TOPICS.items():
        (out / f"{topic}.txt").write_text(render(module, names), encoding="utf-8")
        print(f"wrote {out / f'{topic}.txt'}")


if __name__ == "__main__":
    main()
