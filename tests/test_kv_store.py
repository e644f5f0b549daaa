"""SegmentStore: keys, tiers, LRU, integrity and crash safety. CPU only, a few seconds."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from redknot_vllm import kv_store
from redknot_vllm.kv_store import Segment, SegmentKey, SegmentStore

LAYERS, HEADS, HEAD_DIM = 2, 2, 4


def make_key(tokens: int = 16, start: int = 0, **over) -> SegmentKey:
    fields = dict(model_fingerprint="ab" * 32, head_config_hash="hc1", tokenizer="tok1",
                  bos=True, token_ids=tuple(range(start, start + tokens)), layout="tp1of1")
    return SegmentKey(**{**fields, **over})


def make_segment(tokens: int = 16, start: int = 0, dtype: torch.dtype = torch.float32,
                 deviation: bool = True, **key_over) -> Segment:
    g = torch.Generator().manual_seed(start * 1000 + tokens)
    shape = (LAYERS, tokens, HEADS, HEAD_DIM)
    k = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    dev = torch.rand(tokens, generator=g) if deviation else None
    return Segment(make_key(tokens, start, **key_over), k, v, dev, {"source": f"doc{start}"})


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = a.cpu().contiguous(), b.cpu().contiguous()
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def assert_same(a: Segment, b: Segment) -> None:
    assert a.key == b.key and a.meta == b.meta
    assert same_bits(a.k, b.k) and same_bits(a.v, b.v) and same_bits(a.deviation, b.deviation)


def seg_file(root: Path, seg: Segment) -> Path:
    d = seg.key.digest()
    return root / d[:2] / f"{d}.safetensors"


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# -- keys and segments ---------------------------------------------------------------------------

GOLDEN_DIGEST = "d78b9ffa987b6cf72b7b05f248e8940430617a086c9268f3cde72e5381f32edf"


def test_digest_stable_and_sensitive() -> None:
    key = make_key()
    again = SegmentKey("ab" * 32, "hc1", "tok1", True, list(range(16)), "tp1of1")  # type: ignore[arg-type]
    assert key.digest() == again.digest() and key == again and len(key.digest()) == 64
    # Pinned: a change to the encoding silently orphans every stored segment.
    assert SegmentKey("f", "h", "t", False, (1, 2, 3), "l").digest() == GOLDEN_DIGEST
    variants = [make_key(model_fingerprint="cd" * 32), make_key(head_config_hash="hc2"),
                make_key(tokenizer="tok2"), make_key(bos=False), make_key(layout="tp0of2"),
                make_key(start=1), make_key(tokens=15), make_key(tokens=17),
                make_key(token_ids=(*range(15), 16)), make_key(token_ids=tuple(range(15, -1, -1)))]
    digests = {key.digest(), *(v.digest() for v in variants)}
    assert len(digests) == len(variants) + 1


def test_validation_names_the_field() -> None:
    seg = make_segment(8)
    with pytest.raises(ValueError, match="token_ids"):
        make_key(token_ids=(1, -2))
    with pytest.raises(ValueError, match="token_ids"):
        dataclasses.replace(seg, key=make_key(9))
    with pytest.raises(ValueError, match=r"^v "):
        dataclasses.replace(seg, v=seg.v[:, :4])
    with pytest.raises(ValueError, match=r"^v "):
        dataclasses.replace(seg, v=seg.v.half())
    with pytest.raises(ValueError, match=r"^k "):
        dataclasses.replace(seg, k=seg.k[0], v=seg.v[0])
    with pytest.raises(ValueError, match="deviation"):
        dataclasses.replace(seg, deviation=torch.zeros(7))
    with pytest.raises(ValueError, match="deviation"):
        dataclasses.replace(seg, deviation=torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="meta"):
        dataclasses.replace(seg, meta={"n": 1})  # type: ignore[dict-item]
    assert seg.nbytes == 2 * LAYERS * 8 * HEADS * HEAD_DIM * 4 + 8 * 4
    with pytest.raises(ValueError, match="digest"):
        SegmentStore().get("../../etc/passwd")


def test_store_context_is_part_of_the_key_and_survives_the_disk(tmp_path: Path) -> None:
    """A segment computed behind a context has another digest than the same tokens stored
    alone (an empty context keeps the old digest, pinned above), and a fresh store reads
    the context back from the file's header."""
    alone, behind = make_key(), make_key(context="c" * 64)
    assert make_key(context="").digest() == alone.digest() != behind.digest()
    assert make_key(context="d" * 64).digest() != behind.digest()
    seg = make_segment(context="c" * 64)
    SegmentStore(disk_dir=tmp_path).put(seg, tier="disk")
    assert kv_store.read_key(seg_file(tmp_path, seg), tmp_path) == seg.key
    got = SegmentStore(disk_dir=tmp_path).get(seg.key.digest())
    assert got is not None and got.key.context == "c" * 64


