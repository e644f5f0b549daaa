"""The CUDA IPC transport of PD (``redknot_vllm.cuda_ipc``): packing and the device checksum
on CPU; the hand-over between two processes on the GPU (skipped without one)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from redknot_vllm import cuda_ipc


def _tensors(device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"global_k": torch.randn(3, 50, 1, 8, generator=g).to(torch.bfloat16),
            "local_pos": torch.arange(0, 40, 3), "empty": torch.zeros(0, 4),
            "x": torch.randn(5, generator=g)}


def test_pack_unpack_round_trip_and_checksum_catches_changes():
    t = _tensors()
    buf, layout = cuda_ipc.pack(t)
    assert buf.numel() % 256 == 0
    back = cuda_ipc.unpack(buf, layout)
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k])
    c = cuda_ipc.checksum(buf)
    assert c == cuda_ipc.checksum(buf.clone())
    flipped = buf.clone()
    flipped[1001] ^= 1
    assert cuda_ipc.checksum(flipped) != c
    w = buf.clone().view(torch.int64)
    w[[3, 9]] = w[[9, 3]]  # two words swapped: the plain sum holds, the weighted one not
    if not torch.equal(w[3], w[9]):
        assert cuda_ipc.checksum(w.view(torch.uint8)) != c
    with pytest.raises(ValueError, match="does not fit"):
        cuda_ipc.unpack(buf[:64], layout)


def test_a_handle_this_process_cannot_open_is_computed_and_acknowledged(tmp_path, caplog):
    """A ``cuda_ipc`` handle the consumer cannot open (here: no CUDA) is computed, logged,
    and acknowledged so that the producer frees its buffer."""
    from redknot_vllm.pd import PDConfig, PDScheduler, ack_file, ipc_file, token_digest

    ids = list(range(100, 140))
    tid = "fedcba9876543210fedcba9876543210"
    doc = {"format": cuda_ipc.FORMAT, "meta": {"tokens": "40", "digest": token_digest(ids),
                                                "layout": "L"},
           "layout": [], "checksum": "0" * 32, "bytes": 256, "pid": 1,
           "ipc": {"device": 0, "tensor_offset": 0, "handle": "AAAA", "storage_bytes": 256,
                   "storage_offset": 0, "ref_counter_handle": None, "ref_counter_offset": 0,
                   "event_handle": None, "event_sync_required": False}}
    ipc_file(tmp_path, tid).write_text(json.dumps(doc))
    cfg = PDConfig.from_dict({"role": "consumer", "dir": str(tmp_path),
                              "transport": "cuda_ipc"})
    req = type("R", (), {"request_id": "r1", "prompt_token_ids": ids,
                         "kv_transfer_params": {"redknot_pd": {"transfer_id": tid}}})()
    with caplog.at_level(logging.WARNING, logger="redknot_vllm"):
        if torch.cuda.is_available():
            pytest.skip("needs a process without CUDA")
        assert PDScheduler(cfg, "L").matched(req, 0) == (0, False)
    assert "unreadable" in caplog.text and ack_file(tmp_path, tid).exists()


def test_producer_frees_acknowledged_and_expired_buffers(tmp_path, caplog):
    from redknot_vllm.pd import PDConfig, PDWorker, ack_file, ipc_file

    cfg = PDConfig.from_dict({"role": "producer", "dir": str(tmp_path),
                              "transport": "cuda_ipc", "hold_s": 5})
    w = PDWorker(cfg, "L", window=64, sink=4)
    for tid in ("a" * 32, "b" * 32, "c" * 32):
        ipc_file(tmp_path, tid).write_text("{}")
    w._held = {"a" * 32: (torch.zeros(8), time.monotonic()),
               "b" * 32: (torch.zeros(8), time.monotonic() - 10),
               "c" * 32: (torch.zeros(8), time.monotonic())}
    ack_file(tmp_path, "a" * 32).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="redknot_vllm"):
        w.reap()
    assert set(w._held) == {"c" * 32}
    assert "not taken within hold_s" in caplog.text and "b" * 32 in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{'c' * 32}.ipc.json"]


def test_cuda_ipc_options_are_validated(smollm2, tmp_path):
    from redknot_vllm import engine_args
    from redknot_vllm.config import RedKnotConfigError
    from tests.test_segpaged_engine import _config

    with pytest.raises(RedKnotConfigError, match=r"pd\.transport"):
        engine_args(smollm2, head_config=_config(), segpaged=True,
                    pd={"role": "producer", "dir": str(tmp_path), "transport": "nccl"})
    with pytest.raises(RedKnotConfigError, match="tensor_parallel_size"):
        engine_args(smollm2, head_config=_config(), segpaged=True, pipeline_parallel_size=2,
                    pd={"role": "producer", "dir": str(tmp_path), "transport": "cuda_ipc"})
    with pytest.raises(RedKnotConfigError, match=r"pd\.hold_s"):
        engine_args(smollm2, head_config=_config(), segpaged=True,
                    pd={"role": "producer", "dir": str(tmp_path), "hold_s": -1})


_PRODUCER = """
import sys, time, torch
from pathlib import Path
from redknot_vllm import cuda_ipc
sys.path.insert(0, {root!r})
from tests.test_cuda_ipc import _tensors
folder = Path({folder!r})
t = {{k: v.cuda() for k, v in _tensors().items()}}
buf, n = cuda_ipc.export(folder / "t.ipc.json", t, {{"tokens": "50"}})
while not (folder / "t.ack").exists():
    time.sleep(0.01)
buf[:] = 0  # the consumer has its own copy: changing ours must not matter
torch.cuda.synchronize()
(folder / "done").write_text("")
while not (folder / "exit").exists():
    time.sleep(0.01)
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
def test_two_processes_hand_over_tensors_on_the_gpu(tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", _PRODUCER.format(root=root,
                                                                  folder=str(tmp_path))])
    try:
        h = tmp_path / "t.ipc.json"
        deadline = time.monotonic() + 120
        while not h.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        bad = json.loads(h.read_text())
        bad["checksum"] = "1" * 32
        (tmp_path / "bad.ipc.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="checksum mismatch"):
            cuda_ipc.open_copy(tmp_path / "bad.ipc.json")
        got, meta, n = cuda_ipc.open_copy(h)
        (tmp_path / "t.ack").write_text("")
        assert meta == {"tokens": "50"} and n >= sum(
            v.numel() * v.element_size() for v in _tensors().values())
        while not (tmp_path / "done").exists():
            assert proc.poll() is None
            time.sleep(0.05)
        for k, v in _tensors().items():  # still equal after the producer zeroed its buffer
            assert got[k].is_cuda and torch.equal(got[k].cpu(), v)
    finally:
        (tmp_path / "exit").write_text("")
        proc.wait(timeout=60)
    # the producer is gone: its handle opens no memory
    with pytest.raises((RuntimeError, ValueError)):
        cuda_ipc.open_copy(h)
