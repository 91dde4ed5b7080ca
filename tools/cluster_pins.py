"""Pinned versions in cluster files and the runbook: Ray inside pyproject.toml's range, torch exact.

  * `pin_problems` (a cluster file) and `text_pin_problems` (any (where, text) lines, e.g. a
    runbook's): every Ray version in an image tag, rayVersion or `pip install ray==` inside the ray
    range of pyproject.toml (`supported_ray_range`); torch installed only as an exact version of a
    CUDA build, before raydino, and one torch build per file;
  * `torch_pins`: which torch builds lines name, so `cluster_check.pin_agreement` can compare files.

`cluster_rules.check_rules` runs `pin_problems` with the other rules.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet

from cluster_files import ClusterCheckError, ClusterSpec, as_string, ray_container, strings_with_fields

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10, which pyproject.toml still allows: see _project_dependencies
    tomllib = None  # type: ignore[assignment]

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"  # its ray range is the one supported

_TORCH_PACKAGES = {"torch", "torchvision", "torchaudio"}
_PIP_INSTALL_RE = re.compile(r"\bpip3?\s+install\s(?P<args>[^;&|`\n\\<>()]*)")
_PYTORCH_INDEX_RE = re.compile(r"download\.pytorch\.org/whl/(?P<build>[a-z]+\d*)")
_IMAGE_TORCH_RE = re.compile(r"torch(?P<version>\d+\.\d+(?:\.\d+)?)-(?P<build>cu\d+)")
# pip options that take a value (the value is not a package)
_PIP_VALUE_OPTIONS = {
    "-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-c", "--constraint", "-r", "--requirement",
    "-t", "--target", "--prefix", "--root", "--src", "-e", "--editable", "--cache-dir", "--platform",
    "--python-version", "--implementation", "--abi", "--upgrade-strategy", "--trusted-host", "--cert", "--log",
    "--proxy", "--retries", "--timeout", "--progress-bar", "--no-binary", "--only-binary", "--exists-action",
}  # fmt: skip


@functools.lru_cache(maxsize=4)
def supported_ray_range(pyproject: Path = PYPROJECT) -> SpecifierSet:
    """The version range of pyproject.toml's ray requirement: the Ray releases raydino supports."""
    try:
        text = pyproject.read_text()
        requirements = tomllib.loads(text)["project"]["dependencies"] if tomllib else _project_dependencies(text)
    except (OSError, KeyError, ValueError) as e:  # ValueError: tomllib.TOMLDecodeError is one
        raise ClusterCheckError(f"{pyproject}: cannot read the project's dependencies: {e}") from None
    for line in requirements:
        req = Requirement(line)
        if req.name == "ray":
            return req.specifier
    raise ClusterCheckError(f"{pyproject}: no ray requirement in [project] dependencies")


# Without tomllib (Python 3.10) the [project] table's `dependencies = [...]` array is read with these
# rather than by adding tomli as a dependency.  Enough for pyproject.toml as the project writes it
# (quoted strings, `#` comments, `ray[extras]` brackets inside strings), not for TOML in general:
# no escapes in strings, no multi-line strings, no dotted `project.dependencies` keys.
_PROJECT_TABLE_RE = re.compile(r"^\[project\][ \t]*(?:#.*)?$(?P<body>.*?)(?=^\[|\Z)", re.M | re.S)
_DEPENDENCIES_RE = re.compile(r"^dependencies\s*=\s*\[(?P<items>(?:\"[^\"]*\"|'[^']*'|#[^\n]*|[^\]\"'#])*)\]", re.M)
_TOML_ITEM_RE = re.compile(r"\"(?P<double>[^\"]*)\"|'(?P<single>[^']*)'|#[^\n]*")  # a string, or a comment to skip


def _project_dependencies(pyproject_text: str) -> list[str]:
    """The strings of pyproject.toml's [project] dependencies array, read without tomllib."""
    table = _PROJECT_TABLE_RE.search(pyproject_text)
    array = _DEPENDENCIES_RE.search(table.group("body")) if table else None
    if array is None:
        raise KeyError("project.dependencies")  # what tomllib's path raises for a missing key
    items = _TOML_ITEM_RE.finditer(array.group("items"))
    return [m.group("double") if m.group("double") is not None else m.group("single") for m in items if not m.group().startswith("#")]


