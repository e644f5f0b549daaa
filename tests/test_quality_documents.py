"""The harness's document tasks mark where each document begins (reuse stores them whole)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(scope="module")
def tok(smollm2: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.mark.parametrize("task, first, count", [
    ("multidoc_qa_many", "Document", 23), ("code_lookup", "# file: src/", 5)])
def test_document_tasks_mark_each_document(tok, task, first, count):
    from redknot_vllm import quality

    case = quality.make_cases(tok, [task], [2048], 1, seed=0)[0]
    assert len(case.doc_starts) == count and list(case.doc_starts) == sorted(case.doc_starts)
    for s in case.doc_starts:  # each cut is where an inserted record or file begins
        assert tok.decode(case.prompt_ids[s:s + 8]).lstrip(" \n").startswith(first)
    assert quality.make_cases(tok, ["niah_single"], [2048], 1, seed=0)[0].doc_starts == ()


def test_reuse_documents_cut_at_records_or_every_n_tokens(tok):
    from reuse import documents

    from redknot_vllm import quality

    case = quality.make_cases(tok, ["multidoc_qa_many"], [4096], 1, seed=0)[0]
    docs = documents(case, 1024, 64, "records")
    assert sum(map(len, docs)) == len(case.context_ids)
    assert len(docs) == 24 and all(len(d) >= 64 for d in docs)
    assert "Document 2:" in tok.decode(docs[1][:12])
    fixed = documents(case, 1024, 64, "fixed")
    assert [len(d) for d in fixed[:-1]] == [1024] * (len(fixed) - 1)
    assert sum(map(len, fixed)) == len(case.context_ids)
