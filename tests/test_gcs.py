"""A gs:// workdir against a local GCS emulator (gcp-storage-emulator): every run file reaches the
bucket (checkpoints through Orbax/TensorStore, the rest through etils.epath -> gcsfs), nothing is
written to local disk, and a second launch resumes from the bucket.

The emulator runs in this process; training runs in subprocesses, as on a pod host, pointed at
it by STORAGE_EMULATOR_HOST (gcsfs) and TENSORSTORE_GCS_HTTP_URL (TensorStore). Checkpoints are
written without OCDBT (checkpoint.ocdbt=false): under llm.train, OCDBT's manifest writes fail on
this emulator ("Malformed StorageGeneration"); standalone Orbax saves of the same trees succeed
on it, so the cause is an emulator/TensorStore interaction not understood yet.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("gcsfs")

from launch.local_multiprocess import free_port  # noqa: E402

BUCKET = "bucket"


@pytest.fixture(scope="module")
def emulator():
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{port}",
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test", "JAX_PLATFORMS": "cpu",
           # no probing for a GCE metadata server (google-auth would wait on it for every client)
           "NO_GCE_CHECK": "True", "GOOGLE_CLOUD_PROJECT": "test"}  # fmt: skip
    yield env
    server.stop()


def bucket_files(env, prefix: str) -> dict[str, int]:
    """{path under the prefix: size} listed through a fresh gcsfs client on the emulator."""
    import gcsfs

    fs = gcsfs.GCSFileSystem(endpoint_url=env["STORAGE_EMULATOR_HOST"], token="anon")
    fs.invalidate_cache()
    return {p.split(f"{prefix}/", 1)[1]: fs.size(p) for p in fs.find(f"{BUCKET}/{prefix}")}


def read(env, path: str) -> str:
    import gcsfs

    fs = gcsfs.GCSFileSystem(endpoint_url=env["STORAGE_EMULATOR_HOST"], token="anon")
    fs.invalidate_cache()
    with fs.open(f"{BUCKET}/{path}", "r") as f:
        return f.read()


def test_gs_workdir_keeps_every_run_file_in_the_bucket_and_resumes(emulator, tmp_path, repo_root):
    wd = f"gs://{BUCKET}/runs/tiny"
    cmd = [
        sys.executable,
        "-m",
        "llm.train",
        f"--config={repo_root}/configs/tiny.py",
        f"--workdir={wd}",
        "--config.train.steps=4",
        "--config.checkpoint.every=2",
        "--config.train.eval_every=2",
        "--config.train.log_every=1",
        "--config.train.progress=false",
        "--config.checkpoint.ocdbt=false",
        "--config.model.n_layers=1",
    ]  # fmt: skip  (one layer: fewer objects through the slow emulator)
    env = {**os.environ, **emulator, "PYTHONPATH": repo_root}
    first = subprocess.run(
        [*cmd, "--stop_at=2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming at step 2" in second.stdout

    files = bucket_files(emulator, "runs/tiny")
    for name in ("config.json", "metrics.jsonl", "runs.jsonl", "tokenizer.json", "tokenizer.model"):
        assert files.get(name, 0) > 0, (name, sorted(files))
    assert any(f.startswith("tb/events.out.tfevents") for f in files)
    assert any(f.startswith("checkpoints/4/params/") for f in files)
    rows = [json.loads(ln) for ln in read(emulator, "runs/tiny/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # the resumed launch appended
    history = [json.loads(ln) for ln in read(emulator, "runs/tiny/runs.jsonl").splitlines()]
    assert [(r["event"], r["step"]) for r in history] == [("start", 0), ("end", 2), ("resume", 2), ("end", 4)]
    assert os.listdir(tmp_path) == []  # nothing landed on local disk (no ./gs:/bucket/...)

    sample = subprocess.run([sys.executable, "-m", "llm.sample", f"--workdir={wd}", "--max_new_tokens=5"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert sample.returncode == 0 and f"sampling {wd} at step 4" in sample.stderr, sample.stderr[-3000:]
