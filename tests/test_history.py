"""History: the change report in summary.json, --diff, retention (--keep-* and --prune), --find,
--list-runs, and read-only commands over damaged files.

The end-to-end tests of the change report, --diff, --find and --prune share one series of real
runs against the fake, with changes made in Coda between them (see HistoryRunsTest.setUpClass);
--list-runs and --keep run their own nights; the retention planner is tested as a pure function
over (name, time, status) records.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import shutil
import sys
import tempfile
import unittest
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import coda_backup
from coda_backup import RetentionPolicy, SnapshotRecord, plan_retention
from fake_coda import FakeCoda
from support import FAST_FLAGS, TOKEN, BackupTestCase, SmallWorkspaceTestCase, files_under, read_json


class HistoryRunsTest(BackupTestCase):
    """Three snapshots made by the tool.

    S1: Alpha (pages Overview, Notes; table Tasks with 5 rows; view Big Points of Tasks) and Beta.
    Then: in Tasks a row is added, one removed, one changed, column Owner added and Notes removed;
    Overview's text changes, Notes is deleted, page Later is added, doc Beta is deleted.
    S2: an --incremental run (with --allow-vanished: Beta is half the docs).  Then doc Gamma appears.
    S3: a run with --exclude-doc "Alpha Doc" (so Alpha was not looked at, not removed).
    """

    runs: List[Path]
    logs: List[str]
    ids: Dict[str, str]
    shared_out: Path

    @classmethod
    def setUpClass(cls) -> None:
        fake = FakeCoda(token=TOKEN, seed=11)
        fake.start()
        cls.addClassCleanup(fake.stop)
        tmp = tempfile.TemporaryDirectory()
        cls.addClassCleanup(tmp.cleanup)
        cls.shared_out = Path(tmp.name) / "backups"
        alpha = fake.add_doc("Alpha Doc")
        overview = alpha.add_page("Overview", content="# Overview\n\nWhere things stand.\n")
        notes = alpha.add_page("Notes", content="# Notes\n")
        tasks = alpha.add_table("Tasks", parent_page=overview,
                                columns=["Task", {"name": "Points", "type": "number"}, "Notes"])
        rows = [tasks.add_row({"Task": f"T{i}", "Points": i, "Notes": f"n{i}"}) for i in range(5)]
        points = tasks.column("Points").id
        alpha.add_view(tasks, "Big Points", parent_page=overview, row_filter=lambda v: (v.get(points) or 0) >= 3)
        beta = fake.add_doc("Beta Wiki")
        beta.add_page("Home", content="# Home\n")
        cls.runs, cls.logs = [], []
        cls.backup(fake)

        added = tasks.add_row({"Task": "T5", "Points": 5, "Notes": "n5"})
        removed = tasks.remove_row(1)
        tasks.set_cell(2, "Task", "T3 renamed")  # rows now T0 T2 T3 T4 T5: index 2 is T3
        tasks.add_column("Owner")
        tasks.remove_column("Notes")
        overview.content = "# Overview\n\nWhere things are now.\n\nMore.\n"
        overview.touch()
        alpha.remove_page(notes)
        alpha.add_page("Later", content="# Later\n")
        fake.remove_doc(beta)
        cls.backup(fake, "--incremental", "--allow-vanished")  # 1 doc of 2: past the guard

        fake.add_doc("Gamma Log").add_page("Start", content="# Start\n")
        cls.backup(fake, "--exclude-doc", "Alpha Doc")
        cls.ids = {"added": added.id, "removed": removed.id, "changed": rows[3].id, "tasks": tasks.id,
                   "overview": overview.id, "notes": notes.id, "beta": beta.id, "alpha": alpha.id}

    @classmethod
    def backup(cls, fake: FakeCoda, *extra: str) -> None:
        args = ["--output", str(cls.shared_out), "--api-url", fake.api_url, "--no-extras", *FAST_FLAGS,
                "--log-level", "INFO", *extra]
        old = os.environ.get("CODA_API_TOKEN")
        os.environ["CODA_API_TOKEN"] = TOKEN
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
                code = coda_backup.main(args)
        finally:
            if old is None:
                os.environ.pop("CODA_API_TOKEN", None)
            else:
                os.environ["CODA_API_TOKEN"] = old
        assert code == 0, err.getvalue()
        latest = coda_backup.read_latest(cls.shared_out)
        assert latest is not None
        cls.runs.append(latest)
        cls.logs.append(err.getvalue())

    def setUp(self) -> None:  # no fake of its own: these tests only read the shared snapshots
        self.stderr = ""
        self.set_env("CODA_API_TOKEN", None)  # history needs no token
        self.out = self.shared_out

    def cli(self, *args: str, output: Optional[Path] = None) -> int:
        return self.run_main(["--output", str(output or self.out), *args])

    def diff_json(self, *names: str) -> Dict[str, Any]:
        self.assertEqual(self.cli("--diff", *names, "--json"), 0, self.stderr)
        return json.loads(self.stdout)  # type: ignore[no-any-return]

    # -- the change report

    def test_summary_changes_count_against_the_previous_snapshot(self) -> None:
        first, second, third = (self.summary(run)["changes"] for run in self.runs)
        self.assertEqual(first["docs"], {"added": 2, "changed": 0, "removed": 0}, "a first run adds everything")
        self.assertIsNone(first["since"])
        self.assertEqual(second["since"], self.runs[0].name)
        expected = {
            "docs": {"added": 0, "changed": 1, "removed": 1},  # Alpha changed, Beta deleted
            "pages": {"added": 1, "changed": 1, "removed": 1},  # Beta's Home is counted with Beta
            "tables": {"added": 0, "changed": 1, "removed": 0},
            "views": {"added": 0, "changed": 1, "removed": 0},
            "rows": {"added": 1, "changed": 1, "removed": 1},  # base tables only: views show the same rows
        }
        self.assertEqual({key: second[key] for key in expected}, expected)
        self.assertEqual(second["docs"]["removed"], self.summary(self.runs[1])["counts"]["vanished"]["docs"])
        self.assertIn(f"INFO changes since {self.runs[0].name}: docs 0 added, 1 changed, 1 removed; pages 1 added, "
                      "1 changed, 1 removed; tables 0 added, 1 changed, 0 removed; views 0 added, 1 changed, "
                      "0 removed; rows 1 added, 1 changed, 1 removed\n", self.logs[1])
        self.assertEqual(third["docs"], {"added": 1, "changed": 0, "removed": 0},
                         "Alpha was left out by --exclude-doc: not removed")
        self.assertEqual((third["pages"]["removed"], third["tables"]["removed"]), (0, 0))

    def test_diff_is_exact_for_rows_columns_pages_and_docs(self) -> None:
        diff = self.diff_json()  # defaults: NEW = latest (S3), OLD = the completed one before it (S2)
        self.assertEqual((diff["old"], diff["new"]), (self.runs[1].name, self.runs[2].name))

        diff = self.diff_json(self.runs[0].name, self.runs[1].name)
        summary_changes = self.summary(self.runs[1])["changes"]
        self.assertEqual(diff["counts"], {kind: summary_changes[kind] for kind in coda_backup.HISTORY_KINDS},
                         "--diff and the change report count alike")
        self.assertEqual([d["id"] for d in diff["docs"]["removed"]], [self.ids["beta"]])
        self.assertEqual([p["name"] for p in diff["pages"]["added"]], ["Later"])
        self.assertEqual([p["id"] for p in diff["pages"]["removed"]], [self.ids["notes"]])
        [page] = diff["pages"]["changed"]
        self.assertEqual((page["id"], page["lines"]), (self.ids["overview"], {"added": 3, "removed": 1}))
        [table] = diff["tables"]["changed"]
        self.assertEqual(table["id"], self.ids["tasks"])
        self.assertEqual(table["rows"], {"added": 1, "removed": 1, "changed": 1})
        self.assertEqual(table["columns"], {"added": ["Owner"], "removed": ["Notes"]})
        self.assertEqual(table["examples"], {"added": [self.ids["added"]], "removed": [self.ids["removed"]],
                                             "changed": [self.ids["changed"]]})
        [view] = diff["views"]["changed"]
        self.assertEqual(view["rows"], {"added": 1, "removed": 0, "changed": 1}, "T5 joins, T3 changes")

        self.assertEqual(self.cli("--diff", self.runs[0].name, self.runs[1].name), 0, self.stderr)
        lines = self.stdout.splitlines()
        self.assertIn("docs:   0 added, 1 removed, 1 changed", lines)
        self.assertIn(f"- doc   Beta Wiki ({self.ids['beta']})", lines)
        self.assertIn(f"~ table Alpha Doc / Tasks ({self.ids['tasks']}): rows +1 -1 ~1; columns +Owner -Notes",
                      lines)
        self.assertIn(f"    changed rows: {self.ids['changed']}", lines)

    def test_diff_across_a_selection_and_bad_arguments(self) -> None:
        diff = self.diff_json(self.runs[0].name, "latest")
        self.assertEqual([d["name"] for d in diff["docs"]["added"]], ["Gamma Log"])
        self.assertEqual([d["name"] for d in diff["docs"]["removed"]], ["Beta Wiki"], "Alpha was excluded")
        for args in (["--diff", "2001-01-01T000000Z"], ["--diff", "a", "b", "c"], ["--diff", "../x"]):
            with self.subTest(args=args):
                self.assertEqual(self.cli(*args), 2)
                self.assertEqual(len(self.stderr.strip().splitlines()), 1, self.stderr)
        self.assertEqual(self.run_main(["--diff"]), 2)
        self.assertIn("--output", self.stderr)

    # -- find

    def test_find_reaches_objects_only_older_snapshots_hold(self) -> None:
        self.assertEqual(self.cli("--find", "beta*", "--json"), 0, self.stderr)
        found = json.loads(self.stdout)
        self.assertEqual([(f["snapshot"], f["kind"], f["name"]) for f in found],
                         [(self.runs[0].name, "doc", "Beta Wiki")])
        self.assertEqual(self.cli("--find", self.ids["notes"]), 0, self.stderr)
        self.assertEqual(len(self.stdout.splitlines()), 1, self.stdout)
        self.assertIn(self.runs[0].name, self.stdout)
        self.assertIn("pages/Notes__", self.stdout)
        self.assertEqual(self.cli("--find", "Tasks", "--json"), 0, self.stderr)
        self.assertEqual([f["snapshot"] for f in json.loads(self.stdout)], [self.runs[1].name, self.runs[0].name],
                         "newest first; S3 left Alpha out")
        self.assertEqual(self.cli("--find", "no such thing"), 1)

    # -- retention end to end

    def test_prune_and_its_dry_run(self) -> None:
        out = Path(tempfile.mkdtemp()) / "copy"
        self.addCleanup(shutil.rmtree, out.parent)
        shutil.copytree(self.out, out, symlinks=True)
        names = [run.name for run in self.runs]
        self.assertEqual(self.cli("--list-runs", "--keep-last", "1", output=out), 0, self.stderr)
        lines = {line.split()[0]: line for line in self.stdout.splitlines() if line[:1].isdigit()}
        self.assertTrue(lines[names[2]].endswith("keep (last, latest)"), lines[names[2]])
        self.assertTrue(lines[names[1]].endswith("keep (last)"), "S3 left Alpha out: S2 is the newest snapshot of "
                        f"every doc, and the only copy of Alpha: {lines[names[1]]}")
        self.assertRegex(lines[names[0]], r"keep \(newest copy of .*Beta Wiki.*--keep-vanished 90\)\)$",
                         "S1 holds the last copy of Beta: --keep-vanished protects it")

        no_vanished_rule = ["--keep-vanished", "0"]
        self.assertEqual(self.cli("--prune", "--dry-run", "--keep", "1", *no_vanished_rule, output=out), 0,
                         self.stderr)
        self.assertIn(f"delete {names[0]}  (no rule keeps it)", self.stdout.splitlines())
        self.assertEqual(sorted(p.name for p in out.iterdir() if p.name in names), names, "a dry run deletes nothing")

        config = out.parent / "retention.toml"
        config.write_text("keep-last = 1\nkeep-vanished = 0\n", encoding="utf-8")  # a flag's other name
        code = self.cli("--config", str(config), "--prune", "--dry-run", output=out)
        if sys.version_info >= (3, 11):
            self.assertEqual(code, 0, self.stderr)
            self.assertIn(f"delete {names[0]}  (no rule keeps it)", self.stdout.splitlines())
        else:
            self.assertEqual(code, 2, "--config needs tomllib")

        self.assertEqual(self.cli("--prune", "--keep-last", "1", output=out), 0, self.stderr)
        self.assertEqual([p.name for p in coda_backup.snapshot_folders(out)], names)
        self.assertEqual(self.cli("--prune", "--keep-last", "1", *no_vanished_rule, output=out), 0, self.stderr)
        self.assertEqual([p.name for p in coda_backup.snapshot_folders(out)], names[1:])
        with coda_backup.RunLock(out):
            self.assertEqual(self.cli("--prune", "--keep-last", "1", output=out), 4, "--prune takes the lock")
        self.assertEqual(self.cli("--prune", output=out), 2, "--prune without a rule")
        self.assertEqual(self.cli("--prune", "--keep-daily", "0", output=out), 2)


# --- --list-runs -------------------------------------------------------------------------------


class ListRunsTest(SmallWorkspaceTestCase):
    def test_json_and_text(self) -> None:
        self.ws.notes.export_fail_times = 1
        self.assertEqual(self.run_backup("--no-extras"), 1, self.stderr)
        first = self.latest()
        self.assertEqual(self.run_backup("--no-extras"), 0, self.stderr)
        second = self.latest()
        self.assertNotEqual(first, second)
        self.set_env("CODA_API_TOKEN", None)  # listing needs no token

        self.assertEqual(self.run_main(["--output", str(self.out), "--list-runs", "--json"]), 0, self.stderr)
        runs = json.loads(self.stdout)
        self.assertIsInstance(runs, list)
        self.assertEqual([run["snapshot"] for run in runs], [second.name, first.name], "newest first")
        for run, snapshot, latest in ((runs[0], second, True), (runs[1], first, False)):
            with self.subTest(snapshot=snapshot.name):
                summary = read_json(snapshot / "summary.json")
                self.assertLessEqual({"snapshot", "latest", "status", "started_at", "duration_s", "counts",
                                      "failures", "size_bytes"}, set(run))
                self.assertIs(run["latest"], latest)
                self.assertEqual(run["status"], summary["status"])
                self.assertEqual(run["started_at"], summary["started_at"])
                self.assertEqual(run["duration_s"], summary["duration_s"])
                self.assertEqual(run["counts"], summary["counts"])
                failures = run["failures"] if isinstance(run["failures"], int) else len(run["failures"])
                self.assertEqual(failures, len(summary["failures"]))
                self.assertEqual(run["size_bytes"], sum(p.stat().st_size for p in files_under(snapshot).values()))
        self.assertEqual((runs[0]["status"], runs[1]["status"]), ("completed", "completed_with_errors"))
        self.assertEqual(runs[1]["counts"]["failures"], 1)

        self.assertEqual(self.run_main(["--output", str(self.out), "--list-runs"]), 0, self.stderr)
        lines = self.stdout.splitlines()
        row = {snapshot.name: [i for i, line in enumerate(lines) if line.split()[:1] == [snapshot.name]]
               for snapshot in (first, second)}
        self.assertEqual([len(found) for found in row.values()], [1, 1], self.stdout)
        first_line, second_line = lines[row[first.name][0]], lines[row[second.name][0]]
        self.assertLess(row[second.name][0], row[first.name][0], "newest first")
        self.assertIn("completed_with_errors", first_line)
        self.assertRegex(second_line, r"\bcompleted\b")
        self.assertNotIn("completed_with_errors", second_line)


class DamagedFilesTest(SmallWorkspaceTestCase):
    """Hand-edited or damaged local files give a clear answer, never a traceback."""

    def test_list_runs_and_verify_survive_damaged_files(self) -> None:
        self.assertEqual(self.run_backup("--no-extras"), 0, self.stderr)
        snapshot = self.latest()
        summary = read_json(snapshot / "summary.json")
        summary["failures"], summary["counts"] = 3, "lots"
        (snapshot / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
        self.assertEqual(self.run_main(["--list-runs", "--output", str(self.out)]), 0, self.stderr)
        self.assertIn(snapshot.name, self.stdout)
        self.assertNotIn("Traceback", self.stderr)

        manifest = read_json(snapshot / "manifest.json")
        manifest["docs"][0]["files"].append("not a record")
        (snapshot / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        self.assertEqual(self.run_main(["--verify", "--output", str(self.out)]), 1, self.stderr)
        self.assertIn("not an object", self.stdout)
        self.assertNotIn("Traceback", self.stderr)


# --- --keep --------------------------------------------------------------------------------------


class KeepTest(SmallWorkspaceTestCase):
    def fake_snapshot(self, name: str, status: str) -> Path:
        """A snapshot folder left by another (crashed, or clock-skewed) run."""
        folder = self.out / name
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"status": status}), encoding="utf-8")
        return folder

    def test_prunes_oldest_finished_with_their_zip(self) -> None:
        crashed = self.fake_snapshot("2000-01-01T000000Z", "running")
        scratch = self.out / ".tmp-diff-dead1234"  # the change report's scratch folder of that dead run
        scratch.mkdir()
        (scratch / "rows.sqlite").write_bytes(b"x" * 100)
        self.assertEqual(self.run_backup("--zip", "--no-extras"), 0, self.stderr)
        self.assertEqual(self.summary(crashed)["status"], "abandoned", "the lock holder knows it is dead")
        self.assertFalse(scratch.exists(), "the lock holder clears a dead run's scratch folder")
        self.assertIn("abandoned", self.stderr)
        oldest = self.latest()
        self.assertTrue((self.out / f"{oldest.name}.zip").is_file())
        # incremental runs hard-link oldest's files: pruning it must not hurt them
        self.assertEqual(self.run_backup("--incremental", "--no-extras"), 0, self.stderr)
        middle = self.latest()
        self.assertEqual(self.summary(middle)["counts"]["skipped_unchanged"]["docs"], 1, "it did link")
        self.assertEqual(self.run_backup("--incremental", "--no-extras", "--keep", "2"), 0, self.stderr)
        newest = self.latest()
        self.assertEqual(len({oldest, middle, newest}), 3)
        self.assertFalse(oldest.exists(), "oldest finished snapshot beyond --keep 2")
        self.assertFalse((self.out / f"{oldest.name}.zip").exists(), "its zip goes too")
        self.assertTrue(middle.is_dir())
        self.assertTrue(newest.is_dir())
        self.assertFalse(crashed.exists(), "an abandoned snapshot older than the kept ones goes too")
        self.assert_verifies()

        self.set_env("CODA_API_TOKEN", "refused-token")  # a run that fails (exit 3) prunes nothing
        self.assertEqual(self.run_backup("--incremental", "--no-extras", "--keep", "1"), 3, self.stderr)
        self.assertTrue(middle.is_dir())
        self.assertEqual(self.latest(), newest)

    def test_nights_with_errors_never_push_out_the_last_good_backup(self) -> None:
        self.assertEqual(self.run_backup("--no-extras", "--keep", "1"), 0, self.stderr)
        good = self.latest()
        for doc in self.fake.docs:  # the token loses access to every doc: each night "finishes" with errors
            doc.forbidden = True
        for _ in range(2):
            self.assertEqual(self.run_backup("--no-extras", "--keep", "1"), 1, self.stderr)
        self.assertTrue(good.is_dir(), "the last completed snapshot must survive --keep")
        self.assertEqual(len(self.snapshots()), 3)
        self.assertEqual(self.summary(good)["status"], "completed")

    def test_a_later_snapshot_of_the_same_second_sorts_newest(self) -> None:
        """Names order snapshots for --keep and --list-runs, also after pruning freed a name.

        Three runs in one second are named S, S-2, S-3.  If S is pruned and a fourth run starts in
        that same second, its name must still sort after S-3 (else --keep would delete the new run's
        elder siblings wrongly and --list-runs would show it as the oldest).
        """
        self.out.mkdir(parents=True)
        second = coda_backup.utc_now().replace(microsecond=0)
        first = coda_backup.create_snapshot(self.out, second)
        later = [coda_backup.create_snapshot(self.out, second) for _ in range(2)]
        self.assertEqual([p.name for p in later], [f"{first.name}-2", f"{first.name}-3"])
        first.rmdir()  # pruned
        newest = coda_backup.create_snapshot(self.out, second)
        self.assertEqual(coda_backup.snapshot_folders(self.out)[-1], newest,
                         f"{newest.name} was made last but sorts before {later[-1].name}")

    def test_a_prune_cut_short_is_finished_next_time(self) -> None:
        self.assertEqual(self.run_backup("--no-extras"), 0, self.stderr)
        leftover = self.out / ".deleting-2000-01-01T000000Z"
        (leftover / "docs").mkdir(parents=True)
        (leftover / "docs" / "x.csv").write_text("a,b\n", encoding="utf-8")
        self.assertEqual(self.run_backup("--no-extras", "--keep", "3"), 0, self.stderr)
        self.assertFalse(leftover.exists())

    def test_never_removes_the_current_run(self) -> None:
        # A finished snapshot dated in the future (clock skew) sorts as the newest one.
        future = self.fake_snapshot("2999-01-01T000000Z", "completed")
        self.assertEqual(self.run_backup("--keep", "1", "--no-extras"), 0, self.stderr)
        current = self.latest()
        self.assertNotEqual(current, future)
        self.assertTrue(current.is_dir(), "the run just made must survive --keep")
        self.assertEqual(self.summary(current)["status"], "completed")
        self.assert_verifies()


# --- the retention planner ---------------------------------------------------------------------


def record(moment: str, status: str = "completed", selection: str = "") -> SnapshotRecord:
    time = dt.datetime.strptime(moment, "%Y-%m-%d %H:%M").replace(tzinfo=dt.timezone.utc)
    return SnapshotRecord(time.strftime(coda_backup.SNAPSHOT_TIME_FORMAT), time, status, selection)


def kept(records: List[SnapshotRecord], policy: RetentionPolicy, latest: Optional[str] = None,
         protected: Optional[Dict[str, str]] = None) -> List[Tuple[str, Tuple[str, ...]]]:
    return [(d.name[:13], d.reasons) for d in plan_retention(records, policy, latest, protected) if d.keep]


def name(moment: str) -> str:
    return record(moment).name


class RetentionPlannerTest(unittest.TestCase):
    def test_policies(self) -> None:
        nightly = [record(f"2026-03-{day:02d} 02:00") for day in range(1, 11)]
        cases = [
            ("last 3", nightly, RetentionPolicy(last=3),
             [("2026-03-10T02", ("last",)), ("2026-03-09T02", ("last",)), ("2026-03-08T02", ("last",))]),
            ("daily 2 takes the newest of each day",
             [record("2026-03-01 02:00"), record("2026-03-01 14:00"), record("2026-03-02 02:00"),
              record("2026-03-02 09:00"), record("2026-03-03 02:00")],
             RetentionPolicy(daily=2), [("2026-03-03T02", ("daily",)), ("2026-03-02T09", ("daily",))]),
            ("ISO week 2026-W53 runs from 2026-12-28 to 2027-01-03",
             [record("2026-12-27 02:00"), record("2026-12-28 02:00"), record("2026-12-31 02:00"),
              record("2027-01-03 02:00"), record("2027-01-04 02:00")],
             RetentionPolicy(weekly=3),
             [("2027-01-04T02", ("weekly",)), ("2027-01-03T02", ("weekly",)), ("2026-12-27T02", ("weekly",))]),
            ("month boundaries in UTC",
             [record("2026-01-31 23:59"), record("2026-02-01 00:00"), record("2026-02-28 23:00"),
              record("2026-03-01 00:30")],
             RetentionPolicy(monthly=2), [("2026-03-01T00", ("monthly",)), ("2026-02-28T23", ("monthly",))]),
            ("months across a year", [record("2025-12-15 02:00"), record("2026-01-02 02:00")],
             RetentionPolicy(monthly=5), [("2026-01-02T02", ("monthly",)), ("2025-12-15T02", ("monthly",))]),
            ("within counts from the newest completed snapshot, not from now", nightly,
             RetentionPolicy(within_days=2), [("2026-03-10T02", ("within",)), ("2026-03-09T02", ("within",))]),
            ("the union, with every reason", nightly, RetentionPolicy(last=1, daily=2, weekly=2),
             [("2026-03-10T02", ("last", "daily", "weekly")), ("2026-03-09T02", ("daily",)),
              ("2026-03-08T02", ("weekly",))]),
        ]
        for label, records, policy, expected in cases:
            with self.subTest(label):
                self.assertEqual(kept(records, policy), expected)

    def test_only_completed_snapshots_count_and_some_are_never_deleted(self) -> None:
        runs = [record("2026-03-01 02:00"), record("2026-03-02 02:00", "failed"),
                record("2026-03-03 02:00"), record("2026-03-04 02:00", "completed_with_errors"),
                record("2026-03-05 02:00", "running")]
        cases = [
            ("errors and failures do not use up a slot; newer unfinished ones stay", RetentionPolicy(last=1), None,
             None, [("2026-03-05T02", ("running",)),
                    ("2026-03-04T02", ("completed_with_errors, newer than the oldest kept snapshot",)),
                    ("2026-03-03T02", ("last",))]),
            ("latest and protected are kept", RetentionPolicy(last=1), name("2026-03-01 02:00"),
             {name("2026-03-02 02:00"): "holds a vanished doc"},
             [("2026-03-05T02", ("running",)),
              ("2026-03-04T02", ("completed_with_errors, newer than the oldest kept snapshot",)),
              ("2026-03-03T02", ("last",)), ("2026-03-02T02", ("holds a vanished doc",)),
              ("2026-03-01T02", ("latest",))]),
        ]
        for label, policy, latest, protected, expected in cases:
            with self.subTest(label):
                self.assertEqual(kept(runs, policy, latest, protected), expected)
        unfinished = [record("2026-03-01 02:00", "completed_with_errors"), record("2026-03-02 02:00", "failed")]
        self.assertEqual(len(kept(unfinished, RetentionPolicy(last=1))), 2, "no completed snapshot: nothing goes")
        plan = plan_retention(runs, RetentionPolicy(last=1))
        self.assertEqual([(d.name[:13], d.reasons) for d in plan if not d.keep],
                         [("2026-03-02T02", ("failed, older than the oldest kept snapshot",)),
                          ("2026-03-01T02", ("no rule keeps it",))])

    def test_rules_count_within_one_doc_selection(self) -> None:
        """A one-off `--doc X` run is the newest completed snapshot, but it holds one doc: the
        nightly snapshots of all docs must not be pushed out by it (restic groups by paths)."""
        runs = [record("2026-03-01 02:00"), record("2026-03-02 02:00"), record("2026-03-02 11:00", selection="X"),
                record("2026-03-02 12:00", "failed", selection="X"), record("2026-03-02 13:00", "failed")]
        cases = [
            ("last 1", RetentionPolicy(last=1),
             [("2026-03-02T13", ("failed, newer than the oldest kept snapshot",)),
              ("2026-03-02T12", ("failed, newer than the oldest kept snapshot",)),
              ("2026-03-02T11", ("last",)), ("2026-03-02T02", ("last",))]),
            ("daily 1: the nightly is the newest of its day in its selection", RetentionPolicy(daily=1),
             [("2026-03-02T13", ("failed, newer than the oldest kept snapshot",)),
              ("2026-03-02T12", ("failed, newer than the oldest kept snapshot",)),
              ("2026-03-02T11", ("daily",)), ("2026-03-02T02", ("daily",))]),
        ]
        for label, policy, expected in cases:
            with self.subTest(label):
                self.assertEqual(kept(runs, policy), expected)
        old_failure = [record("2026-03-01 02:00", "failed"), record("2026-03-02 02:00"),
                       record("2026-03-02 11:00", selection="X")]
        self.assertEqual(kept(old_failure, RetentionPolicy(last=1)),
                         [("2026-03-02T11", ("last",)), ("2026-03-02T02", ("last",))],
                         "an unfinished snapshot is judged against the oldest kept of its own selection")


if __name__ == "__main__":
    unittest.main()
