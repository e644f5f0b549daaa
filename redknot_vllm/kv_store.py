"""Content-addressed store of precomputed KV segments for offline KV reuse.

A *segment* is one document's K and V for every layer and KV head, prefilled alone at
positions ``[0, L)``; a connector later relocates it (RoPE) into vLLM pages. Segments are
keyed by a :class:`SegmentKey` (model fingerprint, head config, tokenizer, BOS flag, token
ids, KV layout) whose sha256 :meth:`~SegmentKey.digest` names the segment everywhere.

Tiers, each with a byte limit and LRU eviction: GPU (tensors on ``device``) -> host memory
(pinned when CUDA exists) -> disk (one safetensors file per segment plus ``index.json``).
Eviction demotes one tier down (a segment already on disk is just dropped); disk eviction
deletes the file. A hit in a lower tier is promoted to the highest memory tier that fits.

Deviation scores measured after a segment was written (``precompute``'s probe,
:meth:`SegmentStore.set_deviation`) go into a sidecar ``<digest>.deviation`` next to the
segment file instead of a rewrite of its KV, so ``precompute`` writes each segment file once.
The sidecar has its own keyed checksum, which also covers the segment file's checksum: it
only ever applies to the exact KV it was measured on (a sidecar left from an earlier version
of the segment is ignored and removed). A damaged sidecar is quarantined and the segment,
whose KV verified, is served without deviation scores.

Integrity: files are never unpickled, and only regular files inside ``disk_dir`` are opened
(a FIFO, a device or a symlink out of the store is never read, so nothing blocks). A load
checks the format tag, that the stored digest matches the file name and the request, that
the key rebuilt from the stored fields hashes to that digest (so a renamed or foreign file
fails), and a keyed checksum (HMAC-SHA256 with the installation's secret,
:func:`installation_key`, kept outside ``disk_dir``) over the digest, every tensor's bytes,
dtypes and shapes, and the metadata: whoever cannot read the secret cannot forge a segment
that is served. Any failure is a warning, a counted miss, and the file is renamed
``*.corrupt`` (:func:`quarantine`), by whichever process finds it.

Crash safety: files and the index are written to a ``*.tmp-<pid>-<rand>`` sibling, fsynced,
then ``os.replace``d into place, and the index only after its file exists. A crash leaves at
worst a temp file (ignored, removed at the next start) or a file missing from the index (the
index is repaired from the files at start). One store instance per ``disk_dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import threading
import time
from collections import OrderedDict
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from vllm.logger import init_logger

from redknot_vllm.fsutil import atomic_write

logger = init_logger(__name__)

FORMAT = "redknot-segment-v2"
"""v2: keyed checksum (``mac``). v1 files (plain sha256) are unverifiable and quarantined."""
DEVIATION_FORMAT = "redknot-deviation-v1"
"""A segment's deviation sidecar: ``deviation`` float32 ``[L]``, keyed checksum over it, the
digest, the segment file's ``mac`` and the meta entries it adds."""
_DEVIATION_SLACK = 1 << 16
"""A sidecar holds 4 bytes per token plus a header of at most this many bytes."""
INDEX_FORMAT = "redknot-segment-index-v1"
INDEX_LIMIT = 256 << 20
"""The largest ``index.json`` read (about 1M segments)."""
INDEX_TOUCH_S = 5.0
"""Disk hits rewrite the index (LRU order only) at most this often."""
TIERS = ("gpu", "host", "disk")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_TMP_RE = re.compile(r"\.tmp-(\d+)-[0-9a-f]+$")
_KEY_STR_FIELDS = ("model_fingerprint", "head_config_hash", "tokenizer", "layout")


@dataclasses.dataclass(frozen=True)
class SegmentKey:
    """Everything the KV of a token sequence depends on."""

    model_fingerprint: str
    head_config_hash: str
    tokenizer: str
    bos: bool
    token_ids: tuple[int, ...]
    layout: str
    context: str = ""
    """What the KV was computed behind (``reuse.store_context``'s hash); empty: the
    segment was prefilled alone at ``[0, L)``. Left out of the digest when empty, so keys
    of segments stored alone keep their digests."""

    def __post_init__(self) -> None:
        ids = tuple(int(t) for t in self.token_ids)
        if any(t < 0 or t >= 1 << 31 for t in ids):
            raise ValueError("token_ids must be in [0, 2**31)")
        object.__setattr__(self, "token_ids", ids)

    @cached_property
    def _digest(self) -> str:
        # Length-prefixed JSON header then raw int32 ids: unambiguous and cheap for long docs.
        head = json.dumps({"v": 1, "bos": bool(self.bos), "num_tokens": len(self.token_ids),
                           **{f: getattr(self, f) for f in _KEY_STR_FIELDS},
                           **({"context": self.context} if self.context else {})},
                          sort_keys=True, separators=(",", ":")).encode()
        h = hashlib.sha256(b"redknot-segment-key-v1\n")
        h.update(len(head).to_bytes(8, "little"))
        h.update(head)
        h.update(np.asarray(self.token_ids, dtype="<i4").tobytes())
        return h.hexdigest()

    def digest(self) -> str:
        """sha256 hex of the canonical encoding of all fields."""
        return self._digest


