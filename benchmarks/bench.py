#!/usr/bin/env python3
"""Benchmark coda-backup against the fake Coda server configured like the real service.

Speed mode (default) builds a workspace (10 docs, 300 pages, 60 tables, 100 000 rows unless told
otherwise; pages with images and file links, and a table with image and attachments columns, on the
fake's asset host), gives the fake (both hosts) per-request latency, exports that finish after a
delay and Coda's published rate limits enforced with 429s, and runs the real CLI as a subprocess
three times:

1. default settings, 2. ``--concurrency 1`` (the serial baseline), 3. an ``--incremental``
rerun with no changes, 4. (resume) in a fresh folder, a run interrupted with SIGINT halfway through
its page exports, then the ``--incremental`` run that resumes it.

For each run it prints the wall time, requests by category, 429s, and the lower bound implied by
the rate limits and the export delay for the requests that run made, with the ratio wall/bound.

Shapes mode (``--mode shapes``) measures the default run on seven workspace shapes, each against
the fake counting Coda's limits as a sliding window and as a token bucket (Coda does not say
which), and prints wall / floor per shape: ``write-bound`` (many pages), ``read-bound`` (many
tables and rows, few pages), ``mixed`` (read and write floors within 10 % of each other),
``many-docs`` (a hundred small docs: per-doc overhead) and ``short`` (a floor of about 20 s,
where start-up and the tail count), and two for the general case: ``small-mixed`` (the issue's
example: a few dozen pages and tables of some hundred rows, reads and writes binding together)
and ``slow-api`` (400 ms a request). The floor counts the requests the run needs for what it
saves (extras included: every accepted API request, less status polls beyond one per export),
as early as the server's model lets them go (bucket: the published rate after a first full burst;
window: a whole window per N requests, as request k + N must come a window after request k), the
last export start followed by one export's render time. Only API-host requests count
(``fake.requests()`` is the API host): export downloads and asset fetches go to other hosts, which
Coda does not rate limit, so they add nothing to the floor. Each run gets
a fresh fake; ``--serial`` adds a ``--concurrency 1`` run per shape and model and prints
serial / default.

Memory mode measures the peak RSS of the CLI backing up one table of 200 000 rows and one of
20 000 rows (no latency, no rate limits: memory is what is measured).

Diff mode writes two snapshot folders of one table with 1 000 000 rows directly (valid manifests,
no backup through the fake), the second with 1 % of the rows changed (0.6 % edited, 0.2 % removed,
0.2 % added), and measures the wall time and peak RSS of ``--diff --json`` between them, checking
its counts against what was changed.

    python3 benchmarks/bench.py                      # speed, default workspace (several minutes)
    python3 benchmarks/bench.py --pages 60 --rows 20000 --docs 4 --tables 12   # a quicker look
    python3 benchmarks/bench.py --mode memory
    python3 benchmarks/bench.py --mode diff          # --diff of two 1 000 000-row snapshots (a minute or two)
    python3 benchmarks/bench.py --mode shapes        # seven shapes x two rate models (about 15 minutes)
    python3 benchmarks/bench.py --mode shapes --shape mixed --rate-model bucket
    python3 benchmarks/bench.py --mode shapes --shape read-bound --serial   # and --concurrency 1 for each model
    python3 benchmarks/bench.py --mode shapes --shape slow-api --rate-model window --repeat 8
    python3 benchmarks/bench.py --mode shapes --shape slow-api --rate-model bucket --shape-latency 0.8 \
        --extra=--concurrency --extra=8     # what 8 in flight does at 0.8 s a request
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import coda_backup  # noqa: E402
from fake_coda import FakeCoda, build_large_workspace  # noqa: E402

TOKEN = "bench-token"
CLI = str(ROOT / "coda_backup.py")


def category(method: str, path: str) -> str:
    if method != "GET":
        return "write"
    return "list_docs" if path == "/docs" else "read"


def lower_bound(counts: Dict[str, int], limits: Dict[str, Tuple[int, float]], export_delay: float,
                exports: int, model: str = "window") -> float:
    """Seconds the rate limits alone force on this many requests, counted as the server counts them.

    A token bucket (a burst of N, then N per W) lets the c-th request go at (c - N) * W / N. A
    sliding window (at most N in any W) is stricter: request k + N must come a whole W after
    request k, so the c-th goes at (c - 1) // N * W at the earliest, whichever way it is paced.
    The last export start is followed by at least one render; the last read or doc listing by
    nothing that needs counting (its answer's latency is left out: a floor, not an estimate).
    """
    bound = 0.0
    for name, (limit, window) in limits.items():
        count = counts.get(name, 0)
        if count == 0:
            continue
        if model == "bucket":
            earliest = max(0, count - limit) * window / limit
        else:
            earliest = (count - 1) // limit * window
        if name == "write" and exports:
            earliest += export_delay
        bound = max(bound, earliest)
    return bound


# Workspace shapes: build_large_workspace arguments plus the fake's latency and export render time.
# Sizes are chosen so each floor is 20-70 s and the kind of limit that binds is the one named.
SHAPES: Dict[str, Dict[str, float]] = {
    "write-bound": {"docs": 10, "pages": 120, "tables": 20, "rows": 20_000, "latency": 0.15, "export_delay": 2.0},
    "read-bound": {"docs": 3, "pages": 6, "tables": 150, "rows": 100_000, "latency": 0.1, "export_delay": 1.5},
    "mixed": {"docs": 6, "pages": 60, "tables": 120, "rows": 120_000, "latency": 0.1, "export_delay": 1.5},
    "many-docs": {"docs": 100, "pages": 100, "tables": 100, "rows": 10_000, "latency": 0.1, "export_delay": 1.5},
    "short": {"docs": 3, "pages": 40, "tables": 6, "rows": 3_000, "latency": 0.1, "export_delay": 1.5},
    # Two more, for the general case: the issue's own example of a small workspace where reads and
    # writes bind together (a few dozen pages and tables of some hundred rows), and a slow API.
    "small-mixed": {"docs": 4, "pages": 36, "tables": 36, "rows": 10_800, "latency": 0.1, "export_delay": 1.5},
    "slow-api": {"docs": 6, "pages": 60, "tables": 60, "rows": 30_000, "latency": 0.4, "export_delay": 3.0},
}
POLL_PATH = re.compile(r"/export/[^/]+$")


def needed_requests(fake: FakeCoda) -> Dict[str, int]:
    """Accepted API requests per limit category, with status polls beyond one per export left
    out: what any client must send to save this workspace."""
    counts: Dict[str, int] = collections.Counter()
    polls = 0
    for record in fake.requests():
        if record.status == 429:
            continue
        if record.method == "GET" and POLL_PATH.search(record.path):
            polls += 1
            continue
        counts[category(record.method, record.path)] += 1
    counts["read"] += min(polls, counts.get("write", 0))
    return dict(counts)


def shapes(args: argparse.Namespace) -> None:
    limits = dict(coda_backup.DEFAULT_RATE_LIMITS)
    names = [args.shape] if args.shape else list(SHAPES)
    models = ["window", "bucket"] if args.rate_model == "both" else [args.rate_model]
    runs: List[Tuple[str, List[str]]] = [("default", [])]
    if args.serial:
        runs.append(("serial", ["--concurrency", "1"]))
    print(f"limits {limits}; floor = the needed requests as the server's model allows them (bucket: the "
          f"published rate after one full burst; window: a full window per N), the last export start + one render; "
          f"load = the 1-minute load average when the run started")
    print(f"{'shape':<12} {'model':<7} {'run':<8} {'exit':>4} {'wall':>7} {'floor':>7} {'wall/floor':>10} "
          f"{'requests':>8} {'429s':>6} {'429 %':>6} {'load':>5}  needed by category")
    for name in names:
        shape = dict(SHAPES[name], **({"latency": args.shape_latency} if args.shape_latency is not None else {}))
        for model in models:
            for _ in range(args.repeat):
                walls: Dict[str, float] = {}
                for label, extra in runs:
                    walls[label] = shape_run(name, shape, model, label, [*extra, *args.extra], limits)
                if "serial" in walls:
                    print(f"{name:<12} {model:<7} serial / default wall: {walls['serial'] / walls['default']:.2f}x",
                          flush=True)


def shape_run(name: str, shape: Dict[str, float], model: str, label: str, extra: List[str],
              limits: Dict[str, Tuple[int, float]]) -> float:
    """One run of the CLI on a fresh fake of this shape; print its row and return its wall time."""
    fake = FakeCoda(token=TOKEN, seed=1)
    fake.start()
    try:
        build_large_workspace(fake, docs=int(shape["docs"]), pages=int(shape["pages"]),
                              tables=int(shape["tables"]), rows=int(shape["rows"]))
        fake.latency = shape["latency"]
        fake.export_delay = shape["export_delay"]
        fake.rate_limits = limits
        fake.rate_model = model
        out = Path(tempfile.mkdtemp(prefix=f"coda-bench-{name}-"))
        load = os.getloadavg()[0]
        code, wall, _ = run_cli(["--output", str(out), "--api-url", fake.api_url, "--quiet", *extra], cli_env())
        shutil.rmtree(out, ignore_errors=True)
        needed = needed_requests(fake)
        floor = lower_bound(needed, limits, shape["export_delay"], needed.get("write", 0), model)
        total = len(fake.requests())
        print(f"{name:<12} {model:<7} {label:<8} {code:>4} {wall:>6.1f}s {floor:>6.1f}s {wall / floor:>10.2f} "
              f"{total:>8} {fake.rate_limited:>6} {100.0 * fake.rate_limited / max(total, 1):>5.2f}% {load:>5.1f}  "
              f"{dict(sorted(needed.items()))}", flush=True)
        return wall
    finally:
        fake.stop()


def run_cli(args: List[str], env: Dict[str, str], stdout: Any = subprocess.DEVNULL) -> Tuple[int, float, int]:
    """Run the CLI; return exit code, wall seconds and peak RSS in KiB (from wait4)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, CLI, *args], env=env,
                            stdout=stdout, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    stderr_lines = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status >> 8
    wall = time.monotonic() - started
    if proc.returncode not in (0, 1):
        sys.stderr.write(stderr_lines.decode("utf-8", "replace")[-3000:])
    peak_kib = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss // 1024
    return proc.returncode, wall, peak_kib


