"""Deletions in Coda: what vanished since `latest`, the deletion guard and --keep-vanished.

The comparison, the guard, the vanished.json record and the retention rule are pure functions
with table-driven tests; the end-to-end tests delete docs, pages and tables in the fake between
nights and read summary.json, vanished.json, `latest` and --list-runs.
"""

from __future__ import annotations

import datetime as dt
import json
import unittest
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import coda_backup
from coda_backup import Listed, Options
from fake_coda import FakeCoda
from support import BackupTestCase, read_json

NOW = dt.datetime(2026, 12, 1, 3, 0, tzinfo=dt.timezone.utc)
BEFORE = "2026-11-30T020000Z"


def manifest(*docs: Dict[str, Any], include_shared: bool = False, workspace_id: Optional[str] = None) -> Any:
    return {"options": {"include_shared": include_shared, "workspace_id": workspace_id}, "docs": list(docs)}


def doc(doc_id: str, name: str, pages: Any = (), tables: Any = ()) -> Dict[str, Any]:
    return {"id": doc_id, "name": name, "pages": list(pages), "tables": list(tables)}


def page(page_id: str, name: str, parent: Optional[str] = None, hidden: bool = False) -> Dict[str, Any]:
    return {"id": page_id, "name": name, "parentId": parent, "isHidden": hidden}


def table(table_id: str, name: str, view: bool = False) -> Dict[str, Any]:
    return {"id": table_id, "name": name, "tableType": "view" if view else "table"}


# Doc A: pages P1, P2 (hidden) > P3 (hidden through its parent); table T1, view V1. Doc B: page Q1.
BEFORE_MANIFEST = manifest(
    doc("A", "Alpha", [page("P1", "One"), page("P2", "Two", hidden=True), page("P3", "Three", parent="P2")],
        [table("T1", "Tasks"), table("V1", "Open", view=True)]),
    doc("B", "Beta", [page("Q1", "Home")]),
)


def listed(docs: Any = ("A", "B"), pages: Any = None, tables: Any = None) -> Listed:
    """Everything of BEFORE_MANIFEST listed again, unless the caller says otherwise."""
    return Listed(
        docs=None if docs is None else set(docs),
        pages={"A": {"P1", "P2", "P3"}, "B": {"Q1"}} if pages is None else pages,
        tables={"A": {"T1", "V1"}, "B": set()} if tables is None else tables,
    )


def entry(kind: str, doc_id: str, object_id: str, name: str) -> coda_backup.Vanished:
    return coda_backup.Vanished(kind, doc_id, object_id, name, BEFORE)


