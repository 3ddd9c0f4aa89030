"""Shards read from a URL: a packed folder served over HTTP on 127.0.0.1 (python -m http.server,
started and stopped by the test), file:// URLs, and the errors of a server that lacks a shard."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from shard_tools.cli import main as lc_shard
from torchrun_util import dist_lc, free_port


class Server:
    """``python -m http.server`` on 127.0.0.1 serving ``root``; restartable on the same port."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Server":
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                                      "--directory", str(self.root)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/", timeout=2).close()
                return self
            except OSError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "http.server did not start"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
            self.proc = None


@pytest.fixture
def served(tiny_shards, tmp_path):
    root = tmp_path / "www"
    shutil.copytree(tiny_shards, root / "shards")
    server = Server(root).start()
    try:
        yield server, root / "shards"
    finally:
        server.stop()


def train(url: str, run: Path, epochs: int, workers: int = 1):
    sets = [f"data.shards={url}", "data.crop=32", f"data.workers={workers}", "model.filters=8",
            "model.upconv_filters=8", f"train.epochs={epochs}", "train.batch_size=8", "train.micro_batch_size=4",
            "train.precision=fp32", "train.plot_every=0"]
    return dist_lc(["train", "--config", "configs/smoke.yaml", *[a for s in sets for a in ("--set", s)],
                    "--run-dir", str(run)], timeout=300)


def test_verify_and_describe_read_a_url(served, capsys):
    server, _ = served
    assert lc_shard(["verify", f"{server.url}/shards"]) == 0
    assert lc_shard(["describe", f"{server.url}/shards"]) == 0
    assert f"shards   {server.url}/shards" in capsys.readouterr().out


def test_training_reads_shards_over_http_and_resumes_after_a_server_restart(served, tmp_path):
    server, _ = served
    run = tmp_path / "run"
    first = train(f"{server.url}/shards", run, 1)
    assert first.returncode == 0, first.stderr[-2000:]
    server.stop()
    server.start()
    second = train(f"{server.url}/shards", run, 2)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming after epoch 1" in (run / "train.log").read_text()
    assert (run / "metrics.csv").read_text().count("\n") == 3   # header + epochs 1 and 2


def test_a_shard_the_server_cannot_find_is_one_clear_line(served, tmp_path):
    server, root = served
    missing = sorted(root.glob("train-f2-*.tar"))[0]
    missing.unlink()
    proc = train(f"{server.url}/shards", tmp_path / "run", 1, workers=2)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line == (f"error: {server.url}/shards/{missing.name}: cannot read the shard (the server answered with "
                    "an HTTP error (not found?), exit status 22)"), line
    assert lc_shard(["verify", f"{server.url}/shards"]) == 2


def test_a_url_without_a_manifest_or_server(served, capsys):
    server, _ = served
    assert lc_shard(["describe", f"{server.url}/elsewhere"]) == 2
    assert "elsewhere/manifest.json: cannot read (the server answered with an HTTP error" in capsys.readouterr().err
    port = free_port()
    assert lc_shard(["describe", f"http://127.0.0.1:{port}/shards"]) == 2
    assert "cannot connect to the server" in capsys.readouterr().err


def test_file_urls_are_local_folders(tiny_shards, capsys):
    assert lc_shard(["verify", f"file://{tiny_shards}"]) == 0


def pipe_of(folder: Path) -> str:
    # `exec`: the shell hands over to cat, which an early close then kills with SIGPIPE (status -13),
    # as bash does on its own for the last command of a pipe: URL
    return f"pipe:exec cat {folder}/{{name}}"


def test_a_pipe_closed_before_its_end_is_no_error(tiny_shards):
    from dist_lc.data import Segment, decoded_segment
    from shard_tools.manifest import load_manifest

    manifest = load_manifest(pipe_of(tiny_shards))
    entry = manifest.shards("train")[0]
    got = list(decoded_segment(Segment(str(manifest.shard_path(entry)), 1, 2), "train"))
    assert [key for key, *_ in got] == entry["keys"][1:3]


def test_a_corrupt_shard_read_through_a_pipe_names_its_sample(tiny_shards, tmp_path, capsys):
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    shard = sorted(copy.glob("train-f0-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    third = -1
    for _ in range(7):   # image, mask and props of samples 1 and 2, then sample 3's image
        third = data.index(b"\x93NUMPY", third + 1)
    data[third:third + 6] = b"NOTNPY"
    shard.write_bytes(data)
    assert lc_shard(["verify", pipe_of(copy)]) == 2
    err = capsys.readouterr().err
    assert "cannot decode image: not .npy bytes" in err and "exit" not in err, err
