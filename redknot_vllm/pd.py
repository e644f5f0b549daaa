"""Head-aware prefill/decode disaggregation (issue 16): the prefill engine ships, per layer,
the global heads' whole KV and the local heads' sink + window KV only.

Both engines are RedKnot engines with the same model and head config, SegPaged on (so each
layer's local heads are a KV-cache group of their own that only holds sink + window pages),
and the RedKnot connector with a ``redknot_pd`` entry in ``kv_connector_extra_config``
(:func:`redknot_vllm.engine_args` ``pd={...}``); ``kv_role`` is ``kv_producer`` or
``kv_consumer``.

* **Producer** (prefill engine): a request sent with ``kv_transfer_params={"redknot_pd":
  {"send": true}}`` has its prompt's KV written, at the step that completes its prompt
  (before any local page leaves the window), to one safetensors file in the shared folder
  ``dir`` (``/dev/shm/...`` is host shared memory): every position of the global heads,
  the sink and last ``W`` positions of the local heads, a sha256 over every tensor, and
  the prompt's token digest. The request's output carries ``kv_transfer_params =
  {"redknot_pd": {"transfer_id": ...}}``.
* **Consumer** (decode engine): a request carrying that ``transfer_id`` loads ``len(prompt)
  - 1`` tokens from the file (a synchronous load before the step's forward) and computes the
  last one. A file that is missing after ``timeout_s``, whose metadata does not match this
  engine or this prompt, or whose checksum fails is never loaded: the prompt is computed
  (logged). The scheduler verifies a transfer before it claims its tokens and hands the
  verified tensors to the worker of its process; a worker in another process reads and
  verifies it again, and a failure there is reported to vLLM as load errors
  (``kv_load_failure_policy="recompute"``), which vLLM 0.32 refuses with two KV-cache
  groups (it stops the engine): only a file changed in the shared folder between the two
  reads gets there.

No home-made network protocol. ``transport="file"`` (default): files in a shared folder,
written atomically (``fsutil.atomic_write``). ``transport="cuda_ipc"`` (engines on one host):
the producer keeps the packed KV in its GPU memory and writes only a handle to it
(``redknot_vllm.cuda_ipc``: torch's CUDA IPC handle as JSON, no pickle); the consumer's
scheduler copies it device to device, verifies the copy's checksum and writes
``<transfer_id>.ack``, upon which the producer frees its buffer (or after ``hold_s`` when
no consumer acknowledges; checked at every producer step). A handle that cannot be opened
(producer gone, another host) or whose checksum fails is computed, logged, as above.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from vllm.logger import init_logger

from redknot_vllm import cuda_ipc
from redknot_vllm.config import PD_KEY, PDConfig, RedKnotConfig
from redknot_vllm.fsutil import atomic_write
from redknot_vllm.kernels.paged_kv import read_kv, slots_of, write_kv
from redknot_vllm.segpaged.layers import LOCAL_SUFFIX

logger = init_logger(__name__)

FORMAT = "redknot-pd-v2"
_TID = re.compile(r"^[0-9a-f]{32}$")
_VERIFIED: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
"""Transfers the consumer's scheduler read and verified, by path, for the worker of the same
process (one GPU: the engine core runs both halves) to load without reading them again."""


def pd_config(vllm_config: Any) -> PDConfig | None:
    """The engine's PD config, or None when PD is off."""
    ktc = getattr(vllm_config, "kv_transfer_config", None)
    extra = getattr(ktc, "kv_connector_extra_config", None) or {}
    return None if PD_KEY not in extra else PDConfig.from_dict(extra[PD_KEY])


def layout_of(vllm_config: Any) -> str:
    """What both engines must share for a transfer to be loaded: the model folder's name,
    dtype, head config and SegPaged."""
    cfg = RedKnotConfig.from_additional_config(vllm_config.additional_config)
    mc = vllm_config.model_config
    hc = cfg.head_config.content_hash() if cfg is not None and cfg.head_config else "dense"
    seg = bool(cfg is not None and cfg.segpaged)
    return f"{Path(str(mc.model)).name}|{mc.dtype}|{hc}|segpaged={seg}"


