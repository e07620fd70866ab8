"""The Dockerfile, checked without a Docker engine.

``test_dockerfile_shape`` reads the Dockerfile's instructions;
``test_image_install_serves_health`` replays its build the way the image
does it: build the wheel from a copy of what the build stage COPYs, install
it with the lean variant's extras into a fresh pip-less virtual environment
(no Jupyter packages: the local backend refuses to start, naming the fix),
add the local variant's extra, then run ``session-broker serve`` from that
environment under tini as PID 1 of its own PID namespace (as in the image),
ask /health and /ready, run the image's HEALTHCHECK command, start a real
session, kill its server and see tini reap the orphaned kernel, and stop the
process by its PID.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, marked_for
from tests.deploy.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), " ".join(rest.split())))
    return pairs


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def healthcheck_command() -> list[str]:
    [args] = [rest for word, rest in final_stage() if word == "HEALTHCHECK"]
    command: list[str] = json.loads(args.split(" CMD ", 1)[1])
    return command


def test_dockerfile_shape() -> None:
    steps = instructions()
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    assert all(re.match(r"\$\{BASE_IMAGE\} AS \w+", f) for f in froms), froms
    # The base: a tag here, which the release pipeline pins by digest (test_release.py).
    args = dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)
    assert re.fullmatch(r"python:3\.\d+-slim", args["BASE_IMAGE"]), args
    assert args["VARIANT"] == "lean"
    final = final_stage()
    final_words = [word for word, _ in final]
    # Only the built environment reaches the runtime stage; no sources, no build steps.
    copies = [rest for word, rest in final if word == "COPY"]
    assert copies == ["--from=build /opt/broker /opt/broker"]
    assert not any("pip" in rest for word, rest in final if word == "RUN")
    # Runs as an unprivileged user.
    [user] = [rest for word, rest in final if word == "USER"]
    assert user.split(":")[0] not in ("root", "0")
    assert final_words.index("USER") < final_words.index("ENTRYPOINT")
    # Health check on /health; entry point is `session-broker serve`; config by env.
    assert "/health" in " ".join(healthcheck_command())
    [entrypoint] = [rest for word, rest in final if word == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ENTRYPOINT
    final_run = " ".join(rest for word, rest in final if word == "RUN")
    assert "apt-get install -y --no-install-recommends tini" in final_run
    assert not any(word == "CMD" for word, _ in final)  # arguments append to `serve`
    labels = " ".join(rest for word, rest in final if word == "LABEL")
    for key in ("title", "description", "licenses", "version", "revision", "source",
                "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    env = " ".join(rest for word, rest in final if word == "ENV")
    assert "BROKER_HOST=0.0.0.0" in env
    # The install the test below replays.
    build = " ".join(rest for word, rest in steps if word == "RUN")
    assert "pip wheel --no-deps" in build
    assert "venv --without-pip /opt/broker" in build
    assert "pip --python /opt/broker/bin/python install" in build
    assert '"$(ls /wheels/*.whl)[$extras]"' in build
    assert variant_extras(build) == VARIANT_EXTRAS
    assert "-c requirements.lock" in build  # the tested versions
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:][:4] == ["!pyproject.toml", "!setup.py", "!README.md",
                                                 "!src/"]
    assert "!requirements.lock" in ignore
    assert "gcc" in build  # the relay's module is compiled into the wheel


#: The image's entry point; the test below runs the same command.
ENTRYPOINT = ["tini", "--", "session-broker", "serve"]
#: VARIANT build arg -> extras installed (the test below installs both, in turn).
VARIANT_EXTRAS = {"lean": "speed", "local": "speed,local"}


def variant_extras(build: str) -> dict[str, str]:
    """The build stage's ``case "$VARIANT"`` arms: variant -> extras."""
    return dict(re.findall(r"(\w+)\) extras=([\w,]+) ;;", build))


