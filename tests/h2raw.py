"""A minimal HTTP/2 client, by hand, for tests that must misbehave as no gRPC library will:
send HEADERS and part of a message, then nothing. HPACK without Huffman coding or the dynamic
table (static indexes and literals) is all a gRPC server needs to accept a request."""

from __future__ import annotations

import contextlib
import socket
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_HEADERS, ACK = 0x4, 0x1


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _literal(value: bytes) -> bytes:
    assert len(value) < 127
    return bytes([len(value)]) + value


def request_headers(path: str) -> bytes:
    """HPACK without Huffman or dynamic table: static indexes and literals only."""
    return (
        b"\x83"  # :method POST
        + b"\x86"  # :scheme http
        + b"\x04"  # :path, literal value without indexing
        + _literal(path.encode())
        + b"\x01"  # :authority
        + _literal(b"localhost")
        + b"\x0f\x10"  # content-type (static index 31)
        + _literal(b"application/grpc")
        + b"\x00"  # te: literal name
        + _literal(b"te")
        + _literal(b"trailers")
    )


def read_frames(sock: socket.socket, wait: float) -> list[tuple[int, int, int, bytes]]:
    """Frames the server sent within ``wait`` seconds: (type, flags, stream, payload)."""
    sock.settimeout(wait)
    data = b""
    with contextlib.suppress(TimeoutError, BlockingIOError, ConnectionError):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) >= 9 and len(data) >= 9 + int.from_bytes(data[:3], "big"):
                sock.settimeout(0.05)
    frames, i = [], 0
    while i + 9 <= len(data):
        length = int.from_bytes(data[i : i + 3], "big")
        kind, flags = data[i + 3], data[i + 4]
        stream = int.from_bytes(data[i + 5 : i + 9], "big") & 0x7FFFFFFF
        frames.append((kind, flags, stream, data[i + 9 : i + 9 + length]))
        i += 9 + length
    return frames


def stalled_connection(path: str, method: str, streams: int) -> socket.socket:
    """One HTTP/2 connection carrying ``streams`` half-sent unary requests for ``method``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
    # Acknowledge the server's SETTINGS, as a well-behaved (if slow) client does.
    if any(k == SETTINGS and not f & ACK for k, f, _, _ in read_frames(sock, 2.0)):
        sock.sendall(frame(SETTINGS, ACK, 0))
    sock.sendall(stalled_streams(method, range(1, 2 * streams, 2)))
    return sock


def stalled_streams(method: str, stream_ids: range) -> bytes:
    """HEADERS for ``method`` on each stream, and a DATA frame whose gRPC prefix promises a
    100-byte message of which nothing follows."""
    out = b""
    for stream in stream_ids:
        out += frame(HEADERS, END_HEADERS, stream, request_headers(method))
        out += frame(DATA, 0, stream, b"\x00" + struct.pack(">I", 100))
    return out


def refused_streams(sock: socket.socket) -> list[tuple[int, int, int, bytes]]:
    return [f for f in read_frames(sock, 0.2) if f[0] in (RST_STREAM, GOAWAY)]
