"""The client distribution as another service meets it: a wheel built from client/, installed
with pip into a fresh venv beside the service's own `tasks.py` and `worker.py` and its own pin of
`packaging`, with the lowest and the newest Celery of the client's range, submitting to real
workers on each broker. The README's producer snippets run as written in such a venv."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
import zipfile
from collections.abc import Callable, Iterator
from email.parser import Parser
from pathlib import Path

import pytest
from celery import Celery
from packaging.version import Version

from download_client.brokers import rabbitmq_config
from download_client.settings import Settings
from tests.harness import ROOT, RedisServer, Worker, worker_env
from tests.rabbitmq import RabbitServer, installed
from tests.wheelhouse import CLIENT, ENVS, folder

BUILT = ("build", "*.egg-info", "__pycache__")
SERVICE = """
import importlib.metadata as md, json, os, sys
import tasks, worker  # the service's own modules, not ours
from download_client import RESULT_KEYS, connect, submit, wait

assert tasks.MINE and worker.run() == "the service's", "the service's modules were shadowed"
app = connect()
result = submit(app, sys.argv[1], dest=sys.argv[2], queue=os.environ["SERVICE_QUEUE"])
wait([result], timeout=60)
print(json.dumps({"state": result.state, "result": result.result, "keys": list(RESULT_KEYS),
                  "versions": {d: md.version(d) for d in ("celery", "kombu", "packaging")},
                  "modules": {m: sys.modules[m].__file__ for m in ("tasks", "worker")}}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client's wheel, built from the checkout as a release would be (from a copy: setuptools
    builds in the source tree, and test processes build at once)."""
    out = tmp_path_factory.mktemp("wheel")
    source = shutil.copytree(CLIENT, out / "client", ignore=shutil.ignore_patterns(*BUILT))
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=180,
    )
    [built] = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def venvs(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Callable[[str], Path]:
    """Producer venvs by name (tests/wheelhouse.py), made on first use, from local wheels only."""
    made: dict[str, Path] = {}

    def venv(env: str) -> Path:
        if env not in made:
            wheels = folder(env)
            if not wheels.is_dir():
                pytest.fail(f"no wheels in {wheels}: `make test` (python -m tests.wheelhouse)")
            home = tmp_path_factory.mktemp(f"venv-{env}")
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True)
            client = [] if env == "bare" else [str(wheel)]
            pip = [sys.executable, "-m", "pip", "--python", str(home / "bin" / "python")]
            local = ["--no-index", "--find-links", str(wheels)]
            subprocess.run(
                [*pip, "install", "-q", *local, *client, *ENVS[env]],
                check=True,
                capture_output=True,
                timeout=300,
            )
            made[env] = home
        return made[env]

    return venv


def service_dir(tmp_path: Path) -> Path:
    """A small Celery service's own code: the two module names most such services have."""
    service = tmp_path / "service"
    service.mkdir()
    (service / "tasks.py").write_text("MINE = True\n")
    (service / "worker.py").write_text('def run():\n    return "the service\'s"\n')
    (service / "service.py").write_text(textwrap.dedent(SERVICE))
    return service


def run_in(venv: Path, cwd: Path, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """A process of the service's venv, with nothing of this checkout on its path."""
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-B", *args],
        cwd=cwd,
        env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_the_wheel_holds_the_client_alone_with_ranges_not_pins(wheel):
    with zipfile.ZipFile(wheel) as z:
        tops = {name.split("/")[0] for name in z.namelist()}
        [meta] = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(z.read(meta).decode())
        entry_points = z.read(meta.replace("METADATA", "entry_points.txt")).decode()
    assert tops == {"download_client", meta.split("/")[0]}, tops
    assert metadata["Name"] == "download-workers-client"
    names = (re.split(r"[\s<>=!\[;]", r, maxsplit=1)[0] for r in metadata.get_all("Requires-Dist"))
    requires = dict(zip(names, metadata.get_all("Requires-Dist"), strict=True))
    assert set(requires) >= {"celery", "redis", "packaging", "rich"}
    assert requires["celery"].replace(" ", "") in ("celery<6,>=5.6", "celery>=5.6,<6")
    assert not any("==" in r for r in requires.values()), requires
    assert "celery[" not in " ".join(requires.values())  # kombu's redis extra pins packaging
    assert "downloads = download_client.cli:main" in entry_points


@pytest.fixture(scope="module")
def rabbit_worker(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RabbitServer, Worker]]:
    if not installed():
        pytest.skip("rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)")
    rabbit = RabbitServer(tmp_path_factory.mktemp("rabbitmq"))
    rabbit.start()
    backend = f"{redis_server.url}/1"
    ping = Celery(broker=rabbit.url, backend=backend)
    settings = Settings.from_env(
        {"CELERY_BROKER_URL": rabbit.url, "CELERY_RESULT_BACKEND": backend}
    )
    ping.conf.update(rabbitmq_config(settings))
    ddir = tmp_path_factory.mktemp("dl-rabbit")
    env = worker_env(redis_server.url, ddir, CELERY_BROKER_URL=rabbit.url)
    log = tmp_path_factory.mktemp("rlogs") / "svc.log"
    w = Worker(env, "svc-rabbit", "svc", log, ddir, ["-c", "2"]).start(ping)
    yield rabbit, w
    w.stop()
    rabbit.close()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
@pytest.mark.parametrize("env", ["lowest", "newest"])
def test_a_service_with_its_own_tasks_and_worker_submits_through_the_installed_client(
    env, broker, venvs, tmp_path, redis_server, worker, origin, request
):
    if broker == "rabbitmq":
        rabbit, target = request.getfixturevalue("rabbit_worker")
        broker_url = rabbit.url
    else:
        target, broker_url = worker, f"{redis_server.url}/0"
    service = service_dir(tmp_path)
    dest = f"svc/{env}-{broker}-{uuid.uuid4().hex[:8]}.bin"
    done = run_in(
        venvs(env),
        service,
        ["service.py", f"{origin.url}/bytes/4096?seed={dest}", dest],
        CELERY_BROKER_URL=broker_url,
        CELERY_RESULT_BACKEND=f"{redis_server.url}/1",
        SERVICE_QUEUE=target.queue,
    )
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["state"] == "SUCCESS" and seen["result"]["size"] == 4096
    assert sorted(seen["result"]) == sorted(seen["keys"])
    assert all(Path(f).parent == service for f in seen["modules"].values()), seen["modules"]
    versions = seen["versions"]
    assert versions["packaging"] == "25.0"  # the service's pin, not kombu's extra's
    if env == "lowest":
        assert versions["celery"] == "5.6.0" and versions["kombu"] == "5.6.0"
    else:
        assert Version("5.6") <= Version(versions["celery"]) < Version("6")
    assert (target.download_dir / dest).stat().st_size == 4096


def readme_blocks(heading: str) -> dict[str, str]:
    """The first `sh` and `python` blocks under a README heading."""
    text = (ROOT / "README.md").read_text().split(f"\n{heading}\n", 1)[1].split("\n### ", 1)[0]
    return {lang: code for lang, code in re.findall(r"```(sh|python)\n(.*?)```", text, re.S)[::-1]}


def loopback(code: str, origin_url: str, redis_url: str) -> str:
    """The snippet with its example addresses pointed at this test's Redis and origin."""
    seed = uuid.uuid4().hex[:8]
    code = code.replace("redis://localhost:6379", redis_url)
    return code.replace("https://example.com/", f"{origin_url}/bytes/2048?seed={seed}&name=")


def pip_line(block: str) -> list[str]:
    [line] = [ln for ln in block.splitlines() if ln.startswith("pip install ")]
    return [arg.strip("'") for arg in line.split()[2:]]


def test_the_readme_install_lines_are_what_the_tests_install():
    bare = readme_blocks("### Submitting from another service (no import of this project)")
    assert pip_line(bare["sh"]) == ENVS["bare"]
    assert pip_line(readme_blocks("### From Python with this package")["sh"]) == ["./client"]
    assert (ROOT / "client" / "pyproject.toml").is_file()


def test_the_readme_snippet_without_our_package_runs_as_written(
    venvs, tmp_path, redis_server, worker, origin
):
    code = readme_blocks("### Submitting from another service (no import of this project)")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(loopback(code["python"], origin.url, redis_server.url))
    done = run_in(venvs("bare"), tmp_path, [str(snippet)])
    assert "'path': 'img/a.png'" in done.stdout and "'size': 2048" in done.stdout


def test_the_readme_snippet_with_the_client_runs_as_written(
    venvs, tmp_path, redis_server, worker, origin
):
    code = readme_blocks("### From Python with this package")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(loopback(code["python"], origin.url, redis_server.url))
    done = run_in(
        venvs("newest"),
        tmp_path,
        [str(snippet)],
        CELERY_BROKER_URL=f"{redis_server.url}/0",
        CELERY_RESULT_BACKEND=f"{redis_server.url}/1",
    )
    assert done.stdout.count(" SUCCESS ") == 2, done.stdout
    assert (worker.download_dir / "x/2.png").stat().st_size == 2048


@pytest.mark.parametrize("env", ["lowest", "newest"])
def test_the_installed_downloads_command_submits_and_waits(
    env, venvs, tmp_path, redis_server, worker, origin
):
    venv = venvs(env)
    url = f"{origin.url}/bytes/1024?seed=cli-{env}-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [str(venv / "bin" / "downloads"), "submit", url, "--wait", "--json", "--timeout", "60"],
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "CELERY_BROKER_URL": f"{redis_server.url}/0",
            "CELERY_RESULT_BACKEND": f"{redis_server.url}/1",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)
    assert row["state"] == "SUCCESS" and row["result"]["size"] == 1024, row
