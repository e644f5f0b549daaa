"""Tensors handed between two processes on one host through CUDA IPC, without pickle.

The producer packs named tensors into one device buffer, takes torch's CUDA IPC handle of it
(``torch.multiprocessing.reductions.reduce_tensor``, what ``torch.multiprocessing`` sends
through a pipe) and writes the handle's fields as JSON: no Python object crosses the
process boundary, so nothing is unpickled. The consumer opens the handle
(``rebuild_cuda_tensor``), copies the bytes into a buffer of its own (device to device),
checks the copy's checksum and drops the mapping; from then on the producer may free its
buffer.

The checksum is computed on the device (sums of the buffer's 64-bit words, plain and
weighted by position, modulo 2**64): a sha256 over a GPU buffer would need the copy to the
host this transport exists to avoid. It catches corruption and stale memory (a producer that
freed or reused its buffer), not an adversary; the file transport keeps sha256.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import torch

from redknot_vllm.fsutil import atomic_write

FORMAT = "redknot-ipc-v1"
_ALIGN = 256
_WORDS = 1 << 25
"""64-bit words summed per launch (256 MB): bounds the temporaries of the weighted sum."""
_MASK = (1 << 64) - 1
_DTYPES = {str(d): d for d in (torch.bfloat16, torch.float16, torch.float32, torch.int64,
                               torch.int32, torch.uint8, torch.float8_e4m3fn)}


def checksum(buf: torch.Tensor) -> str:
    """Checksum of a 1-D uint8 buffer whose length is a multiple of 8, on its device."""
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() % 8:
        raise ValueError("checksum: a 1-D uint8 buffer of a multiple of 8 bytes")
    w = buf.view(torch.int64)
    s1 = torch.zeros((), dtype=torch.int64, device=w.device)
    s2 = torch.zeros((), dtype=torch.int64, device=w.device)
    for o in range(0, w.numel(), _WORDS):
        x = w[o:o + _WORDS]
        s1 += x.sum()
        s2 += (x * torch.arange(o + 1, o + 1 + x.numel(), dtype=torch.int64,
                                device=w.device)).sum()
    a, b = (int(v) & _MASK for v in torch.stack([s1, s2]).tolist())
    return f"{a:016x}{b:016x}"


def pack(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """One device buffer holding every tensor (aligned), and where each one lies."""
    layout, off = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        if str(t.dtype) not in _DTYPES:
            raise ValueError(f"cuda_ipc: dtype {t.dtype} of {name} is not supported")
        nb = t.numel() * t.element_size()
        layout.append({"name": name, "dtype": str(t.dtype), "shape": list(t.shape),
                       "offset": off, "nbytes": nb})
        off += -(-nb // _ALIGN) * _ALIGN
    device = next(iter(tensors.values())).device
    buf = torch.zeros(max(off, _ALIGN), dtype=torch.uint8, device=device)
    for e in layout:
        if e["nbytes"]:
            t = tensors[e["name"]].contiguous().reshape(-1).view(torch.uint8)
            buf[e["offset"]:e["offset"] + e["nbytes"]].copy_(t)
    return buf, layout


def unpack(buf: torch.Tensor, layout: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Views of ``buf`` per :func:`pack`'s layout (checked against the buffer's size)."""
    out = {}
    for e in layout:
        name, off, nb = str(e["name"]), int(e["offset"]), int(e["nbytes"])
        dt = _DTYPES.get(str(e["dtype"]))
        shape = [int(s) for s in e["shape"]]
        n = 1
        for s in shape:
            n *= s
        if dt is None or off < 0 or off + nb > buf.numel() or \
                n * torch.empty((), dtype=dt).element_size() != nb:
            raise ValueError(f"cuda_ipc: entry {name!r} does not fit the buffer")
        out[name] = buf[off:off + nb].view(dt).view(shape)
    return out


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode()


def export(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]
           ) -> tuple[torch.Tensor, int]:
    """Pack ``tensors`` (on one CUDA device), write the handle file at ``path`` atomically,
    and return the buffer (the caller keeps it alive until the consumer acknowledges) and
    its size in bytes."""
    from torch.multiprocessing.reductions import reduce_tensor

    buf, layout = pack(tensors)
    if not buf.is_cuda:
        raise ValueError("cuda_ipc: the tensors are not on a CUDA device")
    digest = checksum(buf)  # also waits for the gather and the packing to finish
    _, args = reduce_tensor(buf)
    (_, size, stride, t_off, _, _, device, handle, st_bytes, st_off, _, rc_handle, rc_off,
     ev_handle, ev_sync) = args
    if tuple(size) != (buf.numel(),) or tuple(stride) != (1,):
        raise ValueError("cuda_ipc: the packed buffer is not one flat tensor")
    doc = {"format": FORMAT, "meta": meta, "layout": layout, "checksum": digest,
           "bytes": buf.numel(), "pid": os.getpid(),
           "ipc": {"device": int(device), "tensor_offset": int(t_off),
                   "handle": _b64(handle), "storage_bytes": int(st_bytes),
                   "storage_offset": int(st_off), "ref_counter_handle": _b64(rc_handle),
                   "ref_counter_offset": int(rc_off), "event_handle": _b64(ev_handle),
                   "event_sync_required": bool(ev_sync)}}
    atomic_write(path, json.dumps(doc))
    return buf, buf.numel()


def read_meta(path: Path) -> dict[str, str]:
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path.name}: not a {FORMAT} handle")
    return {str(k): str(v) for k, v in (doc.get("meta") or {}).items()}


def open_copy(path: Path, device: torch.device | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """Open the handle at ``path``, copy its buffer into one of this process's own, verify
    the copy's checksum (ValueError if it fails) and close the mapping. Returns the
    tensors (views of the copy), the metadata and the bytes moved."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path.name}: not a {FORMAT} handle")
    if not torch.cuda.is_available():
        raise ValueError("cuda_ipc: this process has no CUDA device")
    ipc, n = doc["ipc"], int(doc["bytes"])

    def raw(key: str) -> bytes | None:
        v = ipc.get(key)
        return None if v is None else base64.b64decode(v)

    src = rebuild_cuda_tensor(
        torch.Tensor, (n,), (1,), int(ipc["tensor_offset"]), torch.storage.TypedStorage,
        torch.uint8, int(ipc["device"]), raw("handle"), int(ipc["storage_bytes"]),
        int(ipc["storage_offset"]), False, raw("ref_counter_handle"),
        int(ipc["ref_counter_offset"]), raw("event_handle"), bool(ipc["event_sync_required"]))
    own = torch.empty(n, dtype=torch.uint8, device=device or src.device)
    own.copy_(src)
    got = checksum(own)  # waits for the copy: only then may the mapping go
    del src
    if got != doc.get("checksum"):
        raise ValueError(f"{path.name}: checksum mismatch (the producer's buffer changed or "
                         "was freed)")
    meta = {str(k): str(v) for k, v in (doc.get("meta") or {}).items()}
    return unpack(own, doc["layout"]), meta, n
