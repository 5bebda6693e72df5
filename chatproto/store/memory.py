"""A store in plain dicts: for unit tests, where a Deferred that has already
fired keeps the protocol's behaviour visible in the same call."""

from __future__ import annotations

import time
from collections import Counter
from hashlib import sha256
from itertools import count

from twisted.internet.defer import succeed
from zope.interface import implementer

from . import (
    DEFAULT_RETENTION,
    DUPLICATE_DELIVERED,
    DUPLICATE_PENDING,
    HELD_ADDED,
    HELD_MESSAGE,
    HELD_SUBJECT,
    NEW,
    Completed,
    GroupChange,
    IChatStore,
    InboxItem,
    Keeping,
    Recorded,
    Retention,
    Snapshot,
    Subject,
    Swept,
    added_notices,
    is_group,
    joined,
    left_notices,
)

#: As SQLite's: work per housekeeping pass.
SWEEP_BATCH = 500


class _Message:
    """A stored message; ``text`` is None once every recipient has it (and no archive keeps it)."""

    __slots__ = ("id", "src", "dst", "ts", "text", "remaining", "key")

    def __init__(self, msg_id, src, dst, ts, text, remaining, key):
        #: A digest of the text: its identity once the text is gone.
        self.key = key
        self.id = msg_id
        self.src = src
        self.dst = dst
        self.ts = ts
        self.text = text
        self.remaining = remaining


