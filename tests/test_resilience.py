"""Nightly-run safety, part one: faults ridden through, faults recorded, never corrupt, exit 3.

Every test runs the real CLI in-process (through `support.BackupTestCase`) over HTTP against the
fake and asserts on exit codes, files, summary.json and the fake's request log.  "Ridden through"
always means: exit 0 and a snapshot byte-identical to a clean run against the same fake.
Signals, the lock, token leaks, permissions and hostile names are in test_safety.py; the nightly
workspace and ResilienceCase are in support.py.
"""

from __future__ import annotations

import os
import re
import sys
import unittest
from pathlib import Path
from typing import Any, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import coda_backup
from fake_coda import FAULT_KINDS, FakeCoda
from support import ENOUGH_RETRIES, TOKEN, ResilienceCase, build_nightly, read_csv, rows_path, tree_bytes

# --- faults it must ride through -----------------------------------------------------------

class RideThroughTest(ResilienceCase):
    def test_each_fault_kind_at_ten_percent_is_ridden_through(self) -> None:
        build_nightly(self.fake)
        clean = self.clean_snapshot()
        for kind in FAULT_KINDS:
            with self.subTest(kind=kind):
                self.fake.clear_log()
                self.fake.fault_rate, self.fake.fault_kinds = 0.1, (kind,)
                self.fake.timeout_sleep = 0.3
                extra = ["--timeout", "0.1"] if kind == "timeout" else []
                try:
                    code, snapshot = self.run_new(*ENOUGH_RETRIES, *extra)
                finally:
                    self.fake.fault_rate = 0.0
                injected = sum(1 for record in self.fake.log if record.fault == kind)
                self.assertGreater(injected, 0, "the seed injected no fault: the subtest proves nothing")
                self.assertEqual(code, 0, self.stderr)
                summary = self.summary(snapshot)
                self.assertEqual((summary["status"], summary["failures"]), ("completed", []))
                self.assertEqual(coda_backup.read_latest(self.out), snapshot)
                self.assertSameTree(clean, snapshot)
                self.assertGreater(summary["requests"]["retries"], 0)
                if kind.startswith("429"):
                    self.assertGreater(self.fake.rate_limited, 0)
                    self.assertEqual(summary["requests"]["rate_limited"], self.fake.rate_limited)
        self.assertNoLeftovers()

    def test_retry_after_of_one_second_is_honoured(self) -> None:
        doc = self.fake.add_doc("Two Pages")
        doc.add_page("One")
        doc.add_page("Two")
        clean = self.clean_snapshot()
        self.fake.clear_log()
        # The fake's own limiter: one export POST per second, 429 with Retry-After: 1 beyond that.
        self.fake.rate_limits = {"write": (1, 1.0)}
        self.fake.retry_after = 1
        code, snapshot = self.run_new()
        self.assertEqual(code, 0, self.stderr)
        posts = self.fake.requests("POST", r"/export$")
        limited = [r for r in posts if r.status == 429]
        self.assertEqual(len(limited), 1, [(r.path, r.status) for r in posts])
        retry = [r for r in posts if r.path == limited[0].path and r.started > limited[0].started]
        self.assertTrue(retry, "the rate-limited POST was never retried")
        gap = retry[0].started - limited[0].ended
        self.assertGreaterEqual(gap, 0.95, "Retry-After: 1 not honoured")
        summary = self.summary(snapshot)
        self.assertEqual(summary["requests"]["rate_limited"], 1)
        self.assertEqual(self.fake.rate_limited, 1)
        self.assertSameTree(clean, snapshot)

    def test_export_that_expires_on_poll_is_started_again(self) -> None:
        data = build_nightly(self.fake)
        clean = self.clean_snapshot()
        self.fake.clear_log()
        data["notes"].export_expire_times = 1
        code, snapshot = self.run_new()
        self.assertEqual(code, 0, self.stderr)
        for page in (data["home"], data["runbook"], data["notes"]):
            posts = self.fake.requests("POST", rf"/pages/{page.id}/export$")
            expired = self.fake.requests("GET", rf"/pages/{page.id}/export/")
            with self.subTest(page=page.name):
                self.assertEqual(len(posts), 2 if page is data["notes"] else 1)
                if page is data["notes"]:
                    self.assertEqual([r.status for r in expired].count(404), 1)
        self.assertSameTree(clean, snapshot)

    def test_expired_download_link_is_fetched_again(self) -> None:
        data = build_nightly(self.fake)
        clean = self.clean_snapshot()
        self.fake.clear_log()
        data["notes"].download_expire_times = 1
        code, snapshot = self.run_new()
        self.assertEqual(code, 0, self.stderr)
        downloads = self.fake.requests(host="download")
        refused = [r for r in downloads if r.status == 403]
        self.assertEqual(len(refused), 1, [(r.path, r.status) for r in downloads])
        self.assertEqual(len(downloads), 3 + 1, "three pages, one of them downloaded twice")
        polls = self.fake.requests("GET", rf"/pages/{data['notes'].id}/export/")
        self.assertTrue(any(p.started > refused[0].ended for p in polls), "no fresh poll after the 403")
        self.assertEqual(len(self.fake.requests("POST", rf"/pages/{data['notes'].id}/export$")), 1)
        self.assertSameTree(clean, snapshot)

    def test_strict_latest_sends_the_header_and_retries_a_stale_doc(self) -> None:
        data = build_nightly(self.fake)
        clean = self.clean_snapshot()
        carrying = [r.path for r in self.fake.requests(host=None) if "x-coda-doc-version" in r.headers]
        self.assertEqual(carrying, [], "the header without --strict-latest")
        self.fake.clear_log()
        data["doc"].stale_times = 2
        code, snapshot = self.run_new("--strict-latest")
        self.assertEqual(code, 0, self.stderr)
        self.assertSameTree(clean, snapshot)
        self.assertEqual(data["doc"].stale_times, 0)
        self.assertEqual([r.status for r in self.fake.requests()].count(400), 2)
        doc_content = re.compile(rf"^/docs/{data['doc'].id}/(pages|tables|formulas|controls)")
        checked = 0
        for record in self.fake.requests(host=None):
            header = record.headers.get("x-coda-doc-version")
            if record.host == "api" and doc_content.search(record.path):
                checked += 1
                self.assertEqual(header, "latest", f"{record.method} {record.path}")
            elif record.host == "download" or record.path in ("/whoami", "/docs"):
                self.assertIsNone(header, f"{record.host} {record.method} {record.path}")
        self.assertGreater(checked, 10)

    def test_strict_latest_doc_that_stays_stale_is_a_recorded_failure(self) -> None:
        data = build_nightly(self.fake, second_doc=True)
        data["doc"].stale_times = 10**6
        data["doc2"].stale_times = 1  # cured by one retry
        code, snapshot = self.run_new("--strict-latest", "--max-retries", "2")
        self.assertEqual(code, 1, self.stderr)
        summary = self.summary(snapshot)
        self.assertEqual(summary["status"], "completed_with_errors")
        self.assertTrue(summary["failures"])
        for failure in summary["failures"]:
            self.assertEqual(failure["doc_id"], data["doc"].id, failure)
            self.assertIn("400", failure["error"])
        self.assertEqual(coda_backup.read_latest(self.out), snapshot)
        doc2 = self.doc_dir(data["doc2"], snapshot)
        self.assertTrue(list(doc2.rglob(f"*__{data['welcome'].id}.md")))
        self.assertTrue(list(doc2.rglob(f"*__{data['glossary'].id}.csv")))

    def test_repeating_page_token_stops_paging_and_keeps_the_rows_read(self) -> None:
        data = build_nightly(self.fake)
        tasks = data["tasks"]
        self.fake.max_limit = 4
        self.fake.repeat_token = rows_path(tasks)
        code, snapshot = self.run_new()
        self.assertEqual(code, 1, self.stderr)
        self.assertLessEqual(len(self.fake.requests("GET", rows_path(tasks))), 3, "paging did not stop")
        summary = self.summary(snapshot)
        self.assertEqual(summary["status"], "completed_with_errors")
        failure = self.failure_for(summary, tasks.id)
        self.assertEqual((failure["kind"], failure["doc_id"]), ("table", data["doc"].id))
        self.assertEqual(self.manifest_entry(snapshot, tasks.id)["status"], "failed")
        rows = read_csv(self.find_one(snapshot, f"*__{tasks.id}.csv"))
        ids = [row[0] for row in rows[1:]]
        self.assertGreaterEqual(len(ids), 4, "the rows read before the repeat were dropped")
        self.assertEqual(ids, [row.id for row in tasks.rows][: len(ids)], "rows missing or repeated")
        # The view paginates normally under the same small limit.
        view_rows = read_csv(self.find_one(snapshot, f"*__{data['view'].id}.csv"))
        self.assertEqual(len(view_rows) - 1, len(data["view"].rows))


