from .conftest import Reader, request


def test_get_file_and_keep_alive(start):
    served = start()
    (served.root / "a.txt").write_bytes(b"hello\n")
    with served.connect() as sock:
        r = Reader(sock)
        for _ in range(3):
            sock.sendall(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = r.response()
            assert (status, body) == (200, b"hello\n")
            assert headers["server"] == "eXpServer"
            assert headers["content-type"] == "text/plain"
            assert "date" in headers


def test_missing_file_is_404(start):
    served = start()
    status, headers, _ = request(served, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 404
