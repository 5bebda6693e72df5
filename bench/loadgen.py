"""The load generator: raw non-blocking sockets on one epoll, pre-built frames, byte counting.

Nothing here parses a frame on the throughput path. A sender is a socket and
a pre-built block of frames that it writes ``repeat`` times; a receiver is a
socket whose incoming bytes are counted (or, for line protocols, whose
newlines are counted with ``bytearray.count``, which runs in C). Only the
latency workload looks inside what it receives, and only for the send time
that the sender wrote into the text.

Every loop here is bounded by a deadline.
"""

from __future__ import annotations

import errno
import re
import select
import socket
import time

RECV_SIZE = 1 << 20
SEND_CHUNK = 1 << 20
EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT


class BenchError(Exception):
    """A setup step or a run did not complete: the figure would be wrong."""


def dial(port: int, count: int, timeout: float = 10.0) -> list[socket.socket]:
    """``count`` connected, non-blocking TCP sockets to 127.0.0.1:port.

    Callers keep ``count`` at or under the server's listen backlog and finish
    an exchange on them before dialling more, so that no SYN is dropped.
    """
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks.append(s)
    return socks


def send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
            view = view[sent:]
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise BenchError("send timed out") from None
            select.select([], [sock], [], 0.5)


def exchange(socks, payloads, until, timeout: float = 60.0) -> list[bytearray]:
    """Send each socket its payload, then read until each has what it waits for.

    ``until`` (one for all, or one per socket) is a byte count or a marker
    that must appear in what was read. Returns what each socket read.
    """
    n = len(socks)
    if not isinstance(payloads, list):
        payloads = [payloads] * n
    if not isinstance(until, list):
        until = [until] * n
    deadline = time.monotonic() + timeout
    for sock, payload in zip(socks, payloads, strict=True):
        if payload:
            send_all(sock, payload, deadline)
    got = [bytearray() for _ in socks]
    by_fd = {s.fileno(): i for i, s in enumerate(socks)}
    waiting = set(range(n))

    def satisfied(i):
        want = until[i]
        if isinstance(want, int):
            return len(got[i]) >= want
        return want in got[i]

    waiting = {i for i in waiting if not satisfied(i)}
    ep = select.epoll()
    try:
        for i in waiting:
            ep.register(socks[i].fileno(), EPOLLIN)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                sample = bytes(got[next(iter(waiting))][-200:])
                raise BenchError(f"setup timed out: {len(waiting)} of {n} sockets still waiting ({sample!r})")
            for fd, _ in ep.poll(min(left, 1.0)):
                i = by_fd[fd]
                try:
                    data = socks[i].recv(RECV_SIZE)
                except BlockingIOError:
                    continue
                except ConnectionError as e:
                    raise BenchError(f"connection reset during setup: {e}") from None
                if not data:
                    raise BenchError(f"connection closed during setup after {bytes(got[i][-200:])!r}")
                got[i] += data
                if i in waiting and satisfied(i):
                    waiting.discard(i)
                    ep.unregister(fd)
    finally:
        ep.close()
    return got


def open_clients(port, count, hello, until, batch=50, timeout=120.0):
    """Dial ``count`` clients in batches, each greeting with ``hello(i)`` and waiting for ``until``.

    Returns (sockets, what each read). Batches stay under the listen backlog.
    """
    deadline = time.monotonic() + timeout
    socks, replies = [], []
    for start in range(0, count, batch):
        if time.monotonic() > deadline:
            raise BenchError("opening clients timed out")
        group = dial(port, min(batch, count - start))
        hellos = [hello(start + j) for j in range(len(group))]
        got = exchange(group, hellos, until, timeout=max(1.0, deadline - time.monotonic()))
        socks += group
        replies += got
    return socks, replies


class Stream:
    """One socket in a run: what it still has to send, and what it has received."""

    __slots__ = ("sock", "view", "off", "repeat", "got", "need", "lines", "done_at", "closed")

    def __init__(self, sock, block=b"", repeat=0, need=0, lines=False):
        self.sock = sock
        self.view = memoryview(block)
        self.off = 0
        self.repeat = repeat if block else 0
        self.got = 0
        #: Bytes (or lines) this stream must receive before it is done; 0: no target.
        self.need = need
        self.lines = lines
        self.done_at = 0.0
        self.closed = False