@dataclasses.dataclass
class Segment:
    """K/V of one segment, ``[num_layers, num_tokens, num_kv_heads, head_dim]`` each.

    The store takes ownership of the tensors; treat returned segments as read-only.
    """

    key: SegmentKey
    k: torch.Tensor
    v: torch.Tensor
    deviation: torch.Tensor | None = None
    meta: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.key.token_ids)
        if self.k.dim() != 4 or not self.k.is_floating_point():
            raise ValueError(f"k must be a 4-D float tensor [layers, tokens, kv_heads, head_dim],"
                             f" got {self.k.dtype} {tuple(self.k.shape)}")
        if self.v.shape != self.k.shape or self.v.dtype != self.k.dtype:
            raise ValueError(f"v {self.v.dtype} {tuple(self.v.shape)} does not match "
                             f"k {self.k.dtype} {tuple(self.k.shape)}")
        if self.k.shape[1] != n:
            raise ValueError(f"k/v have {self.k.shape[1]} tokens but key.token_ids has {n}")
        if self.deviation is not None and (self.deviation.shape != (n,)
                                           or self.deviation.dtype != torch.float32):
            raise ValueError(f"deviation must be float32 [{n}], got {self.deviation.dtype} "
                             f"{tuple(self.deviation.shape)}")
        if not all(isinstance(a, str) and isinstance(b, str) for a, b in self.meta.items()):
            raise ValueError("meta must map str to str")
        self.k, self.v = self.k.contiguous(), self.v.contiguous()
        if self.deviation is not None:
            self.deviation = self.deviation.contiguous()

    @property
    def nbytes(self) -> int:
        """Bytes held by k, v and deviation."""
        ts = (self.k, self.v) if self.deviation is None else (self.k, self.v, self.deviation)
        return sum(t.numel() * t.element_size() for t in ts)

    def to(self, device: str | torch.device, pin: bool = False) -> Segment:
        """This segment on ``device`` (itself if already there); ``pin`` pins CPU copies."""
        dev = torch.device(device)

        def move(t: torch.Tensor) -> torch.Tensor:
            if t.device == dev and (not pin or t.is_pinned()):
                return t
            if dev.type == "cpu" and pin:
                return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
            return t.to(dev)

        k, v = move(self.k), move(self.v)
        dvt = None if self.deviation is None else move(self.deviation)
        if k is self.k and v is self.v and dvt is self.deviation:
            return self
        return dataclasses.replace(self, k=k, v=v, deviation=dvt)


@dataclasses.dataclass
class _DiskEntry:
    nbytes: int
    """The segment file's bytes plus its sidecar's."""
    last_access: float
    sidecar: int = 0
    """The deviation sidecar's bytes (0: none)."""


_FileState = tuple[int, int, int, int]
"""(inode, size, mtime_ns, ctime_ns) of a file."""


