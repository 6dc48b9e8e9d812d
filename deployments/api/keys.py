"""Where the API keys come from: a file and/or an environment variable that the config names.

The config holds only the file's path or the variable's name, never a key. Keys are read at the
deploy (``AuthSettings`` validation, on the node that builds the app) and again by each Ingress
replica at start (on its own node), so a missing, empty or malformed source fails the deploy
with a message naming it, never an open service. The file is re-read when it changes (checked
every ``RELOAD_CHECK_S`` seconds, off the event loop): keys can be added and revoked without a
restart; a file that breaks later keeps the previous keys and logs why. Keys are kept as SHA-256
digests, compared in constant time against every key.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator

logger = logging.getLogger("ray.serve")

# RFC 6750's b64token, what a Bearer credential may hold: every key can be sent as Bearer, and a
# file line never needs quoting. ``#`` starts a comment; commas and whitespace separate keys.
KEY = re.compile(r"[A-Za-z0-9._~+/=-]+")
MIN_KEY_CHARS = 16
RELOAD_CHECK_S = 5.0

Digests = frozenset[bytes]
Stamp = tuple[int, int, int]  # inode, size, mtime (ns): any change of the file changes it


class AuthSettings(BaseModel):
    """``auth:`` in serve_config.yaml: where the keys are, and whether loopback needs one.

    ``allow_loopback``: requests from 127.0.0.0/8 or ::1 that present no credentials are let
    through (a local tool on the proxy's host); presented credentials are always checked.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    keys_file: str | None = None  # an absolute path, on every node that may run an Ingress
    keys_env: str | None = None   # a variable name, set on every such node
    allow_loopback: bool = False

    @model_validator(mode="after")
    def _keys_readable(self) -> "AuthSettings":
        if self.keys_file is None and self.keys_env is None:
            raise ValueError("auth: name keys_file (a file of keys) or keys_env (a variable "
                             "holding keys); leave auth out to serve without keys")
        if self.keys_file is not None and not Path(self.keys_file).is_absolute():
            raise ValueError(f"auth.keys_file: {self.keys_file!r} is not an absolute path "
                             "(replicas may run in another directory or on another node)")
        read_keys(self)  # fail the deploy here, with the source's name, not at the first request
        return self


def parse_keys(text: str, source: str) -> list[str]:
    """Keys in ``text``: separated by newlines, commas or spaces; ``#`` to the end of a line is a
    comment. A bad key is named by its line, never shown."""
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        for word in re.split(r"[\s,]+", line.partition("#")[0].strip()):
            if not word:
                continue
            if not KEY.fullmatch(word) or len(word) < MIN_KEY_CHARS:
                raise ValueError(f"{source}, line {number}: a key must be at least {MIN_KEY_CHARS} "
                                 "characters of A-Z a-z 0-9 . _ ~ + / = -")
            keys.append(word)
    return keys


def digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _digests(keys: list[str], source: str) -> Digests:
    if not keys:
        raise ValueError(f"{source} holds no keys; refusing to serve with none")
    return frozenset(digest(key.encode()) for key in keys)


def env_keys(name: str) -> Digests:
    source = f"auth.keys_env: ${name}"
    if name not in os.environ:
        raise ValueError(f"{source} is not set in this process's environment")
    return _digests(parse_keys(os.environ[name], source), source)


def stamp(path: str) -> Stamp:
    info = os.stat(path)
    return info.st_ino, info.st_size, info.st_mtime_ns


def file_keys(path: str) -> tuple[Stamp, Digests]:
    """The file's stamp and keys (the stamp first: a change while reading is seen next time)."""
    source = f"auth.keys_file: {path}"
    try:
        seen = stamp(path)
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{source} cannot be read ({type(error).__name__}: "
                         f"{getattr(error, 'strerror', None) or 'not UTF-8'})") from None
    return seen, _digests(parse_keys(text, source), source)


def read_keys(settings: AuthSettings) -> Digests:
    """Every configured key's digest; raises ValueError naming a missing or unusable source."""
    found: set[bytes] = set()
    if settings.keys_env is not None:
        found |= env_keys(settings.keys_env)
    if settings.keys_file is not None:
        found |= file_keys(settings.keys_file)[1]
    return frozenset(found)


class KeyRing:
    """The keys one Ingress replica accepts; the file's part re-read when the file changes."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self._env = env_keys(settings.keys_env) if settings.keys_env is not None else frozenset()
        self._stamp: Stamp | None = None
        file_part: Digests = frozenset()
        if settings.keys_file is not None:
            self._stamp, file_part = file_keys(settings.keys_file)
        self._digests = self._env | file_part
        self._next_check = time.monotonic() + RELOAD_CHECK_S
        self._checking: asyncio.Task | None = None

    def accepts(self, key: bytes) -> bool:
        """Constant time in which key matched: the candidate is compared with every key."""
        candidate = digest(key)
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(candidate, known)
        return matched

    def refresh_soon(self) -> None:
        """At most every RELOAD_CHECK_S, checks the key file in a thread; the request that
        triggers it goes on with the keys as they are."""
        now = time.monotonic()
        if self.settings.keys_file is None or self._checking is not None or now < self._next_check:
            return
        self._next_check = now + RELOAD_CHECK_S
        self._checking = asyncio.get_running_loop().create_task(asyncio.to_thread(self.reload))
        self._checking.add_done_callback(self._checked)

    def _checked(self, task: asyncio.Task) -> None:
        self._checking = None
        if not task.cancelled() and task.exception() is not None:
            logger.error("auth: checking the key file failed: %r", task.exception())

    def reload(self) -> bool:
        """Re-reads the key file if it changed; True when the keys were replaced. A file that
        cannot be used keeps the previous keys (logged once per change of the file)."""
        path = self.settings.keys_file
        assert path is not None
        try:
            seen: Stamp | None = stamp(path)
        except OSError:
            seen = None
        if seen == self._stamp:
            return False
        self._stamp = seen
        try:
            self._stamp, file_part = file_keys(path)
        except ValueError as error:
            logger.error("%s; keeping the previous keys", error)
            return False
        self._digests = self._env | file_part
        logger.info("auth: %s changed; now %d key(s)", path, len(self._digests))
        return True
