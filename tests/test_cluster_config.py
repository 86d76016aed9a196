"""The cluster launcher configs (cluster.yaml, cluster-onprem.yaml) and the commands docs/cluster.md gives for them.

Everything here runs offline: Ray's own config preparation and validator (what `ray up` runs before it
contacts a cloud), plain YAML checks, and Ray's and farm's click command trees for the documented
commands. Each checker is also shown failing on a bad sample, so a pass means something.
"""

from __future__ import annotations

import ast
import copy
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"aws": "cluster.yaml", "onprem": "cluster-onprem.yaml"}
REPO_ON_NODE = "/home/ubuntu/farm"
# Ray's token file on a node (Ray's default path, ~/.ray/auth_token, in the login user's home) and its source here.
TOKEN_ON_NODE = "/home/ubuntu/.ray/auth_token"
TOKEN_HERE = "~/.ray/auth_token"
TORCH = "torch==2.13.0"


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / CONFIGS[name]).read_text())


def prepare(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` makes of a config before it validates it: defaults merged, node types filled in."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(config))


def ray_check(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's own checks, in `ray up`'s order (prepare, then the JSON schema and cross-field rules)."""
    from ray.autoscaler._private.util import validate_config

    prepared = prepare(config)
    validate_config(prepared)
    return prepared


# ---------------------------------------------------------------------------------------
# Ray's validator


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_accepts_the_config(name: str) -> None:
    raw = load(name)
    prepared = ray_check(raw)
    # Our commands replace Ray's defaults rather than being merged away.
    for key in ("head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert prepared[key] == raw[key]


def _set(config: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    config = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = value
    return config


@pytest.mark.parametrize(
    "name, path, value, error",
    [
        ("aws", "available_node_types.gpu_worker.min_worker", 1, jsonschema.ValidationError),  # misspelt key
        ("aws", "available_node_types.gpu_worker.resources", {"GPU": -1}, jsonschema.ValidationError),
        ("aws", "provider.security_group.IpPermission", [], jsonschema.ValidationError),  # misspelt key
        ("aws", "head_node_type", "no_such_type", ValueError),
        ("aws", "available_node_types.gpu_worker.min_workers", 9, ValueError),  # above max_workers (8)
        ("onprem", "dashboard_host", "127.0.0.1", jsonschema.ValidationError),  # not a cluster key
        ("onprem", "auth.ssh_key", "~/.ssh/id_ed25519", jsonschema.ValidationError),
    ],
)
def test_ray_rejects_a_broken_config(name: str, path: str, value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        ray_check(_set(load(name), path, value))


# ---------------------------------------------------------------------------------------
# Network exposure


def non_ssh_openings(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The inbound rules that open anything but tcp port 22."""
    bad = []
    for rule in rules:
        protocol = str(rule.get("IpProtocol", "")).lower()
        if (protocol, rule.get("FromPort"), rule.get("ToPort")) != ("tcp", 22, 22):
            bad.append(rule)
    return bad


def test_ssh_checker_flags_other_ports() -> None:
    ssh = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    dashboard = {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    everything = {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    wide = {"IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535}
    udp = {"IpProtocol": "udp", "FromPort": 22, "ToPort": 22}
    assert non_ssh_openings([ssh]) == []
    assert non_ssh_openings([ssh, dashboard, everything, wide, udp]) == [dashboard, everything, wide, udp]


def test_aws_security_group_opens_only_ssh() -> None:
    config = load("aws")
    group = config["provider"]["security_group"]
    assert group["GroupName"]
    assert non_ssh_openings(group.get("IpPermissions", [])) == []
    # A node type with its own SecurityGroupIds would bypass this group altogether.
    for node_type in config["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"]


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def test_rays_own_rules_add_only_ssh_and_node_to_node() -> None:
    """The rules Ray writes into the group besides IpPermissions (read from its source: no boto3 here)."""
    import ray.autoscaler

    source = Path(ray.autoscaler.__file__).parent / "_private" / "aws" / "config.py"
    tree = ast.parse(source.read_text())

    merged = _function(tree, "_create_default_inbound_rules")
    called = {n.func.id for n in ast.walk(merged) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert {c for c in called if c.startswith("_create_default")} == {
        "_create_default_intracluster_inbound_rules",
        "_create_default_ssh_inbound_rules",
    }

    ssh = _function(tree, "_create_default_ssh_inbound_rules")
    (returned,) = [n.value for n in ast.walk(ssh) if isinstance(n, ast.Return)]
    rules = ast.literal_eval(returned)
    assert rules and non_ssh_openings(rules) == []

    # Node-to-node traffic is allowed by group membership, never by address range.
    intracluster = _function(tree, "_create_default_intracluster_inbound_rules")
    strings = {n.value for n in ast.walk(intracluster) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert "UserIdGroupPairs" in strings
    assert not strings & {"IpRanges", "Ipv6Ranges", "PrefixListIds"}


DASHBOARD_HOST = re.compile(r"--dashboard-host[= ]\s*(\S+)")
LOCALHOST = {"127.0.0.1", "localhost", "::1"}


def exposed_dashboards(text: str) -> list[str]:
    """Every --dashboard-host value that is not loopback, anywhere in the text."""
    return [host for host in DASHBOARD_HOST.findall(text) if host.strip("'\"") not in LOCALHOST]


def test_dashboard_checker_flags_public_binds() -> None:
    assert exposed_dashboards("ray start --head --dashboard-host=127.0.0.1") == []
    assert exposed_dashboards("ray start --head --dashboard-host=0.0.0.0\nray start --dashboard-host ::") == [
        "0.0.0.0",
        "::",
    ]


@pytest.mark.parametrize("name", CONFIGS)
def test_dashboard_binds_to_localhost(name: str) -> None:
    text = (ROOT / CONFIGS[name]).read_text()
    assert exposed_dashboards(text) == []
    assert "0.0.0.0" not in text
    prepared = prepare(load(name))
    head_starts = [c for c in prepared["head_start_ray_commands"] if "ray start" in c]
    assert len(head_starts) == 1
    (start,) = head_starts
    assert "--head" in start
    assert "--dashboard-host=127.0.0.1" in start
    # The head runs the autoscaler from the config `ray up` copies over.
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    worker_starts = [c for c in prepared["worker_start_ray_commands"] if "ray start" in c]
    assert worker_starts and all("--address=$RAY_HEAD_IP:6379" in c and "--head" not in c for c in worker_starts)


# ---------------------------------------------------------------------------------------
# What each node gets


def setup_by_role(prepared: dict[str, Any]) -> dict[str, list[str]]:
    """The setup commands each node runs, per node type and role (as Ray merges them)."""
    roles = {}
    for name, node_type in prepared["available_node_types"].items():
        if name == prepared["head_node_type"]:
            roles[f"{name} as head"] = prepared["head_setup_commands"]
        if node_type.get("max_workers", 0) > 0:
            roles[f"{name} as worker"] = node_type.get("worker_setup_commands", prepared["worker_setup_commands"])
    return roles


def _first(commands: list[str], pattern: str) -> int | None:
    return next((i for i, c in enumerate(commands) if re.search(pattern, c)), None)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_type_installs_farm(name: str) -> None:
    prepared = prepare(load(name))
    assert prepared["file_mounts"][REPO_ON_NODE] == "."
    roles = setup_by_role(prepared)
    # aws: the head and the GPU workers; onprem: one node type that is both head and worker
    assert len(roles) == 2
    gpu_types = {n for n, t in prepared["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}
    for role, commands in roles.items():
        ray = _first(commands, r"pip install .*ray\[default[^\]]*\]==2\.60\.0")
        torch = _first(commands, rf"pip install .*{re.escape(TORCH)}")
        farm = _first(commands, rf"pip install .*-e {re.escape(REPO_ON_NODE)}$")
        assert None not in (ray, torch, farm), role
        assert ray < farm and torch < farm, f"{role}: Ray and torch go in before farm"
        node_type = role.split(" as ")[0]
        if role.endswith("as worker") and (node_type in gpu_types or prepared["provider"]["type"] == "local"):
            assert "download.pytorch.org/whl/cu128" in commands[torch], f"{role} needs torch's CUDA build"


def test_setup_checker_notices_a_missing_install() -> None:
    prepared = prepare(load("aws"))
    prepared["worker_setup_commands"] = [c for c in prepared["worker_setup_commands"] if "-e /home" not in c]
    roles = setup_by_role(prepared)
    assert _first(roles["gpu_worker as worker"], rf"pip install .*-e {re.escape(REPO_ON_NODE)}$") is None
    assert _first(roles["head as head"], rf"pip install .*-e {re.escape(REPO_ON_NODE)}$") is not None


@pytest.mark.parametrize("name", CONFIGS)
def test_repo_and_jobs_are_mounted_at_the_same_path_everywhere(name: str) -> None:
    config = load(name)
    assert config["file_mounts"] == {REPO_ON_NODE: ".", f"{REPO_ON_NODE}/jobs": "./jobs", TOKEN_ON_NODE: TOKEN_HERE}
    assert (ROOT / "jobs").is_dir()
    # .gitignore keeps this machine's .venv and outputs off the nodes.
    assert ".gitignore" in config["rsync_filter"]
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".venv/" in ignored and "out/" in ignored


@pytest.mark.parametrize("name", CONFIGS)
def test_caches_live_on_shared_storage_and_reach_ray(name: str) -> None:
    prepared = prepare(load(name))
    setup = " ".join(prepared["setup_commands"])
    assert "export FARM_HOME=/mnt/shared/farm HF_HOME=/mnt/shared/huggingface" in setup
    assert "> ~/farm.env" in setup
    # Ray workers (the render actors) inherit the environment of `ray start`.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert all(c.startswith("source ~/farm.env;") for c in prepared[key])


def test_aws_head_takes_no_render_work() -> None:
    config = load("aws")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    (worker,) = [t for n, t in types.items() if n != config["head_node_type"]]
    assert worker["resources"]["GPU"] == 1
    assert 0 <= worker["min_workers"] <= worker["max_workers"] <= config["max_workers"]
    assert config["provider"]["cache_stopped_nodes"] is False


def test_onprem_keeps_every_listed_worker() -> None:
    config = load("onprem")
    count = len(config["provider"]["worker_ips"])
    assert config["min_workers"] == config["max_workers"] == count
    (node_type,) = prepare(config)["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == count


# ---------------------------------------------------------------------------------------
# A comment on every key

KEY_LINE = re.compile(r"""^\s*(?:-\s+)?(?P<key>"[^"]*"|'[^']*'|[A-Za-z_][\w.\-/]*)\s*:(?:\s|$)""")
BLOCK_START = re.compile(r"(?:^|[:-])\s*[|>][0-9+-]*$")


def split_comment(line: str) -> tuple[str, str | None]:
    """A YAML line's code and its comment: '#' after whitespace, outside a quoted scalar."""
    quote = None
    i = 0
    while i < len(line):
        char = line[i]
        if quote:
            if quote == '"' and char == "\\":
                i += 2
                continue
            if char == quote:
                quote = None
        elif char in "\"'" and line[:i].rstrip()[-1:] in ("", "-", ":", "[", "{", ","):
            quote = char  # a quote opens a scalar only where a scalar starts
        elif char == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i], line[i:]
        i += 1
    return line, None


def scan_keys(text: str) -> list[tuple[int, str, bool]]:
    """(line number, key, commented?) of every mapping key that starts a line, block scalars skipped.

    Commented: a comment on the key's line, or a comment line right above it.
    """
    keys = []
    lines = text.splitlines()
    block_indent = None
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if not stripped or indent > block_indent:
                continue  # inside a block scalar (| or >): text, not keys
            block_indent = None
        if not stripped or stripped.startswith("#"):
            continue
        code, comment = split_comment(line)
        if match := KEY_LINE.match(code):
            above = lines[number - 2].strip() if number > 1 else ""
            keys.append((number, match.group("key"), comment is not None or above.startswith("#")))
        if BLOCK_START.search(code.rstrip()):
            block_indent = indent
    return keys


def uncommented_keys(text: str) -> list[tuple[int, str]]:
    """(line number, key) of every mapping key with no comment on its line or on the line above."""
    return [(number, key) for number, key, commented in scan_keys(text) if not commented]


def yaml_key_lines(text: str) -> set[int]:
    """The lines on which PyYAML sees a block mapping's key (flow mappings sit on their parent key's line)."""
    lines, stack = set(), [yaml.compose(text)]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            if not node.flow_style:
                lines.update(key.start_mark.line + 1 for key, _ in node.value)
            stack += [value for _, value in node.value]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value
    return lines


def strip_comments_of(text: str, key: str) -> str:
    """The text with the first `key:` line's comments removed: inline, and the comment lines just above."""
    lines = text.splitlines()
    index = next(i for i, line in enumerate(lines) if (m := KEY_LINE.match(line)) and m.group("key") == key)
    lines[index] = split_comment(lines[index])[0].rstrip()
    start = index
    while start > 0 and lines[start - 1].strip().startswith("#"):
        start -= 1
    return "\n".join(lines[:start] + lines[index:]) + "\n"


def test_comment_checker_on_a_sample() -> None:
    sample = """\
# a: commented above
a: 1
b: 2  # commented inline
c: "x # inside quotes, not a comment"
d:
  # commented above
  - e: 1
  - >-
    f: block text, not a key
# a blank line breaks "the line above"

g: 2
h: |  # commented inline
  i: block text
j: 'k' # commented inline after a quoted scalar
l: don't # commented inline after a plain scalar with an apostrophe
m: [n, o]
"""
    assert yaml.safe_load(sample)["d"] == [{"e": 1}, "f: block text, not a key"]
    assert uncommented_keys(sample) == [(4, "c"), (5, "d"), (12, "g"), (17, "m")]
    assert yaml_key_lines(sample) == {number for number, _, _ in scan_keys(sample)}
    # A key the line scan cannot read is caught by the comparison with YAML's view.
    odd = "# fine\n? complex key\n: 1\n"
    assert yaml_key_lines(odd) == {2} and scan_keys(odd) == []


@pytest.mark.parametrize("name", CONFIGS)
def test_every_key_has_a_comment(name: str) -> None:
    text = (ROOT / CONFIGS[name]).read_text()
    assert uncommented_keys(text) == []
    # The line scan sees every key YAML sees, so no key escapes it.
    assert yaml_key_lines(text) <= {number for number, _, _ in scan_keys(text)}


@pytest.mark.parametrize(
    "name, key",
    [
        ("aws", "idle_timeout_minutes"),
        ("aws", "GroupName"),
        ("aws", "VolumeSize"),
        ("aws", '"/home/ubuntu/farm/jobs"'),
        ("aws", "head_start_ray_commands"),
        ("onprem", "worker_ips"),
        ("onprem", "ssh_private_key"),
    ],
)
def test_comment_checker_catches_a_removed_comment(name: str, key: str, tmp_path: Path) -> None:
    broken = tmp_path / CONFIGS[name]
    broken.write_text(strip_comments_of((ROOT / CONFIGS[name]).read_text(), key))
    assert yaml.safe_load(broken.read_text()) == load(name)  # only comments changed
    assert [k for _, k in uncommented_keys(broken.read_text())] == [key]


# ---------------------------------------------------------------------------------------
# The documented commands exist in Ray 2.60 and farm


def cluster_docs() -> str:
    """The cluster page of the manual, docs/cluster.md."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    assert text.startswith("# Running on a cluster\n"), "docs/cluster.md is not the cluster page"
    return text


def shell_lines(markdown: str) -> list[str]:
    """The command lines of the ```sh blocks, continuation lines joined."""
    lines = []
    for block in re.findall(r"^\s*```sh\n(.*?)^\s*```", markdown, re.M | re.S):
        lines += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def _subcommand(group: Any, name: str) -> Any:
    commands = getattr(group, "commands", None)
    return commands.get(name) if commands is not None else None


def check_command(tokens: list[str], clis: dict[str, Any], seen: list[tuple[str, list[str]]]) -> list[str]:
    """Errors for `ray ...` / `farm ...` in tokens: unknown sub-commands or options. Records what it saw."""
    errors = []
    segments, current = [], []
    for token in tokens:
        if token in ("&&", ";", "||", "|"):
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    for segment in segments:
        for token in segment:
            if " " in token:  # a quoted command, e.g. the CMD of `ray exec`
                errors += check_command(shlex.split(token), clis, seen)
        if not segment or segment[0] not in clis:
            continue
        command, path, rest = clis[segment[0]], [segment[0]], segment[1:]
        while rest and _subcommand(command, rest[0]) is not None:
            command = _subcommand(command, rest[0])
            path.append(rest.pop(0))
        if getattr(command, "commands", None) is not None:
            errors.append(f"{' '.join(path)}: no sub-command {rest[:1]}")
            continue
        options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        name = " ".join(path)
        for i, token in enumerate(rest):
            if token == "--":  # the rest is another command (`ray job submit ... -- farm render ...`)
                errors += check_command(rest[i + 1 :], clis, seen)
                rest = rest[:i]
                break
            if token.startswith("-") and token.split("=")[0] not in options:
                errors.append(f"{name}: no option {token.split('=')[0]}")
        seen.append((name, rest))
    return errors


@pytest.fixture(scope="module")
def clis() -> dict[str, Any]:
    from ray.scripts.scripts import cli as ray_cli

    from farm.cli import main as farm_cli

    return {"ray": ray_cli, "farm": farm_cli}


def test_command_checker_flags_unknown_commands_and_options(clis: dict[str, Any]) -> None:
    seen: list[tuple[str, list[str]]] = []
    good = "ray job submit --address http://127.0.0.1:8265 --working-dir . -- farm render x.yaml --address auto"
    assert check_command(shlex.split(good), clis, seen) == []
    assert [name for name, _ in seen] == ["farm render", "ray job submit"]
    bad = [
        "ray up cluster.yaml --no-such-flag",
        "ray attach cluster.yaml --port-forwarding 10001",
        'ray exec cluster.yaml "ray statuz"',
        "ray job submit --working-dir . -- farm render x.yaml --adress auto",
    ]
    errors = [e for line in bad for e in check_command(shlex.split(line), clis, [])]
    assert errors == [
        "ray up: no option --no-such-flag",
        "ray attach: no option --port-forwarding",
        "ray: no sub-command ['statuz']",
        "farm render: no option --adress",
    ]


def test_documented_commands_exist(clis: dict[str, Any]) -> None:
    seen: list[tuple[str, list[str]]] = []
    errors = [
        e for line in shell_lines(cluster_docs()) for e in check_command(shlex.split(line, comments=True), clis, seen)
    ]
    assert errors == []
    names = {name for name, _ in seen}
    # The walk-through: up, submit, watch, fetch, query, down.
    assert {"ray up", "ray dashboard", "ray job submit", "ray job logs", "ray attach", "ray exec"} <= names
    assert "ray get-auth-token" in names
    assert {"ray rsync-down", "farm render", "farm query", "ray down"} <= names


def test_documented_renders_join_the_cluster_and_share_their_output(clis: dict[str, Any]) -> None:
    seen: list[tuple[str, list[str]]] = []
    for line in shell_lines(cluster_docs()):
        check_command(shlex.split(line, comments=True), clis, seen)
    renders = [args for name, args in seen if name == "farm render"]
    assert len(renders) >= 3
    for args in renders:
        # Without --address farm starts its own one-node Ray (inside a Ray job: on the head).
        assert "--address" in args, args
        out = args[args.index("--out") + 1]
        assert out.startswith("/") or "://" in out, f"--out {out} is not shared by the nodes"


# ---------------------------------------------------------------------------------------
# Ray's token authentication: the token reaches every node and every documented client


def test_ray_reads_the_token_where_the_configs_put_it() -> None:
    """The names the configs and the docs rely on are Ray's own (read from its source)."""
    from ray._private.authentication import authentication_token_setup as setup

    assert setup.AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"
    assert setup._get_default_token_path() == Path.home() / ".ray" / "auth_token"
    assert "~/" + str(setup._get_default_token_path().relative_to(Path.home())) == TOKEN_HERE


@pytest.mark.parametrize("name", CONFIGS)
def test_token_reaches_every_node(name: str) -> None:
    prepared = prepare(load(name))
    user = prepared["auth"]["ssh_user"]
    # file_mounts go to the head on `ray up` and from the head to every worker it starts.
    assert prepared["file_mounts"][TOKEN_ON_NODE] == TOKEN_HERE
    assert f"/home/{user}/.ray/auth_token" == TOKEN_ON_NODE
    setup = prepared["setup_commands"]
    # Every Ray process inherits RAY_AUTH_MODE=token from ~/farm.env, which `ray start` sources.
    env = _first(setup, r"> ~/farm\.env")
    assert env is not None and "'export RAY_AUTH_MODE=token'" in setup[env]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if "ray start" in c]
        assert starts and all(c.startswith("source ~/farm.env;") for c in starts)
    # A node without the token stops in setup with a message, before Ray starts.
    check = _first(setup, r"test -s ~/\.ray/auth_token \|\|")
    assert check is not None and "exit 1" in setup[check] and "chmod 600 ~/.ray/auth_token" in setup[check]


