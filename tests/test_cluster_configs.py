"""The cluster configurations in cluster/: Ray's own validation, the KubeRay CRD schemas, raydino's
rules and the consistency between the runbook's commands, the presets and the node types.

All offline: Ray's schema code and the CRD files are read locally, nothing talks to a cloud.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from raydino.config import load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import cluster_check as cc  # noqa: E402  (the repository's own config linter lives in tools/)
import cluster_files as cf  # noqa: E402
import cluster_pins as cp  # noqa: E402
import cluster_rules as cr  # noqa: E402
import cluster_security as cs  # noqa: E402

LAUNCHER = [ROOT / "cluster/aws.yaml", ROOT / "cluster/gcp.yaml"]
KUBERAY = [ROOT / "cluster/kuberay/raycluster.yaml", ROOT / "cluster/kuberay/rayjob.yaml"]
CRD_DIR = ROOT / cr.DEFAULT_CRD_DIR  # CI has shared/ beside the clone
DOCS = [ROOT / "cluster/README.md"]


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def with_doc(cluster: cf.ClusterSpec, edit) -> cf.ClusterSpec:
    """A copy of a cluster file with `edit(doc)` applied, re-read like a file would be."""
    doc = copy.deepcopy(cluster.doc)
    edit(doc)
    return cf.cluster_from_doc(doc, cluster.path)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------- Ray's own validation


@pytest.mark.parametrize("path", LAUNCHER + KUBERAY, ids=ids(LAUNCHER + KUBERAY))
def test_ray_validates_every_cluster_file_offline(path, no_network):
    view = cr.ray_view(cf.load_cluster(path))  # prepare_config + validate_config, or KubeRay's translation
    types = view["available_node_types"]
    assert any(t.get("resources", {}).get("GPU", 0) >= 1 for t in types.values())
    assert all(t["min_workers"] == 0 for t in types.values())  # everything scales from zero


@pytest.mark.parametrize("path", LAUNCHER, ids=ids(LAUNCHER))
def test_ray_rejects_what_its_schema_forbids(path):
    from jsonschema import ValidationError

    cluster = cf.load_cluster(path)
    fractional = with_doc(cluster, lambda d: d["available_node_types"]["cpu-data"]["resources"].update(CPU=0.5))
    with pytest.raises(ValidationError, match="integer"):
        cr.ray_view(fractional)
    typo = with_doc(cluster, lambda d: d["available_node_types"]["gpu-train"].update(max_worker=4))
    with pytest.raises(ValidationError, match="max_worker"):
        cr.ray_view(typo)


@pytest.mark.parametrize("path", KUBERAY, ids=ids(KUBERAY))
def test_node_types_read_like_rays_kuberay_autoscaler_reads_them(path):
    ours = cf.load_cluster(path)
    rays = cr.ray_view(ours)["available_node_types"]
    for nt in ours.node_types:
        theirs = rays["headgroup" if nt.is_head else nt.name]
        assert (theirs["resources"]["CPU"], theirs["resources"].get("GPU", 0)) == (nt.cpus, nt.gpus), nt.name
        if not nt.is_head:
            scaling = (theirs["min_workers"], theirs["max_workers"], theirs["labels"])
            assert scaling == (nt.min_workers, nt.max_nodes, nt.labels), nt.name


# ---------------------------------------------------------------- KubeRay CRD schemas


@pytest.mark.parametrize("path", KUBERAY, ids=ids(KUBERAY))
def test_kuberay_manifests_match_the_crd_schemas(path):
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR} (shared/ is expected beside the clone)")
    assert cr.crd_problems(cf.load_cluster(path), CRD_DIR) == []


def test_crd_check_catches_typos_and_non_string_start_params():
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR}")

    def break_it(doc):
        group = doc["spec"]["workerGroupSpecs"][0]
        group["minReplica"] = group.pop("minReplicas")
        group["rayStartParams"] = {"num-cpus": 4}

    problems = "\n".join(cr.crd_problems(with_doc(cf.load_cluster(KUBERAY[0]), break_it), CRD_DIR))
    assert "'minReplica' was unexpected" in problems
    assert "'minReplicas' is a required property" in problems
    assert "rayStartParams.num-cpus: 4 is not of type 'string'" in problems


def test_rayjob_runs_on_the_same_cluster_as_raycluster():
    cluster, job = (yaml.safe_load(p.read_text()) for p in KUBERAY)
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], "edit cluster/kuberay/raycluster.yaml and rayjob.yaml together"


# ---------------------------------------------------------------- raydino's rules


@pytest.mark.parametrize("path", LAUNCHER + KUBERAY, ids=ids(LAUNCHER + KUBERAY))
def test_cluster_files_follow_raydinos_rules(path):
    assert cr.check_rules(cf.load_cluster(path)) == []


def test_one_ray_version_everywhere_and_it_is_the_installed_one():
    versions = set().union(*(cr.ray_versions(cf.load_cluster(p)) for p in LAUNCHER + KUBERAY))
    assert versions == {importlib.metadata.version("ray")}


@pytest.mark.parametrize(
    "path, edit, expected",
    [
        ("aws.yaml", lambda d: d["available_node_types"]["head"]["resources"].update(CPU=8), "never trains"),
        ("aws.yaml", lambda d: d["available_node_types"]["cpu-data"]["node_config"].pop("IamInstanceProfile"), "only the head a role"),
        (
            "aws.yaml",
            lambda d: d["provider"].update(
                security_group={"IpPermissions": [{"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
            ),
            "to the internet",
        ),
        ("aws.yaml", lambda d: d["available_node_types"]["gpu-train"].update(min_workers=2), "scale from zero"),
        ("aws.yaml", lambda d: d["available_node_types"]["gpu-train"]["resources"].update(GPU=16), "p4d.24xlarge has 96 vCPUs / 8 GPUs"),
        ("aws.yaml", lambda d: d["available_node_types"]["cpu-data"].update(labels={"ray.io/node-type": "cpu"}), "may not use ray.io/"),
        ("aws.yaml", lambda d: d["docker"].update(image="rayproject/ray:2.40.0-py311-gpu"), "several Ray versions"),
        ("gcp.yaml", lambda d: d["available_node_types"]["gpu-train"]["node_config"].update(scheduling=[{"preemptible": True}]), "must be a mapping"),
        ("gcp.yaml", lambda d: d["available_node_types"]["cpu-data"]["node_config"].pop("serviceAccounts"), "default compute account"),
        ("raycluster.yaml", lambda d: d["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"), "keep ClusterIP"),
        ("raycluster.yaml", lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": "8"}), "never trains"),
        ("raycluster.yaml", lambda d: d["spec"].update(enableInTreeAutoscaling=False), "enableInTreeAutoscaling"),
        (
            "rayjob.yaml",
            lambda d: d["spec"].update(entrypoint="python -m raydino.pretrain --config vits16-paper --storage s3://b/runs"),
            "fixed --name",
        ),
        ("rayjob.yaml", lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "shutdownAfterJobFinishes"),
    ],
)
def test_rules_catch_bad_cluster_files(path, edit, expected):
    original = next(p for p in LAUNCHER + KUBERAY if p.name == path)
    problems = cr.check_rules(with_doc(cf.load_cluster(original), edit))
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------- token authentication and who may reach the nodes

TOKEN_FILE_ON_NODES = "~/raydino_auth_token"


def set_start_command(key: str, command: str):
    """An edit that replaces the `ray start` line (the second command) of head/worker_start_ray_commands."""

    def edit(doc):
        doc[key][1] = command

    return edit


def set_container_env(group_index: int, env: list[dict]):
    """An edit that gives a RayCluster worker group's Ray container these env variables."""

    def edit(doc):
        doc["spec"]["workerGroupSpecs"][group_index]["template"]["spec"]["containers"][0]["env"] = env

    return edit