class FindVanishedTest(unittest.TestCase):
    """find_vanished over a small manifest: what counts, and what this run's selection excuses."""

    def test_cases(self) -> None:
        out = Path("/nonexistent")
        cases = [
            ("nothing gone", {}, listed(), []),
            ("a doc counts once, not its pages and tables", {}, listed(docs=["B"]), [entry("doc", "A", "A", "Alpha")]),
            ("page, table and view", {},
             listed(pages={"A": {"P2", "P3"}, "B": {"Q1"}}, tables={"A": set(), "B": set()}),
             [entry("page", "A", "P1", "One"), entry("table", "A", "T1", "Tasks"), entry("view", "A", "V1", "Open")]),
            ("--exclude-doc by name", {"exclude_docs": ("Alpha",)}, listed(docs=["B"]), []),
            ("--doc another one", {"docs": ("B",)}, listed(docs=["B"]), []),
            ("--no-views", {"no_views": True}, listed(tables={"A": {"T1"}, "B": set()}), []),
            ("--exclude-table glob", {"exclude_tables": ("Alpha/Ta*",)}, listed(tables={"A": {"V1"}, "B": set()}),
             []),
            ("--skip-hidden-pages, hidden itself and below", {"skip_hidden_pages": True},
             listed(pages={"A": {"P1"}, "B": {"Q1"}}), []),
            ("hidden pages count without the flag", {}, listed(pages={"A": {"P1"}, "B": {"Q1"}}),
             [entry("page", "A", "P2", "Two"), entry("page", "A", "P3", "Three")]),
            ("doc listing failed", {}, listed(docs=None), []),
            ("pages listing failed; tables still judged", {},
             listed(pages={"A": None, "B": {"Q1"}}, tables={"A": {"V1"}, "B": set()}),
             [entry("table", "A", "T1", "Tasks")]),
            ("doc listed, its listings never ran", {}, listed(pages={}, tables={}), []),
        ]
        known = coda_backup.known_snapshot(BEFORE, BEFORE_MANIFEST)
        for label, flags, seen, expected in cases:
            with self.subTest(label):
                report = coda_backup.find_vanished(known, seen, Options(output=out, **flags))
                self.assertEqual(list(report.entries), expected)

    def test_a_narrower_doc_list_judges_no_missing_doc(self) -> None:
        out = Path("/nonexistent")
        cases = [
            ("shared docs no longer asked for", manifest(doc("A", "Alpha"), include_shared=True), {}, 0),
            ("one workspace now, all before", manifest(doc("A", "Alpha")), {"workspace_id": "ws-1"}, 0),
            ("another workspace", manifest(doc("A", "Alpha"), workspace_id="ws-2"), {"workspace_id": "ws-1"}, 0),
            ("same scope", manifest(doc("A", "Alpha"), workspace_id="ws-1"), {"workspace_id": "ws-1"}, 1),
            ("wider scope", manifest(doc("A", "Alpha"), workspace_id="ws-1"), {"include_shared": True}, 1),
        ]
        for label, before, flags, vanished in cases:
            with self.subTest(label):
                report = coda_backup.find_vanished(coda_backup.known_snapshot(BEFORE, before), Listed(docs=set()),
                                                   Options(output=out, **flags))
                self.assertEqual(len(report.entries), vanished)


class KnownSnapshotTest(unittest.TestCase):
    def test_holds_only_copies_with_files(self) -> None:
        files = [{"path": "x", "size": 1, "sha256": "0" * 64, "role": "markdown"}]
        known = coda_backup.known_snapshot(BEFORE, manifest(
            dict(doc("A", "Alpha", [dict(page("P1", "ok"), status="ok", files=files),
                                    dict(page("P2", "failed"), status="failed", files=[]),
                                    dict(page("P3", "unchanged"), status="unchanged", files=files)]),
                 status="ok", files=files)))
        cases = [("doc", "A", True), ("page", "P1", True), ("page", "P2", False), ("page", "P3", True),
                 ("table", "P1", False), ("page", "P9", False)]
        for kind, object_id, expected in cases:
            with self.subTest(kind=kind, id=object_id):
                self.assertEqual(known.holds(kind, "A", object_id), expected)

    def test_a_damaged_manifest_is_refused(self) -> None:
        for label, bad in [("no docs", {"options": {}}), ("doc without id", manifest({"name": "x"})),
                           ("doc without pages", manifest({"id": "A", "tables": []}))]:
            with self.subTest(label), self.assertRaises(ValueError):
                coda_backup.known_snapshot(BEFORE, bad)


class DeletionGuardTest(unittest.TestCase):
    def test_cases(self) -> None:
        def report(docs_gone: int, docs_compared: int, in_doc: Any = (0, 0)) -> Any:
            entries = tuple(entry("doc", f"D{i}", f"D{i}", "x") for i in range(docs_gone))
            return coda_backup.VanishedReport(BEFORE, entries, docs_compared, {"A": ("Alpha", *in_doc)})

        cases = [
            ("nothing", report(0, 4), 25.0, None),
            ("1 of 4 docs is 25%, not more", report(1, 4), 25.0, None),
            ("2 of 4 docs", report(2, 4), 25.0, "2 of 4 docs vanished"),
            ("--max-vanished 0: any doc", report(1, 10), 0.0, "1 of 10 docs"),
            ("--max-vanished 100: never", report(4, 4, (9, 9)), 100.0, None),
            ("5 of 20 in a doc is 25%, not more", report(0, 1, (5, 20)), 25.0, None),
            ("6 of 20 in a doc", report(0, 1, (6, 20)), 25.0, "6 of 20 pages, tables and views of doc Alpha (A)"),
            ("4 of 4 in a doc: fewer than 5", report(0, 1, (4, 4)), 25.0, None),
        ]
        for label, given, pct, expected in cases:
            with self.subTest(label):
                reason = coda_backup.deletion_guard(given, pct)
                if expected is None:
                    self.assertIsNone(reason)
                else:
                    self.assertIn(expected, reason or "")
                    self.assertIn(f"--max-vanished {pct:g}%", reason or "")


