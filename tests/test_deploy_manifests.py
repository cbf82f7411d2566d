"""deploy/: the manifests name real entry points, flags and settings. Parsed only: no Docker, Kubernetes,
network or S3; the Flower and posettp flags are checked against the installed executables' `--help`."""
from __future__ import annotations

import ast
import functools
import importlib
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from model.config import config_path, load_config, settings_from_mapping, shipped_configs
from server.fl import FLSettings
from server.flower_app import run_config_defaults
from server.serve import ServeSettings, read_serve_config
from training.joint import build_parser

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent
CHECKED_EXES = {"flower-superlink", "flower-supernode", "flwr", "posettp"}
SHELL_TOOLS = {"mkdir", "cp", "python", "echo", "printf"}  # allowed in compose scripts, flags not checked
SEPARATORS = {"|", "||", "&&", ";", "(", ")", "&"}


def load(rel: str) -> dict:
    return yaml.safe_load((DEPLOY / rel).read_text())


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pin(requirement: str, text: str) -> str:
    found = set(re.findall(rf"{re.escape(requirement)}==([\w.]+)", text))
    assert len(found) == 1, f"{requirement}: expected one pinned version, found {found or 'none'}"
    return found.pop()


# -- Dockerfile ------------------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def image_workdir() -> str:
    workdirs = [arg for ins, arg in dockerfile() if ins == "WORKDIR"]
    assert workdirs, "Dockerfile sets no WORKDIR"
    return workdirs[-1]


def test_dockerfile_base_torch_pin_project_install_and_user():
    steps = dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert ">=3.11" in pyproject()["project"]["requires-python"]
    runs = " && ".join(arg for ins, arg in steps if ins == "RUN")
    torch = pin("torch", runs)
    assert torch == pin("torch", (REPO / "Makefile").read_text()), "torch pin differs from the Makefile's"
    assert f"torch=={torch}" in pyproject()["project"]["dependencies"]
    installs = [shlex.split(cmd) for cmd in re.split(r"&&|;", runs)]
    assert any(c[:2] == ["pip", "install"] and "." in c[2:] for c in installs), "the project is not pip-installed"
    copied = {shlex.split(arg)[0].rstrip("/") for ins, arg in steps if ins == "COPY"}
    packages = {p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml"} <= copied, f"not copied into the image: {sorted(packages - copied)}"
    users = [arg for ins, arg in steps if ins == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    assert not [ins for ins, _ in steps if ins == "ENTRYPOINT"], "one image for every role: no ENTRYPOINT"


# -- KubeRay ---------------------------------------------------------------------------------------

def containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def worker_gpus(cluster: dict) -> int:
    return sum(int(g["replicas"]) * sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
                                        for c in g["template"]["spec"]["containers"])
               for g in cluster["workerGroupSpecs"])


def check_cluster(cluster: dict) -> None:
    ray_pin = pin("ray[train,serve]", " ".join(pyproject()["project"]["dependencies"]))
    assert cluster["rayVersion"] == ray_pin, f"rayVersion {cluster['rayVersion']} but pyproject pins ray {ray_pin}"
    images = {c["image"] for c in containers(cluster)}
    assert len(images) == 1 and images.pop().endswith(":" + pyproject()["project"]["version"])
    for c in containers(cluster):
        env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "valueFrom" in e}
        for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert name in env, f"{c['name']}: {name} not taken from a Secret"


