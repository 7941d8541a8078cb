"""Nightly-run safety, part two: signals, the lock, no token leaks, private files, hostile names.

Same approach as test_resilience.py (whose fake and helpers this reuses): the real CLI in-process
(a subprocess for signals) against the fake, asserting on exit codes, stderr, every byte under
--output and the fake's request log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import unittest
from pathlib import Path
from typing import Any, Dict, List, Optional

import coda_backup
from fake_coda import FAULT_KINDS
from support import (
    ENOUGH_RETRIES,
    FAST_FLAGS,
    TOKEN,
    ResilienceCase,
    build_nightly,
    read_json,
    rows_path,
    snapshot_dirs,
    tool_command,
    tool_dir,
)

ROOT = Path(__file__).resolve().parent.parent
WINDOWS_FORBIDDEN = set('<>:"/\\|?*')
DEVICE_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def windows_problem(name: str) -> Optional[str]:
    """Why `name` is not a safe file or folder name on Windows, macOS and Linux (None if it is)."""
    if name in ("", ".", ".."):
        return "empty, . or .."
    if WINDOWS_FORBIDDEN & set(name) or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "forbidden or control character"
    if name[-1] in ". ":
        return "trailing dot or space"
    if name.split(".")[0].strip().upper() in DEVICE_NAMES:
        return "reserved device name"
    if len(name) > 120:
        return f"{len(name)} characters"
    return None


def all_files(root: Path) -> List[Path]:
    return [Path(folder, name) for folder, _, files in os.walk(root) for name in files]


# --- the token -----------------------------------------------------------------------------

class TokenLeakTest(ResilienceCase):
    def assertNoTokenAnywhere(self) -> None:
        self.assertNotIn(TOKEN, self.stderr, "token in stderr")
        self.assertNotIn(TOKEN, self.stdout, "token in stdout")
        files = all_files(self.out)
        self.assertTrue(any(path.name == "summary.json" for path in files))
        for path in files:
            self.assertNotIn(TOKEN.encode("utf-8"), path.read_bytes(), f"token in {path}")

    def test_token_is_never_logged_written_or_sent_to_the_download_host(self) -> None:
        data = build_nightly(self.fake, second_doc=True)
        data["doc2"].forbidden = True
        data["notes"].export_fail_times = 10**6
        data["home"].download_expire_times = 1
        self.fake.add_fault(rows_path(data["people"]), status=500, times=None)
        self.fake.fault_rate, self.fake.fault_kinds = 0.3, tuple(k for k in FAULT_KINDS if k != "timeout")
        code, snapshot = self.run_new("--log-level", "DEBUG", *ENOUGH_RETRIES, index=True)
        self.assertEqual(code, 1, self.stderr)
        self.assertEqual(len(self.summary(snapshot)["failures"]), 3)
        self.assertIn("DEBUG", self.stderr)  # the error paths really logged
        self.assertIn("ERROR", self.stderr)
        self.assertNoTokenAnywhere()
        downloads = self.fake.requests(host="download")
        self.assertTrue(downloads, "no download request: the check below would prove nothing")
        for record in downloads:
            self.assertNotIn("authorization", record.headers, record.target)
            self.assertNotIn(TOKEN, record.target + " ".join(record.headers.values()))
        self.assertIn(f"Bearer {TOKEN}", self.fake.requests()[0].headers.get("authorization", ""))

    def test_token_echoed_in_an_error_answer_is_not_repeated(self) -> None:
        """A proxy or API error page that echoes the request's Authorization header."""
        data = build_nightly(self.fake)
        echo = {"statusCode": 400, "statusMessage": "Bad Request",
                "message": f"Rejected request with Authorization: Bearer {TOKEN}"}
        cases = [
            ("rows answer 400", rows_path(data["people"]), 400, 1),
            ("whoami answers 401", r"^/whoami$", 401, 3),
        ]
        for number, (label, path, status, expected_code) in enumerate(cases):
            with self.subTest(label):
                self.out = self.out.with_name(f"backups-{number}")  # files of this case only
                self.fake.add_fault(path, status=status, body=dict(echo, statusCode=status), times=None)
                try:
                    code, _ = self.run_new("--log-level", "DEBUG")
                finally:
                    self.fake.clear_faults()
                self.assertEqual(code, expected_code, self.stderr)
                self.assertIn("Rejected request", self.stderr + "".join(
                    p.read_text(encoding="utf-8") for p in self.out.rglob("summary.json")))
                self.assertNoTokenAnywhere()


