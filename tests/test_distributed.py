"""Process groups (monet.train.distributed): the backend per device, CPU reductions in a 2-rank
torchrun group, and the refusal of a group that cannot reduce CPU tensors.

Only the CPU (gloo) path runs here: nccl cannot be constructed without a GPU ("ProcessGroupNCCL is
only supported with GPUs"), so the CUDA path is checked by its backend string (parsed by torch's own
parser) and by a stand-in for plain ``"nccl"``'s device table (``"cuda:gloo"``: a group with a
backend for CUDA tensors only, which refuses CPU tensors exactly like nccl does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from monet.rl.group import free_port
from monet.train.distributed import CUDA_BACKEND, backend_for

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from monet.train.distributed import DistInfo, all_reduce, all_reduce_sum, init_distributed, shutdown_distributed

    mode, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    result = {}
    if mode != "torchrun":  # a group someone else set up before monet's init_distributed
        dist.init_process_group(mode, init_method="env://")
        if mode == "cuda:gloo":
            try:
                dist.all_reduce(torch.ones(1))
            except RuntimeError as e:
                result["raw_cpu_reduce"] = str(e)
    try:
        info = init_distributed(torch.device("cpu"))
    except RuntimeError as e:
        result["init_error"] = str(e)
        dist.destroy_process_group()
    else:
        x = torch.tensor([rank + 1.0, 0.25 * rank], dtype=torch.float64)
        counts = torch.tensor([3 + rank, 10 * rank], dtype=torch.int64)
        result.update(
            info=[info.rank, info.world_size, info.local_rank],
            config=str(dist.get_backend_config()),
            sum=all_reduce_sum(x, info).tolist(), x_after=x.tolist(),
            counts=all_reduce_sum(counts, info).tolist(),
            max=all_reduce(x, info, dist.ReduceOp.MAX).tolist(),
            min=all_reduce(x, info, dist.ReduceOp.MIN).tolist(),
            alone=all_reduce_sum(x, DistInfo()).tolist())
        shutdown_distributed()
    with open(out, "w") as f:
        json.dump(result, f)
""")


def _two_ranks(tmp_path, mode: str) -> list[dict]:
    """Run WORKER as ranks 0 and 1 under torchrun's environment contract; their results."""
    port = free_port()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(script), mode, str(tmp_path / f"rank{rank}.json")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        log, _ = p.communicate(timeout=120)
        assert p.returncode == 0, log[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_backend_per_device():
    assert backend_for("cpu") == "gloo"
    assert backend_for(torch.device("cuda", 1)) == backend_for("cuda") == CUDA_BACKEND
    parsed = dist.distributed_c10d.BackendConfig(dist.Backend(CUDA_BACKEND)).get_device_backend_map()
    assert {k: str(v) for k, v in parsed.items()} == {"cpu": "gloo", "cuda": "nccl"}
    with pytest.raises(ValueError, match="device type 'meta'"):
        backend_for("meta")


def test_torchrun_ranks_reduce_cpu_tensors(tmp_path):
    """init_distributed from torchrun's variables; sums, maxima and minima of CPU float64 and int64
    tensors equal the hand-computed ones on both ranks; inputs are untouched."""
    r0, r1 = _two_ranks(tmp_path, "torchrun")
    assert r0["info"] == [0, 2, 0] and r1["info"] == [1, 2, 1]
    for r, mine in ((r0, [1.0, 0.0]), (r1, [2.0, 0.25])):
        assert "cpu" in r["config"] and "gloo" in r["config"], r["config"]
        assert r["sum"] == [3.0, 0.25] and r["counts"] == [3 + 4, 0 + 10]
        assert r["max"] == [2.0, 0.25] and r["min"] == [1.0, 0.0]
        assert r["x_after"] == mine and r["alone"] == mine


def test_a_group_without_a_cpu_backend_is_refused_by_name(tmp_path):
    """A group set up elsewhere that serves CUDA tensors only (what plain "nccl" is) fails on the
    first CPU reduction deep inside torch; init_distributed refuses it up front, naming the backend
    and the one to use."""
    for r in _two_ranks(tmp_path, "cuda:gloo"):
        assert "device type cpu" in r["raw_cpu_reduce"]
        assert "'cuda:gloo'" in r["init_error"] and CUDA_BACKEND in r["init_error"], r["init_error"]


def test_a_group_with_a_cpu_backend_is_used_as_is(tmp_path):
    r0, r1 = _two_ranks(tmp_path, "gloo")
    assert r0["info"] == [0, 2, 0] and r1["sum"] == [3.0, 0.25]