def token_digest(token_ids: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps([int(t) for t in token_ids]).encode()).hexdigest()


def transfer_file(folder: Path, transfer_id: str) -> Path:
    return folder / f"{transfer_id}.safetensors"


def ipc_file(folder: Path, transfer_id: str) -> Path:
    """``cuda_ipc``: the handle of a transfer held in the producer's GPU memory."""
    return folder / f"{transfer_id}.ipc.json"


def ack_file(folder: Path, transfer_id: str) -> Path:
    """``cuda_ipc``: written by the consumer once it holds its own copy (or gave up)."""
    return folder / f"{transfer_id}.ack"


def open_ipc(path: Path, ack: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The consumer's own verified copy of a ``cuda_ipc`` transfer; the producer is told
    (``ack``) it may free its buffer, also when the copy failed."""
    try:
        tensors, meta, _ = cuda_ipc.open_copy(path)
    finally:
        atomic_write(ack, b"")
    return tensors, meta


_PIECE = 32 << 20
"""Bytes hashed per task: a 32K-token 8B transfer (~1 GB) is hashed by all cores at once."""


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in pieces hashed in parallel
    (hashlib releases the GIL) and without copying the bytes: the whole-file digest the
    consumer checks was a single-thread pass over a copy of the file."""
    h = hashlib.sha256(FORMAT.encode())
    pieces = []
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            buf = t.view(torch.uint8).reshape(-1).numpy()
            pieces += [buf[o:o + _PIECE] for o in range(0, buf.size, _PIECE)]
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as ex:
        for d in ex.map(lambda b: hashlib.sha256(b).digest(), pieces):
            h.update(d)
    return h.hexdigest()


def write_transfer(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> int:
    """Write atomically; returns the file's size in bytes."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {**meta, "format": FORMAT, "sha256": _checksum(cpu)}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=meta))
    return path.stat().st_size


def read_meta(path: Path) -> dict[str, str]:
    """A transfer file's metadata (cheap: the safetensors header only)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_transfer(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a transfer file, checksum verified (ValueError if not)."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    tensors = load_file(str(path))
    if meta.get("format") != FORMAT or meta.get("sha256") != _checksum(tensors):
        raise ValueError(f"PD transfer {path.name}: checksum mismatch (corrupt or truncated)")
    return tensors, meta


# --------------------------------------------------------------------------- scheduler
@dataclass
class LoadSpec:
    """Consumer: one request's load this step."""

    req_id: str
    path: Path
    start: int
    end: int
    """Positions ``[start, end)`` are loaded (``end`` = prompt length - 1)."""
    digest: str
    """Token digest of the whole prompt (the file's, checked again when it is read)."""
    block_ids: tuple[list[int], ...]
    """The request's blocks, one list per KV-cache group."""


@dataclass
class SaveSpec:
    """Producer: a prompt completing this step whose KV is written."""

    req_id: str
    transfer_id: str
    prompt_len: int
    digest: str


class PDScheduler:
    """Scheduler half: which requests send, which load, and what."""

    def __init__(self, cfg: PDConfig, layout: str) -> None:
        self.cfg = cfg
        self.layout = layout
        self._send: dict[str, tuple[str, str]] = {}  # req id -> (transfer id, digest)
        self._load: dict[str, tuple[Path, int, int, str]] = {}
        self._alloc: dict[str, tuple[list[int], ...]] = {}
        self._first_seen: dict[str, float] = {}
        self._computed: set[str] = set()
        """Requests whose transfer was given up: vLLM may ask again, the answer stays 0."""

    def matched(self, request: Any, num_computed: int) -> tuple[int | None, bool]:
        """``get_num_new_matched_tokens``: external tokens of a consumer's request."""
        rid = request.request_id
        params = (getattr(request, "kv_transfer_params", None) or {}).get(PD_KEY)
        if not isinstance(params, dict):
            return 0, False
        prompt = list(request.prompt_token_ids or [])
        if self.cfg.role == "producer":
            if params.get("send") is True and rid not in self._send:
                d = token_digest(prompt)
                self._send[rid] = (hashlib.sha256(f"{rid}|{d}|{time.time_ns()}".encode()
                                                  ).hexdigest()[:32], d)
            return 0, False
        tid = params.get("transfer_id")
        if rid in self._computed:
            return 0, False
        if rid in self._load:
            _, a, b, _ = self._load[rid]
            return b - a, False
        if not isinstance(tid, str) or not _TID.match(tid):
            logger.warning("RedKnot PD: request %s has no valid transfer_id (%r); its prompt is "
                           "computed", rid, tid)
            self._computed.add(rid)
            return 0, False
        path, ipath = transfer_file(self.cfg.dir, tid), ipc_file(self.cfg.dir, tid)
        if ipath.is_file():
            path = ipath
        if not path.is_file():
            first = self._first_seen.setdefault(rid, time.monotonic())
            if time.monotonic() - first < self.cfg.timeout_s:
                return None, False  # vLLM asks again at a later step
            logger.warning("RedKnot PD: transfer %s of request %s did not arrive within %.1f s; "
                           "its prompt is computed", tid, rid, self.cfg.timeout_s)
            self._first_seen.pop(rid, None)
            self._computed.add(rid)
            return 0, False
        self._first_seen.pop(rid, None)
        try:
            # verified here, before any token is claimed: vLLM cannot recompute a failed
            # synchronous load with two KV-cache groups, so the worker must not meet one
            tensors, meta = (open_ipc(path, ack_file(self.cfg.dir, tid)) if path == ipath
                             else read_transfer(path))
        except Exception as e:
            logger.warning("RedKnot PD: transfer %s of request %s is unreadable (%s); its prompt "
                           "is computed", tid, rid, e)
            self._computed.add(rid)
            return 0, False
        n = int(meta.get("tokens", -1))
        why = (None if meta.get("layout") == self.layout else
               f"another engine layout ({meta.get('layout')} vs {self.layout})")
        if why is None and (n != len(prompt) or meta.get("digest") != token_digest(prompt)):
            why = "another prompt"
        if why:
            logger.warning("RedKnot PD: transfer %s is of %s than request %s; its prompt is "
                           "computed", tid, why, rid)
            self._computed.add(rid)
            return 0, False
        end = len(prompt) - 1  # vLLM computes at least one token
        if end <= num_computed:
            return 0, False
        self._load[rid] = (path, num_computed, end, meta["digest"])
        _VERIFIED[str(path)] = (tensors, meta)
        return end - num_computed, False

    def after_alloc(self, request: Any, blocks: Any, num_external: int) -> None:
        rid = request.request_id
        if rid in self._load:
            if num_external > 0:
                self._alloc[rid] = tuple(list(g) for g in blocks.get_block_ids())
            else:
                _VERIFIED.pop(str(self._load.pop(rid)[0]), None)

    def loads(self, new_req_ids: Sequence[str]) -> list[LoadSpec]:
        out = []
        for rid in new_req_ids:
            if rid in self._load and rid in self._alloc:
                path, a, b, d = self._load.pop(rid)
                out.append(LoadSpec(rid, path, a, b, d, self._alloc.pop(rid)))
        return out

    def save(self, req_id: str, prompt_len: int) -> SaveSpec | None:
        hit = self._send.get(req_id)
        return None if hit is None else SaveSpec(req_id, hit[0], prompt_len, hit[1])

    def finished(self, req_id: str) -> dict[str, Any] | None:
        """``request_finished``: the params the consumer needs, for a sent request."""
        hit = self._load.pop(req_id, None)
        if hit is not None:
            _VERIFIED.pop(str(hit[0]), None)
        self._alloc.pop(req_id, None)
        self._first_seen.pop(req_id, None)
        self._computed.discard(req_id)
        hit = self._send.pop(req_id, None)
        return None if hit is None else {PD_KEY: {"transfer_id": hit[0]}}


# ----------------------------------------------------------------------------- worker
@dataclass
class PDWorker:
    """Worker half: write a finished prompt's KV (producer), load it (consumer)."""

    cfg: PDConfig
    layout: str
    window: int | None
    sink: int
    global_names: list[str] = field(default_factory=list)
    local_names: list[str] = field(default_factory=list)
    _caches: list[torch.Tensor] = field(default_factory=list)
    _local: list[torch.Tensor] = field(default_factory=list)
    _errors: set[int] = field(default_factory=set)
    _held: dict[str, tuple[torch.Tensor, float]] = field(default_factory=dict)
    """``cuda_ipc`` producer: transfer id -> (packed buffer, when written)."""

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=extract_layer_index)
        self.global_names = [n for n in names if not n.endswith(LOCAL_SUFFIX)]
        self.local_names = [n for n in names if n.endswith(LOCAL_SUFFIX)]
        self._caches = [kv_caches[n] for n in self.global_names]
        self._local = [kv_caches[n] for n in self.local_names]

    def _local_positions(self, n: int) -> torch.Tensor:
        """The local heads' positions the decode engine reads for a prompt of ``n`` tokens
        whose last token it computes (and attends to itself): sinks and the last ``W``."""
        w = self.window or n
        keep = torch.zeros(n, dtype=torch.bool)
        keep[: self.sink] = True
        keep[max(0, n - w):] = True
        return keep.nonzero().flatten()

    def save(self, specs: dict[int, SaveSpec], forward_context: Any) -> None:
        """Producer, after the forward of the step completing these prompts."""
        self.reap()
        from redknot_vllm import compat
        from redknot_vllm.attention.metadata import first_slots

        md = compat.step_attention_metadata(forward_context, self.global_names[0])
        md_l = (compat.step_attention_metadata(forward_context, self.local_names[0])
                if self.local_names else None)
        if md is None or (self.local_names and md_l is None):
            logger.error("RedKnot PD: no attention metadata after the forward; %d transfer(s) "
                         "not written (their decode computes the prompt)", len(specs))
            return
        for r, slot in enumerate(first_slots(md)):
            spec = specs.get(slot)
            if spec is None:
                continue
            try:
                self._save_row(spec, md, md_l, r)
            except Exception as e:
                logger.error("RedKnot PD: writing transfer %s of request %s failed (%s: %s); "
                             "its decode computes the prompt", spec.transfer_id, spec.req_id,
                             type(e).__name__, e, exc_info=True)

    def _save_row(self, spec: SaveSpec, md: Any, md_l: Any, r: int) -> None:
        n = spec.prompt_len
        row = md.block_table[r].long()
        pos = torch.arange(n, device=row.device)
        k, v = read_kv(self._caches, slots_of(row, pos, self._caches[0].shape[2]))
        tensors = {"global_k": k, "global_v": v}
        if self.local_names:
            bs_l = self._local[0].shape[2]
            row_l = md_l.block_table[r].long()
            lp = self._local_positions(n).to(row_l.device)
            # null block (0) entries: positions a prefix-cache hit skipped (the worker's
            # table keeps a freed page's old id, but at this step the sinks and the last
            # W positions are all held)
            lp = lp[row_l[lp // bs_l] != 0]
            kl, vl = read_kv(self._local, slots_of(row_l, lp, bs_l))
            tensors.update(local_k=kl, local_v=vl,
                           local_pos=lp if self.cfg.transport == "cuda_ipc" else lp.cpu())
        meta = {"tokens": str(n), "digest": spec.digest, "layout": self.layout}
        if self.cfg.transport == "cuda_ipc":
            buf, size = cuda_ipc.export(ipc_file(self.cfg.dir, spec.transfer_id),
                                        tensors, meta)
            self._held[spec.transfer_id] = (buf, time.monotonic())
        else:
            size = write_transfer(transfer_file(self.cfg.dir, spec.transfer_id), tensors, meta)
        logger.info("RedKnot PD: request %s's KV written as transfer %s (%d tokens, %d bytes)",
                    spec.req_id, spec.transfer_id, n, size)

    def reap(self) -> None:
        """``cuda_ipc`` producer: free the buffers consumers acknowledged, and those held
        longer than ``hold_s`` (logged)."""
        if not self._held:
            return
        now, freed = time.monotonic(), False
        for tid, (_, t0) in list(self._held.items()):
            ack = ack_file(self.cfg.dir, tid)
            acked = ack.exists()
            if not acked and now - t0 < self.cfg.hold_s:
                continue
            if not acked:
                logger.warning("RedKnot PD: transfer %s was not taken within hold_s=%.0f s; "
                               "its GPU buffer is freed (a consumer asking later computes "
                               "the prompt)", tid, self.cfg.hold_s)
            # the handle first: a consumer arriving now finds nothing and computes
            ipc_file(self.cfg.dir, tid).unlink(missing_ok=True)
            del self._held[tid]
            ack.unlink(missing_ok=True)
            freed = True
        if freed and torch.cuda.is_initialized():
            torch.cuda.ipc_collect()  # torch keeps a shared block until its IPC refs drop

    def load(self, specs: Sequence[LoadSpec]) -> None:
        """Consumer, before the forward: write each transfer into the request's pages. A
        failure reports the request's blocks as load errors (vLLM recomputes them)."""
        for spec in specs:
            try:
                self._load_one(spec)
            except Exception as e:
                logger.error("RedKnot PD: loading transfer %s of request %s failed (%s: %s); "
                             "vLLM computes its prompt", spec.path.name, spec.req_id,
                             type(e).__name__, e)
                for g in spec.block_ids:
                    self._errors.update(b for b in g if b)

    def _load_one(self, spec: LoadSpec) -> None:
        hit = _VERIFIED.pop(str(spec.path), None)
        if hit is None and spec.path.name.endswith(".ipc.json"):
            raise ValueError("a cuda_ipc transfer is copied by the engine core's scheduler "
                             "for the worker of its own process; this worker is not it")
        tensors, meta = hit if hit is not None else read_transfer(spec.path)
        if meta.get("digest") != spec.digest or meta.get("layout") != self.layout:
            raise ValueError("the transfer's prompt or layout changed since it was planned")
        a, b = spec.start, spec.end
        cache = self._caches[0]
        slots = slots_of(spec.block_ids[0], torch.arange(a, b, device=cache.device),
                         cache.shape[2])
        gk, gv = tensors["global_k"], tensors["global_v"]
        for i, c in enumerate(self._caches):
            write_kv(c, slots, gk[i, a:b].to(c.device), gv[i, a:b].to(c.device),
                     slots_checked=True)
        if not self.local_names:
            return
        c0 = self._local[0]
        bs_l = c0.shape[2]
        row_l = torch.tensor(spec.block_ids[1], dtype=torch.long, device=c0.device)
        lp = tensors["local_pos"].to(c0.device)
        sel = (lp >= a) & (lp < b) & (lp // bs_l < row_l.numel())
        idx = sel.nonzero().flatten()
        lp = lp[idx]
        held = row_l[lp // bs_l] != 0
        idx, lp = idx[held], lp[held]
        need = self._local_positions(b + 1).to(c0.device)
        need = need[(need >= a) & (need < b)]
        need = need[row_l[need // bs_l] != 0]
        if not bool(torch.isin(need, lp).all()):
            raise ValueError("the transfer lacks local positions this request's window reads")
        slots_l = slots_of(row_l, lp, bs_l)
        lk, lv = tensors["local_k"], tensors["local_v"]
        for i, c in enumerate(self._local):
            write_kv(c, slots_l, lk[i, idx.to(lk.device)].to(c.device),
                     lv[i, idx.to(lv.device)].to(c.device), slots_checked=True)
        logger.info("RedKnot PD: request %s loaded transfer %s: positions [%d, %d), %d of "
                    "them on local heads", spec.req_id, spec.path.name.split(".")[0], a, b,
                    lp.numel())

    def load_errors(self) -> set[int]:
        out, self._errors = self._errors, set()
        return out