# -- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("deviation", [True, False])
@pytest.mark.parametrize("tier", ["gpu", "host", "disk"])
def test_round_trip(tmp_path: Path, tier: str, dtype: torch.dtype, deviation: bool) -> None:
    # device="cpu" gives the GPU tier's bookkeeping without CUDA (see the cuda test below).
    seg = make_segment(dtype=dtype, deviation=deviation)
    store = SegmentStore(gpu_bytes=1 << 20, device="cpu", disk_dir=tmp_path)
    assert store.put(seg, tier=tier) == tier
    assert store.tier_of(seg.key) == tier and store.contains(seg.key.digest())
    found = store.lookup(seg.key)
    assert found is not None and found[1] == tier
    assert_same(found[0], seg)
    if tier == "disk":  # and from a fresh process's point of view
        fresh = SegmentStore(disk_dir=tmp_path)
        got = fresh.get(seg.key.digest())
        assert got is not None and fresh.last_hit_tier == "disk"
        assert_same(got, seg)


# -- LRU, demotion, promotion --------------------------------------------------------------------

def test_lru_demotes_host_to_disk_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[str] = []
    real_save = kv_store.save_file
    monkeypatch.setattr(kv_store, "save_file",
                        lambda t, p, metadata: (writes.append(metadata["digest"]),
                                                real_save(t, p, metadata=metadata)))
    a, b, c, d = (make_segment(start=i * 100) for i in range(4))
    store = SegmentStore(host_bytes=2 * a.nbytes, disk_dir=tmp_path)
    store.put(a)
    store.put(b)
    assert store.get(a.key) is not None  # a is now the most recent: b goes first
    assert store.put(c) == "host"
    assert [store.tier_of(s.key) for s in (a, b, c)] == ["host", "disk", "host"]
    assert writes == [b.key.digest()] and seg_file(tmp_path, b).is_file()

    found = store.lookup(b.key)  # promoted back to host; a (LRU) goes to disk
    assert found is not None and found[1] == "disk" and store.last_hit_tier == "disk"
    assert_same(found[0], b)
    assert [store.tier_of(s.key) for s in (a, b, c)] == ["disk", "host", "host"]
    assert store.lookup(b.key)[1] == "host"  # type: ignore[index]

    store.put(d)  # evicts c (LRU): written; then b is evicted but is already on disk
    store.put(make_segment(start=900))
    assert writes == [b.key.digest(), a.key.digest(), c.key.digest()]
    st = store.stats()
    assert st["host"]["count"] == 2 and st["host"]["bytes"] == 2 * a.nbytes
    assert st["host"]["evictions"] == 4 and st["disk"]["count"] == 3
    assert st["disk"]["hits"] == 1 and st["host"]["hits"] == 2 and st["corrupt"] == 0