def test_rayjob_runs_training_joint_with_real_flags_and_a_shipped_config():
    job = load("kuberay/rayjob-train.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    check_cluster(spec["rayClusterSpec"])
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python"
    workdir = image_workdir()
    assert argv[1].startswith(workdir + "/"), f"{argv[1]} is not under the image's WORKDIR {workdir}"
    script = REPO / argv[1][len(workdir) + 1:]
    assert script.is_file() and script == REPO / "training" / "joint.py", f"{script} is not training/joint.py"
    parser = build_parser()
    known = set(parser._option_string_actions)  # exact spellings: argparse would accept an abbreviation
    flags = [a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")]
    assert [f for f in flags if f not in known] == [], "flags training/joint.py does not define"
    try:
        args = parser.parse_args(argv[2:])
    except SystemExit as exc:
        pytest.fail(f"training/joint.py refuses the entrypoint's arguments (exit {exc.code})")
    assert Path(args.config).stem in shipped_configs()
    config_path(args.config)
    load_config(args.config, args.overrides)  # every --set key known; no data or storage is touched
    assert args.storage and args.storage.startswith("s3://")
    assert args.workers and args.gpus and args.gpus <= worker_gpus(spec["rayClusterSpec"]), \
        f"--gpus {args.gpus} but the worker groups have {worker_gpus(spec['rayClusterSpec'])} GPUs"


def test_rayservice_serve_config_matches_configs_serve_yaml_and_server_serve():
    svc = load("kuberay/rayservice-serve.yaml")
    assert (svc["apiVersion"], svc["kind"]) == ("ray.io/v1", "RayService")
    cluster = svc["spec"]["rayClusterSpec"]
    check_cluster(cluster)
    conf = yaml.safe_load(svc["spec"]["serveConfigV2"])
    shipped = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    assert set(conf) == set(shipped)
    (app,), (shipped_app,) = conf["applications"], shipped["applications"]
    assert app["import_path"] == shipped_app["import_path"]
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    args = app["args"]
    assert set(args) == set(read_serve_config(str(REPO / "configs" / "serve.yaml"))["args"])
    s = settings_from_mapping(ServeSettings, args, what="serve setting")  # ServeSettings.from_args' key check
    assert s.auth is True, "auth stays on in a deployment"
    assert s.checkpoint.startswith("s3://") and s.store.startswith("s3://")
    head_ports = {p["name"]: p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]
                  ["containers"][0]["ports"]}
    assert conf["http_options"]["port"] == head_ports["serve"]
    assert s.replicas * s.num_gpus <= worker_gpus(cluster)


# -- Flower compose --------------------------------------------------------------------------------

def service_argv(service: dict) -> list[str]:
    entry, cmd = service.get("entrypoint") or [], service.get("command") or []
    entry = shlex.split(entry) if isinstance(entry, str) else list(entry)
    cmd = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    return [str(a) for a in entry + cmd]


def simple_commands(argv: list[str]) -> list[list[str]]:
    """The commands a service runs: its argv, or each simple command of an `sh -c` script."""
    if argv[:1] != ["sh"]:
        return [argv]
    assert argv[1] in ("-c", "-ec", "-euc"), argv[:2]
    out = []
    for line in argv[2].replace("$$", "$").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for tok in [*lexer, ";"]:
            if tok in SEPARATORS:
                if current:
                    out.append(current)
                current = []
            elif current or not re.fullmatch(r"[A-Za-z_]\w*=.*", tok):  # drop `x=$` of `x=$(...)`
                current.append(tok)
    return out


@functools.cache
def help_text(path: tuple[str, ...]) -> str:
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}
    res = subprocess.run([str(VENV_BIN / path[0]), *path[1:], "--help"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 0, f"{' '.join(path)} --help: exit {res.returncode}\n{res.stderr[-2000:]}"
    return res.stdout + res.stderr


def subcommands(text: str) -> set[str]:
    """argparse's `{a,b,c}` choices, or the names in a Typer/rich "Commands" box."""
    names = {n for group in re.findall(r"\{([\w,-]+)\}", text) for n in group.split(",")}
    box = text.split("Commands", 1)[1] if "Commands" in text else ""
    names |= set(re.findall(r"^[│|] ([a-z][\w-]*)\s", box, flags=re.M))
    return names | set(re.findall(r"\(alias: ([\w-]+)\)", box))


def check_command(argv: list[str]) -> list[str]:
    """Problems with one command: an unknown executable, or a `--flag` its (sub)command's --help lacks."""
    exe = argv[0]
    if exe in SHELL_TOOLS:
        return []
    if exe not in CHECKED_EXES:
        return [f"unexpected executable {exe!r}"]
    if not (VENV_BIN / exe).is_file():
        return [f"{exe} is not installed in {VENV_BIN}"]
    path = [exe]
    for tok in argv[1:]:
        if tok.startswith("-") or tok not in subcommands(help_text(tuple(path))):
            break
        path.append(tok)
    known = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", help_text(tuple(path))))
    return [f"{' '.join(path)}: no flag {flag}" for a in argv[1:] if a.startswith("--")
            if (flag := a.split("=", 1)[0]) not in known]


def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def client_node_config_keys() -> set[str]:
    """The node config keys client/app.py reads: node.get(k), node[k], k in node."""
    keys = set()
    for n in ast.walk(ast.parse((REPO / "client" / "app.py").read_text())):
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get"
                and isinstance(n.func.value, ast.Name) and n.func.value.id == "node"):
            keys.add(n.args[0].value)
        elif isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id == "node":
            keys.add(n.slice.value)
        elif (isinstance(n, ast.Compare) and isinstance(n.left, ast.Constant) and isinstance(n.ops[0], ast.In)
              and isinstance(n.comparators[0], ast.Name) and n.comparators[0].id == "node"):
            keys.add(n.left.value)
    return keys


def test_compose_commands_use_installed_executables_and_their_real_flags():
    compose = load("flower/compose.yaml")
    services = compose["services"]
    assert {"superlink", "node-1", "node-2", "run"} <= set(services)
    commands = {name: simple_commands(service_argv(s)) for name, s in services.items()}
    problems = [f"{name}: {p}" for name, cmds in commands.items() for c in cmds for p in check_command(c)]
    assert problems == []
    flat = [c for cmds in commands.values() for c in cmds]
    # TLS and SuperNode auth on both sides, as README's deployment
    (link,) = commands["superlink"]
    assert link[0] == "flower-superlink" and "--insecure" not in link
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"} <= set(link)
    nodes = [c for c in flat if c[0] == "flower-supernode"]
    assert len(nodes) == 2
    for node in nodes:
        assert "--insecure" not in node and flag_value(node, "--root-certificates")
        assert flag_value(node, "--auth-supernode-private-key")
        host, port = flag_value(node, "--superlink").rsplit(":", 1)
        assert host in services and port == flag_value(link, "--port")
    # the run: the app `posettp flower-app` wrote, on the connection the config names
    (app,) = [c for c in flat if c[:2] == ["posettp", "flower-app"]]
    (run,) = [c for c in flat if c[:2] == ["flwr", "run"]]
    assert run[2] == flag_value(app, "--out")
    connections = tomllib.loads(compose["configs"]["flwr-connection"]["content"])["superlink"]
    assert run[3] in connections and connections[run[3]]["address"].split(":")[0] in services


def test_compose_node_and_run_config_keys_are_the_apps():
    compose = load("flower/compose.yaml")
    flat = [c for s in compose["services"].values() for c in simple_commands(service_argv(s))]
    read_by_client = client_node_config_keys()
    assert {"person-id", "data-path"} <= read_by_client  # the parser still finds what client/app.py reads
    persons = set()
    for node in [c for c in flat if c[0] == "flower-supernode"]:
        pairs = dict(kv.split("=", 1) for kv in shlex.split(flag_value(node, "--node-config")))
        assert set(pairs) == {"person-id", "data-path"} and set(pairs) <= read_by_client
        persons.add(pairs["person-id"])
    binds = {flag_value(c, "--person") for c in flat if c[:3] == ["posettp", "node", "bind"]}
    assert binds == persons, "every node's person is bound to its node id"
    (run,) = [c for c in flat if c[:2] == ["flwr", "run"]]
    run_config = {}
    for kv in shlex.split(flag_value(run, "--run-config"), posix=False):
        key, _, value = kv.partition("=")
        run_config[key] = tomllib.loads(f"v = {value}")["v"]
    assert set(run_config) <= set(run_config_defaults()), \
        f"not FLSettings keys: {sorted(set(run_config) - set(run_config_defaults()))}"
    FLSettings.from_run_config(run_config)  # values typed and valid


def test_compose_mounts_certificates_gen_certs_writes():
    header = re.findall(r"^# OUT_DIR/(.+?)(?:\s{2,}|$)", (REPO / "scripts" / "gen_certs.sh").read_text(), flags=re.M)
    made = [n.strip() for line in header for n in line.split(",")]  # its header lists what it writes
    assert {"ca.crt", "server.pem", "server.key", "node-N", "node-N.pub"} <= set(made), made
    compose = load("flower/compose.yaml")
    mounted = [v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", [])
               if v.startswith("./certs/")]
    assert mounted
    for src in mounted:
        assert any(re.fullmatch(re.escape(m).replace("N", r"\d+"), Path(src).name) for m in made), \
            f"{src}: gen_certs.sh does not write it"
