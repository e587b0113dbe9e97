"""Load on ``rsitr serve``: throughput and latency under concurrent clients, and memory over a soak.

Not a test: the measurement behind the serving figures of the docs. Alone on the machine:

1. **An index of ``--count`` tiles** (default 100,000) around real encodings, written by the
   generator of ``benchmarks/search.py`` (``real_encodings`` then ``generate_index``: a DOVE
   bundle's encodings of every dataset image, each generated tile one of them plus noise scaled
   to the crop-to-image cosine). Or an existing index (``--index DIR``: reused when DIR holds
   one, built there when it does not). The generated tiles' files do not exist (``/generated/…``),
   so only ``/api/search`` and ``/api/health`` are loaded; one thumbnail request at the end checks
   that a missing file is a JSON error, not a crash.
2. **The server** as users run it: ``python -m rsitr_cli serve INDEX --port <free port> --quiet``
   in a subprocess, with the environment as given (``OMP_NUM_THREADS`` as the caller left it),
   its output in ``OUT/server.log``; ready when ``/api/health`` answers.
3. **Concurrency sweep**: after ``--warmup`` sequential queries, for each N of ``--clients``, N
   clients (one asyncio loop, one ``httpx.AsyncClient`` pool of N connections, timeout 60 s) send
   ``GET /api/search?q=<caption>&k=20&rerank=100`` back to back for ``--seconds``. Captions: the
   ``--split`` captions of ``--dataset``, drawn per client with a seeded RNG. Per N: requests/s,
   p50 / p95 / p99 latency (request sent → whole response read, over successful requests), the
   server's own ``milliseconds`` (handler start → answer, lock wait included), and errors
   (non-200 answers or exceptions: must be 0).
4. **Soak**: ``--soak-clients`` clients for ``--soak-seconds``, the server's resident memory
   (``VmRSS`` of ``/proc/<pid>/status``) sampled every ``--rss-every`` seconds: at start (after the
   warm-up and the sweep), at end, the maximum, the growth from the first to the last minute (mean
   of the samples in each; windows of half the soak when it is shorter than two minutes) and the
   least-squares slope over all samples.
5. The server is stopped (terminate, wait); ``OUT/serve_load.json`` and ``OUT/serve_load.md`` are
   written. The exit status is 1 when any request failed.

The load generator runs on the same machine as the server and takes CPU from it: the report
states the CPU count. Per-request records are summarised, not stored.

Usage::

    python benchmarks/serve_load.py --model runs/models/dove-s-ucm-seed0 --dataset ../shared/data/ucm_captions \\
        [--count 100000] [--index DIR] [--clients 1,4,16,64] [--seconds 20] [--soak-clients 64] \\
        [--soak-seconds 180] [--out runs/serve-load]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np

from rsitr.data import load_dataset
from rsitr.errors import ConfigError
from rsitr.io import write_json, write_text
from rsitr_serve.server import free_port

HTTP_TIMEOUT_S = 60.0
STARTUP_TIMEOUT_S = 300.0
MAX_ERROR_SAMPLES = 5
INDEX_SETTINGS = "index.json"


# --------------------------------------------------------------------------- the index


def sibling(name: str) -> ModuleType:
    """A module of this folder (``benchmarks/<name>.py``), loaded by path: the benchmarks are not a package."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_index(target: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """Reuse the index in ``target``, or generate one there; returns what the generator measured (None when reused).

    The index is written beside ``target`` and renamed onto it when complete, so an interrupted
    build is never mistaken for an index by a later run.
    """
    if (target / INDEX_SETTINGS).is_file():
        print(f"reusing the index in {target} (--count ignored)", flush=True)
        return None
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{target}: exists and holds no index ({INDEX_SETTINGS} missing); give a new or empty folder")
    import torch

    from rsitr import load_model

    torch.set_num_threads(args.threads)
    million = sibling("search")
    bundle = load_model(args.model)
    real, cosines = million.real_encodings(bundle, load_dataset(args.dataset), args.crop_images, args.seed)
    print(f"real encodings: {real['global'].shape[0]} images; crop-to-image cosine {cosines}", flush=True)
    building = target.with_name(f"{target.name}.building")
    shutil.rmtree(building, ignore_errors=True)
    built = million.generate_index(building, bundle, args.model, real, cosines, args.count, args.seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(building, target)
    print(f"index written to {target}: {built}", flush=True)
    return {"count": args.count, "crop_cosines": cosines, **built}


def split_captions(dataset_path: str, split: str) -> list[str]:
    """Every caption of the images of ``split``, in dataset order."""
    dataset = load_dataset(dataset_path)
    return [dataset.captions[c] for i in dataset.split_indices(split) for c in dataset.captions_of(i)]


# --------------------------------------------------------------------------- the server


def resident_mib(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of process ``pid`` in MiB (Linux ``/proc``): ``VmRSS`` (resident set), or ``RssAnon``
    (its anonymous part: the heap, without the pages of memory-mapped files such as the index's shards)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise ConfigError(f"/proc/{pid}/status: no {field} line")


class ServerProcess:
    """``rsitr serve`` in a subprocess on a free port of localhost; its output goes to a log file."""

    def __init__(self, index_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "rsitr_cli", "serve", str(index_dir), "--port", str(self.port), "--quiet"]
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("w")
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Poll ``/api/health`` until it answers 200; returns its JSON. Fails when the server exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"{self.log_path}: the server exited with status {self.process.returncode} before answering"
                                  f" (last line: {self._last_log_line()})")
            try:
                response = httpx.get(f"{self.base_url}/api/health", timeout=5.0)
                if response.status_code == 200:
                    return response.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise ConfigError(f"{self.log_path}: the server did not answer /api/health within {timeout:.0f} s")

    def stop(self) -> int:
        """Terminate the server and wait for it (kill it after 30 s); returns its exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return int(self.process.returncode)

    def _last_log_line(self) -> str:
        self._log.flush()
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "none"


