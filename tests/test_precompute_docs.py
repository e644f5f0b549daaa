"""precompute's document handling without an engine: token ids need no tokenizer."""

from __future__ import annotations

import pytest

from redknot_vllm.config import RedKnotConfigError
from redknot_vllm.reuse.precompute import _tokenizer_for, encode_docs


class _NoTokenizer:
    """An engine started with skip_tokenizer_init=True, as vLLM reports it."""

    def get_tokenizer(self) -> None:
        raise ValueError("Tokenizer not available when `skip_tokenizer_init=True`")


def test_token_id_documents_need_no_tokenizer() -> None:
    docs = [[1, 2, 3], (4, 5)]
    assert _tokenizer_for(_NoTokenizer(), docs) is None
    assert encode_docs(None, docs) == [[1, 2, 3], [4, 5]]


def test_text_documents_without_a_tokenizer_name_the_fix() -> None:
    with pytest.raises(RedKnotConfigError, match="skip_tokenizer_init"):
        _tokenizer_for(_NoTokenizer(), [[1, 2], "a text"])