def _mac(key: bytes, digest: str, tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """HMAC-SHA256 of a segment file's content under the installation key. Covers dtype and
    shape too: a flipped header dtype would reinterpret intact bytes."""
    h = hmac.new(key, f"redknot-segment-mac-v2|{digest}\n".encode(), hashlib.sha256)
    for name in ("k", "v", "deviation", "token_ids"):
        if name in tensors:
            t = tensors[name].detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    h.update(meta_json.encode())
    return h.hexdigest()


def _deviation_mac(key: bytes, digest: str, segment_mac: str, deviation: torch.Tensor,
                   meta_json: str) -> str:
    """HMAC-SHA256 of a deviation sidecar. ``segment_mac`` binds it to one segment file's
    content without hashing the KV again."""
    h = hmac.new(key, f"redknot-deviation-mac-v1|{digest}|{segment_mac}\n".encode(),
                 hashlib.sha256)
    t = deviation.detach().to("cpu").contiguous()
    h.update(f"deviation|{t.dtype}|{tuple(t.shape)}\n".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    h.update(meta_json.encode())
    return h.hexdigest()


class CorruptFile(ValueError):
    """A store file that must not be read (not a regular file, or out of the store)."""


def check_regular(path: Path, root: Path) -> None:
    """Raise :class:`CorruptFile` unless ``path`` is a regular file inside ``root`` (a
    symlink may only point inside ``root``). Never opens, so a FIFO cannot block;
    ``FileNotFoundError`` passes through."""
    st = os.lstat(path)
    target = path.resolve()  # a symlinked file or folder may not lead out of the store
    if not target.is_relative_to(root.resolve()):
        raise CorruptFile(f"a symlink out of the store (to {target})")
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
        raise CorruptFile(f"not a regular file ({kind})")


def read_regular(path: Path, root: Path, limit: int) -> bytes:
    """The bytes of a regular file inside ``root`` of at most ``limit`` bytes."""
    check_regular(path, root)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the check
            raise CorruptFile("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise CorruptFile(f"larger than {limit} bytes")
    return data


def quarantine(path: Path, reason: object) -> bool:
    """Log a bad store file and rename it ``*.corrupt`` (a symlink itself, never its target).
    Returns whether the rename happened."""
    logger.warning("Discarding KV segment file %s: %s", path, reason)
    try:
        os.replace(path, path.with_name(path.name + ".corrupt"))
        return True
    except OSError as e:
        logger.warning("Could not rename %s to *.corrupt: %s", path, e)
        return False


def installation_key(path: Path | None = None) -> bytes:
    """The installation's secret for segment checksums, created on first use.

    ``VLLM_REDKNOT_SEGMENT_KEY`` (default ``~/.config/redknot/segment-key``): 32 random
    bytes, hex, created with owner-only permissions in an owner-only folder. It must stay
    outside every ``store_dir``: whoever can read it can forge segments.
    """
    from redknot_vllm import envs

    path = Path(path or envs.segment_key_file())
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"segment key {path} (VLLM_REDKNOT_SEGMENT_KEY) is not a regular file")
    if st.st_mode & 0o077:
        logger.warning("Segment key %s is readable by other users (mode %o); `chmod 600` it: "
                       "whoever reads it can forge KV segments", path, st.st_mode & 0o777)
    key = bytes.fromhex(path.read_text().strip())
    if len(key) < 16:
        raise ValueError(f"segment key {path} holds {len(key)} bytes; delete it to make a new one")
    return key


def _file_state(path: Path) -> _FileState:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class SegmentStore:
    """Three-tier LRU store of :class:`Segment` s keyed by digest. Thread-safe.

    The GPU tier exists only if ``gpu_bytes > 0`` and ``device`` is given, host only if
    ``host_bytes > 0``, disk only if ``disk_dir`` is given.
    """

    def __init__(self, gpu_bytes: int = 0, host_bytes: int = 1 << 30,
                 disk_dir: str | Path | None = None, disk_bytes: int = 16 << 30,
                 device: str | torch.device | None = None, key: bytes | None = None) -> None:
        """``key``: the checksum key of the disk tier (default :func:`installation_key`)."""
        self._lock = threading.Lock()
        self._device = None if device is None else torch.device(device)
        if self._device is not None and self._device.type == "cuda" \
                and self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        self._limits = {"gpu": gpu_bytes if self._device is not None else 0,
                        "host": host_bytes, "disk": disk_bytes if disk_dir is not None else 0}
        self._pin = torch.cuda.is_available()
        self._mem: dict[str, OrderedDict[str, Segment]] = {"gpu": OrderedDict(),
                                                           "host": OrderedDict()}
        self._disk: OrderedDict[str, _DiskEntry] = OrderedDict()
        self._bytes = dict.fromkeys(TIERS, 0)
        self._hits = dict.fromkeys(TIERS, 0)
        self._misses = dict.fromkeys(TIERS, 0)
        self._evictions = dict.fromkeys(TIERS, 0)
        self._lookup_misses = 0
        self._corrupt = 0
        self._write_errors = 0
        self._segment_writes = 0
        self._deviation_writes = 0
        self.last_hit_tier: str | None = None
        self._index_touched = float("-inf")  # monotonic time of the last index write
        self._dir = None if disk_dir is None else Path(disk_dir)
        self._key = key
        self._verified: dict[str, tuple[_FileState, str]] = {}
        """digest -> (state, keyed checksum) of a segment file whose checksum this store
        verified or wrote."""
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)
            if key is None:
                from redknot_vllm import envs

                kp = Path(envs.segment_key_file()).resolve()
                if kp.is_relative_to(self._dir.resolve()):
                    raise ValueError(f"the segment key {kp} lies inside the store {self._dir};"
                                     " whoever can write the store could read it: move it "
                                     "(VLLM_REDKNOT_SEGMENT_KEY) or the store")
                self._key = installation_key()
            self._load_index()

    # -- public API ---------------------------------------------------------------------------

    def put(self, segment: Segment, tier: str | None = None, *,
            write_through: bool = False) -> str | None:
        """Store ``segment`` in ``tier`` (None: the highest one), or the first lower tier that
        is configured and large enough. ``write_through``: write its disk copy first (once,
        also when no memory tier can hold it), then keep it in memory. Returns the tier it
        landed in, None if none could hold it. Disk write errors raise ``OSError`` (with
        ``write_through``, before any memory tier changes)."""
        if tier is not None and tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS} or None, got {tier!r}")
        digest = segment.key.digest()
        with self._lock:
            if tier == "disk":
                return self._place(digest, segment, "disk", rewrite=True)
            if write_through:
                self._place(digest, segment, "disk", rewrite=True)
            self._drop_mem(digest)
            return self._place(digest, segment, tier or "gpu", rewrite=not write_through)

    def persist(self, key_or_digest: SegmentKey | str) -> bool:
        """Make sure a disk copy exists (written now if only in memory). False if the segment
        is unknown or there is no disk tier."""
        digest = _as_digest(key_or_digest)
        with self._lock:
            if digest in self._disk:
                return True
            seg = self._mem["gpu"].get(digest, self._mem["host"].get(digest))
            if seg is None or not self._limits["disk"]:
                return False
            return self._place(digest, seg, "disk", rewrite=True) == "disk"

    def set_deviation(self, key: SegmentKey, deviation: torch.Tensor,
                      meta: dict[str, str] | None = None) -> str | None:
        """Attach deviation scores (float32 ``[L]``) and ``meta`` entries to a stored segment
        without rewriting its KV: a disk copy gets a sidecar file, memory copies are replaced
        (and, with a disk tier, a memory-only segment is written whole, as ``put`` would).
        Returns the highest tier holding the segment, None if it is not stored. Disk write
        errors raise ``OSError`` before any memory tier changes."""
        n = len(key.token_ids)
        if deviation.shape != (n,) or deviation.dtype != torch.float32:
            raise ValueError(f"deviation must be float32 [{n}], got {deviation.dtype} "
                             f"{tuple(deviation.shape)}")
        meta = dict(meta or {})
        if not all(isinstance(a, str) and isinstance(b, str) for a, b in meta.items()):
            raise ValueError("meta must map str to str")
        digest = key.digest()
        with self._lock:
            held = [(name, self._mem[name][digest]) for name in ("gpu", "host")
                    if digest in self._mem[name]]
            if not held and digest not in self._disk:
                return None
            new = {name: dataclasses.replace(seg, deviation=deviation.to(seg.k.device),
                                             meta={**seg.meta, **meta})
                   for name, seg in held}
            if digest in self._disk:
                try:
                    self._write_deviation(digest, deviation, meta)
                except FileNotFoundError:  # its file vanished: as if it were memory-only
                    logger.warning("KV segment file %s vanished; dropped from the index",
                                   self._path(digest))
                    self._forget_disk(digest)
                    self._write_index()
                    if not held:
                        return None
            if digest not in self._disk and held and self._limits["disk"]:
                # only in memory (its disk copy evicted or never written): written whole,
                # deviation included, the file's one write
                self._place(digest, new[held[0][0]], "disk")
            for name, seg in held:
                self._mem[name][digest] = new[name]
                self._bytes[name] += new[name].nbytes - seg.nbytes
            for name, _ in held:
                self._evict(name)
            for name in ("gpu", "host"):
                if digest in self._mem[name]:
                    return name
            return "disk" if digest in self._disk else None

    def lookup(self, key_or_digest: SegmentKey | str,
               device: str | torch.device | None = None) -> tuple[Segment, str] | None:
        """``(segment, tier it was found in)`` or None. Promotes lower-tier hits; tensors come
        on ``device`` if given, else on the tier the segment now lives in."""
        digest = _as_digest(key_or_digest)
        with self._lock:
            found = self._lookup(digest)
            self.last_hit_tier = None if found is None else found[1]
            self._lookup_misses += found is None
        if found is None:
            return None
        seg, tier = found
        return (seg if device is None else seg.to(device)), tier

    def get(self, key_or_digest: SegmentKey | str,
            device: str | torch.device | None = None) -> Segment | None:
        """The segment or None; see :meth:`lookup`. Sets ``last_hit_tier``."""
        found = self.lookup(key_or_digest, device)
        return None if found is None else found[0]

    def contains(self, key_or_digest: SegmentKey | str) -> bool:
        """Whether any tier holds the segment (nothing is loaded or verified)."""
        return self.tier_of(key_or_digest) is not None

    def tier_of(self, key_or_digest: SegmentKey | str) -> str | None:
        """The highest tier holding the segment, or None."""
        digest = _as_digest(key_or_digest)
        with self._lock:
            for name in ("gpu", "host"):
                if digest in self._mem[name]:
                    return name
            return "disk" if digest in self._disk else None

    def stats(self) -> dict:
        """Per-tier bytes, limits, counts, hits, misses, evictions; corrupt files skipped;
        segment files and deviation sidecars this store wrote."""
        with self._lock:
            counts = {"gpu": len(self._mem["gpu"]), "host": len(self._mem["host"]),
                      "disk": len(self._disk)}
            tiers = {t: {"bytes": self._bytes[t], "limit": self._limits[t], "count": counts[t],
                         "hits": self._hits[t], "misses": self._misses[t],
                         "evictions": self._evictions[t]} for t in TIERS}
            return {**tiers, "hits": sum(self._hits.values()), "misses": self._lookup_misses,
                    "corrupt": self._corrupt, "write_errors": self._write_errors,
                    "segment_writes": self._segment_writes,
                    "deviation_writes": self._deviation_writes}

    # -- internals (caller holds the lock) -----------------------------------------------------

    def _lookup(self, digest: str) -> tuple[Segment, str] | None:
        for name in ("gpu", "host"):
            if not self._limits[name]:
                continue
            seg = self._mem[name].get(digest)
            if seg is None:
                self._misses[name] += 1
                continue
            self._hits[name] += 1
            self._mem[name].move_to_end(digest)
            if name == "host" and 0 < self._limits["gpu"] and seg.nbytes <= self._limits["gpu"]:
                self._drop_mem(digest)
                self._place(digest, seg, "gpu")
                seg = self._mem["gpu"][digest]
            return seg, name
        if digest not in self._disk:
            if self._limits["disk"]:
                self._misses["disk"] += 1
            return None
        seg = self._load(digest)
        if seg is None:
            self._misses["disk"] += 1
            return None
        self._hits["disk"] += 1
        self._disk[digest].last_access = time.time()
        self._disk.move_to_end(digest)
        self._touch_index()
        landed = self._place(digest, seg, "gpu")
        return (self._mem[landed][digest] if landed in self._mem else seg), "disk"

    def _place(self, digest: str, seg: Segment, start: str, rewrite: bool = False) -> str | None:
        """Insert into the first configured tier at or below ``start`` that can hold ``seg``.
        A disk copy is written only if ``rewrite`` or none exists yet."""
        for name in TIERS[TIERS.index(start):]:
            if self._limits[name] <= 0 or seg.nbytes > self._limits[name]:
                continue
            if name == "disk":
                if rewrite or digest not in self._disk:
                    self._write_disk(digest, seg)
                return "disk" if digest in self._disk else None
            seg = seg.to(self._device, pin=False) if name == "gpu" else seg.to("cpu", self._pin)
            self._mem[name][digest] = seg
            self._bytes[name] += seg.nbytes
            self._evict(name)
            return name
        return None

    def _drop_mem(self, digest: str) -> None:
        for name in ("gpu", "host"):
            seg = self._mem[name].pop(digest, None)
            if seg is not None:
                self._bytes[name] -= seg.nbytes

    def _evict(self, name: str) -> None:
        mem = self._mem[name]
        while self._bytes[name] > self._limits[name] and mem:
            digest, seg = mem.popitem(last=False)
            self._bytes[name] -= seg.nbytes
            self._evictions[name] += 1
            try:
                self._place(digest, seg, TIERS[TIERS.index(name) + 1])
            except OSError as e:  # a cache: losing a demoted segment must not fail the caller
                self._write_errors += 1
                logger.warning("KV segment %s dropped, disk write failed: %s", digest, e)

    def _path(self, digest: str) -> Path:
        assert self._dir is not None
        return segment_file(self._dir, digest)

    def _sidecar_path(self, digest: str) -> Path:
        assert self._dir is not None
        return deviation_file(self._dir, digest)

    def _secret(self) -> bytes:
        assert self._key is not None, "the disk tier's key is set with its folder"
        return self._key

    def _write_disk(self, digest: str, seg: Segment) -> None:
        key = seg.key
        tensors = {"k": seg.k.detach().to("cpu").contiguous(),
                   "v": seg.v.detach().to("cpu").contiguous(),
                   "token_ids": torch.tensor(key.token_ids, dtype=torch.int32)}
        if seg.deviation is not None:
            tensors["deviation"] = seg.deviation.detach().to("cpu").contiguous()
        meta_json = json.dumps(seg.meta, sort_keys=True)
        metadata = {"format": FORMAT, "digest": digest, "bos": "1" if key.bos else "0",
                    "meta": meta_json, "mac": _mac(self._secret(), digest, tensors, meta_json),
                    **{f: getattr(key, f) for f in _KEY_STR_FIELDS},
                    **({"context": key.context} if key.context else {})}
        path = self._path(digest)
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
                     durable=True)
        self._segment_writes += 1
        self._verified[digest] = (_file_state(path), metadata["mac"])  # hashed once, at write
        # a sidecar measured on the previous KV is bound to that file's checksum and would be
        # ignored anyway; removed so that it takes no disk space
        self._unlink(self._sidecar_path(digest))
        old = self._disk.pop(digest, None)
        self._bytes["disk"] -= old.nbytes if old else 0
        self._disk[digest] = _DiskEntry(path.stat().st_size, time.time())
        self._bytes["disk"] += self._disk[digest].nbytes
        self._evict_disk()
        self._write_index()

    def _segment_mac(self, digest: str) -> str:
        """The keyed checksum in a segment file's header: remembered if this store wrote or
        verified the file as it is now, else read from the header without verifying the KV
        (cheap; a sidecar bound to a wrong checksum never applies, since a load compares it
        with the one it verified)."""
        assert self._dir is not None
        path = self._path(digest)
        known = self._verified.get(digest)
        if known is not None and known[0] == _file_state(path):
            return known[1]
        check_regular(path, self._dir)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            mac = (f.metadata() or {}).get("mac")
        if not mac:
            raise ValueError(f"KV segment file {path} has no keyed checksum")
        return mac

    def _write_deviation(self, digest: str, deviation: torch.Tensor,
                         meta: dict[str, str]) -> None:
        """Write the deviation sidecar of a segment on disk."""
        tensors = {"deviation": deviation.detach().to("cpu").contiguous()}
        meta_json = json.dumps(meta, sort_keys=True)
        seg_mac = self._segment_mac(digest)
        metadata = {"format": DEVIATION_FORMAT, "digest": digest, "segment_mac": seg_mac,
                    "meta": meta_json,
                    "mac": _deviation_mac(self._secret(), digest, seg_mac, tensors["deviation"],
                                          meta_json)}
        path = self._sidecar_path(digest)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
                     durable=True)  # a probe prefill is as expensive as the store's
        self._deviation_writes += 1
        self._set_sidecar_bytes(digest, path.stat().st_size)
        self._evict_disk()
        self._write_index()

    def _set_sidecar_bytes(self, digest: str, size: int) -> None:
        entry = self._disk.get(digest)
        if entry is not None:
            self._bytes["disk"] += size - entry.sidecar
            entry.nbytes += size - entry.sidecar
            entry.sidecar = size

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            logger.warning("Could not remove KV segment file %s: %s", path, e)

    def _evict_disk(self) -> None:
        while self._bytes["disk"] > self._limits["disk"] and self._disk:
            self._evictions["disk"] += 1
            self._forget_disk(next(iter(self._disk)))

    def _forget_disk(self, digest: str) -> None:
        entry = self._disk.pop(digest, None)
        self._bytes["disk"] -= entry.nbytes if entry else 0
        self._verified.pop(digest, None)  # the file is gone: nothing left to trust
        self._unlink(self._path(digest))
        self._unlink(self._sidecar_path(digest))

    def _load(self, digest: str) -> Segment | None:
        """Read and verify a disk segment (CPU tensors); None, logged and quarantined if bad."""
        assert self._dir is not None
        path = self._path(digest)
        try:
            check_regular(path, self._dir)
            before = _file_state(path)
            with safe_open(str(path), framework="pt", device="cpu") as f:
                md = f.metadata() or {}
                tensors = {n: f.get_tensor(n) for n in f.keys()}
            known = self._verified.get(digest)
            unchanged = known is not None and before == _file_state(path) == known[0] \
                and md.get("mac") == known[1]
            if md.get("format") != FORMAT:
                raise ValueError(f"format {md.get('format')!r}, expected {FORMAT!r} (files "
                                 "written before keyed checksums: run `redknot precompute` "
                                 "again)")
            if md.get("digest") != digest or path.stem != digest:
                raise ValueError(f"stored digest {md.get('digest')!r} does not match {digest}")
            ids = tensors["token_ids"]
            if ids.dtype != torch.int32 or ids.dim() != 1:
                raise ValueError("token_ids must be a 1-D int32 tensor")
            key = _key_from_header(md, ids)
            if key.digest() != digest:
                raise ValueError("key fields hash to another digest (renamed or foreign file)")
            # the keyed checksum is verified once per file per process (and not at all for
            # a file this store wrote): a file whose inode, size, mtime and ctime are those
            # of the verified one has not been written since (ctime cannot be set back)
            if not unchanged:
                mac = _mac(self._secret(), digest, tensors, md["meta"])
                if not hmac.compare_digest(mac, md.get("mac", "")):
                    raise ValueError("keyed checksum mismatch (damaged, or written without "
                                     "this installation's key)")
                self._verified[digest] = (before, md["mac"])
            meta = json.loads(md["meta"])
            seg = Segment(key, tensors["k"], tensors["v"], tensors.get("deviation"), meta)
        except FileNotFoundError:
            logger.warning("KV segment file %s vanished; dropped from the index", path)
            self._forget_disk(digest)
            self._write_index()
            return None
        except Exception as e:  # truncation, parse errors, missing fields, bad shapes, ...
            self._corrupt += 1
            quarantine(path, e)
            self._forget_disk(digest)
            self._write_index()
            return None
        side = self._load_deviation(digest, md["mac"], len(key.token_ids))
        if side is None:
            return seg
        return dataclasses.replace(seg, deviation=side[0], meta={**seg.meta, **side[1]})

    def _load_deviation(self, digest: str, segment_mac: str, n: int
                        ) -> tuple[torch.Tensor, dict[str, str]] | None:
        """The verified sidecar of a segment whose file (checksum ``segment_mac``) verified:
        (deviation, meta entries), or None if there is none, it belongs to another version
        of the segment (removed), or it is bad (quarantined; the KV is served without it).
        Small (4 bytes per token), so verified at every load."""
        assert self._dir is not None
        path = self._sidecar_path(digest)
        try:
            check_regular(path, self._dir)
            if os.stat(path).st_size > 4 * n + _DEVIATION_SLACK:
                raise ValueError(f"larger than a sidecar of {n} tokens")
            with safe_open(str(path), framework="pt", device="cpu") as f:
                md = f.metadata() or {}
                dev = f.get_tensor("deviation")
            if md.get("format") != DEVIATION_FORMAT or md.get("digest") != digest:
                raise ValueError(f"format {md.get('format')!r} / digest {md.get('digest')!r}, "
                                 f"expected {DEVIATION_FORMAT!r} / {digest}")
            if dev.shape != (n,) or dev.dtype != torch.float32:
                raise ValueError(f"deviation {dev.dtype} {tuple(dev.shape)}, expected "
                                 f"float32 [{n}]")
            mac = _deviation_mac(self._secret(), digest, md.get("segment_mac", ""), dev,
                                 md.get("meta", ""))
            if not hmac.compare_digest(mac, md.get("mac", "")):
                raise ValueError("keyed checksum mismatch (damaged, or written without this "
                                 "installation's key)")
            meta = json.loads(md["meta"])
            if not isinstance(meta, dict) or not all(
                    isinstance(a, str) and isinstance(b, str) for a, b in meta.items()):
                raise ValueError("meta must map str to str")
        except FileNotFoundError:
            self._set_sidecar_bytes(digest, 0)
            return None
        except Exception as e:
            self._corrupt += 1
            quarantine(path, e)
            self._set_sidecar_bytes(digest, 0)
            self._write_index()
            return None
        if not hmac.compare_digest(md["segment_mac"], segment_mac):
            # genuine, but measured on an earlier version of the segment (a crash between
            # the segment's rewrite and the sidecar's removal): it does not apply
            logger.info("Removing the deviation sidecar %s of an earlier version of its "
                        "segment", path)
            self._unlink(path)
            self._set_sidecar_bytes(digest, 0)
            self._write_index()
            return None
        return dev, meta

    def _touch_index(self) -> None:
        """A disk hit changed only the LRU order: write the index at most every
        :data:`INDEX_TOUCH_S` seconds, without fsync (every hit wrote and fsynced it, and
        each write made the scheduler's catalog re-read it); a change of the segment set
        still writes it at once."""
        now = time.monotonic()
        if now - self._index_touched >= INDEX_TOUCH_S:
            self._write_index(durable=False)

    def _write_index(self, durable: bool = True) -> None:
        # Best effort: the files are the truth and the next start repairs the index from them;
        # the index only adds LRU order across restarts.
        assert self._dir is not None
        self._index_touched = time.monotonic()
        body = {"format": INDEX_FORMAT, "segments": {
            d: {"bytes": e.nbytes, "last_access": e.last_access,
                "file": f"{d[:2]}/{d}.safetensors"} for d, e in self._disk.items()}}
        data = json.dumps(body, indent=0).encode()
        try:
            atomic_write(self._dir / "index.json", data, durable=durable)
        except OSError as e:
            logger.warning("Could not write the KV segment index in %s: %s", self._dir, e)

    def _load_index(self) -> None:
        """Read ``index.json``, repair it against the files on disk, drop stale temp files."""
        assert self._dir is not None
        for tmp in [*self._dir.glob("*.tmp-*"), *self._dir.glob("??/*.tmp-*")]:
            m = _TMP_RE.search(tmp.name)
            # Our own pid counts as dead: in containers a crashed predecessor often had it.
            if m is None or not _pid_alive(int(m.group(1))) or int(m.group(1)) == os.getpid():
                tmp.unlink(missing_ok=True)
        files = {}
        for p in self._dir.glob("??/*.safetensors"):
            if not (_DIGEST_RE.fullmatch(p.stem) and p.parent.name == p.stem[:2]):
                continue
            try:
                check_regular(p, self._dir)
            except CorruptFile as e:
                self._corrupt += 1
                quarantine(p, e)
                continue
            except OSError:
                continue
            files[p.stem] = p
        sidecars: dict[str, int] = {}  # digest -> bytes of its deviation sidecar
        for p in self._dir.glob("??/*.deviation"):
            digest = p.name.removesuffix(".deviation")
            if not (_DIGEST_RE.fullmatch(digest) and p.parent.name == digest[:2]):
                continue
            try:
                check_regular(p, self._dir)
                if digest not in files:  # its segment is gone: it can never apply
                    p.unlink()
                    continue
                sidecars[digest] = p.stat().st_size
            except CorruptFile as e:
                self._corrupt += 1
                quarantine(p, e)
            except OSError:
                continue
        index = self._dir / "index.json"
        try:
            try:
                raw = json.loads(read_regular(index, self._dir, INDEX_LIMIT))
            except CorruptFile:
                quarantine(index, "the index is not a regular file")
                raise
            if raw.get("format") != INDEX_FORMAT:
                raise ValueError(f"format {raw.get('format')!r}")
            indexed = {d: float(e["last_access"]) for d, e in raw["segments"].items()}
        except FileNotFoundError:
            indexed = {}
            if files:
                logger.warning("KV segment index in %s is missing; rebuilding", self._dir)
        except Exception as e:
            logger.warning("KV segment index in %s is unreadable (%s); rebuilding", self._dir, e)
            indexed = {}
        entries = []
        for digest, path in files.items():
            try:
                st = path.stat()
            except OSError:
                continue
            side = sidecars.get(digest, 0)
            entries.append((indexed.get(digest, st.st_mtime), digest, st.st_size + side, side))
        for last_access, digest, size, side in sorted(entries):
            self._disk[digest] = _DiskEntry(size, last_access, side)
            self._bytes["disk"] += size
        self._evict_disk()
        self._write_index()


