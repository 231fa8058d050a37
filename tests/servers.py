"""Real servers on loopback for the cluster tests: an S3 store (moto_server), an MLflow server and a
multi-node Ray cluster (`ray start`). Each is a context manager that stops what it started, and
only that (its own process group), even when the test fails.

Ray >= 2.59 turns on token authentication for clusters started with `ray start`; these clusters
and the drivers that attach to them run with RAY_AUTH_MODE=disabled (`RAY_ENV`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            result = check()
            if result:
                return result
        except Exception:
            pass
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f}s\n{tail}")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status < 500


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM to the process group we created, then SIGKILL what is left of it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _start(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    handle = open(log, "ab")
    try:
        return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
    finally:
        handle.close()


def find_executable(name: str, env_var: str) -> str | None:
    """`name` from $env_var, beside this Python, or on PATH."""
    for candidate in (os.environ.get(env_var), BIN / name, shutil.which(name)):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


@contextlib.contextmanager
def s3_server(workdir: Path, bucket: str = "finetune-lab"):
    """A real S3 HTTP endpoint (moto_server, from `pip install moto[server]`) with one bucket;
    yields the environment that points the AWS SDKs (pyarrow's too) at it."""
    exe = find_executable("moto_server", "FTLAB_MOTO_SERVER")
    if exe is None:
        pytest.skip("moto_server not found (pip install 'moto[server]', or set FTLAB_MOTO_SERVER)")
    port = free_port()
    log = workdir / "moto.log"
    proc = _start([exe, "-H", "127.0.0.1", "-p", str(port)], log)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for(lambda: _http_ok(endpoint), 60, "moto_server", proc, log)
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=endpoint, access_key="testing", secret_key="testing",
                          region="us-east-1", allow_bucket_creation=True).create_dir(bucket)
        yield {**S3_CREDENTIALS, "AWS_ENDPOINT_URL_S3": endpoint}
    finally:
        _stop(proc)


@contextlib.contextmanager
def mlflow_server(workdir: Path):
    """`mlflow server` with a sqlite backend and served artifacts stored under `artifacts`;
    yields (tracking URI, artifacts directory)."""
    port = free_port()
    artifacts = workdir / "server-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log = workdir / "mlflow-server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{workdir / 'server.db'}", "--serve-artifacts",
           "--artifacts-destination", str(artifacts), "--workers", "2"]
    proc = _start(cmd, log, cwd=workdir)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_for(lambda: _http_ok(f"{uri}/health"), 120, "mlflow server", proc, log)
        yield uri, artifacts
    finally:
        _stop(proc)


@contextlib.contextmanager
def ray_cluster(workdir: Path, nodes: list[dict], env: dict, client_port: int | None = None):
    """A Ray cluster of `len(nodes)` nodes on this machine, each `{"num_cpus": n, "resources": {...}}`,
    the first the head; yields (the head's address HOST:PORT, the nodes' temp dir). With
    `client_port` the head also serves Ray Client (ray://127.0.0.1:client_port).

    Each node is a `ray start --block` in its own process group: stopping it stops that node's
    processes only (never `ray stop`, which would end every Ray on the machine). The nodes get their
    own temp dir, so `address=auto` elsewhere on the machine never finds this cluster.
    """
    import json

    temp = Path(tempfile.mkdtemp(prefix="ftray-", dir="/tmp"))  # short: Ray's socket paths have a limit
    env = {**env, **RAY_ENV}
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    try:
        for i, node in enumerate(nodes):
            cmd = [str(BIN / "ray"), "start", "--block", f"--num-cpus={node['num_cpus']}", "--num-gpus=0",
                   f"--resources={json.dumps(node.get('resources', {}))}", f"--temp-dir={temp}",
                   f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   "--disable-usage-stats"]
            if i == 0:
                cmd += ["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false"]
                if client_port:
                    cmd += [f"--ray-client-server-port={client_port}"]
            else:
                cmd += [f"--address={address}", "--node-ip-address=127.0.0.1"]
            procs.append(_start(cmd, workdir / f"ray-node{i}.log", env=env))
            if i == 0:
                wait_for(lambda: _alive_nodes(address, env) >= 1, 120, "ray head", procs[0], workdir / "ray-node0.log")
        last = workdir / f"ray-node{len(nodes) - 1}.log"
        wait_for(lambda: _alive_nodes(address, env) >= len(nodes), 120, f"{len(nodes)} ray nodes", procs[-1], last)
        if client_port:  # the head's client server answers a first client (it once failed one just after start)
            wait_for(lambda: _client_connects(client_port, env), 120, "ray client server", procs[0],
                     workdir / "ray-node0.log")
        yield address, temp
    finally:
        for proc in reversed(procs):
            _stop(proc, grace=2)  # a head drains for up to 30 s on SIGTERM (it outlasted 8 s); nothing here needs it
        shutil.rmtree(temp, ignore_errors=True)


def _client_connects(port: int, env: dict) -> bool:
    """A Ray Client session on ray://127.0.0.1:port starts and answers (asked from a child process)."""
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print('served', ray.cluster_resources()['CPU'])")
    out = subprocess.run([sys.executable, "-c", code, f"ray://127.0.0.1:{port}"], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=90)
    return out.returncode == 0 and "served" in out.stdout


def _alive_nodes(address: str, env: dict) -> int:
    """Alive nodes as the cluster's GCS sees them (asked from a child process: no Ray in the test's)."""
    code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    out = subprocess.run([sys.executable, "-c", code, address], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=60)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0
