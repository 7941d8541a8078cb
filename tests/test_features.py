"""End-to-end tests for the "complete the product" flags.

Page formats, NDJSON rows, doc extras, doc/table filters, --dry-run, run management (--list-runs,
--retry-failed, --keep, --zip), the `running` summary, --config, --log-file/--quiet and the manifest
as a restore aid. Every test runs the real CLI in-process against the fake Coda over HTTP (see
support.py) and asserts on files, summary.json, manifest.json, exit codes and the fake's request log.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import coda_backup
from fake_coda import FakeCoda, display_text, iso_time
from support import FAST_FLAGS, TOKEN, BackupTestCase, read_csv, read_json

HAVE_TOMLLIB = sys.version_info >= (3, 11)


def build_small_workspace(fake: FakeCoda, two_docs: bool = True) -> SimpleNamespace:
    """One or two owned docs, small enough to back up in a blink, with everything the features touch.

    alpha "Alpha Doc": pages Overview > Details, Notes; table Tasks (5 rows, list/dict/bool/null
    values) on Overview, view "Open Tasks" (3 rows) on Details, table "Archive 2023" (2 rows) on
    Notes; three formulas and two controls.  beta "Beta: Wiki" (only with two_docs): page Home,
    table Glossary (1 row).  `pages` and `tables` list every page and table/view of the workspace.
    """
    alpha = fake.add_doc("Alpha Doc")
    overview = alpha.add_page("Overview", content="# Overview\n\nWhere things stand.\n\n- one\n- two\n")
    details = alpha.add_page("Details", parent=overview, content="# Details\n\nMore «detail» ✓.\n")
    notes = alpha.add_page("Notes")
    tasks = alpha.add_table("Tasks", parent_page=overview, columns=[
        "Task",
        {"name": "Points", "type": "number"},
        {"name": "Tags", "type": "select", "isArray": True},
        {"name": "Done", "type": "checkbox"},
        {"name": "Meta", "type": "packObject"},
        "Notes",
    ])
    for values in [
        {"Task": "Plan", "Points": 5, "Tags": ["a", "b"], "Done": True, "Meta": {"owner": "Ana"},
         "Notes": 'x, "y"'},
        {"Task": "Build", "Points": 8.5, "Tags": [], "Done": False, "Meta": None, "Notes": "line1\nline2"},
        {"Task": "Ünïcødé ✓", "Points": -3, "Tags": ["c"], "Done": False, "Meta": {"n": [1, None]},
         "Notes": None},
        {"Task": "Ship", "Points": 0, "Tags": ["launch"], "Done": True, "Meta": {}, "Notes": ""},
        {"Task": "Review", "Points": 13, "Tags": ["z"], "Done": False, "Meta": {"k": True}, "Notes": "ok"},
    ]:
        tasks.add_row(values)
    done = tasks.column("Done").id
    open_view = alpha.add_view(tasks, "Open Tasks", parent_page=details,
                               row_filter=lambda values: values.get(done) is False)
    archive = alpha.add_table("Archive 2023", columns=["Name"], parent_page=notes,
                              rows=[{"Name": "old"}, {"Name": "older"}])
    formulas = [alpha.add_formula("Total Points", 42, parent=overview),
                alpha.add_formula("Owners", ["Ana", "Bo"]),
                alpha.add_formula("Launch Ready", True)]
    controls = [alpha.add_control("Start Date", "2024-06-01", control_type="datePicker", parent=overview),
                alpha.add_control("Budget", 7, control_type="slider")]
    ws = SimpleNamespace(
        alpha=alpha, overview=overview, details=details, notes=notes,
        tasks=tasks, open_view=open_view, archive=archive, formulas=formulas, controls=controls,
        pages=[overview, details, notes], tables=[tasks, open_view, archive],
    )
    if two_docs:
        ws.beta = fake.add_doc("Beta: Wiki")
        ws.home = ws.beta.add_page("Home", content="# Home\n\nWelcome.\n")
        ws.glossary = ws.beta.add_table("Glossary", columns=["Term", "Meaning"], parent_page=ws.home,
                                        rows=[{"Term": "API", "Meaning": "interface"}])
        ws.pages.append(ws.home)
        ws.tables.append(ws.glossary)
    return ws


def files_under(root: Path) -> Dict[str, Path]:
    """Every regular file under root, by relative POSIX path."""
    return {path.relative_to(root).as_posix(): path for path in sorted(root.rglob("*")) if path.is_file()}


def manifest_owners(manifest: Dict[str, Any]) -> Dict[str, List[Tuple[str, Dict[str, Any], Dict[str, Any]]]]:
    """Relative file path -> [(kind, entry, file record)] for every file the manifest lists."""
    owners: Dict[str, List[Tuple[str, Dict[str, Any], Dict[str, Any]]]] = collections.defaultdict(list)
    for doc in manifest["docs"]:
        for record in doc["files"]:
            owners[record["path"]].append(("doc", doc, record))
        for kind in ("pages", "tables"):
            for entry in doc[kind]:
                for record in entry["files"]:
                    owners[record["path"]].append((kind[:-1], entry, record))
    for record in manifest.get("index", []):
        owners[record["path"]].append(("index", {}, record))
    return owners


def manifest_entry(manifest: Dict[str, Any], kind: str, object_id: str) -> Dict[str, Any]:
    """The manifest entry ("docs", "pages" or "tables") of one object id."""
    for doc in manifest["docs"]:
        if kind == "docs" and doc["id"] == object_id:
            return doc
        for entry in doc.get(kind, []) if kind != "docs" else []:
            if entry["id"] == object_id:
                return entry
    raise AssertionError(f"no manifest entry for {kind} {object_id}")


def item_list(data: Any) -> List[Dict[str, Any]]:
    """formulas.json / controls.json items (a list, or an object holding `items`)."""
    return data["items"] if isinstance(data, dict) else data


def toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of plain text is a valid TOML basic string


class FeatureTestCase(BackupTestCase):
    """BackupTestCase with the small workspace loaded into the fake (one doc unless TWO_DOCS)."""

    TWO_DOCS = False  # a second doc only where a test needs one
    ws: SimpleNamespace

    def setUp(self) -> None:
        super().setUp()
        self.ws = self.make_workspace()

    def make_workspace(self) -> SimpleNamespace:
        return build_small_workspace(self.fake, self.TWO_DOCS)

    def object_file(self, obj: Any, suffix: str, snapshot: Optional[Path] = None) -> Path:
        """The one file of a page/table ending in `__<id><suffix>` in its doc folder."""
        return self.find_one(self.doc_dir(obj.doc, snapshot), f"*__{obj.id}{suffix}")

    def assert_page_files(self, snapshot: Path, pages: List[Any], formats: Tuple[str, ...]) -> None:
        """Each page has exactly the files of `formats`, with the exported bytes, listed in the manifest."""
        suffixes = {"markdown": ".md", "html": ".html"}
        manifest = read_json(snapshot / "manifest.json")
        for page in pages:
            with self.subTest(page=page.name[:40], formats=formats):
                chain, node = [], page  # pages/<Ancestor>__<id>/.../<Name>__<id>, whatever the format
                while node is not None:
                    chain.append(coda_backup.object_stem(node.name, node.id))
                    node = node.parent
                stem = self.doc_dir(page.doc, snapshot).joinpath("pages", *reversed(chain))
                found = {fmt: list(self.doc_dir(page.doc, snapshot).rglob(f"*__{page.id}{suffix}"))
                         for fmt, suffix in suffixes.items()}
                for fmt, suffix in suffixes.items():
                    if fmt not in formats:
                        self.assertEqual(found[fmt], [], f"no {fmt} file expected")
                        continue
                    self.assertEqual(found[fmt], [stem.with_name(stem.name + suffix)], f"one {fmt} file")
                    self.assertEqual(found[fmt][0].read_bytes(), page.render(fmt).encode("utf-8"), fmt)
                if len(formats) == 2:  # the .html sits beside the .md, same name scheme
                    md, html = found["markdown"][0], found["html"][0]
                    self.assertEqual(md.parent, html.parent)
                    self.assertEqual(md.name[:-len(".md")], html.name[:-len(".html")])
                listed = {record["path"] for record in manifest_entry(manifest, "pages", page.id)["files"]}
                self.assertEqual(listed, {found[fmt][0].relative_to(snapshot).as_posix() for fmt in formats})

    def assert_exported_formats(self, page_count: int, formats: Tuple[str, ...]) -> None:
        posted = collections.Counter(
            record.body.get("outputFormat") for record in self.fake.requests("POST", r"/export$"))
        self.assertEqual(posted, dict.fromkeys(formats, page_count))

    def assert_verifies(self, output: Optional[Path] = None) -> None:
        code = self.run_main(["--output", str(output or self.out), "--verify"])
        self.assertEqual(code, 0, f"--verify: {self.stdout} {self.stderr}")


# --- --page-format / --html-pages -------------------------------------------------------------


class PageFormatTest(FeatureTestCase):
    """The default (markdown only) is checked by DefaultRunTest."""

    def test_formats(self) -> None:
        cases = [
            (("--page-format", "markdown"), ("markdown",)),
            (("--page-format", "md"), ("markdown",)),  # the contract's spelling
            (("--page-format", "html"), ("html",)),
            (("--page-format", "both"), ("markdown", "html")),
            (("--html-pages",), ("markdown", "html")),
        ]
        for number, (flags, formats) in enumerate(cases):
            with self.subTest(flags=flags):
                out = self.out.parent / f"formats-{number}"
                self.fake.clear_log()
                self.assertEqual(self.run_backup(*flags, "--no-extras", output=out), 0, self.stderr)
                snapshot = coda_backup.read_latest(out)
                assert snapshot is not None
                self.assert_page_files(snapshot, self.ws.pages, formats)
                self.assert_exported_formats(len(self.ws.pages), formats)

    def test_unknown_format_is_a_usage_error(self) -> None:
        self.assertEqual(self.run_backup("--page-format", "pdf"), 2)
        self.assertFalse(self.out.exists())


# --- --rows-json ---------------------------------------------------------------------------------


class RowsJsonTest(FeatureTestCase):
    def test_ndjson_beside_each_csv(self) -> None:
        self.fake.max_limit = 2  # rows come in several pages: the NDJSON must follow them like the CSV
        self.assertEqual(self.run_backup("--rows-json", "--no-extras"), 0, self.stderr)
        self.assertGreater(len(self.fake.requests("GET", rf"/tables/{self.ws.tasks.id}/rows$")), 1)
        snapshot = self.latest()
        owners = manifest_owners(self.manifest(snapshot))
        for table in self.ws.tables:
            with self.subTest(table=table.name):
                csv_path = self.object_file(table, ".csv", snapshot)
                ndjson = csv_path.with_name(csv_path.name[:-len(".csv")] + ".rows.ndjson")
                self.assertTrue(ndjson.is_file(), f"{ndjson} missing")
                raw = ndjson.read_bytes()
                self.assertTrue(raw.endswith(b"\n"))
                lines = raw[:-1].split(b"\n")
                rows = list(table.rows)
                self.assertEqual(len(lines), len(rows))
                self.assertEqual(len(lines), len(read_csv(csv_path)) - 1, "as many rows as the CSV")
                column_ids = [column.id for column in table.columns]
                for index, (line, row) in enumerate(zip(lines, rows)):
                    record = json.loads(line.decode("utf-8"))
                    self.assertEqual(set(record),
                                     {"id", "name", "index", "createdAt", "updatedAt", "browserLink", "values"})
                    self.assertEqual(record["id"], row.id)
                    self.assertEqual(record["name"], display_text(row.values.get(column_ids[0])))
                    self.assertEqual(record["index"], index)
                    self.assertEqual(record["createdAt"], iso_time(row.created))
                    self.assertEqual(record["updatedAt"], iso_time(row.updated))
                    self.assertIn(row.id, record["browserLink"])
                    self.assertEqual(record["values"], {cid: row.values.get(cid, "") for cid in column_ids})
                relative = ndjson.relative_to(snapshot).as_posix()
                self.assertEqual(len(owners.get(relative, [])), 1, f"manifest lists {relative} once")
                kind, entry, file_record = owners[relative][0]
                self.assertEqual((kind, entry["id"]), ("table", table.id))
                self.assertEqual(file_record["role"], "rows")
                self.assertEqual(file_record["sha256"], hashlib.sha256(raw).hexdigest())
                self.assertEqual(file_record["size"], len(raw))
        self.assert_verifies()


# --- doc extras: formulas, controls, sharing ----------------------------------------------------


class DocExtrasTest(FeatureTestCase):
    TWO_DOCS = True
    EXTRA_PATHS = r"/docs/[^/]+/(formulas|controls|acl)(/|$)"

    def test_formulas_controls_and_permissions(self) -> None:
        """Beta's sharing is readable; Alpha's answers 403 (not the owner's): skipped, not failed."""
        self.fake.max_limit = 2  # three formulas: the list needs two pages
        self.ws.alpha.acl_forbidden = True
        self.assertEqual(self.run_backup(), 0, self.stderr)
        snapshot = self.latest()
        summary = self.summary(snapshot)
        self.assertEqual((summary["status"], summary["failures"]), ("completed", []))
        skipped = [item for item in summary.get("skipped", []) if item.get("kind") == "permissions"]
        self.assertEqual([item.get("doc_id") for item in skipped], [self.ws.alpha.id])
        self.assertTrue(self.fake.requests("GET", rf"/docs/{self.ws.alpha.id}/acl/"), "it did ask")

        alpha = self.doc_dir(self.ws.alpha, snapshot)
        self.assertFalse((alpha / "permissions.json").exists())
        formulas = item_list(read_json(alpha / "formulas.json"))
        self.assertEqual({item["id"]: item["value"] for item in formulas},
                         {formula.id: formula.value for formula in self.ws.formulas})
        self.assertEqual({item["id"]: item["name"] for item in formulas},
                         {formula.id: formula.name for formula in self.ws.formulas})
        controls = item_list(read_json(alpha / "controls.json"))
        self.assertEqual({item["id"]: item["value"] for item in controls},
                         {control.id: control.value for control in self.ws.controls})

        beta = self.doc_dir(self.ws.beta, snapshot)
        sharing = read_json(beta / "permissions.json")
        self.assertEqual([perm["id"] for perm in sharing["permissions"]],
                         [perm["id"] for perm in self.ws.beta.permissions])
        self.assertEqual(sharing["settings"], self.ws.beta.acl_settings)
        self.assertEqual(sharing["metadata"], self.ws.beta.acl_metadata)
        self.assertEqual(item_list(read_json(beta / "formulas.json")), [], "none: an empty list, still saved")

        owners = manifest_owners(self.manifest(snapshot))
        for path in (alpha / "formulas.json", alpha / "controls.json", beta / "permissions.json"):
            relative = path.relative_to(snapshot).as_posix()
            with self.subTest(file=relative):
                self.assertEqual([kind for kind, _, _ in owners.get(relative, [])], ["doc"])
                self.assertEqual(owners[relative][0][2]["sha256"], hashlib.sha256(path.read_bytes()).hexdigest())
        self.assertNotIn((alpha / "permissions.json").relative_to(snapshot).as_posix(), owners)

    def test_no_extras_asks_for_none(self) -> None:
        self.assertEqual(self.run_backup("--no-extras"), 0, self.stderr)
        self.assertEqual([record.path for record in self.fake.requests(None, self.EXTRA_PATHS)], [])
        for name in ("formulas.json", "controls.json", "permissions.json"):
            with self.subTest(file=name):
                self.assertEqual(list(self.latest().rglob(name)), [])
        self.assertTrue(list(self.latest().rglob("*.csv")), "the rest is still backed up")


# --- --doc / --exclude-doc / --exclude-table ------------------------------------------------------


class FilterTest(FeatureTestCase):
    TWO_DOCS = True

    def doc_requests(self, doc: Any) -> List[str]:
        return [record.path for record in self.fake.requests(None, rf"^/docs/{doc.id}(/|$)")]

    def run_filtered(self, label: str, *flags: str, code: int = 0) -> Tuple[Path, List[str]]:
        """One run into its own --output; returns the snapshot and the ids of the docs it holds."""
        self.fake.clear_log()
        output = self.out.parent / label
        self.assertEqual(self.run_backup(*flags, "--no-extras", output=output), code, self.stderr)
        snapshot = coda_backup.read_latest(output)
        assert snapshot is not None
        ids = sorted(doc["id"] for doc in read_json(snapshot / "manifest.json")["docs"])
        self.assertEqual(sorted(p.name.rsplit("__", 1)[1] for p in (snapshot / "docs").iterdir()), ids)
        return snapshot, ids

    def test_doc_by_exact_name_and_an_unknown_value_is_a_filter_failure(self) -> None:
        _, ids = self.run_filtered("by-name", "--doc", "Beta: Wiki", "--doc", "no-such-doc-42", code=1)
        self.assertEqual(ids, [self.ws.beta.id])
        self.assertEqual(self.doc_requests(self.ws.alpha), [], "Alpha Doc was not to be touched")
        errors = [line for line in self.stderr.splitlines() if "no-such-doc-42" in line]
        self.assertTrue(errors and all("ERROR" in line for line in errors), self.stderr)
        summary = read_json(self.out.parent / "by-name" / "last-run.json")
        self.assertEqual((summary["status"], summary["exit_code"]), ("completed_with_errors", 1))
        snapshot = coda_backup.read_latest(self.out.parent / "by-name")
        assert snapshot is not None
        failures = read_json(snapshot / "summary.json")["failures"]
        self.assertEqual([(f["kind"], "no-such-doc-42" in f["error"]) for f in failures], [("filter", True)])

    def test_doc_by_id_repeated_and_exclude_doc_by_id(self) -> None:
        ws = self.ws
        _, ids = self.run_filtered("by-id", "--doc", ws.alpha.id, "--doc", "Beta: Wiki")
        self.assertEqual(ids, sorted([ws.alpha.id, ws.beta.id]))
        self.assertEqual(self.stderr.count("WARNING"), 0, self.stderr)
        _, ids = self.run_filtered("exclude-id", "--doc", ws.alpha.id, "--doc", "Beta: Wiki",
                                   "--exclude-doc", ws.beta.id)
        self.assertEqual(ids, [ws.alpha.id])
        self.assertEqual(self.doc_requests(ws.beta), [])

    def test_exclude_doc_by_name(self) -> None:
        _, ids = self.run_filtered("exclude-name", "--exclude-doc", "Alpha Doc")
        self.assertEqual(ids, [self.ws.beta.id])
        self.assertEqual(self.doc_requests(self.ws.alpha), [])

    def test_exclude_table_globs(self) -> None:
        ws = self.ws
        cases = [
            # "Arch*" names a table of Alpha Doc, so under Beta: Wiki it must leave Archive alone
            ("name globs", ["Alpha Doc/Open*", "Beta: Wiki/Arch*"], {ws.open_view}),
            ("ids and names", [f"{ws.alpha.id}/{ws.archive.id}", "Beta: Wiki/*"], {ws.archive, ws.glossary}),
        ]
        for label, patterns, excluded in cases:
            with self.subTest(label):
                flags = [arg for pattern in patterns for arg in ("--exclude-table", pattern)]
                snapshot, _ = self.run_filtered(f"tables-{label.replace(' ', '-')}", *flags)
                manifest = read_json(snapshot / "manifest.json")
                kept = {entry["id"] for doc in manifest["docs"] for entry in doc["tables"]}
                self.assertEqual(kept, {table.id for table in ws.tables} - {table.id for table in excluded})
                for table in ws.tables:
                    files = list((snapshot / "docs").rglob(f"*__{table.id}.csv"))
                    requests = self.fake.requests("GET", rf"/tables/{table.id}(/|$)")
                    if table in excluded:
                        self.assertEqual(files, [], table.name)
                        self.assertEqual(requests, [], f"{table.name} excluded but requested")
                    else:
                        self.assertEqual(len(files), 1, table.name)

    def test_nothing_matched_is_exit_1(self) -> None:
        cases = [("unknown id", "no-such-doc-42"), ("not the exact name", "alpha doc")]
        for label, value in cases:
            with self.subTest(label):
                self.fake.clear_log()
                output = self.out.parent / f"nomatch-{label.replace(' ', '-')}"
                self.assertEqual(self.run_backup("--doc", value, output=output), 1, self.stderr)
                self.assertIn(value, self.stderr)
                snapshot = max(p for p in output.iterdir() if coda_backup.SNAPSHOT_NAME_RE.match(p.name))
                summary = read_json(snapshot / "summary.json")
                self.assertEqual([failure["kind"] for failure in summary["failures"]], ["filter"])
                self.assertEqual(summary["status"], "failed")
                self.assertIsNone(coda_backup.read_latest(output), "an empty run must not become latest")
                self.assertEqual(self.doc_requests(self.ws.alpha) + self.doc_requests(self.ws.beta), [])


# --- --dry-run --------------------------------------------------------------------------------


class DryRunTest(FeatureTestCase):
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


# --- --list-runs -------------------------------------------------------------------------------


class ListRunsTest(FeatureTestCase):
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


# --- --retry-failed ----------------------------------------------------------------------------


class RetryFailedTest(FeatureTestCase):
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


# --- --keep --------------------------------------------------------------------------------------


class KeepTest(FeatureTestCase):
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


# --- summary.json while running -----------------------------------------------------------------


class RunningSummaryTest(BackupTestCase):
    def test_summary_says_running_during_the_run(self) -> None:
        doc = self.fake.add_doc("Slow Doc")
        pages = [doc.add_page(f"Page {number}") for number in range(2)]
        self.fake.export_delay = 0.4  # the run lasts at least that long
        result: Dict[str, int] = {}
        worker = threading.Thread(target=lambda: result.update(code=self.run_backup()))
        worker.start()
        self.addCleanup(worker.join, 30)
        seen: Optional[Dict[str, Any]] = None
        downloads_then = -1
        deadline = time.monotonic() + 20
        while seen is None and worker.is_alive() and time.monotonic() < deadline:
            for path in (self.out.glob("*/summary.json") if self.out.is_dir() else []):
                try:
                    data = read_json(path)
                except (OSError, ValueError):
                    continue
                if data.get("status") == "running":
                    downloads_then = len(self.fake.requests("GET", None, host="download"))
                    seen = data
                    break
            time.sleep(0.01)
        still_running = worker.is_alive()
        worker.join(30)
        self.assertFalse(worker.is_alive(), "the run did not end")
        self.assertIsNotNone(seen, "never saw a summary.json with status running")
        assert seen is not None
        self.assertTrue(still_running, "seen while the run was still going")
        self.assertIsNone(seen.get("finished_at"))
        self.assertIn("started_at", seen)
        self.assertEqual(downloads_then, 0, "the running summary is written before any page is saved")
        self.assertEqual(result.get("code"), 0, self.stderr)
        final = self.summary()
        self.assertEqual(final["status"], "completed")
        self.assertEqual(final["counts"]["pages"], len(pages))


# --- --zip ------------------------------------------------------------------------------------


class ZipTest(FeatureTestCase):
    def test_zip_holds_every_file(self) -> None:
        self.assertEqual(self.run_backup("--zip", "--page-format", "both"), 0, self.stderr)
        snapshot = self.latest()
        archive = self.out / f"{snapshot.name}.zip"
        self.assertTrue(archive.is_file())
        files = files_under(snapshot)
        self.assertIn("summary.json", files)
        with zipfile.ZipFile(archive) as opened:
            self.assertIsNone(opened.testzip())
            names = [name for name in opened.namelist() if not name.endswith("/")]
            self.assertEqual(sorted(names), sorted(f"{snapshot.name}/{path}" for path in files))
            for path, real in files.items():
                with self.subTest(path=path):
                    self.assertEqual(opened.read(f"{snapshot.name}/{path}"), real.read_bytes())
        self.assertEqual(read_json(snapshot / "summary.json")["status"], "completed")
        leftovers = [p.name for p in self.out.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".part")]
        self.assertEqual(leftovers, [])
        self.assertEqual(coda_backup.read_latest(self.out), snapshot)
        self.assertEqual((self.out / "latest.txt").read_text(encoding="utf-8").strip(), snapshot.name)
        if os.name == "posix":
            self.assertEqual(os.readlink(self.out / "latest"), snapshot.name)
            self.assertTrue((self.out / "latest").is_dir())
        self.assertEqual(sorted(p.name for p in self.out.glob("*.zip")), [archive.name])