def _ray_in(home: Path, code: str, **env: str) -> str:
    """Run Python code with Ray in a fresh process whose home is `home` (Ray reads its auth mode once)."""
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    environ.update(HOME=str(home), **env)
    result = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_ray_sends_the_token_only_with_auth_mode_token(tmp_path: Path) -> None:
    """What the docs say of Ray 2.60: `ray get-auth-token --generate` writes ~/.ray/auth_token, and a
    client (the job CLI's HTTP headers) sends it only when RAY_AUTH_MODE=token is in its environment."""
    generate = (
        "from click.testing import CliRunner; from ray.scripts.scripts import cli; "
        "r = CliRunner().invoke(cli, ['get-auth-token', '--generate']); print(r.stdout.strip())"
    )
    printed = _ray_in(tmp_path, generate).strip().splitlines()[-1]
    token = (tmp_path / ".ray" / "auth_token").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token) and printed == token
    headers = (
        "from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled; "
        "print(get_auth_headers_if_auth_enabled({}))"
    )
    assert _ray_in(tmp_path, headers).strip() == "{}"
    assert _ray_in(tmp_path, headers, RAY_AUTH_MODE="token").strip() == str({"authorization": f"Bearer {token}"})


def shell_blocks(markdown: str) -> list[list[str]]:
    """The ```sh blocks, each as its command lines (continuation lines joined, comments dropped)."""
    blocks = []
    for block in re.findall(r"^\s*```sh\n(.*?)^\s*```", markdown, re.M | re.S):
        lines = [" ".join(shlex.split(line, comments=True)) for line in block.replace("\\\n", " ").splitlines()]
        blocks.append([line for line in lines if line])
    return blocks


