"""
app.store
~~~~~~~~~

Where state lives on disk: the peewee models and the database chosen by URL (``models``), the schema and its
upgrades (``schema``), and SQLite's plumbing: the group-commit writer (``sqlite_writer``), WAL checkpoints off
the request path (``checkpoint``) and cooperative lock waits (``sqlite_busy``).

May import: nothing of ``app`` but ``app.errors``. Every other area builds on this one.
"""
