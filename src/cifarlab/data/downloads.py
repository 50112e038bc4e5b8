"""Fetching a file over http(s) safely: into ``<name>.part`` with a progress bar, hashed while
it streams, renamed only once its hash is right, so an interrupted or corrupted download is
never mistaken for the file. Used for CIFAR-10 (md5) and for pretrained weights (sha256).
"""

from __future__ import annotations

import hashlib
import http.client
import urllib.parse
import urllib.request
from pathlib import Path


class DownloadFailed(Exception):
    """The network or the server failed; the message says why (callers add what to do)."""


def check_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"unsupported download URL {url!r}: give an http:// or https:// address")


def stream(url: str, part: Path, algorithm: str, progress: bool = True, desc: str = "") -> str:
    """Download ``url`` into ``part``; returns the hex digest (``algorithm``) of what came.
    A failure removes an empty ``part`` and raises DownloadFailed."""
    from tqdm import tqdm

    check_url(url)
    h = hashlib.new(algorithm)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc=desc) as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts, disk full
        if part.is_file() and part.stat().st_size == 0:
            part.unlink()
        raise DownloadFailed(str(getattr(e, "reason", e))) from None
    return h.hexdigest()