# --- private files -------------------------------------------------------------------------

@unittest.skipUnless(os.name == "posix", "POSIX permissions")
class PermissionsTest(ResilienceCase):
    def test_snapshot_folders_are_0700_and_files_private(self) -> None:
        """Saved content is read-only (0400: an in-place edit would change every snapshot sharing
        the inode); the run's own summary.json and manifest.json are 0600."""
        old = os.umask(0o022)  # the usual default: group/other bits must be cleared by the tool itself
        self.addCleanup(os.umask, old)
        data = build_nightly(self.fake)
        self.clean_snapshot(index=True)
        data["tasks"].add_row({"Task": "changed"})
        self.clean_snapshot("--incremental", index=True)  # linked files too, and the index's
        checked = 0
        for folder, dirs, files in os.walk(self.out):
            for name in dirs:
                path = Path(folder, name)
                if not path.is_symlink():
                    checked += 1
                    self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o700, path)
            for name in files:
                path = Path(folder, name)
                checked += 1
                own_record = name in ("summary.json", "manifest.json") or Path(folder) == self.out
                self.assertEqual(stat.S_IMODE(path.lstat().st_mode), 0o600 if own_record else 0o400, path)
        self.assertGreater(checked, 20)

    def test_token_file_readable_by_others_gets_a_warning(self) -> None:
        build_nightly(self.fake)
        self.set_env("CODA_API_TOKEN", None)
        for mode, warned in ((0o644, True), (0o600, False)):
            with self.subTest(mode=oct(mode)):
                token_file = self.out.parent / f"token-{mode:o}.txt"
                token_file.write_text(TOKEN + "\n", encoding="utf-8")
                token_file.chmod(mode)
                code = self.run_backup("--token-file", str(token_file))
                self.assertEqual(code, 0, self.stderr)
                warnings = [line for line in self.stderr.splitlines()
                            if "WARNING" in line and str(token_file) in line]
                self.assertEqual(bool(warnings), warned, self.stderr)
                self.assertNotIn(TOKEN, self.stderr)


# --- hostile names -------------------------------------------------------------------------

def hostile_names(outside: Path) -> List[str]:
    return [
        "..", ".", "/etc/passwd", "\\\\?\\C:\\x", "C:\\Windows\\System32", "\\\\server\\share\\x",
        "a\x00b", "nul\x00.txt", "CON", "con.txt", "LPT9.tar.gz", "Com1 ", "AUX.", "PRN .md", "NUL",
        "x" * 1000, "é" * 1000, "🚀" * 1000, "...", " . . ", "   ", "", "tab\there\nnewline",
        'a:b*c?d|e<f>g"h', "../../../../../escaped", "../../../../../../escaped",
        str(outside / "absolute-escape"), "trailing dot.", "trailing space ",
    ]


HOSTILE_IDS = ["..", ".", "/etc/passwd", "\\\\?\\C:\\x", "a\x00b", "CON", "...", "   ", "/", "\\",
               "nul.txt", "COM1", "../../../../../escaped-id"]
# Same name, ids equal but for case or only past the 60 characters an id keeps in a file name.
TWINS = [("Twin", "Case"), ("Twin", "case"), ("Long twin", "y" * 1000), ("Long twin", "y" * 999 + "z")]


