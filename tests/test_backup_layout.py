"""End-to-end: what one run writes, checked against the fake's dataset and request log.

Each test runs the real CLI (`coda_backup.main`) over HTTP against a fresh fake. Expected
values come from the fake's dataset objects (Doc, Page, Table, Row, Column) or from the fake's
own API answers, never from coda_backup's helpers, so a bug shared by writer and reader cannot
hide. The tests of the whole sample workspace share one default run (SharedRunTestCase) and each
checks one area (pages, names, tables, metadata, defaults, requests), labelled by subTest.
Page formats are in test_optional_outputs, failed objects in test_resilience, hostile names and ids
in test_safety.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import unittest
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Set, Tuple

import coda_backup
from fake_coda import Doc, Page, Table, build_sample_workspace, display_text, iso_time
from support import TOKEN, BackupTestCase, SharedRunTestCase, SmallWorkspaceTestCase, files_under, read_csv, read_json

META = ["_row_id", "_row_name", "_row_index", "_created_at", "_updated_at", "_browser_link"]
SNAPSHOT_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{6}Z)(-\d+)?$")


# --- helpers -------------------------------------------------------------------------------

def expected_cell(value: Any) -> str:
    """The contract's CSV encoding, written out independently of coda_backup.csv_cell."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def expected_values(table: Table) -> List[List[str]]:
    """The non-meta CSV cells of every row, from the fake's Row objects, in column order."""
    return [[expected_cell(row.values.get(column.id)) for column in table.columns] for row in table.rows]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class LayoutTestCase(BackupTestCase):
    """BackupTestCase plus readers for one snapshot and direct calls to the fake's API."""

    def page_file(self, doc: Doc, page: Page, suffix: str = ".md") -> Path:
        return self.find_one(self.doc_dir(doc), f"*__{page.id}{suffix}")

    def table_csv(self, doc: Doc, table: Table) -> Path:
        return self.find_one(self.doc_dir(doc), f"*__{table.id}.csv")

    def assert_no_file_for(self, object_id: str) -> None:
        found = list(self.out.rglob(f"*{object_id}*"))
        self.assertEqual(found, [], f"files for {object_id}")

    def posts_for(self, page: Page) -> List[Any]:
        return self.fake.requests("POST", rf"/pages/{re.escape(page.id)}/export$")

    def manifest_entries(self, kind: str) -> Dict[str, Dict[str, Any]]:
        """Manifest page or table entries of every doc, by object id."""
        return {entry["id"]: entry for doc in self.manifest()["docs"] for entry in doc[kind]}

    def assert_csv_matches_table(self, path: Path, table: Table, header: List[str]) -> None:
        """Header, meta columns and every cell of a table's CSV against the fake's rows."""
        rows = read_csv(path)
        self.assertEqual(rows[0], META + header, f"header of {path.name}")
        body = rows[1:]
        self.assertEqual([row[6:] for row in body], expected_values(table), f"cells of {path.name}")
        self.assertEqual(
            [row[:5] for row in body],
            [[row.id, row.name if row.name is not None else display_text(row.values.get(table.columns[0].id)),
              str(index), iso_time(row.created), iso_time(row.updated)]
             for index, row in enumerate(table.rows)],
            f"meta columns of {path.name}",
        )


# --- the whole sample workspace, default flags ------------------------------------------------

