"""Fetch the official Mask2Former code (the `maskformer2` sdist) used by the parity tests.

It is a test reference, not a dependency: its install requirements point at unreachable URLs and its CUDA
sources are missing, so it is unpacked, never installed. Called by tools/setup_env.sh at install time
(tests never download). Verifies the sdist's sha256 and extracts atomically.
"""

import hashlib
import io
import os
import sys
import tarfile
import tempfile
import urllib.request

NAME, VERSION = "maskformer2", "0.1"
SHA256 = "d934e3378e86cc326129eeda18ca1097cf32d9c248dc8e957a14899d9241602a"
INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def main(dest: str) -> None:
    target = os.path.join(dest, f"{NAME}-{VERSION}")
    if os.path.isdir(os.path.join(target, "mask2former")):
        return
    page = urllib.request.urlopen(f"{INDEX}/{NAME}/", timeout=60).read().decode()
    fname = f"{NAME}-{VERSION}.tar.gz"
    start = page.index(fname)
    url = page[page.rindex('href="', 0, start) + 6 : page.index('"', start)].split("#")[0]
    data = urllib.request.urlopen(url, timeout=120).read()
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
