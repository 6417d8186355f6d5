"""The small HTML page that goes with an error or redirect status: one style everywhere."""
from __future__ import annotations

import http
from functools import cache


@cache
def page(status: int) -> bytes:
    try:
        text = f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        text = str(status)
    return (
        f"<!DOCTYPE html>\n<html>\n<head><title>{text}</title></head>\n"
        f"<body>\n<h1>{text}</h1>\n<hr><p>eXpServer</p>\n</body>\n</html>\n"
    ).encode("ascii")
