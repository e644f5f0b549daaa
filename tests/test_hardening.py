"""Nothing a client or a file can do takes the engine down.

* request parameters: every malformed ``kv_transfer_params`` (the ones found by hand and a
  generated set) is refused in the scheduler with a message naming the field, and on a live
  engine with reuse on each such request answers exactly as with reuse off;
* config bounds: windows, sinks and counts have upper bounds, named in the message;
* store files: FIFOs, symlinks out of the store, truncated, empty, pickled and oversized
  headers are logged, renamed ``*.corrupt`` and counted, by the worker's store and by the
  scheduler's catalog alike, and nothing blocks (each case runs under an alarm);
* forged segments (random K/V, checksum made without this installation's key) are refused;
* client writes are an operator opt-in, bounded per request, and marked ranges are capped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from redknot_vllm import kv_store
from redknot_vllm.config import RedKnotConfigError, ReuseConfig, SparseFFNConfig
from redknot_vllm.head_config import HeadConfig, HeadConfigError
from redknot_vllm.kv_store import Segment, SegmentKey, SegmentStore
from redknot_vllm.logs import RateLimited
from redknot_vllm.reuse.catalog import SegmentCatalog
from redknot_vllm.reuse.keys import ReuseSetup
from redknot_vllm.reuse.params import check_request, parse_params
from redknot_vllm.reuse.scheduler import ReuseScheduler
from tests.conftest import COMMON, _engine

DIGEST = "ab" * 32


@contextlib.contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO opened for reading blocks forever)."""
    def fire(*_: Any) -> None:
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------- request parameters
HOSTILE: list[tuple[Any, str]] = [
    ({"redknot": {"probe": {"digest": "x", "offset": 1}}}, '"probe"'),
    ({"redknot": {"probe": {"digest": DIGEST, "offset": 100000}}}, '"offset"'),
    ({"redknot": {"probe": {"digest": DIGEST, "offset": 3}}}, "not a stored segment"),
    ({"redknot": {"probe": {"digest": DIGEST, "offset": True}}}, '"probe"'),
    ({"redknot": {"reuse": [[0, 10 ** 9]]}}, "past the prompt"),
    ({"redknot": {"reuse": [[i, i + 1] for i in range(100000)]}}, "max_marked_ranges"),
    ({"redknot": {"reuse": [[0, 20], [10, 30]]}}, "overlap"),
    ({"redknot": {"reuse": [[5, 2]]}}, '"reuse"'),
    ({"redknot": {"reuse": [[True, 3]]}}, '"reuse"'),
    ({"redknot": {"reuse": "AUTO"}}, '"reuse"'),
    ({"redknot": {"store": True}}, "client_store"),
    ({"redknot": {"store": "yes"}}, '"store"'),
    ({"redknot": {"recompute_fraction": math.nan}}, '"recompute_fraction"'),
    ({"redknot": {"recompute_fraction": math.inf}}, '"recompute_fraction"'),
    ({"redknot": {"recompute_fraction": -1}}, '"recompute_fraction"'),
    ({"redknot": "everything"}, "must be an object"),
    ({"redknot": {"nope": 1}}, "unknown key"),
    (["not", "an", "object"], "kv_transfer_params must be an object"),
    ("redknot", "kv_transfer_params must be an object"),
]


