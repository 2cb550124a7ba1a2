"""A small blocking HTTP client for tests: one request, a timeout, JSON decoded."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def call(
    port: int,
    method: str,
    path: str,
    *,
    host: str = "localhost",
    params: dict[str, Any] | None = None,
    form: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    conn: http.client.HTTPConnection | None = None,
    address: str = "127.0.0.1",
) -> Reply:
    """Send one request (on ``conn`` if given, kept open) and read the whole reply."""
    own = conn is None
    connection = conn or http.client.HTTPConnection(address, port, timeout=timeout)
    target = path + ("?" + urlencode(params) if params else "")
    body = urlencode(form).encode() if form is not None else None
    all_headers = {"Host": host, **(headers or {})}
    if body is not None:
        all_headers["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        connection.request(method, target, body=body, headers=all_headers)
        response = connection.getresponse()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        if own:
            connection.close()