def image_ray_versions(text: str) -> set[str]:
    """Ray versions an image reference names: rayproject/ray:X or a tag with -rayX / :rayX."""
    return set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text)) | set(re.findall(r"[-:]ray(\d+\.\d+\.\d+)", text))


@dataclass
class PipInstall:
    """One `pip install ...` written in a cluster file or the runbook."""

    where: str
    requirements: list[Requirement]
    index_urls: list[str]
    other: list[str]  # wheel files, paths, unparsable arguments

    @property
    def cuda_build(self) -> str | None:
        """cu128 for --index-url https://download.pytorch.org/whl/cu128; None for no or another index."""
        builds = [m.group("build") for url in self.index_urls for m in [_PYTORCH_INDEX_RE.search(url)] if m]
        return next((b for b in builds if b.startswith("cu")), None)

    @property
    def installs_raydino(self) -> bool:
        return any(r.name == "raydino" for r in self.requirements) or any("raydino" in a for a in self.other)


def pip_installs(lines: list[tuple[str, str]]) -> list[PipInstall]:
    """The pip installs in (where, text) pairs, in order; `a && pip install b` counts each install."""
    found = []
    for where, text in lines:
        for m in _PIP_INSTALL_RE.finditer(text):
            install = PipInstall(where, [], [], [])
            tokens = [t.strip("\"'") for t in m.group("args").split()]
            i = 0
            while i < len(tokens):
                token = tokens[i]
                option, _, inline = token.partition("=") if token.startswith("--") else (token, "", "")
                if option in _PIP_VALUE_OPTIONS:
                    value = inline if inline else (tokens[i + 1] if i + 1 < len(tokens) else "")
                    i += 1 if inline else 2
                    if option in ("-i", "--index-url", "--extra-index-url"):
                        install.index_urls.append(value)
                    elif option in ("-e", "--editable"):
                        install.other.append(value)
                    continue
                i += 1
                if token.startswith("-"):
                    continue
                if re.search(r"[/~$*]|\.whl$", token):  # a wheel file, a path or a shell variable
                    install.other.append(token)
                    continue
                try:
                    install.requirements.append(Requirement(token))
                except InvalidRequirement:
                    install.other.append(token)
            found.append(install)
    return found


def _exact_version(req: Requirement) -> str | None:
    """X for a requirement pinned as name==X (one exact version, no wildcard), else None."""
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator in ("==", "===") and "*" not in specs[0].version:
        return specs[0].version
    return None


def _torch_build(req: Requirement, install: PipInstall) -> tuple[str, str] | None:
    """(version, CUDA build) of a pinned torch requirement, e.g. ("2.14.1", "cu128"); None if it has none."""
    version = _exact_version(req)
    if version is None:
        return None
    base, _, local = version.partition("+")
    build = local if local.startswith("cu") else install.cuda_build
    return (base, build) if build else None