def build_hostile(fake: Any, outside: Path) -> Dict[str, Any]:
    """Docs, pages (nested), tables and a view whose names and ids are all hostile."""
    names = hostile_names(outside)
    main = fake.add_doc("..", doc_id="..")
    pages = []
    for i, name in enumerate(names):
        parent = pages[i - 1] if i % 3 == 2 else None  # some nesting under hostile parents
        page_id = HOSTILE_IDS[i] if i < len(HOSTILE_IDS) else None
        pages.append(main.add_page(name, parent=parent, page_id=page_id))
    pages += [main.add_page(name, page_id=page_id) for name, page_id in TWINS]
    tables = []
    for i, name in enumerate(names[:12]):
        tables.append(main.add_table(name, parent_page=pages[i], columns=[name or "Name"],
                                     rows=[{name or "Name": f"value {i}"}], table_id=HOSTILE_IDS[i]))
    tables += [main.add_table(name, parent_page=pages[0], table_id=f"grid-{table_id}") for name, table_id in TWINS]
    views = [main.add_view(tables[0], "/etc/passwd", view_id="\\\\?\\C:\\view")]
    others = [("/etc/passwd", "\\\\?\\C:\\x"), ("CON", "x" * 1000), (".", "   "), ("a\x00b", str(outside))]
    for doc_id, doc_name in others:
        doc = fake.add_doc(doc_name, doc_id=doc_id)
        page = doc.add_page(doc_name, page_id=doc_id)
        tables.append(doc.add_table(doc_name, parent_page=page, columns=["Name"], rows=[{"Name": "x"}],
                                    table_id=doc_id))
        pages.append(page)
    return {"pages": pages, "tables": tables, "views": views}


class HostileNamesTest(ResilienceCase):
    def test_hostile_names_and_ids_stay_inside_output_and_are_portable(self) -> None:
        outside = self.out.parent
        before = sorted(os.listdir(outside))
        data = build_hostile(self.fake, outside)
        code, snapshot = self.run_new(index=True)  # browse/ names its pages after the objects
        self.assertEqual(code, 0, self.stderr)
        self.assertEqual(sorted(os.listdir(outside)), sorted(before + [self.out.name]), "written outside --output")
        counts = self.summary(snapshot)["counts"]
        self.assertEqual((counts["pages"], counts["tables"], counts["views"]),
                         (len(data["pages"]), len(data["tables"]), len(data["views"])))
        real_out = os.path.realpath(self.out)
        for folder, dirs, files in os.walk(self.out):
            names = dirs + files
            self.assertEqual(len({n.casefold() for n in names}), len(names), f"case collision in {folder}")
            for name in names:
                path = Path(folder, name)
                self.assertIsNone(windows_problem(name), repr(str(path.relative_to(self.out))))
                if path.is_symlink():  # only `latest`, and it points at a snapshot inside --output
                    self.assertEqual(path.relative_to(self.out).as_posix(), "latest")
                self.assertTrue(os.path.realpath(path).startswith(real_out + os.sep), path)
        self.assertEqual(len(list(snapshot.rglob("*.md"))), len(data["pages"]))
        self.assertEqual(len(list(snapshot.rglob("*.csv"))), len(data["tables"]) + len(data["views"]))
        manifest = self.manifest(snapshot)
        entries = [e for doc in manifest["docs"] for e in doc["pages"] + doc["tables"]]
        self.assertEqual(len(entries), len(data["pages"]) + len(data["tables"]) + len(data["views"]))
        for entry in entries:
            self.assertEqual(entry["status"], "ok", entry["id"])
            for record in entry["files"]:
                self.assertTrue((snapshot / record["path"]).is_file(), record["path"])
        index = [record["path"] for record in manifest["index"]]  # a name it could not place drops it
        self.assertIn("index.html", index, self.stderr)
        self.assertGreater(len(index), 1 + 5, "a browse page for each of the five docs, and previews")
        self.assertEqual(coda_backup.read_latest(self.out), snapshot)


# --- SIGINT / SIGTERM ----------------------------------------------------------------------

