"""
app.console_users
~~~~~~~~~~~~~~~~~

The web console's users: a name and a password hash (Werkzeug's ``generate_password_hash``, scrypt by
default), made with ``boundless console add-user NAME``. No Flask requests here.
"""
from __future__ import annotations

import functools

from werkzeug.security import check_password_hash
from werkzeug.security import generate_password_hash

from .errors import ConfigurationError
from .store.models import ConsoleUser

#: The shortest password accepted: the sign-in form is throttled, but a short password is guessed offline
#: from a stolen database in no time.
MIN_PASSWORD = 10


@functools.cache
def _dummy_hash() -> str:
    """A hash checked when the name is unknown, so that an unknown name takes as long as a wrong password."""
    return generate_password_hash("not a password of anybody")


def set_password(name: str, password: str) -> bool:
    """Create the user, or change their password; return True when the user is new.

    :raise ConfigurationError: for a name of more than 100 characters or an empty one, or a short password.
    """
    name = name.strip()
    if not name or len(name) > 100:
        raise ConfigurationError("a console user name must be 1 to 100 characters")
    if len(password) < MIN_PASSWORD:
        raise ConfigurationError(f"the password must have at least {MIN_PASSWORD} characters")
    hashed = generate_password_hash(password)
    if ConsoleUser.update(password_hash=hashed).where(ConsoleUser.name == name).execute():
        return False
    ConsoleUser.create(name=name, password_hash=hashed)
    return True


def remove(name: str) -> None:
    if not ConsoleUser.delete().where(ConsoleUser.name == name).execute():
        raise ConfigurationError(f"no console user named {name!r}")


def check(name: str, password: str) -> ConsoleUser | None:
    """The user if the password is theirs, else None (in about the same time either way)."""
    user = ConsoleUser.get_or_none(ConsoleUser.name == name)
    if user is None:
        check_password_hash(_dummy_hash(), password)
        return None
    return user if check_password_hash(user.password_hash, password) else None


def exists(user_id: int, name: str) -> bool:
    """Whether the signed-in user still exists (a removed user's session ends at once)."""
    return ConsoleUser.select().where((ConsoleUser.id == user_id) & (ConsoleUser.name == name)).exists()


__all__ = ["MIN_PASSWORD", "check", "exists", "remove", "set_password"]