class SampleWorkspaceTest(SharedRunTestCase, LayoutTestCase):
    """One default run over fake_coda.build_sample_workspace for the whole class."""

    doc: ClassVar[Doc]
    before: ClassVar[dt.datetime]
    after: ClassVar[dt.datetime]
    requests_logged: ClassVar[int]

    @classmethod
    def build(cls, fake: Any) -> Dict[str, Any]:
        return build_sample_workspace(fake)

    @classmethod
    def setUpClass(cls) -> None:
        cls.before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        super().setUpClass()
        cls.after = dt.datetime.now(dt.timezone.utc)
        cls.doc = cls.data["doc"]
        cls.requests_logged = len(cls.shared_fake.requests(host=None))

    def backed_up_docs(self) -> List[Doc]:
        """The docs a default run saves: owned ones (the shared doc is left out)."""
        return [self.doc, self.data["doc2"], self.data["other_ws_doc"]]

    def all_tables(self) -> List[Table]:
        return [table for doc in self.backed_up_docs() for table in doc.tables]

    def test_pages_nested_hidden_duplicate_and_sync(self) -> None:
        self.assertEqual(self.code, 0, self.stderr)
        pages = self.doc_dir(self.doc) / "pages"
        a, b, c = self.data["page_a"], self.data["page_b"], self.data["page_c"]
        with self.subTest("nested three deep, each child in its parent's folder"):
            self.assertTrue((pages / f"Launch Status__{a.id}.md").is_file())
            self.assertTrue((pages / f"Launch Status__{a.id}" / f"Milestones__{b.id}.md").is_file())
            self.assertTrue(
                (pages / f"Launch Status__{a.id}" / f"Milestones__{b.id}" / f"Week 1__{c.id}.md").is_file())
        with self.subTest("hidden page and its child are kept without --skip-hidden-pages"):
            roadmap, hidden, child = self.data["roadmap"], self.data["hidden_page"], self.data["hidden_child"]
            folder = pages / f"Roadmap__{roadmap.id}"
            self.assertTrue((folder / f"Internal Notes__{hidden.id}.md").is_file())
            self.assertTrue((folder / f"Internal Notes__{hidden.id}" / f"Draft Ideas__{child.id}.md").is_file())
        with self.subTest("duplicate names get one file each, with their own content"):
            first, second = self.data["dup_pages"]
            self.assertEqual((pages / f"Meeting Notes__{first.id}.md").read_text(encoding="utf-8"), first.content)
            self.assertEqual((pages / f"Meeting Notes__{second.id}.md").read_text(encoding="utf-8"), second.content)
        sync = self.data["sync_page"]
        canvas = [page for page in self.doc.pages if page is not sync]
        with self.subTest("every canvas page's Markdown equals its content, exported once"):
            for page in canvas:
                self.assertEqual(self.page_file(self.doc, page).read_bytes(), page.content.encode("utf-8"), page)
                self.assertEqual(len(self.posts_for(page)), 1, page)
        with self.subTest("a sync page is not exported and is skipped, not failed"):
            self.assertEqual(self.posts_for(sync), [])
            self.assert_no_file_for(sync.id)
            self.assertEqual(self.manifest_entries("pages")[sync.id]["status"], "skipped")
            self.assertEqual(self.summary()["failures"], [])

    def test_objects_with_hostile_names_keep_their_content(self) -> None:
        """Where such names may go (inside --output, portable) is test_safety.HostileNamesTest."""
        self.assertEqual(self.code, 0, self.stderr)
        for name, page in self.data["hostile_pages"].items():
            with self.subTest(page=name[:20]):
                self.assertEqual(self.page_file(self.doc, page).read_text(encoding="utf-8"), page.content)
        for table in self.data["hostile_tables"]:
            with self.subTest(table=table.name):
                self.assert_csv_matches_table(self.table_csv(self.doc, table), table, ["Name"])
        with self.subTest("doc with hostile characters in its name"):
            doc2 = self.data["doc2"]
            self.assertEqual(self.page_file(doc2, self.data["doc2_page"]).read_text(encoding="utf-8"),
                             self.data["doc2_page"].content)

    def test_tables_and_views_as_csv(self) -> None:
        self.assertEqual(self.code, 0, self.stderr)
        doc_dir = self.doc_dir(self.doc)
        tasks, view = self.data["tasks"], self.data["view"]
        page_a, page_b = self.data["page_a"], self.data["page_b"]
        tasks_header = ["Task", "Status", "Status__2", "Tags", "Meta", "Points", "Estimate", "Done", "Notes"]
        with self.subTest("tables/table and tables/view, each with .columns.json and .table.json"):
            for folder, stem in (("table", f"{page_a.name}__Tasks__{tasks.id}"),
                                 ("view", f"{page_b.name}__Open Tasks__{view.id}")):
                for suffix in (".csv", ".columns.json", ".table.json"):
                    self.assertTrue((doc_dir / "tables" / folder / (stem + suffix)).is_file(), stem + suffix)
        with self.subTest("Tasks: every cell and meta column from the fake's rows"):
            self.assert_csv_matches_table(self.table_csv(self.doc, tasks), tasks, tasks_header)
        with self.subTest("Tasks: contract encodings, literally"):
            rows = read_csv(self.table_csv(self.doc, tasks))
            header = rows[0]
            cell = {name: [row[header.index(name)] for row in rows[1:]] for name in tasks_header}
            self.assertEqual(cell["Tags"][0], '["planning","docs"]')
            self.assertEqual(cell["Tags"][2], "[]")
            self.assertEqual(cell["Meta"][0], '{"@type":"StructuredValue","owner":"Ana"}')
            self.assertEqual(cell["Meta"][1], '{"nested":{"level":2,"items":[1,2]}}')
            self.assertEqual(cell["Meta"][2], "")
            self.assertEqual(cell["Notes"][2], "")
            self.assertEqual(cell["Notes"][1], "Line one\nLine two")
            self.assertEqual(cell["Done"][:2], ["true", "false"])
            self.assertEqual(cell["Points"][3], "-3")
            self.assertEqual(cell["Estimate"][0], "2.5")
            self.assertEqual(cell["Status"][0], "Done")
            self.assertEqual(cell["Status__2"][0], "Green")
        with self.subTest("rows requested with valueFormat=simpleWithArrays, without useColumnNames"):
            rows_requests = self.fake.requests("GET", r"/tables/[^/]+/rows$")
            self.assertEqual({r.path.split("/")[4] for r in rows_requests}, {t.id for t in self.all_tables()})
            for record in rows_requests:
                self.assertNotIn("useColumnNames", record.query)
                if "pageToken" not in record.query:
                    self.assertEqual(record.query.get("valueFormat"), "simpleWithArrays")
        with self.subTest("meta columns equal the API's row id/name/index/createdAt/updatedAt/browserLink"):
            for table in (tasks, view):
                api_rows = self.api_items(f"/docs/{self.doc.id}/tables/{table.id}/rows",
                                          valueFormat="simpleWithArrays")
                self.assertEqual(
                    [row[:6] for row in read_csv(self.table_csv(self.doc, table))[1:]],
                    [[item["id"], item["name"], str(item["index"]), item["createdAt"], item["updatedAt"],
                      item["browserLink"]] for item in api_rows], table)
        with self.subTest("the view holds the view's rows"):
            self.assertEqual(len(view.rows), 3)
            self.assert_csv_matches_table(self.table_csv(self.doc, view), view, tasks_header)
        with self.subTest("empty table: header only"):
            self.assertEqual(read_csv(self.table_csv(self.doc, self.data["empty_table"])), [META + ["Name", "Value"]])
        with self.subTest("wide table: 60 columns"):
            wide = self.data["wide_table"]
            self.assert_csv_matches_table(self.table_csv(self.doc, wide), wide, [f"Col {i:02d}" for i in range(60)])
        with self.subTest("big table: 120 rows in order"):
            big = self.data["big_table"]
            self.assert_csv_matches_table(self.table_csv(self.doc, big), big, ["Name", "Number"])
        with self.subTest(".columns.json lists the columns in API order"):
            columns = read_json(self.find_one(doc_dir, f"*__{tasks.id}.columns.json"))
            self.assertEqual([(c["id"], c["name"]) for c in columns], [(c.id, c.name) for c in tasks.columns])
            table_json = read_json(self.find_one(doc_dir, f"*__{view.id}.table.json"))
            self.assertEqual((table_json["id"], table_json["rowCount"]), (view.id, 3))

    def test_doc_metadata_manifest_and_summary(self) -> None:
        self.assertEqual(self.code, 0, self.stderr)
        snapshot = self.latest()
        backed_up = self.backed_up_docs()
        with self.subTest("doc.json, pages.json and tables.json hold what the API lists"):
            for doc in backed_up:
                folder = self.doc_dir(doc)
                self.assertEqual(read_json(folder / "doc.json"), self.api_get(f"/docs/{doc.id}"))
                pages = read_json(folder / "pages.json")
                self.assertEqual({p["id"] for p in pages}, {p.id for p in doc.pages})
                self.assertEqual(pages, self.api_items(f"/docs/{doc.id}/pages"))
                tables = read_json(folder / "tables.json")
                self.assertEqual({t["id"] for t in tables}, {t.id for t in doc.tables})
                self.assertEqual(tables, self.api_items(f"/docs/{doc.id}/tables"))
        manifest = self.manifest()
        with self.subTest("manifest: every doc with id, name, updatedAt, path, status"):
            self.assertEqual([(d["id"], d["name"], d["updatedAt"], d["status"]) for d in manifest["docs"]],
                             [(d.id, d.name, d.updated_at, "ok") for d in backed_up])
            for entry in manifest["docs"]:
                self.assertTrue((snapshot / entry["path"]).is_dir(), entry["path"])
        pages = self.manifest_entries("pages")
        tables = self.manifest_entries("tables")
        with self.subTest("manifest: every page with id, name, updatedAt, path, status"):
            all_pages = [p for doc in backed_up for p in doc.pages]
            self.assertEqual(set(pages), {p.id for p in all_pages})
            for page in all_pages:
                entry = pages[page.id]
                status = "skipped" if page is self.data["sync_page"] else "ok"
                self.assertEqual((entry["name"], entry["updatedAt"], entry["status"]),
                                 (page.name, page.updated_at, status), page)
                if status == "ok":
                    self.assertEqual((snapshot / entry["path"]).read_text(encoding="utf-8"), page.content, page)
                    self.assertIn(entry["path"], {record["path"] for record in entry["files"]}, page)
        with self.subTest("manifest: every table and view with id, name, updatedAt, path, status, rowCount"):
            all_tables = self.all_tables()
            self.assertEqual(set(tables), {t.id for t in all_tables})
            for table in all_tables:
                entry = tables[table.id]
                self.assertEqual(
                    (entry["name"], entry["updatedAt"], entry["status"], entry["rowCount"]),
                    (table.name, table.updated_at, "ok", len(table.rows)), table)
                self.assertEqual(len(read_csv(snapshot / entry["path"])), len(table.rows) + 1, table)
                self.assertIn(entry["path"], {record["path"] for record in entry["files"]}, table)
        with self.subTest("manifest: where each object sits and its link, as the API lists them"):
            for doc in backed_up:
                api_doc = self.api_get(f"/docs/{doc.id}")
                entry = next(d for d in manifest["docs"] if d["id"] == doc.id)
                self.assertEqual(entry["browserLink"], api_doc["browserLink"])
                api_pages = {item["id"]: item for item in self.api_items(f"/docs/{doc.id}/pages")}
                for page in doc.pages:
                    self.assertEqual((pages[page.id]["parentId"], pages[page.id]["browserLink"]),
                                     (page.parent.id if page.parent else None, api_pages[page.id]["browserLink"]))
                api_tables = {item["id"]: item for item in self.api_items(f"/docs/{doc.id}/tables")}
                for table in doc.tables:
                    self.assertEqual(
                        (tables[table.id]["parentPageId"], tables[table.id]["tableType"],
                         tables[table.id]["browserLink"]),
                        (table.parent_page.id if table.parent_page else None, table.table_type,
                         api_tables[table.id]["browserLink"]), table)
            self.assertEqual(pages[self.data["page_c"].id]["parentId"], self.data["page_b"].id)
        with self.subTest("manifest: files carry the sha256 of the file on disk, and list every file once"):
            records = [record for doc in manifest["docs"]
                       for entry in [doc] + doc["pages"] + doc["tables"] for record in entry["files"]]
            records += manifest["index"]
            for record in records:
                self.assertEqual(sha256_of(snapshot / record["path"]), record["sha256"], record["path"])
            paths = [r["path"] for r in records]
            self.assertEqual(len(paths), len(set(paths)), "a file listed twice")
            self.assertEqual(set(paths), set(files_under(snapshot)) - {"summary.json", "manifest.json"})
        summary = self.summary()
        with self.subTest("summary: status, times, counts, failures"):
            self.assertEqual(summary["status"], "completed")
            self.assertEqual(summary["failures"], [])
            started = dt.datetime.strptime(summary["started_at"], "%Y-%m-%dT%H:%M:%SZ")
            finished = dt.datetime.strptime(summary["finished_at"], "%Y-%m-%dT%H:%M:%SZ")
            self.assertLessEqual(started, finished)
            self.assertGreaterEqual(summary["duration_s"], 0)
            counts = summary["counts"]
            self.assertEqual(counts["docs"], 3)
            self.assertEqual(counts["pages"], len(pages) - 1, "every page but the sync page")
            self.assertEqual(counts["tables"], sum(1 for t in self.all_tables() if not t.is_view))
            self.assertEqual(counts["views"], 1)
            self.assertEqual(counts["rows"], sum(len(t.rows) for t in self.all_tables()))
            self.assertEqual(counts["failures"], 0)
            self.assertIn("skipped_unchanged", counts)
        with self.subTest("summary: requests.total counts every request the fake saw"):
            self.assertEqual(summary["requests"]["total"], self.requests_logged)
            self.assertEqual((summary["requests"]["retries"], summary["requests"]["rate_limited"]), (0, 0))

    def test_defaults(self) -> None:
        """No optional flag: Markdown pages only, doc extras saved, no NDJSON, no zip."""
        self.assertEqual(self.code, 0, self.stderr)
        snapshot = self.latest()
        canvas = [page for doc in self.backed_up_docs() for page in doc.pages if page.content_type == "canvas"]
        posted = [record.body.get("outputFormat") for record in self.fake.requests("POST", r"/export$")]
        self.assertEqual(posted, ["markdown"] * len(canvas))
        for page in canvas:
            self.assertEqual(list((snapshot / "docs").rglob(f"*__{page.id}.html")), [], page)
        self.assertEqual(list(snapshot.rglob("*.ndjson")), [], "NDJSON only with --rows-json")
        self.assertEqual(list(self.out.glob("*.zip")), [], "a zip only with --zip")
        formulas = read_json(self.doc_dir(self.doc) / "formulas.json")
        formulas = formulas["items"] if isinstance(formulas, dict) else formulas
        self.assertEqual([(item["name"], item["value"]) for item in formulas], [("Total Points", 29)])
        self.assertTrue((self.doc_dir(self.doc) / "permissions.json").is_file())

    def test_requests_token_and_latest(self) -> None:
        self.assertEqual(self.code, 0, self.stderr)
        api = self.fake.requests(host="api")
        downloads = self.fake.requests(host="download")
        with self.subTest("Authorization on every API request"):
            self.assertTrue(api)
            for record in api:
                self.assertEqual(record.headers.get("authorization"), f"Bearer {TOKEN}", record.path)
        with self.subTest("no Authorization (and no token) on any download-host request"):
            canvas = [p for d in self.backed_up_docs() for p in d.pages if p.content_type == "canvas"]
            self.assertEqual(len(downloads), len(canvas))
            for record in downloads:
                self.assertNotIn("authorization", record.headers)
                self.assertNotIn(TOKEN, json.dumps(record.headers) + record.target)
        with self.subTest("the shared doc is not touched by default"):
            self.assertEqual(self.fake.requests(path=rf"^/docs/{self.data['shared_doc'].id}"), [])
        with self.subTest("one snapshot named by its UTC start time; latest and latest.txt name it"):
            snapshots = self.snapshots()
            self.assertEqual(len(snapshots), 1)
            name = snapshots[0].name
            match = SNAPSHOT_NAME.match(name)
            self.assertIsNotNone(match, name)
            assert match is not None
            when = dt.datetime.strptime(match.group(1), "%Y-%m-%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
            self.assertTrue(self.before <= when <= self.after, f"{when} not in [{self.before}, {self.after}]")
            self.assertEqual((self.out / "latest.txt").read_text(encoding="utf-8").strip(), name)
            if os.name == "posix":
                self.assertTrue((self.out / "latest").is_symlink())
                self.assertEqual(Path(os.readlink(self.out / "latest")).name, name)
                self.assertTrue((self.out / "latest" / "summary.json").is_file())


# --- flags that choose what is backed up --------------------------------------------------

class HiddenPagesTest(LayoutTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.doc = self.fake.add_doc("Handbook")
        self.roadmap = self.doc.add_page("Roadmap")
        self.hidden = self.doc.add_page("Internal Notes", parent=self.roadmap, hidden=True)
        self.child = self.doc.add_page("Draft Ideas", parent=self.hidden)  # not hidden itself
        self.visible = self.doc.add_page("Visible")

    def test_skip_hidden_pages_leaves_out_the_hidden_page_and_its_child(self) -> None:
        self.assertEqual(self.run_backup("--skip-hidden-pages"), 0, self.stderr)
        for page in (self.hidden, self.child):
            with self.subTest(page=page.name):
                self.assert_no_file_for(page.id)
                self.assertEqual(self.posts_for(page), [])
        for page in (self.roadmap, self.visible):
            with self.subTest(page=page.name):
                self.assertEqual(self.page_file(self.doc, page).read_text(encoding="utf-8"), page.content)
        self.assertEqual(self.summary()["failures"], [])



class ViewsTest(LayoutTestCase):
    def test_no_views_leaves_views_out_but_tables_json_lists_them(self) -> None:
        doc = self.fake.add_doc("Tracker")
        page = doc.add_page("Board")
        tasks = doc.add_table("Tasks", columns=["Task", {"name": "Done", "type": "checkbox"}], parent_page=page,
                              rows=[{"Task": "one", "Done": True}, {"Task": "two", "Done": False}])
        done = tasks.column("Done").id
        view = doc.add_view(tasks, "Open", row_filter=lambda values: values.get(done) is False)
        self.assertEqual(self.run_backup("--no-views"), 0, self.stderr)
        self.assert_no_file_for(view.id)
        self.assertFalse(any((self.doc_dir(doc) / "tables" / "view").glob("*")))
        self.assertEqual(self.fake.requests(path=rf"/tables/{view.id}(/|$)"), [])
        self.assert_csv_matches_table(self.table_csv(doc, tasks), tasks, ["Task", "Done"])
        listed = read_json(self.doc_dir(doc) / "tables.json")
        self.assertEqual({(t["id"], t["tableType"]) for t in listed}, {(tasks.id, "table"), (view.id, "view")})
        self.assertEqual(self.summary()["counts"]["views"], 0)


class PaginationTest(LayoutTestCase):
    def test_rows_over_many_pages_arrive_complete_and_in_order(self) -> None:
        doc = self.fake.add_doc("Inventory")
        page = doc.add_page("Stock")
        big = doc.add_table("Big Table", columns=["Name", {"name": "Number", "type": "number"}], parent_page=page)
        for i in range(120):
            big.add_row({"Name": f"Item {i:03d}", "Number": i})
        self.fake.max_limit = 7
        self.assertEqual(self.run_backup(), 0, self.stderr)
        rows = read_csv(self.table_csv(doc, big))
        self.assertEqual([row[6:] for row in rows[1:]], [[f"Item {i:03d}", str(i)] for i in range(120)])
        self.assertEqual([row[2] for row in rows[1:]], [str(i) for i in range(120)])
        self.assert_csv_matches_table(self.table_csv(doc, big), big, ["Name", "Number"])
        requests = self.fake.requests("GET", rf"/tables/{big.id}/rows$")
        self.assertEqual(len(requests), math.ceil(120 / 7))
        self.assertNotIn("pageToken", requests[0].query)
        self.assertEqual(requests[0].query.get("valueFormat"), "simpleWithArrays")
        tokens = [r.query.get("pageToken") for r in requests[1:]]
        self.assertTrue(all(tokens), "every later rows request carries a pageToken")
        self.assertEqual(len(set(tokens)), len(tokens))
        self.assertEqual(self.manifest_entries("tables")[big.id]["rowCount"], 120)


class DocSelectionTest(LayoutTestCase):
    """Which docs are listed and saved: owned by default, --include-shared, --workspace-id."""

    def setUp(self) -> None:
        super().setUp()
        self.mine = self.fake.add_doc("My Notes", owned=True, workspace_id="ws-1")
        self.mine.add_page("Today")
        self.theirs = self.fake.add_doc("Partner Plan", owned=False, workspace_id="ws-1")
        self.partners = self.theirs.add_table(
            "Partners", columns=["Partner", "Tier"], parent_page=self.theirs.add_page("Overview"),
            rows=[{"Partner": "Globex", "Tier": "Gold"}])
        self.elsewhere = self.fake.add_doc("Other Workspace Doc", owned=True, workspace_id="ws-2")
        self.welcome = self.elsewhere.add_page("Welcome")

    def saved_doc_ids(self) -> Set[str]:
        return {path.name.rsplit("__", 1)[1] for path in (self.latest() / "docs").iterdir()}

    def first_listing_query(self) -> Dict[str, str]:
        listings = self.fake.requests("GET", r"^/docs$")
        self.assertTrue(listings, "GET /docs was never called")
        return listings[0].query

    def test_owned_docs_only_by_default(self) -> None:
        self.assertEqual(self.run_backup(), 0, self.stderr)
        self.assertEqual(self.first_listing_query().get("isOwner"), "true")
        self.assertEqual(self.saved_doc_ids(), {self.mine.id, self.elsewhere.id})
        self.assertEqual(self.fake.requests(path=rf"^/docs/{self.theirs.id}"), [])

    def test_include_shared_drops_is_owner_and_saves_the_shared_doc(self) -> None:
        self.assertEqual(self.run_backup("--include-shared"), 0, self.stderr)
        self.assertNotIn("isOwner", self.first_listing_query())
        self.assertEqual(self.saved_doc_ids(), {self.mine.id, self.theirs.id, self.elsewhere.id})
        self.assert_csv_matches_table(self.table_csv(self.theirs, self.partners), self.partners, ["Partner", "Tier"])

    def test_workspace_id_is_sent_and_limits_the_docs(self) -> None:
        self.assertEqual(self.run_backup("--workspace-id", "ws-2"), 0, self.stderr)
        query = self.first_listing_query()
        self.assertEqual((query.get("workspaceId"), query.get("isOwner")), ("ws-2", "true"))
        self.assertEqual(self.saved_doc_ids(), {self.elsewhere.id})
        self.assertEqual(self.page_file(self.elsewhere, self.welcome).read_text(encoding="utf-8"),
                         self.welcome.content)


# --- --doc / --exclude-doc / --exclude-table ------------------------------------------------------


class FilterTest(SmallWorkspaceTestCase):
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


# --- snapshots over several runs ---------------------------------------------------------------

class SecondRunTest(LayoutTestCase):
    def test_second_run_makes_a_second_snapshot_and_moves_latest(self) -> None:
        doc = self.fake.add_doc("Journal")
        page = doc.add_page("Entry", content="# Entry\n\nfirst\n")
        self.assertEqual(self.run_backup(), 0, self.stderr)
        first = self.latest()
        page.content = "# Entry\n\nsecond\n"
        page.touch()
        self.assertEqual(self.run_backup(), 0, self.stderr)
        second = self.latest()
        self.assertNotEqual(first, second)
        self.assertEqual(self.snapshots(), sorted([first, second]))
        self.assertEqual((self.out / "latest.txt").read_text(encoding="utf-8").strip(), second.name)
        if os.name == "posix":
            self.assertEqual(Path(os.readlink(self.out / "latest")).name, second.name)
        self.assertEqual(self.page_file(doc, page).read_text(encoding="utf-8"), "# Entry\n\nsecond\n")
        old = self.find_one(first, f"*__{page.id}.md")
        self.assertEqual(old.read_text(encoding="utf-8"), "# Entry\n\nfirst\n", "the first snapshot is untouched")
        for snapshot in (first, second):
            self.assertEqual(self.summary(snapshot)["status"], "completed")


if __name__ == "__main__":
    unittest.main()
