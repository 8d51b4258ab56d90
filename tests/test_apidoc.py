"""The API reference (pdoc, from the docstrings) builds without a warning; make test builds it."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pdoc
import pdoc.render

from tests.helpers import ROOT


def test_make_test_builds_the_api_reference() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: .*\bdocs\b", makefile, re.MULTILINE)
    assert "-W error::UserWarning -m pdoc" in makefile


def test_api_reference_builds_without_warnings(tmp_path: Path) -> None:
    pdoc.render.configure(docformat="markdown")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pdoc.pdoc("kvmpy", output_directory=tmp_path)
    page = (tmp_path / "kvmpy" / "qmp.html").read_text()
    assert "QmpProtocol" in page and "snapshot-save" in page
