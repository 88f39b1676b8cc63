"""The container image and the Helm chart, checked without Docker or Helm.

No engine or chart renderer runs in the test suite, so these tests read the Dockerfile and
the chart's templates as text, cross-check them against values.yaml and against each
other, validate the chart's config with the gateway's own ``check``, and run the image's
entrypoint (``stepup-gateway run`` configured only through ``GATEWAY_CONFIG``) and its
HEALTHCHECK command against a real gateway process on loopback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CHART = ROOT / "helm" / "stepup-gateway"
TEMPLATES = sorted(p for p in (CHART / "templates").iterdir() if p.is_file())
HEALTHZ_PATH = "/_gateway/healthz"
RUNTIME_UID = 10001
# The gateway's own floor for session.secret (bytes); the dummy must pass it.
SESSION_SECRET_MIN_BYTES = 32
STARTUP_TIMEOUT_S = 15.0
SHUTDOWN_TIMEOUT_S = 10.0


def load_values() -> dict[str, Any]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert isinstance(values, dict)
    return values


# -- Dockerfile ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str  # upper case, e.g. "RUN"
    args: str  # continuation lines joined, flags included


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order: comments dropped, backslash continuations joined."""
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments may also sit inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued instruction"
    return instructions


def stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[list[Instruction]]]:
    """(global ARG defaults, stages); each stage starts with its FROM."""
    global_args: dict[str, str] = {}
    result: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            result.append([instruction])
        elif result:
            result[-1].append(instruction)
        elif instruction.keyword == "ARG":
            name, _, default = instruction.args.partition("=")
            global_args[name] = default
    return global_args, result


def base_image(from_instruction: Instruction, global_args: dict[str, str]) -> str:
    image = from_instruction.args.split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], image)


def only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the stage, found {len(found)}"
    return found[0]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for pair in instruction.args.split():
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def healthcheck_argv(stage: list[Instruction]) -> list[str]:
    args = only(stage, "HEALTHCHECK").args
    exec_form = re.search(r"\bCMD\s+(\[.*\])\s*$", args)
    assert exec_form, f"HEALTHCHECK needs the exec (JSON) form of CMD: {args}"
    argv = json.loads(exec_form.group(1))
    assert isinstance(argv, list)
    return [str(a) for a in argv]


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[list[Instruction]]]:
    return stages(parse_dockerfile(DOCKERFILE.read_text()))


@pytest.fixture(scope="module")
def runtime(dockerfile: tuple[dict[str, str], list[list[Instruction]]]) -> list[Instruction]:
    return dockerfile[1][-1]


def test_dockerfile_is_multi_stage_on_python_311_slim(
    dockerfile: tuple[dict[str, str], list[list[Instruction]]],
) -> None:
    global_args, all_stages = dockerfile
    assert len(all_stages) >= 2
    images = {base_image(stage[0], global_args) for stage in all_stages}
    # One base image for both stages: the venv is copied with its interpreter paths.
    assert images == {"python:3.11-slim"}


def test_runtime_stage_copies_only_the_venv(runtime: list[Instruction]) -> None:
    copies = [i.args.split() for i in runtime if i.keyword in ("COPY", "ADD")]
    assert copies == [["--from=builder", "/opt/venv", "/opt/venv"]]


def test_runtime_runs_as_uid_10001(runtime: list[Instruction]) -> None:
    users = [i.args for i in runtime if i.keyword == "USER"]
    assert users, "the runtime stage sets no USER: the container would run as root"
    user = users[-1].partition(":")[0]
    # Numeric, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
    assert user == str(RUNTIME_UID)


def test_runtime_environment(runtime: list[Instruction]) -> None:
    env = env_of(runtime)
    assert env["GATEWAY_CONFIG"] == "/etc/stepup-gateway/config.yaml"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_runtime_exposes_8080_and_runs_the_console_script(runtime: list[Instruction]) -> None:
    assert "8080" in only(runtime, "EXPOSE").args.split()
    assert json.loads(only(runtime, "ENTRYPOINT").args) == ["stepup-gateway"]
    assert json.loads(only(runtime, "CMD").args) == ["run"]


def test_console_script_is_the_entrypoint_name() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^stepup-gateway = "gateway\.cli:main"$', pyproject, re.M)


def test_healthcheck_is_python_hitting_healthz(runtime: list[Instruction]) -> None:
    argv = healthcheck_argv(runtime)
    assert argv[:2] == ["python", "-c"], "slim images have no curl: probe with python"
    code = argv[2]
    assert f"http://127.0.0.1:8080{HEALTHZ_PATH}" in code
    compile(code, "<HEALTHCHECK>", "exec")


