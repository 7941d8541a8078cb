"""Files a run writes only when asked, or can be told to leave out.

Page formats (--page-format, --html-pages), rows as NDJSON (--rows-json), a doc's formulas,
controls and sharing (--no-extras leaves them out) and the snapshot's zip (--zip). The default
run's files are in test_backup_layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import unittest
import zipfile

import coda_backup
from fake_coda import display_text, iso_time
from support import (
    EXTRA_PATHS,
    SmallWorkspaceTestCase,
    files_under,
    item_list,
    manifest_owners,
    read_csv,
    read_json,
)

# --- --page-format / --html-pages -------------------------------------------------------------


class PageFormatTest(SmallWorkspaceTestCase):
    """--page-format and --html-pages: the spellings, then what each format writes."""

    def test_spellings(self) -> None:
        cases = [
            ((), ("markdown",)),
            (("--page-format", "markdown"), ("markdown",)),
            (("--page-format", "md"), ("markdown",)),  # the contract's spelling
            (("--page-format", "html"), ("html",)),
            (("--page-format", "both"), ("markdown", "html")),
            (("--html-pages",), ("markdown", "html")),
        ]
        for flags, formats in cases:
            with self.subTest(flags=flags):
                args = coda_backup.build_parser().parse_args(["--output", str(self.out), *flags])
                self.assertEqual(coda_backup.options_from_args(args).page_formats, formats)

    def test_formats(self) -> None:
        """What each format writes; the default's files are checked by test_backup_layout.SampleWorkspaceTest."""
        cases = [
            (("--page-format", "html"), ("html",)),
            (("--page-format", "both"), ("markdown", "html")),
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


class RowsJsonTest(SmallWorkspaceTestCase):
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


class DocExtrasTest(SmallWorkspaceTestCase):
    TWO_DOCS = True

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
        self.assertEqual([record.path for record in self.fake.requests(None, EXTRA_PATHS)], [])
        for name in ("formulas.json", "controls.json", "permissions.json"):
            with self.subTest(file=name):
                self.assertEqual(list(self.latest().rglob(name)), [])
        self.assertTrue(list(self.latest().rglob("*.csv")), "the rest is still backed up")


# --- --zip ------------------------------------------------------------------------------------


class ZipTest(SmallWorkspaceTestCase):
    def test_zip_holds_every_file(self) -> None:
        self.assertEqual(self.run_backup("--zip", "--page-format", "both", index=True), 0, self.stderr)
        snapshot = self.latest()
        archive = self.out / f"{snapshot.name}.zip"
        self.assertTrue(archive.is_file())
        files = files_under(snapshot)
        self.assertIn("summary.json", files)
        self.assertIn("index.html", files)  # written before the zip, so in it
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


if __name__ == "__main__":
    unittest.main()
