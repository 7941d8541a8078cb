"""For the people who run it and the people who open it.

Monitoring pings (--ping-url) received by a local listener, the browsable index.html, the
progress line, files stamped with Coda's updatedAt, --csv-bom, the help and usage polish, the
`running` summary.json a monitor reads during a run, --log-file and --quiet.
End-to-end cases run the real CLI in-process against the fake Coda (support.BackupTestCase);
the progress line, the ping body and the time parsing are pure functions with tables.
"""

from __future__ import annotations

import html.parser
import os
import posixpath
import re
import sys
import threading
import time
import unittest
import urllib.parse
from pathlib import Path
from typing import Any, Dict, List, Tuple

from fake_coda import PNG_HEAD, FakeCoda, PingReceiver, asset_bytes
from support import TOKEN, BackupTestCase, SmallWorkspaceTestCase, closed_port, coda_backup, read_csv, read_json

ROOT = Path(__file__).resolve().parent.parent
HOSTILE_DOC = '<script>alert("doc")</script> & Co'
HOSTILE_TABLE = "<img src=x onerror=alert(1)>"
HOSTILE_PAGE = "<b>bold</b> #1 %20"


def operator_workspace(fake: FakeCoda) -> Any:
    """One doc with hostile names: pages Intro (with an image on the fake's asset host) > <b>bold</b>,
    a 150-row table on the nested page and a view of it, so previews are cut at 100 rows and links
    cross folders."""
    doc = fake.add_doc(HOSTILE_DOC)
    image = fake.add_asset(doc, asset_bytes("logo", 100, PNG_HEAD))
    intro = doc.add_page("Intro", content=f"# Intro\n\nÜber alles ✓\n\n![logo.png]({image})\n")
    nested = doc.add_page(HOSTILE_PAGE, parent=intro)
    table = doc.add_table(HOSTILE_TABLE, parent_page=nested, columns=["Name", {"name": "N", "type": "number"}])
    table.fill_rows(150, lambda index: [f"<row {index}> Ünï", index])
    doc.add_view(table, "Evens", row_filter=lambda values: True)
    return doc


# --- --ping-url --------------------------------------------------------------------------