def test_builder_sources_pass_the_dockerignore(
    dockerfile: tuple[dict[str, str], list[list[Instruction]]],
) -> None:
    """.dockerignore is an allow-list; everything the build COPYs must be let back in."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = [
        source.rstrip("/")
        for stage in dockerfile[1]
        for i in stage
        if i.keyword == "COPY" and not i.args.startswith("--from=")
        for source in i.args.split()[:-1]
    ]
    assert sources
    assert set(sources) <= allowed
    # The wheel's metadata names its readme; without it the build fails.
    assert "README.md" in sources


# -- Helm chart ----------------------------------------------------------------------

VALUES_REF = re.compile(r"\.Values((?:\.[A-Za-z0-9_]+)+)")
BLOCK_OPEN = re.compile(r"\{\{-?\s*(?:if|with|range|define|block)\b")
BLOCK_END = re.compile(r"\{\{-?\s*end\s*-?\}\}")
TEMPLATE_COMMENT = re.compile(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", re.S)


def values_refs(text: str) -> set[tuple[str, ...]]:
    """Every ``.Values.a.b`` path, absolute even inside with/range (``$.Values`` too)."""
    return {tuple(m.group(1).lstrip(".").split(".")) for m in VALUES_REF.finditer(text)}


def missing_prefix(values: Any, path: tuple[str, ...]) -> str | None:
    node = values
    for depth, key in enumerate(path):
        if not isinstance(node, dict) or key not in node:
            return ".".join(path[: depth + 1])
        node = node[key]
    return None


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_template_values_exist_in_values_yaml(template: Path) -> None:
    values = load_values()
    refs = values_refs(template.read_text())
    missing = sorted({m for m in (missing_prefix(values, path) for path in refs) if m is not None})
    assert missing == [], f"{template.name} uses .Values paths that values.yaml lacks"


def test_values_check_finds_a_missing_path() -> None:
    values = {"config": {"server": {"listen": "0.0.0.0:8080"}}}
    refs = values_refs("{{ .Values.config.server.listen }} {{ $.Values.config.sesion.store }}")
    assert missing_prefix(values, ("config", "server", "listen")) is None
    assert [missing_prefix(values, path) for path in sorted(refs)] == [
        None,
        "config.sesion",
    ]


def test_every_top_level_value_is_used_by_a_template() -> None:
    used = {path[0] for t in TEMPLATES for path in values_refs(t.read_text())}
    assert set(load_values()) - used == set()


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_template_blocks_are_balanced(template: Path) -> None:
    text = TEMPLATE_COMMENT.sub("", template.read_text())
    assert text.count("{{") == text.count("}}")
    assert len(BLOCK_OPEN.findall(text)) == len(BLOCK_END.findall(text))


@pytest.mark.parametrize(
    ("template", "snippet"),
    [
        ("deployment.yaml", "checksum/config: {{ include (print $.Template.BasePath"),
        ("deployment.yaml", "path: {{ $prefix }}/healthz"),
        ("deployment.yaml", "path: {{ $prefix }}/readyz"),
        ("deployment.yaml", "mountPath: /tmp"),
        ("deployment.yaml", "emptyDir:"),
        ("deployment.yaml", "value: /etc/stepup-gateway/config.yaml"),
        ("deployment.yaml", "mountPath: /etc/stepup-gateway\n"),
        ("deployment.yaml", "preferredDuringSchedulingIgnoredDuringExecution"),
        ("deployment.yaml", "topologyKey: kubernetes.io/hostname"),
        (
            "configmap.yaml",
            'config.yaml: |\n    {{- include "stepup-gateway.config" . | nindent 4 }}',
        ),
        ("_helpers.tpl", "{{- toYaml $config }}"),
        ("hpa.yaml", "apiVersion: autoscaling/v2"),
        # A grace period shorter than the pause plus the drain kills pods mid-request.
        ("deployment.yaml", "must be above preStopSleepSeconds + config.server.shutdown_timeout"),
        ("deployment.yaml", 'command: ["sleep", "{{ .Values.preStopSleepSeconds }}"]'),
        ("pdb.yaml", "(gt $replicas 1)"),
        ("servicemonitor.yaml", "apiVersion: monitoring.coreos.com/v1"),
    ],
)
def test_template_has(template: str, snippet: str) -> None:
    assert snippet in (CHART / "templates" / template).read_text()


def test_chart_is_apiversion_v2() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "stepup-gateway"


def test_pod_is_locked_down_and_matches_the_image_user(runtime: list[Instruction]) -> None:
    values = load_values()
    pod, container = values["podSecurityContext"], values["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == RUNTIME_UID == int(only(runtime, "USER").args.partition(":")[0])
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]


def test_default_values_run_three_replicas_on_redis() -> None:
    values = load_values()
    assert values["replicaCount"] == 3
    session = values["config"]["session"]
    assert session["store"] == "redis"
    assert session["redis_url"] == "${REDIS_URL}"
    assert values["config"]["server"]["listen"] == "0.0.0.0:8080"
    assert values["config"]["server"]["workers"] == 2


ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


def config_env_refs(config: Any) -> set[str]:
    """Names the config takes from the environment with no default."""
    text = yaml.safe_dump(config)
    return {m.group(1) for m in ENV_REF.finditer(text) if m.group(2) is None}


def test_every_variable_the_config_needs_is_set_by_the_deployment() -> None:
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    env_names = set(re.findall(r"^\s*- name: ([A-Z][A-Z0-9_]*)\s*$", deployment, re.M))
    needed = config_env_refs(load_values()["config"])
    assert needed == {"OIDC_CLIENT_SECRET", "GATEWAY_SESSION_SECRET", "REDIS_URL"}
    assert needed <= env_names


def dummy_env(names: set[str]) -> dict[str, str]:
    dummies = {
        "GATEWAY_SESSION_SECRET": "s" * (SESSION_SECRET_MIN_BYTES + 16),
        "OIDC_CLIENT_SECRET": "dummy-client-secret",
        "REDIS_URL": "redis://redis.example.internal:6379/0",
    }
    return {name: dummies.get(name, "dummy") for name in names}


def run_check(config_path: Path, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(config_path)],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def base_env() -> dict[str, str]:
    """The test's environment without anything that could configure the gateway."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}