def _get(url: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """A JSON request to the broker under test (loopback http only)."""
    assert url.startswith("http://127.0.0.1:"), url
    request = urllib.request.Request(url, **kwargs)  # noqa: S310 (checked above)
    try:
        with urllib.request.urlopen(request, timeout=180) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.timeout(600)
def test_image_install_serves_health(tmp_path: Path) -> None:
    # COPY pyproject.toml setup.py README.md requirements.lock ./ ; COPY src ./src
    context = tmp_path / "src-copy"
    context.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "requirements.lock"):
        shutil.copy2(ROOT / name, context / name)
    shutil.copytree(ROOT / "src", context / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]

    # pip wheel --no-deps --wheel-dir /wheels .
    wheels = tmp_path / "wheels"
    subprocess.run([*pip, "wheel", "--no-deps", "--wheel-dir", str(wheels), str(context)],
                   check=True, timeout=300)
    [wheel] = list(wheels.glob("jupyter_session_broker-*.whl"))

    # python -m venv --without-pip /opt/broker ; pip --python ... install "<wheel>[speed]"
    venv = tmp_path / "opt-broker"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"

    def install(variant: str) -> None:
        subprocess.run([*pip, "--python", str(python), "install", "-c",
                        str(context / "requirements.lock"),
                        f"{wheel}[{VARIANT_EXTRAS[variant]}]"], check=True, timeout=500)

    def importable(*modules: str) -> list[str]:
        probe = subprocess.run(
            [str(python), "-c", "import importlib.util as u, sys; "
             "print([m for m in sys.argv[1:] if u.find_spec(m)])", *modules],
            capture_output=True, text=True, check=True, cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin"})
        found: list[str] = json.loads(probe.stdout.replace("'", '"'))
        return found

    # The lean variant: no Jupyter packages, and the local backend says what is missing.
    install("lean")
    assert importable("jupyter_server", "ipykernel", "jupyter_client") == []
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(home), "PYTHONUNBUFFERED": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(tmp_path)}
    refused = subprocess.run([str(venv / "bin" / "session-broker"), "serve", "--host",
                              "127.0.0.1", "--port", str(free_port())], env=env, cwd=home,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "jupyter-session-broker[local]" in refused.stderr and "-local" in refused.stderr
    assert "Traceback" not in refused.stderr

    # The local variant adds the [local] extra.
    install("local")
    assert importable("jupyter_server", "ipykernel") == ["jupyter_server", "ipykernel"]
    # requirements.lock is exactly what that install holds: no package missing, none stale.
    frozen = subprocess.run([*pip, "--python", str(python), "freeze", "--exclude",
                             "jupyter-session-broker"], capture_output=True, text=True,
                            check=True, timeout=120).stdout
    locked = [line for line in (context / "requirements.lock").read_text().splitlines()
              if line and not line.startswith("#")]
    assert sorted(frozen.split(), key=str.lower) == sorted(locked, key=str.lower)

    # Only runtime dependencies, no pip, and the package comes from the venv, not the tree.
    assert not (venv / "bin" / "pip").exists()
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u, broker; print(broker.__file__); "
         "print([m for m in ('pytest', 'ruff', 'pip', 'jupyterhub') if u.find_spec(m)]); "
         "from broker.proxy import wire; print(wire.mode())"],
        capture_output=True, text=True, check=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    location, test_only, relay = probe.stdout.splitlines()
    assert location.startswith(str(venv)), location
    assert test_only == "[]"
    assert relay == "compiled"  # the wheel carries the compiled relay module

    # ENV PATH=/opt/broker/bin:$PATH ... ; USER ; ENTRYPOINT ["tini", "--", "session-broker", ...]
    config = subprocess.run([str(venv / "bin" / "session-broker"), "config"], env=env,
                            cwd=home, capture_output=True, text=True, timeout=60)
    assert config.returncode == 0 and "BROKER_HOST" in config.stdout

    port = free_port()
    tini = shutil.which("tini")
    assert tini, "tini is missing: scripts/setup-test-deps.sh installs it (Debian package)"
    # PID 1 of its own PID namespace, as in a container; loopback only (the image: 0.0.0.0).
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", tini, "--",
         str(venv / "bin" / ENTRYPOINT[2]), *ENTRYPOINT[3:], "--host", "127.0.0.1",
         "--port", str(port)],
        env={**env, "BROKER_MAX_SESSIONS_PER_OWNER": "0"}, cwd=home,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"serve exited: {proc.stdout.read() if proc.stdout else ''}"
            try:
                status, body = _get(f"{base}/health")
                break
            except OSError:
                assert time.monotonic() < deadline, "no answer on /health within 60 s"
                time.sleep(0.3)
        assert status == 200 and body["ok"] is True
        assert body["version"] == wheel.name.split("-")[1]
        status, body = _get(f"{base}/ready")
        assert status == 200, body

        # The image's HEALTHCHECK command, as written, against this process.
        check = healthcheck_command()
        assert check[0] == "python"
        healthy = subprocess.run([str(python), *check[1:]], env={**env, "BROKER_PORT": str(port)},
                                 timeout=30)
        assert healthy.returncode == 0
        unhealthy = subprocess.run([str(python), *check[1:]],
                                   env={**env, "BROKER_PORT": str(free_port())},
                                   capture_output=True, timeout=30)
        assert unhealthy.returncode != 0

        # The runtime dependencies are enough for a real session (local backend).
        status, session = _get(f"{base}/api/v1/sessions?wait=true", method="POST")
        assert status == 201 and session["status"] == "ready", session
        auth = {"Authorization": f"token {session['token']}"}
        status, specs = _get(f"{session['base_url']}api/kernelspecs", headers=auth)
        assert status == 200 and "python3" in specs["kernelspecs"]

        # A kernel orphaned by its killed server exits, and PID 1 (tini) reaps it: it
        # does not linger as a zombie (a PID 1 that never waits would leave one).
        status, _ = _get(f"{session['base_url']}api/kernels", method="POST",
                         headers={**auth, "Content-Type": "application/json"},
                         data=b'{"name": "python3"}')
        assert status == 201
        server, kernel = _session_processes(session["id"])
        os.kill(server, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{kernel}").exists():
            assert time.monotonic() < deadline, f"kernel {kernel}: {_state(kernel)} after 30 s"
            time.sleep(0.2)

        status, _ = _get(f"{base}/api/v1/sessions/{session['id']}", method="DELETE",
                         headers=auth)
        assert status in (200, 204)
    finally:
        _stop(proc)
    assert proc.returncode in (0, 128 + signal.SIGTERM), proc.returncode  # tini passes it on


def _session_processes(session_id: str) -> tuple[int, int]:
    """(server, kernel) host PIDs of a local session, by the backend's marker."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and marked_for(int(entry.name), session_id):
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            for role, needle in (("server", b"broker.localserver"), ("kernel", b"ipykernel")):
                if needle in cmdline:
                    found[role] = int(entry.name)
    assert set(found) == {"server", "kernel"}, found
    return found["server"], found["kernel"]


def _state(pid: int) -> str:
    """A process's state letter (Z: zombie), or gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to tini (unshare's child) as a container runtime sends it to PID 1."""
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        children = []
    os.kill(int(children[0]) if children else proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)  # --kill-child takes the namespace with it
        proc.wait(10)
