"""Sans-I/O HTTP/1.1 framing of the mesh's own connections (``meshlib.http.wire``).

Table-driven: request heads, response heads, the body-length rules of RFC 9112 section 6.3
and the chunked decoder. Every body case is decoded once per way of cutting its bytes
(each single cut point, byte by byte, all at once), the way TCP may deliver them, so a
parser that only works when a size line or a CRLF arrives whole fails here.
"""

from __future__ import annotations

import httpx
import pytest

from meshlib.http.wire import (
    END,
    LAST_CHUNK,
    MAX_HEAD,
    NEED_DATA,
    BodyReader,
    encode_chunk,
    encode_head,
    framing,
    parse_head,
    take_head,
)

# --------------------------------------------------------------------------- helpers


def cuttings(data: bytes) -> list[list[bytes]]:
    """Every way the tests deliver ``data``: whole, at each single cut point, byte by byte."""
    ways = [[data]]
    ways += [[data[:i], data[i:]] for i in range(1, len(data))]
    ways.append([data[i:i + 1] for i in range(len(data))])
    return ways


def decode(reader: BodyReader, pieces: list[bytes], eof_at_end: bool) -> tuple[bytes, bytes]:
    """Feed ``pieces`` to ``reader`` like a connection does, one piece per NEED_DATA;
    (body, bytes not consumed)."""
    buf = bytearray()
    out = bytearray()
    feed = list(pieces)
    eof = False
    while True:
        item = reader.next(buf, eof)
        if item is END:
            return bytes(out), bytes(buf) + b"".join(feed)
        if item is NEED_DATA:
            if feed:
                buf += feed.pop(0)
            elif eof_at_end and not eof:
                eof = True
            else:
                raise AssertionError(f"reader wants more data after all of {pieces!r}")
            continue
        assert isinstance(item, bytes) and item, f"reader returned {item!r}"
        out += item


