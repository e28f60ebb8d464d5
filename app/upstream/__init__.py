"""
app.upstream
~~~~~~~~~~~~

Calling providers: the HTTP client (``client``), the relay of one chat request from the provider back to the
caller (``proxy``), the SSE event reader (``sse``) and the registry of open streams (``streams``).

May import: ``app.accounting`` (the relay settles what it reserved), ``app.catalog``, ``app.errors``,
``app.jsonio``. Never ``app.api``, ``app.server`` or Flask's request globals: the relay runs in a streamed
response's generator, after the request context is gone.
"""