class PingTest(BackupTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.receiver = PingReceiver()
        self.receiver.__enter__()
        self.addCleanup(self.receiver.__exit__)

    def assert_no_token(self) -> None:
        for ping in self.receiver.pings:
            self.assertNotIn(TOKEN, ping.body + ping.path + repr(ping.headers))
            self.assertNotIn("authorization", ping.headers)

    def test_start_and_success(self) -> None:
        operator_workspace(self.fake)
        self.assertEqual(self.run_backup("--ping-url", self.receiver.url), 0, self.stderr)
        self.assertEqual(self.receiver.paths(), ["/ping/check-key-5f3a/start", "/ping/check-key-5f3a"])
        start, end = self.receiver.pings
        self.assertEqual(start.method, "POST")
        self.assertIn("started", start.body)
        self.assertIn("status: completed (exit 0)", end.body)
        self.assertIn("docs 1, pages 2, tables 1, views 1, rows 300, failures 0", end.body)
        self.assertIn(self.latest().name, end.body)
        self.assert_no_token()

    def test_failed_objects_ping_exit_1_with_the_failures(self) -> None:
        doc = operator_workspace(self.fake)
        intro = doc.page("Intro")
        assert intro is not None
        intro.export_fail_times = 99
        intro.name = f"Intro {TOKEN}"  # a hostile API may echo anything; the ping body is redacted
        # An error body echoing the token: the client redacts it, and so does the ping.
        self.fake.add_fault(r"/tables/[^/]+/columns$", status=403, times=None,
                            body={"message": f"forbidden for {TOKEN}"})
        self.assertEqual(self.run_backup("--ping-url", self.receiver.url), 1, self.stderr)
        self.assertEqual(self.receiver.paths()[-1], "/ping/check-key-5f3a/1")
        body = self.receiver.pings[-1].body
        self.assertIn("status: completed_with_errors (exit 1)", body)
        self.assertIn("failures (first 3 of 3):", body)
        self.assertIn(f"- page {intro.id} \"Intro [redacted]\": export failed", body)
        self.assert_no_token()

    def test_fatal_and_early_ends_ping_their_exit_code(self) -> None:
        cases: List[Tuple[str, int]] = [("refused token", 3), ("locked", 4)]
        for label, code in cases:
            with self.subTest(label):
                self.receiver.pings.clear()
                if label == "refused token":
                    self.set_env("CODA_API_TOKEN", "wrong-token-Qp7")
                    self.assertEqual(self.run_backup("--ping-url", self.receiver.url), code, self.stderr)
                    self.set_env("CODA_API_TOKEN", TOKEN)
                else:
                    self.out.mkdir(parents=True, exist_ok=True)
                    with coda_backup.RunLock(self.out):
                        self.assertEqual(self.run_backup("--ping-url", self.receiver.url), code, self.stderr)
                self.assertEqual(self.receiver.paths(), ["/ping/check-key-5f3a/start", f"/ping/check-key-5f3a/{code}"])
                self.assertIn(f"(exit {code})", self.receiver.pings[-1].body)
                self.assertIn("failed", self.receiver.pings[-1].body)
                self.assertNotIn("wrong-token-Qp7", self.receiver.pings[-1].body)

    def test_a_ping_that_hangs_or_is_refused_never_fails_the_backup(self) -> None:
        operator_workspace(self.fake)
        self.receiver.hang = True
        self.assertEqual(self.run_backup("--ping-url", self.receiver.url, "--timeout", "0.2"), 0, self.stderr)
        self.assertEqual(len(self.receiver.pings), 2, "a ping that timed out is not sent again")
        warning = "monitoring ping to http://127.0.0.1/… failed (no answer within 0.2s); the backup goes on"
        self.assertIn(warning, self.stderr)
        self.assertEqual(self.summary()["warnings"], [warning], "the start ping's failure, for a monitor to read")
        refused = f"http://127.0.0.1:{closed_port()}/ping/secret-key-77"
        self.assertEqual(self.run_backup("--ping-url", refused), 0, self.stderr)
        self.assertIn("monitoring ping to http://127.0.0.1/… failed (ConnectionRefusedError", self.stderr)
        self.assertNotIn("secret-key-77", self.stderr, "the ping URL is a secret")
        self.assertEqual(self.summary()["status"], "completed")

    def test_a_ping_costs_a_few_seconds_at_most(self) -> None:
        """The client's own bounds: whatever --timeout says, a ping waits 5 s at most, twice."""
        for timeout in (60.0, 2.0):
            options = coda_backup.Options(output=self.out, timeout=timeout, ping_url=self.receiver.url)
            pinger = coda_backup.Pinger.for_options(options, TOKEN)
            assert pinger is not None
            with self.subTest(timeout=timeout):
                self.assertLessEqual(pinger.timeout, min(5.0, timeout))
                self.assertLessEqual(pinger.attempts, 2)
                self.assertLessEqual(pinger.retry_pause, 1.0)

    def test_ping_url_from_a_config_file(self) -> None:
        config = self.out.parent / "coda-backup.toml"
        config.write_text(f'ping-url = "{self.receiver.url}"\nindex = false\ncsv-bom = true\n', encoding="utf-8")
        code = self.run_backup("--config", str(config), index=True)  # the file's `index = false` turns it off
        if sys.version_info < (3, 11):  # no tomllib: --config is refused with one line
            self.assertEqual(code, 2)
            self.assertIn("--config needs Python 3.11", self.stderr)
            return
        self.assertEqual(code, 0, self.stderr)
        self.assertEqual(self.receiver.paths(), ["/ping/check-key-5f3a/start", "/ping/check-key-5f3a"])
        self.assertFalse((self.latest() / "index.html").exists())

    def test_bad_ping_urls_are_usage_errors(self) -> None:
        for url in ("ftp://hc.example/x", "hc-ping.com/uuid", f"https://hc.example/{TOKEN}"):
            with self.subTest(url=url):
                self.assertEqual(self.run_backup("--ping-url", url), 2)
                self.assertEqual(len(self.stderr.strip().splitlines()), 1, self.stderr)
                self.assertNotIn(TOKEN, self.stderr)
        self.assertEqual(self.receiver.pings, [])


class PingPolicyTest(unittest.TestCase):
    def test_ping_target(self) -> None:
        cases = [
            ("https://hc-ping.com/abc", "start", "https://hc-ping.com/abc/start"),
            ("https://hc-ping.com/abc", None, "https://hc-ping.com/abc"),
            ("https://hc-ping.com/abc", "3", "https://hc-ping.com/abc/3"),
            ("https://kuma.example/api/push/k?status=up", "1", "https://kuma.example/api/push/k/1?status=up"),
        ]
        for url, suffix, expected in cases:
            with self.subTest(url=url, suffix=suffix):
                self.assertEqual(coda_backup.ping_target(url, suffix), expected)

    def test_redacted_url_keeps_only_scheme_and_host(self) -> None:
        self.assertEqual(coda_backup.redact_ping_url("https://user:pw@hc-ping.com:443/uuid-key?x=1"),
                         "https://hc-ping.com/…")

    def test_body_lists_the_first_20_failures_and_vanished(self) -> None:
        failures = [{"kind": "page", "id": f"canvas-{n}", "name": f"P\x1b{n}", "error": "boom"} for n in range(25)]
        cases = [
            ({"vanished": {"docs": 1, "pages": 2, "tables": 0, "views": 0}}, [], "vanished 3"),
            ({}, [{"kind": "doc", "id": "d"}], "vanished 1"),
            ({}, None, None),
            ({"vanished": {"docs": 0, "pages": 0}}, [], None),
        ]
        for extra_counts, vanished_list, expected in cases:
            with self.subTest(expected=expected):
                summary: Dict[str, Any] = {"status": "completed_with_errors", "duration_s": 1.5,
                                           "counts": dict({"docs": 2, "failures": 25}, **extra_counts),
                                           "failures": failures}
                if vanished_list is not None:
                    summary["vanished"] = vanished_list
                body = coda_backup.ping_body(1, summary)
                self.assertIn("failures (first 20 of 25):", body)
                self.assertIn("canvas-19", body)
                self.assertNotIn("canvas-20", body)
                self.assertNotIn("\x1b", body)
                if expected:
                    self.assertIn(expected, body)
                else:
                    self.assertNotIn("vanished", body)


# --- index.html --------------------------------------------------------------------------


class LinkCollector(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: List[str] = []
        self.tags: List[str] = []
        self.text: List[str] = []

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Any]]) -> None:
        self.tags.append(tag)
        self.links += [value for name, value in attrs if name in ("href", "src") and value is not None]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


