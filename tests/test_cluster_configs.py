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

from raydino.config import load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import cluster_check as cc  # noqa: E402  (the repository's own config linter lives in tools/)
import cluster_rules as cr  # noqa: E402

LAUNCHER = [ROOT / "cluster/aws.yaml", ROOT / "cluster/gcp.yaml"]
KUBERAY = [ROOT / "cluster/kuberay/raycluster.yaml", ROOT / "cluster/kuberay/rayjob.yaml"]
CRD_DIR = ROOT / cr.DEFAULT_CRD_DIR  # CI has shared/ beside the clone
DOCS = [ROOT / "cluster/README.md"]


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def with_doc(cluster: cr.ClusterSpec, edit) -> cr.ClusterSpec:
    """A copy of a cluster file with `edit(doc)` applied, re-read like a file would be."""
    doc = copy.deepcopy(cluster.doc)
    edit(doc)
    return cr.cluster_from_doc(doc, cluster.path)


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
    view = cr.ray_view(cr.load_cluster(path))  # prepare_config + validate_config, or KubeRay's translation
    types = view["available_node_types"]
    assert any(t.get("resources", {}).get("GPU", 0) >= 1 for t in types.values())
    assert all(t["min_workers"] == 0 for t in types.values())  # everything scales from zero


@pytest.mark.parametrize("path", LAUNCHER, ids=ids(LAUNCHER))
def test_ray_rejects_what_its_schema_forbids(path):
    from jsonschema import ValidationError

    cluster = cr.load_cluster(path)
    fractional = with_doc(cluster, lambda d: d["available_node_types"]["cpu-data"]["resources"].update(CPU=0.5))
    with pytest.raises(ValidationError, match="integer"):
        cr.ray_view(fractional)
    typo = with_doc(cluster, lambda d: d["available_node_types"]["gpu-train"].update(max_worker=4))
    with pytest.raises(ValidationError, match="max_worker"):
        cr.ray_view(typo)


@pytest.mark.parametrize("path", KUBERAY, ids=ids(KUBERAY))
def test_node_types_read_like_rays_kuberay_autoscaler_reads_them(path):
    ours = cr.load_cluster(path)
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
    assert cr.crd_problems(cr.load_cluster(path), CRD_DIR) == []


def test_crd_check_catches_typos_and_non_string_start_params():
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR}")

    def break_it(doc):
        group = doc["spec"]["workerGroupSpecs"][0]
        group["minReplica"] = group.pop("minReplicas")
        group["rayStartParams"] = {"num-cpus": 4}

    problems = "\n".join(cr.crd_problems(with_doc(cr.load_cluster(KUBERAY[0]), break_it), CRD_DIR))
    assert "'minReplica' was unexpected" in problems
    assert "'minReplicas' is a required property" in problems
    assert "rayStartParams.num-cpus: 4 is not of type 'string'" in problems


def test_rayjob_runs_on_the_same_cluster_as_raycluster():
    cluster, job = (yaml.safe_load(p.read_text()) for p in KUBERAY)
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], "edit cluster/kuberay/raycluster.yaml and rayjob.yaml together"


# ---------------------------------------------------------------- raydino's rules


@pytest.mark.parametrize("path", LAUNCHER + KUBERAY, ids=ids(LAUNCHER + KUBERAY))
def test_cluster_files_follow_raydinos_rules(path):
    assert cr.check_rules(cr.load_cluster(path)) == []


def test_one_ray_version_everywhere_and_it_is_the_installed_one():
    versions = set().union(*(cr.ray_versions(cr.load_cluster(p)) for p in LAUNCHER + KUBERAY))
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
    problems = cr.check_rules(with_doc(cr.load_cluster(original), edit))
    assert any(expected in p for p in problems), problems


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
    return cc.check_commands(commands, [cr.load_cluster(p) for p in LAUNCHER + KUBERAY], ROOT)


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
    report = cc.check_commands(cc.find_commands([doc]), [cr.load_cluster(LAUNCHER[0])], ROOT)
    assert any(expected in e for e in report.errors), report.errors


# ---------------------------------------------------------------- bad input: a config no node type can hold


def test_a_config_no_node_type_can_hold_is_named_with_its_request_and_the_node_types():
    cfg = load_config("vits16-paper", ["run.gpus_per_worker=16"])
    with pytest.raises(cr.ClusterCheckError) as err:
        cc.check_fit("vits16-paper --set run.gpus_per_worker=16", cfg, cr.load_cluster(LAUNCHER[0]))
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
    aws = cr.load_cluster(LAUNCHER[0])
    with pytest.raises(cr.ClusterCheckError, match="holds at most 32"):
        cc.check_fit("vits16-paper", load_config("vits16-paper", ["run.workers=40"]), aws)
    with pytest.raises(cr.ClusterCheckError, match="data.augment_concurrency=1000"):
        cc.check_fit("vits16-paper", load_config("vits16-paper", ["data.augment_concurrency=1000"]), aws)
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
