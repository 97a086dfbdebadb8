"""Serving benchmark: N concurrent streaming clients against deskpod and llama.cpp's llama-server.

One command, run from deskpod's venv:

    python benchmarks/serve.py                                   # deskpod vs llama-server at 1, 8, 32 streams
    python benchmarks/serve.py --engines llama-server --clients 1,8
    python benchmarks/serve.py --engines deskpod,llama-server,llama-cpp-python --requests 32
    python benchmarks/serve.py --soak 120                        # 32 streams on deskpod for 2 minutes

Every engine serves the same GGUF (deskpod's store copy of --model, or --gguf) on 127.0.0.1 with the
same number of CPU threads, and is started fresh for each concurrency level (no prefix cache carried
over from an earlier level). Each level replays the first N requests of one fixed, seeded workload
(N = max(--requests, 4 x clients)): chat prompts in ChatML built from a fixed list of system prompts,
questions and passages (about 16-400 prompt tokens, log-uniform) with a fixed `max_tokens` each (16-256,
log-uniform) and `ignore_eos`, so every engine generates exactly the same number of tokens. Requests
go to `/v1/completions` with `stream: true` (OpenAI SSE: `data: {...}` chunks, then `data: [DONE]`);
the clients are one asyncio loop with httpx, each client sending its next request as soon as the
previous one has finished.

Per request: time to first token (TTFT, request sent -> first chunk with text) and inter-token
latencies (ITL, gaps between successive text chunks). Per run: aggregate output tokens/s (all
completion tokens / wall time from the first request sent to the last one finished), TTFT and ITL
p50/p99, failed requests (HTTP error, broken stream, or fewer tokens than max_tokens). Then one table
per concurrency level with the ratios deskpod / llama-server.

--soak SECONDS: only deskpod, 32 streams cycling the workload for that long; reports failures, the
server's resident memory (VmRSS from /proc/PID/status) before, during and after the load, and the
KV-cache metrics from /metrics once the load has ended (the pool should be back to empty).

Everything talks to 127.0.0.1 only, every loop is bounded, and every server started here is stopped
when the run ends (also on Ctrl-C or an error).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "peers"))

from llama_server import (
    LlamaServer,
    LlamaServerError,
    find_binary,
    free_port,
    peers_venv,
    stop_process,
    wait_healthy,
)

ENGINES = ("deskpod", "llama-server", "llama-cpp-python")
DEFAULT_ENGINES = ("deskpod", "llama-server")

# ---------------------------------------------------------------------------------------------
# The workload: fixed text, seeded choices.

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise technical assistant. Answer in plain language and keep answers short.",
    "You are a friendly tutor who explains ideas step by step with small examples.",
    ("You are an assistant that helps people write clear emails and documents. Keep a polite, "
     "professional tone and avoid jargon."),
)

QUESTIONS = (
    "What is the difference between a process and a thread?",
    "Give me three ideas for a vegetarian dinner that takes under thirty minutes.",
    "Explain what a hash table is to someone who has never programmed.",
    "How do I politely decline a meeting invitation from my manager?",
    "Why is the sky blue?",
    "Write a short poem about the sea at night.",
    "What are the main causes of inflation?",
    "How does a refrigerator keep food cold?",
    "Suggest a name for a small bakery that sells bread and coffee.",
    "What should I pack for a three-day hiking trip in the mountains?",
    "Explain recursion with a simple example in Python.",
    "What is the capital of Australia, and why is it not Sydney?",
    "How can I improve my sleep?",
    "Summarise the plot of Romeo and Juliet in a few sentences.",
    "What is the difference between weather and climate?",
    "Translate 'Where is the train station?' into French and Spanish.",
)

TASKS_WITH_TEXT = (
    "Summarise the following text in three bullet points.",
    "Read the notes below and list the action items.",
    "Rewrite the following paragraph so that it is easier to read.",
    "Answer the question at the end using only the text below.",
    "Find the main argument of this passage and say whether you agree.",
)

PASSAGE_SENTENCES = (
    "The city council met on Tuesday to discuss the new budget for public transport.",
    "Several members argued that the bus network should be extended to the northern suburbs.",
    "Others pointed out that the maintenance of existing lines was already behind schedule.",
    "The report estimated that ridership had grown by twelve percent over the last two years.",
    "A local bakery started opening earlier to serve commuters waiting at the new station.",
    "Engineers proposed replacing the oldest trains with lighter models that use less energy.",
    "The proposal would cost more at first but save money on electricity within a decade.",
    "Residents asked for more frequent service in the evenings and on weekends.",
    "The mayor promised to publish the full figures before the next public meeting.",
    "Meanwhile the library announced a series of free workshops on personal finance.",
    "Students from the technical college presented a prototype of a solar-powered bus shelter.",
    "Rain delayed the construction of the bridge by three weeks in the spring.",
    "The contractor said that the work would still finish before the end of the year.",
    "A survey of shop owners found that most supported closing the main street to cars on Sundays.",
    "Cyclists welcomed the plan, while some delivery companies raised concerns about access.",
    "The committee will vote on the final budget at the end of next month.",
    "Our team shipped the new search feature last week, and early feedback has been positive.",
    "The main complaint so far is that results load slowly on older phones.",
    "Maria will investigate caching the most common queries before the next release.",
    "John agreed to write the documentation and to update the onboarding guide.",
    "We still need a decision on whether to support offline mode in the first version.",
    "The design review is scheduled for Thursday afternoon in the large meeting room.",
    "Please send any comments on the draft specification before Wednesday evening.",
    "The budget for cloud hosting is almost used up, so we should review our usage.",
)

TOKENS_PER_WORD = 1.2  # English text in SmolLM2's GPT-2-style BPE, roughly; the real counts are reported


@dataclass(frozen=True)
class WorkItem:
    index: int
    prompt: str
    max_tokens: int
    target_prompt_tokens: int


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


def _chatml(system: str | None, user: str) -> str:
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def make_workload(count: int, seed: int = 0, prompt_range=(16, 400), output_range=(16, 256)) -> list[WorkItem]:
    """The first `count` requests of the seeded workload (a longer list starts with the same items)."""
    rng = random.Random(seed)
    items = []
    for index in range(count):
        target = _log_uniform(rng, *prompt_range)
        max_tokens = _log_uniform(rng, *output_range)
        system = rng.choice(SYSTEM_PROMPTS)
        overhead = 12 + len(system.split()) * TOKENS_PER_WORD  # chat markers and the system prompt
        if target < 32:
            system, user = None, rng.choice(QUESTIONS)  # a bare question: the shortest prompts
        elif target - overhead < 40:
            user = rng.choice(QUESTIONS)
        else:
            # a task over a passage, padded with sentences until the prompt reaches its target length
            words_wanted = (target - overhead) / TOKENS_PER_WORD
            task = rng.choice(TASKS_WITH_TEXT)
            sentences: list[str] = []
            words = len(task.split())
            start = rng.randrange(len(PASSAGE_SENTENCES))
            step = 0
            while words < words_wanted and step < 1000:
                sentence = PASSAGE_SENTENCES[(start + step) % len(PASSAGE_SENTENCES)]
                sentences.append(sentence)
                words += len(sentence.split())
                step += 1
            user = f"{task}\n\n" + " ".join(sentences)
            if task.startswith("Answer the question"):
                user += "\n\nQuestion: " + rng.choice(QUESTIONS)
        items.append(WorkItem(index, _chatml(system, user), max_tokens, target))
    return items


# ---------------------------------------------------------------------------------------------
# The clients.

@dataclass
class Result:
    index: int
    ok: bool = False
    error: str = ""
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    max_tokens: int = 0


async def stream_one(client, url: str, model: str, item: WorkItem, body_extra: dict[str, Any],
                     request_timeout: float) -> Result:
    """One streaming /v1/completions request; times every chunk that carries text."""
    result = Result(item.index, max_tokens=item.max_tokens)
    result.start = time.perf_counter()
    try:
        await asyncio.wait_for(_stream(client, url, model, item, body_extra, result), request_timeout)
    except asyncio.TimeoutError:
        result.error = f"timed out after {request_timeout:.0f} s"
    except Exception as error:  # noqa: BLE001 - a failed request is counted, the run goes on
        result.error = f"{type(error).__name__}: {error}"[:200]
    result.end = time.perf_counter()
    if not result.error and result.completion_tokens < item.max_tokens:
        result.error = f"short: {result.completion_tokens} of {item.max_tokens} tokens"
    result.ok = not result.error
    return result


async def _stream(client, url: str, model: str, item: WorkItem, body_extra: dict[str, Any], result: Result) -> None:
    body = {"model": model, "prompt": item.prompt, "max_tokens": item.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, **body_extra}
    chunks = 0
    usage_tokens = None
    last = None
    async with client.stream("POST", url, json=body) as reply:
        if reply.status_code != 200:
            text = (await reply.aread()).decode(errors="replace")
            result.error = f"HTTP {reply.status_code}: {text[:200]}"
            return
        done = False
        async for line in reply.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            now = time.perf_counter()
            event = json.loads(data)
            if "error" in event:
                result.error = f"stream error: {json.dumps(event['error'])[:200]}"
                return
            if any(choice.get("text") for choice in event.get("choices") or ()):
                if last is None:
                    result.ttft = now - result.start
                else:
                    result.itls.append(now - last)
                last = now
                chunks += 1
            usage = event.get("usage")
            if usage:
                usage_tokens = usage.get("completion_tokens", usage_tokens)
                result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
        if not done:
            result.error = "stream ended without [DONE]"
            return
    result.completion_tokens = usage_tokens if usage_tokens is not None else chunks


async def run_load(base_url: str, model: str, items: list[WorkItem], clients: int, *,
                   body_extra: dict[str, Any], request_timeout: float,
                   until: float | None = None) -> tuple[list[Result], float]:
    """`clients` workers take the next item until all are sent (or, with `until`, cycle until then)."""
    import httpx

    url = base_url + "/v1/completions"
    results: list[Result] = []
    next_index = 0

    def take() -> WorkItem | None:
        nonlocal next_index
        if until is None:
            if next_index >= len(items):
                return None
        elif time.perf_counter() >= until:
            return None
        item = items[next_index % len(items)]
        next_index += 1
        return item

    async def worker(client) -> None:
        while (item := take()) is not None:
            results.append(await stream_one(client, url, model, item, body_extra, request_timeout))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(connect=10.0, read=request_timeout, write=30.0, pool=request_timeout)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return results, wall


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(results: list[Result], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [gap for r in ok for gap in r.itls]
    span = (max(r.end for r in results) - min(r.start for r in results)) if results else wall
    tokens = sum(r.completion_tokens for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = re.sub(r"\d+", "N", r.error)[:80]
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": errors,
        "output_tokens": tokens,
        "prompt_tokens": sum(prompt_tokens) if prompt_tokens else None,
        "wall_s": span,
        "output_tok_s": tokens / span if span > 0 else 0.0,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(itls, 50),
        "itl_p99_s": percentile(itls, 99),
        "stream_tok_s_p50": percentile([(len(r.itls)) / sum(r.itls) for r in ok if r.itls and sum(r.itls) > 0], 50),
    }


# ---------------------------------------------------------------------------------------------
# The engines: each a context manager yielding (base_url, pid, model name for the request body).

def _log_file(name: str, keep_dir: Path | None) -> Path:
    if keep_dir is not None:
        keep_dir.mkdir(parents=True, exist_ok=True)
        return keep_dir / f"{name}.log"
    fd, path = tempfile.mkstemp(prefix=f"serve-bench-{name}-", suffix=".log")
    os.close(fd)
    return Path(path)


def _deskpod_serve_flags() -> str:
    done = subprocess.run([sys.executable, "-m", "deskpod.cli", "serve", "--help"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    return done.stdout


@contextlib.contextmanager
def deskpod_server(args, clients: int, log: Path) -> Iterator[tuple[str, int, str]]:
    port = free_port()
    command = [sys.executable, "-m", "deskpod.cli", "serve", args.model, "--host", "127.0.0.1", "--port", str(port)]
    flags = _deskpod_serve_flags()
    if "--threads" in flags:
        command += ["--threads", str(args.threads)]
    if "--max-num-seqs" in flags:
        command += ["--max-num-seqs", str(max(clients, 1))]
    command += args.deskpod_arg
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env.pop("DESKPOD_API_KEY", None)
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   env=env, cwd=REPO, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, args.startup_timeout, log)
        yield f"http://127.0.0.1:{port}", process.pid, args.model
    finally:
        stop_process(process)


@contextlib.contextmanager
def llama_server(args, clients: int, log: Path) -> Iterator[tuple[str, int, str]]:
    server = LlamaServer(args.gguf, parallel=clients, threads=args.threads, ctx_per_slot=args.ctx_per_slot,
                         log_path=log, startup_timeout=args.startup_timeout, extra_args=args.llama_server_arg)
    with server:
        yield server.base_url, server.pid, "smollm2"


@contextlib.contextmanager
def llama_cpp_python_server(args, clients: int, log: Path) -> Iterator[tuple[str, int, str]]:
    python = peers_venv() / "bin" / "python"
    if not python.is_file():
        raise LlamaServerError(f"{python} not found: run `bash benchmarks/setup_peers.sh`")
    port = free_port()
    command = [str(python), "-m", "llama_cpp.server", "--model", str(args.gguf), "--host", "127.0.0.1",
               "--port", str(port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
               "--n_ctx", str(args.ctx_per_slot), "--interrupt_requests", "False"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        # llama-cpp-python's server has no /health; /v1/models answers once the model is loaded
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if process.poll() is not None:
                raise LlamaServerError(f"llama_cpp.server exited with {process.returncode}; see {log}:\n"
                                       + log.read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise LlamaServerError(f"llama_cpp.server not up after {args.startup_timeout:.0f} s; see {log}")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}", process.pid, "smollm2"
    finally:
        stop_process(process)


def body_extra_for(engine: str, args) -> dict[str, Any]:
    extra: dict[str, Any] = {"temperature": args.temperature, "ignore_eos": True}
    if args.temperature > 0:
        extra["seed"] = args.seed
    if engine == "llama-cpp-python":
        # its server has no ignore_eos: forbid the end-of-generation tokens instead
        extra["logit_bias"] = {str(token): -100.0 for token in args.eog_ids}
    return extra


LAUNCHERS = {"deskpod": deskpod_server, "llama-server": llama_server, "llama-cpp-python": llama_cpp_python_server}


# ---------------------------------------------------------------------------------------------
# Reading the server process and /metrics.

def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def metrics_text(base_url: str) -> str:
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as reply:
        return reply.read().decode(errors="replace")


def kv_metrics(text: str) -> dict[str, float]:
    """Every sample whose metric name mentions the KV cache (usage ratio first)."""
    found = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        if "kv" in name.lower() or "preempt" in name.lower():
            try:
                found[name_part] = float(value)
            except ValueError:
                pass
    return dict(sorted(found.items(), key=lambda kv: ("usage" not in kv[0], kv[0])))


def eog_token_ids(gguf: Path) -> list[int]:
    """End-of-generation token ids named in the GGUF (for engines without ignore_eos)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return [0, 2]
    reader = GGUFReader(str(gguf))
    ids = set()
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        value = reader.fields.get(key)
        if value is not None:
            ids.add(int(value.parts[value.data[0]][0]))
    return sorted(ids) or [0, 2]