TOKEN_CLIENT = re.compile(r"^ray job |^farm render .*--address ray://")


def clients_without_token(markdown: str) -> list[str]:
    """Commands that talk to the cluster's job API or Ray Client with no `export RAY_AUTH_MODE=token`
    before them in their block (a reader runs a block in one shell)."""
    missing = []
    for block in shell_blocks(markdown):
        exported = False
        for line in block:
            exported = exported or line == "export RAY_AUTH_MODE=token"
            if TOKEN_CLIENT.search(line) and not exported:
                missing.append(line)
    return missing


def test_token_checker_on_a_sample() -> None:
    sample = """\
```sh
export RAY_AUTH_MODE=token
ray job submit --address http://127.0.0.1:8265 -- farm render x.yaml --address auto --out /mnt/shared/out
```

```sh
ray job logs --address http://127.0.0.1:8265 demo-1   # a new block is a new shell
farm render x.yaml --address ray://127.0.0.1:10001 --out s3://b/f
ray exec cluster.yaml "ray status"    # over SSH, on the head: ~/farm.env sets the mode there
```
"""
    assert clients_without_token(sample) == [
        "ray job logs --address http://127.0.0.1:8265 demo-1",
        "farm render x.yaml --address ray://127.0.0.1:10001 --out s3://b/f",
    ]