def cli_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["CODA_API_TOKEN"] = TOKEN
    env.pop("CODA_API_URL", None)
    return env


def speed(args: argparse.Namespace) -> None:
    limits = dict(coda_backup.DEFAULT_RATE_LIMITS)
    fake = FakeCoda(token=TOKEN, seed=1)
    fake.start()
    try:
        built = build_large_workspace(fake, docs=args.docs, pages=args.pages, tables=args.tables, rows=args.rows,
                                      assets=True)
        fake.latency = args.latency
        fake.asset_latency = args.latency
        fake.export_delay = args.export_delay
        fake.rate_limits = limits
        print(f"workspace: {len(built['docs'])} docs, {len(built['pages'])} pages, {len(built['tables'])} tables, "
              f"{built['rows']:,} rows, {built['assets']} assets (+1 table with attachments); "
              f"latency {args.latency}s, export delay {args.export_delay}s, "
              f"limits {limits}")
        out = Path(tempfile.mkdtemp(prefix="coda-bench-"))
        runs = [("default", [])]
        if not args.skip_serial:
            runs.append(("serial --concurrency 1", ["--concurrency", "1"]))
        runs.append(("incremental, no change", ["--incremental"]))
        results = {}
        for label, extra in runs:
            fake.clear_log()
            code, wall, _ = run_cli(["--output", str(out), "--api-url", fake.api_url, "--quiet",
                                     "--asset-host", fake.assets_url, *extra], cli_env())
            counts = collections.Counter(category(r.method, r.path) for r in fake.requests())
            accepted = collections.Counter(category(r.method, r.path) for r in fake.requests() if r.status != 429)
            exports = accepted.get("write", 0)
            bound = lower_bound(accepted, limits, args.export_delay, exports, fake.rate_model)  # a 429 costs no slot
            total = sum(counts.values())
            results[label] = (wall, total)
            ratio = f"{wall / bound:.2f}" if bound > 0 else "n/a"
            print(f"\n[{label}] exit {code}, wall {wall:.1f}s, requests {total} {dict(sorted(counts.items()))}, "
                  f"downloads {len(fake.requests(host='download'))}, assets {len(fake.requests(host='assets'))}")
            print(f"    429s {fake.rate_limited} ({100.0 * fake.rate_limited / max(total, 1):.2f}% of requests), "
                  f"rate-limit bound {bound:.1f}s, wall/bound {ratio}")
        full_wall, full_requests = results["default"]
        if "serial --concurrency 1" in results:
            print(f"\nserial / default wall: {results['serial --concurrency 1'][0] / full_wall:.2f}x")
        inc_requests = results["incremental, no change"][1]
        print(f"incremental requests / full requests: {100.0 * inc_requests / max(full_requests, 1):.2f}%")
        resume(fake, full_wall, full_requests, cli_env())
    finally:
        fake.stop()


