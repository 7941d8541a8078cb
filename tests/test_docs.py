"""The manual agrees with the code: README, --help and the module docstring name what the code has.

Six people edit the code and the README at once; these checks catch a flag, a summary field, a
reuse reason, a layout name or a section banner that one side gained and the other did not. No
server, no disk beyond reading the files: they run in milliseconds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import unittest
from pathlib import Path
from typing import List

from support import coda_backup

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_section(heading: str) -> str:
    """The README text from `heading` (a whole line) to the next heading of the same level or higher."""
    level = heading.split(" ")[0]
    start = README.index(f"\n{heading}\n")
    following = re.search(rf"\n#{{1,{len(level)}}} ", README[start + 1:])
    return README[start:start + 1 + following.start()] if following else README[start:]


def table_keys(section: str) -> List[str]:
    """The backticked first cells of a Markdown table's rows: `| `key` | ...`."""
    return re.findall(r"^\| `([^`]+)` \|", section, re.M)


class ReadmeAgreesWithCodeTest(unittest.TestCase):
    def test_every_flag_is_in_the_readme(self) -> None:
        for flag in coda_backup.build_parser().flags.values():
            if flag.dest == "help":
                continue
            longs = [option for option in flag.options if option.startswith("--")]
            with self.subTest(flags=longs):
                # A BooleanOptionalAction is documented by either form (`--no-index`, `--incremental`).
                self.assertTrue(any(f"`{option}" in README for option in longs), f"{longs} not in README.md")

    def test_summary_fields_are_in_the_readme_table(self) -> None:
        summary = coda_backup.build_summary("running", dt.datetime.now(dt.timezone.utc), coda_backup.RunRecorder(),
                                            coda_backup.RequestStats(), Path("2026-03-07T101530Z"))
        section = readme_section("## summary.json and manifest.json")
        # In the order summary.json writes them (a Summary's fields), as a reader of either expects.
        self.assertEqual(table_keys(section), list(summary))
        self.assertEqual(list(summary), [spec.name for spec in dataclasses.fields(coda_backup.Summary)])
        counts_row = next(line for line in section.splitlines() if line.startswith("| `counts` |"))
        for key in summary["counts"]:
            with self.subTest(count=key):
                self.assertIn(f"`{key}`", counts_row)
        requests_row = next(line for line in section.splitlines() if line.startswith("| `requests` |"))
        for key in summary["requests"]:
            with self.subTest(request=key):
                self.assertIn(f"`{key}`", requests_row)

    def test_the_readme_lists_the_keys_of_failures_skipped_and_vanished_items_in_order(self) -> None:
        section = readme_section("## summary.json and manifest.json")
        examples = {  # each form the README shows, as the summary's records write it
            "failures": [coda_backup.Failure("page", "d", "p", "name", "error")],
            "skipped": [coda_backup.Skipped("permissions", "d", "reason"),
                        coda_backup.Skipped("asset", "d", "reason", object_id="p", name="name", url="url")],
            "vanished": [coda_backup.Vanished("page", "d", "p", "name", "2026-03-07T101530Z")],
        }
        for key, items in examples.items():
            with self.subTest(field=key):
                row = next(line for line in section.splitlines() if line.startswith(f"| `{key}` |"))
                shown = [[re.sub(r":.*", "", part).strip() for part in braces.split(",")]
                         for braces in re.findall(r"`\{([^}]*)\}`", row)]
                self.assertEqual(shown, [list(item.as_json()) for item in items])

    def test_the_readme_shows_last_run_json_with_every_field_in_order(self) -> None:
        section = readme_section("## Bad nights")
        shown = re.search(r"DIR/last-run.json.*?```json\n(.*?)```", section, re.S)
        assert shown is not None, "no last-run.json example under Bad nights"
        example = json.loads(shown.group(1))
        self.assertEqual(list(example), [spec.name for spec in dataclasses.fields(coda_backup.LastRun)])
        self.assertEqual(list(example["counts"]), list(coda_backup.RunRecorder().as_counts()))

    def test_every_reuse_reason_is_in_the_readme_table(self) -> None:
        reasons = {value for name, value in vars(coda_backup).items() if name.startswith("REASON_")}
        self.assertEqual(set(table_keys(readme_section("## Incremental runs"))), reasons)

    def test_layout_names_every_file_the_tool_writes_in_dir_and_a_snapshot(self) -> None:
        layout = readme_section("### Layout")
        for name in (coda_backup.LATEST_TXT, coda_backup.VANISHED_NAME, coda_backup.LAST_RUN_NAME,
                     coda_backup.LOCK_NAME, coda_backup.SUMMARY_NAME, coda_backup.MANIFEST_NAME,
                     coda_backup.JOURNAL_NAME, coda_backup.INDEX_NAME, f"{coda_backup.BROWSE_DIR}/", "assets/",
                     *coda_backup.DOC_FILES.values()):
            with self.subTest(name=name):
                self.assertIn(name, layout)

    def test_exit_codes_table_has_every_code(self) -> None:
        codes = {coda_backup.EXIT_OK, coda_backup.EXIT_FAILURES, coda_backup.EXIT_USAGE, coda_backup.EXIT_FATAL,
                 coda_backup.EXIT_LOCKED, coda_backup.EXIT_SIGINT, coda_backup.EXIT_SIGTERM}
        self.assertEqual(set(coda_backup.EXIT_CODES.values()) - codes, set())
        rows = re.findall(r"^\| ([\d /]+) \|", readme_section("## Exit codes"), re.M)
        self.assertEqual({int(code) for row in rows for code in row.split("/")}, codes)


class DocstringContentsTest(unittest.TestCase):
    def test_contents_list_names_every_banner_in_order(self) -> None:
        source = (ROOT / "coda_backup.py").read_text(encoding="utf-8")
        banners = re.findall(r"^# --- (.+?) -+$", source, re.M)
        doc = coda_backup.__doc__ or ""
        self.assertIn("\nContents", doc, "the module docstring ends with a contents list")
        contents = doc[doc.rindex("\nContents"):]
        # `    Name    what lives there`: the name ends at two spaces; indented lines go on the text.
        listed = [re.split(r"\s{2,}", line.strip())[0] for line in contents.splitlines()[1:]
                  if re.match(r"^    \S", line)]
        self.assertEqual(listed, banners)


if __name__ == "__main__":
    unittest.main()
