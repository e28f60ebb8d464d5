"""
app.console.secret
~~~~~~~~~~~~~~~~~~

The key that signs the console's session cookies. It must be the same in every worker and survive restarts
(else every restart signs everybody out, and a worker would refuse another's cookie): ``BOUNDLESS_SECRET_KEY``
when set; otherwise 32 random bytes generated once into ``console-secret.key`` beside the SQLite database (or
under the instance folder for a server database), readable by its owner only.
"""
from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from ..settings import INSTANCE_DIR

FILE_NAME = "console-secret.key"


def secret_path(database_url: str) -> Path:
    if database_url.startswith("sqlite:///") and database_url != "sqlite:///:memory:":
        return Path(database_url[len("sqlite:///"):]).resolve().with_name(FILE_NAME)
    return INSTANCE_DIR / FILE_NAME


def secret_key(configured: str, database_url: str) -> str:
    """The configured key, or the generated one (made now if missing; several workers may race: the first
    to create the file wins, the others read it)."""
    if configured:
        return configured
    path = secret_path(database_url)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(100):                 # another worker is writing it: wait for its 64 characters
            text = path.read_text().strip()
            if len(text) >= 64:
                return text
            time.sleep(0.01)
        raise RuntimeError(f"{path} holds no usable secret key: delete it or set BOUNDLESS_SECRET_KEY")
    value = secrets.token_hex(32)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    return value
