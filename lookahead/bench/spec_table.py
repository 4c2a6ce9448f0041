"""The Spec-Bench table of a run: the leaderboard's layout (one row per method, one column per task with its
speedup over vanilla, then mean accepted tokens per step and the overall speedup) plus an exactness column, the two
factors of lookahead's speedup (the engine's own gain, drafting's own gain), and the two turns of the multi-turn
conversations apart.

Speedups are computed as Spec-Bench's ``evaluation/speed.py`` does: each question's tokens per second (its turns'
new tokens over their seconds), averaged over the questions, over vanilla's average in the same round. Tokens per
step are new tokens over forward passes, the prefill included (1.00 for vanilla).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from .runner import NODRAFT, TRIE_METHODS, CaseResult
from .spec_bench import HEADINGS, ordered_tasks

OVERALL = "overall"


def row_label(method: str, round_index: int) -> str:
    """A row's name: the method in round 1; a later round's lookahead is ``lookahead (warm store)`` (round 2, after
    the store learned round 1's answers) or ``lookahead (warm, round N)``."""
    if round_index == 1:
        return method
    return f"{method} (warm store)" if round_index == 2 else f"{method} (warm, round {round_index})"


def mean_speed(results: Iterable[CaseResult]) -> float | None:
    """Mean over questions of each question's tokens per second (its results summed); None without results."""
    tokens: dict[str, int] = defaultdict(int)
    seconds: dict[str, float] = defaultdict(float)
    for r in results:
        tokens[r.case_id] += r.new_tokens
        seconds[r.case_id] += r.seconds
    speeds = [tokens[q] / seconds[q] for q in tokens if seconds[q] > 0]
    return sum(speeds) / len(speeds) if speeds else None


def speedup(results: Sequence[CaseResult], method: str, base: str) -> float | None:
    """Mean tokens/s of ``method`` over ``base``'s, on the questions of ``results`` (one round); None when either
    did not run."""
    mine = mean_speed(r for r in results if r.method == method)
    theirs = mean_speed(r for r in results if r.method == base)
    return mine / theirs if mine and theirs else None


def by_task(results: Sequence[CaseResult]) -> dict[str, list[CaseResult]]:
    """The results of each task, and of every task under :data:`OVERALL`."""
    tasks: dict[str, list[CaseResult]] = defaultdict(list)
    for r in results:
        tasks[r.task].append(r)
    tasks[OVERALL] = list(results)
    return tasks


def method_row(results: Sequence[CaseResult], method: str, round_index: int, base: str = "vanilla"
               ) -> dict[str, Any]:
    """One row of the table: ``speedup`` per task (and overall) of ``method`` over ``base``, ``tokens_per_step``,
    ``exact`` of ``compared`` outputs equal to vanilla's, the number of ``questions`` and ``turns``."""
    mine = [r for r in results if r.method == method]
    steps = sum(r.steps for r in mine)
    return {
        "method": method, "round": round_index, "label": row_label(method, round_index),
        "speedup": {task: speedup(items, method, base) for task, items in by_task(results).items()},
        "tokens_per_step": sum(r.new_tokens for r in mine) / steps if steps else 0.0,
        "exact": sum(1 for r in mine if r.exact), "compared": sum(1 for r in mine if r.exact is not None),
        "questions": len({r.case_id for r in mine}), "turns": len(mine),
    }


def spec_rows(results: Sequence[CaseResult]) -> list[dict[str, Any]]:
    """The table's rows: every method of round 1, then the lookahead methods of every later round (warm store),
    each against vanilla of its own round."""
    rows = []
    for round_index in sorted({r.round for r in results}):
        in_round = [r for r in results if r.round == round_index]
        methods = dict.fromkeys(r.method for r in in_round)
        rows += [method_row(in_round, m, round_index) for m in methods
                 if round_index == 1 or m in TRIE_METHODS]
    return rows


def factor_rows(results: Sequence[CaseResult], method: str = "lookahead") -> list[dict[str, Any]]:
    """The two factors per task and overall: ``engine`` (nodraft vs vanilla) of round 1, then ``drafting``
    (``method`` vs nodraft) of every round where both ran (a later round: with a warm store). Empty without
    nodraft."""
    rows = []
    for round_index in sorted({r.round for r in results}):
        in_round = [r for r in results if r.round == round_index]
        ran = {r.method for r in in_round}
        if NODRAFT not in ran:
            continue
        tasks = by_task(in_round)
        if round_index == 1 and "vanilla" in ran:
            rows.append({"factor": "engine", "round": 1, "label": "engine: nodraft vs vanilla",
                         "speedup": {t: speedup(items, NODRAFT, "vanilla") for t, items in tasks.items()}})
        if method in ran:
            rows.append({"factor": "drafting", "round": round_index,
                         "label": f"drafting: {row_label(method, round_index)} vs nodraft",
                         "speedup": {t: speedup(items, method, NODRAFT) for t, items in tasks.items()}})
    return rows


def turn_rows(results: Sequence[CaseResult]) -> list[dict[str, Any]]:
    """Per table row, the conversations' (questions with a second turn) turn 1 and turn 2 apart: ``speedup`` over
    vanilla and ``tokens_per_step`` per turn. Empty when no question has two turns."""
    talks = {(r.round, r.case_id) for r in results if r.turn == 2}
    if not talks:
        return []
    in_talks = [r for r in results if (r.round, r.case_id) in talks]
    rows = []
    for row in spec_rows(in_talks):
        cells: dict[str, Any] = {"label": row["label"], "method": row["method"], "round": row["round"]}
        for turn in (1, 2):
            picked = [r for r in in_talks if r.round == row["round"] and r.turn == turn]
            mine = [r for r in picked if r.method == row["method"]]
            steps = sum(r.steps for r in mine)
            cells[f"turn{turn}_speedup"] = speedup(picked, row["method"], "vanilla")
            cells[f"turn{turn}_tokens_per_step"] = sum(r.new_tokens for r in mine) / steps if steps else 0.0
        rows.append(cells)
    return rows


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _markdown(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cells) + " |" for cells in body)]


