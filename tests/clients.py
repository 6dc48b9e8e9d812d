"""HTTP clients that tests need and httpx does not give: one that leaves at a known moment."""
from __future__ import annotations

import json
import socket
import time
from typing import Callable
from urllib.parse import urlsplit


def leave_mid_denoise(url: str, body: dict, denoising: Callable[[], int], timeout_s: float = 60.0) -> None:
    """POST ``body`` as JSON to ``url`` and close the connection once the Denoiser holds the
    request (``denoising()``, its count of requests in flight, has risen).

    A client timeout would guess how long the request needs to reach the Denoiser; on a busy
    machine a short guess closes it earlier, and nothing is left to cancel.
    """
    before = denoising()
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    head = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head + payload)
        deadline = time.monotonic() + timeout_s
        while denoising() <= before:
            if time.monotonic() > deadline:
                raise AssertionError(f"the request did not reach the Denoiser within {timeout_s} s")
            time.sleep(0.05)