class IndexTest(BackupTestCase):
    def parse_pages(self, snapshot: Path) -> Dict[str, LinkCollector]:
        pages = {}
        for path in sorted(snapshot.rglob("*.html")):
            if path.relative_to(snapshot).parts[0] == "docs":
                continue  # page exports are Coda's HTML, not ours
            collector = LinkCollector()
            collector.feed(path.read_text(encoding="utf-8"))
            pages[path.relative_to(snapshot).as_posix()] = collector
        return pages

    def test_index_pages_link_only_inside_the_snapshot_and_escape_names(self) -> None:
        operator_workspace(self.fake)
        gone = self.fake.add_doc("Gone <soon>")
        self.assertEqual(self.run_backup("--page-format", "both", index=True), 0, self.stderr)
        snapshot = self.latest()
        pages = self.parse_pages(snapshot)
        self.assertIn("index.html", pages)
        self.assertEqual(len(pages), 5, sorted(pages))  # the index, two doc pages, two previews
        for name, page in pages.items():
            for href in page.links:
                with self.subTest(page=name, href=href):
                    parts = urllib.parse.urlsplit(href)
                    self.assertEqual((parts.scheme, parts.netloc), ("", ""), "relative links only")
                    target = posixpath.normpath(posixpath.join(posixpath.dirname(name), urllib.parse.unquote(href)))
                    self.assertFalse(target.startswith(".."), "stays inside the snapshot")
                    self.assertTrue((snapshot / target).is_file(), target)
            self.assertNotIn("script", page.tags)
            self.assertNotIn("img", page.tags)
            self.assertNotIn("b", page.tags)
        index_text = "".join(pages["index.html"].text)
        self.assertIn(HOSTILE_DOC, index_text, "the hostile name shows as text")
        self.assertIn("completed", index_text)
        doc_page = next(page for name, page in pages.items()
                        if name.count("/") == 2 and HOSTILE_DOC in "".join(page.text))
        doc_text = "".join(doc_page.text)
        for text in (HOSTILE_PAGE, HOSTILE_TABLE, "Intro", "150", "Evens"):
            self.assertIn(text, doc_text)
        self.assertEqual(sum(1 for href in doc_page.links if href.endswith(".md")), 2)
        self.assertEqual(sum(1 for href in doc_page.links if href.endswith(".csv")), 2)
        preview = next(page for name, page in pages.items() if "/tables/table/" in name)
        self.assertEqual(preview.tags.count("tr"), 101, "header and the first 100 rows")
        self.assertIn("<row 99> Ünï", preview.text)
        self.assertNotIn("<row 100> Ünï", preview.text)

        manifest = self.manifest()
        index_records = manifest["index"]
        self.assertEqual(sorted(record["path"] for record in index_records), sorted(pages))
        self.assertEqual({record["role"] for record in index_records}, {"index"})
        self.assertEqual(self.run_main(["--output", str(self.out), "--verify"]), 0, self.stdout)
        (snapshot / "index.html").chmod(0o600)
        with open(snapshot / "index.html", "a", encoding="utf-8") as handle:
            handle.write("<!-- altered -->")
        self.assertEqual(self.run_main(["--output", str(self.out), "--verify"]), 1)
        self.assertIn("altered: index.html", self.stdout)

        # An incremental run accepts that manifest, links every doc file, and builds a new index,
        # which lists what vanished near the top.
        self.fake.remove_doc(gone)
        self.fake.clear_log()
        self.assertEqual(self.run_backup("--page-format", "both", "--incremental", "--allow-vanished", index=True), 0,
                         self.stderr)
        second = self.latest()
        self.assertNotEqual(second, snapshot)
        self.assertEqual(self.summary()["counts"]["skipped_unchanged"]["docs"], 1)
        self.assertEqual(self.fake.requests("POST"), [])
        for record in self.manifest()["index"]:
            with self.subTest(rebuilt=record["path"]):
                self.assertEqual((second / record["path"]).stat().st_nlink, 1, "rebuilt, not linked")
        self.assertNotIn("altered", (second / "index.html").read_text(encoding="utf-8"))
        index_text = "".join(self.parse_pages(second)["index.html"].text)
        self.assertIn("Vanished since the last backup (1)", index_text)
        self.assertIn("Gone <soon>", index_text)
        self.assertLess(index_text.index("Vanished"), index_text.index("Docs ("), "the run first, then the docs")

        self.assertEqual(self.run_backup("--no-index", index=True), 0, self.stderr)
        self.assertFalse((self.latest() / "index.html").exists())
        self.assertFalse((self.latest() / "browse").exists())
        self.assertEqual(self.manifest()["index"], [])