def resume(fake: FakeCoda, full_wall: float, full_requests: int, env: Dict[str, str]) -> None:
    """A fresh output: a full run interrupted (SIGINT) once half of its page exports were
    started, then an --incremental run, which should fetch only what the first one did not save."""
    out = Path(tempfile.mkdtemp(prefix="coda-bench-resume-"))
    args = ["--output", str(out), "--api-url", fake.api_url, "--quiet", "--asset-host", fake.assets_url]
    fake.clear_log()
    pages = sum(len(doc.pages) for doc in fake.docs)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, CLI, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None and len(fake.requests("POST", r"/export$")) < pages // 2:
        time.sleep(0.05)  # a benchmark, not a test: polling is fine here
    proc.send_signal(signal.SIGINT)
    proc.wait()
    cut_wall, cut_requests = time.monotonic() - started, len(fake.requests())
    # The next run comes later (the next night); started at once, it would meet the cut run's
    # requests still in Coda's rate window and be slowed by the 429s, which is not what this measures.
    time.sleep(max(window for _, window in coda_backup.DEFAULT_RATE_LIMITS.values()) * 1.2)
    fake.clear_log()
    code, wall, _ = run_cli([*args, "--incremental"], env)
    total = len(fake.requests())
    print(f"\n[resume] a run cancelled after {cut_wall:.1f}s and {cut_requests} requests (exit {proc.returncode}); "
          f"the --incremental run after it: exit {code}, wall {wall:.1f}s, requests {total}, "
          f"exports {len(fake.requests('POST', r'/export$'))} of {pages} pages, 429s {fake.rate_limited}")
    print(f"    resumed run / full run: wall {100.0 * wall / max(full_wall, 0.001):.0f}%, "
          f"requests {100.0 * total / max(full_requests, 1):.0f}%")


