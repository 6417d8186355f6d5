"""Request body limits (max_body_size): 413 from Content-Length; chunked bodies are cut."""
from .conftest import Reader


def test_content_length_over_the_limit_is_413_and_closes(start):
    served = start(max_body_size=1000)
    with served.connect() as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n")
        r = Reader(sock)
        status, headers, _ = r.response()
        assert status == 413
        assert headers["connection"] == "close"
        assert r.closed()


def test_chunked_body_over_the_limit_is_not_read_to_the_end(start):
    served = start(max_body_size=4096)
    chunk = b"1000\r\n" + b"a" * 4096 + b"\r\n"
    with served.connect() as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        r = Reader(sock)
        status, headers, _ = r.response()
        assert status == 405            # the static route's answer went out first
        sent = 0
        try:
            for _ in range(256):        # 1 MiB more: the server stops reading long before
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert r.closed(timeout=6)


def test_body_under_the_limit_keeps_the_connection(start):
    served = start(max_body_size=1000)
    with served.connect() as sock:
        r = Reader(sock)
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"b" * 1000)
        assert r.response()[0] == 405
        sock.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        assert r.response()[0] == 404