# ---------------------------------------------------------------------------------------------
# Output.

def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def print_table(clients: int, runs: dict[str, dict[str, Any]], items: list[WorkItem]) -> None:
    out_total = sum(item.max_tokens for item in items)
    prompts = {engine: run["prompt_tokens"] for engine, run in runs.items() if run.get("prompt_tokens")}
    print(f"\n== {clients} concurrent stream{'s' if clients != 1 else ''}: {len(items)} requests, "
          f"{out_total} output tokens; prompt tokens per engine: "
          + (", ".join(f"{e} {p}" for e, p in prompts.items()) or "-") + " ==")
    header = (f"{'engine':<26}{'out tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}"
              f"{'stream tok/s':>13}{'failed':>8}{'wall s':>8}")
    print(header + "\n" + "-" * len(header))
    for engine, run in runs.items():
        if "error" in run:
            print(f"{engine:<26}  could not run: {run['error'][:120]}")
            continue
        print(f"{engine:<26}{run['output_tok_s']:>10.1f}{_ms(run['ttft_p50_s']):>10}{_ms(run['ttft_p99_s']):>10}"
              f"{_ms(run['itl_p50_s']):>9}{_ms(run['itl_p99_s']):>9}"
              f"{(run['stream_tok_s_p50'] or 0):>13.1f}{run['failed']:>8}{run['wall_s']:>8.1f}")
        for error, count in run["errors"].items():
            print(f"{'':<26}  {count} x {error}")
    base = runs.get("llama-server")
    if base and "error" not in base:
        for engine, run in runs.items():
            if engine == "llama-server" or "error" in run:
                continue
            print(f"{engine + '/llama-server':<26}{_ratio(run['output_tok_s'], base['output_tok_s']):>10}"
                  f"{_ratio(run['ttft_p50_s'], base['ttft_p50_s']):>10}{_ratio(run['ttft_p99_s'], base['ttft_p99_s']):>10}"
                  f"{_ratio(run['itl_p50_s'], base['itl_p50_s']):>9}{_ratio(run['itl_p99_s'], base['itl_p99_s']):>9}"
                  f"{_ratio(run['stream_tok_s_p50'], base['stream_tok_s_p50']):>13}")
    print("(times in ms; out tok/s: all streams together; stream tok/s: median per-stream decode rate;"
          " ratios: throughput higher is better, latency lower is better)")


