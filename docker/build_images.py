"""Build the sitefit images with podman and smoke-test them, without a registry (`make images`).

On machines that can reach no container registry but can build (Debian's podman and buildah,
chroot isolation) this:

1. makes the base image if it is missing: a Debian bookworm minbase made by ``mmdebstrap``,
   imported as ``localhost/sitefit-base`` (it stands in for ``debian:bookworm-slim``);
2. downloads the pinned torch wheel once on the host (``pip download``: the host's pip
   configuration, or ``--torch-index``) into ``.whl/``, which the worker build mounts;
3. builds ``docker/api.Dockerfile`` and ``docker/worker.Dockerfile``;
4. smoke-tests them with ``buildah run --isolation chroot`` (``podman run`` cannot start
   containers in such sandboxes): ``sitefit --help`` in each, no torch in the API image, the
   non-root user, then in the worker image phantoms, a tiny model trained and a scan segmented;
   then, on a private redis-server, the API, a worker and the DICOM listener run from the
   images at once over a shared SITEFIT_HOME: each image's own HEALTHCHECK (and the listener's
   from docker-compose.yml) turns healthy, a C-ECHO is answered, a job uploaded to the API is
   run by the worker container, and every check fails again once the services stopped.

Build times, image sizes and smoke timings are printed as a table and written to
``build/images/report.json`` (docs/operations.md records them).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TORCH_VERSION = "2.13.0"
SITEFIT_UID = 10001
STOP_FILE = ".smoke-stop"
# where the containers share a host folder as SITEFIT_HOME: buildah run does not bind-mount
# over a path the image declares a VOLUME (/data)
SHARED = "/shared"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-image", default="localhost/sitefit-base")
    parser.add_argument("--rebuild-base", action="store_true", help="make the base again")
    parser.add_argument("--api-image", default="localhost/sitefit-api:latest")
    parser.add_argument("--worker-image", default="localhost/sitefit-worker:cpu")
    parser.add_argument(
        "--torch-index", default="", help="index of the torch wheel (default: pip's own)"
    )
    parser.add_argument("--skip-build", action="store_true", help="only smoke-test the images")
    parser.add_argument("--no-cache", action="store_true", help="build every layer again")
    parser.add_argument("--report", type=Path, default=REPO / "build" / "images" / "report.json")
    args = parser.parse_args(argv)

    for tool, package in (
        ("podman", "podman"),
        ("buildah", "buildah"),
        ("redis-server", "redis-server"),
    ):
        if shutil.which(tool) is None:
            sys.exit(f"build_images: {tool} is missing: apt-get install {package}")
    report: dict[str, Any] = {"host": _host(), "seconds": {}, "bytes": {}}
    seconds: dict[str, float] = report["seconds"]

    if not args.skip_build:
        if args.rebuild_base or not _image_exists(args.base_image):
            seconds["base image (mmdebstrap + import)"] = _timed(lambda: make_base(args.base_image))
        wheels = REPO / ".whl" / _slug(args.torch_index or "pip-default")
        seconds["torch wheel on the host"] = _timed(lambda: fetch_torch(wheels, args.torch_index))
        base = ["--build-arg", f"BASE_IMAGE={args.base_image}", *pip_cert_args()]
        if args.no_cache:
            base.append("--no-cache")
        seconds["build api image"] = _timed(
            lambda: build("docker/api.Dockerfile", args.api_image, base)
        )
        worker_args = [
            *base,
            "--volume", f"{wheels}:/wheels:ro",
            "--build-arg", "PIP_FIND_LINKS=/wheels",
            "--build-arg", "TORCH_INDEX=",
        ]  # fmt: skip
        seconds["build worker image"] = _timed(
            lambda: build("docker/worker.Dockerfile", args.worker_image, worker_args)
        )
    for key, image in (("api", args.api_image), ("worker", args.worker_image)):
        report["bytes"][key] = int(
            _out(["podman", "image", "inspect", "--format", "{{.Size}}", image])
        )

    smoke(args.api_image, args.worker_image, seconds)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"build_images: all smoke tests passed; figures in {args.report}")
    return 0


# -- building ---------------------------------------------------------------------------------


def make_base(image: str) -> None:
    """A Debian bookworm minbase (python3 comes from apt in the Dockerfiles), as ``image``."""
    if shutil.which("mmdebstrap") is None:
        sys.exit("build_images: mmdebstrap is missing: apt-get install mmdebstrap")
    with tempfile.TemporaryDirectory(prefix="sitefit-base-") as tmp:
        tarball = Path(tmp) / "base.tar"
        # like debian:bookworm-slim: no manuals, locales or docs but the copyright files
        slim = ["/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*", "/usr/share/doc/*"]
        options = [f"--dpkgopt=path-exclude={path}" for path in slim]
        options.append("--dpkgopt=path-include=/usr/share/doc/*/copyright")
        _run(["mmdebstrap", "--variant=minbase", *options, "bookworm", str(tarball)])
        _run(["podman", "import", str(tarball), image])


def fetch_torch(wheels: Path, index: str) -> None:
    """The pinned torch wheel in ``wheels`` (pip reuses one already there)."""
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", f"torch=={TORCH_VERSION}", "--no-deps"]
    command += ["--dest", str(wheels), "--quiet", *(["--index-url", index] if index else [])]
    _run(command)


def pip_cert_args() -> list[str]:
    """Mount the CA bundle the host's pip trusts, if it names one (a TLS-intercepting proxy)."""
    cert = os.environ.get("PIP_CERT")
    if not cert:
        listing = _out([sys.executable, "-m", "pip", "config", "list"])
        found = re.findall(r"^[^=]*\bcert='([^']+)'$", listing, flags=re.MULTILINE)
        cert = found[-1] if found else None
    if not cert or not Path(cert).is_file():
        return []
    return ["--volume", f"{cert}:/run/pip-ca.crt:ro", "--build-arg", "PIP_CERT=/run/pip-ca.crt"]


