"""Bearer tokens read from a file or an environment variable; a changed file is read again.
"""

from __future__ import annotations

import logging
import threading
import time

from ps.security.certificates import FileStamps
from ps.security.config import RELOAD_CHECK_S, Role, SecurityConfig

log = logging.getLogger("embps.security")


class LiveToken:
    """One role's token; one from a file is read again when the file changes (checked at most every
    RELOAD_CHECK_S). A new token that is not valid is logged (never its value) and the current
    one kept."""

    def __init__(
        self, value: str, security: SecurityConfig | None = None, role: Role | None = None,
        stamps: FileStamps | None = None,
    ) -> None:
        self.value = value
        self._security = security
        self._role = role
        self._stamps = stamps  # of the token file, taken before `value` was read; None: never re-read
        self._next_check = time.monotonic() + RELOAD_CHECK_S
        self._lock = threading.Lock()
        self._encoded = (value, value.encode())

    @classmethod
    def of(cls, security: SecurityConfig, role: Role) -> LiveToken | None:
        """The role's token now (None: the role has none); ValueError naming the field if invalid."""
        source = getattr(security.tokens, role.value)
        stamps = FileStamps([source.file]) if source is not None and source.file is not None else None
        value = security.token(role)
        return None if value is None else cls(value, security, role, stamps)

    @classmethod
    def fixed(cls, value: str) -> LiveToken:
        return cls(value)

    def current_bytes(self) -> bytes:
        """current(), encoded (what a server compares a presented token with)."""
        value = self.current()
        if self._encoded[0] is not value:
            self._encoded = (value, value.encode())
        return self._encoded[1]

    def current(self) -> str:
        if self._stamps is None or time.monotonic() < self._next_check:
            return self.value
        with self._lock:
            self._next_check = time.monotonic() + RELOAD_CHECK_S
            stamps = self._stamps.changed()
            if stamps is not None:
                self._stamps.last = stamps
                try:
                    self.value = self._security.token(self._role)
                    log.info("security.tokens.%s: token file changed; using the new token", self._role.value)
                except ValueError as exc:
                    log.warning("%s; keeping the current token", exc)
        return self.value
