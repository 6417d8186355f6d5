"""``redirect`` routes: answer with the configured status and Location (eXpServer)."""
from __future__ import annotations

import html
from typing import Any
from urllib.parse import quote

from .config import RouteConfig


class Redirect:
    __slots__ = ("status", "headers", "body")

    def __init__(self, route: RouteConfig) -> None:
        # a field value must be ASCII: percent-encode anything else, keep URL syntax as is
        url = quote(route.redirect_url or "/", safe=":/?#[]@!$&'()*+,;=%~")
        self.status = route.http_status_code
        self.headers = b"Location: " + url.encode("ascii") + b"\r\nContent-Type: text/html\r\n"
        link = html.escape(url)
        self.body = f'<html><body><a href="{link}">{link}</a></body></html>\r\n'.encode("ascii")

    def __call__(self, req: Any) -> tuple[int, bytes, object]:
        return self.status, self.headers, self.body
