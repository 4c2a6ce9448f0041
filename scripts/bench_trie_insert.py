"""Latency of trie inserts over the node budget: eight long prompts of real text, one call each or in slices.

Text: pydoc's language reference topics and the docstrings of stdlib modules, split into words and punctuation by a
regular expression, each distinct piece one token id (real text: common words repeat, rare ones do not). The script
inserts --prompts prompts of --tokens tokens each into a TokenTrie of --budget nodes, globally (past outputs) or as
live requests (--local, after --warm global ones), each followed by decode-like extend calls, and prints the total
time, the longest single call and the longest call made while the trie was over its budget.

    .venv/bin/python scripts/bench_trie_insert.py [--slice 256] [--local] [--maintain 4096]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import pkgutil
import re
import time
import warnings

from lookahead.trie import TokenTrie

_WORD = re.compile(r"\w+|[^\w\s]")
_MODULES = ("os", "re", "json", "collections", "itertools", "functools", "pathlib", "typing", "argparse", "logging",
            "subprocess", "threading", "asyncio", "unittest", "email", "http", "urllib", "xml", "sqlite3", "decimal",
            "datetime", "inspect", "dataclasses", "textwrap", "string", "shutil", "tarfile", "zipfile", "csv",
            "random", "statistics", "fractions", "difflib", "pickle", "socket", "ssl", "tokenize", "ast", "dis")


def docstring_corpus() -> str:
    """The language reference topics pydoc shows, then the docstrings of a fixed list of stdlib modules, their
    submodules and their public members."""
    from pydoc_data.topics import topics

    texts: list[str] = [topics[k] for k in sorted(topics)]
    for name in _MODULES:
        mods = [importlib.import_module(name)]
        path = getattr(mods[0], "__path__", None)
        for info in pkgutil.iter_modules(path) if path else []:
            if info.name.startswith("_"):  # __main__ modules run things on import
                continue
            try:
                mods.append(importlib.import_module(f"{name}.{info.name}"))
            except Exception:  # noqa: BLE001 - some submodules need optional platform pieces
                continue
        for mod in mods:
            texts.append(mod.__doc__ or "")
            for _, member in sorted(inspect.getmembers(mod), key=lambda kv: kv[0]):
                doc = getattr(member, "__doc__", None)
                if isinstance(doc, str) and (inspect.isfunction(member) or inspect.isclass(member)):
                    texts.append(doc)
    return "\n\n".join(texts)


def tokenize(text: str) -> list[int]:
    """Word / punctuation pieces as ids, numbered in order of first appearance."""
    vocab: dict[str, int] = {}
    return [vocab.setdefault(piece, len(vocab)) for piece in _WORD.findall(text)]


class PruneProbe:
    """Sets ``ran`` whenever the trie's pruning runs (wraps whichever of the old and new pruning methods it has)."""

    def __init__(self, trie: TokenTrie) -> None:
        self.ran = False
        self.peak = 0  # most nodes seen between calls
        for name in ("_prune", "_prune_fully", "_sweep"):
            if hasattr(trie, name):
                setattr(trie, name, self._flagging(getattr(trie, name)))

    def _flagging(self, method):
        def wrapped(*args, **kwargs):
            self.ran = True
            return method(*args, **kwargs)
        return wrapped


class Timer:
    """Each call's seconds, and apart those of the calls that found the trie over its budget (before, after, or in
    between: pruning ran)."""

    def __init__(self, trie: TokenTrie, probe: PruneProbe) -> None:
        self.trie = trie
        self.probe = probe
        self.calls: list[float] = []
        self.over: list[float] = []

    def __call__(self, fn, *args) -> None:
        self.probe.ran = False
        before = self.trie.num_nodes()
        t0 = time.perf_counter()
        fn(*args)
        dt = time.perf_counter() - t0
        self.calls.append(dt)
        self.probe.peak = max(self.probe.peak, self.trie.num_nodes())
        if self.probe.ran or max(before, self.trie.num_nodes()) > self.trie.node_budget:
            self.over.append(dt)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--budget", type=int, default=200_000)
    p.add_argument("--slice", type=int, default=0, help="insert each prompt in slices of this many windows")
    p.add_argument("--local", action="store_true", help="prompts as live requests (released after their decode)")
    p.add_argument("--steps", type=int, default=64, help="extend calls of 4 tokens per prompt")
    p.add_argument("--warm", type=int, default=0, help="prompts inserted globally first (not timed)")
    p.add_argument("--maintain", type=int, default=0, help="run trie.maintain(N) after every extend call")
    p.add_argument("--gc-off", action="store_true",
                   help="disable the cyclic garbage collector (its pauses over a big trie are not the trie's own work)")
    args = p.parse_args(argv)
    if args.gc_off:
        gc.disable()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated stdlib aliases warn when their docstrings are read
        ids = tokenize(docstring_corpus())
    need = (args.prompts + args.warm) * (args.tokens + 4 * args.steps)
    if len(ids) < need:
        raise SystemExit(f"corpus has {len(ids)} tokens, need {need}")
    trie = TokenTrie(node_budget=args.budget)
    sliced = "start" in inspect.signature(trie.insert).parameters
    if args.slice and not sliced:
        raise SystemExit("this TokenTrie.insert has no start/stop: run without --slice")
    probe = PruneProbe(trie)
    insert_t, extend_t = Timer(trie, probe), Timer(trie, probe)
    step = args.tokens + 4 * args.steps
    for k in range(args.prompts, args.prompts + args.warm):
        trie.insert(ids[k * step: k * step + args.tokens])
    t_all = time.perf_counter()
    for k in range(args.prompts):
        prompt = ids[k * step: k * step + args.tokens]
        output = ids[k * step + args.tokens: (k + 1) * step]
        rid = f"r{k}" if args.local else None
        if args.slice:
            for a in range(0, len(prompt), args.slice):
                insert_t(trie.insert, prompt, rid, a, a + args.slice)
        else:
            insert_t(trie.insert, prompt, rid)
        for s in range(args.steps):
            extend_t(trie.extend, prompt + output[: 4 * s], output[4 * s: 4 * s + 4], rid or "decode")
            if args.maintain:
                extend_t(trie.maintain, args.maintain)
        trie.release(rid or "decode")
    total = time.perf_counter() - t_all
    mode = "local" if args.local else "global"
    gc_mode = "off" if args.gc_off else "on"
    print(f"corpus {len(ids)} tokens; {args.prompts} prompts x {args.tokens} tokens, budget {args.budget}, "
          f"warm {args.warm}, gc {gc_mode}, slice {args.slice or 'none'}, {mode}, maintain {args.maintain or 'none'}")
    print(f"total {total:.3f} s; insert calls {len(insert_t.calls)} sum {sum(insert_t.calls):.3f} s "
          f"max {max(insert_t.calls) * 1e3:.1f} ms; extend calls {len(extend_t.calls)} "
          f"max {max(extend_t.calls) * 1e3:.2f} ms")
    over = insert_t.over + extend_t.over
    print(f"peak nodes {probe.peak}; calls over budget {len(over)}, longest {max(over, default=0.0) * 1e3:.1f} ms "
          f"(extend/maintain {max(extend_t.over, default=0.0) * 1e3:.2f} ms); final nodes {trie.num_nodes()}")


if __name__ == "__main__":
    main()
