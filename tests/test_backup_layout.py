"""End-to-end: what one run writes, checked against the fake's dataset and request log.

Each test runs the real CLI (`coda_backup.main`) over HTTP against a fresh fake. Expected
values come from the fake's dataset objects (Doc, Page, Table, Row, Column) or from the fake's
own API answers, never from coda_backup's helpers, so a bug shared by writer and reader cannot
hide. Runs of the whole sample workspace cost most of this module's time, so each such test
checks one area (pages, names, tables, metadata, requests) thoroughly, labelled by subTest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import unittest
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

from fake_coda import Doc, Page, Table, build_sample_workspace, display_text, iso_time
from support import TOKEN, BackupTestCase, read_csv, read_json

META = ["_row_id", "_row_name", "_row_index", "_created_at", "_updated_at", "_browser_link"]
SNAPSHOT_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{6}Z)(-\d+)?$")
FORBIDDEN = set('<>:"/\\|?*')
DEVICE_NAMES = {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(1, 10)} | {f"LPT{i}" for i in range(1, 10)}
MAX_COMPONENT = 120


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


def files_under(root: Path) -> Set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def portability_problem(component: str) -> Optional[str]:
    """Why a path component is unsafe on Windows/macOS/Linux (the contract's list), or None."""
    if component in ("", ".", ".."):
        return "empty, '.' or '..'"
    if FORBIDDEN & set(component) or any(ord(ch) < 32 for ch in component):
        return "forbidden or control character"
    if component.endswith((".", " ")):
        return "trailing dot or space"
    if component.split(".")[0].rstrip(" ").upper() in DEVICE_NAMES:
        return "reserved device name"
    if len(component) > MAX_COMPONENT:
        return f"longer than {MAX_COMPONENT} characters"
    return None


class LayoutTestCase(BackupTestCase):
    """BackupTestCase plus readers for one snapshot and direct calls to the fake's API."""

    def api_get(self, path: str, **params: str) -> Any:
        """GET the fake's API directly (as the truth to compare with); adds to the request log."""
        url = self.fake.api_url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read().decode("utf-8"))

    def api_items(self, path: str, **params: str) -> List[Dict[str, Any]]:
        items: List[Dict[str, Any]] = []
        answer = self.api_get(path, limit="200", **params)
        items.extend(answer["items"])
        while answer.get("nextPageToken"):
            answer = self.api_get(path, pageToken=answer["nextPageToken"])
            items.extend(answer["items"])
        return items

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

class SampleWorkspaceTest(LayoutTestCase):
    """One default run over fake_coda.build_sample_workspace per test."""

    def setUp(self) -> None:
        super().setUp()
        self.data = build_sample_workspace(self.fake)
        self.doc: Doc = self.data["doc"]
        self.before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        self.code = self.run_backup()
        self.after = dt.datetime.now(dt.timezone.utc)
        self.requests_logged = len(self.fake.requests(host=None))  # before api_get adds its own

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

    def test_hostile_names_are_portable_and_stay_inside_output(self) -> None:
        self.assertEqual(self.code, 0, self.stderr)
        self.assertEqual(list(self.out.parent.iterdir()), [self.out], "something was written beside --output")
        root = self.out.resolve()
        for path in self.out.rglob("*"):
            relative = path.relative_to(self.out)
            with self.subTest(path=str(relative)):
                if path.is_symlink():  # only `latest`, pointing at a snapshot in DIR
                    self.assertEqual(relative.as_posix(), "latest")
                self.assertTrue(path.resolve().is_relative_to(root), path.resolve())
                for component in relative.parts:
                    self.assertIsNone(portability_problem(component), repr(component))
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
        with self.subTest("manifest: every table and view with id, name, updatedAt, path, status, rowCount"):
            all_tables = self.all_tables()
            self.assertEqual(set(tables), {t.id for t in all_tables})
            for table in all_tables:
                entry = tables[table.id]
                self.assertEqual(
                    (entry["name"], entry["updatedAt"], entry["status"], entry["rowCount"]),
                    (table.name, table.updated_at, "ok", len(table.rows)), table)
                self.assertEqual(len(read_csv(snapshot / entry["path"])), len(table.rows) + 1, table)
        with self.subTest("manifest: files carry the sha256 of the file on disk, and list every file"):
            records = [record for doc in manifest["docs"]
                       for entry in [doc] + doc["pages"] + doc["tables"] for record in entry["files"]]
            records += manifest["index"]
            for record in records:
                self.assertEqual(sha256_of(snapshot / record["path"]), record["sha256"], record["path"])
            self.assertEqual({r["path"] for r in records},
                             files_under(snapshot) - {"summary.json", "manifest.json"})
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

    def test_without_the_flag_the_hidden_page_and_its_child_are_saved(self) -> None:
        self.assertEqual(self.run_backup(), 0, self.stderr)
        folder = self.doc_dir(self.doc) / "pages" / f"Roadmap__{self.roadmap.id}"
        self.assertEqual((folder / f"Internal Notes__{self.hidden.id}.md").read_text(encoding="utf-8"),
                         self.hidden.content)
        self.assertEqual(
            (folder / f"Internal Notes__{self.hidden.id}" / f"Draft Ideas__{self.child.id}.md")
            .read_text(encoding="utf-8"), self.child.content)


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


