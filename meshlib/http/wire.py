"""HTTP/1.1 message framing for the mesh's own client connections, sans I/O.

The sync and async connections (``meshlib/http/backends/``) only move bytes; everything about
the protocol lives here, as in h11, but only what a client talking to mesh endpoints
needs (RFC 9112):

* request head: ``METHOD target HTTP/1.1`` + header lines; the body is framed by the
  ``Content-Length`` or ``Transfer-Encoding: chunked`` header httpx already put on the
  request;
* response head: status line and header fields, at most 64 KiB; interim 1xx responses
  (other than 101) are skipped by the caller;
* response body (RFC 9112 section 6.3): none for HEAD and 1xx / 204 / 304; chunked when
  the last transfer coding is ``chunked``; until the server closes the connection when
  another transfer coding is last; else ``Content-Length`` bytes (``1*DIGIT``; differing
  or invalid values are an error); else until the server closes the connection;
* reuse: only when the body was read to its end, neither side sent ``Connection: close``
  and the server spoke HTTP/1.1 (or HTTP/1.0 with keep-alive).

Malformed input raises ``httpx.RemoteProtocolError`` naming what was wrong, so errors look
the same as with httpx's own transport.
"""

from __future__ import annotations

import httpx

CRLF = b"\r\n"
HEADER_END = b"\r\n\r\n"
MAX_HEAD = 64 * 1024
_HEX = b"0123456789abcdefABCDEF"

NEED_DATA = object()  # the parser needs more bytes
END = object()  # the body is complete


def encode_head(
    method: str, target: bytes, headers: list[tuple[bytes, bytes]]
) -> tuple[list[bytes], bool, bool]:
    """Request head parts (to be joined), whether the body is chunked, whether the
    client asked to close the connection."""
    chunked = False
    close = False
    parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        if len(name) in (10, 17):
            lname = name.lower()
            if lname == b"transfer-encoding" and value.lower().endswith(b"chunked"):
                chunked = True
            elif lname == b"connection" and b"close" in value.lower():
                close = True
        parts += (name, b": ", value, CRLF)
    parts.append(CRLF)
    return parts, chunked, close


def encode_chunk(part: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(part), part)


LAST_CHUNK = b"0\r\n\r\n"


def request_bytes(
    method: str, target: bytes, headers: list[tuple[bytes, bytes]], stream: object
) -> tuple[bytes, bool, bool, bool]:
    """(bytes to write first, body still to stream?, chunked?, client asked to close?).

    An in-memory body (``httpx.ByteStream``) is written together with the head, framed as
    the request's headers say; any other stream is sent after it, part by part."""
    parts, chunked, close = encode_head(method, target, headers)
    if isinstance(stream, httpx.ByteStream):
        body = stream._stream
        if chunked:
            parts.append((encode_chunk(body) if body else b"") + LAST_CHUNK)
        elif body:
            parts.append(body)
        return b"".join(parts), False, chunked, close
    return b"".join(parts), True, chunked, close


def take_head(buf: bytearray, eof: bool) -> bytes | None:
    """Remove and return one complete response head from ``buf`` (None: need more data)."""
    i = buf.find(HEADER_END)
    if i < 0:
        if len(buf) > MAX_HEAD:
            raise httpx.RemoteProtocolError("response head larger than 64 KiB")
        if eof:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return None
    if i > MAX_HEAD:  # the whole oversized head may arrive in one read
        raise httpx.RemoteProtocolError("response head larger than 64 KiB")
    head = bytes(buf[:i])
    del buf[: i + 4]
    return head


def parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    lines = head.split(CRLF)
    status_line = lines[0]
    try:
        version, code = status_line.split(b" ", 2)[:2]
        status = int(code)
    except ValueError:
        raise httpx.RemoteProtocolError(f"malformed status line {status_line[:80]!r}") from None
    if not version.startswith(b"HTTP/1.") or not 100 <= status <= 999:
        raise httpx.RemoteProtocolError(f"malformed status line {status_line[:80]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise httpx.RemoteProtocolError(f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip()))
    return status, version, headers


def framing(
    method: str, status: int, version: bytes, headers: list[tuple[bytes, bytes]]
) -> tuple[BodyReader, bool]:
    """The body reader for a response, and whether the server wants the connection closed."""
    length = -1
    chunked = False
    coded = False  # a Transfer-Encoding header was present
    close = version == b"HTTP/1.0"
    for name, value in headers:
        n = len(name)
        if n == 14 and name.lower() == b"content-length":
            # 1*DIGIT (RFC 9110 8.6); int() alone would take "+5", "1_0", " 5"
            if not value.isdigit() or (length >= 0 and int(value) != length):
                raise httpx.RemoteProtocolError(f"invalid Content-Length {value!r}")
            length = int(value)
        elif n == 17 and name.lower() == b"transfer-encoding":
            chunked = value.lower().rstrip().endswith(b"chunked")
            coded = True
        elif n == 10 and name.lower() == b"connection":
            v2 = value.lower()
            if b"close" in v2:
                close = True
            elif b"keep-alive" in v2 and version == b"HTTP/1.0":
                close = False
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return BodyReader("none", 0), close
    if chunked:
        return BodyReader("chunked", 0), close
    if length >= 0 and not coded:
        return BodyReader("length", length), close
    return BodyReader("close", 0), True


class BodyReader:
    """Decodes a response body from a byte buffer, one chunk per call of :meth:`next`."""

    __slots__ = ("mode", "remaining", "state", "done")

    def __init__(self, mode: str, length: int) -> None:
        self.mode = mode  # "none" | "length" | "chunked" | "close"
        self.remaining = length
        self.state = 0  # chunked: 0 = expecting size line, 1 = in data, 2 = trailers
        self.done = mode == "none" or (mode == "length" and length == 0)

    def next(self, buf: bytearray, eof: bool) -> object:
        """A ``bytes`` chunk, ``NEED_DATA`` or ``END``; consumes what it returns."""
        if self.done:
            return END
        mode = self.mode
        if mode == "length":
            if not buf:
                if eof:
                    raise httpx.RemoteProtocolError(
                        f"server closed the connection with {self.remaining} body bytes to come"
                    )
                return NEED_DATA
            n = len(buf) if len(buf) < self.remaining else self.remaining
            chunk = bytes(buf[:n])
            del buf[:n]
            self.remaining -= n
            if self.remaining == 0:
                self.done = True
            return chunk
        if mode == "chunked":
            return self._chunked(buf, eof)
        # close-delimited
        if buf:
            chunk = bytes(buf)
            buf.clear()
            return chunk
        if eof:
            self.done = True
            return END
        return NEED_DATA

    def _chunked(self, buf: bytearray, eof: bool) -> object:
        while True:
            if self.state == 1:
                if len(buf) < self.remaining + 2:
                    if eof:
                        raise httpx.RemoteProtocolError("server closed the connection in a chunk")
                    return NEED_DATA
                n = self.remaining
                if buf[n:n + 2] != CRLF:
                    raise httpx.RemoteProtocolError("chunk data not followed by CRLF")
                chunk = bytes(buf[:n])
                del buf[: n + 2]
                self.state = 0
                return chunk
            i = buf.find(CRLF)
            if i < 0:
                if eof:
                    raise httpx.RemoteProtocolError("server closed the connection in a chunk")
                if len(buf) > MAX_HEAD:
                    raise httpx.RemoteProtocolError("chunk size line too long")
                return NEED_DATA
            line = bytes(buf[:i])
            del buf[: i + 2]
            if self.state == 2:  # trailer section: ends with an empty line
                if not line:
                    self.done = True
                    return END
                continue
            digits = line.split(b";", 1)[0].strip()
            # 1*HEXDIG (RFC 9112 7.1); int(, 16) alone would take "-5", "+5", "0x5", "1_0"
            if not digits or digits.strip(_HEX):
                raise httpx.RemoteProtocolError(f"invalid chunk size line {line[:40]!r}")
            size = int(digits, 16)
            if size == 0:
                self.state = 2
                continue
            self.remaining = size
            self.state = 1
