"""--incremental you can trust: the one reuse policy, resuming from any snapshot, calculated
columns, --max-age, checked links, read-only snapshot files and --retry-failed.

The policy is pure and gets table-driven tests without a server. The rest runs the real CLI
against the fake (a subprocess where a signal is needed) and asserts on requests, inodes and the
manifest's `fetchedAt`, `reusedFrom` and `reason`.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import stat
import subprocess
import threading
import time
import unittest
from pathlib import Path
from typing import Any, Callable, Dict, List

from support import (
    FAST_FLAGS,
    TOKEN,
    IncrementalTestCase,
    SmallWorkspaceTestCase,
    build_incremental_workspace,
    coda_backup,
    flip_one_byte,
    manifest_entries,
    manifest_entry,
    read_csv,
    tool_command,
)

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)
FRESH = NOW - dt.timedelta(days=1)
SNAP = Path("/backups/2026-11-30T120000Z")


def saved(entry: Dict[str, Any], **facts: Any) -> coda_backup.SavedCopy:
    facts.setdefault("fetched_at", FRESH)
    return coda_backup.SavedCopy(SNAP, dict({"status": "ok", "updatedAt": "t1"}, **entry), **facts)


def files(*roles: str) -> Dict[str, Any]:
    return {"files": [{"path": f"x.{role}", "size": 1, "sha256": "ab", "role": role} for role in roles]}


def never(*_: Any) -> Any:
    raise AssertionError("asked for a fact the decision did not need")


class PolicyTest(unittest.TestCase):
    """Each row: the facts, then the expected (reuse?, reason)."""

    def policy(self, **options: Any) -> coda_backup.ReusePolicy:
        return coda_backup.ReusePolicy(now=NOW, layout={"k": 1}, **options)

    def check(self, cases: Dict[str, Any], decide: Callable[..., coda_backup.Decision]) -> None:
        for name, (args, expected) in cases.items():
            with self.subTest(case=name):
                decision = decide(*args)
                self.assertEqual((decision.reuse, decision.reason), expected)
                if decision.reuse:
                    self.assertIsNotNone(decision.source, "a reuse names where from")

    def test_tables_and_views(self) -> None:
        table = files("table", "columns", "csv")
        plain = {"updatedAt": "t1"}
        view = {"updatedAt": "t1", "parentTable": {"id": "grid-base"}}
        same_base: Callable[[], Any] = lambda: "b1"  # noqa: E731
        policy, rows_json, retry = self.policy(), self.policy(rows_json=True), self.policy(retry_failed=True)
        cases = {
            "nothing saved": ((policy, plain, None, "d1", never), (False, "no saved copy")),
            "unchanged": ((policy, plain, saved(dict(table, calculatedColumns=0), doc_updated="d1"), "d2", never),
                          (True, "unchanged")),
            "updatedAt moved": ((policy, {"updatedAt": "t2"}, saved(table), "d1", never), (False, "changed")),
            "no updatedAt": ((policy, {}, saved(table), "d1", never), (False, "changed")),
            "NDJSON now wanted": ((rows_json, plain, saved(table), "d1", never), (False, "other files asked for")),
            "formula, doc moved": ((policy, plain, saved(dict(table, calculatedColumns=2), doc_updated="d1"), "d2",
                                    never), (False, "calculated columns, doc changed")),
            "formula, doc still": ((policy, plain, saved(dict(table, calculatedColumns=2), doc_updated="d1"), "d1",
                                    never), (True, "unchanged")),
            "no formula, doc moved": ((policy, plain, saved(dict(table, calculatedColumns=0), doc_updated="d1"), "d2",
                                       never), (True, "unchanged")),
            "old manifest, doc moved": ((policy, plain, saved(table, doc_updated="d1"), "d2", never),
                                        (False, "calculated columns, doc changed")),
            "8 days old": ((policy, plain, saved(table, fetched_at=NOW - dt.timedelta(days=8)), None, never),
                           (False, "older than --max-age")),
            "3 days old": ((policy, plain, saved(table, fetched_at=NOW - dt.timedelta(days=3)), None, never),
                           (True, "unchanged")),
            "download time unknown": ((policy, plain, saved(table, fetched_at=None), None, never),
                                      (False, "older than --max-age")),
            "--max-age 0": ((self.policy(max_age_days=0), plain, saved(table), None, never),
                            (False, "older than --max-age")),
            "view, base moved": ((policy, view, saved(table, base_updated="b0"), None, same_base),
                                 (False, "base table changed")),
            "view, base still": ((policy, view, saved(table, base_updated="b1"), None, same_base),
                                 (True, "unchanged")),
            "view, base gone": ((policy, view, saved(table, base_updated="b1"), None, lambda: None),
                                (False, "base table changed")),
            "--retry-failed": ((retry, {"updatedAt": "t9"}, saved(table), "d9", never),
                               (True, "saved before (--retry-failed)")),
            "BOM now, none then": ((self.policy(csv_bom=True), plain, saved(table), "d1", never),
                                   (False, "other flags")),
            "no BOM now, one then": ((policy, plain, saved(table, layout={"csv_bom": True}), "d1", never),
                                     (False, "other flags")),
            "BOM now and then": ((self.policy(csv_bom=True), plain,
                                  saved(dict(table, calculatedColumns=0), layout={"csv_bom": True}), "d1", never),
                                 (True, "unchanged")),
        }
        self.check(cases, lambda policy, *facts: policy.table(*facts))

    def test_refresh_age_is_spread_below_max_age(self) -> None:
        """Objects saved the same night fall due on different nights, never later than --max-age."""
        cases = {  # (max age, number of objects) -> nights on which some of them fall due
            "7 days": (7.0, 400, {4, 5, 6, 7}),
            "1 day": (1.0, 50, {1}),
            "28 days": (28.0, 400, set(range(15, 29))),
        }
        for name, (max_age, count, nights) in cases.items():
            with self.subTest(case=name):
                ages = [coda_backup.refresh_age(max_age, f"grid-{number}", FRESH) for number in range(count)]
                self.assertTrue(all(dt.timedelta(days=max_age / 2) <= age <= dt.timedelta(days=max_age)
                                    for age in ages))
                due = {int(age.total_seconds() // 86400) + 1 for age in ages}  # the first nightly run past it
                self.assertEqual(due, nights)
        once = coda_backup.refresh_age(7.0, "grid-1", FRESH)
        self.assertEqual(once, coda_backup.refresh_age(7.0, "grid-1", FRESH), "stable for one download")
        later = [coda_backup.refresh_age(7.0, "grid-1", FRESH + dt.timedelta(days=day)) for day in range(1, 6)]
        self.assertGreater(len(set(later + [once])), 1, "a new draw after every download")

    def test_pages(self) -> None:
        page = files("markdown")
        policy = self.policy()
        cases = {
            "nothing saved": ((policy, {"updatedAt": "t1"}, None, never), (False, "no saved copy")),
            "unchanged, no tables": ((policy, {"updatedAt": "t1"}, saved(page), lambda: {}), (True, "unchanged")),
            "its tables the same": ((policy, {"updatedAt": "t1"}, saved(page, hosted={"g": "s1"}),
                                     lambda: {"g": "s1"}), (True, "unchanged")),
            "a table changed": ((policy, {"updatedAt": "t1"}, saved(page, hosted={"g": "s1"}),
                                 lambda: {"g": "s2"}), (False, "a table on it changed")),
            "a table failed now": ((policy, {"updatedAt": "t1"}, saved(page, hosted={"g": "s1"}),
                                    lambda: {"g": None}), (False, "a table on it changed")),
            # The page was saved while its table failed: nothing says it showed the table as it is.
            "a table failed then": ((policy, {"updatedAt": "t1"}, saved(page, hosted={"g": None}),
                                     lambda: {"g": "s1"}), (False, "a table on it changed")),
            "a table added": ((policy, {"updatedAt": "t1"}, saved(page, hosted={}), lambda: {"g": "s1"}),
                              (False, "a table on it changed")),
            "text changed": ((policy, {"updatedAt": "t2"}, saved(page), never), (False, "changed")),
            "HTML now wanted": ((self.policy(page_formats=("html",)), {"updatedAt": "t1"}, saved(page), never),
                                (False, "other files asked for")),
            "too old": ((self.policy(max_age_days=0.5), {"updatedAt": "t1"}, saved(page), never),
                        (False, "older than --max-age")),
        }
        self.check(cases, lambda policy, *facts: policy.page(*facts))

    def test_docs(self) -> None:
        doc = dict(files("doc"), pages=[], tables=[])
        policy = self.policy()
        cases = {
            "nothing saved": ((policy, {"updatedAt": "t1"}, None), (False, "no saved copy")),
            "whole and unchanged": ((policy, {"updatedAt": "t1"}, saved(doc, whole=True, layout={"k": 1})),
                                    (True, "doc unchanged")),
            "part of it not saved": ((policy, {"updatedAt": "t1"}, saved(doc, whole=False, layout={"k": 1})),
                                     (False, "not all of it saved")),
            "other flags": ((policy, {"updatedAt": "t1"}, saved(doc, whole=True, layout={"k": 2})),
                            (False, "other flags")),
            "changed": ((policy, {"updatedAt": "t2"}, saved(doc, whole=True, layout={"k": 1})), (False, "changed")),
            "too old": ((self.policy(max_age_days=0), {"updatedAt": "t1"}, saved(doc, whole=True, layout={"k": 1})),
                        (False, "older than --max-age")),
        }
        self.check(cases, lambda policy, *facts: policy.doc(*facts))


class ReuseCase(IncrementalTestCase):
    def entries(self, snapshot: Path) -> Dict[str, Dict[str, Any]]:
        return manifest_entries(self.manifest(snapshot))

    def assert_same_inode(self, new: Path, old: Path) -> None:
        self.assertEqual(new.read_bytes(), old.read_bytes())
        if os.name == "posix":
            self.assertEqual(new.stat().st_ino, old.stat().st_ino, f"{new} is not a hard link of {old}")


class DryRunAgreesTest(ReuseCase):
    def test_a_page_showing_a_table_that_failed_is_exported_by_the_run_and_the_dry_run(self) -> None:
        ws = build_incremental_workspace(self.fake)
        self.fake.add_fault(rf"/tables/{ws.plain.id}/rows$", status=403, times=None)
        first = self.backup(expect=1)
        self.fake.clear_faults()

        self.assertEqual(self.run_backup("--dry-run", "--incremental", "--no-extras"), 0, self.stderr)
        planned = self.stdout.splitlines()
        self.fake.clear_log()
        second = self.backup("--incremental")

        self.assertEqual(sorted(self.export_posts()), [self.export_path(ws.overview)], "the run exports it")
        self.assertEqual(self.entries(second)[ws.overview.id]["reason"], "a table on it changed")
        overview = [line for line in planned if ws.overview.id in line]
        self.assertEqual(len(overview), 1, planned)
        self.assertIn("export (a table on it changed)", overview[0])
        details = [line for line in planned if ws.details.id in line]
        self.assertIn(f"link from {first.name} (unchanged)", details[0])


class ResumeTest(ReuseCase):
    @unittest.skipUnless(os.name == "posix", "POSIX signals")
    def test_after_ctrl_c_or_kill_only_what_was_not_saved_is_fetched(self) -> None:
        ws = build_incremental_workspace(self.fake)
        saved_objects = ws.pages[:3] + [ws.items, ws.open_items, ws.plain, ws.glossary]
        for signum, status in ((signal.SIGINT, "cancelled"), (signal.SIGKILL, "abandoned")):
            with self.subTest(signal=signum.name):
                self.out = self.out.parent / signum.name
                interrupted = self.interrupt_at_the_last_export(ws.home, signum, saved_objects)
                if signum == signal.SIGKILL:  # no manifest.json: the journal says what was saved
                    self.assertFalse((interrupted / "manifest.json").exists())
                self.fake.clear_log()
                resumed = self.backup("--incremental")
                self.assertEqual(self.export_posts(), [self.export_path(ws.home)])
                self.assertEqual(self.rows_gets(), [])

                self.assertEqual(self.summary(interrupted)["status"], status)
                saved_before = manifest_entries(coda_backup.read_manifest(interrupted))
                self.assertNotIn(ws.home.id, saved_before)
                for obj in saved_objects:
                    self.assertEqual(saved_before[obj.id]["status"], "ok", obj.name)
                entries = self.entries(resumed)
                for obj in saved_objects:
                    self.assertEqual((entries[obj.id]["status"], entries[obj.id]["reusedFrom"]),
                                     ("unchanged", interrupted.name), obj.name)
                    self.assertEqual(entries[obj.id]["fetchedAt"], saved_before[obj.id]["fetchedAt"])
                self.assert_same_inode(self.table_csv(resumed, ws.items), self.table_csv(interrupted, ws.items))
                self.assertEqual(self.page_file(resumed, ws.home).read_text(encoding="utf-8"), ws.home.content)
                self.assertEqual(self.summary(resumed)["status"], "completed")
                self.assertFalse((resumed / coda_backup.JOURNAL_NAME).exists(), "the journal outlived the run")

    def interrupt_at_the_last_export(self, page: Any, signum: int, others: List[Any]) -> Path:
        """A full run as its own process; the fake holds the export of `page` until the signal,
        which comes once the run's journal holds the `others` (the rest of the workspace)."""
        hold = self.fake.hold(rf"/pages/{page.id}/export$", method="POST")
        self.addCleanup(hold.release)
        env = dict(os.environ, CODA_API_TOKEN=TOKEN)
        env.pop("CODA_API_URL", None)
        proc = subprocess.Popen(
            tool_command("--output", str(self.out), "--api-url", self.fake.api_url, *FAST_FLAGS, "--no-extras",
                         "--concurrency", "2"),
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.communicate()))
        self.assertTrue(hold.reached.wait(20), "the run never asked for the last export")
        self.assertTrue(self.journal_holds_ids([obj.id for obj in others]), "the run never saved the rest")
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=20)
        self.assertEqual(proc.returncode, 130 if signum == signal.SIGINT else -signal.SIGKILL,
                         stderr.decode("utf-8", "replace"))
        hold.release()
        [interrupted] = self.snapshots()
        self.assertIsNone(coda_backup.read_latest(self.out), "an interrupted run never becomes latest")
        return interrupted

    def journal_holds_ids(self, ids: List[str], within: float = 20.0) -> bool:
        """Wait until the one running snapshot's journal lists these objects as saved."""
        ends = time.monotonic() + within
        while time.monotonic() < ends:
            journals = list(self.out.glob(f"*/{coda_backup.JOURNAL_NAME}"))
            text = journals[0].read_text(encoding="utf-8") if journals else ""
            if all(f'"id":"{object_id}"' in text for object_id in ids):
                return True
            time.sleep(0.02)
        return False

    def test_after_a_failed_run_and_past_a_damaged_manifest(self) -> None:
        ws = build_incremental_workspace(self.fake)
        # The fake holds the exports of Scratch and Home until Alpha's tables, Overview and Details
        # are saved; then the API is lost for good (neither export ever finishes: two requests go
        # unanswered), and the run ends `failed`.
        holds = [self.fake.hold(self.export_path(page) + "$", method="POST") for page in (ws.scratch, ws.home)]
        for hold in holds:
            self.addCleanup(hold.release)

        def lose_once_the_rest_is_saved() -> None:
            if all(hold.reached.wait(20) for hold in holds):
                self.journal_holds_ids([ws.items.id, ws.open_items.id, ws.plain.id, ws.overview.id, ws.details.id])
            self.fake.lose_api()
            for hold in holds:
                hold.release()

        loser = threading.Thread(target=lose_once_the_rest_is_saved)
        loser.start()
        self.run_backup("--no-extras", "--concurrency", "3", "--max-retries", "1")
        loser.join()
        self.fake.api_lost = False  # the API is back the next night
        [failed] = self.snapshots()
        self.assertEqual(self.summary(failed)["status"], "failed", self.stderr)
        self.assertIsNone(coda_backup.read_latest(self.out), "a failed run never becomes latest")
        saved_before = {key for key, entry in self.entries(failed).items() if entry.get("status") == "ok"}
        self.assertTrue({ws.items.id, ws.open_items.id, ws.plain.id, ws.overview.id, ws.details.id} <= saved_before)
        later = coda_backup.create_snapshot(self.out, coda_backup.utc_now())  # newer, manifest cut short
        (later / "manifest.json").write_text('{"version": 1, "docs": [', encoding="utf-8")

        self.fake.clear_log()
        resumed = self.backup("--incremental")
        not_saved = [page for page in ws.pages if page.id not in saved_before]
        self.assertEqual(sorted(self.export_posts()), sorted(self.export_path(page) for page in not_saved))
        self.assertEqual(sorted(self.rows_gets()), sorted(self.rows_path(table) for table in (ws.glossary,)
                                                          if table.id not in saved_before))
        self.assertIn(f"cannot use the manifest of {later.name}", self.stderr)
        entries = self.entries(resumed)
        self.assertEqual(entries[ws.overview.id]["reusedFrom"], failed.name)
        self.assertEqual(entries[ws.scratch.id]["status"], "ok")
        self.assertEqual(self.summary(resumed)["status"], "completed")


