"""Security rules for a cluster file: token authentication, who may reach the nodes, placeholders.

  * `auth_problems`: token authentication on every node (launcher `ray start` commands, or KubeRay's
    authOptions / the Ray container's env);
  * `network_problems`: SSH only from metadata.ssh_source_range (never 0.0.0.0/0), no port open to
    the internet, nodes on the user's own security group / network;
  * `placeholder_problems`: no YOUR-... left in a file about to be launched.

`cluster_rules.check_rules` runs them with the other rules; each returns problems (empty: fine).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from cluster_files import ClusterSpec, as_list, as_mapping, as_string, ray_container, strings_with_fields

# What a user must replace before launching (`--no-placeholders` rejects any left).
SSH_SOURCE_RANGE_PLACEHOLDER = "YOUR-SSH-SOURCE-RANGE"
PLACEHOLDER_RE = re.compile(r"YOUR-[A-Z0-9-]*[A-Z0-9]|your-registry\.example\.com")
_INTERNET = {"0.0.0.0/0", "::/0"}


# ---------------------------------------------------------------- token authentication

_START_COMMAND_LISTS = ("head_start_ray_commands", "worker_start_ray_commands")


def auth_problems(cluster: ClusterSpec) -> list[str]:
    """Token authentication on every node: without it anyone who reaches a Ray port can run code."""
    return _kuberay_auth_problems(cluster) if cluster.is_kuberay else _launcher_auth_problems(cluster)


def _launcher_auth_problems(cluster: ClusterSpec) -> list[str]:
    """Every `ray start` runs with RAY_AUTH_MODE=token and a token file that file_mounts puts there."""
    p, doc, path = [], cluster.doc, cluster.path
    mounted = {_home_path(target) for target in as_mapping(doc.get("file_mounts") or {}, path, "file_mounts")}
    for key in _START_COMMAND_LISTS:
        if key not in doc:
            p.append(f"{path}: {key} is missing: Ray's default commands start Ray without token authentication")
            continue
        commands = [as_string(c, path, f"{key}[{i}]") for i, c in enumerate(as_list(doc[key], path, key))]
        starts = [(i, c) for i, c in enumerate(commands) if "ray start" in c]
        if not starts:
            p.append(f"{path}: {key} has no `ray start` to turn token authentication on for")
        for i, command in starts:
            env = _auth_settings(command[: command.index("ray start")])
            at = f"{path}: {key}[{i}]"
            if env.get("RAY_AUTH_MODE") != "token":
                p.append(
                    f"{at}: `ray start` without RAY_AUTH_MODE=token: anyone who reaches the cluster's ports can "
                    f"submit jobs and run code; prefix it with `export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=...;`"
                )
            elif "RAY_AUTH_TOKEN" in env:
                p.append(f"{at}: the token is written into the config (RAY_AUTH_TOKEN=...); read it from a file with RAY_AUTH_TOKEN_PATH")
            elif "RAY_AUTH_TOKEN_PATH" not in env:
                p.append(f"{at}: RAY_AUTH_MODE=token but no RAY_AUTH_TOKEN_PATH: say which file (placed by file_mounts) holds the token")
            elif not _is_mounted(env["RAY_AUTH_TOKEN_PATH"], mounted):
                p.append(
                    f"{at}: the token file {env['RAY_AUTH_TOKEN_PATH']} is not a file_mounts target, so it is not on "
                    f"the nodes and `ray start` fails; mount it, e.g. `~/raydino_auth_token: ~/.ray/raydino_auth_token`"
                )
    return p


def _auth_settings(shell: str) -> dict[str, str]:
    """The RAY_AUTH_* variables a shell snippet sets (`export A=x B=y;` or `A=x cmd`), last one wins."""
    return {m.group(1): m.group(2).strip("\"'") for m in re.finditer(r"\b(RAY_AUTH_(?:MODE|TOKEN_PATH|TOKEN))=(\S+?)(?=[\s;]|$)", shell)}


def _is_mounted(path: str, mount_targets: set[str]) -> bool:
    """Whether file_mounts puts `path` on the nodes: it is a mount target or lies under one."""
    path = _home_path(path)
    return any(path == target or path.startswith(target + "/") for target in mount_targets)


def _home_path(path: str) -> str:
    """`$HOME/x`, `${HOME}/x` and `~/x` name the same file."""
    return re.sub(r"^(\$HOME|\$\{HOME\})/", "~/", path.strip()).rstrip("/")


def _kuberay_auth_problems(cluster: ClusterSpec) -> list[str]:
    """spec.authOptions.mode: token (KubeRay sets the env), or RAY_AUTH_MODE + a Secret on every container."""
    p, path, spec = [], cluster.path, cluster.ray_cluster_spec
    auth = as_mapping(spec.get("authOptions") or {}, path, f"{cluster.spec_field}.authOptions")
    by_operator = auth.get("mode") == "token"
    groups = [(f"{cluster.spec_field}.headGroupSpec", spec["headGroupSpec"])]
    groups += [(f"{cluster.spec_field}.workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    for group_field, group in groups:
        container, at = ray_container(group, path, group_field)
        env: dict[str, dict[str, Any]] = {}
        for i, var in enumerate(as_list(container.get("env") or [], path, f"{at}.env")):
            var = as_mapping(var, path, f"{at}.env[{i}]")
            env[str(var.get("name"))] = var
        mode = env.get("RAY_AUTH_MODE")
        token = env.get("RAY_AUTH_TOKEN")
        if mode is not None and mode.get("value") != "token":
            # KubeRay leaves a variable the container sets itself alone, so this wins over authOptions.
            p.append(f"{path}: {at}.env: RAY_AUTH_MODE={mode.get('value')!r} turns token authentication off; remove it or set token")
        if token is not None and "value" in token:
            p.append(f"{path}: {at}.env: RAY_AUTH_TOKEN is written into the manifest; take it from a Secret (valueFrom.secretKeyRef)")
        if by_operator or (mode is not None and mode.get("value") != "token"):
            continue
        if mode is None:
            p.append(
                f"{path}: {at}: no token authentication: set {cluster.spec_field}.authOptions "
                f"{{mode: token, secretName: ...}} (KubeRay >= 1.6), or env RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from a Secret"
            )
        elif token is None or not (token.get("valueFrom") or {}).get("secretKeyRef"):
            p.append(f"{path}: {at}.env: RAY_AUTH_MODE=token but no RAY_AUTH_TOKEN from a Secret (valueFrom.secretKeyRef)")
    return p


# ---------------------------------------------------------------- who may reach the nodes


def network_problems(cluster: ClusterSpec) -> list[str]:
    """SSH only from metadata.ssh_source_range, never 0.0.0.0/0; no Ray port open to the internet.

    The launcher cannot restrict SSH itself: a security group Ray creates on AWS always admits SSH
    from 0.0.0.0/0 (ray/autoscaler/_private/aws/config.py, `_create_default_ssh_inbound_rules`), and
    on GCP Ray puts VMs on a subnet it picks, normally the default network's, whose default-allow-ssh
    rule admits 0.0.0.0/0.  So the nodes must use the user's own group / network, made from the range.
    """
    if cluster.is_kuberay:
        return []  # the head service is ClusterIP (cluster_rules checks it); kubectl port-forward is the way in
    p, doc, path = [], cluster.doc, cluster.path
    metadata = as_mapping(doc.get("metadata") or {}, path, "metadata")
    source = metadata.get("ssh_source_range")
    if source is None:
        p.append(
            f"{path}: metadata.ssh_source_range is missing: name the one address range SSH may come from "
            f"(your address as /32), and make the security group / firewall rule from it (cluster/README.md)"
        )
    elif source != SSH_SOURCE_RANGE_PLACEHOLDER:  # the placeholder itself: placeholder_problems
        try:
            network = ipaddress.ip_network(str(source), strict=False)
        except ValueError:
            p.append(f"{path}: metadata.ssh_source_range: {source!r} is not an address range like 203.0.113.7/32")
        else:
            if network.prefixlen == 0:
                p.append(
                    f"{path}: metadata.ssh_source_range: {source} opens SSH to the whole internet; "
                    f"use your own address (/32) or your office/VPN range"
                )
    provider = as_mapping(doc["provider"], path, "provider")
    group = as_mapping(provider.get("security_group") or {}, path, "provider.security_group")
    for i, rule in enumerate(as_list(group.get("IpPermissions") or [], path, "provider.security_group.IpPermissions")):
        rule = as_mapping(rule, path, f"provider.security_group.IpPermissions[{i}]")
        ranges = {r.get("CidrIp") for r in rule.get("IpRanges", []) if isinstance(r, dict)}
        ranges |= {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", []) if isinstance(r, dict)}
        if ranges & _INTERNET:
            p.append(
                f"{path}: security_group opens ports {rule.get('FromPort')}-{rule.get('ToPort')} to the internet; "
                f"reach Ray through `ray dashboard` (SSH from metadata.ssh_source_range) instead"
            )
    for name, nt in doc["available_node_types"].items():
        conf = nt.get("node_config") or {}
        if cluster.kind == "aws" and not conf.get("SecurityGroupIds"):
            p.append(
                f"{path}: available_node_types.{name}.node_config has no SecurityGroupIds: Ray would create a "
                f"security group that admits SSH from 0.0.0.0/0; name your group made for metadata.ssh_source_range"
            )
        if cluster.kind == "gcp":
            interfaces = as_list(conf.get("networkInterfaces") or [], path, f"available_node_types.{name}.node_config.networkInterfaces")
            networks = " ".join(f"{nic.get('network', '')} {nic.get('subnetwork', '')}" for nic in interfaces if isinstance(nic, dict))
            if not interfaces or re.search(r"(^|/)default(\s|$)", networks.strip()):
                p.append(
                    f"{path}: available_node_types.{name}.node_config: no networkInterfaces on your own network: "
                    f"the default network's default-allow-ssh admits SSH from 0.0.0.0/0; use the raydino network"
                )
    return p


def placeholder_problems(cluster: ClusterSpec) -> list[str]:
    """Every YOUR-... / your-registry.example.com left in a file about to be launched."""
    problems = []
    for at, text in strings_with_fields(cluster.doc):
        m = PLACEHOLDER_RE.search(text)
        if m is None:
            continue
        what = "is still the placeholder;" if m.group() == text else f"still holds the placeholder {m.group()};"
        hint = " (the address range SSH may come from, e.g. your address/32)" if m.group() == SSH_SOURCE_RANGE_PLACEHOLDER else ""
        problems.append(f"{cluster.path}: {at}: {text!r} {what} fill it in{hint}, cluster/README.md")
    return problems
