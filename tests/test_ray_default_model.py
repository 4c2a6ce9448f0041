"""The trie hub on the real default model (SmolLM2-135M): an answer one Ray worker gave drafts the same question on
another worker, with identical output."""

from __future__ import annotations

import pytest
import ray
from conftest import FLAT_CURVE
from lookahead_ray.hub import start_hub, stop_hub, trie_config
from lookahead_ray.spec import GeneratorSpec
from lookahead_ray.worker import start_workers
from ray_utils import local_ray

from lookahead.prompts import rag_messages

DOCS = ["textwrap.dedent(text)\n\nRemove any common leading whitespace from every line in `text`. This can be used "
        "to make triple-quoted strings line up with the left edge of the display, while still presenting them in "
        "the source code in indented form."]


@pytest.mark.slow
def test_an_answer_of_one_worker_drafts_on_the_other():
    local_ray()
    # a flat cost curve: no cost-model measurement in CI (drafts never change the output, only the speed)
    spec = GeneratorSpec(model="default", dtype="float32", device="cpu", cost_curve=FLAT_CURVE, threads=1)
    hub = start_hub(trie_config(spec.config), name="default-model-hub")
    try:
        first, second = start_workers(2, spec, "default-model-hub", sync_interval=3600)
        prompt = rag_messages("What does textwrap.dedent do?", DOCS)
        a = ray.get(first.generate.remote(prompt, 48))
        assert ray.get(first.sync_now.remote()) and ray.get(second.sync_now.remote())
        b = ray.get(second.generate.remote(prompt, 48))
        alone = ray.get(second.plain.remote(prompt, 48))
        assert a["token_ids"] == b["token_ids"] == alone["token_ids"] and a["new_tokens"] == 48
        assert b["steps"] < a["steps"] / 2 and b["pid"] != a["pid"]
        assert ray.get(second.info.remote())["pulled"] >= 1
        for worker in (first, second):
            ray.kill(worker)
    finally:
        stop_hub(hub)
