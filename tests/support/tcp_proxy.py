"""A small threaded TCP proxy on a free loopback port, for fault tests (STYLE.md, "Tests").

Put it in front of Redis or PostgreSQL and point the product at `proxy.port`; then

    proxy.cut()        drop every open connection (the client sees a reset / EOF)
    proxy.refuse()     stop listening: new connections are refused at once
    proxy.partition()  refuse() + cut(): the server is unreachable
    proxy.stall()      accept and keep connections but forward nothing, either way (a hung server)
    proxy.heal()       undo all of the above: listen again (same port) and forward
    proxy.hold()       like stall(), but what a client sent before giving up is kept, not lost: when
                       the client closes its end (a timeout), the server's end stays open;
                       hold(only_open=True) holds the connections open now and lets new ones through
                       (the client reconnects over a path that works)
    proxy.deliver()    end a hold: forward everything held, late, as TCP does once a path recovers;
                       a link whose client had closed is then half-closed towards the server, which
                       runs what it received. proxy.late_deliveries counts the links whose bytes
                       reached the server after their client had given up
    proxy.answer(request, reply)
                       reply to a request that arrives alone and is exactly `request` bytes
                       instead of forwarding it (an older server's answer to a newer command);
                       proxy.answered counts those replies

Use it as a context manager or call close().
"""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import termios
import threading
import time
from typing import Optional


def _hard_close(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a dropped network path or a crashed peer looks to the client."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()
        # Set by deliver(): how many bytes from the client waited in the hold, how many of them went on,
        # and when. Only those count as late; a client that sends more after them had not given up.
        self.held = 0
        self.late_bytes = 0
        self.released_at = 0.0
        self.on_hold = False

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            _hard_close(self.client)
            _hard_close(self.upstream)


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1", listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._stalled = threading.Event()
        self._answers: dict[bytes, bytes] = {}
        self.answered = 0
        self._closing = threading.Event()
        self._listener: Optional[socket.socket] = None
        self._accept_thread: Optional[threading.Thread] = None
        self.port = 0
        self.connections_accepted = 0
        self.late_deliveries = 0
        self._holding = threading.Event()
        self._listen()

    # -- public --------------------------------------------------------------------------------------

    def url(self, scheme: str = "redis", path: str = "/0", auth: str = "") -> str:
        return f"{scheme}://{auth}127.0.0.1:{self.port}{path}"

    def cut(self) -> None:
        """Drop every open connection (new ones are still accepted unless refuse() was called)."""
        with self._lock:
            links = list(self._links)
            self._links.clear()
        for link in links:
            link.close()

    def refuse(self) -> None:
        """Stop listening: connecting to the port is refused. Open connections are left alone."""
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            _hard_close(listener)
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
            self._accept_thread = None

    def partition(self) -> None:
        self.refuse()
        self.cut()

    def stall(self) -> None:
        """Forward nothing, either way, on open and new connections, until heal()."""
        self._stalled.set()

    def hold(self, only_open: bool = False) -> None:
        """Forward nothing, either way, until deliver() (or heal()); keep what clients send meanwhile.
        `only_open`: hold the connections open now; new ones are forwarded as usual."""
        if only_open:
            with self._lock:
                for link in self._links:
                    link.on_hold = True
        else:
            self._holding.set()

    def deliver(self) -> None:
        """Forward what was held (see hold()) and go on forwarding."""
        now = time.monotonic()
        with self._lock:
            for link in self._links:
                link.on_hold = False
                try:
                    link.held = struct.unpack("i", fcntl.ioctl(link.client, termios.FIONREAD, b"\0\0\0\0"))[0]
                except OSError:
                    link.held = 0
                link.released_at = now
        self._holding.clear()

    def heal(self) -> None:
        self._stalled.clear()
        with self._lock:
            on_hold = any(link.on_hold for link in self._links)
        if self._holding.is_set() or on_hold:
            self.deliver()
        if self._listener is None and not self._closing.is_set():
            self._listen()

    def answer(self, request: bytes, reply: bytes) -> None:
        """From now on, reply `reply` to a client read that is exactly `request`, without forwarding it."""
        with self._lock:
            self._answers[request] = reply

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._links)

    def close(self) -> None:
        self._closing.set()
        self._stalled.clear()
        self.refuse()
        self.cut()

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TcpProxy 127.0.0.1:{self.port} -> {self.target[0]}:{self.target[1]}>"

    # -- internals -----------------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.listen_host, self.port))  # port 0 the first time; the same port after refuse()
        listener.listen(128)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, args=(listener,), daemon=True)
        self._accept_thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _hard_close(client)  # the server behind is down: so is the proxy's connection
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, upstream)
            with self._lock:
                self._links.add(link)
                self.connections_accepted += 1
            threading.Thread(target=self._pump, args=(link,), daemon=True).start()

    # The pump's pace: how long it waits while a link is held, how long select() waits for data, and
    # how much it reads at once. Subclasses tune them.
    hold_wait, select_wait, chunk = 0.02, 0.05, 65536
    # Check the hold again between select() and each read (a partition that must take hold at once).
    recheck_hold = False

    def _held(self, link: _Link) -> bool:
        """Whether `link` forwards nothing now: its bytes wait in the kernel buffers, and the peer sees
        a server that never answers. Subclasses hold more (one kind of link, say)."""
        return self._stalled.is_set() or self._holding.is_set() or link.on_hold

    def _forward(self, link: _Link, sock: socket.socket, data: bytes) -> None:
        """Passes `data`, read from `sock`, to the other end (or the canned reply of `answer()`)."""
        with self._lock:
            reply = self._answers.get(data) if sock is link.client else None
            if reply is not None:
                self.answered += 1
        if reply is not None:
            link.client.sendall(reply)
        else:
            (link.upstream if sock is link.client else link.client).sendall(data)

    def _dropped(self, link: _Link) -> None:
        """Forgets a link that ended; called with the lock held."""
        self._links.discard(link)

    def _late_end(self, link: _Link) -> None:
        """The client had given up on bytes delivered late: the server gets them and an orderly end
        (as the client's FIN would have reached it), and runs them before it reads that end."""
        with self._lock:
            self.late_deliveries += 1
        try:
            link.upstream.shutdown(socket.SHUT_WR)
            link.upstream.settimeout(2.0)
            while link.upstream.recv(self.chunk):
                pass  # the replies: nobody is left to read them
        except OSError:
            pass

    def _pump(self, link: _Link) -> None:
        peers = {link.client: link.upstream, link.upstream: link.client}
        try:
            while not link.closed.is_set():
                if self._held(link):
                    link.closed.wait(self.hold_wait)
                    continue
                readable, _, _ = select.select(list(peers), [], [], self.select_wait)
                for sock in readable:
                    holding = self._holding.is_set() or link.on_hold  # a hold takes hold at once
                    if (self.recheck_hold or holding) and self._held(link):
                        break  # held between select and recv: leave the bytes where they are
                    data = sock.recv(self.chunk)
                    if not data:
                        if sock is link.client and link.late_bytes and time.monotonic() - link.released_at < 1.0:
                            self._late_end(link)
                        return
                    if sock is link.client:
                        if link.held > 0:
                            link.late_bytes += min(len(data), link.held)
                            link.held -= min(len(data), link.held)
                        else:
                            link.late_bytes = 0  # the client sent more: it was still there
                    self._forward(link, sock, data)
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._dropped(link)
            link.close()
