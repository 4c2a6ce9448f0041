"""Provenance: accepted draft runs attributed to the documents they were copied from. The pure functions on
hand-made token ids, then one end-to-end run on a tiny model where a document holds a stretch of the output."""

from __future__ import annotations

import pytest
from conftest import EOS_ID, FLAT_CURVE, hf_greedy, make_model, make_tokenizer, random_prompt

from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator
from lookahead.provenance import AcceptedRun, DocumentUse, accepted_runs, attribute_runs, provenance

pytestmark = pytest.mark.usefixtures("single_thread")


def test_accepted_runs_follow_the_steps():
    # prefill token 0; step 1 accepts 2 (tokens 1-2, bonus 3); step 2 none (bonus 4); step 3 accepts 3 (5-7, bonus 8)
    assert accepted_runs([2, 0, 3], 9) == [(1, 3), (5, 8)]
    assert accepted_runs([2, 0, 3], 6) == [(1, 3), (5, 6)]  # the output stopped inside the last run
    assert accepted_runs([2, 0, 3], 5) == [(1, 3)]
    assert accepted_runs([], 1) == []
    with pytest.raises(ValueError, match="accepted lengths must be >= 0"):
        accepted_runs([-1], 3)


def test_each_run_goes_to_the_document_that_holds_it_with_the_token_before():
    documents = [[1, 10, 11, 12, 13], [2, 21, 22], [30, 3, 12, 13, 40]]
    output = [1, 10, 11, 2, 21, 22, 3, 12, 13, 4, 50, 51, 5, 12, 13]
    steps = [2, 2, 2, 2, 2]  # runs (1, 3) (4, 6) (7, 9) (10, 12) (13, 15)
    assert attribute_runs(documents, output, steps) == [
        AcceptedRun(1, 3, 0), AcceptedRun(4, 6, 1),
        AcceptedRun(7, 9, 2),  # "12 13" is in documents 0 and 2; only 2 holds "3 12 13"
        AcceptedRun(10, 12, None),  # "50 51" is in no document
        AcceptedRun(13, 15, None),  # "12 13" is, but never after "5": not drafted from a document
    ]
    assert provenance(documents, output, steps, ids=["a", None, "c"]) == [
        DocumentUse(0, "a", 2, [(1, 3)]), DocumentUse(1, None, 2, [(4, 6)]), DocumentUse(2, "c", 2, [(7, 9)]),
    ]


def test_the_longest_match_with_the_preceding_output_decides():
    documents = [[6, 7, 8, 9], [5, 6, 7, 8, 9]]
    assert attribute_runs(documents, [5, 6, 7, 8, 9], [0, 0, 2]) == [AcceptedRun(3, 5, 1)]  # "5 6 7 8 9": doc 1
    assert attribute_runs(documents, [4, 6, 7, 8, 9], [0, 0, 2]) == [AcceptedRun(3, 5, 0)]  # "6 7 8 9": a tie


def test_names_and_errors():
    assert DocumentUse(3).source == "doc:3" and DocumentUse(3, "faq").source == "faq"
    assert provenance([], [1, 2, 3], [1]) == []
    assert provenance([[7, 9, 2]], [1, 2, 3], [1]) == [DocumentUse(0)]  # "2" alone, not "1 2": not from it
    with pytest.raises(ValueError, match="got 1 ids for 2 documents"):
        provenance([[1], [2]], [1, 2], [1], ids=["x"])
    with pytest.raises(ValueError, match="token ids must be in"):
        provenance([[-1]], [1, 2], [1])


def test_a_document_the_answer_repeats_is_its_source():
    """The document holds output tokens 8..21 (found by decoding the reference and checking that it encodes back),
    so once the output reaches its first token the trie drafts the rest of it, accepted as one run."""
    tok = make_tokenizer()
    model = make_model("llama", 0)
    prompt = random_prompt(300)
    ref = hf_greedy(model, prompt, 40)
    start, end = 8, 22
    text = tok.decode(ref[start:end])
    assert tok(text, add_special_tokens=False)["input_ids"] == ref[start:end]
    config = LookaheadConfig(learn_outputs=False, adaptive=False)
    gen = LookaheadGenerator(model, tok, config, cost_curve=FLAT_CURVE)
    result = gen.generate(prompt, max_new_tokens=40, eos_token_id=EOS_ID,
                          documents=["completely unrelated words here", text], document_names=[None, "target"])
    assert result.token_ids == ref
    decoy, target = result.stats.provenance
    assert decoy == DocumentUse(0, None, 0, [])
    assert target == DocumentUse(1, "target", end - start - 1, [(start + 1, end)])
    assert result.stats.to_dict()["provenance"][1] == {"index": 1, "id": "target", "tokens": end - start - 1,
                                                      "spans": [(start + 1, end)]}
    stream = list(gen.stream(prompt, max_new_tokens=40, documents=["x y z", text]))
    assert stream[-1].stats.provenance[1].spans == [(start + 1, end)]
    runs = [(c.accepted, c.source) for c in stream if c.accepted]
    assert runs[0] == (end - start - 1, "doc:1")  # unnamed: known by its index
    assert all(source is None for _, source in runs[1:])  # later runs repeat the output itself
