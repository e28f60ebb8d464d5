"""
app.limits
~~~~~~~~~~

Per-key request limits: the RPM/RPD limiter over the ``limits`` library's storages (``ratelimit``), and the
SQLite storage registered with that library as ``sqlite://`` (``sqlite_storage``).

May import: ``app.store`` (the SQLite writer), ``app.errors``. Never ``app.upstream``, ``app.accounting``,
``app.api`` or ``app.server``.

(The package is ``app.limits``; the library is the top-level ``limits``: modules here import it absolutely.)
"""
