"""Golden files: the exact bytes a backup of one fixed workspace writes for a table and a page.

tests/golden/awkward-values.csv was written by hand, cell by cell, from the CSV rules of the CLI
contract (the README's "CSV" section says the same: meta columns first, columns in API order, duplicate names
numbered, arrays and objects as compact JSON, null empty, true/false, numbers as JSON text,
strings verbatim; RFC 4180 quoting, CRLF): rich values (currency, people), lists, dates, NUL,
CR/LF, quotes, commas, spaces and emoji. Its row ids, times and links are the fake's (seed 7).
tests/golden/release-notes.md is the page export as saved: the image on the asset host becomes a
link into the doc's assets folder, everything else stays byte for byte. The asset's file name
hashes its URL, which holds the fake's port, so the file says `<logo>` where that name goes.

A change to what these files hold changes a format users and their scripts read: it must be a
decision, made in the contract first, and then here by hand.
"""

from __future__ import annotations

import re
import unittest
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List

from fake_coda import PNG_HEAD, FakeCoda, asset_bytes
from support import SharedRunTestCase

GOLDEN = Path(__file__).resolve().parent / "golden"


def build_golden_workspace(fake: FakeCoda) -> Dict[str, Any]:
    """One doc: page "Release Notes" (an image on the asset host) holding table "Awkward Values".

    Values are what Coda answers with valueFormat=simpleWithArrays; the order of the calls fixes
    every id and time, so changing this function means writing the golden files again.
    """
    doc = fake.add_doc("Golden Doc")
    logo = fake.add_asset(doc, asset_bytes("logo", 64, PNG_HEAD), "image/png")
    page = doc.add_page("Release Notes", content=(
        "# Release Notes 2.0\n\n"
        "Ünïcødé ✓, «quotes» and \"double quotes\", a tab\there.\n\n"
        f"![logo.png]({logo})\n\n"
        "- [Changelog](https://example.com/changelog?a=1&b=2)\n"
        "- trailing spaces   \n"
        "\n"
        "| Col | Value |\n| --- | --- |\n| a | 1 |\n"))
    table = doc.add_table("Awkward Values", parent_page=page, columns=[
        "Item",
        {"name": "Amount", "type": "number"},
        {"name": "Price", "type": "currency"},
        {"name": "Owner", "type": "person"},
        {"name": "Tags", "type": "select", "isArray": True},
        {"name": "Due", "type": "date"},
        {"name": "Done", "type": "checkbox"},
        {"name": 'Notes, "quoted"'},
        {"name": "Item"},
    ])
    person = {"@context": "http://schema.org/", "@type": "Person", "name": "Zoë Ång", "email": "zoe@example.com"}
    euros = {"@context": "http://schema.org/", "@type": "MonetaryAmount", "currency": "EUR", "amount": 12.5}
    rows: List[List[Any]] = [
        ["Plain", 42, euros, person, ["a", "b"], "2024-06-01", True, 'say "hi", then leave', "dup"],
        ["Line\r\nbreak", -3.25, "$1,234.50", [person, {"@type": "Person", "name": "Bo"}], [],
         "2024-06-01T09:30:00.000-07:00", False, "two\nlines", ""],
        ["nul\x00inside", 0, None, None, [1, None, True, {"k": "v"}], None, None, None, None],
        [" spaced ", 1e21, 0.1, "", ["🚀"], "", False, ",", '"'],
    ]
    for values in rows:
        table.add_row(values)
    return {"doc": doc, "page": page, "table": table, "logo": logo}


class GoldenTest(SharedRunTestCase):
    @classmethod
    def build(cls, fake: FakeCoda) -> Dict[str, Any]:
        return build_golden_workspace(fake)

    @classmethod
    def run_flags(cls, fake: FakeCoda) -> List[str]:
        return ["--no-extras", "--asset-host", fake.assets_url]

    def assert_golden(self, saved: bytes, expected: bytes, newline: bytes) -> None:
        """Line by line first (a readable failure), then every byte."""
        self.assertEqual(saved.split(newline), expected.split(newline))
        self.assertEqual(saved, expected)

    def test_table_as_csv(self) -> None:
        self.assertEqual(self.code, 0, self.stderr)
        saved = self.find_one(self.doc_dir(self.data["doc"]), f"*__{self.data['table'].id}.csv").read_bytes()
        self.assert_golden(saved, (GOLDEN / "awkward-values.csv").read_bytes(), b"\r\n")

    def test_page_export(self) -> None:
        self.assertEqual(self.code, 0, self.stderr)
        page = self.data["page"]
        entry = next(entry for doc in self.manifest()["docs"] for entry in doc["pages"] if entry["id"] == page.id)
        assets = [record for record in entry["assets"] if record["url"] == self.data["logo"]]
        self.assertEqual(len(assets), 1, entry["assets"])
        name = PurePosixPath(assets[0]["path"]).name
        self.assertRegex(name, re.compile(r"^[0-9a-f]{64}\.png$"))
        expected = (GOLDEN / "release-notes.md").read_bytes().replace(b"<logo>", name.encode("ascii"))
        saved = self.find_one(self.doc_dir(self.data["doc"]), f"*__{page.id}.md").read_bytes()
        self.assert_golden(saved, expected, b"\n")


if __name__ == "__main__":
    unittest.main()
