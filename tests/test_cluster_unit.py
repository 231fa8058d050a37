"""Ray-free checks of what running on a cluster relies on: storage locations (a real S3 server on
loopback when `moto_server` is installed), checkpoints uploaded to and restored from it, rank
shards, and data-parallel training (DDP and FSDP on gloo, two processes) on a tiny model."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest

from servers import S3_CREDENTIALS, s3_server
from trainers import storage
from trainers.config import ConfigError, TrainConfig
from trainers.runtime import DistInfo
from trainers.training import micro_batches

BUCKET = "finetune-lab"


# --------------------------------------------------------------------------- locations


def test_locations_keep_uris_and_make_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("runs") == str(tmp_path / "runs")
    assert storage.normalize("file://" + str(tmp_path / "x")) == str(tmp_path / "x")
    assert storage.normalize("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert not storage.is_remote("/shared/runs") and storage.is_remote("s3://b/p") and storage.is_remote("gs://b")
    assert storage.join("/shared/runs", "exp", "key") == "/shared/runs/exp/key"
    query = "s3://b/p?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(query, "exp", "key") == "s3://b/p/exp/key?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.staging_dir("s3://b/p/exp/3f2a9c1e0b7d", rank=1).name == "3f2a9c1e0b7d"  # faults key on it


def test_local_location_writes_in_place(tmp_path):
    trial = storage.TrialStorage(tmp_path / "exp" / "key")
    assert trial.local == tmp_path / "exp" / "key" and trial.local.is_dir()
    assert trial.remote_join("checkpoints") is None
    trial.publish()  # nothing to do
    trial.cleanup()
    assert trial.local.is_dir()


# --------------------------------------------------------------------------- shards


@pytest.mark.parametrize("n_examples, batch_size", [(48, 4), (50, 4), (7, 16)])
def test_two_ranks_get_disjoint_shards_that_cover_the_data(n_examples, batch_size):
    examples = list(range(n_examples))
    streams = [micro_batches(examples, batch_size, seed=3, dist=DistInfo(rank, 2, rank)) for rank in (0, 1)]
    per_rank = n_examples // 2
    usable = per_rank - per_rank % batch_size or per_rank  # fewer than a batch each: one smaller batch
    batches_per_epoch = max(1, per_rank // batch_size)
    epochs = []
    for _epoch in range(2):
        seen = [[i for _ in range(batches_per_epoch) for i in next(stream)] for stream in streams]
        assert len(seen[0]) == len(seen[1]) == usable  # the ranks step through epochs together
        assert not set(seen[0]) & set(seen[1])  # distinct shards
        assert len(set(seen[0])) == len(seen[0])
        covered = set(seen[0]) | set(seen[1])
        assert covered <= set(examples) and len(covered) == 2 * usable  # all but a tail < 2 batches
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_shards_of_one_epoch_cover_everything_when_it_divides():
    examples = list(range(48))
    streams = [micro_batches(examples, 4, seed=0, dist=DistInfo(rank, 2, rank)) for rank in (0, 1)]
    epoch = [i for stream in streams for _ in range(6) for i in next(stream)]
    assert sorted(epoch) == examples


def test_fewer_examples_than_workers_is_an_error():
    with pytest.raises(ValueError, match="cannot be split over 4 workers"):
        next(micro_batches([1, 2, 3], 2, 0, DistInfo(0, 4, 0)))


# --------------------------------------------------------------------------- FSDP settings


@pytest.mark.parametrize("overrides, message", [
    (["train.fsdp=true"], "train.num_workers > 1"),
    (["train.fsdp=true", "train.num_workers=2"], "method=full"),
    (["train.fsdp=true", "train.num_workers=2", "method=full", "precision=nf4"], None),
])
def test_fsdp_needs_workers_and_full_fine_tuning(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as err:
        make_cfg(*overrides)
    keys = [key for key, _ in err.value.problems]
    if message:
        assert "train.fsdp" in keys
        assert any(message in msg for key, msg in err.value.problems if key == "train.fsdp")
    else:
        assert keys  # a quantized full fine-tune is refused (by the method or by train.fsdp)


def test_fsdp_full_fine_tuning_is_accepted(make_cfg):
    cfg = make_cfg("train.fsdp=true", "train.num_workers=2", "method=full")
    assert cfg.train.fsdp and cfg.train.num_workers == 2


# --------------------------------------------------------------------------- S3


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3"), BUCKET) as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _s3_files(prefix: str) -> dict[str, int]:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(f"s3://{prefix}")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def _tiny_training_state(seed: int):
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)  # frozen parameters are not checkpointed
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_checkpoints_upload_atomically_and_restore_the_newest_verified(s3, tmp_path):
    from trainers.checkpoint import MANIFEST, CheckpointManager

    remote = f"s3://{BUCKET}/unit/ckpt/checkpoints"
    writer = CheckpointManager(tmp_path / "worker-a" / "checkpoints", remote=remote)
    model, optimizer, scheduler = _tiny_training_state(0)
    for step in (2, 4, 6):
        writer.save(step, model, optimizer, scheduler)
    files = _s3_files(f"{BUCKET}/unit/ckpt/checkpoints")
    assert sorted({name.split("/")[0] for name in files}) == ["step-000004", "step-000006"]  # keep_last=2
    assert {"step-000006/" + n for n in ("trainable.safetensors", "state.pt", MANIFEST)} <= set(files)

    # An upload cut short (no manifest) and a corrupted newer one are never restored from.
    storage.upload(tmp_path / "worker-a" / "checkpoints" / "step-000006" / "state.pt",
                   f"{remote}/step-000010/state.pt")
    bad = tmp_path / "bad"
    storage.download(f"{remote}/step-000006", bad)
    (bad / "trainable.safetensors").write_bytes(b"not a tensor file")
    storage.upload(bad, f"{remote}/step-000008")

    # Another machine (an empty staging dir) gets step 6 back, bit for bit.
    reader = CheckpointManager(tmp_path / "worker-b" / "checkpoints", remote=remote)
    fresh, fresh_optimizer, fresh_scheduler = _tiny_training_state(1)
    restored = reader.restore(fresh, fresh_optimizer, fresh_scheduler)
    assert restored.step == 6 and restored.path.parent == tmp_path / "worker-b" / "checkpoints"
    for (name, saved), (_, loaded) in zip(model.named_parameters(), fresh.named_parameters()):
        if saved.requires_grad:
            assert (saved == loaded).all(), name
    assert fresh_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_trial_outputs_are_staged_then_published(s3):
    uri = f"s3://{BUCKET}/unit/exp/3f2a9c1e0b7d"
    trial = storage.TrialStorage(uri, rank=0)
    assert storage.is_remote(trial.uri) and trial.local.name == "3f2a9c1e0b7d"
    (trial.local / "adapter").mkdir()
    (trial.local / "adapter" / "adapter_config.json").write_text("{}")
    (trial.local / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 10)
    (trial.local / "metrics.json").write_text(json.dumps({"eval/loss": 1.0}))
    (trial.local / ".fault-kill-3.fired").write_text("")
    (trial.local / "checkpoints").mkdir()
    (trial.local / "checkpoints" / "leftover").write_text("")
    storage.upload(trial.local / "metrics.json", f"{uri}/adapter/stale-from-an-earlier-run")
    trial.publish(last=("metrics.json",))
    assert set(_s3_files(f"{BUCKET}/unit/exp/3f2a9c1e0b7d")) == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.json"}
    trial.cleanup()
    assert not trial.local.exists()


def test_s3_endpoint_and_credentials_come_from_the_environment(s3, tmp_path):
    """storage is given only an s3:// URI: the object lands on the server the environment names,
    where an S3 client configured by hand (boto3, not pyarrow) reads it back."""
    import boto3

    (tmp_path / "note.txt").write_text("from the environment")
    storage.upload(tmp_path / "note.txt", f"s3://{BUCKET}/unit/env/note.txt")
    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL_S3"], region_name=S3_CREDENTIALS["AWS_REGION"],
                          aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    body = client.get_object(Bucket=BUCKET, Key="unit/env/note.txt")["Body"].read()
    assert body == b"from the environment"


# --------------------------------------------------------------------------- DDP and FSDP on gloo

N_STEPS, CKPT_AT = 8, 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def _examples():
    from trainers.data import Example

    # Counting sequences: an easy pattern whose loss falls within a few steps.
    return [Example(input_ids=[(start + i) % 30 + 1 for i in range(10)],
                    labels=[(start + i) % 30 + 1 for i in range(10)]) for start in range(64)]


def _rank_main(rank: int, mode: str, out_dir: str, port: int, max_steps: int, world: int,
               remote: str | None) -> None:
    """One rank of a `world`-process data-parallel run (mode: ddp | fsdp | restore, an FSDP run
    that only restores the newest checkpoint); rank 0 writes result.json. With `remote`, the
    checkpoints go there, each rank staging its own (as a trial with storage.path=s3://...)."""
    import torch
    import torch.distributed as dist

    from trainers import parallel
    from trainers.checkpoint import CheckpointManager
    from trainers.tracking import Tracker
    from trainers.training import train_loop

    class Recorder(Tracker):
        def __init__(self):
            self.losses = {}

        def log_metrics(self, metrics, step=None):
            if step is not None:
                self.losses[step] = metrics["train/loss"]

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        info = DistInfo(rank, world, rank)
        cpu = torch.device("cpu")
        model = parallel.wrap(_tiny_llama(), info, cpu, fsdp=mode != "ddp")
        train = TrainConfig(max_steps=max_steps, batch_size=4, grad_accum=2, lr=1e-2, warmup_ratio=0.0,
                            log_every=2, checkpoint_every=CKPT_AT, max_grad_norm=1.0)
        staging = os.path.join(out_dir, f"rank{rank}") if remote else out_dir
        checkpoints = CheckpointManager(os.path.join(staging, "checkpoints"), remote=remote)
        if mode == "restore":
            result = _restored_state(model, train, checkpoints)
        else:
            tracker = Recorder()
            stats = train_loop(model, _examples(), train, 0, cpu, info, tracker, checkpoints=checkpoints)
            plain = parallel.gather_model(model, _tiny_llama, info)
            result = {"losses": tracker.losses, "resumed_from": stats.resumed_from, "sharded": parallel.is_sharded(model),
                      "tokens": stats.tokens} if rank == 0 else {}
            if rank == 0:
                result["weights"] = {n: p.detach().flatten()[:4].tolist() for n, p in plain.named_parameters()}
        if rank == 0:
            with open(os.path.join(out_dir, "result.json"), "w") as handle:
                json.dump(result, handle)
    finally:
        dist.destroy_process_group()


def _restored_state(model, train, checkpoints) -> dict:
    """Restore into `model` (sharded over this run's ranks, or whole on one) and return the full
    weights and Adam moments it then has (rank 0's view; a collective)."""
    import torch
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from trainers import parallel
    from trainers.training import build_optimizer

    optimizer = build_optimizer(model.parameters(), train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    restored = checkpoints.restore(model, optimizer, scheduler)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=full)
    moments = get_optimizer_state_dict(model, optimizer, options=full).get("state", {})  # {} on ranks > 0
    return {"step": restored.step, "sharded": parallel.is_sharded(model),
            "model": {n: t.flatten().tolist() for n, t in weights.items()},
            "exp_avg_sq": {n: s["exp_avg_sq"].flatten().tolist() for n, s in moments.items()}}


def _rank_process(rank: int, *args) -> None:
    """A spawned rank: its run, then an exit that skips C++ static teardown. After a gloo
    process group, that teardown sometimes aborts ("terminate called without an active
    exception") once all the work is done and written, which would fail the run for nothing.
    An exception still propagates (and fails the spawn) as usual."""
    _rank_main(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run(mode: str, out_dir, max_steps: int = N_STEPS, world: int = 2, remote: str | None = None) -> dict:
    import torch.multiprocessing as mp

    args = (mode, str(out_dir), _free_port(), max_steps, world, remote)
    mp.spawn(_rank_process, args=args, nprocs=world, join=True)
    return json.loads((out_dir / "result.json").read_text())


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return _run("ddp", tmp_path_factory.mktemp("ddp"))


def test_ddp_two_ranks_loss_falls_and_tokens_add_up(ddp_run):
    losses = [ddp_run["losses"][str(s)] for s in range(2, N_STEPS + 1, 2)]
    assert losses[-1] < losses[0]
    assert not ddp_run["sharded"]
    # 2 ranks x 2 micro-batches x 4 examples x 10 tokens per step: the count is summed over ranks.
    assert ddp_run["tokens"] == N_STEPS * 2 * 2 * 4 * 10


def test_fsdp_on_gloo_trains_the_same_model_as_ddp_and_resumes(ddp_run, tmp_path):
    from trainers.checkpoint import CheckpointManager

    sharded = _run("fsdp", tmp_path / "fsdp")
    assert sharded["sharded"]
    for step, loss in ddp_run["losses"].items():
        assert sharded["losses"][step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step
    for name, values in ddp_run["weights"].items():
        assert sharded["weights"][name] == pytest.approx(values, rel=1e-3, abs=1e-5), name
    # Each rank wrote its own shards (nothing gathered to rank 0), all in the manifest.
    newest = CheckpointManager(tmp_path / "fsdp" / "checkpoints").latest()
    assert newest.name == f"step-{CKPT_AT:06d}"
    files = json.loads((newest / "manifest.json").read_text())["files"]
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "sharded/.metadata", "state.pt"} <= set(files)
    assert not (newest / "trainable.safetensors").exists()
    # A run that restarts from it on the same 2 workers ends where this one did.
    (tmp_path / "fsdp" / "result.json").unlink()
    resumed = _run("fsdp", tmp_path / "fsdp")
    assert resumed["resumed_from"] == CKPT_AT
    for name, values in sharded["weights"].items():
        assert resumed["weights"][name] == pytest.approx(values, rel=1e-4, abs=1e-6), name


@pytest.fixture(scope="module")
def sharded_on_s3(s3, tmp_path_factory):
    """A checkpoint of 2 FSDP workers on S3, each rank staging and uploading its own shards."""
    remote = f"s3://{BUCKET}/unit/fsdp/checkpoints"
    _run("fsdp", tmp_path_factory.mktemp("fsdp-s3"), max_steps=CKPT_AT + 1, remote=remote)
    return remote


@pytest.mark.parametrize("world", [1, 3])
def test_a_sharded_checkpoint_restores_on_another_number_of_workers(sharded_on_s3, tmp_path, world):
    """Restored whole on 1 worker or sharded over 3: the same weights and optimizer moments as
    the checkpoint holds (read back independently, as one torch.save)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    step = f"step-{CKPT_AT:06d}"
    files = _s3_files(f"{BUCKET}/unit/fsdp/checkpoints/{step}")
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "sharded/.metadata", "state.pt",
            "manifest.json"} <= set(files)
    restored = _run("restore", tmp_path, max_steps=CKPT_AT, world=world, remote=sharded_on_s3)
    assert restored["step"] == CKPT_AT and restored["sharded"] == (world > 1)
    storage.download(f"{sharded_on_s3}/{step}", tmp_path / "saved")
    dcp_to_torch_save(tmp_path / "saved" / "sharded", tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt", weights_only=False)
    assert set(restored["model"]) == set(saved["model"])
    for name, tensor in saved["model"].items():
        assert restored["model"][name] == pytest.approx(tensor.flatten().tolist(), abs=0), name
    for name, state in saved["optimizer"]["state"].items():
        assert restored["exp_avg_sq"][name] == pytest.approx(state["exp_avg_sq"].flatten().tolist(), abs=0), name


def _latest_on_each_rank(rank: int, roots: list[str], out_dir: str, port: int) -> None:
    """Rank `rank` of 2 looks up the newest checkpoint under each root in turn (its own when the
    entry is a pair), writing what it found."""
    import torch.distributed as dist

    from trainers.checkpoint import CheckpointManager

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        found = []
        for root in roots:
            newest = CheckpointManager(root if isinstance(root, str) else root[rank]).latest()
            found.append(newest.name if newest else None)
        with open(os.path.join(out_dir, f"latest-{rank}.json"), "w") as handle:
            json.dump(found, handle)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as _rank_process: no C++ static teardown after gloo


def test_ranks_agree_on_the_checkpoint_they_resume_from(tmp_path):
    """Over a shared directory the ranks split the hashing and take the same checkpoint; when one
    rank cannot see it (directories not shared), neither takes it, and neither waits forever."""
    import time

    import torch.multiprocessing as mp

    from trainers.checkpoint import CheckpointManager

    shared = tmp_path / "shared"
    model, optimizer, scheduler = _tiny_training_state(0)
    for step in (2, 4):
        CheckpointManager(shared).save(step, model, optimizer, scheduler)
    (tmp_path / "empty").mkdir()
    roots = [str(shared), (str(shared), str(tmp_path / "empty"))]
    processes = mp.spawn(_latest_on_each_rank, args=(roots, str(tmp_path), _free_port()), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not processes.join(timeout=5):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail("the ranks did not agree on a checkpoint: one of them waited forever")
    found = [json.loads((tmp_path / f"latest-{rank}.json").read_text()) for rank in (0, 1)]
    assert found == [["step-000004", None], ["step-000004", None]]


# --------------------------------------------------------------------------- driver side


def test_a_cluster_job_ships_our_packages_and_no_credentials(monkeypatch):
    from orchestrator.runner import cluster_runtime_env

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    env = cluster_runtime_env()
    assert sorted(os.path.basename(p) for p in env["py_modules"]) == ["orchestrator", "trainers"]
    assert all(os.path.isfile(os.path.join(p, "__init__.py")) for p in env["py_modules"])
    assert env["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"
    assert "s3cret" not in json.dumps(env)


@pytest.mark.parametrize("token_var", ["RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"])
def test_a_token_for_an_explicit_address_needs_the_auth_mode(monkeypatch, token_var):
    """A driver outside a token-authenticated cluster (k8s/README.md) with the token exported but
    not RAY_AUTH_MODE=token: Ray would not send it (measured on 2.60: a connection timeout after
    20-30 s that names no auth), so the command is refused before anything runs."""
    from orchestrator.runner import check_address

    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(token_var, "/tmp/token" if token_var.endswith("PATH") else "t0ken")
    for address in ("ray://127.0.0.1:10001", "10.0.0.5:6379"):
        with pytest.raises(ConfigError) as err:
            check_address(address)
        assert err.value.problems[0][0] == "cluster.address"
        assert f"{token_var} is set" in str(err.value) and "RAY_AUTH_MODE=token" in str(err.value)
    check_address("auto")  # Ray turns token mode on by itself when it finds a local cluster's token
    check_address(None)
    for mode in ("token", "disabled"):  # an explicit choice is the user's
        monkeypatch.setenv("RAY_AUTH_MODE", mode)
        check_address("ray://127.0.0.1:10001")
    monkeypatch.delenv(token_var)
    monkeypatch.delenv("RAY_AUTH_MODE")
    check_address("ray://127.0.0.1:10001")  # no token at all: a cluster without authentication


def test_an_attached_cluster_gets_notes_about_shared_stores(make_cfg):
    from orchestrator.plan import cluster_notes

    assert cluster_notes(make_cfg()) == []
    notes = cluster_notes(make_cfg("cluster.address=auto"))
    assert any("tracking.uri=sqlite" in n for n in notes) and any("storage.path=runs" in n for n in notes)
    assert cluster_notes(make_cfg("cluster.address=auto", "tracking.uri=http://mlflow:5000",
                                  "storage.path=s3://bucket/prefix")) == []


def _row(label: str, node_id: str | None, address: str = "null"):
    from orchestrator.report import TrialRow

    tags = {"node_ip": "10.0.0.5", "node_id": node_id} if node_id else {}
    return TrialRow(run_id=label, label=label, method="lora", stage="sft", status="FINISHED",
                    params={"method.r": label, "cluster.address": address}, metrics={"eval/loss": 1.0}, tags=tags)


def test_the_final_table_shows_nodes_when_trials_ran_on_a_cluster():
    from orchestrator.report import console_table, group_cells

    local = console_table(group_cells([_row("2", "a" * 56), _row("8", "a" * 56)]))
    assert "node" not in local.splitlines()[0]
    spread = console_table(group_cells([_row("2", "a" * 56), _row("8", "b" * 56)]))
    assert "node" in spread.splitlines()[0] and "10.0.0.5/aaaaaaaa" in spread and "10.0.0.5/bbbbbbbb" in spread
    attached = console_table(group_cells([_row("2", "a" * 56, "auto"), _row("8", "a" * 56, "auto")]))
    assert "10.0.0.5/aaaaaaaa" in attached


def test_the_progress_board_shows_the_node():
    import io

    from orchestrator.progress import ProgressBoard

    stream = io.StringIO()
    board = ProgressBoard({"k": "lora r=2"}, stream=stream)
    board.update("k", state="RUNNING", node="10.0.0.5/aaaaaaaa")
    assert "on 10.0.0.5/aaaaaaaa" in stream.getvalue()
