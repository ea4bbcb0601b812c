"""tests/data/spec is a copy of what the parity and state-dict layout tests read from ../shared/spec, so that
they run in any clone; where ../shared is beside the repository, the copy must still equal the original."""
import pytest

from helpers import SHARED_SPEC_DIR, SPEC_DIR

# What the tests read: the published state_dict layouts and the parity case (README.md documents the case).
COPIED = ["state_dict_detr_resnet50.tsv", "state_dict_detr_resnet101.tsv", "state_dict_detr_resnet50_panoptic.tsv",
          "parity/README.md", "parity/case.json", "parity/expected.pt", "parity/fill.py"]


def test_the_copy_holds_what_the_tests_read_and_nothing_else():
    held = sorted(str(p.relative_to(SPEC_DIR)) for p in SPEC_DIR.rglob("*") if p.is_file())
    assert held == sorted(COPIED)


@pytest.mark.skipif(not SHARED_SPEC_DIR.is_dir(),
                    reason=f"{SHARED_SPEC_DIR} is absent (a clone without ../shared): nothing to compare the copy with")
@pytest.mark.parametrize("name", COPIED)
def test_the_copy_equals_shared_spec(name):
    original = SHARED_SPEC_DIR / name
    assert original.is_file(), f"{original} is gone: drop {name} from tests/data/spec or find where it moved"
    assert (SPEC_DIR / name).read_bytes() == original.read_bytes(), (
        f"tests/data/spec/{name} differs from {original}: copy it again (cp {original} tests/data/spec/{name})")