# --- --config ----------------------------------------------------------------------------------


class ConfigTest(FeatureTestCase):
    """On Python 3.11+ the TOML file gives defaults; before 3.11 --config is a clear exit 2."""

    TWO_DOCS = True

    def run_config(self, text: str, *extra: str, output_flag: bool = True) -> int:
        config = self.out.parent / "coda-backup.toml"
        config.write_text(text, encoding="utf-8")
        args = ["--config", str(config), "--api-url", self.fake.api_url, *FAST_FLAGS]
        if output_flag:
            args = ["--output", str(self.out), *args]
        return self.run_main([*args, *extra])

    def assert_old_python_refuses(self, code: int) -> None:
        self.assertEqual(code, 2)
        self.assertIn("3.11", self.stderr)
        self.assertNotIn("Traceback", self.stderr)
        self.assertFalse(self.out.exists())
        self.assertEqual(self.fake.requests(), [])

    def test_file_gives_defaults(self) -> None:
        code = self.run_config("\n".join([
            f"output = {toml_string(str(self.out))}",
            'page-format = "html"',
            "rows-json = true",
            'exclude-table = ["Alpha Doc/Arch*"]',
            "no-extras = true",
            "",
        ]), output_flag=False)
        if not HAVE_TOMLLIB:
            self.assert_old_python_refuses(code)
            return
        self.assertEqual(code, 0, self.stderr)
        snapshot = self.latest()  # the output folder came from the file
        self.assertTrue(self.object_file(self.ws.overview, ".html", snapshot).is_file())
        self.assertEqual(list(snapshot.rglob("*.md")), [])
        self.assertTrue(self.object_file(self.ws.tasks, ".rows.ndjson", snapshot).is_file())
        self.assertEqual(list(snapshot.rglob(f"*__{self.ws.archive.id}.csv")), [])
        self.assertEqual(self.fake.requests(None, DocExtrasTest.EXTRA_PATHS), [])

    def test_one_run_flags_and_commands_are_refused(self) -> None:
        """A config key the command line could not undo: allow-vanished would disarm the deletion
        guard every night, dry-run would make every night a dry run."""
        for key in ("allow-vanished = true", "dry-run = true", "prune = true", "retry-failed = true"):
            with self.subTest(key=key):
                code = self.run_config(key + "\n")
                if not HAVE_TOMLLIB:
                    self.assert_old_python_refuses(code)
                    continue
                self.assertEqual(code, 2, self.stderr)
                self.assertIn("is for one run", self.stderr)
                self.assertEqual(self.fake.requests(), [])

    def test_command_line_wins(self) -> None:
        code = self.run_config('page-format = "html"\ndoc = ["Beta: Wiki"]\nkeep = 3\nno-extras = true\n',
                               "--page-format", "markdown", "--doc", "Alpha Doc")
        if not HAVE_TOMLLIB:
            self.assert_old_python_refuses(code)
            return
        self.assertEqual(code, 0, self.stderr)
        snapshot = self.latest()
        self.assertEqual(list((snapshot / "docs").rglob("*.html")), [])
        self.assertTrue(self.object_file(self.ws.overview, ".md", snapshot).is_file())
        self.assertEqual([doc["id"] for doc in self.manifest(snapshot)["docs"]], [self.ws.alpha.id],
                         "--doc on the command line replaces the file's doc list")

    def test_a_switch_from_the_file_can_be_turned_off(self) -> None:
        config = "incremental = true\nno-extras = true\n"
        if not HAVE_TOMLLIB:
            self.assert_old_python_refuses(self.run_config(config, "--no-incremental"))
            return
        self.assertEqual(self.run_backup("--no-extras"), 0, self.stderr)
        self.fake.clear_log()
        code = self.run_config(config, "--no-incremental")
        self.assertEqual(code, 0, self.stderr)
        self.assertEqual(len(self.fake.requests("POST", r"/export$")), len(self.ws.pages), "a full backup")

    def test_unknown_key(self) -> None:
        code = self.run_config('page-format = "html"\ncolour = "blue"\n')
        if not HAVE_TOMLLIB:
            self.assert_old_python_refuses(code)
            return
        self.assertEqual(code, 2)
        self.assertIn("colour", self.stderr)
        self.assertNotIn("Traceback", self.stderr)
        self.assertFalse(self.out.exists())
        self.assertEqual(self.fake.requests(), [])

    def test_bad_values(self) -> None:
        cases = [
            ("keep", 'keep = "three"'),
            ("page-format", "page-format = 5"),
            ("page-format", 'page-format = "pdf"'),
            ("include-shared", 'include-shared = "yes"'),
            ("exclude-table", 'exclude-table = "Alpha Doc/*"'),
            ("concurrency", "concurrency = 2.5"),
            ("max-retries", "max-retries = true"),
            ("not TOML", "page-format = "),
        ]
        for key, line in cases:
            with self.subTest(line=line):
                code = self.run_config(line + "\n")
                if not HAVE_TOMLLIB:
                    self.assert_old_python_refuses(code)
                    continue
                self.assertEqual(code, 2, self.stderr)
                self.assertEqual(len(self.stderr.strip().splitlines()), 1, self.stderr)
                if key != "not TOML":
                    self.assertIn(key, self.stderr)
                self.assertFalse(self.out.exists())
        self.assertEqual(self.fake.requests(), [])