# ---------------------------------------------------------------------------------------------

def resolve_gguf(args) -> Path:
    if args.gguf:
        return Path(args.gguf)
    from deskpod.store import Store

    store = Store()
    return Path(store.model_file(store.ensure(args.model, progress=sys.stderr.isatty())))


async def warm_up(base_url: str, model: str, body_extra: dict[str, Any], timeout: float) -> None:
    item = make_workload(1, seed=12345, prompt_range=(16, 17), output_range=(8, 9))[0]
    results, _ = await run_load(base_url, model, [item, item], 1, body_extra=body_extra, request_timeout=timeout)
    bad = [r.error for r in results if not r.ok]
    if bad:
        raise LlamaServerError(f"warm-up request failed: {bad[0]}")


def bench(args) -> dict[str, Any]:
    report: dict[str, Any] = {"gguf": str(args.gguf), "threads": args.threads, "seed": args.seed,
                              "temperature": args.temperature, "levels": {}}
    if "llama-server" in args.engines:
        report["llama_server_binary"] = str(find_binary())
        report["llama_server_version"] = LlamaServer(args.gguf).version()
    print(f"model {args.gguf}\nthreads {args.threads}, seed {args.seed}, temperature {args.temperature}, "
          f"engines {', '.join(args.engines)}"
          + (f"\nllama-server {report['llama_server_binary']}: {report['llama_server_version']}, "
             f"{args.ctx_per_slot} context per slot" if "llama_server_binary" in report else ""))
    for clients in args.clients:
        items = make_workload(max(args.requests, 4 * clients), seed=args.seed)
        runs: dict[str, dict[str, Any]] = {}
        for engine in args.engines:
            log = _log_file(f"{engine}-c{clients}", args.log_dir)
            print(f"[serve] {engine}: {clients} stream(s), {len(items)} requests (log {log})", file=sys.stderr, flush=True)
            extra = body_extra_for(engine, args)
            try:
                with LAUNCHERS[engine](args, clients, log) as (base_url, pid, model):
                    asyncio.run(warm_up(base_url, model, extra, args.request_timeout))
                    results, wall = asyncio.run(run_load(base_url, model, items, clients, body_extra=extra,
                                                         request_timeout=args.request_timeout))
                    runs[engine] = summarize(results, wall)
                    runs[engine]["rss_kib_after"] = rss_kib(pid)
            except (LlamaServerError, OSError, subprocess.SubprocessError) as error:
                runs[engine] = {"error": str(error)}
                print(f"[serve] {engine} failed: {error}", file=sys.stderr, flush=True)
        print_table(clients, runs, items)
        report["levels"][str(clients)] = runs
    return report