def build(dockerfile: str, tag: str, extra: list[str]) -> None:
    # --format docker keeps HEALTHCHECK (the OCI image format has no field for it)
    _run([
        "podman", "build", "--isolation", "chroot", "--format", "docker",
        "--file", dockerfile, "--tag", tag, *extra, ".",
    ])  # fmt: skip


# -- smoke test -------------------------------------------------------------------------------


class Container:
    """A working container of an image (``buildah from``) that commands run in."""

    def __init__(self, image: str, data: Path) -> None:
        self.image = image
        self.data = data
        self.name = f"sitefit-smoke-{uuid.uuid4().hex[:8]}"
        (inspected,) = json.loads(_out(["podman", "image", "inspect", image]))
        self.cmd: list[str] = inspected["Config"].get("Cmd") or []
        self.healthcheck: list[str] = (inspected.get("Healthcheck") or {}).get("Test") or []
        _run(["buildah", "from", "--pull=never", "--name", self.name, image], quiet=True)

    def argv(self, command: Sequence[str], env: dict[str, str]) -> list[str]:
        flags = ["--isolation", "chroot", "--volume", f"{self.data}:{SHARED}"]
        env = {"SITEFIT_HOME": SHARED, **env}
        for key, value in env.items():
            flags += ["--env", f"{key}={value}"]
        return ["buildah", "run", *flags, self.name, "--", *command]

    def run(
        self, command: Sequence[str], env: dict[str, str] | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(command, env or {}), capture_output=True, text=True, timeout=timeout
        )

    def check(self, command: Sequence[str], env: dict[str, str] | None = None) -> str:
        print(f"  [{self.image}] $ {' '.join(command)}", flush=True)
        done = self.run(command, env)
        if done.returncode != 0:
            raise SmokeFailure(
                f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}"
            )
        return done.stdout

    def health_command(self) -> list[str]:
        kind, *rest = self.healthcheck or ["NONE"]
        if kind == "CMD-SHELL":
            return ["sh", "-c", rest[0]]
        if kind == "CMD":
            return rest
        raise SmokeFailure(f"{self.image} has no HEALTHCHECK")

    def remove(self) -> None:
        subprocess.run(["buildah", "rm", self.name], capture_output=True, check=False)