# --------------------------------------------------------------------------- the load


@dataclass
class SearchLoad:
    """What every client sends: ``GET /api/search`` with captions drawn from ``captions``."""

    captions: list[str]
    k: int
    rerank: int
    seed: int

    def params(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"q": self.captions[int(rng.integers(len(self.captions)))], "k": self.k, "rerank": self.rerank}


@dataclass
class Records:
    """Per request of one phase: latency, status (-1: an exception), and the server's own milliseconds."""

    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def add(self, latency: float, status: int, server_ms: float | None, error: str | None) -> None:
        self.latencies.append(latency)
        self.statuses.append(status)
        if server_ms is not None:
            self.server_ms.append(server_ms)
        if error is not None and len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(error)


async def one_search(client: httpx.AsyncClient, load: SearchLoad, rng: np.random.Generator, records: Records) -> None:
    """Send one search and record it; a non-200 answer or an exception is an error, never raised."""
    params = load.params(rng)
    started = time.perf_counter()
    try:
        response = await client.get("/api/search", params=params)
        latency = time.perf_counter() - started
    except httpx.HTTPError as exc:
        records.add(time.perf_counter() - started, -1, None, f"{exc.__class__.__name__}: {exc}")
        return
    if response.status_code != 200:
        records.add(latency, response.status_code, None, f"{response.status_code}: {response.text[:200]} (q={params['q']!r})")
        return
    try:
        answer = response.json()
        server_ms = float(answer["milliseconds"])
    except (ValueError, KeyError, TypeError) as exc:
        records.add(latency, -1, None, f"unreadable answer ({exc.__class__.__name__}): {response.text[:200]}")
        return
    records.add(latency, 200, server_ms, None)


async def client_loop(client: httpx.AsyncClient, load: SearchLoad, rng: np.random.Generator, deadline: float,
                      records: Records) -> None:
    """One client: searches back to back until ``deadline`` (the last one finishes after it)."""
    while time.perf_counter() < deadline:
        await one_search(client, load, rng, records)


async def sample_rss(pid: int, every: float, deadline: float, started: float, samples: list[tuple[float, float]],
                     anonymous: list[tuple[float, float]]) -> None:
    """Append (seconds since ``started``, MiB) of ``pid``'s RSS to ``samples`` and of its anonymous part to
    ``anonymous``, every ``every`` seconds until ``deadline``, and once at it."""
    while True:
        now = time.perf_counter() - started
        samples.append((now, resident_mib(pid)))
        anonymous.append((now, resident_mib(pid, "RssAnon")))
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        await asyncio.sleep(min(every, left))