def head_of(raw: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    buf = bytearray(raw)
    head = take_head(buf, False)
    assert head is not None
    return parse_head(head)


# --------------------------------------------------------------------------- request head


def test_encode_head_keeps_method_target_and_header_order():
    headers = [(b"Host", b"orders"), (b"X-B", b"2"), (b"Accept", b"*/*"), (b"X-A", b"1")]
    parts, chunked, close = encode_head("GET", b"/a/b?x=1&y=%20", headers)
    assert b"".join(parts) == (
        b"GET /a/b?x=1&y=%20 HTTP/1.1\r\nHost: orders\r\nX-B: 2\r\nAccept: */*\r\nX-A: 1\r\n\r\n"
    )
    assert (chunked, close) == (False, False)


@pytest.mark.parametrize(
    ("headers", "chunked", "close"),
    [
        ([(b"Transfer-Encoding", b"chunked")], True, False),
        ([(b"transfer-encoding", b"gzip, Chunked")], True, False),
        ([(b"Transfer-Encoding", b"gzip")], False, False),
        ([(b"Content-Length", b"5")], False, False),
        ([(b"Connection", b"close")], False, True),
        ([(b"connection", b"Keep-Alive, Close")], False, True),
        ([(b"Connection", b"keep-alive")], False, False),
        ([(b"X-Connection", b"close"), (b"X-Transfer-Encodin", b"chunked")], False, False),
        ([(b"Transfer-Encoding", b"chunked"), (b"Connection", b"close")], True, True),
    ],
)
def test_encode_head_detects_chunked_and_close(headers, chunked, close):
    _, got_chunked, got_close = encode_head("POST", b"/", headers)
    assert (got_chunked, got_close) == (chunked, close)


@pytest.mark.parametrize(
    ("part", "wire"),
    [
        (b"a", b"1\r\na\r\n"),
        (b"hello world", b"b\r\nhello world\r\n"),
        (b"x" * 255, b"ff\r\n" + b"x" * 255 + b"\r\n"),
        (b"x" * 4096, b"1000\r\n" + b"x" * 4096 + b"\r\n"),
    ],
)
def test_encode_chunk(part, wire):
    assert encode_chunk(part) == wire
    assert LAST_CHUNK == b"0\r\n\r\n"


# --------------------------------------------------------------------------- response head


def test_take_head_waits_for_the_blank_line_and_leaves_the_body():
    buf = bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n")
    assert take_head(buf, False) is None
    buf += b"\r\nhi"
    assert take_head(buf, False) == b"HTTP/1.1 200 OK\r\nContent-Length: 2"
    assert buf == b"hi"


def test_take_head_at_every_cut_point():
    raw = b"HTTP/1.1 204 No Content\r\nServer: t\r\n\r\n"
    for pieces in cuttings(raw):
        buf = bytearray()
        head = None
        for piece in pieces:
            assert head is None, f"head complete before the last piece of {pieces!r}"
            buf += piece
            head = take_head(buf, False)
        assert head == raw[:-4], pieces
        assert buf == b""


@pytest.mark.parametrize(
    "buffered", [b"", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nA: b\r\n\r"]
)
def test_take_head_eof_before_a_complete_head(buffered):
    with pytest.raises(httpx.RemoteProtocolError, match="Server disconnected without sending"):
        take_head(bytearray(buffered), True)


def test_take_head_rejects_an_unterminated_head_over_64_kib():
    buf = bytearray(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD)
    with pytest.raises(httpx.RemoteProtocolError, match="64 KiB"):
        take_head(buf, False)


def test_take_head_rejects_a_terminated_head_over_64_kib():
    # The whole oversized head arrives before the parser looks at it (one big recv).
    buf = bytearray(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n")
    with pytest.raises(httpx.RemoteProtocolError, match="64 KiB"):
        take_head(buf, False)


def test_take_head_accepts_a_head_just_under_the_limit():
    prefix = b"HTTP/1.1 200 OK\r\nX-Big: "
    raw = prefix + b"a" * (MAX_HEAD - len(prefix)) + b"\r\n\r\n"
    assert len(take_head(bytearray(raw), False) or b"") == MAX_HEAD


@pytest.mark.parametrize(
    ("raw", "status", "version", "headers"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\n", 200, b"HTTP/1.1", []),
        (b"HTTP/1.1 200\r\n\r\n", 200, b"HTTP/1.1", []),  # reason phrase is optional
        (b"HTTP/1.1 404 Not Found Here\r\n\r\n", 404, b"HTTP/1.1", []),
        (b"HTTP/1.0 503 Service Unavailable\r\n\r\n", 503, b"HTTP/1.0", []),
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Empty:\r\nX-Pad:   v  \r\n\r\n",
            200, b"HTTP/1.1",
            [(b"Content-Type", b"text/plain"), (b"X-Empty", b""), (b"X-Pad", b"v")],
        ),
        (
            b"HTTP/1.1 302 Found\r\nLocation: http://a/b:c\r\nSet-Cookie: a=1\r\n"
            b"Set-Cookie: b=2\r\n\r\n",
            302, b"HTTP/1.1",
            [(b"Location", b"http://a/b:c"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")],
        ),
    ],
)
def test_parse_head(raw, status, version, headers):
    assert head_of(raw) == (status, version, headers)


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (b"HTP/1.1 200 OK", "malformed status line"),
        (b"HTTP/2 200 OK", "malformed status line"),
        (b"HTTP/1.1 abc OK", "malformed status line"),
        (b"HTTP/1.1", "malformed status line"),
        (b"HTTP/1.1 99 Low", "malformed status line"),
        (b"garbage", "malformed status line"),
        (b"", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\nNoColonHere", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nName : v", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\n: v", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nA: b\r\n folded", "malformed header line"),
    ],
)
def test_parse_head_rejects(raw, what):
    with pytest.raises(httpx.RemoteProtocolError, match=what):
        parse_head(raw)


# --------------------------------------------------------------------------- body length


@pytest.mark.parametrize(
    ("method", "status", "version", "headers", "mode", "length", "close"),
    [
        # RFC 9112 6.3 rule 1: HEAD, 1xx, 204, 304 never have a body
        ("HEAD", 200, b"HTTP/1.1", [(b"Content-Length", b"10")], "none", 0, False),
        ("HEAD", 200, b"HTTP/1.1", [(b"Transfer-Encoding", b"chunked")], "none", 0, False),
        ("GET", 204, b"HTTP/1.1", [], "none", 0, False),
        ("GET", 304, b"HTTP/1.1", [(b"Content-Length", b"10")], "none", 0, False),
        ("GET", 100, b"HTTP/1.1", [], "none", 0, False),
        ("GET", 103, b"HTTP/1.1", [(b"Link", b"</a>")], "none", 0, False),
        # rule 3/4: chunked as the final coding wins, even over Content-Length
        ("GET", 200, b"HTTP/1.1", [(b"Transfer-Encoding", b"chunked")], "chunked", 0, False),
        ("GET", 200, b"HTTP/1.1", [(b"Transfer-Encoding", b"gzip, chunked")], "chunked", 0, False),
        (
            "GET", 200, b"HTTP/1.1",
            [(b"Content-Length", b"3"), (b"transfer-encoding", b"Chunked")], "chunked", 0, False,
        ),
        # rule 4: a transfer coding other than chunked last: read until close
        ("GET", 200, b"HTTP/1.1", [(b"Transfer-Encoding", b"gzip")], "close", 0, True),
        (
            "GET", 200, b"HTTP/1.1",
            [(b"Transfer-Encoding", b"gzip"), (b"Content-Length", b"3")], "close", 0, True,
        ),
        # rule 6: Content-Length (equal duplicates are fine)
        ("GET", 200, b"HTTP/1.1", [(b"Content-Length", b"0")], "length", 0, False),
        ("GET", 200, b"HTTP/1.1", [(b"content-length", b"1048576")], "length", 1048576, False),
        (
            "POST", 201, b"HTTP/1.1",
            [(b"Content-Length", b"7"), (b"Content-Length", b"7")], "length", 7, False,
        ),
        # rule 8: neither: read until close, never reusable
        ("GET", 200, b"HTTP/1.1", [], "close", 0, True),
        # connection management
        ("GET", 200, b"HTTP/1.1", [(b"Connection", b"close"), (b"Content-Length", b"1")],
         "length", 1, True),
        ("GET", 200, b"HTTP/1.1", [(b"Connection", b"keep-alive"), (b"Content-Length", b"1")],
         "length", 1, False),
        ("GET", 200, b"HTTP/1.0", [(b"Content-Length", b"1")], "length", 1, True),
        ("GET", 200, b"HTTP/1.0", [(b"Connection", b"Keep-Alive"), (b"Content-Length", b"1")],
         "length", 1, False),
        ("GET", 200, b"HTTP/1.0", [(b"Connection", b"keep-alive")], "close", 0, True),
        ("HEAD", 200, b"HTTP/1.0", [(b"Content-Length", b"5")], "none", 0, True),
        ("GET", 204, b"HTTP/1.1", [(b"Connection", b"close")], "none", 0, True),
    ],
)
def test_framing_table(method, status, version, headers, mode, length, close):
    reader, got_close = framing(method, status, version, headers)
    assert (reader.mode, reader.remaining, got_close) == (mode, length, close)
    assert reader.done is (mode == "none" or (mode == "length" and length == 0))


@pytest.mark.parametrize(
    "values",
    [[b"abc"], [b"-1"], [b"+5"], [b"1_0"], [b"5, 5"], [b"5, 6"], [b""], [b"0x10"],
     [b"5", b"6"], [b"10", b"1"]],
)
def test_framing_rejects_invalid_or_conflicting_content_length(values):
    headers = [(b"Content-Length", v) for v in values]
    with pytest.raises(httpx.RemoteProtocolError, match="invalid Content-Length"):
        framing("GET", 200, b"HTTP/1.1", headers)


# --------------------------------------------------------------------------- body decoding


NEXT = b"HTTP/1.1 200 OK\r\n"  # a pipelined next response must stay in the buffer

BODIES = [
    # (id, mode, length, wire bytes, body)
    ("length-empty", "length", 0, b"", b""),
    ("length-small", "length", 5, b"hello", b"hello"),
    ("length-crlf-in-body", "length", 8, b"a\r\n\r\n0\r\n", b"a\r\n\r\n0\r\n"),
    ("chunked-one", "chunked", 0, b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
    ("chunked-many", "chunked", 0, b"1\r\na\r\n2\r\nbc\r\nA\r\n0123456789\r\n0\r\n\r\n",
     b"abc0123456789"),
    ("chunked-hex-case", "chunked", 0, b"a\r\n0123456789\r\nB\r\nabcdefghijk\r\n0\r\n\r\n",
     b"0123456789abcdefghijk"),
    ("chunked-leading-zeros", "chunked", 0, b"0003\r\nabc\r\n000\r\n\r\n", b"abc"),
    ("chunked-extensions", "chunked", 0,
     b"4;name=value\r\nwiki\r\n5 ; a=1;b=\"x;y\"\r\npedia\r\n0;last\r\n\r\n", b"wikipedia"),
    ("chunked-trailers", "chunked", 0,
     b"3\r\nabc\r\n0\r\nX-Checksum: 123\r\nX-Other: a b\r\n\r\n", b"abc"),
    ("chunked-crlf-data", "chunked", 0, b"4\r\n\r\n\r\n\r\n2\r\n0\n\r\n0\r\n\r\n", b"\r\n\r\n0\n"),
    ("chunked-empty", "chunked", 0, b"0\r\n\r\n", b""),
]


@pytest.mark.parametrize(("mode", "length", "wire", "body"),
                         [b[1:] for b in BODIES], ids=[b[0] for b in BODIES])
def test_body_decodes_at_every_cut_point(mode, length, wire, body):
    for pieces in cuttings(wire + NEXT):
        got, left = decode(BodyReader(mode, length), pieces, eof_at_end=False)
        assert (got, left) == (body, NEXT), f"cut as {pieces!r}"


def test_body_large_content_length_in_uneven_pieces():
    body = bytes(range(256)) * 4096  # 1 MiB
    pieces = [body[i:i + 7919] for i in range(0, len(body), 7919)]
    got, left = decode(BodyReader("length", len(body)), pieces + [NEXT], eof_at_end=False)
    assert got == body and left == NEXT


def test_body_large_chunked():
    parts = [bytes([i]) * (i * 97 + 1) for i in range(200)]
    wire = b"".join(encode_chunk(p) for p in parts) + LAST_CHUNK
    pieces = [wire[i:i + 1000] for i in range(0, len(wire), 1000)]
    got, left = decode(BodyReader("chunked", 0), pieces, eof_at_end=False)
    assert got == b"".join(parts) and left == b""


def test_close_delimited_body_ends_only_at_eof():
    for pieces in cuttings(b"no length here\r\n\r\n0\r\n\r\n"):
        reader = BodyReader("close", 0)
        got, left = decode(reader, pieces, eof_at_end=True)
        assert got == b"no length here\r\n\r\n0\r\n\r\n" and left == b""
        assert reader.done


def test_close_delimited_empty_body():
    assert decode(BodyReader("close", 0), [], eof_at_end=True) == (b"", b"")


def test_no_body_reader_consumes_nothing():
    reader = BodyReader("none", 0)
    buf = bytearray(NEXT)
    assert reader.next(buf, False) is END
    assert buf == NEXT


@pytest.mark.parametrize(
    ("mode", "length", "wire", "what"),
    [
        ("length", 10, b"", "10 body bytes to come"),
        ("length", 10, b"abc", "7 body bytes to come"),
        ("chunked", 0, b"", "in a chunk"),
        ("chunked", 0, b"5\r", "in a chunk"),
        ("chunked", 0, b"5\r\nhel", "in a chunk"),
        ("chunked", 0, b"5\r\nhello\r", "in a chunk"),
        ("chunked", 0, b"5\r\nhello\r\n", "in a chunk"),
        ("chunked", 0, b"5\r\nhello\r\n0\r\n", "in a chunk"),
        ("chunked", 0, b"5\r\nhello\r\n0\r\nX-T: 1\r\n", "in a chunk"),
    ],
)
def test_body_eof_too_early(mode, length, wire, what):
    with pytest.raises(httpx.RemoteProtocolError, match=what):
        decode(BodyReader(mode, length), [wire] if wire else [], eof_at_end=True)


@pytest.mark.parametrize(
    ("wire", "what"),
    [
        (b"zz\r\n", "invalid chunk size line"),
        (b"\r\n", "invalid chunk size line"),
        (b";ext\r\n", "invalid chunk size line"),
        (b"-5\r\nhello\r\n", "invalid chunk size line"),
        (b"+5\r\nhello\r\n", "invalid chunk size line"),
        (b"0x5\r\nhello\r\n", "invalid chunk size line"),
        (b"1_0\r\n0123456789abcdef\r\n", "invalid chunk size line"),
        (b"5\r\nhelloXY", "chunk data not followed by CRLF"),
        (b"3\r\nhello\r\n", "chunk data not followed by CRLF"),
    ],
)
def test_chunked_rejects(wire, what):
    with pytest.raises(httpx.RemoteProtocolError, match=what):
        decode(BodyReader("chunked", 0), [wire + b"0\r\n\r\n"], eof_at_end=False)


def test_chunked_rejects_an_endless_size_line():
    reader = BodyReader("chunked", 0)
    with pytest.raises(httpx.RemoteProtocolError, match="chunk size line too long"):
        reader.next(bytearray(b"1" * (MAX_HEAD + 1)), False)


def test_reader_is_done_after_end_and_stays_done():
    reader = BodyReader("chunked", 0)
    buf = bytearray(b"2\r\nok\r\n0\r\n\r\n" + NEXT)
    assert reader.next(buf, False) == b"ok"
    assert not reader.done
    assert reader.next(buf, False) is END
    assert reader.done
    assert reader.next(buf, True) is END
    assert buf == NEXT