class SignalTest(ResilienceCase):
    @unittest.skipUnless(os.name == "posix", "POSIX signals")
    def test_signal_cancels_the_run_cleanly(self) -> None:
        build_nightly(self.fake)
        previous = self.clean_snapshot()
        self.fake.export_delay = 60.0  # exports never finish: the run waits for the signal
        env = dict(os.environ, CODA_API_TOKEN=TOKEN)
        env.pop("CODA_API_URL", None)
        for signum, expected in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
            with self.subTest(signal=signum.name):
                self.fake.clear_log()
                before = snapshot_dirs(self.out)
                # Left alone, the run would end only when its exports time out, 120 s from now: one
                # that has ended within the 30 s hang guard below stopped because of the signal,
                # however loaded the machine is.
                proc = subprocess.Popen(
                    tool_command("--output", str(self.out), "--api-url", self.fake.api_url,
                                 *FAST_FLAGS, "--poll-interval", "0.02", "--export-timeout", "120"),
                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                )
                self.addCleanup(self._reap, proc)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not self.fake.requests("GET", r"/export/"):
                    self.assertIsNone(proc.poll(), "the run ended before the signal")
                    time.sleep(0.02)
                self.assertTrue(self.fake.requests("GET", r"/export/"), "the run never started polling")
                lock = json.loads((self.out / coda_backup.LOCK_NAME).read_text(encoding="utf-8"))
                self.assertEqual((lock["pid"], lock["host"]), (proc.pid, socket.gethostname()))
                self.assertRegex(lock["started_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
                proc.send_signal(signum)
                try:
                    _, stderr = proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    self.fail("the run did not stop on the signal")
                self.assertEqual(proc.returncode, expected, stderr.decode("utf-8", "replace"))
                created = snapshot_dirs(self.out) - before
                self.assertEqual(len(created), 1)
                self.assertEqual(self.summary(self.out / created.pop())["status"], "cancelled")
                self.assertEqual(coda_backup.read_latest(self.out), previous, "latest moved")
                self.assertEqual(os.readlink(self.out / coda_backup.LATEST_LINK), previous.name)
                self.assertFalse((self.out / coda_backup.LOCK_NAME).exists(), "lock left behind")
                self.assertNoLeftovers()

    def start_cli(self, *extra: str) -> subprocess.Popen[bytes]:
        """The CLI as its own process (signals need one), reaped when the test ends."""
        env = dict(os.environ, CODA_API_TOKEN=TOKEN)
        env.pop("CODA_API_URL", None)
        proc = subprocess.Popen(
            tool_command("--output", str(self.out), "--api-url", self.fake.api_url, *FAST_FLAGS, *extra),
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.addCleanup(self._reap, proc)
        return proc

    def wait_for_request(self, path: str) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not self.fake.requests("GET", path):
            time.sleep(0.02)
        self.assertTrue(self.fake.requests("GET", path), f"no request for {path} started")

    @unittest.skipUnless(os.name == "posix", "POSIX signals")
    def test_a_request_on_the_wire_does_not_delay_the_stop(self) -> None:
        build_nightly(self.fake)
        self.fake.latency = 30.0  # the first request hangs far longer than anyone would wait
        proc = self.start_cli("--timeout", "60")
        self.wait_for_request("^/whoami$")
        proc.send_signal(signal.SIGTERM)
        try:  # the request would hang for 30 s: a run that ends within 20 stopped without it
            _, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.fail("waited for the hanging request")
        self.assertEqual(proc.returncode, 143, stderr.decode("utf-8", "replace"))

    @unittest.skipUnless(os.name == "posix", "POSIX signals")
    def test_a_cut_request_is_not_sent_again(self) -> None:
        build_nightly(self.fake)
        self.fake.timeout_sleep = 30.0
        self.fake.add_fault(r"^/docs$", kind="timeout", times=None)  # the doc listing hangs
        proc = self.start_cli("--timeout", "60", "--max-retries", "3")
        self.wait_for_request("^/docs$")
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        self.assertEqual(proc.returncode, 143, stderr.decode("utf-8", "replace"))
        self.assertEqual(len(self.fake.requests("GET", r"^/docs$")), 1, "the cut request went out again")

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# --- answers of the wrong shape -------------------------------------------------------------

class WrongShapeTest(ResilienceCase):
    """Answers that parse but do not have the shape the API promises: recorded, never saved as if fine."""

    def test_rows_whose_values_are_not_an_object_fail_that_table(self) -> None:
        data = build_nightly(self.fake)
        people = data["people"]
        body = {"items": [{"id": "i-1", "type": "row", "name": "x", "index": 0, "values": ["Ana"]}]}
        self.fake.add_fault(rows_path(people) + "$", status=200, body=body, times=None)
        self.assertEqual(self.run_backup(), 1, self.stderr)
        failures = self.summary()["failures"]
        self.assertEqual([(f["kind"], f["id"]) for f in failures], [("table", people.id)])
        self.assertEqual(list(self.latest().rglob(f"*__{people.id}.csv")), [])

    def test_a_download_link_that_is_not_text_fails_fast(self) -> None:
        data = build_nightly(self.fake)
        notes = data["notes"]
        body = {"id": "x", "status": "complete", "downloadLink": 12345}
        self.fake.add_fault(rf"/pages/{notes.id}/export/", status=200, body=body, times=None)
        self.assertEqual(self.run_backup(), 1, self.stderr)
        self.assertEqual(len(self.fake.requests("GET", rf"/pages/{notes.id}/export/")), 1, "no polling on")
        self.assertIn("downloadLink", self.summary()["failures"][0]["error"])


# --- the lock ------------------------------------------------------------------------------

class LockTest(ResilienceCase):
    def write_lock(self, pid: int) -> Dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        holder = {"pid": pid, "host": socket.gethostname(), "started_at": "2026-03-07T02:30:00Z"}
        (self.out / coda_backup.LOCK_NAME).write_text(json.dumps(holder), encoding="utf-8")
        return holder

    def hold_lock_in_another_process(self) -> subprocess.Popen:
        """A second process that takes the run lock the way a run does, then waits."""
        self.out.mkdir(parents=True, exist_ok=True)
        code = (f"import sys, time; from pathlib import Path; sys.path.insert(0, {str(tool_dir())!r}); "
                "import coda_backup; "
                "lock = coda_backup.RunLock(Path(sys.argv[1])); lock.__enter__(); "
                "print('locked', flush=True); time.sleep(60)")
        holder = subprocess.Popen([sys.executable, "-c", code, str(self.out)], cwd=str(ROOT),
                                  stdout=subprocess.PIPE, text=True)
        self.addCleanup(lambda: (holder.kill(), holder.wait(timeout=10), holder.stdout and holder.stdout.close()))
        assert holder.stdout is not None
        self.assertEqual(holder.stdout.readline().strip(), "locked")
        return holder

    def test_a_live_lock_exits_4_and_names_the_holder(self) -> None:
        build_nightly(self.fake)
        holder = self.hold_lock_in_another_process()
        before = read_json(self.out / coda_backup.LOCK_NAME)
        code = self.run_backup()
        self.assertEqual(code, 4, self.stderr)
        self.assertIn(f"pid {holder.pid}", self.stderr)
        self.assertIn(socket.gethostname(), self.stderr)
        self.assertEqual(read_json(self.out / coda_backup.LOCK_NAME), before, "the holder's lock was touched")
        self.assertEqual(snapshot_dirs(self.out), set(), "a locked-out run created a snapshot")
        self.assertEqual(self.fake.log, [], "a locked-out run talked to the API")

    def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(self) -> None:
        build_nightly(self.fake)
        holder = self.hold_lock_in_another_process()
        holder.kill()  # kill -9: no cleanup runs, the lock file stays behind
        holder.wait(timeout=10)
        self.assertTrue((self.out / coda_backup.LOCK_NAME).exists())
        code, snapshot = self.run_new()
        self.assertEqual(code, 0, self.stderr)
        self.assertRegex(self.stderr, rf"WARNING.*\b{holder.pid}\b")
        self.assertFalse((self.out / coda_backup.LOCK_NAME).exists(), "lock not removed after the run")
        self.assertEqual(coda_backup.read_latest(self.out), snapshot)

    def test_a_reused_pid_does_not_keep_the_folder_locked(self) -> None:
        # After a reboot the dead run's pid may belong to another live process (here: this one).
        build_nightly(self.fake)
        self.write_lock(os.getpid())
        code, _ = self.run_new()
        self.assertEqual(code, 0, self.stderr)
        self.assertIn("taking over the lock", self.stderr)

    def test_a_stale_lock_is_taken_over_with_a_warning(self) -> None:
        build_nightly(self.fake)
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait(timeout=10)
        self.write_lock(gone.pid)
        code, snapshot = self.run_new()
        self.assertEqual(code, 0, self.stderr)
        self.assertRegex(self.stderr, rf"WARNING.*\b{gone.pid}\b")
        self.assertFalse((self.out / coda_backup.LOCK_NAME).exists(), "lock not removed after the run")
        self.assertEqual(coda_backup.read_latest(self.out), snapshot)


if __name__ == "__main__":
    unittest.main()