def without(entries: List[Dict[str, Any]], key: str) -> List[Dict[str, Any]]:
    return [{k: v for k, v in e.items() if k != key} for e in entries]


def recorded(kind: str, object_id: str, last: str, when: str) -> Dict[str, Any]:
    return {"kind": kind, "doc_id": "A", "id": object_id, "name": object_id, "last_snapshot": last,
            "vanished_at": when}


class VanishedRecordTest(unittest.TestCase):
    def test_merge(self) -> None:
        old = recorded("page", "P1", BEFORE, "2026-11-01T00:00:00Z")
        expired = recorded("page", "P0", "2026-01-01T000000Z", "2026-08-01T00:00:00Z")
        found, = without([recorded("doc", "B", BEFORE, "")], "vanished_at")
        cases = [
            ("first finding dated now", [], [found], [dict(found, vanished_at="2026-12-01T03:00:00Z")]),
            ("seen again from the same snapshot keeps its date", [old], [dict(old)], [old]),
            ("gone from a newer snapshot is a new entry", [old], [dict(old, last_snapshot="2026-11-30T020000Z-2")],
             [old, dict(old, last_snapshot="2026-11-30T020000Z-2", vanished_at="2026-12-01T03:00:00Z")]),
            ("older than the window is dropped", [expired, old], [], [old]),
        ]
        for label, known, new, expected in cases:
            with self.subTest(label):
                self.assertEqual(coda_backup.merge_vanished(known, new, NOW, 90), expected)

    def test_protected_snapshots(self) -> None:
        names = ["2026-09-01T020000Z", "2026-10-01T020000Z", "2026-11-01T020000Z", "2026-12-01T020000Z"]
        recent = recorded("doc", "B", "2026-11-01T020000Z", "2026-11-02T02:00:00Z")
        cases = [
            ("its last snapshot", [recent], lambda name, e: True, {"2026-11-01T020000Z"}),
            ("older than --keep-vanished", [dict(recent, vanished_at="2026-08-01T02:00:00Z")],
             lambda name, e: True, set()),
            ("its snapshot is gone: the newest older one holding it",
             [dict(recent, last_snapshot="2026-11-15T020000Z")],
             lambda name, e: name <= "2026-10-01T020000Z", {"2026-10-01T020000Z"}),
            ("its copy there had failed: the newest older one holding it", [recent],
             lambda name, e: name != "2026-11-01T020000Z", {"2026-10-01T020000Z"}),
            ("held nowhere any more", [dict(recent, last_snapshot="2026-11-15T020000Z")],
             lambda name, e: False, set()),
        ]
        for label, entries, holds, expected in cases:
            with self.subTest(label):
                kept = coda_backup.protected_snapshots(entries, names, NOW, 90, holds)
                self.assertEqual(set(kept), expected)
                for reason in kept.values():
                    self.assertIn("doc B (B)", reason)
                    self.assertIn("kept until 2027-01-31 (--keep-vanished 90)", reason)


# --- end to end -------------------------------------------------------------------------------


