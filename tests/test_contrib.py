"""The files under contrib/ that an administrator installs: the systemd unit
(verified, and scored by ``systemd-analyze security``), the example config
(every key one the server takes), and the logrotate snippet, run by the real
logrotate against a real server."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys

import pytest

from chatproto import config
from chatproto.service import DEFAULTS

from . import installed
from .test_e2e_server import DEADLINE, REPO, free_port
from .test_startup import loopback, twist, wait_for_port, wait_for_text

CONTRIB = REPO / "contrib"
UNIT = CONTRIB / "chatproto.service"

#: The most `systemd-analyze security` may score the unit (0 is best, 10 worst).
MAX_EXPOSURE = 3.0


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_is_hardened():
    s = unit_settings()
    assert s["UMask"] == ["0077"]
    for key in (
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "NoNewPrivileges=yes",
        "SystemCallFilter=@system-service",
        "StateDirectory=chatproto",
    ):
        name, value = key.split("=", 1)
        assert value in s[name], key
    assert s["CapabilityBoundingSet"] == [""]
    assert s["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert s["User"] == ["chatproto"]
    # Its settings live in the config file, not on a command line every local user can read.
    assert s["ExecStart"] == [
        "/opt/chatproto/bin/twist --log-format=json chat --config /etc/chatproto/chat.toml"
    ]


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@needs_systemd_analyze
def test_the_unit_scores_at_most_3_on_systemd_analyze_security(tmp_path):
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for chatproto\.service: ([0-9.]+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, done.stdout


@needs_systemd_analyze
def test_the_units_verify(tmp_path):
    """systemd-analyze verify, with ExecStart pointed at a program this machine has."""
    for name in ("chatproto.service", "chatproto.socket"):
        text = (CONTRIB / name).read_text()
        text = re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", text, flags=re.M)
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            str(tmp_path / "chatproto.service"),
            str(tmp_path / "chatproto.socket"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "chatproto" not in done.stderr, done.stderr


def test_the_example_config_sets_known_settings_to_usable_values(tmp_path):
    settings = config.load(str(CONTRIB / "chat.toml"))
    assert set(settings) <= set(DEFAULTS)
    limits = set(DEFAULTS) - {"port", "db", "metrics", "require-secrets"}
    assert {k: settings[k] for k in limits} == {k: DEFAULTS[k] for k in limits}, "its limits are the defaults"
    config.settle({}, str(CONTRIB / "chat.toml"), DEFAULTS)


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is not installed")
def test_the_logrotate_snippet_rotates_a_running_servers_log(tmp_path):
    """The real logrotate with contrib/logrotate (paths and the signal's target made local)."""
    logs = tmp_path / "log"
    logs.mkdir(mode=0o700)
    log = logs / "chat.log"
    port = free_port()
    proc = subprocess.Popen(
        [*twist(), "--log-format=text", f"--log-file={log}", "chat"]
        + ["--port", loopback(port), "--db", str(tmp_path / "chat.sqlite3")],
        cwd=installed.outside(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
        wait_for_text(log, "chatproto listening on")
        snippet = (CONTRIB / "logrotate").read_text()
        assert "/var/log/chatproto/chat.log {" in snippet
        assert "systemctl kill --signal=HUP --kill-whom=main chatproto.service" in snippet
        user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
        snippet = (
            snippet.replace("/var/log/chatproto/chat.log", str(log))
            .replace("create 0600 chatproto chatproto", f"create 0600 {user} {group}")
            .replace(
                "systemctl kill --signal=HUP --kill-whom=main chatproto.service", f"kill -HUP {proc.pid}"
            )
        )
        conf = tmp_path / "logrotate.conf"
        conf.write_text(snippet)
        done = subprocess.run(
            ["logrotate", "--force", "--state", str(tmp_path / "state"), str(conf)],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for_text(log, "SIGHUP: reopened the log file")
        assert "chatproto listening on" in (logs / "chat.log.1").read_text()
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(DEADLINE)
    assert code in (0, -signal.SIGTERM)
    assert "chatproto stopped in" in log.read_text()