def test_documented_job_commands_carry_the_token() -> None:
    docs = cluster_docs()
    assert clients_without_token(docs) == []
    clients = [line for block in shell_blocks(docs) for line in block if TOKEN_CLIENT.search(line)]
    assert sum(line.startswith("ray job submit") for line in clients) >= 2  # AWS and on-prem
    assert any("--address ray://" in line for line in clients)


@pytest.mark.parametrize("name", CONFIGS)
def test_walkthrough_makes_the_token_before_ray_up(name: str) -> None:
    """For each config, the documented `ray up` follows `ray get-auth-token --generate` in its block."""
    ups = []
    for block in shell_blocks(cluster_docs()):
        for i, line in enumerate(block):
            if re.match(rf"ray up {re.escape(CONFIGS[name])}\b", line):
                ups.append(any(line.startswith("ray get-auth-token --generate") for line in block[:i]))
    assert ups and all(ups)


def test_docs_explain_the_token_for_both_configs() -> None:
    docs = cluster_docs()
    match = re.search(r"^## Ray token authentication\n.*?(?=^## |\Z)", docs, re.M | re.S)
    assert match, "docs/cluster.md has no '## Ray token authentication' section"
    section = " ".join(match.group(0).split())  # as read, not as wrapped
    for needed in (
        "`cluster.yaml`",
        "`cluster-onprem.yaml`",
        "`RAY_AUTH_MODE`",
        "`RAY_AUTH_TOKEN`",
        "`RAY_AUTH_TOKEN_PATH`",
        "`~/.ray/auth_token`",
        "`ray get-auth-token`",
        f'"{TOKEN_ON_NODE}"',
        "export RAY_AUTH_MODE=token",
        "Missing authentication token",
    ):
        assert needed in section, needed
    onprem = re.search(r"^## On-prem\n.*?(?=^## |\Z)", docs, re.M | re.S)
    assert onprem and "RAY_AUTH_MODE=token" in onprem.group(0)