def build_workspace(fake: FakeCoda) -> SimpleNamespace:
    """Four small docs; Alpha has a hidden page with a child, a table on each of two pages and a view."""
    ws = SimpleNamespace()
    ws.alpha = fake.add_doc("Alpha")
    ws.home = ws.alpha.add_page("Home")
    ws.notes = ws.alpha.add_page("Notes")
    ws.secret = ws.alpha.add_page("Secret", hidden=True)
    ws.secret_child = ws.alpha.add_page("Secret Child", parent=ws.secret)
    ws.tasks = ws.alpha.add_table("Tasks", columns=["Task"], parent_page=ws.home, rows=[{"Task": "x"}])
    ws.open_view = ws.alpha.add_view(ws.tasks, "Open Tasks", parent_page=ws.home)
    ws.archive = ws.alpha.add_table("Archive", columns=["Name"], parent_page=ws.notes, rows=[{"Name": "old"}])
    ws.beta = fake.add_doc("Beta")
    ws.beta_home = ws.beta.add_page("Start")
    ws.glossary = ws.beta.add_table("Glossary", columns=["Term"], parent_page=ws.beta_home, rows=[{"Term": "API"}])
    ws.gamma = fake.add_doc("Gamma")
    ws.gamma.add_page("Welcome")
    ws.delta = fake.add_doc("Delta")
    ws.delta.add_page("Hello")
    return ws


