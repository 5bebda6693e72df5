"""Fakes shared by the client tests: an endpoint of StringTransports and a clock."""

from __future__ import annotations

from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from chatproto import wire
from chatproto.client import ChatClient, ClientModel, Identity, LocalStore, save_identity

T0 = 1_700_000_000
ME = "0111111111111"
SECRET = "0123456789abcdef0123456789abcdef"
BOB = "0222222222222"
CAROL = "0333333333333"
GROUP = "1444444444444"
DAVE = "0555555555555"


class FakeEndpoint:
    """Each connect() builds the protocol on a StringTransport, or fails while ``down``."""

    def __init__(self):
        self.connections: list[tuple[object, StringTransport]] = []
        self.down = False

    def connect(self, factory):
        if self.down:
            return fail(ConnectionRefusedError())
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)

    @property
    def last(self):
        return self.connections[-1]


def drop(protocol) -> None:
    """The server went away: what the reactor does when a socket closes."""
    protocol.connectionLost(Failure(ConnectionDone()))


def make_model(tmp_path, identity: bool = True, **options) -> tuple[ClientModel, MemoryReactorClock]:
    clock = MemoryReactorClock()
    clock.advance(T0)
    store = LocalStore(str(tmp_path / "profile"))
    if identity:
        save_identity(store.identity_path, Identity(ME, SECRET))
    return ClientModel(store, clock, **options), clock


def reopen(model: ClientModel, clock) -> ClientModel:
    """The same profile after a restart of the client."""
    directory = model.store.directory
    model.store.close()
    return ClientModel(LocalStore(directory), clock, read_receipts=model.read_receipts)


def online(tmp_path=None, model=None, clock=None, **options):
    """A model whose ChatClient is connected and logged in; returns (client, endpoint, transport)."""
    if model is None:
        model, clock = make_model(tmp_path, **options)
    endpoint = FakeEndpoint()
    client = ChatClient(clock, endpoint, model, retry_policy=lambda attempt: 1.0)
    client.start()
    protocol, transport = endpoint.last
    assert transport.value() == wire.online_secret(ME.encode(), SECRET.encode())
    transport.clear()
    protocol.dataReceived(wire.online_ok(ME.encode()))
    return client, endpoint, transport


def b(text: str) -> bytes:
    return text.encode()