def pump(streams: list[Stream], timeout: float) -> tuple[float, float, list[Stream]]:
    """Send every block, count every byte, until every stream with a target has it.

    Returns (start, end, unfinished): start just before the first send, end at
    the read that completed the last target.
    """
    ep = select.epoll()
    buf = bytearray(RECV_SIZE)
    table = {}
    waiting = 0
    for st in streams:
        mask = EPOLLIN
        if st.repeat:
            mask |= EPOLLOUT
        fd = st.sock.fileno()
        table[fd] = st
        ep.register(fd, mask)
        if st.need and st.got < st.need:
            waiting += 1
    start = end = time.perf_counter()
    deadline = time.monotonic() + timeout
    poll = ep.poll
    try:
        while waiting:
            if time.monotonic() > deadline:
                break
            for fd, ev in poll(0.5):
                st = table[fd]
                if ev & EPOLLIN or ev & (select.EPOLLHUP | select.EPOLLERR):
                    try:
                        n = st.sock.recv_into(buf)
                    except BlockingIOError:
                        n = -1
                    except ConnectionError:
                        n = 0
                    if n == 0:
                        st.closed = True
                        ep.unregister(fd)
                        if st.need and st.got < st.need:
                            waiting -= 1
                        continue
                    if n > 0:
                        before = st.got
                        st.got += buf.count(b"\n", 0, n) if st.lines else n
                        if st.need and before < st.need <= st.got:
                            st.done_at = end = time.perf_counter()
                            waiting -= 1
                if ev & EPOLLOUT and st.repeat:
                    view = st.view
                    try:
                        n = st.sock.send(view[st.off : st.off + SEND_CHUNK])
                    except BlockingIOError:
                        continue
                    except ConnectionError:
                        st.closed = True
                        st.repeat = 0
                        ep.modify(fd, EPOLLIN)
                        continue
                    st.off += n
                    if st.off >= len(view):
                        st.off = 0
                        st.repeat -= 1
                        if not st.repeat:
                            ep.modify(fd, EPOLLIN)
    finally:
        ep.close()
    unfinished = [st for st in streams if st.need and st.got < st.need]
    return start, end, unfinished


def settle(streams: list[Stream], timeout: float) -> list[Stream]:
    """Keep reading until every stream with a target has it (acks after the timed part)."""
    for st in streams:
        st.repeat = 0
    _, _, unfinished = pump(streams, timeout)
    return unfinished


STAMP = re.compile(rb"T(\d{19})")


def stamped_text(seq: int, now_ns: int, width: int) -> bytes:
    """A text of exactly ``width`` ASCII bytes carrying the send time (ns) and a sequence number."""
    head = b"T%019d#%010d " % (now_ns, seq)
    return head + b"x" * (width - len(head))


