"""A node lost without a word from its rank: the agent of node 0 of a two-node torchrun is killed.
Its rank notices the lost launcher, records why in the run folder and exits; the rank on node 1,
which only sees a closed connection, reports that cause as the README promises."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from test_faults import BOUND_S, recipe
from torchrun_util import REPO, env, free_port

pytestmark = pytest.mark.fault


def test_a_killed_node_agent_is_reported_by_the_other_node_as_rank_0s_cause(tiny_shards, tmp_path):
    run, port = tmp_path / "run", free_port()
    args = [*recipe(tiny_shards, "train.epochs=30", "data.workers=0"), "--run-dir", str(run)]
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", *args],
                               cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)   # each agent's group: its rank has a session of its own
              for node in (0, 1)]
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.csv").exists():
            assert time.monotonic() < deadline and all(a.poll() is None for a in agents), "no epoch finished"
            time.sleep(0.2)
        os.killpg(agents[0].pid, signal.SIGKILL)
        out = agents[1].communicate(timeout=BOUND_S)[0]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
            agent.communicate()
    errors = [line for line in out.splitlines() if "error: " in line]
    assert any("error: rank 0 failed first: TrainingError: the launcher of this rank" in e and "is gone" in e
               for e in errors), out[-3000:]
    assert agents[1].returncode != 0
