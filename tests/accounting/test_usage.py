"""Each API's usage in billing's terms, and each API's worst case."""
from __future__ import annotations

from app.accounting import usage
from app.accounting.billing import prompt_upper_bound
from app.catalog import Model
from app.catalog import Provider

MODEL = Model("m", Provider("p", "http://x", None), "up", "p", max_output_tokens=77)


def test_readers():
    assert usage.embeddings({"prompt_tokens": 4, "total_tokens": 4}) == {"prompt_tokens": 4, "completion_tokens": 0}
    assert usage.responses({"input_tokens": 3, "output_tokens": True}) == {"prompt_tokens": 3,
                                                                            "completion_tokens": 0}
    assert usage.anthropic({"input_tokens": 1, "cache_creation_input_tokens": 2, "cache_read_input_tokens": None,
                            "output_tokens": 5}) == {"prompt_tokens": 3, "completion_tokens": 5}


def test_embedding_bound_covers_strings_and_token_arrays():
    assert usage.embedding_prompt_bound({"input": "héllo"}) == 6 + usage.EMBEDDING_INPUT_TOKENS
    assert usage.embedding_prompt_bound({"input": [1, 2, 3]}) == 3 + usage.EMBEDDING_INPUT_TOKENS
    assert usage.embedding_prompt_bound({"input": [[1, 2], [3]]}) == 3 + 2 * usage.EMBEDDING_INPUT_TOKENS
    assert usage.embeddings_bounds({"input": ["a", "bc"]}).completion == 0


def test_responses_and_messages_bounds():
    b = usage.responses_bounds({"input": "hello", "max_output_tokens": 9}, MODEL)
    assert (b.completion, b.limit_field) == (9, "max_output_tokens") and b.prompt >= 5
    items = [{"role": "user", "content": [{"type": "input_image", "image_url": "http://a/b.png"}]}]
    assert usage.responses_bounds({"input": items}, MODEL).prompt > 1_600       # an image counts as one
    assert usage.responses_bounds({"input": items}, MODEL).completion == 77
    body = {"max_tokens": 20, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://a/b.png"}}]}]}
    b = usage.messages_bounds(body, MODEL)
    assert (b.completion, b.prompt) == (20, prompt_upper_bound(body)) and b.prompt > 1_600
