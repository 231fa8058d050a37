"""From laptop to cluster, on loopback: the CLI attaches to a real two-node Ray cluster
(`cluster.address=HOST:PORT`), tracks into a real `mlflow server` (sqlite backend, served
artifacts) and keeps checkpoints and adapters in a real S3 store (moto_server), all in one sweep;
the same sweep runs through Ray Client (`cluster.address=ray://HOST:PORT`); and a trial trains
data-parallel over two Ray Train workers (DDP on gloo).

Needs `moto_server` (pip install 'moto[server]') for the S3 part; without it the sweep runs with a
shared local storage.path instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from servers import RAY_ENV, free_port, mlflow_server, ray_cluster, s3_server

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
BUCKET = "finetune-lab"
SMALL = ["train.max_steps=20", "train.log_every=10", "train.checkpoint_every=10", "data.max_train_rows=200",
         "data.max_eval_rows=20"]


def _node_env() -> dict:
    """What a node's `ray start` sees: no PYTHONPATH to this checkout (the job ships the code)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def cluster_sweep(tmp_path_factory):
    """One sweep of two trials on a 2-node cluster (1 CPU each), MLflow server, S3 storage."""
    work = tmp_path_factory.mktemp("cluster")
    driver_dir = work / "driver"
    driver_dir.mkdir()
    with s3_server(work, BUCKET) as s3_env, mlflow_server(work) as (tracking_uri, artifacts), \
            ray_cluster(work, [{"num_cpus": 1, "resources": {"node_a": 1}},
                               {"num_cpus": 1, "resources": {"node_b": 1}}],
                        env={**_node_env(), **s3_env}) as (address, ray_temp):
        cmd = [sys.executable, "-m", "orchestrator", "+sweep=lora_rank", "sweep.axes={method.r:[2,8]}", *SMALL,
               f"cluster.address={address}", f"tracking.uri={tracking_uri}", f"storage.path=s3://{BUCKET}/sweeps"]
        env = {**os.environ, **RAY_ENV, **s3_env, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, cwd=driver_dir, env=env, capture_output=True, text=True, timeout=600)
        yield {"proc": proc, "work": work, "driver_dir": driver_dir, "uri": tracking_uri, "artifacts": artifacts,
               "ray_temp": ray_temp, "s3_env": s3_env}