# --- --log-file / --quiet -----------------------------------------------------------------------


class LoggingTest(FeatureTestCase):
    def test_log_file_and_quiet(self) -> None:
        log = self.out.parent / "backup.log"
        spare = self.out.parent / "spare-token.txt"
        spare.write_text("not-used\n", encoding="utf-8")
        # ERRORs (a page export fails, a --doc that matches nothing), a WARNING (a token file beside
        # CODA_API_TOKEN) and INFO/DEBUG lines
        noisy = ("--no-extras", "--doc", "Alpha Doc", "--doc", "no-such-doc-42", "--log-file", str(log),
                 "--token-file", str(spare))
        self.ws.notes.export_fail_times = 1
        self.assertEqual(self.run_backup(*noisy, "--log-level", "DEBUG"), 1)
        text = log.read_text(encoding="utf-8")
        for level, needle in (("ERROR", self.ws.notes.id), ("ERROR", "no-such-doc-42"), ("WARNING", spare.name)):
            with self.subTest(level=level):
                self.assertTrue(any(level in line and needle in line for line in text.splitlines()), text[-3000:])
                self.assertTrue(any(level in line and needle in line for line in self.stderr.splitlines()),
                                "the log still goes to stderr too")
        self.assertIn(" DEBUG ", text)
        self.assertIn(" INFO ", self.stderr)
        self.assertNotIn(TOKEN, text)
        self.assertNotIn(TOKEN, self.stderr)
        if os.name == "posix":
            self.assertEqual(log.stat().st_mode & 0o777, 0o600, "created 0600")

        self.ws.notes.export_fail_times = 1
        self.assertEqual(self.run_backup(*noisy, "--log-level", "INFO", "--quiet"), 1)
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        self.assertTrue(any("ERROR" in line and self.ws.notes.id in line for line in lines), self.stderr)
        for line in lines:
            self.assertNotIn(" INFO ", line)
            self.assertNotIn(" WARNING ", line)
        again = log.read_text(encoding="utf-8")
        self.assertTrue(again.startswith(text), "the second run appends to the log file")
        second = again[len(text):]
        self.assertIn("no-such-doc-42", second, "--quiet quiets stderr, not the log file")
        self.assertIn(" INFO ", second)
        self.assertNotIn(TOKEN, again)


class DamagedFilesTest(FeatureTestCase):
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


class LatestTest(FeatureTestCase):
    def test_a_latest_that_cannot_move_is_a_recorded_failure(self) -> None:
        (self.out / "latest.txt").mkdir(parents=True)  # in the way of the atomic rename
        self.assertEqual(self.run_backup("--no-extras"), 1, self.stderr)
        snapshot = self.snapshots()[-1]
        summary = self.summary(snapshot)
        self.assertEqual(summary["status"], "completed_with_errors")
        self.assertEqual([failure["kind"] for failure in summary["failures"]], ["latest"])