def paced(senders, receivers, rate: float, duration: float, drain: float = 10.0) -> dict:
    """Offer ``rate`` messages per second for ``duration`` seconds, round robin over ``senders``.

    ``senders`` is a list of (socket, make) where make(seq, now_ns) returns the
    bytes to send; each message's text carries its send time, and receivers
    (plain sockets) scan for it. Extra sockets whose input must be drained
    (acks) can be given as receivers too: they hold no stamps.
    Returns latencies in ms, how many were sent, and the generator's lag.
    """
    ep = select.epoll()
    count = len(senders)
    backlog: dict[int, bytearray] = {}
    sender_fd = [s.fileno() for s, _ in senders]
    sender_by_fd = {s.fileno(): s for s, _ in senders}
    tails: dict[int, bytes] = {}
    recv_by_fd = {}
    for sock in receivers:
        recv_by_fd[sock.fileno()] = sock
        tails[sock.fileno()] = b""
    for fd in set(recv_by_fd) | set(sender_by_fd):
        ep.register(fd, EPOLLIN)
    lat = []
    # One buffer for every read: recv(RECV_SIZE) would allocate (and fault in)
    # a MiB a call, ~25 us, which at 10,000 msg/s made the generator the queue.
    buf = bytearray(RECV_SIZE)
    now = time.perf_counter_ns
    start = now()
    end_send = start + int(duration * 1e9)
    interval = 1e9 / rate
    sent = 0
    max_lag = 0
    hard_deadline = time.monotonic() + duration + drain
    try:
        while True:
            t = now()
            if t < end_send:
                due = min(int((t - start) / interval) + 1, int(duration * rate))
                if due - sent > 0:
                    max_lag = max(max_lag, t - (start + int(sent * interval)))
                while sent < due:
                    sock, make = senders[sent % count]
                    fd = sender_fd[sent % count]
                    frame = make(sent, now())
                    sent += 1
                    pend = backlog.get(fd)
                    if pend:
                        pend += frame
                        continue
                    try:
                        n = sock.send(frame)
                    except BlockingIOError:
                        n = 0
                    if n < len(frame):
                        backlog[fd] = bytearray(frame[n:])
                        ep.modify(fd, EPOLLIN | EPOLLOUT)
                wait = max(0.0, (start + sent * interval - now()) / 1e9)
            else:
                if len(lat) >= sent or time.monotonic() > hard_deadline:
                    break
                wait = 0.05
            for fd, ev in ep.poll(min(wait, 0.001)):
                if ev & EPOLLOUT:
                    pend = backlog.get(fd)
                    if pend:
                        try:
                            n = sender_by_fd[fd].send(pend)
                        except BlockingIOError:
                            n = 0
                        del pend[:n]
                    if not pend:
                        backlog.pop(fd, None)
                        ep.modify(fd, EPOLLIN)
                if ev & EPOLLIN:
                    sock = recv_by_fd.get(fd) or sender_by_fd[fd]
                    try:
                        n = sock.recv_into(buf)
                    except BlockingIOError:
                        continue
                    if not n:
                        ep.unregister(fd)
                        continue
                    if fd not in tails:
                        continue
                    got_at = now()
                    data = tails[fd] + buf[:n]
                    last = 0
                    for m in STAMP.finditer(data):
                        lat.append((got_at - int(m.group(1))) / 1e6)
                        last = m.end()
                    tails[fd] = data[max(last, len(data) - 20) :]
    finally:
        ep.close()
    return {"latencies": lat, "sent": sent, "max_lag_ms": max_lag / 1e6}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def self_talk(pairs: int, messages: int, frame_len: int = 256, timeout: float = 60.0) -> float:
    """The generator against itself: a listener in this process accepts each sender.

    The accepted end is the receiver. The same pump, the same block size, no
    server: the rate it reaches is the most the generator could ever measure.
    """
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1024)
    port = lst.getsockname()[1]
    streams = []
    socks = []
    try:
        per = messages // pairs
        block, repeat = block_of(lambda seq: b"05" + b"%0*d" % (frame_len - 2, seq), per, 1024)
        for _ in range(pairs):
            s = dial(port, 1)[0]
            r, _ = lst.accept()
            r.setblocking(False)
            socks += [s, r]
            streams.append(Stream(s, block, repeat))
            streams.append(Stream(r, need=len(block) * repeat))
        start, end, unfinished = pump(streams, timeout)
        if unfinished:
            raise BenchError("self-talk did not finish")
        return per * pairs / (end - start)
    finally:
        for s in socks:
            s.close()
        lst.close()


def block_of(make, count: int, distinct: int | None = None) -> tuple[bytes, int]:
    """``count`` frames as (block, repeat): ``distinct`` different frames sent count/distinct times.

    With ``distinct`` None every frame is different (needed when the server
    drops repeats, as ours does by the contract's message identity).
    """
    if distinct is None or distinct >= count:
        return b"".join(make(i) for i in range(count)), 1
    while count % distinct:
        distinct -= 1
    return b"".join(make(i) for i in range(distinct)), count // distinct


def close_all(socks) -> None:
    for s in socks:
        try:
            s.close()
        except OSError as e:
            if e.errno != errno.EBADF:
                raise


# Blocking helpers for setting up a run (the database-growth benchmarks).


def read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(1 << 20, size - got))
        if not chunk:
            raise RuntimeError("the server closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def register(port: int, count: int) -> list[bytes]:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"01" * count)
        data = read_exactly(s, 15 * count)
    return [data[i + 2 : i + 15] for i in range(0, len(data), 15)]


def login(port: int, user: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"03" + user)
    assert read_exactly(s, 15) == b"04" + user
    return s