class Service:
    """A long-running command in a container, stopped once the shared folder holds STOP_FILE."""

    def __init__(
        self, container: Container, command: Sequence[str], env: dict[str, str], log: Path
    ) -> None:
        # buildah run does not pass our signals on: the command's shell watches a stop file
        script = (
            '"$@" & pid=$!; '
            f'while [ ! -e {SHARED}/{STOP_FILE} ] && kill -0 "$pid" 2>/dev/null; '
            "do sleep 0.5; done; "
            'kill -TERM "$pid" 2>/dev/null; wait "$pid"'
        )
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                container.argv(["sh", "-c", script, "sh", *command], env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # our own session, by its id
            self.process.wait(10)


class SmokeFailure(Exception):
    pass


def smoke(api_image: str, worker_image: str, seconds: dict[str, float]) -> None:
    with tempfile.TemporaryDirectory(prefix="sitefit-smoke-") as tmp:
        data = Path(tmp) / "data"  # the shared SITEFIT_HOME volume, owned by the image's user
        data.mkdir()
        os.chown(data, SITEFIT_UID, SITEFIT_UID)
        containers: list[Container] = []
        try:
            for image in (api_image, api_image, worker_image):
                containers.append(Container(image, data))  # each removed below, even on failure
            api, listener, worker = containers
            print("smoke: the API image", flush=True)
            seconds["smoke: api static checks"] = _timed(lambda: static_api(api))
            print("smoke: the worker image", flush=True)
            seconds["smoke: worker sitefit --help"] = _timed(lambda: static_worker(worker))
            seconds["smoke: phantoms + train a tiny model"] = _timed(lambda: train(worker))
            seconds["smoke: sitefit segment (adapt)"] = _timed(lambda: segment(worker))
            print("smoke: API + worker + listener from the images, on a private Redis", flush=True)
            services(api, listener, worker, Path(tmp), seconds)
        except SmokeFailure as failure:
            sys.exit(f"build_images: smoke test failed: {failure}")
        finally:
            for container in containers:
                container.remove()


def static_api(api: Container) -> None:
    api.check(["sitefit", "--help"])
    api.check(["sitefit", "dicom-listener", "--help"])
    _expect(api.check(["id", "-u"]).strip() == str(SITEFIT_UID), "the API image runs as root")
    done = api.run(["python", "-c", "import torch"])
    _expect(
        done.returncode != 0 and "No module named 'torch'" in done.stderr,
        f"torch is importable in the API image (exit {done.returncode})",
    )
    print("  [api] no torch: `import torch` fails as it must", flush=True)


def static_worker(worker: Container) -> None:
    worker.check(["sitefit", "--help"])
    _expect(worker.check(["id", "-u"]).strip() == str(SITEFIT_UID), "the worker image runs as root")
    version = worker.check(["python", "-c", "import torch; print(torch.__version__)"]).strip()
    print(f"  [worker] torch {version}", flush=True)


def train(worker: Container) -> None:
    env = {"SITEFIT_DEVICE": "cpu"}
    worker.check(["sitefit", "phantoms", "--task", "brain", "--domain", "a3t", "--n", "2",
                  "--fov-mm", "40", "--out", f"{SHARED}/smoke/source"], env)  # fmt: skip
    worker.check(["sitefit", "phantoms", "--task", "brain", "--domain", "b3t", "--n", "1",
                  "--seed", "7", "--fov-mm", "40",
                  "--out", f"{SHARED}/smoke/target"], env)  # fmt: skip
    worker.check(["sitefit", "train", f"{SHARED}/smoke/source", "--name", "smoke-brain",
                  "--epochs", "1", "--head-epochs", "1", "--base-channels", "4",
                  "--batch-size", "8"], env)  # fmt: skip


def target_scan(data: Path) -> Path:
    scans = sorted((data / "smoke" / "target" / "imagesTr").glob("*.nii.gz"))
    _expect(len(scans) == 1, "the target phantom is missing")
    return scans[0]


def segment(worker: Container) -> None:
    scan = f"{SHARED}/" + str(target_scan(worker.data).relative_to(worker.data))
    worker.check(["sitefit", "segment", scan, "--model", "smoke-brain", "--site", "b3t",
                  "--mode", "adapt", "--out", f"{SHARED}/smoke/mask.nii.gz",
                  "--report", f"{SHARED}/smoke/report.json", "--quiet"],
                 {"SITEFIT_DEVICE": "cpu"})  # fmt: skip
    report = json.loads((worker.data / "smoke" / "report.json").read_text())
    _expect((worker.data / "smoke" / "mask.nii.gz").stat().st_size > 0, "segment wrote no mask")
    used = report.get("mode_used")
    _expect(used == "adapt", f"segment ran mode {used!r}, not adapt")


def services(
    api: Container, listener: Container, worker: Container, tmp: Path, seconds: dict[str, float]
) -> None:
    api_port, metrics_port, dicom_port = _free_port(), _free_port(), _free_port()
    with _redis(tmp) as redis_url:
        common = {"SITEFIT_REDIS_URL": redis_url, "SITEFIT_DEVICE": "cpu"}
        api_env = {**common, "SITEFIT_PORT": str(api_port), "SITEFIT_MAINTENANCE_INTERVAL_S": "1"}
        worker_env = {
            **common,
            "SITEFIT_METRICS_PORT": str(metrics_port),
            "SITEFIT_REFINE_MAX_EPOCHS": "3",
        }
        listener_env = {**common, "SITEFIT_DICOM_PORT": str(dicom_port)}
        # what docker-compose.yml's listener service checks (the image's own checks the API)
        listener_check = ["sitefit-healthcheck", "tcp", "127.0.0.1", str(dicom_port)]
        checks: list[tuple[str, Container, list[str], dict[str, str]]] = [
            ("api /readyz", api, api.health_command(), api_env),
            ("worker metrics", worker, worker.health_command(), worker_env),
            ("listener port", listener, listener_check, listener_env),
        ]
        started = time.monotonic()
        running = [
            Service(api, ["sitefit", "serve", "--port", str(api_port)], api_env, tmp / "api.log"),
            Service(worker, worker.cmd, worker_env, tmp / "worker.log"),
            Service(listener, ["sitefit", "dicom-listener"], listener_env, tmp / "listener.log"),
        ]
        try:
            for what, container, command, env in checks:
                healthy = functools.partial(_healthy, container, command, env)
                _wait(healthy, 120, f"the {what} healthcheck", running)
                print(f"  healthy: {what} ({' '.join(command)})", flush=True)
            seconds["smoke: services healthy"] = round(time.monotonic() - started, 1)
            if shutil.which("echoscu"):
                _run(["echoscu", "-aec", "SITEFIT", "127.0.0.1", str(dicom_port)])
                print("  C-ECHO to the listener answered", flush=True)
            seconds["smoke: job through API + worker"] = _timed(
                lambda: submit_job(api_port, target_scan(api.data), running)
            )
        finally:
            (api.data / STOP_FILE).touch()
            for service in running:
                service.wait(120)
            (api.data / STOP_FILE).unlink()
        for service in running:
            if service.process.returncode not in (0, 143):
                raise SmokeFailure(
                    f"a service exited {service.process.returncode}:\n"
                    + service.log.read_text()[-3000:]
                )
        for what, container, command, env in checks:  # a check must be able to fail
            _expect(container.run(command, env, 30).returncode == 1, f"{what} healthy when stopped")
        print("  all three checks fail once the services stopped", flush=True)


def submit_job(port: int, scan: Path, running: list[Service]) -> None:
    base = f"http://127.0.0.1:{port}"
    fields = {"model": "smoke-brain", "site": "b3t", "mode": "adapt"}
    body, content_type = _multipart(fields, scan.read_bytes())
    request = urllib.request.Request(
        f"{base}/v1/jobs", data=body, headers={"Content-Type": content_type}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        job = json.load(response)
    print(f"  job {job['id']} queued", flush=True)
    state: dict[str, Any] = {}

    def ended() -> bool:
        with urllib.request.urlopen(f"{base}/v1/jobs/{job['id']}", timeout=30) as answer:
            state.update(json.load(answer))
        return state.get("status") in ("finished", "failed", "canceled")

    _wait(ended, 600, "the job to end", running)
    _expect(state["status"] == "finished", f"the job ended {state['status']}: {state}")
    with urllib.request.urlopen(f"{base}/v1/jobs/{job['id']}/mask", timeout=60) as answer:
        _expect(len(answer.read()) > 0, "the job's mask is empty")
    print("  the worker container ran the job; its mask downloads from the API", flush=True)


# -- helpers ----------------------------------------------------------------------------------


@contextmanager
def _redis(tmp: Path) -> Iterator[str]:
    port = _free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait(lambda: _connects(port), 10, "redis-server", [])
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


def _multipart(fields: dict[str, str], scan: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="scan.nii.gz"\r\n'
        "Content-Type: application/gzip\r\n\r\n".encode()
        + scan
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _wait(condition: Callable[[], bool], timeout: float, what: str, running: list[Service]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for service in running:
            if not service.alive():
                raise SmokeFailure(f"a service exited early:\n{service.log.read_text()[-3000:]}")
        try:
            if condition():
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.5)
    logs = "\n".join(service.log.read_text()[-1500:] for service in running)
    raise SmokeFailure(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def _healthy(container: Container, command: list[str], env: dict[str, str]) -> bool:
    return container.run(command, env, 30).returncode == 0


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _expect(condition: bool, failure: str) -> None:
    if not condition:
        raise SmokeFailure(failure)


def _timed(step: Callable[[], None]) -> float:
    started = time.monotonic()
    step()
    return round(time.monotonic() - started, 1)


def _run(command: list[str], *, quiet: bool = False) -> None:
    if not quiet:
        print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL if quiet else None)


def _out(command: list[str]) -> str:
    return subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True).stdout


def _image_exists(image: str) -> bool:
    return subprocess.run(["podman", "image", "exists", image], check=False).returncode == 0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")[:80]


def _host() -> str:
    cpus = os.cpu_count()
    podman = _out(["podman", "--version"]).strip()
    return f"{cpus} CPU cores, {podman}"


def print_table(report: dict[str, Any]) -> None:
    print(f"\n| step ({report['host']}) | seconds |\n|---|---|")
    for step, value in report["seconds"].items():
        print(f"| {step} | {value:.1f} |")
    print("\n| image | size |\n|---|---|")
    for image, size in report["bytes"].items():
        print(f"| {image} | {size / 1e6:.0f} MB |")


if __name__ == "__main__":
    sys.exit(main())