def segment_file(disk_dir: str | Path, digest: str) -> Path:
    """Where a store's disk tier keeps the segment ``digest``."""
    return Path(disk_dir) / digest[:2] / f"{digest}.safetensors"


def deviation_file(disk_dir: str | Path, digest: str) -> Path:
    """Where a store's disk tier keeps the deviation sidecar of the segment ``digest``."""
    return Path(disk_dir) / digest[:2] / f"{digest}.deviation"


def read_key(path: str | Path, root: str | Path) -> SegmentKey:
    """The key in the header of a segment file inside the store ``root``, without loading
    or verifying its tensors. Raises on a file that is not a regular file of the store
    (:class:`CorruptFile`) and on an unreadable header."""
    check_regular(Path(path), Path(root))
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return _key_from_header(f.metadata() or {}, f.get_tensor("token_ids"))


def _key_from_header(md: dict[str, str], token_ids: torch.Tensor) -> SegmentKey:
    return SegmentKey(bos=md["bos"] == "1", token_ids=tuple(token_ids.tolist()),
                      context=md.get("context", ""), **{f: md[f] for f in _KEY_STR_FIELDS})


def _as_digest(key_or_digest: SegmentKey | str) -> str:
    if isinstance(key_or_digest, SegmentKey):
        return key_or_digest.digest()
    if not isinstance(key_or_digest, str) or not _DIGEST_RE.fullmatch(key_or_digest):
        raise ValueError(f"expected a SegmentKey or a sha256 hex digest, got {key_or_digest!r}")
    return key_or_digest
