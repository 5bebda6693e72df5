"""Accounts: register (01/13), log in (03/15), log out."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from twisted.logger import Logger

from .. import wire
from .answers import busy, failed
from .session import Session, State


def hash_secret(secret: bytes) -> str:
    """A secret is 128 random bits, so one SHA-256 is as good as a slow KDF."""
    return hashlib.sha256(secret).hexdigest()


class Accounts:
    log = Logger()

    def __init__(self, directory, store, delivery, routing, require_secrets: bool = False):
        self.directory = directory
        self.store = store
        self.delivery = delivery
        self.routing = routing
        self.require_secrets = require_secrets

    def register(self, session: Session, with_secret: bool) -> None:
        code = wire.REGISTER_SECRET if with_secret else wire.REGISTER
        if self.require_secrets and not with_secret:
            session.connection.error(code, wire.SECRET_REQUIRED)
            return
        users = self.directory.users
        user = self.directory.new_user_id()
        secret = secrets.token_hex(16).encode() if with_secret else None
        secret_hash = hash_secret(secret) if secret else None
        # Taken now, so that no other 01 draws it; given back if the store fails.
        users[user] = secret_hash
        frame = wire.registered_secret(user, secret) if secret else wire.registered(user)
        d = self.store.add_user(user.decode(), secret_hash)
        d.addCallbacks(
            self._registered, self._not_registered, (session, user, frame), errbackArgs=(session, code, user)
        )

    def _registered(self, _, session: Session, user: bytes, frame: bytes) -> None:
        # Counted per address in the admission's summaries: a line each would let a flood write the log.
        self.log.debug("registered {user}", user=user.decode())
        session.connection.write(frame)

    def _not_registered(self, failure, session: Session, code: bytes, user: bytes) -> None:
        """An account that was not stored is not handed out."""
        self.directory.users.pop(user, None)
        busy(failure, session, code)

    def login(self, session: Session, user: bytes, secret: bytes | None, code: bytes) -> None:
        """A 03 (``secret`` None) or 15 for ``user``, whose id the directory knows."""
        connection = session.connection
        if secret is None and self.require_secrets:
            connection.error(code, wire.SECRET_REQUIRED)
            return
        users = self.directory.users
        if user not in users:
            connection.error(code, wire.UNKNOWN_USER)
            return
        stored = users[user]
        if secret is None:
            refused = stored is not None
        else:
            refused = stored is None or not hmac.compare_digest(hash_secret(secret), stored)
        if refused:
            self.log.debug("refused login of {user}", user=user.decode())
            connection.error(code, wire.SECRET_REQUIRED)
            return
        if session.user is not None and session.user != user:
            self.logout(session)
        sessions = self.directory.sessions
        old = sessions.get(user)
        if old is session:
            # Logged in again on the same connection: resend what is still held.
            connection.write(wire.online_ok(user))
            if session.state is State.LIVE or session.state is State.BEHIND:
                self.delivery.start_flush(session)
            return
        if old is not None:
            self.log.info("{user} logged in elsewhere: closing the old connection", user=user.decode())
            self.delivery.abandon(old)
            old.connection.close_with(wire.error(wire.ONLINE, wire.LOGGED_IN_ELSEWHERE))
        session.user = user
        session.acknowledges = secret is not None
        sessions[user] = session
        self._seen(user)
        self.delivery.came_online(user)
        self.routing.come_online(session)

    def logout(self, session: Session, closed: bool = False) -> None:
        """The session's connection is gone (``closed``) or is changing user."""
        user = session.user
        if user is not None and self.directory.sessions.get(user) is session:
            self.delivery.abandon(session)
            self.log.info("{user} offline", user=user.decode())
            self.routing.went_offline(user)
            self._seen(user)
        session.to(State.CLOSED if closed else State.CONNECTED)

    def _seen(self, user: bytes) -> None:
        """Note the login or logout, which --expire-held measures a user's absence from."""
        self.store.seen(user.decode()).addErrback(failed, "noting a login or logout")