def text_lines(cluster: ClusterSpec) -> list[tuple[str, str]]:
    """What the pin rules read in a cluster file: every string of the document (commands, images) with
    its field path, and every comment line (Dockerfile snippets, example commands) with its line number."""
    lines = list(strings_with_fields(cluster.doc))
    for n, line in enumerate(cluster.text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            lines.append((f"line {n}", line.lstrip()[1:]))
    return lines


def doc_lines(path: Path) -> list[tuple[str, str]]:
    """A runbook's lines, `\\` continuations joined, each with its line number."""
    out, pending, start = [], "", 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((f"line {start}", pending + line))
        pending = ""
    if pending:
        out.append((f"line {start}", pending))
    return out


def torch_pins(lines: list[tuple[str, str]]) -> dict[tuple[str, str], list[str]]:
    """Each torch build named in the lines ((version, CUDA build) from pip pins and image tags) -> where."""
    pins: dict[tuple[str, str], list[str]] = {}
    for install in pip_installs(lines):
        for req in install.requirements:
            build = _torch_build(req, install) if req.name == "torch" else None
            if build:
                pins.setdefault(build, []).append(install.where)
    for where, text in lines:
        for m in _IMAGE_TORCH_RE.finditer(text):
            pins.setdefault((m.group("version"), m.group("build")), []).append(where)
    return pins


def pin_problems(cluster: ClusterSpec, ray_range: SpecifierSet) -> list[str]:
    """Ray versions inside pyproject.toml's range; torch installed only as an exact version of a CUDA build."""
    p = text_pin_problems(str(cluster.path), text_lines(cluster), ray_range)
    if cluster.is_kuberay:
        version = str(cluster.ray_cluster_spec.get("rayVersion", ""))
        if version and version not in ray_range:
            p.append(_outside(str(cluster.path), f"{cluster.spec_field}.rayVersion", version, ray_range))
        p += _image_pin_problems(cluster)
    return p


def text_pin_problems(source: str, lines: list[tuple[str, str]], ray_range: SpecifierSet) -> list[str]:
    """The pin rules on (where, text) lines of one file: a cluster file's strings or a runbook's lines."""
    p = []
    for where, text in lines:
        for version in sorted(image_ray_versions(text)):
            if version not in ray_range:
                p.append(_outside(source, where, version, ray_range))
    torch_pinned = False
    for install in pip_installs(lines):
        at = f"{source}: {install.where}"
        for req in install.requirements:
            if req.name == "ray":
                version = _exact_version(req)
                if version is None:
                    p.append(f"{at}: pip installs {req} without an exact version; pin the tested Ray ({_tested_ray(ray_range)})")
                elif version not in ray_range:
                    p.append(_outside(source, install.where, version, ray_range))
            if req.name in _TORCH_PACKAGES:
                if _exact_version(req) is None:
                    p.append(f"{at}: pip installs {req} without an exact version (==X); pin it, with its CUDA build")
                elif _torch_build(req, install) is None:
                    p.append(
                        f"{at}: pip installs {req} without a CUDA build; add --index-url "
                        f"https://download.pytorch.org/whl/cu128 (or the build your NVIDIA driver runs)"
                    )
                elif req.name == "torch":
                    torch_pinned = True
        if install.installs_raydino and not torch_pinned:
            p.append(
                f"{at}: installs raydino before a pinned torch: pip then takes whatever torch build PyPI serves; "
                f"install torch==X --index-url https://download.pytorch.org/whl/cuNNN first"
            )
    builds = torch_pins(lines)
    if len(builds) > 1:
        p.append(f"{source}: several torch builds {_describe_pins(builds)}; install one everywhere")
    return p


def _image_pin_problems(cluster: ClusterSpec) -> list[str]:
    """A KubeRay container image names its Ray version, and a project image also its torch build."""
    p, path, spec = [], cluster.path, cluster.ray_cluster_spec
    groups = [(f"{cluster.spec_field}.headGroupSpec", spec["headGroupSpec"])]
    groups += [(f"{cluster.spec_field}.workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    for group_field, group in groups:
        container, at = ray_container(group, path, group_field)
        image = as_string(container.get("image", ""), path, f"{at}.image")
        if not image_ray_versions(image):
            p.append(f"{path}: {at}.image: {image!r} does not name its Ray version (rayproject/ray:X or a tag with -rayX)")
        if not image.startswith("rayproject/") and not _IMAGE_TORCH_RE.search(image):
            p.append(
                f"{path}: {at}.image: {image!r} does not name its torch build; tag the image you build as in "
                f"cluster/README.md (...-torch2.14.1-cu128) so the pin can be checked"
            )
    return p


def _outside(source: str, where: str, version: str, ray_range: SpecifierSet) -> str:
    return (
        f"{source}: {where}: Ray {version} is outside pyproject.toml's ray range {ray_range} (the tested "
        f"release line); images, rayVersion, pip pins and pyproject.toml must agree"
    )


def _tested_ray(ray_range: SpecifierSet) -> str:
    """`ray==<the installed Ray>` when it is inside the range (the one the tests ran), else the range."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        installed = importlib.metadata.version("ray")
        if installed in ray_range:
            return f"ray=={installed}"
    return f"ray{ray_range}"


def _describe_pins(pins: dict[tuple[str, str], list[str]]) -> str:
    return "; ".join(f"torch {v} {b} at {', '.join(where)}" for (v, b), where in sorted(pins.items()))