async def run_phase(base_url: str, load: SearchLoad, clients: int, seconds: float, phase_seed: int,
                    rss_pid: int | None = None, rss_every: float = 2.0,
                    anonymous: list[tuple[float, float]] | None = None) -> tuple[Records, float, list[tuple[float, float]]]:
    """``clients`` concurrent clients for ``seconds``; returns the records, the wall time and any RSS samples
    (the anonymous memory's samples go to ``anonymous``)."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    records, samples = Records(), []
    anonymous = [] if anonymous is None else anonymous
    async with httpx.AsyncClient(base_url=base_url, timeout=HTTP_TIMEOUT_S, limits=limits) as client:
        started = time.perf_counter()
        deadline = started + seconds
        tasks = [client_loop(client, load, np.random.default_rng([load.seed, phase_seed, c]), deadline, records)
                 for c in range(clients)]
        if rss_pid is not None:
            tasks.append(sample_rss(rss_pid, rss_every, deadline, started, samples, anonymous))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return records, elapsed, samples


async def warm_up(base_url: str, load: SearchLoad, queries: int) -> Records:
    """``queries`` sequential searches: page in the shards and vector lists, warm the kernels."""
    records = Records()
    async with httpx.AsyncClient(base_url=base_url, timeout=HTTP_TIMEOUT_S) as client:
        rng = np.random.default_rng([load.seed, 999_999])
        for _ in range(queries):
            await one_search(client, load, rng, records)
    return records


def summarize(phase: str, records: Records, elapsed: float, clients: int) -> dict[str, Any]:
    """Throughput, latency percentiles (successful requests) and errors of one phase."""
    statuses = np.asarray(records.statuses)
    ok = statuses == 200
    latencies_ms = 1000 * np.asarray(records.latencies)[ok]

    def pct(values: np.ndarray, q: float) -> float | None:
        return float(np.percentile(values, q)) if values.size else None

    server = np.asarray(records.server_ms)
    return {"phase": phase, "clients": clients, "seconds": elapsed, "requests": int(statuses.size), "ok": int(ok.sum()),
            "errors": int((~ok).sum()), "requests_per_s": float(ok.sum() / elapsed) if elapsed > 0 else 0.0,
            "p50_ms": pct(latencies_ms, 50), "p95_ms": pct(latencies_ms, 95), "p99_ms": pct(latencies_ms, 99),
            "max_ms": pct(latencies_ms, 100), "server_p50_ms": pct(server, 50), "server_p99_ms": pct(server, 99),
            "error_samples": records.error_samples}


def rss_summary(samples: list[tuple[float, float]]) -> dict[str, Any]:
    """RSS at start, end and max; growth from the first to the last minute (means); least-squares slope per minute."""
    times = np.asarray([t for t, _ in samples])
    rss = np.asarray([m for _, m in samples])
    window = min(60.0, float(times[-1]) / 2)
    first = rss[times <= times[0] + window]
    last = rss[times >= times[-1] - window]
    slope = float(np.polyfit(times / 60, rss, 1)[0]) if len(samples) >= 2 and times[-1] > times[0] else 0.0
    return {"start_mib": float(rss[0]), "end_mib": float(rss[-1]), "max_mib": float(rss.max()),
            "window_seconds": window, "first_window_mean_mib": float(first.mean()), "last_window_mean_mib": float(last.mean()),
            "growth_mib": float(last.mean() - first.mean()), "slope_mib_per_min": slope, "samples": len(samples),
            "series": [[round(t, 2), round(m, 2)] for t, m in samples]}


def probe_thumbnail(base_url: str) -> dict[str, Any]:
    """A thumbnail of tile 1 (its file may not exist): the answer's status and kind, and whether the server lives after it."""
    response = httpx.get(f"{base_url}/api/tiles/1/thumbnail", timeout=HTTP_TIMEOUT_S)
    kind = response.headers.get("content-type", "")
    detail = None
    if kind.startswith("application/json"):
        detail = response.json().get("detail")
    alive = httpx.get(f"{base_url}/api/health", timeout=HTTP_TIMEOUT_S).status_code == 200
    return {"status": response.status_code, "content_type": kind, "detail": detail, "server_alive_after": alive,
            "ok": alive and (response.status_code == 200 or detail is not None)}


# --------------------------------------------------------------------------- the run


