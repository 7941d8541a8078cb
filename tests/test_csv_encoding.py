"""CSV rules of the contract, cell by cell, read back with the csv module."""

import csv
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import coda_backup as cb

META = ["_row_id", "_row_name", "_row_index", "_created_at", "_updated_at", "_browser_link"]


class CellTest(unittest.TestCase):
    def test_values(self) -> None:
        cases = [
            (None, ""),
            (True, "true"),
            (False, "false"),
            (0, "0"),
            (42, "42"),
            (-1.5, "-1.5"),
            (3.0, "3.0"),
            ("plain text", "plain text"),
            ("", ""),
            ("=SUM(A1)", "=SUM(A1)"),
            ("line\nbreak, \"quoted\"", "line\nbreak, \"quoted\""),
            (["a", "b"], '["a","b"]'),
            ([], "[]"),
            ({"name": "Ada", "email": "ada@example.com"}, '{"name":"Ada","email":"ada@example.com"}'),
            (["🚀", {"k": None}], '["🚀",{"k":null}]'),
        ]
        for value, expected in cases:
            with self.subTest(value=value):
                self.assertEqual(cb.csv_cell(value), expected)


class LineTest(unittest.TestCase):
    def test_quoting(self) -> None:
        cases = [
            (["a", "b"], "a,b\r\n"),
            (["", ""], ",\r\n"),
            (["x,y"], '"x,y"\r\n'),
            (['say "hi"'], '"say ""hi"""\r\n'),
            (["two\nlines", "cr\r"], '"two\nlines","cr\r"\r\n'),
            (["nul\x00inside"], '"nul\x00inside"\r\n'),  # the csv module cannot write this on 3.10
            ([" spaced ", "🚀"], " spaced ,🚀\r\n"),
        ]
        for cells, expected in cases:
            with self.subTest(cells=cells):
                self.assertEqual(cb.csv_line(cells), expected)


class HeaderTest(unittest.TestCase):
    def test_duplicates_get_numbered(self) -> None:
        columns = [{"id": "c-1", "name": "Status"}, {"id": "c-2", "name": "Status"}, {"id": "c-3", "name": "Status"},
                   {"id": "c-4", "name": "Status__2"}, {"id": "c-5", "name": "_row_id"}]
        self.assertEqual(cb.csv_header(columns),
                         META + ["Status", "Status__2", "Status__3", "Status__2__2", "_row_id__2"])


class WriteRowsTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.path = Path(self.tmp.name) / "t.csv"

    def tearDown(self) -> None:
        self.tmp.cleanup()

    def read_back(self) -> list:
        with open(self.path, encoding="utf-8", newline="") as handle:
            return list(csv.reader(handle))

    def test_rows_are_keyed_by_column_id_in_column_order(self) -> None:
        columns = [{"id": "c-b", "name": "B"}, {"id": "c-a", "name": "A"}]
        rows = iter([{"id": "i-1", "name": "one", "index": 0, "createdAt": "2026-01-01T00:00:00Z",
                      "updatedAt": "2026-01-02T00:00:00Z", "browserLink": "https://coda.io/x",
                      "values": {"c-a": "a1", "c-b": ["x", "y"]}}])
        count, problem = cb.write_rows_csv(self.path, columns, rows)
        self.assertEqual((count, problem), (1, None))
        self.assertEqual(self.read_back(), [
            META + ["B", "A"],
            ["i-1", "one", "0", "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "https://coda.io/x", '["x","y"]', "a1"],
        ])
        self.assertTrue(self.path.read_bytes().endswith(b"\r\n"))
        self.assertFalse(self.path.read_bytes().startswith(b"\xef\xbb\xbf"), "no BOM")

    def test_empty_table_gets_header_only(self) -> None:
        count, _ = cb.write_rows_csv(self.path, [{"id": "c-1", "name": "Name"}], iter([]))
        self.assertEqual(count, 0)
        self.assertEqual(self.read_back(), [META + ["Name"]])

    def test_listing_incomplete_keeps_rows_read(self) -> None:
        def rows():
            yield {"id": "i-1", "values": {}}
            raise cb.ListingIncomplete("token repeated")

        count, problem = cb.write_rows_csv(self.path, [], rows())
        self.assertEqual(count, 1)
        self.assertIsInstance(problem, cb.ListingIncomplete)
        self.assertEqual(len(self.read_back()), 2)

    def test_api_error_leaves_no_file_and_no_temp(self) -> None:
        def rows():
            yield {"id": "i-1", "values": {}}
            raise cb.ApiError(500, "boom")

        with self.assertRaises(cb.ApiError):
            cb.write_rows_csv(self.path, [], rows())
        self.assertEqual(list(Path(self.tmp.name).iterdir()), [])

    def test_failed_rewrite_keeps_the_old_file(self) -> None:
        self.path.write_text("old", encoding="utf-8")

        def rows():
            raise cb.ApiError(500, "boom")
            yield  # pragma: no cover

        with self.assertRaises(cb.ApiError):
            cb.write_rows_csv(self.path, [], rows())
        self.assertEqual(self.path.read_text(encoding="utf-8"), "old")
        self.assertEqual([p.name for p in Path(self.tmp.name).iterdir()], ["t.csv"])


if __name__ == "__main__":
    unittest.main()