class PageTreeTest(unittest.TestCase):
    def test_tree_survives_missing_parents_and_cycles(self) -> None:
        here = coda_backup.PurePosixPath("browse/docs/D__1.html")

        def page(pid: str, parent: Any) -> Dict[str, Any]:
            return {"id": pid, "name": pid.upper(), "parentId": parent, "status": "ok",
                    "files": [{"path": f"docs/D__1/pages/{pid}.md", "role": "markdown"}]}

        cases = {
            "nested": [page("a", None), page("b", "a"), page("c", "b")],
            "missing parent": [page("a", "gone"), page("b", "a")],
            "cycle": [page("a", "b"), page("b", "a"), page("c", None)],
            "self parent": [page("a", "a")],
        }
        for label, pages in cases.items():
            with self.subTest(label):
                collector = LinkCollector()
                collector.feed(coda_backup.page_tree(here, pages))
                self.assertEqual(sorted(collector.links), sorted(f"../../docs/D__1/pages/{p['id']}.md" for p in pages))


# --- progress line -----------------------------------------------------------------------


class ProgressLineTest(unittest.TestCase):
    def setUp(self) -> None:
        self.full = coda_backup.Progress(elapsed=725.0, eta=3725.0, docs=3, docs_total=10, objects_done=120,
                                         objects_queued=450, rows=1234567, waiting=("write",), requests_per_s=1.6,
                                         rate_limited=2, failures=1)

    def test_never_wider_than_the_width_given(self) -> None:
        quiet = coda_backup.Progress(elapsed=5.0, eta=None, docs=0, docs_total=None, objects_done=0,
                                     objects_queued=0, rows=0)
        for progress in (self.full, quiet):
            for width in (0, 1, 3, 10, 25, 40, 59, 79, 80, 119, 200):
                with self.subTest(width=width, waiting=progress.waiting):
                    line = coda_backup.progress_line(progress, width)
                    self.assertLessEqual(len(line), width)
                    self.assertNotIn("\n", line)
                    if width >= 10:
                        self.assertTrue(line.startswith(coda_backup.format_duration(progress.elapsed)), line)

    def test_most_important_first(self) -> None:
        cases = [
            (200, "12m05s | ETA 1h02m | docs 3/10 | objects 120/450 | rows 1,234,567 | waiting: write limit "
                  "| failures 1 | 1.6 req/s | 429s 2"),
            (80, "12m05s | ETA 1h02m | docs 3/10 | objects 120/450 | rows 1,234,567"),
            (40, "12m05s | ETA 1h02m | docs 3/10"),
            (4, "12m0"),
        ]
        for width, expected in cases:
            with self.subTest(width=width):
                self.assertEqual(coda_backup.progress_line(self.full, width), expected)

    def test_durations(self) -> None:
        for seconds, text in ((0, "0s"), (59.9, "59s"), (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m"),
                              (-3, "0s"), (90061, "25h01m")):
            with self.subTest(seconds=seconds):
                self.assertEqual(coda_backup.format_duration(seconds), text)


class PacingSignalTest(BackupTestCase):
    def test_a_worker_sleeping_for_the_write_limit_is_seen(self) -> None:
        doc = operator_workspace(self.fake)
        intro = doc.page("Intro")
        assert intro is not None
        cancel = threading.Event()
        settings = coda_backup.ClientSettings(api_url=self.fake.api_url, rate_limits={"write": (1, 60.0)})
        client = coda_backup.HttpClient(settings, TOKEN, cancel)
        self.addCleanup(client.close)
        api = coda_backup.CodaApi(client)
        api.start_export(doc.id, intro.id, "markdown")  # uses the one write of this minute
        self.assertEqual(client.stats.waiting(), [])
        ended: List[BaseException] = []

        def second_export() -> None:
            try:
                api.start_export(doc.id, intro.id, "markdown")
            except BaseException as exc:  # expected: Cancelled while it sleeps for the limit
                ended.append(exc)

        second = threading.Thread(target=second_export)
        second.start()
        deadline = time.monotonic() + 5
        while not client.stats.waiting() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(client.stats.waiting(), ["write"])
        cancel.set()
        second.join()
        self.assertEqual([type(exc) for exc in ended], [coda_backup.Cancelled])
        self.assertEqual(client.stats.waiting(), [])


# --- files carry Coda's time, --csv-bom ------------------------------------------------------


class CodaTimeTest(unittest.TestCase):
    def test_coda_mtime(self) -> None:
        cases = [
            ("2024-01-01T00:00:05.000Z", 1704067205.0),
            ("2024-01-01T02:00:05+02:00", 1704067205.0),
            ("2024-01-01T00:00:05", 1704067205.0),
            ("1970-01-01T00:00:00Z", None),  # a ZIP cannot hold it
            ("2200-01-01T00:00:00Z", None),
            ("yesterday", None),
            ("", None),
            (None, None),
            (1704067205, None),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                self.assertEqual(coda_backup.coda_mtime(text), expected)


class FileTimesAndBomTest(BackupTestCase):
    def stamped_files(self, snapshot: Path) -> int:
        """Check that every page and table data file has its object's updatedAt as mtime; count them."""
        stamped = 0
        for doc in self.manifest(snapshot)["docs"]:
            for entry in doc["pages"] + doc["tables"]:
                for record in entry["files"]:
                    if record["role"] in ("markdown", "html", "csv", "rows"):
                        with self.subTest(path=record["path"]):
                            mtime = (snapshot / record["path"]).stat().st_mtime
                            self.assertEqual(mtime, coda_backup.coda_mtime(entry["updatedAt"]))
                            stamped += 1
        return stamped

    def test_saved_files_carry_updated_at_and_csv_bom_is_not_mixed_by_reuse(self) -> None:
        operator_workspace(self.fake)
        self.assertEqual(self.run_backup("--page-format", "both", "--rows-json", "--csv-bom",
                                         "--asset-host", self.fake.assets_url), 0, self.stderr)
        snapshot = self.latest()
        self.assertIn("assets/", (snapshot / self.manifest()["docs"][0]["pages"][0]["path"]).read_text(
            encoding="utf-8"), "Intro's link to its image was rewritten after the export")
        self.assertEqual(self.stamped_files(snapshot), 2 * 2 + 2 * 2)
        csvs = sorted(snapshot.rglob("*.csv"))
        self.assertEqual(len(csvs), 2)
        for path in csvs:
            self.assertTrue(path.read_bytes().startswith(b"\xef\xbb\xbf_row_id,"), path)
        self.assertEqual(read_csv(csvs[0])[0][0], "\ufeff_row_id", "the BOM is the first character")

        # Unchanged tables, but the CSV bytes must change: no BOM file is linked into this run.
        self.fake.clear_log()
        self.assertEqual(self.run_backup("--page-format", "both", "--rows-json", "--incremental"), 0, self.stderr)
        second = self.latest()
        for path in sorted(second.rglob("*.csv")):
            with self.subTest(path=path.name):
                self.assertTrue(path.read_bytes().startswith(b"_row_id,"))
        skipped = self.summary()["counts"]["skipped_unchanged"]
        self.assertEqual((skipped["docs"], skipped["tables"], skipped["views"]), (0, 0, 0))
        self.assertEqual(skipped["pages"], 1, "Intro (no table on it) is still linked")
        self.assertEqual(self.stamped_files(second), 8, "linked files keep their time too")
        self.assertEqual(len(self.fake.requests(path=r"/rows$")), 2)


# --- help and usage ----------------------------------------------------------------------


class HelpTest(BackupTestCase):
    def test_short_options(self) -> None:
        self.assertEqual(self.run_main(["-o", str(self.out), "--api-url", self.fake.api_url, "--rate-limits", "none",
                                        "--poll-interval", "0.005", "-v", "--no-extras"]), 0, self.stderr)
        self.assertIn(" DEBUG GET ", self.stderr)
        self.assertEqual(self.run_main(["-o", str(self.out), "--api-url", self.fake.api_url, "--rate-limits", "none",
                                        "--poll-interval", "0.005", "-q", "--no-extras"]), 0, self.stderr)
        self.assertEqual(self.stderr, "")

    def test_type_errors_are_one_line(self) -> None:
        for extra in (["--concurrency", "x"], ["--timeout", "soon"], ["--page-format", "pdf"], ["--bogus"]):
            with self.subTest(extra=extra):
                self.assertEqual(self.run_backup(*extra), 2)
                lines = self.stderr.strip().splitlines()
                self.assertEqual(len(lines), 1, self.stderr)
                self.assertTrue(lines[0].startswith("coda-backup: error: "), lines[0])

    def test_help_shows_output_first_and_examples(self) -> None:
        self.assertEqual(self.run_main(["--help"]), 0)
        # `-o DIR, --output DIR` before Python 3.13, `-o, --output DIR` since: the flag alone.
        options = re.findall(r"^  (-[\w-]+)", self.stdout, re.M)
        self.assertEqual(options[0], "-o")
        self.assertIn("-o DIR [options]", self.stdout.splitlines()[0])
        for example in ("--verify", "--list-runs", "--token-file", "--log-file", "30 2 * * *"):
            self.assertIn(example, self.stdout.split("examples:")[1])
        for flag in ("--ping-url", "--csv-bom", "--no-index", "-q, --quiet", "-v, --verbose"):
            self.assertIn(flag, self.stdout)

    def test_readme_cron_line_writes_a_log_file(self) -> None:
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        cron = [line for line in readme.splitlines() if re.match(r"^\d+ \d+ \* \* \* ", line)]
        self.assertTrue(cron)
        for line in cron:
            self.assertIn("--token-file", line)
            self.assertIn("--log-file", line)
        for heading in ("## Monitoring", "## Browsing a snapshot"):
            self.assertIn(heading, readme)


# --- summary.json while running -----------------------------------------------------------------


class RunningSummaryTest(BackupTestCase):
    def test_summary_says_running_during_the_run(self) -> None:
        doc = self.fake.add_doc("Slow Doc")
        pages = [doc.add_page(f"Page {number}") for number in range(2)]
        # The fake holds the doc listing: the run is under way and no page can have been saved.
        hold = self.fake.hold(r"^/docs$")
        self.addCleanup(hold.release)
        result: Dict[str, int] = {}
        worker = threading.Thread(target=lambda: result.update(code=self.run_backup()))
        worker.start()
        self.addCleanup(worker.join, 30)
        self.assertTrue(hold.reached.wait(20), "the run never listed the docs")
        running = [read_json(path) for path in self.out.glob("*/summary.json")]
        self.assertEqual([summary["status"] for summary in running], ["running"])
        self.assertIsNone(running[0].get("finished_at"))
        self.assertIn("started_at", running[0])
        self.assertEqual(self.fake.requests("GET", None, host="download"), [], "a page was saved already")
        hold.release()
        worker.join(30)
        self.assertFalse(worker.is_alive(), "the run did not end")
        self.assertEqual(result.get("code"), 0, self.stderr)
        final = self.summary()
        self.assertEqual(final["status"], "completed")
        self.assertEqual(final["counts"]["pages"], len(pages))


# --- --log-file / --quiet -----------------------------------------------------------------------


class LoggingTest(SmallWorkspaceTestCase):
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


if __name__ == "__main__":
    unittest.main()
