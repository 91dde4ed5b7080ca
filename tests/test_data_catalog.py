"""Catalog of the paper's downstream datasets and tree checks (raydino.data.catalog)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from raydino.data import catalog
from raydino.data.fundus import FundusLabel, render_fundus

from helpers.images import jpeg_bytes, write_tree
from helpers.recipes import run_recipe


def test_catalog_has_the_papers_datasets():
    assert set(catalog.names()) == {"messidor2", "idrid", "aptos2019", "papila", "glaucoma_fundus", "jsiec", "retina"}
    classes = {n: len(catalog.get(n).classes) for n in catalog.names()}
    assert classes == {"messidor2": 5, "idrid": 5, "aptos2019": 5, "papila": 3, "glaucoma_fundus": 3, "jsiec": 39, "retina": 4}
    for info in catalog.CATALOG.values():
        assert list(info.classes) == sorted(info.classes) or info.name == "jsiec"  # letter prefixes = label order
        assert len(set(info.classes)) == len(info.classes)
        if info.splits:
            assert sum(info.splits.values()) == info.total
        assert info.provenance  # every entry says where its numbers come from
        assert info.splits_verified or "unverified" in info.provenance  # and what is still unchecked
    glaucoma = catalog.get("Glaucoma_fundus")
    assert glaucoma.classes == ("anormal_control", "bearly_glaucoma", "cadvanced_glaucoma")
    assert glaucoma.splits == {"train": 861, "val": 218, "test": 465} and not glaucoma.splits_verified
    assert catalog.get("PAPILA").splits == {"train": 311, "val": 79, "test": 98}
    # ordinal: the DR grades and the glaucoma stages; nominal: JSIEC's conditions, Retina's diseases
    assert {n for n, i in catalog.CATALOG.items() if i.ordinal} == {"messidor2", "idrid", "aptos2019", "papila", "glaucoma_fundus"}
    assert catalog.find_by_classes(("anodr", "bmilddr", "cmoderatedr", "dseveredr", "eproliferativedr")).ordinal
    assert catalog.find_by_classes(("grade0", "grade1")) is None
    assert catalog.get("MESSIDOR-2") is catalog.get("messidor_2") is catalog.CATALOG["messidor2"]
    with pytest.raises(KeyError, match="known: messidor2"):
        catalog.get("eyepacs")


@pytest.fixture(scope="module")
def tiny_jpeg() -> bytes:
    lab = FundusLabel(index=0, dr_grade=2, glaucoma=0, cup_disc_ratio=0.3, eye="right", split="train")
    return jpeg_bytes(render_fundus(16, lab, seed=0), quality=75)


def _tree(root: Path, jpeg: bytes, sizes: dict[str, int], classes: tuple[str, ...]) -> Path:
    """A RETFound-layout tree with the given split sizes, classes filled round-robin (a split smaller
    than the class list lacks the last classes)."""
    counts = {split: Counter(classes[i % len(classes)] for i in range(n)) for split, n in sizes.items()}
    return write_tree(root, counts, lambda *_: jpeg, ext="jpg")


def test_a_tree_of_the_papers_shape_passes(tmp_path, tiny_jpeg):
    info = catalog.get("idrid")
    root = _tree(tmp_path / "idrid", tiny_jpeg, info.splits, info.classes)
    assert catalog.check_tree(str(root), "idrid") == []


def test_mismatches_are_reported(tmp_path, tiny_jpeg):
    info = catalog.get("idrid")
    sizes = {"train": 300, "val": 84, "test": 103}
    root = _tree(tmp_path / "idrid", tiny_jpeg, sizes, info.classes[:4])  # no proliferative class
    (root / "val" / "ProDR").mkdir()
    (root / "val" / "ProDR" / "x.jpg").write_bytes(tiny_jpeg)
    warnings = "\n".join(catalog.check_tree(str(root), "idrid"))
    assert "split 'train' has 300 images, the paper's has 329 (-9%)" in warnings
    assert "lacks classes ['eproDR']" in warnings
    assert "not in the catalog: ['ProDR']" in warnings
    assert "split 'val' has 85 images" in warnings
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(tiny_jpeg)
    assert "not a RETFound-layout tree" in catalog.check_tree(str(flat), "idrid")[0]


def test_shard_cli_warns_on_a_mismatched_tree(tmp_path, tiny_jpeg):
    info = catalog.get("papila")
    root = _tree(tmp_path / "papila", tiny_jpeg, {"train": 6, "val": 3, "test": 2}, info.classes)
    out = run_recipe("shard", str(root), str(tmp_path / "out"), "--dataset", "PAPILA", "--workers", "1", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "warning: PAPILA: split 'test' lacks classes ['cglaucoma']" in out.stderr
    assert "warning: PAPILA: split 'train' has 6 images, the paper's has 311" in out.stderr
    assert "not yet verified" in out.stderr
    listing = run_recipe("shard", "--list-datasets")
    assert listing.returncode == 0 and "jsiec" in listing.stdout and "39 classes" in listing.stdout
    line = next(x for x in listing.stdout.splitlines() if x.startswith("glaucoma_fundus"))
    assert "Glaucoma_fundus" in line and "3 classes" in line and "861/218/465" in line and "unverified" in line


def test_counts_from_a_synthetic_tree_match_their_labels():
    counts = {"train": {"anodr": 3, "bmilddr": 1}, "val": {"anodr": 1}, "test": {}}
    w = catalog.check_counts(catalog.get("aptos2019"), counts)
    assert any("split 'test' is missing" in x for x in w)
    assert any("split 'val' lacks classes" in x for x in w)
