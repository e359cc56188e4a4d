"""
Plain-socket clients for the measurements wrk cannot make: time to first
byte, and a client that reads a large answer slowly.
"""

from __future__ import annotations

import socket
import time

import attr


def requestBytes(port: int, path: str, body: bytes, token: str | None) -> bytes:
    """
    A POST request for C{path} that asks the server to close the connection
    after answering.
    """
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def statusOf(head: bytes) -> int:
    """
    The status code in the first line of a response, or 0 if there is none.
    """
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return 0


@attr.frozen
class FirstByte:
    seconds: float  # from sending the request to its first byte of answer
    status: int
    size: int  # bytes received in all, head included


def firstByte(port: int, path: str, body: bytes, token: str | None, *, timeout: float = 10.0) -> FirstByte:
    """
    Send one request on a new connection; time its first answer byte, then
    read the answer to its end.
    """
    request = requestBytes(port, path, body, token)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        s.sendall(request)
        first = s.recv(65536)
        arrived = time.perf_counter()
        size = len(first)
        deadline = started + timeout
        while time.perf_counter() < deadline:
            data = s.recv(65536)
            if not data:
                break
            size += len(data)
    return FirstByte(arrived - started, statusOf(first), size)


class ChunkCounter:
    """
    Counts the payload bytes of a body sent with chunked transfer coding,
    fed as it arrives in pieces of any size; C{ended} once the last chunk
    arrived.
    """

    def __init__(self):
        self.payload = 0
        self.ended = False
        self._line = b""  # a size line being read
        self._left = 0  # payload bytes left in the current chunk
        self._crlf = 0  # bytes of the CRLF after a chunk left to skip

    def feed(self, data: bytes) -> None:
        position = 0
        while position < len(data) and not self.ended:
            if self._left:
                taken = min(self._left, len(data) - position)
                self.payload += taken
                self._left -= taken
                position += taken
                if not self._left:
                    self._crlf = 2
            elif self._crlf:
                taken = min(self._crlf, len(data) - position)
                self._crlf -= taken
                position += taken
            else:
                end = data.find(b"\n", position)
                if end < 0:
                    self._line += data[position:]
                    return
                line = (self._line + data[position:end]).strip()
                self._line = b""
                position = end + 1
                size = int(line.split(b";", 1)[0], 16)
                if size == 0:
                    self.ended = True
                else:
                    self._left = size


@attr.s(auto_attribs=True)
class SlowRead:
    """
    The progress of a slow reader; C{done} once it stopped.  C{bodyBytes}
    counts the payload, without chunked framing.
    """

    received: int = 0
    bodyBytes: int = 0
    status: int = 0
    chunked: bool = False
    seconds: float = 0.0
    complete: bool = False
    done: bool = False
    error: str | None = None


def slowRead(
    port: int,
    path: str,
    body: bytes,
    token: str | None,
    *,
    expected: int,
    chunk: int = 65536,
    pause: float = 0.01,
    deadline: float = 90.0,
    progress: SlowRead | None = None,
) -> SlowRead:
    """
    Ask for C{path} and read the answer C{chunk} bytes at a time with a
    C{pause} after each read, for at most C{deadline} seconds: at most
    C{chunk / pause} bytes per second, far below what a proxy can send.

    The receive buffer is kept small so that the client's slowness reaches
    the proxy quickly.
    """
    state = progress or SlowRead()
    started = time.monotonic()
    head = b""
    chunks = None

    def count(data):
        if chunks is None:
            state.bodyBytes += len(data)
        else:
            chunks.feed(data)
            state.bodyBytes = chunks.payload

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            s.settimeout(10.0)
            s.connect(("127.0.0.1", port))
            s.sendall(requestBytes(port, path, body, token))
            while time.monotonic() - started < deadline:
                data = s.recv(chunk)
                if not data:
                    break
                state.received += len(data)
                if not state.status:
                    head += data
                    end = head.find(b"\r\n\r\n")
                    if end >= 0:
                        state.status = statusOf(head)
                        state.chunked = isChunked(head[:end])
                        if state.chunked:
                            chunks = ChunkCounter()
                        count(head[end + 4 :])
                        head = b""
                else:
                    count(data)
                time.sleep(pause)
    except Exception as e:
        state.error = f"{type(e).__name__}: {e}"
    finally:
        state.seconds = time.monotonic() - started
        state.complete = (
            state.status == 200
            and state.bodyBytes == expected
            and (chunks is None or chunks.ended)
        )
        state.done = True
    return state


def isChunked(head: bytes) -> bool:
    """
    Whether a response head declares chunked transfer coding.
    """
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            return True
    return False
