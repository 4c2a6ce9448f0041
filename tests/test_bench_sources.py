"""Provenance in the benchmark (lookahead.bench.sources) and its summary and table (lookahead.bench.report)."""

from __future__ import annotations

import pytest

from lookahead.bench.report import format_provenance, format_table, provenance_fields, summarize
from lookahead.bench.runner import CaseResult
from lookahead.bench.sources import case_provenance, question_document, top_document
from lookahead.provenance import DocumentUse

DOCS = ["pkg.first(x)\n\nReturn x.", "pkg.second(y, z)\n\nAdd y and z.", "class pkg.Third(a)\n\nA third thing."]


@pytest.mark.parametrize("question, expected", [
    ("What does `pkg.second` do?", 1),
    ("What is `pkg.Third` for?", 2),
    ("What does `pkg.first` return?", 0),
    ("What does `pkg.fourth` do?", None),  # no document about it
    ("What do these do?", None),  # the question names nothing
])
def test_question_document_is_the_one_whose_heading_the_question_names(question, expected):
    assert question_document({"question": question, "documents": DOCS}) == expected


def test_question_document_needs_exactly_one_match():
    assert question_document({"question": "`pkg.first`", "documents": [DOCS[0], DOCS[0]]}) is None
    assert question_document({"task": "summarize", "documents": DOCS}) is None


def test_top_document_is_the_unique_most_copied():
    def uses(*tokens):
        return [DocumentUse(i, tokens=t) for i, t in enumerate(tokens)]

    assert top_document(uses(3, 5, 1)) == 1
    assert top_document(uses(4, 4, 1)) is None  # a tie names no top source
    assert top_document(uses(0, 0)) is None  # nothing copied
    assert top_document([]) is None


def test_case_provenance_attributes_each_accepted_run_to_its_document():
    # output: the prefill's token 9, then a step accepting 2 3 4 (document 0 holds them after the 9) + bonus 5, then
    # a step accepting 6 7 (document 1 holds them after the 5), its bonus cut by the end of the output
    documents = [[9, 2, 3, 4], [5, 6, 7], [11]]
    output = [9, 2, 3, 4, 5, 6, 7]
    case = {"question": "What does `pkg.first` do?", "documents": DOCS}
    got = case_provenance(documents, case, output, [3, 2])
    assert got["provenance"] == [
        {"index": 0, "tokens": 3, "share": 3 / 7, "spans": [[1, 4]]},
        {"index": 1, "tokens": 2, "share": 2 / 7, "spans": [[5, 7]]},
        {"index": 2, "tokens": 0, "share": 0.0, "spans": []},
    ]
    assert got["question_document"] == 0 and got["top_document"] == 0 and got["top_is_question_document"] is True
    other = case_provenance(documents, {**case, "question": "What does `pkg.second` do?"}, output, [3, 2])
    assert other["top_is_question_document"] is False
    unknown = case_provenance(documents, {**case, "question": "Why?"}, output, [3, 2])
    assert unknown["question_document"] is None and unknown["top_is_question_document"] is None


def result(case_id: str, new_tokens: int, tokens: list[int], asked: int | None, **extra) -> CaseResult:
    provenance = [{"index": i, "tokens": t, "share": t / new_tokens, "spans": []} for i, t in enumerate(tokens)]
    top = max(range(len(tokens)), key=tokens.__getitem__)
    return CaseResult(round=1, case_id=case_id, task="rag_qa", method="lookahead", prompt_tokens=10,
                      new_tokens=new_tokens, seconds=1.0, steps=4, token_ids=[0] * new_tokens, provenance=provenance,
                      question_document=asked, top_document=top,
                      top_is_question_document=None if asked is None else top == asked, **extra)


def test_summary_counts_where_the_question_document_is_the_top_source():
    results = [result("a", 10, [6, 1, 0], 0), result("b", 20, [2, 8, 0], 2), result("c", 10, [0, 0, 5], None)]
    fields = provenance_fields(results)
    assert fields == {"provenance_cases": 3, "copied_share": 22 / 40, "question_document_cases": 2,
                      "question_document_share": 6 / 30, "question_document_top": 1}
    rows = summarize(results)
    assert rows[0]["question_document_top"] == 1 and rows[0]["question_document_cases"] == 2
    text = format_provenance(rows)
    assert "| 1 | rag_qa | lookahead | 3 | 55.0 | 20.0 | 1/2 |" in text
    assert text.splitlines()[-1] == "lookahead (round 1, rag_qa): top source = the question's document in 1 of 2 cases"


def test_no_provenance_no_table_and_no_prediction_columns():
    plain = CaseResult(round=1, case_id="o", task="open", method="vanilla", prompt_tokens=3, new_tokens=4,
                       seconds=1.0, steps=4, token_ids=[1, 2, 3, 4])
    rows = summarize([plain])
    assert provenance_fields([plain]) == {} and format_provenance(rows) == ""
    assert "pred acc" not in format_table(rows)


def test_prediction_counts_are_summed_and_tabled():
    def predicted(case_id: str, accepted: int | None, rejected: int | None) -> CaseResult:
        return CaseResult(round=1, case_id=case_id, task="open", method="lookahead-predicted", prompt_tokens=3,
                          new_tokens=40, seconds=1.0, steps=5, token_ids=[1] * 40,
                          accepted_prediction_tokens=accepted, rejected_prediction_tokens=rejected)

    rows = summarize([predicted("a", 30, 4), predicted("b", 5, 7), predicted("c", None, None)])
    assert rows[0]["accepted_prediction_tokens"] == 35 and rows[0]["rejected_prediction_tokens"] == 11
    table = format_table(rows).splitlines()
    assert table[0].endswith("| exact | pred acc | pred rej | trie % | host ms/step |")
    assert table[2].split("|")[13:15] == [" 35 ", " 11 "]