def format_spec_table(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
    """The leaderboard's layout: a column per task, ``#Mean Accepted Tokens``, ``Overall``, then ``exact``."""
    header = ["Method", *(HEADINGS.get(t, t) for t in tasks), "#Mean Accepted Tokens", "Overall", "exact"]
    body = [[r["label"], *(_x(r["speedup"].get(t)) for t in tasks), f"{r['tokens_per_step']:.2f}",
             _x(r["speedup"].get(OVERALL)), f"{r['exact']}/{r['compared']}" if r["compared"] else "-"]
            for r in rows]
    return "\n".join(_markdown(header, body))


def format_factor_table(factors: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
    """The two factors per task and overall ('' without nodraft)."""
    if not factors:
        return ""
    header = ["Factor", *(HEADINGS.get(t, t) for t in tasks), "Overall"]
    body = [[f["label"], *(_x(f["speedup"].get(t)) for t in [*tasks, OVERALL])] for f in factors]
    return "\n".join(_markdown(header, body))


def format_turn_table(turns: Sequence[dict[str, Any]]) -> str:
    """The multi-turn conversations by turn ('' without any)."""
    if not turns:
        return ""
    header = ["Method", "turn 1: speedup", "turn 1: tokens/step", "turn 2: speedup", "turn 2: tokens/step"]
    body = [[t["label"], _x(t["turn1_speedup"]), f"{t['turn1_tokens_per_step']:.2f}", _x(t["turn2_speedup"]),
             f"{t['turn2_tokens_per_step']:.2f}"] for t in turns]
    return "\n".join(_markdown(header, body))


def spec_report(results: Sequence[CaseResult]) -> tuple[str, dict[str, Any]]:
    """(Markdown, data) of a Spec-Bench run: the table, the factors and the turns (each with a heading line)."""
    tasks = ordered_tasks([r.task for r in results])
    rows, factors, turns = spec_rows(results), factor_rows(results), turn_rows(results)
    parts = ["Spec-Bench: speedup over vanilla (HF greedy) per task; #Mean Accepted Tokens = new tokens per forward "
             "pass; exact = outputs equal to vanilla's",
             format_spec_table(rows, tasks)]
    if factors:
        parts += ["", "The two factors: the engine's own gain (nodraft vs vanilla) and drafting's own gain (vs "
                  "nodraft; only this one compares with the leaderboard)", format_factor_table(factors, tasks)]
    if turns:
        parts += ["", "Multi-turn conversations by turn (turn 2 follows each method's own turn-1 answer)",
                  format_turn_table(turns)]
    return "\n".join(parts), {"tasks": tasks, "rows": rows, "factors": factors, "turns": turns}
