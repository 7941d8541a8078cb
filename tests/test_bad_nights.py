"""Bad nights (issue 11, parts 1, 2, 4 and 5): they end loud and never destructive.

An API lost mid-run (the fake really resets or refuses its connections), a full or read-only disk
(a real, size-limited tmpfs in a private mount namespace), failed runs a monitor can see
(summary.json `exit_code`/`error`/`warnings`, DIR/last-run.json, one status everywhere), and the
smaller cases: --doc typos, two token sources, --verify of an unfinished snapshot, a closed pipe,
a missing --output, an old Python.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import coda_backup
from coda_backup import ConnectionBreaker, Halt, RunFacts, decide_outcome
from fake_coda import PingReceiver
from support import FAST_FLAGS, TOKEN, BackupTestCase, read_json, tool_dir, tree_bytes

SCRIPT = Path(coda_backup.__file__).resolve()
LAST_RUN_KEYS = {"snapshot", "status", "exit_code", "error", "started_at", "finished_at", "counts", "vanished"}


class BadNightCase(BackupTestCase):
    def last_run(self, output: Optional[Path] = None) -> Dict[str, Any]:
        record = read_json((output or self.out) / "last-run.json")
        self.assertEqual(set(record), LAST_RUN_KEYS)
        return record

    def lose_api_when(self, happened: Callable[[Any, Any], bool], refuse: bool = False) -> None:
        """Lose the API for good right after the reply for which `happened(request, reply)` holds."""
        def hook(request: Any, reply: Any) -> None:
            if not self.fake.api_lost and happened(request, reply):
                self.fake.lose_api(refuse)
        self.fake.after_api.append(hook)

    def assert_failed_everywhere(self, snapshot: Path, code: int, needle: str) -> Dict[str, Any]:
        """summary.json and last-run.json both say `failed`, with the exit code and a one-line reason."""
        summary = self.summary(snapshot)
        self.assertEqual((summary["status"], summary["exit_code"]), ("failed", code))
        self.assertIn(needle, summary["error"])
        self.assertNotIn("\n", summary["error"])
        self.assertNotIn(TOKEN, json.dumps(summary))
        self.assertEqual(self.manifest(snapshot)["status"], "failed")
        last = self.last_run()
        self.assertEqual((last["snapshot"], last["status"], last["exit_code"], last["error"]),
                         (snapshot.name, "failed", code, summary["error"]))
        return summary


# --- 1. the API lost mid-run ---------------------------------------------------------------


class ApiLostTest(BadNightCase):
    def test_an_api_lost_mid_run_stops_every_worker_fails_and_keeps_latest(self) -> None:
        doc = self.fake.add_doc("Forty Pages")
        pages = [doc.add_page(f"Page {i:02d}", content=f"# Page {i}\n") for i in range(40)]
        self.assertEqual(self.run_backup("--no-extras"), 0, self.stderr)
        good = self.latest()
        # One worker gets a 429 asking it to wait 100 s; right then the API goes away. The others
        # only meet resets and trip the breaker, which must wake the sleeper too.
        self.fake.add_fault(rf"/pages/{pages[5].id}/export$", method="POST", status=429,
                            headers={"Retry-After": "100"})
        self.lose_api_when(lambda request, reply: reply.status == 429)
        outcome: Dict[str, int] = {}
        run = threading.Thread(target=lambda: outcome.update(code=self.run_backup("--no-extras")))
        run.start()
        run.join(60)  # a hang guard only: a run that waits out the 100 s backoff did not stop
        self.assertFalse(run.is_alive(), "a worker sleeping in a backoff kept the run going")
        self.assertEqual(outcome["code"], 3, self.stderr)
        # The bound, plus what was on the wire when it tripped, plus a restart of the count for each
        # request the API still answered after it went away (a loaded machine delays those); without
        # the breaker every page not yet saved (over 30) would use all its 6 attempts.
        self.assertLessEqual(self.fake.lost_connections, 2 * coda_backup.API_LOST_FAILURES,
                             "the run kept knocking long after the bound")
        failed = self.snapshots()[-1]
        self.assert_failed_everywhere(failed, 3, "lost the API")
        self.assertEqual(self.latest(), good, "latest moved to a broken snapshot")
        self.assertNotIn("Traceback", self.stderr)
        self.assertIn("lost the API", self.stderr)

    def test_an_api_gone_before_the_listing_ended_is_failed_not_a_partial_success(self) -> None:
        docs = [self.fake.add_doc(f"Doc {n}") for n in range(3)]
        for doc in docs:
            doc.add_page("Home", content="# Home\n")
        # Gone (the port refuses) once the docs are listed, before any doc's pages are: too few
        # requests are left to reach API_LOST_FAILURES. (Later, the outcome would hang on which
        # doc's listing the threads had finished first.)
        self.lose_api_when(lambda request, reply: request.path == "/docs", refuse=True)
        self.assertEqual(self.run_backup("--no-extras"), 3, self.stderr)
        self.assert_failed_everywhere(self.snapshots()[-1], 3, "lost the API")
        self.assertIsNone(coda_backup.read_latest(self.out), "latest moved to a partial snapshot")


class BreakerTest(unittest.TestCase):
    def test_only_an_unbroken_streak_trips_it(self) -> None:
        # events: a letter is a connection failure of that request, "a" an HTTP answer to a request
        # sent then, "l" a late answer to a request sent before the streak began, "+N" N seconds pass
        cases = [
            ("three failures of two requests", "xyx", 3),
            ("one request failing alone is that object's failure", "xxxxxx", None),
            ("an answer between resets the count", "xyaxy", None),
            ("a late answer to an earlier request does not", "xylx", 3),
            ("the time bound", "x +9 y", 2),
            ("time alone, one failure", "+20 x", None),
            ("an answer ends the streak's clock", "x +4 a y +4 x", None),
        ]
        for label, events, trips_at in cases:
            with self.subTest(label):
                now = [0.0]
                breaker = ConnectionBreaker(max_failures=3, max_seconds=5.0, clock=lambda now=now: now[0])
                trips: List[int] = []
                failures = 0
                for token in tokenize(events):
                    if token == "a":
                        breaker.answered(sent=now[0])
                    elif token == "l":
                        breaker.answered(sent=-1.0)
                    elif token.isalpha():
                        failures += 1
                        if breaker.failed(token) is not None:
                            trips.append(failures)
                    else:
                        now[0] += float(token)
                self.assertEqual(trips[0] if trips else None, trips_at)


def tokenize(events: str) -> List[str]:
    """"x +9 a" -> ["x", "9", "a"]; "xya" -> ["x", "y", "a"]."""
    tokens: List[str] = []
    for part in events.split():
        tokens.extend([part[1:]] if part.startswith("+") else list(part))
    return tokens


# --- 2. a full or read-only disk ----------------------------------------------------------------

# Runs under `unshare -rm` (root in a private user and mount namespace): the tmpfs needs no
# privileges in the host and vanishes with the process. Four nights in one interpreter.
DISK_NIGHTS = r"""
import contextlib, io, json, os, shutil, subprocess, sys
sys.path.insert(0, os.environ["TOOL_DIR"])
import coda_backup
mnt, results = os.environ["MNT"], os.environ["RESULTS"]
report = {}