def test_disk_eviction_deletes_files(tmp_path: Path) -> None:
    segs = [make_segment(start=i * 100) for i in range(3)]
    probe = SegmentStore(host_bytes=0, disk_dir=tmp_path / "probe")
    probe.put(segs[0])
    size = probe.stats()["disk"]["bytes"]

    store = SegmentStore(host_bytes=0, disk_dir=tmp_path / "d", disk_bytes=size * 5 // 2)
    for s in segs[:2]:
        assert store.put(s) == "disk"  # host tier disabled: the highest available is disk
    assert store.get(segs[0].key) is not None  # segs[1] is now least recently used
    store.put(segs[2])
    assert not seg_file(tmp_path / "d", segs[1]).exists() and not store.contains(segs[1].key)
    assert all(store.contains(s.key) for s in (segs[0], segs[2]))
    st = store.stats()
    assert st["disk"]["evictions"] == 1 and st["disk"]["count"] == 2
    index = json.loads((tmp_path / "d" / "index.json").read_text())["segments"]
    assert set(index) == {segs[0].key.digest(), segs[2].key.digest()}
    assert SegmentStore(disk_dir=tmp_path / "d", disk_bytes=size * 3 // 2).stats()["disk"][
        "count"] == 1  # a smaller limit at start-up evicts down to it


def test_segment_larger_than_tier_skips_it(tmp_path: Path) -> None:
    small, big = make_segment(4), make_segment(64, start=7)
    store = SegmentStore(gpu_bytes=small.nbytes, device="cpu", host_bytes=small.nbytes,
                         disk_dir=tmp_path)
    assert store.put(big) == "disk" and store.put(small) == "gpu"
    assert SegmentStore(host_bytes=small.nbytes).put(big) is None


def test_write_through_writes_the_disk_copy_once(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[str] = []
    real_save = kv_store.save_file
    monkeypatch.setattr(kv_store, "save_file",
                        lambda t, p, metadata: (writes.append(metadata["digest"]),
                                                real_save(t, p, metadata=metadata)))
    small, big = make_segment(4), make_segment(64, start=7)
    store = SegmentStore(host_bytes=small.nbytes, disk_dir=tmp_path)
    assert store.put(small, write_through=True) == "host"
    assert store.put(big, write_through=True) == "disk"  # too big for host: written once
    assert writes == [small.key.digest(), big.key.digest()]
    assert store.tier_of(small.key) == "host" and seg_file(tmp_path, small).is_file()
    again = dataclasses.replace(small, meta={"source": "probed"})
    assert store.put(again, write_through=True) == "host"  # the disk copy is rewritten
    assert writes[2:] == [small.key.digest()]
    assert SegmentStore(disk_dir=tmp_path).get(small.key).meta == {  # type: ignore[union-attr]
        "source": "probed"}
    assert store.get(small.key).meta == {"source": "probed"}  # type: ignore[union-attr]


def test_three_tiers_cascade_and_promote(tmp_path: Path) -> None:
    a, b, c, d = (make_segment(start=i * 100) for i in range(4))
    store = SegmentStore(gpu_bytes=2 * a.nbytes, host_bytes=a.nbytes, disk_dir=tmp_path,
                         device="cpu")
    for s in (a, b, c, d):
        assert store.put(s) == "gpu"
    assert [store.tier_of(s.key) for s in (a, b, c, d)] == ["disk", "host", "gpu", "gpu"]
    assert store.lookup(b.key)[1] == "host"  # type: ignore[index]
    assert [store.tier_of(s.key) for s in (a, b, c, d)] == ["disk", "gpu", "host", "gpu"]
    found = store.lookup(a.key)
    assert found is not None and found[1] == "disk"
    assert_same(found[0], a)
    assert [store.tier_of(s.key) for s in (a, b, c, d)] == ["gpu", "gpu", "disk", "host"]
    st = store.stats()
    assert (st["gpu"]["count"], st["host"]["count"], st["disk"]["count"]) == (2, 1, 2)
    assert st["gpu"]["misses"] == 2 and st["host"]["misses"] == 1
    assert store.get(make_key(start=5000)) is None and store.stats()["misses"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU tier needs CUDA")
def test_gpu_tier_on_cuda(tmp_path: Path) -> None:
    a, b = make_segment(dtype=torch.bfloat16), make_segment(start=100)
    store = SegmentStore(gpu_bytes=a.nbytes + b.nbytes - 1, device="cuda", disk_dir=tmp_path)
    store.put(a)
    assert store.get(a.key).k.is_cuda  # type: ignore[union-attr]
    store.put(b)
    host = store.get(a.key, device="cpu")
    assert store.last_hit_tier == "host" and host is not None and not host.k.is_cuda
    assert_same(host, a)
    assert store.tier_of(a.key) == "gpu" and store.tier_of(b.key) == "host"
    assert store._mem["host"][b.key.digest()].k.is_pinned()
    assert store.persist(a.key)
    fresh = SegmentStore(gpu_bytes=1 << 20, device="cuda", disk_dir=tmp_path)
    got = fresh.get(a.key)
    assert fresh.last_hit_tier == "disk" and got is not None and got.k.is_cuda
    assert_same(got, a)


def test_persist(tmp_path: Path) -> None:
    seg = make_segment()
    store = SegmentStore(disk_dir=tmp_path)
    assert store.put(seg) == "host" and not seg_file(tmp_path, seg).exists()
    assert store.persist(seg.key) and seg_file(tmp_path, seg).is_file()
    assert store.tier_of(seg.key) == "host"
    assert not store.persist(make_key(start=3)) and not SegmentStore().persist(seg.key)
    assert_same(SegmentStore(disk_dir=tmp_path).get(seg.key), seg)  # type: ignore[arg-type]


# -- integrity -----------------------------------------------------------------------------------

def _stored(tmp_path: Path, seg: Segment) -> Path:
    SegmentStore(host_bytes=0, disk_dir=tmp_path).put(seg)
    return seg_file(tmp_path, seg)


def _expect_corrupt(tmp_path: Path, seg: Segment, caplog: pytest.LogCaptureFixture) -> None:
    store = SegmentStore(host_bytes=0, disk_dir=tmp_path)
    assert store.contains(seg.key)  # the index does not verify: only a load does
    with caplog.at_level(logging.WARNING, logger="redknot_vllm.kv_store"):
        assert store.get(seg.key) is None
    path = seg_file(tmp_path, seg)
    assert any(str(path) in r.getMessage() for r in caplog.records)
    assert not path.exists() and path.with_name(path.name + ".corrupt").exists()
    st = store.stats()
    assert st["corrupt"] == 1 and st["misses"] == 1 and st["disk"]["count"] == 0
    assert not store.contains(seg.key) and not SegmentStore(disk_dir=tmp_path).contains(seg.key)


def test_flipped_byte_is_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seg = make_segment(64, dtype=torch.bfloat16)
    path = _stored(tmp_path, seg)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    _expect_corrupt(tmp_path, seg, caplog)
    assert "checksum" in caplog.text


def test_truncated_file_is_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seg = make_segment()
    path = _stored(tmp_path, seg)
    path.write_bytes(path.read_bytes()[:-100])
    _expect_corrupt(tmp_path, seg, caplog)


def test_renamed_file_is_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a, b = make_segment(), make_segment(start=100)
    shutil.copy(_stored(tmp_path / "src", a), _stored(tmp_path, b))  # a's bytes under b's name
    _expect_corrupt(tmp_path, b, caplog)
    assert "stored digest" in caplog.text


def test_foreign_key_is_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Self-consistent file (digest field = name, valid checksum) whose key is another's."""
    a, b = make_segment(), make_segment(start=100)
    path = _stored(tmp_path, b)
    tensors = {"k": a.k, "v": a.v, "deviation": a.deviation,
               "token_ids": torch.tensor(a.key.token_ids, dtype=torch.int32)}
    meta = json.dumps(a.meta)
    save_file(tensors, str(path), metadata={
        "format": kv_store.FORMAT, "digest": b.key.digest(), "mac":
        kv_store._mac(kv_store.installation_key(), b.key.digest(), tensors, meta),
        "meta": meta, "bos": "1",
        **{f: getattr(a.key, f) for f in ("model_fingerprint", "head_config_hash",
                                         "tokenizer", "layout")}})
    _expect_corrupt(tmp_path, b, caplog)
    assert "another digest" in caplog.text


def test_wrong_format_is_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seg = make_segment()
    save_file({"k": seg.k}, str(_stored(tmp_path, seg)), metadata={"format": "other"})
    _expect_corrupt(tmp_path, seg, caplog)


# -- crash safety and the index ------------------------------------------------------------------

def test_crash_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seg = make_segment()
    store = SegmentStore(host_bytes=0, disk_dir=tmp_path)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("crash")))
        with pytest.raises(OSError, match="crash"):
            store.put(seg, tier="disk")
    assert all_files(tmp_path) == ["index.json"] and not store.contains(seg.key)
    fresh = SegmentStore(disk_dir=tmp_path)
    assert not fresh.contains(seg.key) and fresh.get(seg.key) is None

    # A killed writer's temp file, however complete, is never taken for a segment.
    good = _stored(tmp_path / "src", seg)
    final = seg_file(tmp_path, seg)
    final.parent.mkdir(exist_ok=True)
    shutil.copy(good, final.with_name(f"{final.name}.tmp-{os.getpid()}-0a1b"))
    shutil.copy(tmp_path / "index.json", tmp_path / f"index.json.tmp-{os.getpid()}-77")
    fresh = SegmentStore(disk_dir=tmp_path)
    assert not fresh.contains(seg.key) and fresh.get(seg.key) is None
    assert all_files(tmp_path) == ["index.json"] + [str(p.relative_to(tmp_path)) for p in
                                                    sorted((tmp_path / "src").rglob("*.*"))]


def test_failed_demotion_drops_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    a, b = make_segment(), make_segment(start=100)
    store = SegmentStore(host_bytes=a.nbytes, disk_dir=tmp_path)
    store.put(a)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with caplog.at_level(logging.WARNING, logger="redknot_vllm.kv_store"):
        assert store.put(b) == "host"
    assert "disk full" in caplog.text and store.stats()["write_errors"] == 1
    assert not store.contains(a.key) and store.tier_of(b.key) == "host"


def test_index_rebuilt_and_repaired(tmp_path: Path) -> None:
    a, b, c = (make_segment(start=i * 100) for i in range(3))
    store = SegmentStore(host_bytes=0, disk_dir=tmp_path)
    for s in (a, b, c):
        store.put(s)
    (tmp_path / "index.json").unlink()
    fresh = SegmentStore(disk_dir=tmp_path)
    assert all(fresh.tier_of(s.key) == "disk" for s in (a, b, c))
    assert_same(fresh.get(b.key), b)  # type: ignore[arg-type]

    seg_file(tmp_path, a).unlink()  # stale entry: dropped
    (tmp_path / "index.json").write_text("{not json")
    fresh = SegmentStore(disk_dir=tmp_path)
    assert not fresh.contains(a.key) and fresh.contains(c.key)
    index = json.loads((tmp_path / "index.json").read_text())
    assert set(index["segments"]) == {b.key.digest(), c.key.digest()}
    assert fresh.stats()["disk"]["bytes"] == sum(e["bytes"] for e in index["segments"].values())


def test_file_placed_before_index_survives(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between the file's rename and the index write: the next start adopts it."""
    seg = make_segment()
    store = SegmentStore(host_bytes=0, disk_dir=tmp_path)
    with monkeypatch.context() as m:
        m.setattr(SegmentStore, "_write_index", lambda self: (_ for _ in ()).throw(OSError))
        with pytest.raises(OSError):
            store.put(seg)
    assert_same(SegmentStore(disk_dir=tmp_path).get(seg.key), seg)  # type: ignore[arg-type]


def test_contains_and_tier_of_do_not_load(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    seg = make_segment()
    _stored(tmp_path, seg)
    store = SegmentStore(disk_dir=tmp_path)
    monkeypatch.setattr(kv_store, "safe_open", lambda *a, **k: pytest.fail("loaded"))
    assert store.contains(seg.key) and store.tier_of(seg.key.digest()) == "disk"
    assert not store.contains(make_key(start=1)) and store.tier_of(make_key(start=1)) is None


def test_threads(tmp_path: Path) -> None:
    segs = [make_segment(8, start=i * 100, deviation=False) for i in range(24)]
    store = SegmentStore(host_bytes=4 * segs[0].nbytes, disk_dir=tmp_path)
    errors: list[BaseException] = []

    def work(part: list[Segment]) -> None:
        try:
            for s in part:
                store.put(s)
                assert_same(store.get(s.key), s)  # type: ignore[arg-type]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(segs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    st = store.stats()
    assert st["host"]["count"] == 4 and st["disk"]["count"] >= 20 and st["corrupt"] == 0
    assert all(store.get(s.key) is not None for s in segs)


def test_keyed_checksum_is_verified_once_per_file(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    seg = make_segment(tokens=32)
    calls = []
    real = kv_store._mac
    monkeypatch.setattr(kv_store, "_mac", lambda *a: calls.append(1) or real(*a))
    writer = SegmentStore(host_bytes=0, disk_dir=tmp_path)
    writer.put(seg)
    assert len(calls) == 1  # at write
    assert writer.get(seg.key) is not None and len(calls) == 1  # its own file: not again
    reader = SegmentStore(host_bytes=0, disk_dir=tmp_path)
    for _ in range(3):  # no memory tier: every get loads the file
        assert reader.get(seg.key) is not None
    assert len(calls) == 2  # verified once by this store
    # rewritten (here: the same bytes, as a tamperer restoring mtime would): verified again
    path = seg_file(tmp_path, seg)
    st = path.stat()
    path.write_bytes(path.read_bytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert reader.get(seg.key) is not None and len(calls) == 3


def test_evicted_segments_leave_no_verified_entry(tmp_path: Path) -> None:
    """The verified-file cache drops a segment whose file the store removes (it grew with
    every segment ever seen)."""
    segs = [make_segment(tokens=32, start=i * 32) for i in range(3)]
    one = segs[0].nbytes
    store = SegmentStore(gpu_bytes=0, host_bytes=0, disk_dir=tmp_path,
                         disk_bytes=int(2.5 * one))
    for seg in segs:
        store.put(seg)
    assert segs[0].key.digest() not in store._disk  # evicted for the later ones
    assert set(store._verified) == set(store._disk) and store._disk


# -- deviation sidecars (precompute's probe) -----------------------------------------------------

def _count_writes(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """File name -> atomic writes through the store (the index left out)."""
    writes: Counter[str] = Counter()
    real = kv_store.atomic_write

    def counting(path: str | Path, *a: Any, **k: Any) -> None:
        if Path(path).name != "index.json":
            writes[Path(path).name] += 1
        real(path, *a, **k)

    monkeypatch.setattr(kv_store, "atomic_write", counting)
    return writes


def _probed(tokens: int = 32) -> tuple[Segment, Segment]:
    """(the segment as stored, the same with its probe's deviation and meta entry)."""
    seg = make_segment(tokens)
    bare = dataclasses.replace(seg, deviation=None)
    return bare, dataclasses.replace(seg, meta={**seg.meta, "deviation": "probe offset 9"})


def _set_probe(store: SegmentStore, probed: Segment) -> str | None:
    assert probed.deviation is not None
    return store.set_deviation(probed.key, probed.deviation, {"deviation": "probe offset 9"})


def dev_file(root: Path, seg: Segment) -> Path:
    return kv_store.deviation_file(root, seg.key.digest())


@pytest.mark.parametrize("host", [True, False])
def test_probe_writes_a_sidecar_not_the_segment_again(tmp_path: Path, host: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """precompute's flow: stored (write-through), then probed: the segment file is written
    and its KV hashed once; the scores go into a sidecar that every reader applies."""
    writes = _count_writes(monkeypatch)
    macs: list[int] = []
    real_mac = kv_store._mac
    monkeypatch.setattr(kv_store, "_mac", lambda *a: macs.append(1) or real_mac(*a))
    bare, probed = _probed()
    store = SegmentStore(host_bytes=(1 << 20) if host else 0, disk_dir=tmp_path)
    tier = "host" if host else "disk"
    assert store.put(bare, write_through=True) == tier
    if not host:
        assert store.get(bare.key) is not None  # the probe's look-up: from disk, not hashed
    assert _set_probe(store, probed) == tier
    d = bare.key.digest()
    assert writes == {f"{d}.safetensors": 1, f"{d}.deviation": 1} and len(macs) == 1
    st = store.stats()
    assert st["segment_writes"] == 1 and st["deviation_writes"] == 1 and st["corrupt"] == 0
    assert_same(store.get(bare.key), probed)  # type: ignore[arg-type]
    fresh = SegmentStore(host_bytes=0, disk_dir=tmp_path)
    assert_same(fresh.get(d), probed)  # type: ignore[arg-type]
    # the disk tier counts the sidecar, here and after a restart
    size = seg_file(tmp_path, bare).stat().st_size + dev_file(tmp_path, bare).stat().st_size
    assert st["disk"]["bytes"] == fresh.stats()["disk"]["bytes"] == size
    assert writes == {f"{d}.safetensors": 1, f"{d}.deviation": 1}  # loads write nothing


def test_set_deviation_without_a_disk_copy(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    bare, probed = _probed()
    memory_only = SegmentStore()
    memory_only.put(bare)
    assert _set_probe(memory_only, probed) == "host"
    assert_same(memory_only.get(bare.key), probed)  # type: ignore[arg-type]
    assert memory_only.stats()["host"]["bytes"] == probed.nbytes

    writes = _count_writes(monkeypatch)
    store = SegmentStore(disk_dir=tmp_path)  # a disk tier, but no disk copy yet
    store.put(bare)
    assert _set_probe(store, probed) == "host"
    d = bare.key.digest()
    assert writes == {f"{d}.safetensors": 1}  # written whole, deviation inside: once
    assert not dev_file(tmp_path, bare).exists()
    assert_same(SegmentStore(host_bytes=0, disk_dir=tmp_path).get(d), probed)  # type: ignore[arg-type]

    assert store.set_deviation(make_key(start=500), torch.zeros(16)) is None
    with pytest.raises(ValueError, match="deviation"):
        store.set_deviation(bare.key, torch.zeros(31))
    with pytest.raises(ValueError, match="deviation"):
        store.set_deviation(bare.key, torch.zeros(32, dtype=torch.float16))


def _stored_probed(root: Path) -> Segment:
    """A probed segment on disk (its sidecar beside it); returns it as stored."""
    bare, probed = _probed()
    store = SegmentStore(host_bytes=0, disk_dir=root)
    store.put(bare)
    _set_probe(store, probed)
    return bare


def test_damaged_or_forged_sidecar_serves_the_kv_without_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The KV verified on its own: it is served, without scores; the sidecar is quarantined."""
    for how in ("flip", "forge", "fifo"):
        root = tmp_path / how
        bare = _stored_probed(root)
        path = dev_file(root, bare)
        if how == "flip":
            data = bytearray(path.read_bytes())
            data[-3] ^= 0x01
            path.write_bytes(bytes(data))
        elif how == "forge":
            with safe_open(str(path), framework="pt") as f:
                md, dev = dict(f.metadata()), f.get_tensor("deviation")
            dev = torch.rand_like(dev)
            md["mac"] = kv_store._deviation_mac(os.urandom(32), md["digest"],
                                                md["segment_mac"], dev, md["meta"])
            save_file({"deviation": dev}, str(path), metadata=md)
        else:
            path.unlink()
            os.mkfifo(path)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="redknot_vllm.kv_store"):
            store = SegmentStore(host_bytes=0, disk_dir=root)
            got = store.get(bare.key)
        assert got is not None, how
        assert_same(got, bare)
        assert str(path) in caplog.text, how
        assert not os.path.lexists(path) and path.with_name(path.name + ".corrupt").exists()
        assert store.stats()["corrupt"] == 1 and store.stats()["disk"]["bytes"] == \
            seg_file(root, bare).stat().st_size
        assert_same(store.get(bare.key), bare)  # type: ignore[arg-type]
        if how == "forge":
            assert "checksum" in caplog.text


def test_sidecar_applies_only_to_the_kv_it_was_measured_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bare = _stored_probed(tmp_path)
    old_sidecar = dev_file(tmp_path, bare).read_bytes()
    store = SegmentStore(host_bytes=0, disk_dir=tmp_path)
    newer = dataclasses.replace(bare, k=bare.k + 1, meta={"source": "stored again"})
    store.put(newer, write_through=True)  # a rewrite of the KV drops the scores
    assert not dev_file(tmp_path, bare).exists()
    assert_same(store.get(bare.key), newer)  # type: ignore[arg-type]
    # a crash between the rewrite and the sidecar's removal leaves the old one: never applied
    dev_file(tmp_path, bare).write_bytes(old_sidecar)
    fresh = SegmentStore(host_bytes=0, disk_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="redknot_vllm.kv_store"):
        assert_same(fresh.get(bare.key), newer)  # type: ignore[arg-type]
    assert not dev_file(tmp_path, bare).exists() and fresh.stats()["corrupt"] == 0
    assert not list(tmp_path.rglob("*.corrupt")) and not caplog.records
    # a segment file that fails is a miss, whatever its sidecar says
    bare = _stored_probed(tmp_path / "b")
    path = seg_file(tmp_path / "b", bare)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    store = SegmentStore(host_bytes=0, disk_dir=tmp_path / "b")
    assert store.get(bare.key) is None and store.stats()["corrupt"] == 1
    assert not dev_file(tmp_path / "b", bare).exists()


def test_sidecars_follow_their_segment_on_disk(tmp_path: Path) -> None:
    bare = _stored_probed(tmp_path)
    size = seg_file(tmp_path, bare).stat().st_size + dev_file(tmp_path, bare).stat().st_size
    (tmp_path / "index.json").unlink()
    assert SegmentStore(disk_dir=tmp_path).stats()["disk"]["bytes"] == size  # rebuilt
    seg_file(tmp_path, bare).unlink()  # an orphan sidecar is removed at start
    assert SegmentStore(disk_dir=tmp_path).stats()["disk"]["count"] == 0
    assert not dev_file(tmp_path, bare).exists()

    bare = _stored_probed(tmp_path / "e")
    store = SegmentStore(host_bytes=0, disk_dir=tmp_path / "e", disk_bytes=size * 3 // 2)
    other = make_segment(32, start=100)
    store.put(other)  # evicts the probed segment: both its files go
    assert not seg_file(tmp_path / "e", bare).exists()
    assert not dev_file(tmp_path / "e", bare).exists()
    assert all_files(tmp_path / "e") == sorted(["index.json", str(seg_file(
        tmp_path / "e", other).relative_to(tmp_path / "e"))])


def test_disk_hits_rewrite_the_index_at_most_every_few_seconds(tmp_path, monkeypatch):
    """A disk hit only changes the LRU order: the index is not rewritten (nor fsynced) on
    every hit, while a new segment still writes it at once."""
    import redknot_vllm.kv_store as kv_store_mod

    writes: list[bool] = []
    real = kv_store_mod.atomic_write

    def counting(path, data, *, durable=False):
        if Path(path).name == "index.json":
            writes.append(durable)
        return real(path, data, durable=durable)

    monkeypatch.setattr(kv_store_mod, "atomic_write", counting)
    store = SegmentStore(gpu_bytes=0, host_bytes=0, disk_dir=tmp_path, key=b"k" * 32)
    writes.clear()  # the start-up repair writes it too
    seg = make_segment()
    assert store.put(seg) == "disk"
    assert writes == [True]
    for _ in range(5):
        assert store.lookup(seg.key)[1] == "disk"
    assert writes == [True]  # within INDEX_TOUCH_S of the put: no rewrite
    monkeypatch.setattr(kv_store_mod, "INDEX_TOUCH_S", 0.0)
    assert store.lookup(seg.key)[1] == "disk"
    assert writes == [True, False]  # the LRU order, not durable
