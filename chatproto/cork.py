"""The cork: a burst of work writes to each connection once.

A read of a few hundred 05s, or the answers of one commit, would otherwise
cost every reader one write per frame. While the cork is in, connections
keep their frames back; when the outermost burst ends, each writes what it
got in one go. The store enters it around a commit's answers, a
connection around each read.
"""

from __future__ import annotations


class Cork:
    __slots__ = ("depth", "waiting")

    def __init__(self):
        self.depth = 0
        #: Connections holding frames back, each once (anything with ``uncork``).
        self.waiting: list = []

    def __enter__(self):
        self.depth += 1

    def __exit__(self, *exc_info):
        self.depth -= 1
        if not self.depth and self.waiting:
            waiting, self.waiting = self.waiting, []
            for connection in waiting:
                connection.uncork()
