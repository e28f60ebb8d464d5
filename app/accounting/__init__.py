"""
app.accounting
~~~~~~~~~~~~~~

Money and usage: the reservation of a request's worst case and its settlement to the real cost
(``billing``), integer micro-credit arithmetic (``credits``), and the dialect-specific ledger statements
(``ledger_sql``).

May import: ``app.store``, ``app.catalog``, ``app.errors``. Never ``app.upstream``, ``app.api`` or
``app.server``; nothing here imports Flask.
"""
