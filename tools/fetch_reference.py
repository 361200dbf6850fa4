"""Fetch the official Mask2Former code (the `maskformer2` sdist) used by the parity tests.

It is a test reference, not a dependency: its install requirements point at unreachable URLs and its CUDA
sources are missing, so it is unpacked, never installed (and `pip download` cannot fetch it either: pip
rejects its direct-URL requirements after downloading). Called by tools/setup_env.sh at install time (tests
never download). Verifies the sdist's sha256 and extracts atomically.

The package index is the one pip is configured with, read through `pip config list` in pip's own order of
precedence (the [global] section, then [download], then PIP_* environment variables): `index-url` first,
then each `extra-index-url`; pip's built-in default index when no `index-url` is configured. The index is
read as a PEP 503 simple page (an http(s) URL, or a file: URL of a local index folder).
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser

NAME, VERSION = "maskformer2", "0.1"
SHA256 = "d934e3378e86cc326129eeda18ca1097cf32d9c248dc8e957a14899d9241602a"
_SECTIONS = ("global", "download", ":env:")  # pip's override order for the `download` command, lowest first


def pip_config() -> dict[str, str]:
    """pip's effective configuration for `pip download`: {key: value}, later sections overriding earlier."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], check=True, capture_output=True, text=True
    ).stdout
    by_section: dict[str, dict[str, str]] = {s: {} for s in _SECTIONS}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        section, dot, option = key.rpartition(".")
        if sep and dot and section in by_section:
            by_section[section][option] = ast.literal_eval(value)  # pip prints values as Python string literals
    merged: dict[str, str] = {}
    for section in _SECTIONS:
        merged.update(by_section[section])
    return merged


def pip_default_index() -> str:
    # setuptools first: pip's import loads the stdlib's distutils, after which importing setuptools (torch's
    # extension builder does, in the same process) fails in setuptools' distutils hack
    import setuptools  # noqa: F401
    from pip._internal.models.index import PyPI  # pip's built-in default; not a public API, so fail clearly

    return PyPI.simple_url


def index_urls(config: dict[str, str] | None = None) -> list[str]:
    """The indexes pip would search, in order: index-url (or pip's default), then the extra-index-urls."""
    config = pip_config() if config is None else config
    main = config.get("index-url") or pip_default_index()
    return [main, *config.get("extra-index-url", "").split()]


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        href = dict(attrs).get("href") if tag == "a" else None
        if href:
            self.hrefs.append(href)


def _read(url: str, timeout: float) -> bytes:
    return urllib.request.urlopen(url, timeout=timeout).read()


def find_sdist(index: str, fname: str) -> str | None:
    """The URL of `fname` on the simple page of NAME in `index`, or None when the index does not list it."""
    page_url = index.rstrip("/") + f"/{NAME}/"
    local = urllib.parse.urlparse(page_url)
    if local.scheme == "file" and os.path.isdir(urllib.request.url2pathname(local.path)):
        page_url += "index.html"  # a local index folder, as pip reads it
    try:
        page = _read(page_url, 60).decode()
    except (urllib.error.URLError, OSError):  # 404, missing folder: the project is not on this index
        return None
    parser = _Links()
    parser.feed(page)
    for href in parser.hrefs:
        url = urllib.parse.urljoin(page_url, href).split("#")[0]
        if urllib.parse.unquote(url.rsplit("/", 1)[-1]) == fname:
            return url
    return None


def main(dest: str) -> None:
    target = os.path.join(dest, f"{NAME}-{VERSION}")
    if os.path.isdir(os.path.join(target, "mask2former")):
        return
    fname = f"{NAME}-{VERSION}.tar.gz"
    indexes = index_urls()
    url = next((u for u in (find_sdist(i, fname) for i in indexes) if u), None)
    if url is None:
        sys.exit(f"fetch_reference: {fname} is on none of pip's configured indexes: {', '.join(indexes)}")
    data = _read(url, 120)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        sys.exit(f"fetch_reference: {url} has sha256 {digest}, expected {SHA256}")
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(os.path.join(tmp, f"{NAME}-{VERSION}"), target)
    print(f"fetch_reference: {NAME} {VERSION} unpacked in {target}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