# --- faults that end in exit 1 with everything else saved ------------------------------------

class RecordedFailureTest(ResilienceCase):
    def test_one_failed_object_is_recorded_and_everything_else_is_saved(self) -> None:
        data = build_nightly(self.fake, second_doc=True)
        clean = self.clean_snapshot()
        clean_files = tree_bytes(clean)
        doc_folder = self.doc_dir(data["doc2"], clean).relative_to(clean).as_posix() + "/"

        def break_export() -> None:
            data["notes"].export_fail_times = 10**6

        def break_rows() -> None:
            self.fake.add_fault(rows_path(data["people"]), status=500, times=None)

        def forbid_doc() -> None:
            data["doc2"].forbidden = True

        cases = [
            # (label, switch on, kind, doc, object, files of the object that must be absent)
            ("export fails", break_export, "page", data["doc"], data["notes"], f"__{data['notes'].id}.md"),
            ("rows 500", break_rows, "table", data["doc"], data["people"], f"__{data['people'].id}.csv"),
            ("doc 403", forbid_doc, "doc", data["doc2"], data["doc2"], doc_folder + "pages/"),
        ]
        for label, switch_on, kind, doc, obj, absent in cases:
            with self.subTest(label):
                switch_on()
                try:
                    code, snapshot = self.run_new()
                finally:
                    data["notes"].export_fail_times = 0
                    data["doc2"].forbidden = False
                    self.fake.clear_faults()
                self.assertEqual(code, 1, self.stderr)
                summary = self.summary(snapshot)
                self.assertEqual(summary["status"], "completed_with_errors")
                self.assertEqual(summary["counts"]["failures"], 1)
                failure = self.failure_for(summary, obj.id)
                self.assertEqual(failure["kind"], kind)
                self.assertEqual(failure["doc_id"], doc.id)
                self.assertEqual(failure["name"], obj.name)
                self.assertTrue(failure["error"].strip(), "empty error text")
                self.assertEqual(self.manifest_entry(snapshot, obj.id)["status"], "failed")
                self.assertEqual(coda_backup.read_latest(self.out), snapshot, "latest did not move")
                got = tree_bytes(snapshot)
                self.assertEqual([name for name in got if absent in name], [], "files of the failed object")
                owned = (doc_folder,) if kind == "doc" else (f"__{obj.id}",)
                others = {name: body for name, body in clean_files.items() if not any(o in name for o in owned)}
                self.assertTrue(others)
                self.assertEqual({n: got.get(n) for n in others}, others, "other objects not saved intact")
        self.assertNoLeftovers()

    def test_rows_that_keep_timing_out_are_read_again_in_smaller_pages(self) -> None:
        data = build_nightly(self.fake, big_rows=120)
        tasks = data["tasks"]
        self.fake.add_fault(rows_path(tasks) + "$", status=504, times=2)  # and the first small page too
        self.assertEqual(self.run_backup("--max-retries", "1"), 0, self.stderr)
        limits = [record.query.get("limit") for record in self.fake.requests("GET", rows_path(tasks) + "$")]
        # one 504 at the full size is enough to go small; a 504 at the small size is retried as usual
        self.assertEqual(limits[:3], [str(coda_backup.ROW_LIMIT)] + [str(coda_backup.SMALL_ROW_LIMIT)] * 2)
        self.assertEqual(limits.count(str(coda_backup.ROW_LIMIT)), 1)
        self.assertEqual(len(read_csv(self.find_one(self.latest(), f"*__{tasks.id}.csv"))), 1 + 120)

    def test_max_retries_bounds_attempts_per_request(self) -> None:
        data = build_nightly(self.fake)
        people = data["people"]
        for kind in ("status", "reset"):
            for retries in (0, 2):
                with self.subTest(kind=kind, max_retries=retries):
                    self.fake.clear_log()
                    self.fake.add_fault(rows_path(people), status=503, kind=kind, times=None)
                    try:
                        code, snapshot = self.run_new("--max-retries", str(retries))
                    finally:
                        self.fake.clear_faults()
                    self.assertEqual(len(self.fake.requests("GET", rows_path(people))), retries + 1)
                    self.assertEqual(code, 1, self.stderr)
                    self.failure_for(self.summary(snapshot), people.id)

    def test_api_unreachable_after_retries_exits_3(self) -> None:
        """An API that answers 503 forever; one that refuses connections is in test_cli."""
        build_nightly(self.fake)
        self.fake.add_fault(r"^/whoami$", status=503, times=None)
        code, snapshot = self.run_new("--max-retries", "2")
        self.assertEqual(code, 3, self.stderr)
        self.assertNotIn("Traceback", self.stderr)
        self.assertEqual(len(self.fake.requests("GET", r"^/whoami$")), 3)
        self.assertEqual(self.summary(snapshot)["status"], "failed")
        self.assertIsNone(coda_backup.read_latest(self.out), "latest moved after a fatal run")
        self.assertNoLeftovers()