def night(n):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = coda_backup.main(["--output", os.path.join(mnt, "backups"), "--api-url", os.environ["URL"],
                                 *os.environ["FAST"].split(), "--no-extras"])
    report[n] = {"code": code, "stderr": err.getvalue()}
    shutil.copytree(os.path.join(mnt, "backups"), os.path.join(results, f"after-{n}"), symlinks=True)

def mount(*args):
    subprocess.run(["mount", *args], check=True)

mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", mnt)
night(1)  # a good night
disk = os.statvfs(mnt)
mount("-o", f"remount,size={(disk.f_blocks - disk.f_bfree) * disk.f_frsize // 1024 + 24}k", mnt)
night(2)  # room for a few files, not for a snapshot
mount("-o", "remount,size=8m", mnt)
night(3)  # space is back
mount("-o", "remount,ro", mnt)
night(4)  # read-only
with open(os.path.join(results, "report.json"), "w") as handle:
    json.dump(report, handle)
"""


class DiskTest(BadNightCase):
    """The real thing: a size-limited tmpfs in a private mount namespace (`unshare -rm`), so the
    mount needs no privileges in the host and vanishes with the subprocess. The fake serves it
    from this process over loopback."""

    def test_a_full_disk_stops_at_once_cleans_up_and_the_next_night_works(self) -> None:
        doc = self.fake.add_doc("Doc")  # every small file takes a 4 KiB page of the tmpfs
        home = doc.add_page("Home", content="# Home\n")
        log = doc.add_table("Log", columns=["When", "What"], parent_page=home)
        log.fill_rows(300, lambda i: [f"2026-01-{i % 28 + 1:02d}", f"event number {i}"])
        for n in range(8):
            doc.add_page(f"Page {n}", content=f"# Page {n}\n")
        results = Path(tempfile.mkdtemp(prefix="coda-disk-"))
        self.addCleanup(shutil.rmtree, results, True)
        mnt = results / "mnt"
        mnt.mkdir()
        env = dict(os.environ, MNT=str(mnt), RESULTS=str(results), TOOL_DIR=str(tool_dir()),
                   URL=self.fake.api_url, FAST=" ".join(FAST_FLAGS), CODA_API_TOKEN=TOKEN)
        done = subprocess.run(["unshare", "-rm", sys.executable, "-c", DISK_NIGHTS], env=env, capture_output=True,
                              text=True, timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        report = read_json(results / "report.json")
        codes = [report[str(n)]["code"] for n in range(1, 5)]
        stderr = {n: report[str(n)]["stderr"] for n in range(1, 5)}
        self.assertEqual(codes, [0, 3, 0, 3], stderr)

        first = coda_backup.read_latest(results / "after-1")
        assert first is not None
        after = results / "after-2"
        self.assertEqual([p.name for p in coda_backup.snapshot_folders(after)], [first.name],
                         "the full night's snapshot was not removed")
        self.assertEqual(coda_backup.read_latest(after).name, first.name)  # type: ignore[union-attr]
        self.assertEqual(tree_bytes(after / first.name, skip=()), tree_bytes(first, skip=()),
                         "another snapshot was touched")
        self.assertEqual(sorted(p.name for p in after.iterdir() if p.name.startswith(".")), [],
                         "temp files or a half-removed folder left behind")
        last = self.last_run(after)
        self.assertEqual((last["snapshot"], last["status"], last["exit_code"]), (None, "failed", 3))
        self.assertIn("ENOSPC", last["error"])
        self.assertEqual(last["counts"]["failures"], 0, "it went on writing after the disk was full")
        self.assertNotIn("Traceback", stderr[2])
        self.assertIn("No space left", stderr[2])

        third = results / "after-3"
        self.assertEqual(len(coda_backup.snapshot_folders(third)), 2)
        self.assertEqual(self.last_run(third)["status"], "completed")
        self.assertEqual(coda_backup.verify_snapshot(coda_backup.read_latest(third)), [])  # type: ignore[arg-type]

        self.assertIn("Read-only file system", stderr[4])
        self.assertNotIn("Traceback", stderr[4])
        self.assertEqual(tree_bytes(results / "after-4", skip=()), tree_bytes(third, skip=()),
                         "a read-only disk: nothing could change")


# --- 4. failed runs a monitor can see --------------------------------------------------------------


class OutcomeTest(BadNightCase):
    def setUp(self) -> None:
        super().setUp()
        doc = self.fake.add_doc("Small")
        doc.add_page("Home", content="# Home\n")
        doc.add_table("Tasks", columns=["Task"], rows=[{"Task": "one"}])

    def test_a_refused_token_is_failed_with_a_reason_in_summary_and_last_run(self) -> None:
        self.assertEqual(self.run_backup("--no-extras"), 0, self.stderr)
        good = self.latest()
        summary = self.summary(good)
        self.assertEqual((summary["exit_code"], summary["error"], summary["warnings"]), (0, None, []))
        self.assertEqual(self.last_run()["status"], "completed")
        self.set_env("CODA_API_TOKEN", "wrong-token-Qp7")
        self.assertEqual(self.run_backup("--no-extras"), 3, self.stderr)
        failed = self.snapshots()[-1]
        summary = self.assert_failed_everywhere(failed, 3, "401")
        self.assertNotIn("wrong-token-Qp7", json.dumps(summary) + json.dumps(self.last_run()))
        self.assertEqual(self.latest(), good)

    def test_zip_summary_manifest_and_last_run_agree_when_latest_cannot_move(self) -> None:
        (self.out / "latest.txt").mkdir(parents=True)  # in the way of the atomic rename
        self.assertEqual(self.run_backup("--no-extras", "--zip"), 1, self.stderr)
        snapshot = self.snapshots()[-1]
        with zipfile.ZipFile(self.out / f"{snapshot.name}.zip") as archive:
            zipped = {name: json.loads(archive.read(f"{snapshot.name}/{name}"))
                      for name in ("summary.json", "manifest.json")}
        summary = self.summary(snapshot)
        self.assertEqual(zipped["summary.json"], summary)
        self.assertEqual((summary["status"], summary["exit_code"]), ("completed_with_errors", 1))
        self.assertEqual([failure["kind"] for failure in summary["failures"]], ["latest"])
        self.assertEqual(zipped["manifest.json"]["status"], "completed_with_errors")
        self.assertEqual(self.manifest(snapshot)["status"], "completed_with_errors")
        last = self.last_run()
        self.assertEqual((last["status"], last["exit_code"], last["error"]), ("completed_with_errors", 1, None))

    def test_a_run_that_never_took_the_lock_still_writes_last_run(self) -> None:
        """No token (cron without the variable) or a folder locked by another run: the monitor
        sees that night's failure, not the success before it."""
        self.assertEqual(self.run_backup("--no-extras"), 0, self.stderr)
        self.set_env("CODA_API_TOKEN", None)
        with PingReceiver() as receiver:
            self.assertEqual(self.run_backup("--no-extras", "--ping-url", receiver.url), 2)
        last = self.last_run()
        self.assertEqual((last["snapshot"], last["status"], last["exit_code"]), (None, "failed", 2))
        self.assertIn("no API token", last["error"])
        self.assertEqual([ping.path.rsplit("/", 1)[-1] for ping in receiver.pings], ["2"])
        self.assertIn("no API token", receiver.pings[0].body)
        self.set_env("CODA_API_TOKEN", TOKEN)
        with coda_backup.RunLock(self.out):
            self.assertEqual(self.run_backup("--no-extras"), 4)
        last = self.last_run()
        self.assertEqual((last["snapshot"], last["status"], last["exit_code"]), (None, "failed", 4))
        self.assertIn("holds", last["error"])
        self.assertNotIn(TOKEN, json.dumps(last))
        self.assertEqual(len(self.snapshots()), 1, "only the first night made a snapshot")
        missing = self.out.parent / "never-made"
        self.set_env("CODA_API_TOKEN", None)
        self.assertEqual(self.run_backup("--no-extras", output=missing), 2)
        self.assertFalse(missing.exists(), "a usage error creates no output folder")

    def test_what_went_to_stderr_reaches_summary_warnings(self) -> None:
        spare = self.out.parent / "token.txt"
        spare.write_text(TOKEN + "\n", encoding="utf-8")
        os.chmod(spare, 0o644)
        # both token sources, and --incremental without a previous snapshot
        self.assertEqual(self.run_backup("--no-extras", "--incremental", "--token-file", str(spare)), 0)
        warnings = self.summary()["warnings"]
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn("both CODA_API_TOKEN and --token-file", warnings[0])
        self.assertIn("making a full backup", warnings[1])
        # a token file others may read, and a broken previous manifest
        (self.latest() / "manifest.json").write_text("{broken", encoding="utf-8")
        self.set_env("CODA_API_TOKEN", None)
        self.assertEqual(self.run_backup("--no-extras", "--incremental", "--token-file", str(spare)), 0)
        warnings = self.summary()["warnings"]
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn("readable by other users", warnings[0])
        self.assertIn("cannot use the manifest of", warnings[1])
        for line in warnings:
            self.assertIn(line, self.stderr, "a warning goes to the log too")