def _generated(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Random requests each with at least one invalid field (seeded)."""
    rng = random.Random(seed)
    bad = {
        "reuse": [7, "all", {}, [[1]], [[3, 2]], [[-1, 4]], [["a", "b"]], [[0, 1 << 40]],
                  [[2.5, 9]], None],
        "store": ["true", 1, [], True],  # True: this engine does not let requests store
        "probe": [{"digest": DIGEST}, {"offset": 2}, {"digest": "g" * 64, "offset": 2},
                  {"digest": DIGEST, "offset": -5}, {"digest": DIGEST, "offset": 1.5}, "p"],
        "recompute_fraction": [math.nan, 1.0001, -0.5, "0.1", True, [0.1], 1e309],
        "surprise": [1, None, "x"],
    }
    good = {"reuse": ["auto", "off"], "recompute_fraction": [0.0, 0.5, 1]}
    out = []
    for _ in range(n):
        keys = rng.sample(sorted(bad), rng.randint(1, 3))
        body = {k: rng.choice(bad[k]) for k in keys}
        for k, vals in good.items():
            if k not in body and rng.random() < 0.5:
                body[k] = rng.choice(vals)
        if body.get("reuse", "x") is None:
            body["reuse"] = 7
        out.append({"redknot": body})
    return out


def _check(kv: Any, prompt_len: int = 200, cfg: ReuseConfig | None = None) -> None:
    params = parse_params(kv)
    check_request(params, prompt_len, cfg or ReuseConfig(), lambda d: None)


@pytest.mark.parametrize(("kv", "field"), HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_params_are_refused_naming_the_field(kv: Any, field: str) -> None:
    # writes allowed, so each case fails on its own field rather than on the opt-in
    cfg = ReuseConfig(client_store=field != "client_store")
    with pytest.raises(RedKnotConfigError, match=re.escape(field)):
        _check(kv, cfg=cfg)


def test_generated_params_are_all_refused() -> None:
    for kv in _generated(60):
        with pytest.raises(RedKnotConfigError):
            _check(kv)


def test_client_writes_need_the_opt_in_and_fit_the_limit() -> None:
    _check({"redknot": {"store": True}}, cfg=ReuseConfig(client_store=True))
    with pytest.raises(RedKnotConfigError, match="max_store_tokens=100"):
        _check({"redknot": {"store": True}}, 200,
               ReuseConfig(client_store=True, max_store_tokens=100))
    params = parse_params({"redknot": {"probe": {"digest": DIGEST, "offset": 50}}})
    check_request(params, 200, ReuseConfig(client_store=True), lambda d: 150)
    with pytest.raises(RedKnotConfigError, match="150 after the offset"):
        check_request(params, 200, ReuseConfig(client_store=True), lambda d: 99)


def test_store_behind_a_context_is_checked_against_the_engine() -> None:
    """``"store": {"after": n}`` only on an engine with ``reuse.store_context`` (and plain
    ``"store": true`` only on one without), leaving at least ``min_tokens`` to store; the
    store limit counts the document, not the context."""
    ctx = ReuseConfig(client_store=True, store_context="Some context.", max_store_tokens=100)
    _check({"redknot": {"store": {"after": 50}}}, 150, ctx)
    for kv, cfg, match in (
            ({"store": {"after": 50}}, ReuseConfig(client_store=True), "no reuse.store_context"),
            ({"store": True}, ctx, "behind its reuse.store_context"),
            ({"store": {"after": 180}}, ctx, '"after"'),
            ({"store": {"after": 10}}, ctx, "max_store_tokens=100"),
            ({"store": {"after": 0}}, ctx, '"store"'),
            ({"store": {"after": 5, "x": 1}}, ctx, '"store"')):
        with pytest.raises(RedKnotConfigError, match=re.escape(match)):
            _check({"redknot": kv}, 200, cfg)


def test_store_context_option_is_validated() -> None:
    assert ReuseConfig(store_context=[1, 2]).store_context == (1, 2)  # from JSON
    assert ReuseConfig(store_context=[1, 2]).to_dict()["store_context"] == [1, 2]
    assert ReuseConfig().context_hash() == ""
    assert len({ReuseConfig(store_context=c).context_hash()
                for c in ("a", "b", (1,), (2,))}) == 4
    for bad in ("", [], [-1], ["a"], 5, {"text": "a"}):
        with pytest.raises(RedKnotConfigError, match=r"reuse\.store_context"):
            ReuseConfig(store_context=bad)


def test_rate_limited_log_says_what_it_left_out() -> None:
    lines: list[str] = []
    log = types.SimpleNamespace(log=lambda lvl, msg, *a, **k: lines.append(msg % a))
    now = [0.0]
    rl = RateLimited(log, interval_s=10, clock=lambda: now[0])
    for _ in range(1000):
        rl.warning("k", "bad request %d", 1)
    assert lines == ["bad request 1"]
    now[0] = 11.0
    rl.warning("k", "bad request %d", 2)
    rl.warning("other", "another kind")
    assert lines[1].startswith("bad request 2 (999 similar line(s) left out")
    assert lines[2] == "another kind"


def _setup(tmp: Path, **cfg: Any) -> ReuseSetup:
    return ReuseSetup(cfg=ReuseConfig(store_dir=str(tmp), **cfg),
                      key_fields={"model_fingerprint": "m", "head_config_hash": "h",
                                  "tokenizer": "t", "layout": "l"},
                      bos_token_id=None, store_dir=tmp)


def _request(rid: str, kv: Any, n: int = 300) -> Any:
    return types.SimpleNamespace(request_id=rid, prompt_token_ids=list(range(1000, 1000 + n)),
                                 kv_transfer_params=kv, block_hashes=[],
                                 sampling_params=types.SimpleNamespace(prompt_logprobs=None))


def test_scheduler_plans_never_raise_and_log_once(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    sched = ReuseScheduler(_setup(tmp_path, store_marked=True), block_size=16)
    with caplog.at_level(logging.INFO, logger="redknot_vllm"):
        for i, (kv, _) in enumerate(HOSTILE):
            sched.plan(_request(f"r{i}", kv), 0)
            assert sched.uses_in(f"r{i}", 0, 300) == []
            assert sched.capture(f"r{i}", 300, 300, ()) is None
    # one line for the first bad request, the rest rate-limited
    assert len([r for r in caplog.records if "reuse off for it" in r.getMessage()]) == 1
    # a valid request marking many unstored ranges gets one line, not one per range
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="redknot_vllm"):
        ranges = [[i, i + 4] for i in range(0, 256, 4)]
        sched.plan(_request("many", {"redknot": {"reuse": ranges}}), 0)
    assert len([r for r in caplog.records if "many" in r.getMessage()]) == 1


# ------------------------------------------------------------------------ config bounds
def _hc(**over: Any) -> dict[str, Any]:
    d = {"num_layers": 1, "num_kv_heads": 2, "kv_head_classification": [["local", "global"]],
         "kv_head_max_distance": [[64, -1]], "kv_head_sink_size": [[4, 4]]}
    d.update(over)
    return d


@pytest.mark.parametrize(("over", "message"), [
    ({"kv_head_max_distance": [[10 ** 30, -1]]}, r"kv_head_max_distance\[0\]\[0\] is 10+"),
    ({"kv_head_sink_size": [[10 ** 12, 4]]}, r"kv_head_sink_size\[0\]\[0\] is 1000000000000"),
    ({"kv_head_sink_size": [[64, 4]]}, "the sink must be smaller than the window"),
    ({"kv_head_sink_size": [[100, 4]]}, "the sink must be smaller than the window"),
])
def test_head_config_bounds(over: dict[str, Any], message: str) -> None:
    with pytest.raises(HeadConfigError, match=message):
        HeadConfig.from_dict(_hc(**over))


def test_bounds_against_the_model() -> None:
    hc = HeadConfig.from_dict(_hc(kv_head_max_distance=[[9000, -1]]))
    hc.validate_for_model(1, 2, 1)
    with pytest.raises(HeadConfigError, match=r"more than the model's 8192 positions"):
        hc.validate_for_model(1, 2, 1, max_positions=8192)
    with pytest.raises(RedKnotConfigError, match=r"recent_n"):
        SparseFFNConfig(mass_thresh=0.5, recent_n=10 ** 20)
    sf = SparseFFNConfig(mass_thresh=0.5, recent_n=9000)
    with pytest.raises(RedKnotConfigError, match=r"recent_n=9000 exceeds the model's 8192"):
        sf.validate_for_model(30, max_positions=8192)
    for bad in ({"chunk": 10 ** 20}, {"max_store_tokens": -1}, {"host_bytes": 1 << 70},
                {"client_store": "yes"}, {"max_marked_ranges": 2 ** 40}):
        with pytest.raises(RedKnotConfigError, match="reuse." + next(iter(bad))):
            ReuseConfig(**bad)


def test_unreadable_config_files_name_themselves(tmp_path: Path) -> None:
    junk = tmp_path / "head.json"
    junk.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(512)))
    with pytest.raises(HeadConfigError, match=r"head\.json is not a JSON text file"):
        HeadConfig.from_json(junk)
    with pytest.raises(RedKnotConfigError, match=r"head\.json is not a JSON text file"):
        SparseFFNConfig.from_json(junk)


# ---------------------------------------------------------------------------- store files
def _segment(start: int = 0, n: int = 80) -> Segment:
    key = SegmentKey("m", "h", "t", False, tuple(range(start, start + n)), "l")
    k = torch.randn(2, n, 2, 8)
    return Segment(key, k, torch.randn_like(k), torch.rand(n))


def _junk_store(root: Path) -> dict[str, Path]:
    """A store with one good segment and one bad file of every kind, all in its index."""
    good = _segment()
    SegmentStore(host_bytes=0, disk_dir=root).put(good, "disk")
    outside = root.parent / f"{root.name}-outside.safetensors"
    shutil.copy(kv_store.segment_file(root, good.key.digest()), outside)
    bad: dict[str, Path] = {}
    for i, kind in enumerate(["fifo", "symlink", "truncated", "empty", "pickle", "header"]):
        seg = _segment(start=1000 * (i + 1))
        path = kv_store.segment_file(root, seg.key.digest())
        path.parent.mkdir(exist_ok=True)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "symlink":
            path.symlink_to(outside)
        elif kind == "truncated":
            SegmentStore(host_bytes=0, disk_dir=root / "tmp").put(seg, "disk")
            data = kv_store.segment_file(root / "tmp", seg.key.digest()).read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "pickle":
            import pickle

            path.write_bytes(pickle.dumps({"k": [1, 2, 3]}))
        else:  # a header length of 2**62
            path.write_bytes((1 << 62).to_bytes(8, "little") + b"{}")
        bad[kind] = path
    shutil.rmtree(root / "tmp", ignore_errors=True)
    index = json.loads((root / "index.json").read_text())
    for path in bad.values():
        index["segments"][path.stem] = {"bytes": 1, "last_access": 0, "file": "x"}
    (root / "index.json").write_text(json.dumps(index))
    return bad


def _quarantined(bad: dict[str, Path]) -> None:
    for kind, path in bad.items():
        assert not os.path.lexists(path), kind
        assert os.path.lexists(path.with_name(path.name + ".corrupt")), kind


def test_catalog_quarantines_bad_files_without_blocking(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture):
    root = tmp_path / "store"
    bad = _junk_store(root)
    with alarm(20), caplog.at_level(logging.WARNING, logger="redknot_vllm"):
        cat = SegmentCatalog(_setup(root))
    assert len(cat.catalog) == 1 and cat.corrupt == len(bad)
    _quarantined(bad)
    for path in bad.values():
        assert str(path) in caplog.text


def test_store_quarantines_bad_files_without_blocking(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture):
    root = tmp_path / "store"
    bad = _junk_store(root)
    with alarm(20), caplog.at_level(logging.WARNING, logger="redknot_vllm"):
        store = SegmentStore(host_bytes=0, disk_dir=root)
        assert store.stats()["corrupt"] == 2  # the FIFO and the symlink out: at start
        for path in bad.values():
            assert store.get(path.stem) is None
    assert store.stats()["corrupt"] == len(bad)
    _quarantined(bad)
    assert store.stats()["disk"]["count"] == 1


def test_index_that_is_a_fifo_does_not_block(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    os.mkfifo(root / "index.json")
    with alarm(20):
        SegmentCatalog(_setup(root))
        SegmentStore(host_bytes=0, disk_dir=root)
    assert (root / "index.json.corrupt").exists() and (root / "index.json").is_file()


def forge(src: Path, dst: Path) -> None:
    """A self-consistent segment file with random K/V whose checksum is computed the way the
    store computes it, but without this installation's key."""
    with safe_open(str(src), framework="pt") as f:
        md = dict(f.metadata())
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    tensors["k"], tensors["v"] = torch.randn_like(tensors["k"]), torch.randn_like(tensors["v"])
    md["mac"] = kv_store._mac(os.urandom(32), md["digest"], tensors, md["meta"])
    save_file(tensors, str(dst), metadata=md)


def test_forged_segment_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seg = _segment()
    SegmentStore(host_bytes=0, disk_dir=tmp_path).put(seg, "disk")
    path = kv_store.segment_file(tmp_path, seg.key.digest())
    forge(path, path)
    store = SegmentStore(host_bytes=0, disk_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="redknot_vllm"):
        assert store.get(seg.key) is None
    assert "keyed checksum mismatch" in caplog.text and store.stats()["corrupt"] == 1


def test_segment_key_is_private_and_outside_the_store(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "cfg" / "segment-key"
    key = kv_store.installation_key(key_file)
    assert len(key) == 32 and kv_store.installation_key(key_file) == key
    assert key_file.stat().st_mode & 0o077 == 0 and key_file.parent.stat().st_mode & 0o077 == 0
    monkeypatch.setenv("VLLM_REDKNOT_SEGMENT_KEY", str(tmp_path / "store" / "key"))
    with pytest.raises(ValueError, match="inside the store"):
        SegmentStore(disk_dir=tmp_path / "store")


def test_store_dir_errors_name_the_option(tmp_path: Path) -> None:
    from redknot_vllm.reuse.keys import check_store_dir

    (tmp_path / "file").write_text("x")
    with pytest.raises(RedKnotConfigError, match=r"reuse\.store_dir .* is not a folder"):
        check_store_dir(tmp_path / "file")
    with pytest.raises(RedKnotConfigError, match=r"reuse\.store_dir .* cannot be created"):
        check_store_dir(tmp_path / "file" / "sub")


def test_docs_are_checked_before_any_engine(tmp_path: Path) -> None:
    from redknot_vllm.reuse.precompute import check_docs, read_docs

    bad = tmp_path / "docs.jsonl"
    for text, message in [('{"token_ids": [1, "2"]}', "line 1"),
                          ('{"token_ids": [1, 99999]}', "vocabulary size 1000"),
                          ("not json", "line 1 is not JSON"), ('{"x": 1}', "line 1: needs")]:
        bad.write_text(text + "\n")
        with pytest.raises(RedKnotConfigError, match=message):
            read_docs(bad, vocab_size=1000)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RedKnotConfigError, match="not UTF-8"):
        read_docs(binary)
    with pytest.raises(RedKnotConfigError, match=r"fewer than reuse\.min_tokens"):
        check_docs([[1] * 10], ReuseConfig(), 1000)


# ------------------------------------------------------------------- on a live engine
@pytest.fixture(scope="session")
def hardened_llm(smollm2: str, stored: dict[str, Any],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A server-like engine (requests may not store) whose store holds a real segment (the
    red document), a forged one (the blue document) and a bad file of every kind."""
    from redknot_vllm import HeadConfig, engine_args
    from redknot_vllm.config import RedKnotConfig

    src = RedKnotConfig.from_additional_config(
        stored["llm"].llm_engine.vllm_config.additional_config).reuse.store_dir
    root = tmp_path_factory.mktemp("hardened")
    junk = tmp_path_factory.mktemp("junk") / "store"
    bad = _junk_store(junk)
    for d in ("red", "blue"):
        digest = stored["digests"][d]
        dst = kv_store.segment_file(root, digest)
        dst.parent.mkdir(exist_ok=True)
        if d == "red":
            shutil.copy(kv_store.segment_file(src, digest), dst)
        else:
            forge(kv_store.segment_file(src, digest), dst)
    for path in bad.values():  # the junk goes into the served store too
        dst = root / path.relative_to(junk)
        dst.parent.mkdir(exist_ok=True)
        os.replace(path, dst)
    llm_junk = {k: root / p.relative_to(junk) for k, p in bad.items()}
    hc = HeadConfig.shape(30, 3, 1.0, window=64)
    with alarm(300):
        gen = _engine(**engine_args(smollm2, head_config=hc,
                                    reuse={"store_dir": str(root), "chunk": 16}, **COMMON))
        llm = next(gen)
    llm.redknot_junk = llm_junk
    llm.redknot_root = root
    yield llm
    with contextlib.suppress(StopIteration):
        next(gen)


def _answer(llm: Any, prompt: list[int], kv: Any = None, salt: str = "") -> tuple[str, Any]:
    from vllm import SamplingParams

    from redknot_vllm import request_stats

    extra = {} if kv is None else {"kv_transfer_params": kv}
    sp = SamplingParams(max_tokens=6, temperature=0.0, extra_args=extra)
    out = llm.generate([{"prompt_token_ids": prompt, "cache_salt": salt or None}], sp,
                       use_tqdm=False)[0]
    return out.outputs[0].text, request_stats(llm, [out.request_id]).get(out.request_id, {})


def test_engine_survives_every_hostile_request(hardened_llm: Any, stored: dict[str, Any]):
    from tests.test_reuse import PREFACE, QUESTION, _ids

    tok, ids = stored["tok"], stored["ids"]
    prompt = _ids(tok, PREFACE) + ids["red"] + _ids(tok, QUESTION.format(name="red"))
    dense, _ = _answer(hardened_llm, prompt, {"redknot": {"reuse": "off"}}, salt="off")
    assert "90357" in dense
    cases = [kv for kv, _ in HOSTILE] + _generated(24, seed=1)
    cases.append({"redknot": {"probe": {"digest": stored["digests"]["red"],
                                        "offset": 100000}}})
    for i, kv in enumerate(cases):
        if not isinstance(kv, dict):
            # vLLM's own front end reads kv_transfer_params as a dict and refuses the request
            # before it reaches the engine (the OpenAI server's schema answers 400)
            with pytest.raises(AttributeError):
                _answer(hardened_llm, prompt, kv, salt=f"h{i}")
            continue
        text, st = _answer(hardened_llm, prompt, kv, salt=f"h{i}")
        assert text == dense, (kv, text)
        assert st.get("reused_tokens", 0) == 0, kv
    # still serving, and reusing the good segment
    text, st = _answer(hardened_llm, prompt, salt="after")
    assert "90357" in text and st["reused_tokens"] > len(ids["red"]) // 2


def test_forged_and_junk_segments_are_never_served(hardened_llm: Any, stored: dict[str, Any]):
    from tests.test_reuse import PREFACE, QUESTION, _ids

    tok, ids = stored["tok"], stored["ids"]
    prompt = _ids(tok, PREFACE * 2) + ids["blue"] + _ids(tok, QUESTION.format(name="blue"))
    dense, _ = _answer(hardened_llm, prompt, {"redknot": {"reuse": "off"}}, salt="off-blue")
    text, st = _answer(hardened_llm, prompt, salt="forged")
    assert text == dense and st["reused_tokens"] == 0
    stats = hardened_llm.collective_rpc("redknot_reuse_stats")[0]
    assert stats["corrupt"] >= 3  # the FIFO and the symlink at start, the forged one on use
    # the store quarantined the FIFO and the symlink out at start, the scheduler's catalog
    # the files whose headers it could not read, the store the forged one when it was used
    _quarantined(hardened_llm.redknot_junk)
    forged = kv_store.segment_file(hardened_llm.redknot_root, stored["digests"]["blue"])
    assert forged.with_name(forged.name + ".corrupt").exists()


def test_requests_cannot_store_without_the_opt_in(hardened_llm: Any, stored: dict[str, Any]):
    from redknot_vllm.reuse import precompute

    tok = stored["tok"]
    doc = tok("A document a client wants stored. " * 30, add_special_tokens=False)["input_ids"]
    before = hardened_llm.collective_rpc("redknot_reuse_stats")[0]["disk"]["count"]
    _answer(hardened_llm, doc, {"redknot": {"store": True}}, salt="store")
    assert hardened_llm.collective_rpc("redknot_reuse_stats")[0]["disk"]["count"] == before
    with pytest.raises(RedKnotConfigError, match="client_store"):
        precompute(hardened_llm, [doc], progress=False)


def test_cli_config_errors_are_one_line(tmp_path: Path) -> None:
    from redknot_vllm.cli import main

    with pytest.raises(SystemExit, match=r"^redknot serve: --reuse is not JSON"):
        main(["serve", str(tmp_path), "--reuse", "{oops"])
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"token_ids": [1, -4]}\n')
    with pytest.raises(SystemExit, match=r"^redknot precompute: --docs .* line 1"):
        main(["precompute", "--model", str(tmp_path), "--docs", str(docs),
              "--head-config", str(tmp_path / "h.json")])
    with pytest.raises(RedKnotConfigError):  # --debug keeps the exception
        main(["--debug", "serve", str(tmp_path), "--reuse", "{oops"])
    with pytest.raises(SystemExit, match=r"^redknot serve: --store-context is a reuse option"):
        main(["serve", str(tmp_path), "--store-context", str(docs)])
    with pytest.raises(SystemExit, match=r"^redknot serve: --store-context .*missing.* cannot"):
        main(["serve", str(tmp_path), "--reuse", "on", "--store-context",
              str(tmp_path / "missing.txt")])
    with pytest.raises(SystemExit, match=r"^redknot precompute: --store-context .*missing"):
        main(["precompute", "--model", str(tmp_path), "--docs", str(docs), "--head-config",
              str(tmp_path / "h.json"), "--store-context", str(tmp_path / "missing.txt")])