# --- never corrupt -------------------------------------------------------------------------

class NeverCorruptTest(ResilienceCase):
    def test_no_temp_files_after_a_run_full_of_faults(self) -> None:
        fake = self.fake
        data = build_nightly(fake, second_doc=True, big_rows=30)
        fake.max_limit = 10
        self._fail_after_first_page(fake, data["tasks"])  # mid-stream CSV failure
        data["notes"].export_fail_times = 10**6
        data["welcome"].download_expire_times = 10**6  # the link keeps expiring
        fake.fault_rate, fake.fault_kinds = 0.2, tuple(k for k in FAULT_KINDS if k != "timeout")
        code, snapshot = self.run_new(*ENOUGH_RETRIES)
        self.assertEqual(code, 1, self.stderr)
        failed = {f["id"] for f in self.summary(snapshot)["failures"]}
        self.assertEqual(failed, {data["tasks"].id, data["notes"].id, data["welcome"].id})
        self.assertNoLeftovers()
        self.assertFalse((self.out / coda_backup.LOCK_NAME).exists(), "lock left behind")

    def _fail_after_first_page(self, fake: FakeCoda, table: Any) -> None:
        """Rows of `table` answer 500 forever once their first page was served."""
        pattern = re.compile(rows_path(table))

        def after(request: Any, reply: Any) -> None:
            if pattern.search(request.path) and "pageToken" not in request.query and reply.status == 200:
                fake.after_api.remove(after)
                fake.add_fault(rows_path(table), status=500, times=None)

        fake.after_api.append(after)

    def test_rows_failing_mid_stream_leave_no_csv(self) -> None:
        fake = self.fake
        data = build_nightly(fake, big_rows=30)
        tasks = data["tasks"]
        fake.max_limit = 10
        self._fail_after_first_page(fake, tasks)
        code, snapshot = self.run_new()
        self.assertEqual(code, 1, self.stderr)
        served = [r.status for r in fake.requests("GET", rows_path(tasks))]
        self.assertEqual(served[0], 200)
        self.assertIn(500, served, "the fault never fired: the test proves nothing")
        self.assertEqual(list(snapshot.rglob(f"*__{tasks.id}.csv")), [], "a half CSV was kept")
        self.failure_for(self.summary(snapshot), tasks.id)
        self.assertEqual(self.manifest_entry(snapshot, tasks.id)["status"], "failed")
        self.assertTrue(list(snapshot.rglob(f"*__{data['people'].id}.csv")))
        self.assertNoLeftovers()

    def test_csv_is_written_while_rows_stream(self) -> None:
        fake = self.fake
        doc = fake.add_doc("Streaming")
        big = doc.add_table("Big", columns=["Name", "Blob"])
        for i in range(30):
            big.add_row({"Name": f"row {i:02d}", "Blob": f"{i:02d}" * 2000})  # 4 kB a row
        fake.max_limit = 10
        seen: List[bytes] = []
        pattern = re.compile(rows_path(big))

        def before(request: Any) -> None:
            if pattern.search(request.path) and "pageToken" in request.query and not seen:
                seen.extend(path.read_bytes() for path in self.out.rglob(".tmp-*") if path.is_file())

        fake.before_api.append(before)
        code, snapshot = self.run_new()
        self.assertEqual(code, 0, self.stderr)
        self.assertTrue(any(big.rows[0].id.encode() in data for data in seen),
                        "the first page of rows was not on disk when the second was requested")
        self.assertEqual(len(read_csv(self.find_one(snapshot, f"*__{big.id}.csv"))), 31)

    def test_a_failing_rerun_leaves_the_previous_snapshot_untouched(self) -> None:
        data = build_nightly(self.fake)
        first = self.clean_snapshot()
        before = tree_bytes(first, skip=())
        modes = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
        data["tasks"].add_row({"Task": "late change", "Points": 1})  # changed: read again
        self.fake.add_fault(rows_path(data["tasks"]), status=500, times=None)
        code, second = self.run_new("--incremental")
        self.assertEqual(code, 1, self.stderr)
        self.assertEqual(tree_bytes(first, skip=()), before, "the previous snapshot changed")
        self.assertEqual({p: p.stat().st_mtime_ns for p in first.rglob("*")}, modes)
        self.assertEqual(list(second.rglob(f"*__{data['tasks'].id}.csv")), [])
        self.assertEqual(coda_backup.read_latest(self.out), second)
        self.assertNoLeftovers()

    def test_fatal_run_leaves_latest_on_the_previous_snapshot(self) -> None:
        build_nightly(self.fake)
        first = self.clean_snapshot()
        self.assertLatestAgree(first)
        self.set_env("CODA_API_TOKEN", "not-the-token")  # the fake answers 401
        code, failed = self.run_new()
        self.assertEqual(code, 3, self.stderr)
        self.assertEqual(self.summary(failed)["status"], "failed")
        self.assertLatestAgree(first)
        self.set_env("CODA_API_TOKEN", TOKEN)
        second = self.clean_snapshot()
        self.assertLatestAgree(second)
        self.assertNoLeftovers()

    def assertLatestAgree(self, snapshot: Path) -> None:
        text = (self.out / coda_backup.LATEST_TXT).read_text(encoding="utf-8").strip()
        self.assertEqual(text, snapshot.name, "latest.txt")
        if os.name == "posix":
            self.assertEqual(os.readlink(self.out / coda_backup.LATEST_LINK), snapshot.name, "latest symlink")
            self.assertEqual((self.out / coda_backup.LATEST_LINK).resolve(), snapshot.resolve())


if __name__ == "__main__":
    unittest.main()