class DecideOutcomeTest(unittest.TestCase):
    def test_one_table_of_outcomes(self) -> None:
        lost, disk = Halt("api_lost", "lost the API"), Halt("disk", "disk full")
        cases = [
            # facts -> status, exit code, latest may move, may prune, discard the snapshot
            (RunFacts(), ("completed", 0, True, True, False)),
            (RunFacts(failure_kinds=("page",)), ("completed_with_errors", 1, True, False, False)),
            (RunFacts(failure_kinds=("page", "vanished")), ("completed_with_errors", 1, False, False, False)),
            (RunFacts(failure_kinds=("filter",), nothing_selected=True), ("failed", 1, False, False, False)),
            (RunFacts(fatal="token refused"), ("failed", 3, False, False, False)),
            (RunFacts(halt=lost, failure_kinds=("page",)), ("failed", 3, False, False, False)),
            (RunFacts(halt=disk), ("failed", 3, False, False, True)),
            (RunFacts(signal=2), ("cancelled", 130, False, False, False)),
            (RunFacts(signal=15, fatal="x"), ("cancelled", 143, False, False, False)),
            (RunFacts(halt=lost, signal=15), ("failed", 3, False, False, False)),
        ]
        for facts, expected in cases:
            with self.subTest(facts=facts):
                outcome = decide_outcome(facts)
                self.assertEqual((outcome.status, outcome.exit_code, outcome.move_latest, outcome.may_prune,
                                  outcome.discard_snapshot), expected)
                self.assertEqual(outcome.error is None, outcome.status not in ("failed", "cancelled"))


