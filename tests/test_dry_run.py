"""--dry-run: what a run would back up (and, with --incremental, link), with nothing written.

Whether a dry run and a real run agree on what changed is in test_reuse.DryRunAgreesTest.
"""

from __future__ import annotations

import unittest
from typing import List

import coda_backup
from support import (
    SmallWorkspaceTestCase,
    files_under,
)

# --- --dry-run --------------------------------------------------------------------------------


class DryRunTest(SmallWorkspaceTestCase):
    TWO_DOCS = True

    def assert_no_work_requests(self) -> None:
        self.assertEqual([r.path for r in self.fake.requests("POST")], [], "no export POSTs")
        self.assertEqual([r.path for r in self.fake.requests("GET", r"/rows")], [], "no rows read")
        self.assertEqual([r.path for r in self.fake.requests(None, None, host="download")], [])

    def lines_for(self, object_id: str) -> List[str]:
        return [line for line in self.stdout.splitlines() if object_id in line]

    def test_lists_pages_and_tables_and_writes_nothing(self) -> None:
        self.assertEqual(self.run_backup("--dry-run"), 0, self.stderr)
        self.assertFalse(self.out.exists(), "--dry-run must not create --output")
        self.assert_no_work_requests()
        lines = self.stdout.splitlines()
        header = {doc.id: next(i for i, line in enumerate(lines) if doc.id in line and doc.name in line)
                  for doc in (self.ws.alpha, self.ws.beta)}
        for obj in self.ws.pages + self.ws.tables:
            with self.subTest(obj=obj.name):
                found = [i for i, line in enumerate(lines) if obj.id in line]
                self.assertEqual(len(found), 1, f"one line for {obj.name}: {self.stdout}")
                self.assertIn(obj.name, lines[found[0]])
                if obj in self.ws.tables:
                    self.assertRegex(lines[found[0]], rf"\b{len(obj.rows)} rows\b")
                # listed under its own doc
                other = self.ws.beta if obj.doc is self.ws.alpha else self.ws.alpha
                self.assertGreater(found[0], header[obj.doc.id])
                if header[other.id] > header[obj.doc.id]:
                    self.assertLess(found[0], header[other.id])
        totals = lines[-1]
        total_rows = sum(len(table.rows) for table in self.ws.tables)
        for text in ("2 docs", f"{len(self.ws.pages)} pages", f"{total_rows} rows"):
            self.assertIn(text, totals)

    def test_incremental_dry_run_beside_a_live_run(self) -> None:
        """What --incremental would skip, while another run holds the lock; nothing is touched."""
        self.assertEqual(self.run_backup("--no-extras"), 0, self.stderr)
        self.ws.details.touch()  # alpha changes, but only one page of it
        held = coda_backup.RunLock(self.out).__enter__()  # as another run would hold it
        self.addCleanup(held.__exit__, None, None, None)
        self.assertEqual(self.run_backup("--no-extras"), 4, "control: a real run sees the lock as held")
        before = {path: (p.stat().st_size, p.stat().st_mtime_ns) for path, p in files_under(self.out).items()}
        entries_before = sorted(p.name for p in self.out.iterdir())
        self.fake.clear_log()
        self.assertEqual(self.run_backup("--dry-run", "--incremental", "--no-extras"), 0, self.stderr)
        self.assert_no_work_requests()
        after = {path: (p.stat().st_size, p.stat().st_mtime_ns) for path, p in files_under(self.out).items()}
        self.assertEqual(after, before)
        self.assertEqual(sorted(p.name for p in self.out.iterdir()), entries_before)
        self.assertTrue((self.out / coda_backup.LOCK_NAME).is_file())
        self.assertEqual(len(self.lines_for(self.ws.details.id)), 1, self.stdout)
        self.assertNotIn("unchanged", self.lines_for(self.ws.details.id)[0])
        for obj in (self.ws.overview, self.ws.notes, self.ws.tasks, self.ws.archive):
            with self.subTest(obj=obj.name):
                self.assertEqual(len(self.lines_for(obj.id)), 1, self.stdout)
                self.assertIn("unchanged", self.lines_for(obj.id)[0])
        self.assertIn("unchanged", " ".join(self.lines_for(self.ws.beta.id)), "beta did not change at all")


if __name__ == "__main__":
    unittest.main()