def drop_node_config_key(node_type: str, key: str):
    def edit(doc):
        doc["available_node_types"][node_type]["node_config"].pop(key)

    return edit


@pytest.mark.parametrize("path", LAUNCHER, ids=ids(LAUNCHER))
def test_every_launcher_node_starts_ray_with_a_token_from_a_mounted_file(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["file_mounts"][TOKEN_FILE_ON_NODES] == "~/.ray/raydino_auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in doc[key] if "ray start" in c]
        before = start[: start.index("ray start")]
        assert "RAY_AUTH_MODE=token" in before and "RAY_AUTH_TOKEN_PATH=$HOME/raydino_auth_token" in before, start


@pytest.mark.parametrize("path", KUBERAY, ids=ids(KUBERAY))
def test_kuberay_clusters_use_token_auth_from_the_secret(path):
    spec = cf.load_cluster(path).ray_cluster_spec
    assert spec["authOptions"] == {"mode": "token", "secretName": "raydino-ray-auth"}


@pytest.mark.parametrize("path", LAUNCHER, ids=ids(LAUNCHER))
def test_ssh_source_range_is_a_required_placeholder_in_the_shipped_files(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["metadata"]["ssh_source_range"] == cs.SSH_SOURCE_RANGE_PLACEHOLDER


AUTH_AND_NETWORK_CASES = [
    # token authentication
    ("aws.yaml", set_start_command("head_start_ray_commands", "ray start --head --port=6379"), "without RAY_AUTH_MODE=token"),
    ("gcp.yaml", set_start_command("worker_start_ray_commands", "ray start --address=$RAY_HEAD_IP:6379"), "without RAY_AUTH_MODE=token"),
    ("aws.yaml", lambda d: d.pop("worker_start_ray_commands"), "worker_start_ray_commands is missing"),
    (
        "aws.yaml",
        set_start_command("worker_start_ray_commands", "export RAY_AUTH_MODE=disabled; ray start --address=$RAY_HEAD_IP:6379"),
        "without RAY_AUTH_MODE=token",
    ),
    (
        "aws.yaml",
        set_start_command("head_start_ray_commands", "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=abc123; ray start --head"),
        "token is written into the config",
    ),
    ("gcp.yaml", set_start_command("head_start_ray_commands", "export RAY_AUTH_MODE=token; ray start --head"), "no RAY_AUTH_TOKEN_PATH"),
    ("aws.yaml", lambda d: d["file_mounts"].pop(TOKEN_FILE_ON_NODES), "is not a file_mounts target"),
    ("raycluster.yaml", lambda d: d["spec"].pop("authOptions"), "no token authentication"),
    ("rayjob.yaml", lambda d: d["spec"]["rayClusterSpec"]["authOptions"].update(mode="disabled"), "no token authentication"),
    ("raycluster.yaml", set_container_env(0, [{"name": "RAY_AUTH_MODE", "value": "disabled"}]), "turns token authentication off"),
    (
        "raycluster.yaml",
        set_container_env(1, [{"name": "RAY_AUTH_MODE", "value": "token"}, {"name": "RAY_AUTH_TOKEN", "value": "abc123"}]),
        "RAY_AUTH_TOKEN is written into the manifest",
    ),
    # SSH only from the named range
    ("aws.yaml", lambda d: d["metadata"].update(ssh_source_range="0.0.0.0/0"), "opens SSH to the whole internet"),
    ("gcp.yaml", lambda d: d["metadata"].update(ssh_source_range="::/0"), "opens SSH to the whole internet"),
    ("aws.yaml", lambda d: d.pop("metadata"), "metadata.ssh_source_range is missing"),
    ("gcp.yaml", lambda d: d["metadata"].update(ssh_source_range="my laptop"), "is not an address range"),
    ("aws.yaml", drop_node_config_key("gpu-train", "SecurityGroupIds"), "admits SSH from 0.0.0.0/0"),
    ("gcp.yaml", drop_node_config_key("cpu-data", "networkInterfaces"), "default-allow-ssh"),
    (
        "aws.yaml",  # SSH itself from anywhere: allowed before the source range was required
        lambda d: d["provider"].update(
            security_group={"IpPermissions": [{"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
        ),
        "to the internet",
    ),
]


@pytest.mark.parametrize("path, edit, expected", AUTH_AND_NETWORK_CASES)
def test_rules_catch_missing_auth_and_open_ssh(path, edit, expected):
    original = next(p for p in LAUNCHER + KUBERAY if p.name == path)
    problems = cr.check_rules(with_doc(cf.load_cluster(original), edit))
    assert any(expected in p for p in problems), problems


def fill_in(doc):
    """What the runbook's section 1.1 does to cluster/aws.yaml."""
    doc["metadata"]["ssh_source_range"] = "203.0.113.7/32"
    for node_type in doc["available_node_types"].values():
        node_type["node_config"]["SecurityGroupIds"] = ["sg-0123456789abcdef0"]


def test_no_placeholders_rejects_every_placeholder_left_and_accepts_a_filled_in_copy(capsys):
    aws = cf.load_cluster(LAUNCHER[0])
    assert cr.check_rules(aws) == []  # the shipped template: placeholders are expected
    problems = cr.check_rules(aws, allow_placeholders=False)
    assert any("metadata.ssh_source_range: 'YOUR-SSH-SOURCE-RANGE' is still the placeholder" in p for p in problems), problems
    assert sum("SecurityGroupIds[0]: 'YOUR-SECURITY-GROUP-ID'" in p for p in problems) == 3, problems
    assert cr.check_rules(with_doc(aws, fill_in), allow_placeholders=False) == []
    assert cc.main([str(LAUNCHER[0]), "--no-placeholders", "--no-ray"]) == 1
    assert "YOUR-SSH-SOURCE-RANGE" in capsys.readouterr().out


# ---------------------------------------------------------------- pins: one Ray release, one torch build


def test_pyproject_admits_only_the_tested_ray_release_line():
    supported = cp.supported_ray_range()
    assert importlib.metadata.version("ray") in supported
    assert "2.60.0" in supported
    assert "2.59.0" not in supported and "2.61.0" not in supported


def test_ray_range_is_read_without_tomllib_too(monkeypatch, tmp_path):
    # Python 3.10 has no tomllib: the fallback must read the same dependencies and range.
    text = cp.PYPROJECT.read_text()
    if cp.tomllib is not None:  # Python >= 3.11: the fallback reads what tomllib reads
        assert cp._project_dependencies(text) == cp.tomllib.loads(text)["project"]["dependencies"]
    with_tomllib = cp.supported_ray_range.__wrapped__(cp.PYPROJECT)  # __wrapped__: past the lru_cache
    monkeypatch.setattr(cp, "tomllib", None)
    assert cp.supported_ray_range.__wrapped__(cp.PYPROJECT) == with_tomllib
    other = tmp_path / "pyproject.toml"
    # A comment with a quote, a single-quoted string, and another table's `dependencies` to ignore.
    other.write_text(
        """[project]
name = "x"
dependencies = [
  "numpy",  # ray["x"] in a comment
  'ray[tune]>=3,<4',
]
[tool.x]
dependencies = ["ray==1"]
"""
    )
    assert cp.supported_ray_range.__wrapped__(other) == SpecifierSet(">=3,<4")
    other.write_text('[tool.x]\ndependencies = ["ray==1"]\n')
    with pytest.raises(cf.ClusterCheckError, match="cannot read the project's dependencies"):
        cp.supported_ray_range.__wrapped__(other)


def test_ray_versions_are_checked_against_the_pyproject_range():
    # The same files against another range: every image / rayVersion is named as outside it.
    for path in LAUNCHER + KUBERAY:
        problems = cp.pin_problems(cf.load_cluster(path), SpecifierSet(">=2.61,<2.62"))
        assert problems and all("outside pyproject.toml's ray range" in p for p in problems), problems


def set_setup_commands(*commands: str):
    def edit(doc):
        doc["setup_commands"] = list(commands)

    return edit


def set_image(image: str):
    """An edit that gives every Ray container of a RayCluster or RayJob this image."""

    def edit(doc):
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            group["template"]["spec"]["containers"][0]["image"] = image

    return edit


WHEEL = "pip install --no-cache-dir ~/raydino-dist/raydino-*.whl"
TORCH_CU128 = "pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu128"

PIN_CASES = [
    ("aws.yaml", lambda d: d["docker"].update(image="rayproject/ray:2.59.0-py311-gpu"), "Ray 2.59.0 is outside pyproject.toml's ray range"),
    ("rayjob.yaml", lambda d: d["spec"]["rayClusterSpec"].update(rayVersion="2.61.0"), "Ray 2.61.0 is outside pyproject.toml's ray range"),
    (
        "raycluster.yaml",
        set_image("your-registry.example.com/raydino:0.1.0-ray2.59.0-py311-torch2.14.1-cu128"),
        "Ray 2.59.0 is outside pyproject.toml's ray range",
    ),
    ("gcp.yaml", set_setup_commands("pip install 'ray[default]==2.59.0'", TORCH_CU128, WHEEL), "Ray 2.59.0 is outside"),
    ("gcp.yaml", set_setup_commands("pip install 'ray[default]>=2.60'", TORCH_CU128, WHEEL), "without an exact version; pin the tested Ray"),
    ("aws.yaml", set_setup_commands("pip install torch torchvision", WHEEL), "pip installs torch without an exact version"),
    ("aws.yaml", set_setup_commands("pip install torch==2.14.1 torchvision==0.29.1", WHEEL), "without a CUDA build"),
    (
        "gcp.yaml",
        set_setup_commands("pip install torch==2.14.1 --index-url https://download.pytorch.org/whl/cpu", WHEEL),
        "without a CUDA build",
    ),
    ("aws.yaml", set_setup_commands(WHEEL), "installs raydino before a pinned torch"),
    ("aws.yaml", set_setup_commands(WHEEL, TORCH_CU128), "installs raydino before a pinned torch"),
    (
        "aws.yaml",
        lambda d: d.update(head_setup_commands=["pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"]),
        "several torch builds",
    ),
    ("raycluster.yaml", set_image("your-registry.example.com/raydino:0.1.0-ray2.60.0-py311-gpu"), "does not name its torch build"),
    ("rayjob.yaml", set_image("your-registry.example.com/raydino:latest"), "does not name its Ray version"),
]


@pytest.mark.parametrize("path, edit, expected", PIN_CASES)
def test_rules_catch_unpinned_or_disagreeing_versions(path, edit, expected):
    original = next(p for p in LAUNCHER + KUBERAY if p.name == path)
    problems = cr.check_rules(with_doc(cf.load_cluster(original), edit))
    assert any(expected in p for p in problems), problems


def test_launcher_configs_install_the_pinned_torch_before_the_wheel():
    for path in LAUNCHER:
        commands = yaml.safe_load(path.read_text())["setup_commands"]
        torch_at = next(i for i, c in enumerate(commands) if "torch==" in c)
        assert commands[torch_at] == TORCH_CU128
        assert torch_at < next(i for i, c in enumerate(commands) if "raydino-*.whl" in c)


def test_the_image_tags_and_the_runbook_dockerfile_name_one_torch_build(tmp_path):
    clusters = [cf.load_cluster(p) for p in LAUNCHER + KUBERAY]
    assert cc.pin_agreement(clusters, DOCS) == []
    builds = set().union(*(cp.torch_pins(cp.text_lines(c)) for c in clusters), cp.torch_pins(cp.doc_lines(DOCS[0])))
    assert builds == {("2.14.1", "cu128")}
    # A KubeRay image built for another torch than the launcher configs install: caught across files.
    other = with_doc(clusters[2], set_image("your-registry.example.com/raydino:0.1.0-ray2.60.0-py311-torch2.13.0-cu126"))
    errors = cc.pin_agreement([*clusters[:2], other], [])
    assert any("several torch builds" in e and "torch 2.13.0 cu126" in e and "torch 2.14.1 cu128" in e for e in errors), errors
    # A runbook that installs torch without its build, or another Ray.
    runbook = tmp_path / "README.md"
    runbook.write_text('pip install "ray[default]==2.59.0" boto3\nRUN pip install torch==2.14.1 && pip install /tmp/raydino-*.whl\n')
    errors = "\n".join(cc.pin_agreement([], [runbook]))
    assert f"{runbook}: line 1: Ray 2.59.0 is outside" in errors
    assert f"{runbook}: line 2: pip installs torch==2.14.1 without a CUDA build" in errors


# ---------------------------------------------------------------- malformed files: an error naming the field, not a traceback


def set_path(keys: tuple, value):
    """An edit that sets doc[k1][k2]...[kn] = value."""

    def edit(doc):
        node = doc
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


MALFORMED_CASES = [
    (
        "aws.yaml",
        ("available_node_types", "cpu-data", "resources", "CPU"),
        "lots",
        "available_node_types.cpu-data.resources.CPU: 'lots' is not a number",
    ),
    (
        "gcp.yaml",
        ("available_node_types", "gpu-train", "resources", "GPU"),
        True,
        "available_node_types.gpu-train.resources.GPU: True is not a number",
    ),
    (
        "aws.yaml",
        ("available_node_types", "gpu-train", "max_workers"),
        "four",
        "available_node_types.gpu-train.max_workers: 'four' is not a whole number",
    ),
    ("gcp.yaml", ("available_node_types", "head", "resources"), "CPU=0", "available_node_types.head.resources: 'CPU=0' is not a mapping"),
    ("aws.yaml", ("available_node_types", "cpu-data", "labels"), ["cpu-data"], "available_node_types.cpu-data.labels: ['cpu-data'] is not a mapping"),
    ("aws.yaml", ("head_start_ray_commands",), "ray start --head", "head_start_ray_commands: 'ray start --head' is not a list"),
    ("gcp.yaml", ("metadata",), "203.0.113.7/32", "metadata: '203.0.113.7/32' is not a mapping"),
    (
        "raycluster.yaml",
        ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits", "cpu"),
        "lots",
        'spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.cpu: \'lots\' is not a Kubernetes quantity (8, "8", "500m")',
    ),
    (
        "rayjob.yaml",
        ("spec", "rayClusterSpec", "workerGroupSpecs", 1, "minReplicas"),
        "zero",
        "spec.rayClusterSpec.workerGroupSpecs[1].minReplicas: 'zero' is not a whole number",
    ),
    (
        "raycluster.yaml",
        ("spec", "headGroupSpec", "template", "spec", "containers"),
        {},
        "spec.headGroupSpec.template.spec.containers: {} is not a list",
    ),
]


@pytest.mark.parametrize("path, keys, value, expected", MALFORMED_CASES)
def test_a_field_of_the_wrong_type_is_an_error_naming_the_file_the_field_and_the_value(path, keys, value, expected):
    original = next(p for p in LAUNCHER + KUBERAY if p.name == path)
    with pytest.raises(cf.ClusterCheckError) as err:
        broken = with_doc(cf.load_cluster(original), set_path(keys, value))
        cr.check_rules(broken)
    assert str(err.value) == f"{original}: {expected}"


def test_command_line_reports_a_malformed_file_without_a_traceback(tmp_path, capsys):
    text = LAUNCHER[0].read_text()
    assert text.count("resources: {CPU: 32}") == 1
    broken = tmp_path / "aws.yaml"
    broken.write_text(text.replace("resources: {CPU: 32}", "resources: {CPU: lots}"))
    assert cc.main([str(broken), "--no-ray"]) == 1
    out = capsys.readouterr().out
    assert f"{broken}: available_node_types.cpu-data.resources.CPU: 'lots' is not a number" in out
    assert "Traceback" not in out and "cluster_check: 1 error(s)" in out


# ---------------------------------------------------------------- IAM policies


def test_iam_policies_are_valid_and_match_the_launcher_config():
    moto = pytest.importorskip("moto")
    import boto3

    aws = yaml.safe_load(LAUNCHER[0].read_text())
    bucket = json.loads((ROOT / "cluster/iam-policy-one-bucket.json").read_text())
    head = json.loads((ROOT / "cluster/iam-policy-head-launcher.json").read_text())
    with moto.mock_aws():  # moto's IAM applies IAM's policy-grammar checks (Version, Effect, Action, ARNs)
        iam = boto3.client("iam", region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
        for name, doc in (("bucket", bucket), ("head", head)):
            iam.create_policy(PolicyName=name, PolicyDocument=json.dumps(doc))
        with pytest.raises(iam.exceptions.MalformedPolicyDocumentException):
            iam.create_policy(PolicyName="broken", PolicyDocument=json.dumps({**bucket, "Statement": [{"Effect": "Allowed"}]}))
    # The head may stop only this cluster's nodes and pass only the role the workers use.
    stop = next(s for s in head["Statement"] if "ec2:TerminateInstances" in s["Action"])
    assert stop["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == aws["cluster_name"]
    passable = next(s["Resource"] for s in head["Statement"] if s["Action"] == "iam:PassRole")
    profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for n, t in aws["available_node_types"].items() if n != aws["head_node_type"]}
    assert profiles == {passable.rsplit("/", 1)[1]}
    assert {r for s in bucket["Statement"] for r in [s["Resource"]]} == {"arn:aws:s3:::YOUR-BUCKET", "arn:aws:s3:::YOUR-BUCKET/*"}


# ---------------------------------------------------------------- commands in cluster/ vs the package


@pytest.fixture(scope="module")
def command_report() -> cc.Report:
    commands = cc.find_commands(LAUNCHER + KUBERAY + DOCS)
    return cc.check_commands(commands, [cf.load_cluster(p) for p in LAUNCHER + KUBERAY], ROOT)


def test_the_runbook_and_rayjob_commands_are_found():
    commands = cc.find_commands(LAUNCHER + KUBERAY + DOCS)
    pretrain = [c for c in commands if c.module == "raydino.pretrain"]
    assert {c.options.get("--config") for c in pretrain} >= {"vits16-paper", "smoke"}
    (entrypoint,) = cc.find_commands([KUBERAY[1]])
    assert entrypoint.module == "raydino.pretrain" and entrypoint.options["--name"] == "vits16-weak"
    assert any(c.module == "raydino.tune" for c in commands)


def test_commands_in_cluster_files_exist_parse_and_fit(command_report):
    assert command_report.errors == []
    # Every pretraining command was placed on every cluster file (8 GPUs per gpu-train node).
    assert any("vits16-paper" in f and "gpu-train: 8/node" in f for f in command_report.fits)
    assert {f.split(":")[0] for f in command_report.fits} == {str(p) for p in LAUNCHER + KUBERAY}


def test_command_parsing_follows_shell_lines(tmp_path):
    doc = tmp_path / "runbook.md"
    doc.write_text(
        "Run `python -m raydino.pretrain --help` first.\n"
        "ray job submit -- python -m raydino.pretrain --config smoke \\\n"
        "   --set train.epochs=1 --set=run.workers=3 --name a-run --resume && echo done\n"
        "#   python -m raydino.pretrain --config demo \\\n#     --workers 2\n"
    )
    commands = {tuple(c.args): c for c in cc.find_commands([doc])}
    assert ("--help",) in commands
    full = commands[("--config", "smoke", "--set", "train.epochs=1", "--set=run.workers=3", "--name", "a-run", "--resume")]
    assert full.sets == ["train.epochs=1", "run.workers=3"] and full.options["--name"] == "a-run"
    assert ("--config", "demo", "--workers", "2") in commands


@pytest.mark.parametrize(
    "line, expected",
    [
        ("python -m raydino.pretrian --config smoke", "module raydino.pretrian does not exist"),
        ("python -m raydino.pretrain --config vit16-paper", "unknown config 'vit16-paper'"),
        ("python -m raydino.pretrain --config smoke --set train.epoch=3", "unknown config key"),
        ("python -m raydino.pretrain --config smoke --epochs 3", "unrecognized arguments: --epochs 3"),
        ("python -m raydino.pretrain --config vits16-paper --gpus-per-worker 16", "no node type"),
    ],
)
def test_bad_commands_are_caught(tmp_path, line, expected):
    doc = tmp_path / "runbook.md"
    doc.write_text(line + "\n")
    report = cc.check_commands(cc.find_commands([doc]), [cf.load_cluster(LAUNCHER[0])], ROOT)
    assert any(expected in e for e in report.errors), report.errors


# ---------------------------------------------------------------- bad input: a config no node type can hold


def test_a_config_no_node_type_can_hold_is_named_with_its_request_and_the_node_types():
    cfg = load_config("vits16-paper", ["run.gpus_per_worker=16"])
    with pytest.raises(cf.ClusterCheckError) as err:
        cc.check_fit("vits16-paper --set run.gpus_per_worker=16", cfg, cf.load_cluster(LAUNCHER[0]))
    msg = str(err.value)
    for part in (
        "vits16-paper",
        "8 workers x {GPU: 16, CPU: 8}",
        "head {CPU: 0, GPU: 0}",
        "gpu-train {CPU: 96, GPU: 8} (max 4)",
        "cpu-data {CPU: 32, GPU: 0}",
    ):
        assert part in msg, msg


def test_too_many_workers_and_too_many_augmenters_are_caught():
    aws = cf.load_cluster(LAUNCHER[0])
    with pytest.raises(cf.ClusterCheckError, match="holds at most 32"):
        cc.check_fit("vits16-paper", load_config("vits16-paper", ["run.workers=40"]), aws)
    with pytest.raises(cf.ClusterCheckError, match="data.augment_concurrency=1000"):
        cc.check_fit("vits16-paper", load_config("vits16-paper", ["data.augment_concurrency=1000"]), aws)
    # vits16-paper pins its data tasks to cpu-data (8 x 32 CPUs): 300 fit the cluster's spare CPUs, not those nodes
    with pytest.raises(cf.ClusterCheckError, match=r"300 tasks x 1 CPU .* do not fit the 256 CPUs the node types labelled"):
        cc.check_fit("vits16-paper", load_config("vits16-paper", ["data.augment_concurrency=300"]), aws)
    cc.check_fit("vits16-paper", load_config("vits16-paper", ["data.augment_concurrency=300", "data.node_labels=null"]), aws)
    # and its workers never go to a cpu-data node, even where one could hold them
    cpu_workers = ["run.gpus_per_worker=0", "run.cpus_per_worker=4"]
    assert {n for n, _, _ in cc.check_fit("cpu", load_config("vits16-paper", cpu_workers), aws).places} == {"gpu-train"}
    assert {n for n, _, _ in cc.check_fit("cpu", load_config("vits16-paper", [*cpu_workers, "data.node_labels=null"]), aws).places} == {
        "gpu-train",
        "cpu-data",
    }
    fit = cc.check_fit("smoke", load_config("smoke"), aws)  # CPU-only: the CPU nodes and the GPU nodes' CPUs
    assert {name for name, _, _ in fit.places} == {"gpu-train", "cpu-data"}


def test_command_line_reports_the_unfit_config(capsys):
    code = cc.main([str(LAUNCHER[0]), str(KUBERAY[0]), "--config", "vits16-paper", "--set", "run.gpus_per_worker=16", "--no-ray"])
    out = capsys.readouterr().out
    assert code == 1
    assert out.count("no node type") == 2 and "GPU: 16" in out


def test_command_line_passes_on_the_shipped_files(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cc.main([]) == 0, capsys.readouterr().out
    assert "cluster_check: ok" in capsys.readouterr().out


def test_cluster_check_does_not_import_ray():
    code = "import sys; sys.path.insert(0, 'tools'); import cluster_check; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
