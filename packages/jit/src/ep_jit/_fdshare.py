"""Passing file descriptors between the processes of one host (Unix socket, SCM_RIGHTS).

CUDA exports a ``cuMemCreate`` allocation as a POSIX file descriptor; another process of the same
host imports it after receiving a duplicate of that descriptor. ``SCM_RIGHTS`` over a Unix socket
needs no ptrace rights (``pidfd_getfd`` does), so it works between unrelated ranks and inside
containers.

Each rank listens on an abstract-namespace socket (no file to clean up) whose name carries a
random token that only the members of the process group learn, serves its descriptors to every
peer from a thread, and fetches the peers' descriptors from the main thread.
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import threading
import time

__all__ = ["FdServer", "fetch_fds", "new_address"]

_HELLO = struct.Struct("<i")


def new_address(rank: int) -> str:
    """A fresh abstract socket name for ``rank`` (the leading NUL marks the abstract namespace)."""
    return f"\0ep_jit.fds.{os.getpid()}.{rank}.{secrets.token_hex(16)}"


class FdServer:
    """Serves ``fds`` to ``num_clients`` connections, one after another, on a thread.

    Each client sends its rank as 4 bytes and receives the descriptors with a one-byte message.

    Args:
        address: Abstract socket name from :func:`new_address`.
        fds: Descriptors to send (duplicated by the kernel on receipt; they stay open here).
        num_clients: Connections to serve before the thread ends.
        timeout_s: Limit for the whole service.
    """

    def __init__(self, address: str, fds: list[int], num_clients: int, timeout_s: float) -> None:
        """Binds and starts listening at once, so clients may connect before ``start``."""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(address)
        self._sock.listen(max(num_clients, 1))
        self._fds = list(fds)
        self._num_clients = num_clients
        self._timeout_s = timeout_s
        self.served: list[int] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="ep_jit-fdserver", daemon=True)

    def start(self) -> None:
        """Starts serving on the thread."""
        self._thread.start()

    def _serve(self) -> None:
        deadline = time.monotonic() + self._timeout_s
        try:
            while len(self.served) < self._num_clients:
                self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
                conn, _ = self._sock.accept()
                with conn:
                    conn.settimeout(max(deadline - time.monotonic(), 0.001))
                    hello = _recv_exact(conn, _HELLO.size)
                    socket.send_fds(conn, [b"\1"], self._fds)
                    self.served.append(_HELLO.unpack(hello)[0])
        except BaseException as exc:  # reported by join()
            self.error = exc

    def close(self) -> None:
        """Closes the listening socket without serving (construction failed elsewhere)."""
        self._sock.close()

    def join(self) -> None:
        """Waits for the thread and closes the socket.

        Raises:
            TimeoutError: Not every client came within the timeout (names who came).
        """
        self._thread.join(self._timeout_s + 1.0)
        self._sock.close()
        if self.error is not None or len(self.served) < self._num_clients:
            raise TimeoutError(
                f"descriptor exchange: {len(self.served)} of {self._num_clients} peers fetched "
                f"this rank's handles within {self._timeout_s:g} s (served ranks "
                f"{sorted(self.served)}): {self.error!r}"
            )


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        data += chunk
    return data


def fetch_fds(address: str, rank: int, count: int, timeout_s: float) -> list[int]:
    """Connects to a peer's :class:`FdServer` and returns the ``count`` descriptors it sends.

    Retries the connection until the deadline (the peer may not be listening yet).

    Raises:
        TimeoutError: No connection or no descriptors within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                conn.connect(address)
                conn.sendall(_HELLO.pack(rank))
                _, fds, _, _ = socket.recv_fds(conn, 1, count)
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                last = exc
                time.sleep(0.01)
                continue
            if len(fds) != count:
                for fd in fds:
                    os.close(fd)
                raise ConnectionError(f"expected {count} descriptors, received {len(fds)}")
            return list(fds)
    raise TimeoutError(f"no descriptors from {address[1:]!r} within {timeout_s:g} s: {last!r}")
