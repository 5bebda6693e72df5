"""The framework's ceiling: a relay on plain Twisted that never looks inside a message.

A connection says once what it is, in a 16-byte header: ``R`` + 15-digit key
(receive everything sent to key) or ``S`` + key (everything I send goes to
key). The relay answers ``+`` and from then on only forwards bytes: each
chunk a sender's socket yields is written to every receiver of its key, as
is. Bytes for a key nobody receives yet are held and flushed when a
receiver arrives (the offline drain). There is no framing, no store, no
parsing: what is left is Twisted's reactor and transports.

Run: ``python bench/relay.py PORT``.
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

HEADER = 16


class Relay(Protocol):
    def __init__(self, hub: dict, held: dict):
        self.hub = hub
        self.held = held
        self.head = b""
        self.key = None
        self.targets = None

    def dataReceived(self, data: bytes):
        targets = self.targets
        if targets is not None:
            if targets:
                for t in targets:
                    t.write(data)
            else:
                self.held.setdefault(self.key, []).append(data)
            return
        self.head += data
        if len(self.head) < HEADER:
            return
        head, rest = self.head[:HEADER], self.head[HEADER:]
        self.head = b""
        self.key = head[1:]
        self.transport.write(b"+")
        if head[:1] == b"R":
            self.hub.setdefault(self.key, []).append(self.transport)
            held = self.held.pop(self.key, None)
            if held:
                self.transport.writeSequence(held)
        else:
            self.targets = self.hub.setdefault(self.key, [])
            if rest:
                self.dataReceived(rest)

    def connectionLost(self, reason):
        if self.key is not None and self.targets is None:
            receivers = self.hub.get(self.key, [])
            if self.transport in receivers:
                receivers.remove(self.transport)


class RelayFactory(Factory):
    noisy = False

    def __init__(self):
        self.hub: dict = {}
        self.held: dict = {}

    def buildProtocol(self, addr):
        return Relay(self.hub, self.held)


def main() -> None:
    port = int(sys.argv[1])
    reactor.listenTCP(port, RelayFactory(), backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
