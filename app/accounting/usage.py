"""
app.accounting.usage
~~~~~~~~~~~~~~~~~~~~

What each API's answer says it used, and the worst case to reserve before it is called, in the one form that
:mod:`app.accounting.billing` charges: prompt tokens (at the model's ``input_price``) and completion tokens (at
its ``output_price``).

Each provider API reports usage in its own words; a reader turns them into
``{"prompt_tokens": n, "completion_tokens": m}``:

* chat completions: ``prompt_tokens`` / ``completion_tokens`` (as they are);
* embeddings: ``prompt_tokens`` only (an embedding generates nothing);
* OpenAI Responses: ``input_tokens`` / ``output_tokens``;
* Anthropic Messages: ``input_tokens`` + ``cache_creation_input_tokens`` + ``cache_read_input_tokens`` (all
  charged at the input price) / ``output_tokens``.

The worst case to reserve (:class:`~app.accounting.billing.Bounds`) is the chat one's, read from each API's
body: the prompt bound of :func:`~app.accounting.billing.prompt_upper_bound` over its messages (Responses'
``input`` items count as messages) and other fields, and the completion limit the caller gave
(``max_output_tokens``, Anthropic's required ``max_tokens``) or else the model's ``max_output_tokens``; an
embedding has no completion. No Flask here.
"""
from __future__ import annotations

from typing import Callable

from ..catalog import Model
from .billing import MESSAGE_TOKENS
from .billing import Bounds
from .billing import prompt_upper_bound

#: Tokens an embedding model may add around each input (begin/end markers), on top of its text.
EMBEDDING_INPUT_TOKENS = 8

Reader = Callable[[dict], dict]


def _n(usage: dict, name: str) -> int:
    value = usage.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def chat(usage: dict) -> dict:
    return usage


def embeddings(usage: dict) -> dict:
    return {"prompt_tokens": _n(usage, "prompt_tokens"), "completion_tokens": 0}


def responses(usage: dict) -> dict:
    return {"prompt_tokens": _n(usage, "input_tokens"), "completion_tokens": _n(usage, "output_tokens")}


def anthropic(usage: dict) -> dict:
    prompt = (_n(usage, "input_tokens") + _n(usage, "cache_creation_input_tokens")
              + _n(usage, "cache_read_input_tokens"))
    return {"prompt_tokens": prompt, "completion_tokens": _n(usage, "output_tokens")}


def completion_bound(body: dict, model: Model, field: str) -> int:
    """The caller's ``field`` (``max_output_tokens``, ``max_tokens``) if it gave a usable one, else the model's."""
    return _n(body, field) or model.max_output_tokens


def embedding_prompt_bound(body: dict) -> int:
    """A prompt token count no embedding model exceeds for this ``input``: a string counts its UTF-8 bytes (no
    byte-level tokenizer spends less than a byte per token), a token array its length, plus
    :data:`EMBEDDING_INPUT_TOKENS` per input for the markers a model adds."""
    value = body.get("input")
    items = value if isinstance(value, list) and value and not all(isinstance(v, int) for v in value) else [value]
    total = 0
    for item in items:
        total += EMBEDDING_INPUT_TOKENS
        if isinstance(item, str):
            total += len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, list):
            total += len(item)
        elif item is not None:
            total += len(repr(item))
    return total


def embeddings_bounds(body: dict) -> Bounds:
    return Bounds(embedding_prompt_bound(body), 0, None)


def responses_bounds(body: dict, model: Model) -> Bounds:
    """A Responses body (validated: ``input`` a string or an array of objects)."""
    items = body.get("input")
    prompt = prompt_upper_bound({k: v for k, v in body.items() if k != "input"})
    if isinstance(items, list):
        prompt += prompt_upper_bound({"messages": items}) - prompt_upper_bound({})
    elif isinstance(items, str):
        prompt += MESSAGE_TOKENS + len(items.encode("utf-8", "surrogatepass"))
    return Bounds(prompt, completion_bound(body, model, "max_output_tokens"), "max_output_tokens")


def messages_bounds(body: dict, model: Model) -> Bounds:
    """An Anthropic Messages body (validated: ``messages`` an array of objects)."""
    return Bounds(prompt_upper_bound(body), completion_bound(body, model, "max_tokens"), "max_tokens")