def soak(args) -> dict[str, Any]:
    clients = args.soak_clients
    items = make_workload(max(args.requests, 4 * clients), seed=args.seed)
    log = _log_file(f"deskpod-soak-c{clients}", args.log_dir)
    extra = body_extra_for("deskpod", args)
    print(f"[serve] soak: deskpod, {clients} streams for {args.soak:.0f} s (log {log})", file=sys.stderr, flush=True)
    with deskpod_server(args, clients, log) as (base_url, pid, model):
        asyncio.run(warm_up(base_url, model, extra, args.request_timeout))
        # one wave at full concurrency first, so "before" already holds what any 32-stream load allocates
        warm, _ = asyncio.run(run_load(base_url, model, items[:clients], clients, body_extra=extra,
                                       request_timeout=args.request_timeout))
        warm_failed = sum(not r.ok for r in warm)
        time.sleep(args.settle)
        rss_before = rss_kib(pid)
        kv_before = kv_metrics(metrics_text(base_url))
        samples: list[tuple[float, int | None]] = []

        async def sampled_load():
            stop = asyncio.Event()

            async def sampler():
                t0 = time.perf_counter()
                while not stop.is_set():
                    samples.append((time.perf_counter() - t0, rss_kib(pid)))
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=5.0)

            task = asyncio.create_task(sampler())
            try:
                return await run_load(base_url, model, items, clients, body_extra=extra,
                                      request_timeout=args.request_timeout, until=time.perf_counter() + args.soak)
            finally:
                stop.set()
                await task

        results, wall = asyncio.run(sampled_load())
        time.sleep(args.settle)
        rss_after = rss_kib(pid)
        kv_after = kv_metrics(metrics_text(base_url))
    summary = summarize(results, wall)
    during = [kib for _, kib in samples if kib is not None]
    summary["failed"] += warm_failed
    summary["warm_up_failed"] = warm_failed
    report = {"clients": clients, "seconds": args.soak, **summary, "rss_kib_before": rss_before,
              "rss_kib_after": rss_after, "rss_kib_max_during": max(during) if during else None,
              "rss_kib_samples": samples, "kv_metrics_before": kv_before, "kv_metrics_after": kv_after}

    def mib(kib):
        return "-" if kib is None else f"{kib / 1024:.1f} MiB"

    print(f"\n== soak: deskpod, {clients} streams, {args.soak:.0f} s ==")
    print(f"requests {summary['requests']} (+{clients} warm-up at full load, {warm_failed} failed), "
          f"failed {summary['failed']}, output {summary['output_tokens']} tokens, "
          f"{summary['output_tok_s']:.1f} tok/s, TTFT p50/p99 {_ms(summary['ttft_p50_s'])}/{_ms(summary['ttft_p99_s'])} ms, "
          f"ITL p50/p99 {_ms(summary['itl_p50_s'])}/{_ms(summary['itl_p99_s'])} ms")
    for error, count in summary["errors"].items():
        print(f"  {count} x {error}")
    quarter = [samples[min(len(samples) - 1, int(len(samples) * q))][1] for q in (0.25, 0.5, 0.75)] if samples else []
    print(f"RSS before load {mib(rss_before)}, during (25/50/75 %) {' / '.join(mib(k) for k in quarter)}, "
          f"max {mib(report['rss_kib_max_during'])}, after load (+{args.settle:.0f} s) {mib(rss_after)}")
    if rss_after is not None and rss_before is not None:
        growth = rss_after - rss_before
        report["rss_kib_growth"] = growth
        steady = f", since the 25 % mark {mib(rss_after - quarter[0])}" if quarter and quarter[0] else ""
        print(f"RSS growth over the load {'+' if growth >= 0 else ''}{mib(growth)}{steady}")
    if kv_after:
        print("KV cache after the load:")
        for name, value in kv_after.items():
            print(f"  {name} {value:g}   (before the load: {kv_before.get(name, float('nan')):g})")
    else:
        print("KV cache after the load: /metrics exposes no metric with 'kv' in its name")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                   help=f"comma-separated, from {', '.join(ENGINES)} (default: %(default)s)")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels (default: %(default)s)")
    p.add_argument("--requests", type=int, default=64,
                   help="requests per level; a level replays max(this, 4 x clients) (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads per engine (default: all cores, %(default)s)")
    p.add_argument("--model", default="smollm2", help="deskpod store model (default: %(default)s)")
    p.add_argument("--gguf", default=None, help="the GGUF file (default: the store's copy of --model)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: greedy)")
    p.add_argument("--ctx-per-slot", type=int, default=1024, help="llama-server context per slot (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds for a server to become healthy")
    p.add_argument("--soak", type=float, default=None, metavar="SECONDS", help="soak deskpod instead of comparing")
    p.add_argument("--soak-clients", type=int, default=32, help="streams in --soak (default: %(default)s)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds after a soak before reading RSS and /metrics")
    p.add_argument("--deskpod-arg", action="append", default=[], help="extra argument for `deskpod serve` (repeatable)")
    p.add_argument("--llama-server-arg", action="append", default=[], help="extra argument for llama-server (repeatable)")
    p.add_argument("--log-dir", type=Path, default=None, help="keep the servers' logs here (default: temp files)")
    p.add_argument("--json", type=Path, default=None, help="also write the full report here")
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown:
        p.error(f"unknown engine(s) {unknown}; choose from {ENGINES}")
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if not args.clients or min(args.clients) < 1:
        p.error("--clients needs positive integers")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import httpx  # noqa: F401
    except ImportError:
        print("serve.py needs httpx in this venv: pip install -e '.[test]' (or pip install httpx)", file=sys.stderr)
        return 2
    args.gguf = resolve_gguf(args)
    args.eog_ids = eog_token_ids(args.gguf) if "llama-cpp-python" in args.engines else []
    report = soak(args) if args.soak else bench(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    if args.soak:
        return 0 if report["failed"] == 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