class CalculatedColumnsTest(ReuseCase):
    def test_a_formula_result_that_changed_without_updatedAt_is_caught_by_the_doc(self) -> None:
        ws = build_incremental_workspace(self.fake)
        scores = ws.beta.add_table("Scores", parent_page=ws.home, columns=[
            "Player", {"name": "Total", "type": "number", "calculated": True, "formula": "thisRow.Points * 2"}],
            rows=[{"Player": "ann", "Total": 4}, {"Player": "bob", "Total": 6}])
        first = self.backup()
        table_updated = scores.updated_at
        scores.set_calculated(0, "Total", 40)  # the doc moves, the table and its rows do not
        self.assertEqual(scores.updated_at, table_updated)

        self.fake.clear_log()
        second = self.backup("--incremental")
        self.assertEqual(set(self.rows_gets()), {self.rows_path(scores)}, "only the table with formulas")
        self.assertEqual(read_csv(self.table_csv(second, scores))[1][6:], ["ann", "40"])
        self.assertEqual(self.export_posts(), [self.export_path(ws.home)], "Home shows the new total")
        entries = self.entries(second)
        self.assertEqual(entries[scores.id]["reason"], "calculated columns, doc changed")
        self.assertEqual(entries[scores.id]["calculatedColumns"], 1)
        self.assertEqual(entries[ws.glossary.id]["reusedFrom"], first.name)

        ws.beta.touch()  # the doc moves again; this time no value changed
        self.fake.clear_log()
        third = self.backup("--incremental")
        self.assertEqual(set(self.rows_gets()), {self.rows_path(scores)})
        self.assert_same_inode(self.table_csv(third, scores), self.table_csv(second, scores))
        self.assertEqual(self.export_posts(), [], "identical rows count as unchanged for the page")
        self.assertEqual(self.entries(third)[ws.home.id]["reusedFrom"], second.name)