# --- page formats ---------------------------------------------------------------------------

class PageFormatTest(LayoutTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.doc = self.fake.add_doc("Guide")
        self.rendered = self.doc.add_page("Intro", content="# Intro\n\nHello *world*.\n\n- one\n- two\n")
        self.custom = self.doc.add_page("Custom", html="<!DOCTYPE html><p>exported by Coda</p>\n")
        self.pages = [self.rendered, self.custom]

    def formats_posted(self) -> List[str]:
        return sorted(r.body["outputFormat"] for r in self.fake.requests("POST", r"/export$"))

    def test_html_writes_the_html_export(self) -> None:
        self.assertEqual(self.run_backup("--page-format", "html"), 0, self.stderr)
        for page in self.pages:
            with self.subTest(page=page.name):
                self.assertEqual(self.page_file(self.doc, page, ".html").read_text(encoding="utf-8"),
                                 page.render("html"))
                self.assertEqual(list(self.doc_dir(self.doc).rglob(f"*__{page.id}.md")), [])
        self.assertEqual(self.formats_posted(), ["html", "html"])

    def test_both_writes_markdown_and_html(self) -> None:
        self.assertEqual(self.run_backup("--page-format", "both"), 0, self.stderr)
        pages = self.manifest_entries("pages")
        for page in self.pages:
            with self.subTest(page=page.name):
                markdown = self.page_file(self.doc, page, ".md")
                html = self.page_file(self.doc, page, ".html")
                self.assertEqual(markdown.read_text(encoding="utf-8"), page.content)
                self.assertEqual(html.read_text(encoding="utf-8"), page.render("html"))
                listed = {Path(record["path"]).name for record in pages[page.id]["files"]}
                self.assertEqual(listed, {markdown.name, html.name})
        self.assertEqual(self.formats_posted(), ["html", "html", "markdown", "markdown"])


# --- failures are recorded, the rest is saved --------------------------------------------------

class FailureTest(LayoutTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.doc = self.fake.add_doc("Ops")
        self.pages = [self.doc.add_page(name) for name in ("Runbook", "On-call", "Postmortems")]
        self.tables = [
            self.doc.add_table(name, columns=["Name", "Owner"], parent_page=self.pages[0],
                               rows=[{"Name": f"{name} {i}", "Owner": "ana"} for i in range(3)])
            for name in ("Services", "Alerts", "Dashboards")
        ]

    def assert_saved(self, pages: List[Page], tables: List[Table]) -> None:
        for page in pages:
            self.assertEqual(self.page_file(self.doc, page).read_text(encoding="utf-8"), page.content, page)
        for table in tables:
            self.assert_csv_matches_table(self.table_csv(self.doc, table), table, ["Name", "Owner"])

    def assert_one_failure(self, kind: str, object_id: str, name: str) -> None:
        summary = self.summary()
        self.assertEqual(summary["status"], "completed_with_errors")
        self.assertEqual(summary["counts"]["failures"], 1)
        self.assertEqual(len(summary["failures"]), 1, summary["failures"])
        failure = summary["failures"][0]
        self.assertEqual({key: failure.get(key) for key in ("kind", "doc_id", "id", "name")},
                         {"kind": kind, "doc_id": self.doc.id, "id": object_id, "name": name})
        self.assertIsInstance(failure.get("error"), str)
        self.assertTrue(failure["error"].strip(), failure)

    def test_failed_export_is_recorded_and_other_pages_saved(self) -> None:
        bad = self.pages[1]
        bad.export_fail_times = 1000
        self.assertEqual(self.run_backup(), 1, self.stderr)
        self.assert_one_failure("page", bad.id, bad.name)
        self.assert_no_file_for(bad.id)
        self.assertEqual(self.manifest_entries("pages")[bad.id]["status"], "failed")
        self.assert_saved([self.pages[0], self.pages[2]], self.tables)

    def test_rows_endpoint_failing_fails_that_table_only(self) -> None:
        bad = self.tables[1]
        self.fake.add_fault(rf"/tables/{bad.id}/rows", status=500, times=None)
        self.assertEqual(self.run_backup("--max-retries", "2"), 1, self.stderr)
        self.assert_one_failure("table", bad.id, bad.name)
        self.assertEqual(len(self.fake.requests("GET", rf"/tables/{bad.id}/rows$")), 3, "--max-retries 2 = 3 tries")
        self.assertEqual(list(self.doc_dir(self.doc).rglob(f"*__{bad.id}.csv")), [], "no CSV for a failed table")
        entries = self.manifest_entries("tables")
        self.assertEqual(entries[bad.id]["status"], "failed")
        self.assertEqual({entries[t.id]["status"] for t in (self.tables[0], self.tables[2])}, {"ok"})
        self.assert_saved(self.pages, [self.tables[0], self.tables[2]])

    def test_expired_export_request_is_started_again(self) -> None:
        page = self.pages[2]
        page.export_expire_times = 1
        self.assertEqual(self.run_backup(), 0, self.stderr)
        self.assertEqual(len(self.posts_for(page)), 2)
        self.assertEqual(len(self.posts_for(self.pages[0])), 1)
        self.assertEqual(self.summary()["failures"], [])
        self.assertEqual(self.manifest_entries("pages")[page.id]["status"], "ok")
        self.assert_saved(self.pages, self.tables)


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