def memory(args: argparse.Namespace) -> None:
    figures = {}
    for rows in (args.memory_rows, args.memory_rows // 10):
        fake = FakeCoda(token=TOKEN, seed=2)
        fake.start()
        try:
            build_large_workspace(fake, docs=1, pages=1, tables=1, rows=rows)
            out = Path(tempfile.mkdtemp(prefix="coda-bench-mem-"))
            code, wall, peak = run_cli(["--output", str(out), "--api-url", fake.api_url, "--quiet",
                                        "--rate-limits", "none"], cli_env())
            csv_files = list(out.rglob("*.csv"))
            size = sum(p.stat().st_size for p in csv_files)
            figures[rows] = peak
            print(f"{rows:>8,} rows: exit {code}, wall {wall:.1f}s, peak RSS {peak / 1024:.1f} MiB, "
                  f"CSV {size / 1e6:.1f} MB")
        finally:
            fake.stop()
    big, small = args.memory_rows, args.memory_rows // 10
    print(f"difference: {(figures[big] - figures[small]) / 1024:.1f} MiB")


def bench_rows(rows: int, changed: bool) -> Iterator[List[str]]:
    """A table's CSV records; `changed`: in every 500 rows, 3 edited, 1 removed and 1 added."""
    for index in range(rows):
        kind = index % 500
        if changed and kind == 1:  # 0.2 % removed
            continue
        if changed and kind == 2:  # 0.2 % added
            yield [f"i-new{index:07d}", f"New {index}", str(index), "2026-01-02T00:00:00.000Z",
                   "2026-01-02T00:00:00.000Z", f"https://coda.io/d/_dX/r{index}", f"New {index}", str(index), ""]
        number = index * 7 if changed and kind in (3, 4, 5) else index
        yield [f"i-{index:07d}", f"Item {index}", str(index), "2026-01-01T00:00:00.000Z", "2026-01-01T00:00:00.000Z",
               f"https://coda.io/d/_dX/r{index}", f"Item {index}", str(number), "some, text \"quoted\""]


def write_bench_snapshot(output: Path, name: str, rows: int, changed: bool) -> None:
    """A snapshot folder as the tool would leave it: one doc, one table, summary and manifest."""
    root = output / name
    doc = "docs/Bench__d-bench"
    stem = f"{doc}/tables/table/Page__Big__grid-big"
    (root / doc / "tables" / "table").mkdir(parents=True)
    with open(root / f"{stem}.csv", "w", encoding="utf-8", newline="") as handle:
        handle.write(coda_backup.csv_line(coda_backup.CSV_META_HEADER + ["Name", "Number", "Notes"]))
        for record in bench_rows(rows, changed):
            handle.write(coda_backup.csv_line(record))
    files = [dict(coda_backup.file_record(root, coda_backup.PurePosixPath(f"{stem}.csv")), role="csv")]
    table = {"id": "grid-big", "name": "Big", "tableType": "table", "path": f"{stem}.csv", "status": "ok",
             "updatedAt": f"{name}", "rowCount": rows, "files": files}
    manifest = {"version": coda_backup.MANIFEST_VERSION, "snapshot": name, "status": "completed",
                "options": {"layout": {}}, "docs": [{"id": "d-bench", "name": "Bench", "path": doc, "status": "ok",
                                                    "updatedAt": name, "files": [], "pages": [], "tables": [table]}]}
    coda_backup.write_json_atomic(root / coda_backup.MANIFEST_NAME, manifest)
    coda_backup.write_json_atomic(root / coda_backup.SUMMARY_NAME, {"status": "completed"})


def diff(args: argparse.Namespace) -> None:
    rows = args.diff_rows
    out = Path(tempfile.mkdtemp(prefix="coda-bench-diff-"))
    try:
        started = time.monotonic()
        write_bench_snapshot(out, "2026-01-01T000000Z", rows, changed=False)
        write_bench_snapshot(out, "2026-01-02T000000Z", rows, changed=True)
        coda_backup.point_latest(out, out / "2026-01-02T000000Z")
        size = sum(path.stat().st_size for path in out.rglob("*.csv"))
        print(f"two snapshots of {rows:,} rows written in {time.monotonic() - started:.1f}s "
              f"({size / 1e6:.0f} MB of CSV)")
        with tempfile.TemporaryFile() as stdout:
            code, wall, peak = run_cli(["--output", str(out), "--diff", "--json"], cli_env(), stdout=stdout)
            stdout.seek(0)
            result = json.loads(stdout.read() or b"null")
        blocks = rows // 500
        expected = {"added": blocks, "removed": blocks, "changed": 3 * blocks}
        found = result["tables"]["changed"][0]["rows"] if code == 0 else None
        print(f"--diff: exit {code}, wall {wall:.1f}s, peak RSS {peak / 1024:.1f} MiB, rows {found} "
              f"({'as changed' if found == expected else f'EXPECTED {expected}'})")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("speed", "memory", "shapes", "diff", "all"), default="speed")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="with --mode shapes: only this shape")
    parser.add_argument("--rate-model", choices=("window", "bucket", "both"), default="both",
                        help="with --mode shapes: how the fake counts the limits")
    parser.add_argument("--extra", action="append", default=[], metavar="FLAG",
                        help="with --mode shapes: one more CLI flag for every run (repeatable)")
    parser.add_argument("--shape-latency", type=float, default=None, metavar="SECONDS",
                        help="with --mode shapes: this per-request latency instead of each shape's own")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="with --mode shapes: run each shape and model N times (rare events show in a row each)")
    parser.add_argument("--serial", action="store_true",
                        help="with --mode shapes: also run each shape with --concurrency 1 and print serial / default")
    parser.add_argument("--docs", type=int, default=10)
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--tables", type=int, default=60)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--latency", type=float, default=0.15)
    parser.add_argument("--export-delay", type=float, default=2.0)
    parser.add_argument("--skip-serial", action="store_true", help="leave out the slow serial baseline")
    parser.add_argument("--memory-rows", type=int, default=200_000)
    parser.add_argument("--diff-rows", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    if args.mode in ("speed", "all"):
        speed(args)
    if args.mode in ("memory", "all"):
        memory(args)
    if args.mode in ("shapes", "all"):
        shapes(args)
    if args.mode in ("diff", "all"):
        diff(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
