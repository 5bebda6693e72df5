"""TLS end to end: ``twist chat`` on an ``ssl:`` endpoint with a certificate made here,
and the client library connecting with a ``tls:`` endpoint that trusts it.

The client runs in a child process (it needs a reactor of its own); it prints
what happened as JSON. Every wait polls up to a deadline.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import select
import signal
import socket
import ssl
import subprocess
import textwrap
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from . import installed
from .test_e2e_server import DEADLINE, free_port

TEXT = "hello over TLS 🔒"


def make_certificate(directory) -> tuple[str, str]:
    """A self-signed certificate for localhost and 127.0.0.1; returns (key path, cert path).

    The certificate sits alone in ``directory/trust``, which is what a ``tls:``
    endpoint's trustRoots names; the key stays outside it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (directory / "trust").mkdir()
    key_path = directory / "key.pem"
    cert_path = directory / "trust" / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(key_path), str(cert_path)


@pytest.fixture
def tls_server(tmp_path):
    key, cert = make_certificate(tmp_path)
    port = free_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [installed.python(), "-m", "twisted", "chat", "--db", str(tmp_path / "chat.sqlite3")]
        + ["--port", f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1"],
        cwd=installed.outside(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + DEADLINE
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server never listened"
                select.select([], [], [], 0.02)  # poll interval
        yield port, cert
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=DEADLINE)
        log.close()


def test_the_protocol_runs_over_tls_and_an_untrusted_certificate_is_refused(tls_server):
    port, cert = tls_server
    untrusting = ssl.create_default_context()
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            untrusting.wrap_socket(raw, server_hostname="localhost")
    trusting = ssl.create_default_context(cafile=cert)
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
        with trusting.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"01")
            answer = b""
            while len(answer) < 15:
                chunk = tls.recv(15 - len(answer))
                assert chunk, "the server closed the TLS connection"
                answer += chunk
    assert answer[:3] == b"020" and answer[2:].isdigit()


CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from twisted.internet import reactor
    from twisted.internet.interfaces import ISSLTransport
    from chatproto.client import CONNECTED, DELIVERED, ChatClient, ClientModel, LocalStore

    server, alice_dir, bob_dir, text = sys.argv[1:5]
    result = {"tls": [], "incoming": None, "delivered": False, "errors": []}

    def make(directory):
        model = ClientModel(LocalStore(directory), reactor)
        client = ChatClient(reactor, server, model)
        model.listeners.append(lambda event, **data: on_event(model, client, event, data))
        return model, client

    def on_event(model, client, event, data):
        if event == "status" and model.status == CONNECTED:
            transport = client.protocol.transport
            result["tls"].append(ISSLTransport.providedBy(transport))
            if all(m.status == CONNECTED for m in (alice, bob)) and alice.me and bob.me:
                alice.add_contact(bob.me.user, "bob")
                alice.send_text(bob.me.user, text)
        elif event == "incoming" and model is bob:
            m = data["message"]
            result["incoming"] = [m.src, m.dst, m.text]
        elif event == "ticks" and model is alice:
            if any(m.state == DELIVERED for m in data["messages"]):
                result["delivered"] = True
                finish()
        elif event == "error":
            result["errors"].append(data["text"])

    def finish():
        if reactor.running:
            reactor.stop()

    alice, alice_client = make(alice_dir)
    bob, bob_client = make(bob_dir)
    alice_client.start()
    bob_client.start()
    reactor.callLater(float(sys.argv[5]), finish)
    reactor.run()
    result["alice"] = alice.me.user if alice.me else None
    result["bob"] = bob.me.user if bob.me else None
    print(json.dumps(result))
    """
)


def test_the_client_library_talks_over_tls_trusting_the_test_certificate(tls_server, tmp_path):
    port, cert = tls_server
    trust = str(tmp_path / "trust")
    endpoint = f"tls:localhost:{port}:trustRoots={trust}"
    out = subprocess.run(
        [installed.python(), "-c", CLIENT_SCRIPT, endpoint, str(tmp_path / "alice"), str(tmp_path / "bob")]
        + [TEXT, str(DEADLINE)],
        cwd=installed.outside(),
        capture_output=True,
        text=True,
        timeout=DEADLINE + 10,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == []
    assert result["tls"] and all(result["tls"]), "a connection was not over TLS"
    assert result["incoming"] == [result["alice"], result["bob"], TEXT]
    assert result["delivered"], "alice never got the 07"
