"""--incremental, the manifest and --verify, end to end against the fake.

Every run must leave a snapshot that is complete on its own. With --incremental, an unchanged doc
is not contacted at all and its files are hard-linked from the latest snapshot; inside a changed
doc only the changed pages and tables are downloaded again. Anything doubtful (a broken manifest,
a failed object, a file deleted by hand, other flags) means downloading, never reusing.

Most tests use support.build_incremental_workspace (fast); the change-detection test uses the fake's sample
workspace, whose "Wide Table" has no view (a view's updatedAt follows its base table's in the fake,
so editing a table that has a view changes the view too).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List

from fake_coda import build_sample_workspace
from support import (
    IncrementalTestCase,
    build_incremental_workspace,
    coda_backup,
    flip_one_byte,
    manifest_entries,
    read_csv,
    read_json,
    tree_bytes,
)

SNAPSHOT_TIME_FORMAT = "%Y-%m-%dT%H%M%SZ"


def manifest_records(manifest: Dict[str, Any]) -> List[Dict[str, Any]]:
    return list(coda_backup.manifest_files(manifest))


def listed_files(root: Path) -> List[str]:
    """Every file of a snapshot except summary.json and manifest.json, as POSIX relative paths."""
    return sorted(
        path.relative_to(root).as_posix() for path in root.rglob("*")
        if path.is_file() and path.name not in ("summary.json", "manifest.json")
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class SnapshotTest(IncrementalTestCase):
    def test_incremental_snapshot_equals_a_fresh_full_backup_and_outlives_its_predecessor(self) -> None:
        ws = build_incremental_workspace(self.fake)
        first = self.backup()
        ws.overview.content = "# Overview\n\nQ3: ship the API.\n"
        ws.overview.touch()
        ws.plain.set_cell(0, "Value", "edited")
        second = self.backup("--incremental")

        self.assertEqual([p.name for p in self.snapshots()], sorted([first.name, second.name]))
        self.assertNotEqual(first, second)
        for snapshot in (first, second):  # DIR/<UTC timestamp>[-n]/, made just now
            taken = dt.datetime.strptime(snapshot.name[:18], SNAPSHOT_TIME_FORMAT).replace(tzinfo=dt.timezone.utc)
            self.assertLess(abs((dt.datetime.now(dt.timezone.utc) - taken).total_seconds()), 300, snapshot.name)

        fresh = self.backup(output=self.out.parent / "fresh")
        incremental_files = tree_bytes(second)
        self.assertEqual(sorted(incremental_files), sorted(tree_bytes(fresh)))
        self.assertEqual(incremental_files, tree_bytes(fresh))
        self.assertIn("edited", read_csv(self.table_csv(second, ws.plain))[1])

        shutil.rmtree(first)
        self.assertEqual(tree_bytes(second), incremental_files)
        self.assertEqual(self.verify(), 0, self.stdout)
        self.assertEqual(self.verify(second.name), 0, self.stdout)


class ChangeDetectionTest(IncrementalTestCase):
    def test_only_the_changed_page_and_table_are_downloaded_the_rest_is_linked(self) -> None:
        data = build_sample_workspace(self.fake)
        doc, roadmap, wide = data["doc"], data["roadmap"], data["wide_table"]
        first = self.backup(extras=True)
        old_roadmap = self.page_file(first, roadmap).read_bytes()
        old_wide = read_csv(self.table_csv(first, wide))

        roadmap.content = "# Roadmap\n\nNew plan: everything changes.\n"
        roadmap.touch()
        wide.set_cell(0, "Col 00", "changed-cell")  # Wide Table has no view that would change with it
        self.fake.clear_log()
        second = self.backup("--incremental", extras=True)

        # Requests: untouched docs not at all; in the changed doc one export and one table's rows.
        for untouched in (data["doc2"], data["other_ws_doc"]):
            self.assertEqual(self.doc_requests(untouched), [], untouched.name)
        self.assertEqual(self.export_posts(), [self.export_path(roadmap)])
        rows = self.rows_gets()
        self.assertTrue(rows, "the changed table's rows were not read")
        self.assertEqual(set(rows), {self.rows_path(wide)})

        # Every file of an untouched doc is a hard link of the previous snapshot's.
        for untouched in (data["doc2"], data["other_ws_doc"]):
            old_folder, new_folder = self.doc_dir(untouched, first), self.doc_dir(untouched, second)
            relative = listed_files(new_folder)
            self.assertIn("doc.json", relative)
            self.assertEqual(relative, listed_files(old_folder))
            for name in relative:
                self.assert_linked(new_folder / name, old_folder / name)

        # In the changed doc: unchanged pages and tables linked, changed ones downloaded anew.
        doc_entry = manifest_entries(self.manifest(second))[doc.id]
        changed = {roadmap.id, wide.id}
        for child in doc_entry["pages"] + doc_entry["tables"]:
            with self.subTest(object=child["name"]):
                if child["id"] in changed:
                    self.assertEqual(child["status"], "ok")
                    continue
                expected = "skipped" if child["id"] == data["sync_page"].id else "unchanged"
                self.assertEqual(child["status"], expected)
                for record in child["files"]:
                    if record["role"] == "table":  # fetched anyway, so written fresh: same bytes
                        self.assertEqual((second / record["path"]).read_bytes(), (first / record["path"]).read_bytes())
                    else:
                        self.assert_linked(second / record["path"], first / record["path"])
        self.assert_linked(self.page_file(second, data["page_a"]), self.page_file(first, data["page_a"]))
        self.assert_linked(self.table_csv(second, data["tasks"]), self.table_csv(first, data["tasks"]))
        self.assert_linked(self.table_csv(second, data["view"]), self.table_csv(first, data["view"]))

        new_page = self.page_file(second, roadmap)
        self.assert_not_linked(new_page, self.page_file(first, roadmap))
        self.assertEqual(new_page.read_text(encoding="utf-8"), roadmap.content)
        self.assertEqual(self.page_file(first, roadmap).read_bytes(), old_roadmap)  # old snapshot untouched
        new_csv = self.table_csv(second, wide)
        self.assert_not_linked(new_csv, self.table_csv(first, wide))
        new_rows = read_csv(new_csv)
        self.assertEqual(new_rows[1][new_rows[0].index("Col 00")], "changed-cell")
        self.assertEqual(new_rows[2:], old_wide[2:])
        self.assertEqual(read_csv(self.table_csv(first, wide)), old_wide)
        self.assertNotIn("changed-cell", [cell for row in old_wide for cell in row])

        counts = self.summary(second)["counts"]
        skipped = counts["skipped_unchanged"]
        self.assertIsInstance(skipped, dict)
        self.assertEqual({kind: skipped.get(kind) for kind in ("docs", "pages", "tables", "views")}, {
            "docs": counts["docs"] - 1, "pages": counts["pages"] - 1,
            "tables": counts["tables"] - 1, "views": counts["views"],
        })
        self.assertEqual(self.verify(), 0, self.stdout)

    def test_no_change_rerun_downloads_nothing_and_says_so(self) -> None:
        ws = build_incremental_workspace(self.fake)
        first = self.backup()
        self.fake.clear_log()
        second = self.backup("--incremental", "--log-level", "WARNING")

        self.assertEqual(self.export_posts(), [])
        self.assertEqual(self.rows_gets(), [])
        for doc in ws.docs:
            self.assertEqual(self.doc_requests(doc), [], doc.name)
        self.assertEqual({record.path for record in self.fake.requests()}, {"/whoami", "/docs"})
        self.assertEqual(self.fake.requests(host="download"), [])
        self.assertNotIn("WARNING", self.stderr)

        counts = self.summary(second)["counts"]
        skipped = counts["skipped_unchanged"]
        self.assertIsInstance(skipped, dict)
        for kind, expected in {"docs": 2, "pages": 4, "tables": 3, "views": 1}.items():
            self.assertEqual(skipped.get(kind), expected, kind)
        self.assertEqual((counts["docs"], counts["pages"], counts["tables"], counts["views"]), (2, 4, 3, 1))
        entries = manifest_entries(self.manifest(second))
        self.assertEqual(len(entries), 2 + 4 + 4)
        for entry in entries.values():
            self.assertEqual(entry["status"], "unchanged", entry.get("name"))
        self.assertEqual(tree_bytes(second), tree_bytes(first))

    def test_new_objects_are_fetched_and_deleted_ones_are_gone(self) -> None:
        ws = build_incremental_workspace(self.fake)
        gamma = self.fake.add_doc("Gamma Doc")
        welcome = gamma.add_page("Welcome")
        first = self.backup()
        fresh_page = ws.alpha.add_page("Fresh Page", content="# Fresh\n\nBrand new.\n")
        fresh_table = ws.alpha.add_table("Fresh Table", columns=["Name"], parent_page=ws.overview,
                                         rows=[{"Name": "newbie"}])
        ws.alpha.remove_page(ws.scratch)
        ws.alpha.remove_table(ws.plain)
        self.fake.remove_doc(gamma)
        self.fake.clear_log()
        second = self.backup("--incremental", "--allow-vanished")  # 1 of 3 docs gone trips the deletion guard

        # The page that now shows the fresh table is exported again too: its export includes it.
        self.assertEqual(sorted(self.export_posts()),
                         sorted([self.export_path(fresh_page), self.export_path(ws.overview)]))
        self.assertEqual(set(self.rows_gets()), {self.rows_path(fresh_table)})
        self.assertEqual(self.page_file(second, fresh_page).read_text(encoding="utf-8"), fresh_page.content)
        self.assertEqual(read_csv(self.table_csv(second, fresh_table))[1][6:], ["newbie"])

        entries = manifest_entries(self.manifest(second))
        self.assertIn(fresh_page.id, entries)
        self.assertIn(fresh_table.id, entries)
        for gone in (ws.scratch, ws.plain, gamma, welcome):
            with self.subTest(deleted=gone.name):
                self.assertNotIn(gone.id, entries)
                self.assert_no_file_of(second, gone.id)
                self.assertTrue(list(first.rglob(f"*{gone.id}*")), "the old snapshot lost it too")
        self.assertEqual(self.summary(second)["counts"]["docs"], 2)
        self.assertEqual(self.verify(), 0, self.stdout)


class ManifestAndVerifyTest(IncrementalTestCase):
    def assert_manifest_matches_files(self, snapshot: Path) -> Dict[str, Dict[str, Any]]:
        records = manifest_records(self.manifest(snapshot))
        self.assertEqual(sorted(record["path"] for record in records), listed_files(snapshot))
        for record in records:
            path = snapshot / record["path"]
            self.assertEqual(record["size"], path.stat().st_size, record["path"])
            self.assertEqual(record["sha256"], sha256(path), record["path"])
        return {record["path"]: record for record in records}

    def test_manifest_lists_every_file_with_size_and_sha256(self) -> None:
        ws = build_incremental_workspace(self.fake)
        first = self.backup()
        first_records = self.assert_manifest_matches_files(first)
        ws.overview.content = "# Overview\n\nRewritten.\n"
        ws.overview.touch()
        second = self.backup("--incremental")
        second_records = self.assert_manifest_matches_files(second)
        overview_md = self.page_file(second, ws.overview).relative_to(second).as_posix()
        self.assertNotEqual(second_records[overview_md]["sha256"], first_records[overview_md]["sha256"])
        glossary_csv = self.table_csv(second, ws.glossary).relative_to(second).as_posix()
        self.assertEqual(second_records[glossary_csv], first_records[glossary_csv])

    def test_entries_of_one_kind_keep_one_key_order_however_they_were_saved(self) -> None:
        """A doc, page or table entry lists its keys in one order (its record's), whether the object
        was downloaded, linked on its own or linked with its whole doc; only which keys it has differs."""
        ws = build_incremental_workspace(self.fake)
        first = self.backup()
        ws.overview.content = "# Overview\n\nRewritten.\n"
        ws.overview.touch()
        ws.plain.set_cell(0, "Value", "2")
        second = self.backup("--incremental")  # Alpha: Overview and Plain again, the rest linked; Beta linked whole
        found: Dict[str, List[Dict[str, Any]]] = {"doc": [], "page": [], "table": []}
        for snapshot in (first, second):
            for doc in self.manifest(snapshot)["docs"]:
                found["doc"].append(doc)
                found["page"].extend(doc["pages"])
                found["table"].extend(doc["tables"])
        records = {"doc": coda_backup.DocEntry, "page": coda_backup.PageEntry, "table": coda_backup.TableEntry}
        for kind, entries in found.items():
            self.assertEqual({(entry["status"], "reason" in entry) for entry in entries},
                             {("ok", False), ("ok", True), ("unchanged", True)}, kind)  # saved every way
            declared = [coda_backup.json_key(spec.name) for spec in dataclasses.fields(records[kind])]
            for entry in entries:
                with self.subTest(kind=kind, name=entry["name"], status=entry["status"]):
                    for other in entries:
                        self.assertEqual([key for key in entry if key in other], [key for key in other if key in entry])
                    self.assertEqual(list(entry), [key for key in declared if key in entry])

    def test_verify_passes_then_names_altered_and_missing_files(self) -> None:
        ws = build_incremental_workspace(self.fake)
        snapshot = self.backup()
        self.assertEqual(self.verify(), 0, self.stdout)

        csv_path = self.table_csv(snapshot, ws.items)
        csv_relative = csv_path.relative_to(snapshot).as_posix()
        original = csv_path.read_bytes()
        flip_one_byte(csv_path)
        self.assertEqual(self.verify(), 1, self.stdout)
        self.assert_stdout_names("altered", csv_relative)
        csv_path.chmod(0o600)
        csv_path.write_bytes(original)
        self.assertEqual(self.verify(), 0, self.stdout)

        page_path = self.page_file(snapshot, ws.details)
        page_path.unlink()
        self.assertEqual(self.verify(), 1, self.stdout)
        self.assert_stdout_names("missing", page_path.relative_to(snapshot).as_posix())
        self.assertNotIn(csv_relative, self.stdout)

    def test_verify_snapshot_name_checks_that_snapshot(self) -> None:
        ws = build_incremental_workspace(self.fake)
        first = self.backup()
        second = self.backup("--incremental")
        gone = self.table_csv(first, ws.glossary)
        gone.unlink()  # removes the first snapshot's link only

        self.assertEqual(self.verify(first.name), 1, self.stdout)
        self.assert_stdout_names("missing", gone.relative_to(first).as_posix())
        self.assertEqual(self.verify(), 0, self.stdout)
        self.assertEqual(self.verify(second.name), 0, self.stdout)
        self.assertTrue(self.table_csv(second, ws.glossary).is_file())

    def test_linked_files_keep_the_hashes_of_the_run_that_downloaded_them(self) -> None:
        ws = build_incremental_workspace(self.fake)
        first = self.backup()
        original_path = self.table_csv(first, ws.glossary)
        original = original_path.read_bytes()
        relative = original_path.relative_to(first).as_posix()
        first_record = {r["path"]: r for r in manifest_records(self.manifest(first))}[relative]
        self.assertEqual(first_record["sha256"], hashlib.sha256(original).hexdigest())
        flip_one_byte(original_path)  # damaged after the run, same size: only a hash can tell
        second = self.backup("--incremental")

        second_record = {r["path"]: r for r in manifest_records(self.manifest(second))}[relative]
        self.assertEqual(second_record["sha256"], first_record["sha256"])
        code = self.verify()
        if (second / relative).read_bytes() != original:  # the damaged file was carried over ...
            self.assertEqual(code, 1, self.stdout)  # ... so --verify must say so
            self.assert_stdout_names("altered", relative)
        else:
            self.assertEqual(code, 0, self.stdout)


class FallbackTest(IncrementalTestCase):
    def test_broken_or_missing_previous_manifest_means_a_full_backup(self) -> None:
        build_incremental_workspace(self.fake)
        template = self.backup()
        self.assertEqual(len(self.export_posts()), 4)

        def outside(manifest: Dict[str, Any]) -> str:
            manifest["docs"][0]["pages"][0]["files"][0]["path"] = "../../x"
            return json.dumps(manifest)

        def version_999(manifest: Dict[str, Any]) -> str:
            manifest["version"] = 999
            return json.dumps(manifest)

        def without_size(manifest: Dict[str, Any]) -> str:
            del manifest["docs"][0]["pages"][0]["files"][0]["size"]
            return json.dumps(manifest)

        def text_row_count(manifest: Dict[str, Any]) -> str:
            manifest["docs"][0]["tables"][0]["rowCount"] = "many"
            return json.dumps(manifest)

        def windows_escape(manifest: Dict[str, Any]) -> str:
            manifest["docs"][0]["pages"][0]["files"][0]["path"] = "docs\\..\\..\\x.md"
            return json.dumps(manifest)

        def page_with_a_doc_file(manifest: Dict[str, Any]) -> str:
            manifest["docs"][0]["pages"][0]["files"][0]["role"] = "doc"
            return json.dumps(manifest)

        breakers = {
            "page with a doc file": page_with_a_doc_file,
            "deleted": None,
            "truncated": lambda manifest: json.dumps(manifest)[:200],
            "array": lambda manifest: json.dumps(manifest["docs"]),
            "version 999": version_999,
            "path outside": outside,
            "file record without size": without_size,
            "rowCount not a number": text_row_count,
            "backslash path": windows_escape,
        }
        # Each damage, at the reader the reuse path calls (what it catches is what it warns about
        # and falls back on); then the whole fallback, end to end, for a missing manifest and for
        # one whose path leaves the snapshot.
        scratch = self.out.parent / "scratch"
        shutil.copytree(template, scratch)
        intact = (scratch / "manifest.json").read_text(encoding="utf-8")
        self.assertEqual(coda_backup.read_manifest(scratch)["docs"][0]["id"], self.manifest(template)["docs"][0]["id"])
        for case, breaker in breakers.items():
            with self.subTest(case=case, at="read_manifest"):
                manifest_path = scratch / "manifest.json"
                if breaker is None:
                    manifest_path.unlink()
                else:
                    manifest_path.write_text(breaker(json.loads(intact)), encoding="utf-8")
                with self.assertRaises((OSError, ValueError, KeyError, TypeError, AttributeError,
                                        coda_backup.BackupError)):
                    coda_backup.read_manifest(scratch)
        for case in ("deleted", "path outside"):
            breaker = breakers[case]
            with self.subTest(case=case, at="a run"):
                output = self.out.parent / f"broken-{case.replace(' ', '-')}"
                shutil.copytree(self.out, output, symlinks=True)
                first = output / template.name
                manifest_path = first / "manifest.json"
                if breaker is None:
                    manifest_path.unlink()
                else:
                    manifest_path.write_text(breaker(read_json(manifest_path)), encoding="utf-8")

                self.fake.clear_log()
                second = self.backup("--incremental", "--log-level", "WARNING", output=output)
                self.assertNotEqual(second, first)
                self.assertEqual(len(self.export_posts()), 4, "not a full backup")
                self.assertEqual(len(set(self.rows_gets())), 4, "not a full backup")
                self.assertIn("WARNING", self.stderr)
                self.assertIn("manifest", self.stderr.lower())
                self.assertEqual(tree_bytes(second), tree_bytes(first))
                for name in listed_files(second):
                    self.assert_not_linked(second / name, first / name)
                self.assertFalse((self.out.parent / "x").exists())
                self.assertEqual(self.summary(second)["status"], "completed")

    def test_failed_objects_are_fetched_again_and_end_ok(self) -> None:
        ws = build_incremental_workspace(self.fake)
        ws.details.export_fail_times = 10
        self.fake.add_fault(rf"/tables/{ws.plain.id}/rows$", status=403, times=None)
        first = self.backup(expect=1)
        entries = manifest_entries(self.manifest(first))
        self.assertEqual((entries[ws.details.id]["status"], entries[ws.plain.id]["status"]), ("failed", "failed"))

        ws.details.export_fail_times = 0
        self.fake.clear_faults()
        self.fake.clear_log()
        second = self.backup("--incremental")

        # Overview shows Plain, which had no good copy: the saved page cannot be trusted either.
        self.assertEqual(sorted(self.export_posts()), sorted([self.export_path(ws.details),
                                                              self.export_path(ws.overview)]))
        self.assertEqual(set(self.rows_gets()), {self.rows_path(ws.plain)})
        entries = manifest_entries(self.manifest(second))
        self.assertEqual(entries[ws.details.id]["status"], "ok")
        self.assertEqual(entries[ws.plain.id]["status"], "ok")
        self.assertEqual(entries[ws.overview.id]["reason"], "a table on it changed")
        self.assertEqual(entries[ws.scratch.id]["status"], "unchanged")
        self.assertEqual(self.page_file(second, ws.details).read_text(encoding="utf-8"), ws.details.content)
        csv_rows = read_csv(self.table_csv(second, ws.plain))
        self.assertEqual([row[6:] for row in csv_rows], [["Key", "Value"], ["a", "1"]])
        summary = self.summary(second)
        self.assertEqual((summary["status"], summary["failures"]), ("completed", []))
        self.assertEqual(self.verify(), 0, self.stdout)

    def test_changing_page_format_exports_pages_again(self) -> None:
        ws = build_incremental_workspace(self.fake)
        self.backup()
        self.fake.clear_log()
        second = self.backup("--incremental", "--page-format", "html")

        posts = self.fake.requests("POST", r"/export$")
        self.assertEqual(sorted(r.path for r in posts), sorted(self.export_path(p) for p in ws.pages))
        self.assertEqual({(r.body or {}).get("outputFormat") for r in posts}, {"html"})
        self.assertEqual(list(second.rglob("*.md")), [])
        self.assertEqual(len(list((second / "docs").rglob("*.html"))), 4)
        self.assertEqual(self.page_file(second, ws.overview, ".html").read_text(encoding="utf-8"),
                         ws.overview.render("html"))
        pages = [e for e in manifest_entries(self.manifest(second)).values() if "formats" in e]
        self.assertEqual({(e["status"], tuple(e["formats"])) for e in pages}, {("ok", ("html",))})

        self.fake.clear_log()  # the same format again: now the .html files are reused
        self.backup("--incremental", "--page-format", "html")
        self.assertEqual(self.export_posts(), [])

    def test_toggling_no_views_reevaluates_views(self) -> None:
        ws = build_incremental_workspace(self.fake)
        first = self.backup()
        view_csv = self.table_csv(first, ws.open_items).read_bytes()

        second = self.backup("--incremental", "--no-views")
        self.assert_no_file_of(second, ws.open_items.id)
        tables = [t for doc in self.manifest(second)["docs"] for t in doc["tables"]]
        self.assertEqual(sorted(t["id"] for t in tables), sorted([ws.items.id, ws.plain.id, ws.glossary.id]))
        self.assertEqual(self.summary(second)["counts"]["views"], 0)

        self.fake.clear_log()
        third = self.backup("--incremental")
        self.assertIn(self.rows_path(ws.open_items), self.rows_gets())
        self.assertEqual(self.table_csv(third, ws.open_items).read_bytes(), view_csv)
        self.assertIn(ws.open_items.id, manifest_entries(self.manifest(third)))
        self.assertEqual(self.summary(third)["counts"]["views"], 1)
        self.assertEqual(self.verify(), 0, self.stdout)

    def test_files_deleted_by_hand_are_downloaded_again(self) -> None:
        ws = build_incremental_workspace(self.fake)
        first = self.backup()
        self.page_file(first, ws.overview).unlink()
        self.table_csv(first, ws.items).unlink()
        (self.doc_dir(ws.beta, first) / "doc.json").unlink()  # Beta: only its doc.json is gone
        self.fake.clear_log()
        second = self.backup("--incremental")

        self.assertEqual(self.export_posts(), [self.export_path(ws.overview)])
        self.assertEqual(set(self.rows_gets()), {self.rows_path(ws.items)})
        self.assertEqual(self.page_file(second, ws.overview).read_text(encoding="utf-8"), ws.overview.content)
        self.assertEqual([row[6:] for row in read_csv(self.table_csv(second, ws.items))][1], ["apple", "3", "true"])
        doc_json = read_json(self.doc_dir(ws.beta, second) / "doc.json")
        self.assertEqual((doc_json["id"], doc_json["name"]), (ws.beta.id, ws.beta.name))
        self.assert_linked(self.page_file(second, ws.details), self.page_file(first, ws.details))
        self.assert_linked(self.table_csv(second, ws.glossary), self.table_csv(first, ws.glossary))
        self.assertEqual(self.verify(), 0, self.stdout)


class TablesShownOnPagesTest(IncrementalTestCase):
    """Coda's page updatedAt covers the page's own text, not the tables it shows, and a view's
    updatedAt may stay put when its base table changes: neither may leave a stale copy behind."""

    def assert_dry_run_agrees(self, first: Path, second: Path) -> None:
        """--dry-run --incremental against the first snapshot says what the real run then did."""
        output = self.out.parent / "dry"
        shutil.copytree(self.out, output, symlinks=True)
        shutil.rmtree(output / second.name)
        (output / "latest.txt").write_text(first.name + "\n", encoding="utf-8")
        (output / "latest").unlink()
        self.assertEqual(self.run_main(["--dry-run", "--incremental", "--no-extras", "--output", str(output),
                                        "--api-url", self.fake.api_url, "--rate-limits", "none"]), 0, self.stderr)
        said = {}
        for line in self.stdout.splitlines():
            match = re.search(r"\((\S+)\): (?:\S+ rows, )?(link from|export|read)\b", line)
            if match:
                said[match.group(1)] = match.group(2) == "link from"
        for doc in self.manifest(second)["docs"]:
            if doc["status"] == "unchanged":  # linked whole: the dry run lists the doc only
                self.assertIn(f"({doc['id']}): link from", self.stdout)
                continue
            for child in doc["pages"] + doc["tables"]:
                if child["status"] in ("ok", "unchanged"):
                    self.assertEqual(said.get(child["id"]), child["status"] == "unchanged", child["name"])

    def test_page_showing_a_changed_table_is_exported_again(self) -> None:
        ws = build_incremental_workspace(self.fake)
        first = self.backup()
        page_updated = ws.overview.updated_at
        ws.plain.set_cell(0, "Value", "2")  # touches the table and the doc, not the page
        self.assertEqual(ws.overview.updated_at, page_updated)
        self.fake.clear_log()
        second = self.backup("--incremental")

        self.assertEqual(self.export_posts(), [self.export_path(ws.overview)])
        self.assertEqual(set(self.rows_gets()), {self.rows_path(ws.plain)})
        self.assert_dry_run_agrees(first, second)
        entries = manifest_entries(self.manifest(second))
        self.assertEqual(entries[ws.overview.id]["status"], "ok")
        self.assertEqual(entries[ws.details.id]["status"], "unchanged")
        self.assert_linked(self.page_file(second, ws.details), self.page_file(first, ws.details))

    def test_view_is_read_again_when_only_its_base_table_changed(self) -> None:
        self.fake.views_follow_base = False
        ws = build_incremental_workspace(self.fake)
        first = self.backup()
        view_updated = ws.open_items.updated_at
        ws.items.set_cell(0, "Qty", 30)  # apple, an open item: it shows in the view
        self.assertEqual(ws.open_items.updated_at, view_updated)
        self.fake.clear_log()
        second = self.backup("--incremental")

        self.assertEqual(set(self.rows_gets()), {self.rows_path(ws.items), self.rows_path(ws.open_items)})
        self.assert_dry_run_agrees(first, second)
        view_rows = read_csv(self.table_csv(second, ws.open_items))
        qty = view_rows[0].index("Qty")
        self.assertIn("30", [row[qty] for row in view_rows[1:]])

    def test_unchanged_base_table_keeps_the_view_linked(self) -> None:
        self.fake.views_follow_base = False
        ws = build_incremental_workspace(self.fake)
        first = self.backup()
        ws.plain.set_cell(0, "Value", "2")
        self.fake.clear_log()
        second = self.backup("--incremental")

        self.assertNotIn(self.rows_path(ws.open_items), self.rows_gets())
        self.assert_linked(self.table_csv(second, ws.open_items), self.table_csv(first, ws.open_items))


class ReuseGuardTest(IncrementalTestCase):
    """What must never be linked from the previous snapshot."""

    def test_same_ids_in_two_docs_are_not_mixed_up(self) -> None:
        # A copy of a doc may keep its page and table ids; ids are unique only within a doc.
        original = self.fake.add_doc("Original")
        copy = self.fake.add_doc("Copy")
        for doc, text in ((original, "original"), (copy, "copy")):
            page = doc.add_page("Notes", page_id="canvas-same", content=f"# Notes\n\n{text}\n")
            doc.add_table("Data", columns=["Value"], rows=[{"Value": text}], parent_page=page, table_id="grid-same")
        self.backup()
        original.touch()  # both docs are looked at again, object by object
        copy.touch()
        second = self.backup("--incremental")
        for doc, text in ((original, "original"), (copy, "copy")):
            folder = self.doc_dir(doc, second)
            self.assertIn(text, self.find_one(folder, "*__canvas-same.md").read_text(encoding="utf-8"))
            self.assertEqual(read_csv(self.find_one(folder, "*__grid-same.csv"))[1][6:], [text])

    def test_asking_for_rows_json_later_writes_it_for_unchanged_tables(self) -> None:
        ws = build_incremental_workspace(self.fake)
        self.backup()
        ws.alpha.touch()  # doc changed, tables not: table-level reuse must still add the NDJSON
        self.fake.clear_log()
        second = self.backup("--incremental", "--rows-json")
        self.assertEqual(len(set(self.rows_gets())), 4, "every table is read again for its NDJSON")
        ndjson = sorted(path.name for path in second.rglob("*.rows.ndjson"))
        self.assertEqual(len(ndjson), 4, ndjson)
        third = self.backup("--incremental", "--rows-json")
        self.assertEqual(len(list(third.rglob("*.rows.ndjson"))), 4)
        self.assertEqual(self.verify(), 0, self.stdout)

    def test_failed_extras_are_fetched_again(self) -> None:
        ws = build_incremental_workspace(self.fake)
        ws.alpha.add_formula("Total", 42)
        self.fake.add_fault(r"/formulas$", status=500, times=None)
        first = self.backup("--max-retries", "0", expect=1, extras=True)
        self.assertEqual(list(first.rglob("formulas.json")), list(self.doc_dir(ws.beta, first).glob("formulas.json")))
        self.fake.clear_faults()
        second = self.backup("--incremental", extras=True)
        formulas = read_json(self.doc_dir(ws.alpha, second) / "formulas.json")
        self.assertEqual([item["value"] for item in formulas], [42])
        self.assertEqual(self.summary(second)["status"], "completed")

    def test_renamed_table_gets_a_fresh_table_json(self) -> None:
        ws = build_incremental_workspace(self.fake)
        self.backup()
        ws.plain.name = "Plain Renamed"  # a rename that leaves updatedAt alone
        ws.alpha.touch()
        self.fake.clear_log()
        second = self.backup("--incremental")
        table_json = read_json(self.find_one(second / "docs", f"*__{ws.plain.id}.table.json"))
        self.assertEqual(table_json["name"], "Plain Renamed")
        self.assertNotIn(self.rows_path(ws.plain), self.rows_gets())

    def test_a_page_whose_manifest_lists_no_file_is_exported_again(self) -> None:
        ws = build_incremental_workspace(self.fake)
        first = self.backup()
        manifest = self.manifest(first)
        page = next(p for d in manifest["docs"] for p in d["pages"] if p["id"] == ws.details.id)
        page["files"] = []
        (first / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        ws.alpha.touch()
        self.fake.clear_log()
        second = self.backup("--incremental")
        self.assertEqual(self.export_posts(), [self.export_path(ws.details)])
        self.assertEqual(self.page_file(second, ws.details).read_text(encoding="utf-8"), ws.details.content)