class VanishedRunTest(BackupTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.ws = build_workspace(self.fake)

    def night(self, *flags: str, expect: int = 0) -> Path:
        code = self.run_backup("--no-extras", *flags)
        self.assertEqual(code, expect, self.stderr)
        return self.snapshots()[-1]

    def entry(self, kind: str, obj: Any, last: Path) -> Dict[str, Any]:
        doc_id = obj.id if kind == "doc" else obj.doc.id
        return {"kind": kind, "doc_id": doc_id, "id": obj.id, "name": obj.name, "last_snapshot": last.name}

    def test_deleted_doc_page_and_table_are_reported(self) -> None:
        first = self.night()
        self.assertEqual(self.summary(first)["vanished"], [])
        self.assertEqual(self.summary(first)["counts"]["vanished"], {"docs": 0, "pages": 0, "tables": 0, "views": 0})
        ws = self.ws
        ws.alpha.remove_page(ws.notes)  # takes the Archive table on it along
        ws.beta.remove_table(ws.glossary)
        self.fake.remove_doc(ws.gamma)  # 1 of 4 docs: 25%, not more, so the guard holds
        second = self.night("--incremental")
        self.assertEqual(self.latest(), second)
        expected = [self.entry("page", ws.notes, first), self.entry("table", ws.archive, first),
                    self.entry("table", ws.glossary, first), self.entry("doc", ws.gamma, first)]
        summary = self.summary(second)
        self.assertEqual(summary["vanished"], expected)
        self.assertEqual(summary["counts"]["vanished"], {"docs": 1, "pages": 1, "tables": 2, "views": 0})
        self.assertEqual(summary["status"], "completed")
        self.assertIn(f"WARNING doc Gamma ({ws.gamma.id}) vanished", self.stderr)
        self.assertIn("1 page(s), 2 table(s) and 0 view(s) vanished", self.stderr)
        self.assertEqual([w.split(":")[0] for w in summary["warnings"]],
                         [f"doc Gamma ({ws.gamma.id}) vanished", "1 page(s), 2 table(s) and 0 view(s) vanished since "
                          f"snapshot {first.name} (see vanished in summary.json)"])
        record = read_json(self.out / "vanished.json")
        self.assertEqual(without(record["entries"], "vanished_at"), expected)
        self.assertEqual({e["vanished_at"] for e in record["entries"]}, {summary["started_at"]})

        third = self.night("--incremental")  # nothing new vanished; the record keeps what it knew
        self.assertEqual(self.summary(third)["vanished"], [])
        self.assertEqual(read_json(self.out / "vanished.json"), record)

    def test_what_the_selection_leaves_out_never_counts(self) -> None:
        self.night()
        ws = self.ws
        self.fake.remove_doc(ws.gamma)
        ws.alpha.remove_table(ws.open_view)
        ws.beta.remove_table(ws.glossary)
        ws.alpha.remove_page(ws.secret_child)
        ws.alpha.remove_table(ws.archive)
        self.fake.add_fault(rf"/docs/{ws.alpha.id}/tables$", status=403, times=None)  # listing fails
        second = self.night("--exclude-doc", "Gamma", "--no-views", "--exclude-table", "Beta/Gloss*",
                            "--skip-hidden-pages", expect=1)
        summary = self.summary(second)
        self.assertEqual(summary["vanished"], [])
        self.assertEqual(summary["counts"]["vanished"], {"docs": 0, "pages": 0, "tables": 0, "views": 0})
        self.assertEqual([f["kind"] for f in summary["failures"]], ["doc"], "only the failed listing")
        self.assertNotIn("vanished", self.stderr)

    def test_guard_and_keep_vanished_over_several_nights(self) -> None:
        first = self.night("--keep", "1")
        self.fake.remove_doc(self.ws.gamma)
        self.fake.remove_doc(self.ws.delta)  # 2 of 4 docs

        guarded = self.night("--incremental", "--keep", "1", expect=1)
        summary = self.summary(guarded)
        self.assertEqual(summary["status"], "completed_with_errors")
        failure, = summary["failures"]
        self.assertEqual(failure["kind"], "vanished")
        self.assertIn("2 of 4 docs vanished", failure["error"])
        self.assertIn(f"latest stays at {first.name}", failure["error"])
        self.assertEqual(self.latest(), first, "latest must not move past a big deletion")
        self.assertEqual(self.snapshots(), [first, guarded], "nothing pruned")

        accepted = self.night("--incremental", "--keep", "1", "--allow-vanished")
        self.assertEqual(self.latest(), accepted)
        self.assertEqual([e["id"] for e in self.summary(accepted)["vanished"]], [self.ws.gamma.id, self.ws.delta.id])
        self.assertIn("accepted by --allow-vanished", self.stderr)
        self.assertEqual(self.snapshots(), [first, accepted], "--keep 1 prunes, but not the last copy of Gamma")

        later = self.night("--incremental", "--keep", "1")
        self.assertEqual(self.snapshots(), [first, later])
        self.assertEqual(self.run_main(["--output", str(self.out), "--list-runs"]), 0, self.stderr)
        kept = self.stdout.split(first.name, 1)[1]
        self.assertIn(f"kept: newest copy of doc Gamma ({self.ws.gamma.id}), doc Delta ({self.ws.delta.id})", kept)
        self.assertIn("--keep-vanished 90", kept)
        self.assertEqual(self.run_main(["--output", str(self.out), "--list-runs", "--json"]), 0, self.stderr)
        runs = {run["snapshot"]: run for run in json.loads(self.stdout)}
        self.assertIsNone(runs[later.name]["protected"])
        self.assertIn("vanished from Coda", runs[first.name]["protected"])

        # Without the rule the next prune takes it.
        self.night("--incremental", "--keep", "1", "--keep-vanished", "0")
        self.assertFalse(first.exists())

    def test_a_one_off_doc_run_does_not_blind_the_nightly_run(self) -> None:
        """After `--doc Beta` became latest, the next full night is compared with the last full
        snapshot, not with latest (which knows nothing of Gamma and Delta): the guard trips."""
        full = self.night()
        one_off = self.night("--doc", "Beta")
        self.assertEqual(self.latest(), one_off)
        self.fake.remove_doc(self.ws.gamma)
        self.fake.remove_doc(self.ws.delta)  # 2 of 4 docs

        guarded = self.night("--incremental", expect=1)
        summary = self.summary(guarded)
        self.assertEqual([e["id"] for e in summary["vanished"]], [self.ws.gamma.id, self.ws.delta.id])
        failure, = summary["failures"]
        self.assertEqual(failure["kind"], "vanished")
        self.assertIn(f"since snapshot {full.name}", failure["error"])
        self.assertIn(f"latest stays at {one_off.name}", failure["error"])
        self.assertEqual(self.latest(), one_off)
        self.assertEqual(summary["changes"]["since"], full.name, "changes agree with vanished: none added")
        self.assertEqual([summary["changes"]["docs"][key] for key in ("added", "removed")], [0, 2])

    def check_usage(self, *flags: str) -> None:
        self.assertEqual(self.run_backup(*flags), 2)
        self.assertEqual(len(self.stderr.strip().splitlines()), 1, self.stderr)

    def test_bad_values_are_usage_errors(self) -> None:
        for flags in (["--max-vanished", "101"], ["--max-vanished", "-1"], ["--keep-vanished", "-1"]):
            with self.subTest(flags):
                self.check_usage(*flags)