def machine() -> dict[str, Any]:
    """CPU count (and those this process may use) and CPU model, for the report."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    return {"cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "cpu_model": model}


def measure(server: ServerProcess, load: SearchLoad, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, the concurrency sweep and the soak against a ready server."""
    rss_ready = resident_mib(server.pid)
    warm = asyncio.run(warm_up(server.base_url, load, args.warmup))
    report: dict[str, Any] = {"rss_ready_mib": rss_ready, "rss_after_warmup_mib": resident_mib(server.pid),
                              "warmup": summarize("warm-up", warm, sum(warm.latencies), 1), "levels": []}
    for phase, clients in enumerate(args.clients, start=1):
        records, elapsed, _ = asyncio.run(run_phase(server.base_url, load, clients, args.seconds, phase))
        report["levels"].append(summarize(f"{clients} clients", records, elapsed, clients))
        print(table_row(report["levels"][-1]), flush=True)
    if args.soak_seconds > 0:
        print(SOAK_HEADER, flush=True)
        anonymous: list[tuple[float, float]] = []
        records, elapsed, samples = asyncio.run(run_phase(server.base_url, load, args.soak_clients, args.soak_seconds, 0,
                                                          rss_pid=server.pid, rss_every=args.rss_every, anonymous=anonymous))
        report["soak"] = {**summarize("soak", records, elapsed, args.soak_clients), "rss": rss_summary(samples),
                          "rss_anon": rss_summary(anonymous)}
        print(soak_row(report["soak"]), flush=True)
        anon = report["soak"]["rss_anon"]
        print(f"anonymous memory (RssAnon, without mapped files): {anon['start_mib']:.0f} -> {anon['end_mib']:.0f} MiB, "
              f"max {anon['max_mib']:.0f}, growth {anon['growth_mib']:+.1f}, slope {anon['slope_mib_per_min']:+.2f} MiB/min",
              flush=True)
    report["thumbnail_probe"] = probe_thumbnail(server.base_url)
    return report


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


LEVEL_HEADER = "| clients | requests | errors | requests/s | p50 ms | p95 ms | p99 ms | max ms | server p50 ms |"
SOAK_HEADER = ("| clients | seconds | requests | errors | requests/s | p99 ms | RSS start MiB | RSS end MiB | RSS max MiB "
               "| growth first → last window MiB | slope MiB/min |")


def table_row(level: dict[str, Any]) -> str:
    return (f"| {level['clients']} | {level['requests']:,} | {level['errors']} | {level['requests_per_s']:.1f} "
            f"| {_ms(level['p50_ms'])} | {_ms(level['p95_ms'])} | {_ms(level['p99_ms'])} | {_ms(level['max_ms'])} "
            f"| {_ms(level['server_p50_ms'])} |")


def soak_row(soak: dict[str, Any]) -> str:
    rss = soak["rss"]
    return (f"| {soak['clients']} | {soak['seconds']:.0f} | {soak['requests']:,} | {soak['errors']} "
            f"| {soak['requests_per_s']:.1f} | {_ms(soak['p99_ms'])} | {rss['start_mib']:.0f} | {rss['end_mib']:.0f} "
            f"| {rss['max_mib']:.0f} | {rss['growth_mib']:+.1f} ({rss['window_seconds']:.0f} s windows) "
            f"| {rss['slope_mib_per_min']:+.2f} |")


