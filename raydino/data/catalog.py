"""The paper's downstream datasets: classes (RETFound folder names) and split sizes.

Nothing is downloaded: these datasets come under their own licences, and users fetch them
(e.g. RETFound's prepared splits, rmaphoh/RETFound_MAE BENCHMARK.md) into the RETFound layout
``ROOT/{train,val,test}/<class>/<image>``.  `check_counts` / `check_tree` compare such a
tree with the catalog and return human-readable warnings (a missing or unknown class, a split
whose size differs from the paper's) so a wrong or partial copy is noticed before any
evaluation number is reported on it.

Class folder names are RETFound's: a letter prefix makes alphabetical order equal label order
(``anodr`` < ``bmilddr`` < ...), which is how ImageFolder-style loaders assign indices.
Split sizes are those of the RETFound benchmark splits the paper evaluates on; entries with
``splits_verified=False`` were not confirmed against the published table, and each entry's
``provenance`` says where its class names and sizes come from and what is still unchecked.

``ordinal`` says whether the classes are a severity scale (kappa is then quadratic-weighted,
otherwise Cohen's unweighted kappa; see `raydino.eval.metrics`): the ICDR diabetic-retinopathy grades
are, and so are the two glaucoma sets, whose classes order the amount (or likelihood) of
glaucomatous damage (normal < suspect / early < glaucoma / advanced), so that mistaking glaucoma
for normal costs more than mistaking it for suspect.  JSIEC's 39 conditions and Retina's four
diseases are nominal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from raydino.data.storage import StorageOptions

_DR_RETFOUND = ("anodr", "bmilddr", "cmoderatedr", "dseveredr", "eproliferativedr")
_DR_IDRID = ("anoDR", "bmildDR", "cmoderateDR", "dsevereDR", "eproDR")
_JSIEC = (
    "0.0.Normal", "0.1.Tessellated fundus", "0.2.Large optic cup", "0.3.DR1", "1.0.DR2", "1.1.DR3",
    "10.0.Possible glaucoma", "10.1.Optic atrophy", "11.Severe hypertensive retinopathy",
    "12.Disc swelling and elevation", "13.Dragged Disc", "14.Congenital disc abnormality",
    "15.0.Retinitis pigmentosa", "15.1.Bietti crystalline dystrophy",
    "16.Peripheral retinal degeneration and break", "17.Myelinated nerve fiber", "18.Vitreous particles",
    "19.Fundus neoplasm", "2.0.BRVO", "2.1.CRVO", "20.Massive hard exudates", "21.Yellow-white spots-flecks",
    "22.Cotton-wool spots", "23.Vessel tortuosity", "24.Chorioretinal atrophy-coloboma",
    "25.Preretinal hemorrhage", "26.Fibrosis", "27.Laser Spots", "28.Silicon oil in eye",
    "29.0.Blur fundus without PDR", "29.1.Blur fundus with suspected PDR", "3.RAO", "4.Rhegmatogenous RD",
    "5.0.CSCR", "5.1.VKH disease", "6.Maculopathy", "7.ERM", "8.MH", "9.Pathological myopia",
)  # fmt: skip


@dataclass(frozen=True)
class DatasetInfo:
    name: str  # catalog key, e.g. "messidor2"
    title: str  # as the paper writes it
    task: str
    classes: tuple[str, ...]  # RETFound folder names, in label order
    total: int  # images in the RETFound benchmark version
    splits: dict[str, int] | None  # train/val/test sizes; None where only the total is known
    splits_verified: bool  # False: sizes recalled, not yet checked against the published table
    homepage: str
    ordinal: bool = False  # classes form a severity scale (quadratic-weighted kappa); else nominal
    provenance: str = ""  # where classes and split sizes come from; what is still unverified


CATALOG: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo(
            "messidor2",
            "MESSIDOR-2",
            "diabetic retinopathy grade (ICDR 0-4)",
            _DR_RETFOUND,
            1744,
            {"train": 972, "val": 246, "test": 526},
            False,
            "https://www.adcis.net/en/third-party/messidor2/",
            ordinal=True,
            provenance="split sizes recalled from RETFound's benchmark split, unverified",
        ),
        DatasetInfo(
            "idrid",
            "IDRiD",
            "diabetic retinopathy grade (ICDR 0-4)",
            _DR_IDRID,
            516,
            {"train": 329, "val": 84, "test": 103},
            True,
            "https://idrid.grand-challenge.org/",
            ordinal=True,
            provenance="split sizes marked verified when the catalog was written (its source not recorded)",
        ),
        DatasetInfo(
            "aptos2019",
            "APTOS-2019",
            "diabetic retinopathy grade (ICDR 0-4)",
            _DR_RETFOUND,
            3662,
            {"train": 2048, "val": 514, "test": 1100},
            True,
            "https://www.kaggle.com/competitions/aptos2019-blindness-detection",
            ordinal=True,
            provenance="split sizes marked verified when the catalog was written (its source not recorded)",
        ),
        DatasetInfo(
            "papila",
            "PAPILA",
            "glaucoma (normal / suspect / glaucoma)",
            ("anormal", "bsuspectglaucoma", "cglaucoma"),
            488,
            {"train": 311, "val": 79, "test": 98},
            False,
            "https://doi.org/10.1038/s41597-022-01388-1",
            ordinal=True,
            provenance="split sizes as public copies of RETFound's split give them; unverified against RETFound's own download",
        ),
        DatasetInfo(
            "glaucoma_fundus",
            "Glaucoma_fundus",
            "glaucoma stage (normal / early / advanced)",
            ("anormal_control", "bearly_glaucoma", "cadvanced_glaucoma"),
            1544,
            {"train": 861, "val": 218, "test": 465},
            False,
            "https://doi.org/10.7910/DVN/1YRRAC",
            ordinal=True,
            provenance="Harvard Dataverse 'Machine learn for glaucoma' (Ahn et al. 2018: 788 normal, "
            "289 early, 467 advanced); folder names and split sizes as public copies of "
            "RETFound's split give them, unverified against RETFound's own download",
        ),
        DatasetInfo(
            "jsiec",
            "JSIEC",
            "39 fundus conditions",
            _JSIEC,
            1000,
            None,
            False,
            "https://doi.org/10.1038/s41467-021-25138-w",
            provenance="split sizes unknown (only the total); class folder names unverified",
        ),
        DatasetInfo(
            "retina",
            "Retina",
            "normal / cataract / glaucoma / retinal disease",
            ("anormal", "bcataract", "cglaucoma", "ddretina_disease"),
            601,
            {"train": 336, "val": 84, "test": 181},
            False,
            "https://www.kaggle.com/datasets/jr2ngb/cataractdataset",
            provenance="split sizes recalled from RETFound's benchmark split, unverified",
        ),
    )  # fmt: skip
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def names() -> list[str]:
    return list(CATALOG)


def get(name: str) -> DatasetInfo:
    """Catalog entry by name; spelling is forgiving (``MESSIDOR-2``, ``messidor_2``, ``Messidor2``)."""
    wanted = _key(name)
    for key, info in CATALOG.items():
        if wanted in (_key(key), _key(info.title)):
            return info
    raise KeyError(f"dataset {name!r} is not in the catalog (known: {', '.join(CATALOG)})")


def find(name: str | None) -> DatasetInfo | None:
    """Like `get`, but None for names the catalog does not know (a user's own dataset)."""
    if not name:
        return None
    try:
        return get(name)
    except KeyError:
        return None


def find_by_classes(classes: Sequence[str]) -> DatasetInfo | None:
    """The first entry whose class folders are exactly ``classes`` (in order), else None.

    RETFound's folder names identify the task even without ``--dataset``: a copy of APTOS-2019, or
    the synthetic DR set (which uses the same ICDR folder names), is recognised as DR grading.
    """
    wanted = tuple(classes)
    return next((info for info in CATALOG.values() if info.classes == wanted), None)


def check_counts(info: DatasetInfo, counts: dict[str, dict[str, int]]) -> list[str]:
    """Warnings comparing image counts per split and class with the catalog entry.

    ``counts`` maps split -> class folder -> images (`SourceListing.counts()`).
    An empty list means the tree matches: all splits, all classes, the paper's sizes.
    """
    warnings: list[str] = []
    expected = set(info.classes)
    note = "" if info.splits_verified else " (catalog split sizes not yet verified against the paper's table)"
    for split in ("train", "val", "test"):
        per = counts.get(split)
        if not per:
            warnings.append(f"{info.title}: split {split!r} is missing (expected folders {split}/<class>/)")
            continue
        found = {c for c, n in per.items() if n > 0}
        unlabelled = per.get("", 0)
        if unlabelled:
            warnings.append(f"{info.title}: {unlabelled} images directly in {split}/ (not in a class folder)")
        missing = sorted(expected - found)
        if missing:
            warnings.append(f"{info.title}: split {split!r} lacks classes {missing}")
        unknown = sorted(found - expected - {""})
        if unknown:
            hints = []
            lower = {c.lower(): c for c in info.classes}
            for u in unknown:
                hints.append(f"{u} (did you mean {lower[u.lower()]}?)" if u.lower() in lower else u)
            warnings.append(f"{info.title}: split {split!r} has classes not in the catalog: {hints}; expected {list(info.classes)}")
        if info.splits:
            n = sum(per.values())
            want = info.splits[split]
            if n != want:
                warnings.append(f"{info.title}: split {split!r} has {n} images, the paper's has {want} ({(n - want) / want:+.0%}){note}")
    extra = sorted(set(counts) - {"train", "val", "test"})
    if extra:
        warnings.append(f"{info.title}: unexpected splits {extra}")
    if not info.splits:
        n = sum(sum(per.values()) for per in counts.values())
        if n != info.total:
            warnings.append(f"{info.title}: {n} images in all, the paper's version has {info.total} ({(n - info.total) / info.total:+.0%})")
    return warnings


def check_tree(root: str, name: str, options: StorageOptions | None = None) -> list[str]:
    """List a RETFound-layout tree (local or s3://) and compare it with catalog entry ``name``."""
    from raydino.data.sources import list_source  # local import: sources imports storage, not catalog

    info = get(name)
    listing = list_source(root, options=options)
    if listing.kind != "retfound":
        return [f"{info.title}: {root} is not a RETFound-layout tree (expected {{train,val,test}}/<class>/<image>)"]
    return check_counts(info, listing.counts())
