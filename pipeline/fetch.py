"""Downloads with retries: a URL's bytes, or a :class:`FetchError` that names the URL and the last error.

Used for the paper profile's inputs (TokenCompose metadata, COCO images, the official prompt files).
``file://`` URLs work too, which tests and offline mirrors use. A file pinned by a SHA-256 in params is read
with :func:`read_verified` (or :func:`read_pinned`, where ``null`` means "not checked").
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.config import MissingInputError, StageError

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 50 * 1024 * 1024  # COCO images are < 1 MB; anything this large is not an image
RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}
BACKOFF_S = 0.5
UNKNOWN_HOST_ERRNOS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


class SourceUnavailable(StageError, OSError):
    """A source given as a URL could not be downloaded; the message names it and the way out."""


class FetchError(StageError, RuntimeError):
    """A URL could not be fetched; ``transient`` says whether another try may succeed."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


def is_url(source: str | Path) -> bool:
    """True for ``http://``, ``https://`` and ``file://`` sources."""
    return str(source).startswith(("http://", "https://", "file://"))


def _fetch_once(url: str, timeout: float, max_bytes: int) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            expected = response.headers.get("Content-Length")
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as err:
        raise FetchError(f"{url}: HTTP {err.code} {err.reason}", err.code in RETRY_HTTP) from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", err)
        # An unknown host or a missing local file does not come back on a retry (EAI_AGAIN, a temporary
        # name-resolution failure, does: it stays transient).
        lasting = (isinstance(reason, socket.gaierror) and reason.errno in UNKNOWN_HOST_ERRNOS) or isinstance(
            reason, (FileNotFoundError, NotADirectoryError))
        raise FetchError(f"{url}: {reason}", not lasting) from err
    if len(data) > max_bytes:
        raise FetchError(f"{url}: larger than {max_bytes} bytes", False)
    if expected is not None and expected.isdigit() and int(expected) != len(data):
        raise FetchError(f"{url}: got {len(data)} of {expected} bytes (connection cut)", True)
    if not data:
        raise FetchError(f"{url}: empty response", True)
    return data


def fetch(url: str, retries: int = 3, timeout: float = 30.0, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The body of ``url``, trying up to ``1 + retries`` times on transient errors (backoff 0.5 s, 1 s, ...).

    Raises :class:`FetchError` naming the URL and the last error.
    """
    for attempt in range(retries + 1):
        try:
            return _fetch_once(url, timeout, max_bytes)
        except FetchError as err:
            if not err.transient or attempt == retries:
                raise
            log.info("%s; retrying (%d of %d)", err, attempt + 1, retries)
            time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def read_source(source: str | Path, retries: int = 3, timeout: float = 60.0) -> bytes:
    """Bytes of ``source``: an http(s)/file URL (fetched with retries by :func:`fetch`) or a local path.

    Raises :class:`SourceUnavailable` (an ``OSError``) naming the URL when the download fails,
    :class:`~pipeline.config.MissingInputError` (a ``FileNotFoundError``) when the path does not exist.
    """
    source = str(source)
    if is_url(source):
        log.info("fetching %s", source)
        try:
            return fetch(source, retries, timeout, max_bytes=1 << 30)
        except FetchError as err:
            raise SourceUnavailable(f"{source}: download failed ({err}); check the URL and the network, "
                                    f"or download the file and give its local path instead") from err
    path = Path(source)
    if not path.is_file():
        raise MissingInputError(f"{source}: file not found (give an http(s):// URL or an existing local path)")
    return path.read_bytes()


class HashMismatchError(StageError, ValueError):
    """A fetched file's SHA-256 differs from the one in params."""


SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def check_sha256_param(value: str | None, key: str) -> None:
    """``ValueError`` naming ``key`` unless ``value`` is ``None`` or 64 hex digits (a SHA-256 pin in params).

    Dataclasses of params sections call it in ``__post_init__``, so a mistyped pin fails before any download.
    """
    if value is not None and not SHA256_HEX.fullmatch(value.lower()):
        raise ValueError(f"{key}: {value!r} is not a SHA-256 (64 hex digits); copy it from `sha256sum FILE`, "
                         f"or set null to read the file unchecked")


def read_verified(source: str | Path, sha256: str, retries: int = 3, timeout: float = 60.0,
                  param: str = "the sha256 in params.yaml") -> bytes:
    """Bytes of ``source`` (URL or path, read by :func:`read_source`) after checking their SHA-256.

    Raises :class:`HashMismatchError` naming the source, both digests and ``param`` (the key that pins it).
    """
    data = read_source(source, retries, timeout)
    got = sha256_bytes(data)
    if got != sha256.lower():
        raise HashMismatchError(
            f"{source}: SHA-256 mismatch: expected {sha256.lower()}, got {got}; the file changed or is not the "
            f"one the params name (fix the url, or {param} if the new file is the one you want)")
    return data


def read_pinned(source: str | Path, sha256: str | None, retries: int = 3, timeout: float = 60.0,
                param: str = "the sha256 in params.yaml") -> bytes:
    """:func:`read_verified` when ``sha256`` is given; ``None`` means "not checked": plain
    :func:`read_source`, with a warning when ``source`` is a URL (its content may change upstream)."""
    if sha256 is not None:
        return read_verified(source, sha256, retries, timeout, param)
    if is_url(source):
        log.warning("%s: read without a SHA-256 check (%s is null); pin it to detect a changed file",
                    source, param)
    return read_source(source, retries, timeout)