def test_values_config_passes_check(tmp_path: Path) -> None:
    config = load_values()["config"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_check(path, base_env() | dummy_env(config_env_refs(config)))
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stdout + result.stderr


def test_values_config_fails_check_without_its_secrets(tmp_path: Path) -> None:
    """The check above can fail: without the Secrets' variables the config is invalid."""
    config = load_values()["config"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    environ = {k: v for k, v in base_env().items() if k not in config_env_refs(config)}
    result = run_check(path, environ)
    assert result.returncode == 1
    assert "session.secret" in result.stdout


def helm_merge(base: Any, override: Any) -> Any:
    """Helm's merge of a values file over values.yaml: maps deep, everything else replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: helm_merge(base.get(k), v) for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override
        }
    return override


def test_forward_auth_values_pass_check(tmp_path: Path) -> None:
    extra = yaml.safe_load((CHART / "values-forward-auth.yaml").read_text())
    config = helm_merge(load_values(), extra)["config"]
    assert config["server"]["mode"] == "forward_auth"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_check(path, base_env() | dummy_env(config_env_refs(config)))
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stdout + result.stderr


# -- the entrypoint, as the container runs it ------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but never listening: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


SESSION_SECRET = "deploy-test-session-secret-0123456789abcdef"


@pytest.fixture
def minimal_config(tmp_path: Path, closed_port: int) -> tuple[Path, int]:
    port = free_port()
    config = {
        "server": {
            "listen": f"127.0.0.1:{port}",
            "public_url": f"http://127.0.0.1:{port}",
            "shutdown_timeout": "3s",
        },
        "upstreams": {"app": f"http://127.0.0.1:{closed_port}"},
        "oidc": {
            "issuer": f"http://127.0.0.1:{closed_port}",
            "client_id": "gateway",
            "client_secret": "deploy-test-client-secret",
            "http_timeout": "2s",
        },
        "session": {"secret": SESSION_SECRET, "store": "cookie", "cookie_secure": False},
        "assurance": {"levels": [{"name": "password", "acr": ["urn:example:loa:1"]}]},
        "rules": [{"name": "all", "match": {"path": "/**"}, "require": {"level": "password"}}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, port


def container_env(config_path: Path) -> dict[str, str]:
    """Only GATEWAY_CONFIG configures the gateway, as in the image (PATH to find tools)."""
    return {"GATEWAY_CONFIG": str(config_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def http_status(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


def run_healthcheck(runtime: list[Instruction], url: str) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, with the URL the image lets an operator override."""
    argv = healthcheck_argv(runtime)
    return subprocess.run(
        [sys.executable, *argv[1:]],
        env=container_env(Path("/nonexistent")) | {"GATEWAY_HEALTHCHECK_URL": url},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_reads_gateway_config_from_the_environment(
    minimal_config: tuple[Path, int],
) -> None:
    path, _ = minimal_config
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check"],
        cwd=ROOT,
        env=container_env(path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stdout + result.stderr


def test_run_with_gateway_config_serves_health_and_exits_0_on_sigterm(
    minimal_config: tuple[Path, int], runtime: list[Instruction], tmp_path: Path
) -> None:
    path, port = minimal_config
    base = f"http://127.0.0.1:{port}/_gateway"
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run"],
            cwd=ROOT,
            env=container_env(path),
            stdout=out,
            stderr=err,
        )

    def output() -> str:
        return f"stdout:\n{stdout.read_text()}\nstderr:\n{stderr.read_text()}"

    try:
        # Wait for the process to come up, as the kubelet's probe does.
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        healthz = None
        while healthz is None and time.monotonic() < deadline:
            assert process.poll() is None, f"gateway exited {process.returncode}\n{output()}"
            try:
                healthz = http_status(f"{base}/healthz")
            except OSError:
                time.sleep(0.05)
        assert healthz == 200, output()
        # The provider is unreachable: up, but not ready to take traffic.
        assert http_status(f"{base}/readyz") == 503

        healthcheck = run_healthcheck(runtime, f"{base}/healthz")
        assert healthcheck.returncode == 0, healthcheck.stderr

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=SHUTDOWN_TIMEOUT_S) == 0, output()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert SESSION_SECRET not in output()

    # Nothing answers any more: the image's HEALTHCHECK now reports unhealthy.
    assert run_healthcheck(runtime, f"{base}/healthz").returncode != 0
