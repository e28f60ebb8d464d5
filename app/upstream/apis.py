"""
app.upstream.apis
~~~~~~~~~~~~~~~~~

The provider APIs the gateway relays, and what differs between them; everything else (the call, the relay,
settlement, reporting) is the one path in :mod:`app.upstream.proxy`.

Each :class:`Api` says where the call goes (the path after the provider's ``base_url``), which models and
providers can serve it, what the provider gets (the caller's body with only ``model`` replaced, and for chat
streams ``stream_options.include_usage``), which usage reader bills it (:mod:`app.accounting.usage`), which
relay watches its stream (:mod:`app.upstream.sse`), and how its errors look. No Flask here.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..accounting import usage
from ..accounting.usage import Reader
from ..catalog import Model
from ..errors import GatewayError
from ..errors import WrongEndpoint
from ..errors import anthropic_sse_error_event
from ..errors import sse_error_event
from ..jsonio import dumps
from ..jsonio import loads
from .rename import ModelName
from .sse import EventRelay
from .sse import MessagesRelay
from .sse import ResponsesRelay

#: The ``anthropic-version`` sent upstream when the caller sends none (the Messages API requires one).
ANTHROPIC_VERSION = "2023-06-01"

#: The caller's headers that go upstream on the Anthropic route (never its key: that is ours to check).
ANTHROPIC_HEADERS = ("anthropic-version", "anthropic-beta")


@dataclass(frozen=True)
class Api:
    """One provider API: ``name`` for messages, the upstream ``path``, and its particulars."""

    name: str
    path: str
    #: What the provider's answer is, for messages ("where a chat completion was expected").
    answer: str
    #: The model kind it serves (``catalog.KINDS``).
    kind: str
    reader: Reader
    #: The stream's last event, for the message when a stream ends without it.
    end: str = "[DONE]"
    anthropic: bool = False

    def check(self, model: Model, route: str) -> None:
        """:raise WrongEndpoint: the model, or its provider, does not serve this API (a 400 naming the model)."""
        if model.kind != self.kind:
            other = "/embeddings" if model.kind == "embedding" else "/chat/completions, /responses or /messages"
            raise WrongEndpoint(f"The model '{model.id}' is {'an embedding' if model.kind == 'embedding' else 'a chat'}"
                                f" model: it is not served on {route}; call it on {other}.", param="model")
        provider = model.provider
        if self.anthropic != (provider.api == "anthropic"):
            speaks = "Anthropic's Messages API (/messages)" if provider.api == "anthropic" else "OpenAI's API"
            raise WrongEndpoint(f"The model '{model.id}' is served by the provider '{provider.name}', which speaks "
                                f"{speaks}; {route} is not available for it.", param="model",
                                code="endpoint_not_supported")
        if self.name == "responses" and not provider.responses:
            raise WrongEndpoint(f"The model '{model.id}' is served by the provider '{provider.name}', which does not "
                                f"serve the Responses API (the catalogue does not declare responses = true for it); "
                                f"use /chat/completions.", param="model", code="endpoint_not_supported")

    def payload(self, body: dict, model: Model, stream: bool) -> bytes:
        """The body the provider gets: the caller's, with the upstream model name (and, for chat streams,
        usage asked for)."""
        out = dict(body)
        out["model"] = model.upstream_model
        if stream and self.name == "chat":
            opts = out.get("stream_options")
            out["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        return dumps(out)

    def headers(self, caller: dict) -> dict:
        """The caller's headers that go upstream (``caller``: the request's headers, any case)."""
        if not self.anthropic:
            return {}
        out = {"anthropic-version": caller.get("anthropic-version") or ANTHROPIC_VERSION}
        beta = caller.get("anthropic-beta")
        if beta:
            out["anthropic-beta"] = beta
        return out

    def relay(self, body: dict, model: Model) -> EventRelay:
        """A fresh relay for one stream of this API."""
        name = ModelName(model.id)
        if self.name == "responses":
            return ResponsesRelay(name)
        if self.anthropic:
            return MessagesRelay(name)
        opts = body.get("stream_options")           # the usage chunk goes out only if the caller asked for it
        return EventRelay(strip_usage_chunk=not (isinstance(opts, dict) and opts.get("include_usage") is True),
                          model=name)

    def error_shaped(self, data: bytes) -> bool:
        """Whether a provider's error body is in this API's error shape (then it passes through as it is)."""
        try:
            obj = loads(data)
        except ValueError:
            return False
        if not isinstance(obj, dict):
            return False
        if self.anthropic:
            return obj.get("type") == "error" and isinstance(obj.get("error"), dict)
        return isinstance(obj.get("error"), dict)

    def sse_error(self, err: GatewayError) -> bytes:
        """``err`` as the one event that ends a stream after its first byte."""
        return anthropic_sse_error_event(err) if self.anthropic else sse_error_event(err)


CHAT = Api("chat", "/chat/completions", "a chat completion", "chat", usage.chat)
EMBEDDINGS = Api("embeddings", "/embeddings", "embeddings", "embedding", usage.embeddings)
RESPONSES = Api("responses", "/responses", "a response", "chat", usage.responses, end="response.completed")
MESSAGES = Api("messages", "/v1/messages", "a message", "chat", usage.anthropic, end="message_stop",
               anthropic=True)
