"""`redknot serve`: a real OpenAI-compatible server on loopback, a real HTTP client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "redknot_vllm.cli", "serve", "smollm2",
           "--head-config", str(ROOT / "head_class/smollm2-135m-instruct.shape80.json"),
           "--sparse-ffn", str(ROOT / "head_class/smollm2-135m-instruct.sparse_ffn.json"),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "smollm2",
           "--enforce-eager", "--dtype", "float32", "--max-model-len", "4096",
           "--kv-cache-memory-bytes", str(512 << 20),
           "--reuse", json.dumps({"store_dir": str(tmp_path_factory.mktemp("segments")),
                                  "chunk": 16, "client_store": True})]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        import httpx

        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1", log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_chat_completion_over_http(server):
    from openai import OpenAI

    base_url, log = server
    client = OpenAI(base_url=base_url, api_key="unused")
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    text = reply.choices[0].message.content
    assert text and text.strip()
    assert reply.usage.prompt_tokens > 10
    deadline = time.monotonic() + 10
    while "RedKnot request" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    out = log.read_text()
    assert "RedKnot on for RedKnotLlamaForCausalLM" in out
    assert "RedKnot request" in out and "prefill FLOPs saved" in out


def test_reuse_over_http(server, smollm2):
    """A document stored through the API is found in a later prompt and spliced."""
    import re

    from openai import OpenAI
    from transformers import AutoTokenizer

    from tests.conftest import FILLER

    base_url, log = server
    client = OpenAI(base_url=base_url, api_key="unused")
    tok = AutoTokenizer.from_pretrained(smollm2)
    doc = tok("The secret code of the blue vault is 48213. " + FILLER * 8,
              add_special_tokens=False)["input_ids"]
    q = tok("\nWhat is the secret code of the blue vault? The code is",
            add_special_tokens=False)["input_ids"]
    client.completions.create(model="smollm2", prompt=doc, max_tokens=1, temperature=0,
                              extra_body={"kv_transfer_params": {"redknot": {"store": True}}})
    pre = tok("A short preface. " * 4, add_special_tokens=False)["input_ids"]
    reply = client.completions.create(model="smollm2", prompt=pre + doc + q, max_tokens=6,
                                      temperature=0)
    assert "48213" in reply.choices[0].text
    deadline = time.monotonic() + 10
    n = len(pre + doc + q)
    pattern = re.compile(rf"RedKnot request \S+: {n} prompt tokens \((\d+) computed, (\d+) "
                         r"reused\)")
    while not pattern.search(log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.5)
    m = pattern.search(log.read_text())
    assert m is not None, log.read_text()[-2000:]
    assert int(m.group(2)) > len(doc) // 2
