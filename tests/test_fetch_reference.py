"""tools/fetch_reference.py against local file: indexes (no network): which index pip's configuration selects,
the fallback to extra indexes, the sha256 check and the atomic unpack."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest

# importing pip (its default index) into a test process where another test already imported distutils
pytestmark = pytest.mark.filterwarnings("ignore:Setuptools is replacing distutils:UserWarning")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "fetch_reference.py"


@pytest.fixture
def fetch(monkeypatch, tmp_path):
    """The module, with pip isolated from this machine's configuration (no config files, no PIP_* variables)."""
    for var in [v for v in os.environ if v.startswith("PIP_")]:
        monkeypatch.delenv(var)
    conf = tmp_path / "pip.conf"
    conf.write_text("")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    spec = importlib.util.spec_from_file_location("fetch_reference_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, conf


def _sdist() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        body = b"MARKER = 'reference'\n"
        info = tarfile.TarInfo("maskformer2-0.1/mask2former/__init__.py")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


# the sdist two folders up from simple/maskformer2/, spelled by parts
RELATIVE_SDIST = "/".join(["..", "..", "files", "maskformer2-0.1.tar.gz"])


def _index(root: Path, data: bytes | None) -> str:
    """A PEP 503 index folder; with `data`, maskformer2's page links the sdist by a relative URL, as pip's are."""
    (root / "simple").mkdir(parents=True)
    if data is not None:
        (root / "files").mkdir()
        (root / "files" / "maskformer2-0.1.tar.gz").write_bytes(data)
        (root / "simple" / "maskformer2").mkdir()
        (root / "simple" / "maskformer2" / "index.html").write_text(
            f'<html><body><a href="{RELATIVE_SDIST}#sha256=00">maskformer2-0.1.tar.gz</a></body></html>'
        )
    return (root / "simple").as_uri()


def test_source_names_no_index_host():
    assert not re.search(r"https?://", SCRIPT.read_text())


def test_index_precedence(fetch, monkeypatch):
    mod, conf = fetch
    import setuptools  # noqa: F401 - before pip (see fetch_reference.pip_default_index)
    from pip._internal.models.index import PyPI

    assert mod.index_urls() == [PyPI.simple_url]  # neither configured: pip's own default
    conf.write_text("[global]\nindex-url = file:///g\nextra-index-url = file:///e1 file:///e2\n")
    assert mod.index_urls() == ["file:///g", "file:///e1", "file:///e2"]
    conf.write_text("[global]\nindex-url = file:///g\n[download]\nindex-url = file:///d\n[install]\nindex-url = x\n")
    assert mod.index_urls() == ["file:///d"]  # the command's section overrides [global]; [install] is not ours
    monkeypatch.setenv("PIP_INDEX_URL", "file:///env")
    assert mod.index_urls() == ["file:///env"]  # the environment overrides every file


def test_fetches_from_the_configured_index(fetch, monkeypatch, tmp_path):
    mod, conf = fetch
    data = _sdist()
    monkeypatch.setattr(mod, "SHA256", hashlib.sha256(data).hexdigest())
    empty = _index(tmp_path / "empty", None)
    full = _index(tmp_path / "full", data)
    conf.write_text(f"[global]\nindex-url = {empty}\nextra-index-url = {full}\n")  # found on the extra index
    dest = tmp_path / "refs"
    mod.main(str(dest))
    assert (dest / "maskformer2-0.1" / "mask2former" / "__init__.py").read_text() == "MARKER = 'reference'\n"
    assert sorted(p.name for p in dest.iterdir()) == ["maskformer2-0.1"]  # no temporary folder left
    shutil.rmtree(tmp_path / "full")
    mod.main(str(dest))  # already unpacked: nothing is fetched


def test_missing_package_and_wrong_checksum_leave_nothing(fetch, tmp_path):
    mod, conf = fetch
    empty = _index(tmp_path / "empty", None)
    conf.write_text(f"[global]\nindex-url = {empty}\n")
    dest = tmp_path / "refs"
    with pytest.raises(SystemExit, match=f"none of pip's configured indexes: {re.escape(empty)}"):
        mod.main(str(dest))
    full = _index(tmp_path / "full", _sdist())  # the checksum is the real sdist's, not this one's
    conf.write_text(f"[global]\nindex-url = {full}\n")
    with pytest.raises(SystemExit, match="has sha256 .* expected d934e3"):
        mod.main(str(dest))
    assert not dest.exists()
