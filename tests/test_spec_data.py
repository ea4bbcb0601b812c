"""tests/data/spec holds what the parity and state-dict layout tests read: the published state_dict layouts and
the parity case computed by the original DETR. Its SHA-256 list pins every file, so an accidental edit, a
truncated copy or a stray file fails here rather than as a puzzling parity difference."""

import hashlib

import pytest

from helpers import SPEC_DIR

SUMS = SPEC_DIR / "SHA256SUMS"


def listed() -> dict:
    """{relative path: sha256} from tests/data/spec/SHA256SUMS (sha256sum's format)."""
    sums = {}
    for line in SUMS.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.strip()] = digest
    return sums


def test_the_folder_holds_the_listed_files_and_nothing_else():
    held = sorted(str(p.relative_to(SPEC_DIR)) for p in SPEC_DIR.rglob("*") if p.is_file() and p != SUMS)
    assert held == sorted(listed())
    for name in ["state_dict_detr_resnet50.tsv", "parity/case.json", "parity/expected.pt", "parity/fill.py"]:
        assert name in held


@pytest.mark.parametrize("name", sorted(listed()))
def test_each_file_has_its_listed_digest(name):
    digest = hashlib.sha256((SPEC_DIR / name).read_bytes()).hexdigest()
    assert digest == listed()[name], f"tests/data/spec/{name} changed: its SHA-256 is not the one in {SUMS}"