def render(result: dict[str, Any]) -> str:
    """The report as Markdown: the setting, the sweep table, the soak table, the errors."""
    m, health, setup = result["machine"], result["health"], result["setup"]
    index_origin = "generated by benchmarks/search.py's generator around real encodings" if result["built"] else "reused"
    lines = [
        "# `rsitr serve` under load", "",
        f"- machine: {m['cpu_count']} CPUs ({m['usable_cpus']} usable; {m['cpu_model']}), shared by the server and the "
        "load generator (one process, one asyncio loop, httpx)",
        f"- index: {health['tiles']:,} tiles in {health['files']:,} files at {setup['index']} ({index_origin}); "
        f"model {health['model']['name']} ({health['model']['architecture']}), first stage {health['first_stage'] or 'the model'}",
        f"- queries: `GET /api/search?q=<caption>&k={setup['k']}&rerank={setup['rerank']}`, each caption drawn with a seeded "
        f"RNG (seed {setup['seed']}) from the {setup['captions']:,} captions of split {setup['split']} of {setup['dataset']}",
        f"- server: `{setup['server_command']}`, OMP_NUM_THREADS={setup['server_omp_num_threads']}; "
        f"RSS {result['rss_ready_mib']:.0f} MiB when ready, {result['rss_after_warmup_mib']:.0f} MiB after "
        f"{setup['warmup']} sequential warm-up queries",
        f"- each level: N clients back to back for {setup['seconds']:g} s; latency from sending a request to reading its "
        "whole answer, over successful requests; server ms: the answer's own `milliseconds` (lock wait included); "
        "errors: non-200 answers or exceptions",
        "", "## Concurrency", "", LEVEL_HEADER, "|" + "---|" * (LEVEL_HEADER.count("|") - 1),
        *(table_row(level) for level in result["levels"]),
    ]
    if "soak" in result:
        lines += ["", "## Soak", "",
                  f"RSS of the server process (`VmRSS`) sampled every {setup['rss_every']:g} s; growth: mean of the samples of "
                  "the last window minus that of the first; slope: least squares over all samples.", "",
                  SOAK_HEADER, "|" + "---|" * (SOAK_HEADER.count("|") - 1), soak_row(result["soak"])]
        anon = result["soak"].get("rss_anon")
        if anon:
            lines += ["", f"Anonymous memory (`RssAnon`: the heap, without pages of memory-mapped files such as the shards): "
                          f"{anon['start_mib']:.0f} → {anon['end_mib']:.0f} MiB, max {anon['max_mib']:.0f}, growth "
                          f"{anon['growth_mib']:+.1f} MiB, slope {anon['slope_mib_per_min']:+.2f} MiB/min."]
    probe = result["thumbnail_probe"]
    lines += ["", f"Thumbnail of tile 1: {probe['status']} {probe['content_type']}"
              + (f" `{probe['detail']}`" if probe["detail"] else "")
              + f"; server alive after it: {'yes' if probe['server_alive_after'] else 'NO'}."]
    samples = [(phase["phase"], sample) for phase in _phases(result) for sample in phase["error_samples"]]
    lines += ["", f"Errors (warm-up, levels and soak): {result['errors']}" + ("" if not samples else "; first ones:")]
    lines += [f"- {name}: {sample}" for name, sample in samples]
    return "\n".join(lines) + "\n"


def _phases(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The summaries of every phase that sent searches: warm-up, each level, the soak."""
    return [result["warmup"], *result["levels"], *([result["soak"]] if "soak" in result else [])]


def _clients(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--clients {text!r}: give whole numbers separated by commas") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--clients {text!r}: give one or more counts of at least 1")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="DOVE model bundle the generated index is made with")
    parser.add_argument("--dataset", required=True, help="dataset whose images centre the index and whose captions are the queries")
    parser.add_argument("--split", default="val", help="split whose captions are the queries (default val)")
    parser.add_argument("--index", type=Path, help="index folder: reused when it holds one, generated there otherwise "
                        "(default OUT/index)")
    parser.add_argument("--count", type=int, default=100_000, help="tiles of a generated index")
    parser.add_argument("--crop-images", type=int, default=300, help="images whose crops calibrate the generator's noise")
    parser.add_argument("--clients", type=_clients, default=[1, 4, 16, 64], help="concurrency levels (default 1,4,16,64)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per concurrency level")
    parser.add_argument("--soak-clients", type=int, default=64)
    parser.add_argument("--soak-seconds", type=float, default=180.0, help="0: no soak")
    parser.add_argument("--rss-every", type=float, default=2.0, help="seconds between RSS samples in the soak")
    parser.add_argument("--warmup", type=int, default=20, help="sequential queries before the sweep")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--rerank", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of this process while it generates the index")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/serve-load"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    index_dir = args.index or args.out / "index"
    built = ensure_index(index_dir, args)
    captions = split_captions(args.dataset, args.split)
    load = SearchLoad(captions, args.k, args.rerank, args.seed)
    server = ServerProcess(index_dir, args.out / "server.log")
    try:
        health = server.wait_ready(STARTUP_TIMEOUT_S)
        print(f"server {server.base_url} ready: {health['tiles']:,} tiles; {os.cpu_count()} CPUs", flush=True)
        print(LEVEL_HEADER, flush=True)
        measured = measure(server, load, args)
    finally:
        exit_status = server.stop()
    setup = {"index": str(index_dir), "dataset": args.dataset, "split": args.split, "captions": len(captions),
             "k": args.k, "rerank": args.rerank, "seed": args.seed, "seconds": args.seconds, "warmup": args.warmup,
             "rss_every": args.rss_every, "server_command": " ".join(server.command),
             "server_omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"), "server_exit_status": exit_status}
    result = {"machine": machine(), "setup": setup, "health": health, "built": built, **measured}
    result["errors"] = sum(phase["errors"] for phase in _phases(result))
    write_json(args.out / "serve_load.json", result)
    report = render(result)
    write_text(args.out / "serve_load.md", report)
    print(report)
    return 1 if result["errors"] or not result["thumbnail_probe"]["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