# --- 5. the smaller cases --------------------------------------------------------------------


class SmallCasesTest(BadNightCase):
    def setUp(self) -> None:
        super().setUp()
        self.fake.add_doc("Small").add_page("Home", content="# Home\n")

    def test_an_empty_token_file_says_so(self) -> None:
        self.set_env("CODA_API_TOKEN", None)
        self.assertEqual(self.run_backup("--token-file", str(self.token_file(""))), 2)
        self.assertIn("is empty", self.stderr)
        self.assertEqual(len(self.stderr.strip().splitlines()), 1, self.stderr)

    def test_both_token_sources_warn_and_the_refusal_names_the_one_used(self) -> None:
        self.set_env("CODA_API_TOKEN", "wrong-token-Qp7")
        self.assertEqual(self.run_backup("--token-file", str(self.token_file(TOKEN + "\n"))), 3)
        self.assertRegex(self.stderr, r"WARNING both CODA_API_TOKEN and --token-file .* using CODA_API_TOKEN")
        self.assertIn("the API token from CODA_API_TOKEN (--token-file was ignored) was refused", self.stderr)
        self.assertNotIn("wrong-token-Qp7", self.stderr)

    def test_verify_says_a_snapshot_that_never_finished_is_incomplete(self) -> None:
        self.set_env("CODA_API_TOKEN", "wrong-token-Qp7")
        self.assertEqual(self.run_backup(), 3)
        snapshot = self.snapshots()[-1]
        summary = self.summary(snapshot)
        for status in coda_backup.INCOMPLETE_STATUSES:
            with self.subTest(status):
                (snapshot / "summary.json").write_text(json.dumps(dict(summary, status=status)), encoding="utf-8")
                self.assertEqual(self.run_main(["--verify", snapshot.name, "--output", str(self.out)]), 1)
                self.assertIn(f"incomplete: the run that wrote it never finished (status {status})", self.stdout)

    def test_read_only_commands_on_a_missing_output_exit_2(self) -> None:
        missing = str(self.out.parent / "no-such-folder")
        for command in (["--list-runs"], ["--list-runs", "--json"], ["--verify"]):
            with self.subTest(command):
                self.assertEqual(self.run_main([*command, "--output", missing]), 2)
                self.assertEqual(len(self.stderr.strip().splitlines()), 1, self.stderr)
                self.assertIn("no-such-folder", self.stderr)
                self.assertFalse(Path(missing).exists())

    def test_list_runs_into_a_closed_pipe_is_a_quiet_exit(self) -> None:
        self.out.mkdir()
        run = (f"import sys; sys.path.insert(0, {str(tool_dir())!r}); import coda_backup; "
               f"sys.exit(coda_backup.main(['--list-runs', '--output', {str(self.out)!r}]))")
        proc = subprocess.Popen([sys.executable, "-c", run], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # like `| head -1` that has read its line, before anything is printed
        errors = proc.stderr.read().decode()
        proc.stderr.close()
        self.assertEqual((proc.wait(30), errors), (0, ""))

    def test_an_old_python_gets_one_line_and_exit_2(self) -> None:
        """The oldest Python 3.6-3.8 pyenv has (it reads the file up to the check). Where there is
        none, this Python told it is 3.8, so the test never passes without running."""
        root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
        old = sorted(root.glob("3.[678].*/bin/python3"), key=lambda path: [int(part) for part in
                                                                         path.parent.parent.name.split(".")])
        pretend = ("import sys; sys.version_info = (3, 8, 18, 'final', 0); "
                   f"sys.path.insert(0, {str(SCRIPT.parent)!r}); import coda_backup")
        command = [str(old[0]), str(SCRIPT), "--help"] if old else [sys.executable, "-c", pretend]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PYENV_VERSION=""))
        self.assertEqual((done.returncode, done.stdout), (2, ""), command)
        self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)
        self.assertIn("needs Python 3.9 or newer", done.stderr)


if __name__ == "__main__":
    unittest.main()
