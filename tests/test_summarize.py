"""``lookahead summarize``: input checks, chunking, map-reduce, atomic resumable output and the CLI.

The CLI runs on a tiny random Llama saved to a temporary folder (with a chat template), so every test is fast; one
test runs the real default model on two short documents.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tracemalloc
from pathlib import Path

import pytest
from conftest import FLAT_CURVE

from lookahead.cli import main
from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator
from lookahead.summarize import (
    SourceDocument,
    SummarizeError,
    Summarizer,
    atomic_write_text,
    collect_documents,
    discovery,
    split_text,
    summarize_documents,
)

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")
TEXTS = {
    "a.txt": "the cat sat on the mat. the cat ate the rat.\n\nthe dog sat on the log.",
    "b.md": "a quick brown fox jumps over the lazy dog. " * 3,
    "sub/c.txt": "one two three four five six seven eight nine ten. " * 2,
}


def write_docs(root: Path, texts: dict[str, str] = TEXTS) -> Path:
    for name, text in texts.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def chat_tok(tok):
    tokenizer = copy.deepcopy(tok)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def gen(tiny_model, chat_tok, single_thread) -> LookaheadGenerator:
    return LookaheadGenerator(tiny_model("llama"), chat_tok, LookaheadConfig(), cost_curve=FLAT_CURVE)


@pytest.fixture(scope="module")
def tiny_dir(tiny_model, chat_tok, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    chat_tok.save_pretrained(path)
    return path


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------- inputs


def test_collect_documents(tmp_path):
    root = write_docs(tmp_path / "docs")
    (root / ".hidden.txt").write_text("secret")
    (root / "empty.txt").write_text("  \n")
    warnings: list[str] = []
    docs = collect_documents([root], out_dir=root / "summaries", warn=warnings.append)
    assert [d.name for d in docs] == ["a.txt", "b.md", "sub__c.txt"]
    assert any("empty" in w for w in warnings)
    (root / "summaries").mkdir()
    (root / "summaries" / "a.txt.summary.txt").write_text("old output")
    assert len(collect_documents([root], out_dir=root / "summaries", warn=warnings.append)) == 3  # out/ left out


def test_bad_inputs_are_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SummarizeError, match="holds no files"):
        collect_documents([tmp_path / "empty"])
    with pytest.raises(SummarizeError, match="no such file"):
        collect_documents([tmp_path / "missing"])
    (tmp_path / "blob.bin").write_bytes(b"\x89PNG\x00\x01\x02")
    with pytest.raises(SummarizeError, match="binary"):
        collect_documents([tmp_path / "blob.bin"])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(SummarizeError, match="not a UTF-8"):
        collect_documents([tmp_path / "latin1.txt"])
    (tmp_path / "only-blank.txt").write_text("\n\n")
    with pytest.raises(SummarizeError, match="no text documents"):
        collect_documents([tmp_path / "only-blank.txt"], warn=lambda _: None)
    locked = tmp_path / "locked.txt"
    locked.write_text("fine text")
    real = Path.open

    def deny(self: Path, *args, **kwargs):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)  # the tests run as root here: permissions alone would not deny it
    with pytest.raises(SummarizeError, match="cannot read"):
        collect_documents([locked])
    skipped_locked: list[str] = []
    with pytest.raises(SummarizeError, match="no text documents"):
        collect_documents([locked], skip_invalid=True, warn=skipped_locked.append)
    assert len(skipped_locked) == 1 and "cannot read" in skipped_locked[0]
    good = write_docs(tmp_path / "mixed", {"ok.txt": "some text"})
    (good / "img.bin").write_bytes(b"\x00\x00")
    skipped: list[str] = []
    assert [d.name for d in collect_documents([good], skip_invalid=True, warn=skipped.append)] == ["ok.txt"]
    assert skipped and "binary" in skipped[0]


def test_a_folder_is_searched_without_leaving_it(tmp_path):
    """A link out of the folder is skipped with a warning (``follow_symlinks`` follows it); links inside it are
    followed; a broken link and a link loop are skipped with a warning."""
    root = write_docs(tmp_path / "docs")
    outside = write_docs(tmp_path / "outside", {"secret.txt": "not for summaries", "more/deep.txt": "deeper"})
    (root / "leak.txt").symlink_to(outside / "secret.txt")
    (root / "leakdir").symlink_to(outside / "more", target_is_directory=True)
    (root / "alias.txt").symlink_to(root / "a.txt")  # inside: kept
    (root / "broken.txt").symlink_to(tmp_path / "gone.txt")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    warnings: list[str] = []
    docs = collect_documents([root], warn=warnings.append)
    assert [d.name for d in docs] == ["a.txt", "alias.txt", "b.md", "sub__c.txt"]
    assert len(warnings) == 4
    for name in ("leak.txt", "leakdir"):
        assert any(f"{root / name}: a symbolic link to" in w and "--follow-symlinks" in w for w in warnings)
    assert any("broken.txt: a broken symbolic link" in w for w in warnings)
    assert any("loop: the folder" in w and "searched already" in w for w in warnings)
    warnings.clear()
    followed = collect_documents([root], warn=warnings.append, follow_symlinks=True)
    assert [d.name for d in followed] == ["a.txt", "alias.txt", "b.md", "leak.txt", "leakdir__deep.txt", "sub__c.txt"]
    assert followed[3].read() == "not for summaries" and len(warnings) == 2  # the broken link and the loop


def test_an_unreadable_folder_or_link_is_a_warning(tmp_path, monkeypatch):
    root = write_docs(tmp_path / "docs", {"a.txt": "text a", "locked/b.txt": "text b", "open/c.txt": "text c"})
    real = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)  # the tests run as root here: permissions alone would not deny it
    warnings: list[str] = []
    assert [d.name for d in collect_documents([root], warn=warnings.append)] == ["a.txt", "open__c.txt"]
    assert warnings == [f"skipping the folder {root / 'locked'}: cannot read it (Permission denied)"]


def test_documents_are_read_one_at_a_time(tmp_path, monkeypatch):
    """Finding documents holds none of them (memory bounded by a read block, not by the folder), and a run reads
    each one when it summarizes it."""
    big = "a line of text that is summarized later.\n" * 100_000  # 4.1 MB each
    root = write_docs(tmp_path / "docs", {f"{i}.txt": big + str(i) for i in range(4)})
    tracemalloc.start()
    try:
        docs = collect_documents([root])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(docs) == 4 and all(d.text is None for d in docs)
    assert peak < 3 * 2**20 < len(big), f"finding 16 MB of documents peaked at {peak / 2**20:.1f} MiB"
    assert docs[0].sha256 == hashlib.sha256((big + "0").encode()).hexdigest()
    events: list[str] = []
    read = SourceDocument.read

    def logged_read(self):
        events.append(f"read {self.name}")
        return read(self)

    class Fake:
        _pass_seconds = None

        def settings(self):
            return {"fake": True}

        def summarize(self, text):
            events.append(f"summarize {text[-1]}")
            return "summary", 1, []

    monkeypatch.setattr(SourceDocument, "read", logged_read)
    summarize_documents(docs, tmp_path / "out", Fake(), progress=False)  # type: ignore[arg-type]
    assert events == [e for i in range(4) for e in (f"read {i}.txt", f"summarize {i}")]


def test_a_document_that_changes_after_it_was_found_is_recorded_as_read(tmp_path):
    root = write_docs(tmp_path / "docs", {"a.txt": "first text"})
    doc = collect_documents([root])[0]
    (root / "a.txt").write_text("second text", encoding="utf-8")
    assert doc.read() == "second text" and doc.sha256 == hashlib.sha256(b"second text").hexdigest()
    (root / "a.txt").write_bytes(b"caf\xe9")
    with pytest.raises(SummarizeError, match="not a UTF-8 text file .* at byte 3"):
        doc.read()


def test_utf8_is_checked_across_read_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(discovery, "READ_BLOCK", 4)
    (tmp_path / "ok.txt").write_text("caf\u00e9 \u00fcber \u4e2d\u6587", encoding="utf-8")  # characters split by blocks
    assert collect_documents([tmp_path / "ok.txt"])[0].read() == "caf\u00e9 \u00fcber \u4e2d\u6587"
    (tmp_path / "bad.txt").write_bytes(b"abcdefg\xe9xyz")
    with pytest.raises(SummarizeError, match="not a UTF-8 text file .* at byte 7"):
        collect_documents([tmp_path / "bad.txt"])
    (tmp_path / "cut.txt").write_bytes(b"abcdef\xe4\xb8")  # ends inside a character
    with pytest.raises(SummarizeError, match="not a UTF-8 text file .* at byte 6"):
        collect_documents([tmp_path / "cut.txt"])
    (tmp_path / "late-nul.txt").write_bytes(b"text" * 10 + b"\x00")
    with pytest.raises(SummarizeError, match="binary"):
        collect_documents([tmp_path / "late-nul.txt"])


def test_split_text_respects_the_token_limit(chat_tok):
    def count(s: str) -> int:
        return len(chat_tok(s, add_special_tokens=False)["input_ids"])

    text = "First paragraph is short.\n\n" + "A sentence that repeats. " * 30 + "\n\n" + "x" * 400
    chunks = split_text(text, count, 40, encode=lambda s: chat_tok(s, add_special_tokens=False)["input_ids"],
                        decode=lambda ids: chat_tok.decode(ids))
    assert len(chunks) > 3
    assert all(count(c) <= 40 + 2 for c in chunks)  # re-tokenizing a joined chunk may merge a boundary
    assert "".join(chunks).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")
    assert split_text("short", count, 40) == ["short"]
    with pytest.raises(ValueError):
        split_text("x", count, 0)


def test_map_reduce_on_long_documents(gen):
    summarizer = Summarizer(gen, max_new_tokens=8, chunk_tokens=32)
    text = " ".join(f"sentence number {i} is here." for i in range(20))
    summary, chunks, requests = summarizer.summarize(text)
    assert chunks > 1 and isinstance(summary, str)
    kinds = [r.kind for r in requests]
    assert kinds.count("map") == chunks and kinds[-1] == "reduce"
    short = Summarizer(gen, max_new_tokens=8, chunk_tokens=512)
    assert [r.kind for r in short.summarize("one short text.")[2]] == ["single"]


def test_baseline_mode_checks_exactness(gen):
    summarizer = Summarizer(gen, max_new_tokens=10, chunk_tokens=512, baseline=True)
    _, _, requests = summarizer.summarize("the cat sat on the mat. the cat sat on the mat.")
    assert requests[0].exact is True and requests[0].baseline_seconds is not None


def test_atomic_write_never_leaves_partial_files(tmp_path, monkeypatch):
    target = tmp_path / "x.summary.txt"
    atomic_write_text(target, "old\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)  # lookahead.files writes through os.replace
    with pytest.raises(OSError):
        atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n" and leftovers(tmp_path) == []


def test_interrupted_run_resumes_without_redoing(gen, tmp_path, monkeypatch):
    docs = collect_documents([write_docs(tmp_path / "docs")])
    out = tmp_path / "out"
    summarizer = Summarizer(gen, max_new_tokens=6, chunk_tokens=512)
    real = Summarizer.summarize
    seen: list[str] = []

    def interrupt_second(self, text):
        seen.append(text)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(self, text)

    monkeypatch.setattr(Summarizer, "summarize", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        summarize_documents(docs, out, summarizer, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt.summary.json", "a.txt.summary.txt"]
    seen.clear()
    monkeypatch.setattr(Summarizer, "summarize", lambda self, text: (seen.append(text), real(self, text))[1])
    run = summarize_documents(docs, out, summarizer, progress=False)
    assert len(seen) == 2 and TEXTS["a.txt"] not in seen  # the finished document is not redone
    totals = run.totals()
    assert totals["resumed"] == 1 and totals["summarized_now"] == 2 and totals["documents"] == 3
    assert leftovers(out) == []
    # a changed document is redone; unchanged ones are not
    (tmp_path / "docs" / "b.md").write_text("new content for b.", encoding="utf-8")
    seen.clear()
    summarize_documents(collect_documents([tmp_path / "docs"]), out, summarizer, progress=False)
    assert seen == ["new content for b."]


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_summarize_and_resume(tiny_dir, tmp_path, capsys, monkeypatch):
    docs = write_docs(tmp_path / "docs")
    out = tmp_path / "out"
    args = ["summarize", str(docs), "--out", str(out), "--model", str(tiny_dir), "--device", "cpu",
            "--max-new-tokens", "8", "--chunk-tokens", "48", "--no-progress"]
    real = Summarizer.summarize
    calls: list[int] = []

    def interrupt_second(self, text):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, text)

    monkeypatch.setattr(Summarizer, "summarize", interrupt_second)
    assert main(args) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert leftovers(out) == [] and (out / "a.txt.summary.txt").is_file() and not (out / "b.md.summary.txt").exists()
    monkeypatch.setattr(Summarizer, "summarize", real)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "tokens/step" in printed and "estimated speedup" in printed and "earlier run" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["documents"] == 3 and report["totals"]["resumed"] == 1
    for name in ("a.txt", "b.md", "sub__c.txt"):
        assert (out / f"{name}.summary.txt").is_file()


def test_cli_errors_before_loading_a_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    assert main(["summarize", str(tmp_path / "empty")]) == 2
    assert "holds no files" in capsys.readouterr().err
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\x00\x01")
    assert main(["summarize", str(tmp_path / "bin")]) == 2
    assert "binary" in capsys.readouterr().err
    write_docs(tmp_path / "docs", {"a.txt": "text"})
    assert main(["summarize", str(tmp_path / "docs"), "--model", "./no/such/model", "--out",
                 str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["summarize", str(tmp_path / "docs"), "--chunk-tokens", "4"]) == 2


@pytest.mark.slow
def test_cli_on_the_default_model(tmp_path, capsys):
    docs = write_docs(tmp_path / "docs", {
        "dedent.txt": "textwrap.dedent(text) removes any common leading whitespace from every line in text. "
                      "It can be used to make triple-quoted strings line up with the left edge of the display.",
        "heap.txt": "heapq.heappush(heap, item) pushes the value item onto the heap, maintaining the heap "
                    "invariant. heapq.heappop(heap) pops and returns the smallest item from the heap.",
    })
    out = tmp_path / "out"
    assert main(["summarize", str(docs), "--out", str(out), "--max-new-tokens", "24", "--no-progress",
                 "--device", "cpu", "--baseline"]) == 0
    printed = capsys.readouterr().out
    assert "outputs identical" in printed
    assert all((out / f"{n}.summary.txt").read_text().strip() for n in ("dedent.txt", "heap.txt"))


def test_cli_follow_symlinks(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_docs(tmp_path / "outside", {"secret.txt": "text outside"})
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "link.txt").symlink_to(tmp_path / "outside" / "secret.txt")
    assert main(["summarize", str(tmp_path / "docs")]) == 2
    err = capsys.readouterr().err
    assert "a symbolic link to" in err and "--follow-symlinks" in err and "holds no files" in err
    assert main(["summarize", str(tmp_path / "docs"), "--follow-symlinks", "--model", "./no/such/model"]) == 2
    assert "not found" in capsys.readouterr().err  # past the input checks: the link was followed