@implementer(IChatStore)
class MemoryStore:
    def __init__(self, retention: Retention = DEFAULT_RETENTION):
        self.keeping = Keeping(retention)
        self.users: dict[str, str | None] = {}
        #: user id → their last login or logout (Unix seconds), for --expire-held.
        self.last_seen: dict[str, int] = {}
        #: (Unix seconds, the highest message id then), oldest first: the messages' ages.
        self.marks: list[tuple[int, int]] = []
        self.groups: dict[str, list[str]] = {}
        self.read_marks: dict[str, dict[str, int]] = {}
        self.low_marks: dict[str, int] = {}
        self.subjects: dict[str, Subject] = {}
        self.messages: dict[int, _Message] = {}
        self._by_key: dict[tuple, _Message] = {}
        #: (src, dst) → the highest TIMESTAMP stored.
        self._latest: dict[tuple[str, str], int] = {}
        self._inboxes: dict[str, dict[int, InboxItem]] = {}
        self._ids = count(1)
        self.closed = False
        self.backlog = 0

    def load(self):
        return succeed(
            Snapshot(
                dict(self.users),
                {g: list(m) for g, m in self.groups.items()},
                {g: dict(m) for g, m in self.read_marks.items()},
                dict(self.low_marks),
                {user: count for user, inbox in self._inboxes.items() if (count := len(inbox))},
            )
        )

    def add_user(self, user_id, secret_hash):
        self.users[user_id] = secret_hash
        self.last_seen[user_id] = int(time.time())
        return succeed(None)

    def seen(self, user_id):
        if user_id in self.users:
            self.last_seen[user_id] = int(time.time())
        return succeed(None)

    def add_group(self, group_id, ts, members, hold_for):
        self.groups[group_id] = list(members)
        self.read_marks[group_id] = {}
        self.low_marks[group_id] = 0
        for user_id in hold_for:
            self._put(user_id, HELD_ADDED, "", group_id, ts, joined(members), None)
        return succeed(None)

    def set_subject(self, group_id, src, ts, name, online):
        self.subjects[group_id] = Subject(src, ts, name)
        members = list(self.groups[group_id])
        for user_id in members:
            if user_id not in online:
                # The 18 still held says nothing the new one does not.
                inbox = self._inboxes.get(user_id, {})
                for seq in [q for q, i in inbox.items() if i.code == HELD_SUBJECT and i.dst == group_id]:
                    del inbox[seq]
                self._put(user_id, HELD_SUBJECT, src, group_id, ts, name, None)
        return succeed(members)

    def add_members(self, group_id, ts, added, online):
        members = self.groups[group_id]
        mark = max((m.ts for m in self.messages.values() if m.dst == group_id), default=0)
        new = [user_id for user_id in dict.fromkeys(added) if user_id not in members]
        members.extend(new)
        for user_id in new:
            self.read_marks.setdefault(group_id, {})[user_id] = mark
        subject = self.subjects.get(group_id)
        for row in added_notices(group_id, ts, members, new, subject, online):
            self._put(*row, None)
        return succeed(GroupChange(list(members), subject, mark))

    def leave_group(self, group_id, user_id, ts, online):
        members = self.groups[group_id]
        if user_id in members:
            members.remove(user_id)
        self.read_marks.get(group_id, {}).pop(user_id, None)
        for row in left_notices(group_id, user_id, ts, members, online):
            self._put(*row, None)
        return succeed(GroupChange(list(members)))

    def _put(self, user_id, code, src, dst, ts, text, msg_id):
        seq = next(self._ids)
        self._inboxes.setdefault(user_id, {})[seq] = InboxItem(seq, code, src, dst, ts, text, msg_id)

    def record_message(self, src, dst, ts, text, recipients, answer=None):
        return _answered(self._record(src, dst, ts, text, recipients), answer)

    def _record(self, src, dst, ts, text, recipients):
        digest = sha256(text).digest()
        key = (src, dst, ts, digest)
        known = self._by_key.get(key)
        if known is not None:
            status = DUPLICATE_DELIVERED if known.remaining == 0 else DUPLICATE_PENDING
            return Recorded(known.id, status, known.remaining == 0)
        kept = text if recipients or self.keeping.archive else None
        msg = _Message(next(self._ids), src, dst, ts, kept, len(recipients), digest)
        if ts > self._latest.get((src, dst), 0):
            self._latest[(src, dst)] = ts
        self.messages[msg.id] = msg
        self._by_key[key] = msg
        for user_id in recipients:
            self._put(user_id, HELD_MESSAGE, src, dst, ts, text, msg.id)
        return Recorded(msg.id, NEW, msg.remaining == 0)

    def _deliver(self, user_id, msg_ids):
        inbox = self._inboxes.get(user_id, {})
        wanted = set(msg_ids)
        done = []
        for seq, item in list(inbox.items()):
            if item.code == HELD_MESSAGE and item.msg_id in wanted:
                del inbox[seq]
                msg = self.messages[item.msg_id]
                msg.remaining -= 1
                if msg.remaining == 0:
                    done.append(Completed(msg.src, msg.dst, msg.ts))
                    if msg.id <= self.keeping.text_cutoff:
                        msg.text = None
        return done

    def record_delivered(self, src, dst, stamped, answer=None):
        for ts, text in stamped:
            recorded = self._record(src, dst, ts, text, ())
            if recorded.status == DUPLICATE_PENDING:
                self._deliver(dst, [recorded.msg_id])
        return _answered(None, answer)

    def latest_timestamp(self, src, dst):
        return succeed(self._latest.get((src, dst), 0))

    def mark_delivered(self, user_id, msg_ids):
        return succeed(self._deliver(user_id, msg_ids))

    def mark_reached(self, msg_id, user_ids, answer=None):
        return _answered([done for user_id in user_ids for done in self._deliver(user_id, [msg_id])], answer)

    def acknowledge(self, user_id, src, dst, ts):
        """A 16 ends one hold: the oldest pending for user_id with that name."""
        pending = sorted(
            item
            for item in self._inboxes.get(user_id, {}).values()
            if item.code == HELD_MESSAGE and (item.src, item.dst, item.ts) == (src, dst, ts)
        )
        return succeed(self._deliver(user_id, [item.msg_id for item in pending[:1]]))

    def hold(self, user_id, code, src, dst, ts, text=None):
        self._put(user_id, code, src, dst, ts, text, None)
        return succeed(None)

    def inbox(self, user_id, after=0, limit=None):
        items = sorted(item for item in self._inboxes.get(user_id, {}).values() if item.seq > after)
        return succeed(items[:limit])

    def drop(self, user_id, seqs):
        inbox = self._inboxes.get(user_id, {})
        for seq in seqs:
            item = inbox.get(seq)
            if item is not None and item.code != HELD_MESSAGE:
                del inbox[seq]
        return succeed(None)

    def set_read_mark(self, group_id, user_id, ts):
        self.read_marks.setdefault(group_id, {})[user_id] = ts
        return succeed(None)

    def set_low_mark(self, group_id, ts):
        self.low_marks[group_id] = ts
        return succeed(None)

    def group_messages_since(self, group_id, ts):
        rows = sorted((m.ts, m.id, m.src) for m in self.messages.values() if m.dst == group_id and m.ts > ts)
        return succeed([(src, when) for when, _, src in rows])

    def sweep(self, now, online):
        """SQLite's housekeeping (store/sqlite.py ``_sweep``) over the dicts."""
        retention, keeping = self.keeping.retention, self.keeping
        now = int(now)
        if not self.marks or now - self.marks[-1][0] >= retention.mark_every:
            self.marks.append((now, max(self.messages, default=0)))
        longest = max(retention.dedup_window, retention.keep_delivered)
        while len(self.marks) > 1 and self.marks[1][0] <= now - longest:
            del self.marks[0]
        texts = identities = 0
        if keeping.archive:
            keeping.text_cutoff = self._id_at(now - retention.keep_delivered)
            for msg in self._after(keeping.text_cursor, keeping.text_cutoff):
                if msg.text is not None and msg.remaining == 0:
                    msg.text = None
                    texts += 1
            keeping.text_cursor = max(keeping.text_cursor, keeping.text_cutoff)
        for msg in self._after(0, self._id_at(now - retention.dedup_window)):
            read = not is_group(msg.dst) or msg.ts <= self.low_marks.get(msg.dst, msg.ts)
            if msg.remaining == 0 and read:
                del self.messages[msg.id]
                del self._by_key[(msg.src, msg.dst, msg.ts, msg.key)]
                identities += 1
        held = self._expire_held(now - retention.expire_held, online) if retention.expire_held else {}
        return succeed(Swept(identities, texts, held, False))

    def _id_at(self, when):
        return max((last_id for at, last_id in self.marks if at <= when), default=0)

    def _after(self, first, last):
        return [msg for msg_id, msg in sorted(self.messages.items()) if first < msg_id <= last]

    def _expire_held(self, before, online):
        dropped = Counter()
        for user_id, inbox in self._inboxes.items():
            if user_id in online or self.last_seen.get(user_id, before) >= before:
                continue
            for seq, item in list(inbox.items()):
                if item.code != HELD_MESSAGE or sum(dropped.values()) >= SWEEP_BATCH:
                    continue
                del inbox[seq]
                dropped[user_id] += 1
                msg = self.messages[item.msg_id]
                msg.remaining -= 1
                if not is_group(msg.dst):
                    del self.messages[msg.id]
                    del self._by_key[(msg.src, msg.dst, msg.ts, msg.key)]
                elif msg.remaining == 0:
                    msg.text = None
        return dict(dropped)

    def barrier(self):
        return succeed(None)

    def caught_up(self):
        return succeed(None)

    def close(self):
        self.closed = True
        return succeed(None)


def _answered(value, answer):
    """The result as the caller asked for it: a Deferred, or straight to its answer."""
    if answer is None:
        return succeed(value)
    answer.callback(value)
    return None