def _children(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lora_rank")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "lora_rank"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, parents[0], children


def test_sweep_on_two_nodes_finishes_and_shows_where_each_trial_ran(cluster_sweep):
    proc = cluster_sweep["proc"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "data (sft): " in proc.stdout  # the driver's pass, run as a task on the cluster
    _, parent, children = _children(cluster_sweep["uri"])
    assert parent.info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    node_ids = {c.data.tags["node_id"] for c in children}
    assert len(node_ids) == 2, "one trial per node: each node has the one CPU a trial needs"
    (node_ip,) = {c.data.tags["node_ip"] for c in children}  # one machine, one IP: the id tells them apart
    # The console says it too: the board while running, the table at the end.
    shown = {f"{node_ip}/{node_id[:8]}" for node_id in node_ids}
    out = proc.stdout
    assert all(f"on {label}" in out for label in shown), out[-3000:]
    table = out[out.index("eval loss"):]
    assert "node" in table.splitlines()[0] and all(label in table for label in shown)


def test_runs_and_artifacts_reach_the_mlflow_server(cluster_sweep):
    assert cluster_sweep["proc"].returncode == 0
    client, parent, children = _children(cluster_sweep["uri"])
    for child in children:
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert [m.step for m in history] == [10, 20]
        assert "eval/loss" in child.data.metrics
        files = {a.path for a in client.list_artifacts(child.info.run_id, "adapter")}
        assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= files
    # Stored by the server under --artifacts-destination, nowhere on the driver's or a worker's disk.
    stored = sorted(cluster_sweep["artifacts"].rglob("adapter_model.safetensors"))
    assert len(stored) == 2
    assert {c.info.run_id for c in children} == {p.parent.parent.parent.name for p in stored}
    assert (cluster_sweep["artifacts"] / parent.info.experiment_id / parent.info.run_id / "artifacts" / "report"
            / "comparison.md").is_file()
    for root in (cluster_sweep["driver_dir"], cluster_sweep["ray_temp"]):
        assert not [p for name in ("mlartifacts", "mlruns") for p in root.rglob(name)], root


def test_checkpoints_and_adapters_are_in_s3(cluster_sweep):
    import pyarrow.fs as pafs

    assert cluster_sweep["proc"].returncode == 0
    _, _, children = _children(cluster_sweep["uri"])
    fs = pafs.S3FileSystem(endpoint_override=cluster_sweep["s3_env"]["AWS_ENDPOINT_URL_S3"], access_key="testing",
                           secret_key="testing", region="us-east-1")
    files = {i.path for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/sweeps", recursive=True))
             if i.type == pafs.FileType.File}
    for child in children:
        trial = f"{BUCKET}/sweeps/lora_rank/{child.data.tags['trial_key']}"
        assert {f"{trial}/adapter/adapter_model.safetensors", f"{trial}/adapter/adapter_config.json",
                f"{trial}/metrics.json", f"{trial}/checkpoints/step-000010/manifest.json",
                f"{trial}/checkpoints/step-000010/trainable.safetensors"} <= files, sorted(files)[:40]
    assert any(path.startswith(f"{BUCKET}/sweeps/ray/") for path in files)  # Ray Tune's experiment state
    # The data, prepared once by the driver's pass (a Ray task on the cluster), for every node to read.
    assert any(path.startswith(f"{BUCKET}/sweeps/prepared/") and path.endswith("/data.arrow") for path in files)
    # Nothing of the trials on the driver's disk: only its log.
    local = [p for p in (cluster_sweep["driver_dir"] / "runs").rglob("*") if p.is_file()]
    assert local and all(p.suffix == ".log" for p in local)


def test_ray_client_address_runs_the_sweep_with_live_progress(tmp_path):
    """Through Ray Client, Tune and its callbacks run in an actor on the cluster: the trials must
    keep their zero-CPU reservation there (else two trials hold both CPUs and their workers never
    start) and progress must still reach the driver's console."""
    from mlflow.tracking import MlflowClient

    port = free_port()
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    with ray_cluster(tmp_path, [{"num_cpus": 2}], env=_node_env(), client_port=port):
        cmd = [sys.executable, "-m", "orchestrator", "+sweep=lora_rank", "sweep.axes={method.r:[2,8]}", *SMALL,
               f"cluster.address=ray://127.0.0.1:{port}", f"storage.path={tmp_path / 'shared'}"]
        env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, cwd=driver_dir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{driver_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lora_rank")
    children = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")] == [10, 20]
        assert (tmp_path / "shared" / "lora_rank" / child.data.tags["trial_key"] / "adapter"
                / "adapter_model.safetensors").is_file()
    # progress relayed from the cluster-side callbacks to the board on the driver
    assert "20/20" in proc.stdout and all(f"on {c.data.tags['node_ip']}/" in proc.stdout for c in children)


def test_ddp_trial_on_two_workers_learns(tmp_path):
    """One trial, train.num_workers=2 (DDP on gloo) on a local Ray with 2 CPUs."""
    from mlflow.tracking import MlflowClient

    cmd = [sys.executable, "-m", "orchestrator", "+sweep=lora_rank", "sweep.axes={method.r:[4]}",
           "train.max_steps=30", "train.log_every=10", "train.checkpoint_every=10", "train.num_workers=2",
           "train.batch_size=8", "data.max_train_rows=200", "data.max_eval_rows=20", "cluster.num_cpus=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lora_rank")
    (child,) = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FINISHED" and child.data.params["train.num_workers"] == "2"
    losses = [m.value for m in sorted(client.get_metric_history(child.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "eval/accuracy" in child.data.metrics  # evaluated (on rank 0) and saved
    files = {a.path for a in client.list_artifacts(child.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in files
    # Two ranks of 8 examples each per step: throughput counts both ranks' tokens.
    assert child.data.metrics["perf/tokens_per_s"] > 0