class MaxAgeTest(ReuseCase):
    def test_reuse_carries_the_download_time_and_max_age_refetches_into_hard_links(self) -> None:
        ws = build_incremental_workspace(self.fake)
        first = self.backup()
        ws.alpha.touch()  # Alpha is decided object by object, Beta is linked whole
        second = self.backup("--incremental")
        before, entries = self.entries(first), self.entries(second)
        for obj in (ws.overview, ws.items, ws.beta, ws.home, ws.glossary):
            with self.subTest(obj=obj.name):
                self.assertRegex(before[obj.id]["fetchedAt"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
                self.assertNotIn("reusedFrom", before[obj.id])
                self.assertEqual(entries[obj.id]["fetchedAt"], before[obj.id]["fetchedAt"])
                self.assertEqual(entries[obj.id]["reusedFrom"], first.name)
        self.assertEqual(entries[ws.overview.id]["reason"], "unchanged")
        self.assertEqual(entries[ws.home.id]["reason"], "doc unchanged")

        # The second run completed with the same docs: nothing older is read (a damaged one is not noticed).
        (first / "manifest.json").write_text("{", encoding="utf-8")
        self.fake.clear_log()
        third = self.backup("--incremental", "--max-age", "0")
        self.assertNotIn("cannot use the manifest", self.stderr)
        self.assertEqual(len(self.export_posts()), 4)
        self.assertEqual(len(set(self.rows_gets())), 4)
        entries = self.entries(third)
        for obj in (ws.overview, ws.items, ws.home, ws.glossary):
            with self.subTest(obj=obj.name):
                self.assertEqual((entries[obj.id]["status"], entries[obj.id]["reason"]),
                                 ("ok", "older than --max-age"))
                self.assertNotIn("reusedFrom", entries[obj.id])
        self.assert_same_inode(self.table_csv(third, ws.items), self.table_csv(first, ws.items))
        self.assert_same_inode(self.page_file(third, ws.home), self.page_file(first, ws.home))
        self.assertEqual(self.verify(), 0, self.stdout)


class CheckedLinksTest(ReuseCase):
    def test_a_same_size_edit_of_a_saved_file_is_not_linked_forward(self) -> None:
        ws = build_incremental_workspace(self.fake)
        first = self.backup()
        damaged = self.table_csv(first, ws.glossary)
        original = damaged.read_bytes()
        flip_one_byte(damaged)
        self.fake.clear_log()
        second = self.backup("--incremental")

        self.assertEqual(self.rows_gets(), [self.rows_path(ws.glossary)])
        self.assertIn("no longer matches its manifest", self.stderr)
        new = self.table_csv(second, ws.glossary)
        self.assertEqual(new.read_bytes(), original)
        self.assertNotEqual(new.stat().st_ino, damaged.stat().st_ino)
        self.assertEqual(self.entries(second)[ws.glossary.id]["reason"], "saved copy damaged")
        self.assert_same_inode(self.page_file(second, ws.home), self.page_file(first, ws.home))
        self.assertEqual(self.verify(), 0, self.stdout)


@unittest.skipUnless(os.name == "posix", "POSIX permissions")
class ReadOnlyTest(ReuseCase):
    def test_content_is_0400_from_the_start_the_run_records_0600_and_pruning_deletes(self) -> None:
        ws = build_incremental_workspace(self.fake)
        seen: Dict[str, int] = {}

        def look(_request: Any) -> None:  # mid-run: every saved file is already read-only
            # Saved content under docs/ (temp files end in .part). A doc's doc.json is saved before
            # its pages are listed, so at least that request finds one, whatever order the
            # scheduler's exports and the table reads end in.
            for path in self.out.rglob("docs/**/*"):
                if path.suffix in (".csv", ".json"):
                    seen[path.relative_to(self.out).as_posix()] = stat.S_IMODE(path.stat().st_mode)

        self.fake.before_api.append(look)
        first = self.backup()
        self.fake.before_api.remove(look)
        self.assertTrue(seen)
        self.assertEqual(set(seen.values()), {0o400})
        ws.plain.set_cell(0, "Value", "2")
        second = self.backup("--incremental", "--keep", "1")
        self.assertFalse(first.exists(), "--keep 1 removed the older snapshot and its read-only files")
        modes = {path.relative_to(second).as_posix(): stat.S_IMODE(path.stat().st_mode)
                 for path in second.rglob("*")}
        for relative, mode in modes.items():
            with self.subTest(path=relative):
                expected = {"summary.json": 0o600, "manifest.json": 0o600}.get(relative)
                if (second / relative).is_dir():
                    expected = 0o700
                self.assertEqual(mode, expected or 0o400)


# --- --retry-failed ----------------------------------------------------------------------------


class RetryFailedTest(SmallWorkspaceTestCase):
    def test_refetches_only_the_failed_page(self) -> None:
        failing = self.ws.details
        failing.export_fail_times = 1
        self.assertEqual(self.run_backup("--rows-json", "--no-extras"), 1, self.stderr)
        first = self.latest()
        self.assertEqual([(f["kind"], f["id"]) for f in self.summary(first)["failures"]], [("page", failing.id)])
        self.fake.clear_log()

        self.assertEqual(self.run_backup("--rows-json", "--no-extras", "--retry-failed"), 0, self.stderr)
        second = self.latest()
        self.assertNotEqual(first, second)
        posts = self.fake.requests("POST", r"/export$")
        self.assertEqual([record.path for record in posts], [f"/docs/{self.ws.alpha.id}/pages/{failing.id}/export"])
        self.assertEqual([record.path for record in self.fake.requests("GET", r"/rows")], [], "tables are linked")

        summary = self.summary(second)
        self.assertEqual((summary["status"], summary["failures"]), ("completed", []))
        self.assertEqual(self.object_file(failing, ".md", second).read_bytes(),
                         failing.render("markdown").encode("utf-8"))
        manifest = self.manifest(second)
        for page in self.ws.pages:
            self.assertIn(manifest_entry(manifest, "pages", page.id)["status"], ("ok", "unchanged"), page.name)
        linked = 0
        for kind, objects in (("pages", self.ws.pages), ("tables", self.ws.tables)):
            for obj in objects:
                if obj is failing:
                    continue
                for record in manifest_entry(manifest, kind, obj.id)["files"]:
                    with self.subTest(path=record["path"]):
                        old, new = first / record["path"], second / record["path"]
                        self.assertEqual(old.read_bytes(), new.read_bytes())
                        if record["role"] == "table":
                            continue  # the table object is fetched anyway, so it is written fresh
                        if os.name == "posix":
                            self.assertEqual(old.stat().st_ino, new.stat().st_ino, "hard-linked, not copied")
                        linked += 1
        self.assertGreaterEqual(linked, len(self.ws.pages) - 1 + 3 * len(self.ws.tables))
        self.assert_verifies()


