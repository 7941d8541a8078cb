"""Images and attachments: saved once per doc under assets/, page links rewritten, cells kept.

Pure rules (which URLs are assets, names, link rewriting, the size cap) are table-driven; one
shared run over fake_coda.build_asset_workspace carries the read-only end-to-end assertions.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List

import coda_backup
from coda_backup import (
    asset_file_name,
    asset_host_prefix,
    cell_asset_urls,
    copy_limited,
    is_asset_url,
    link_targets,
    may_follow_redirect,
    page_asset_urls,
    rewrite_links,
)
from fake_coda import build_asset_workspace
from support import FAST_FLAGS, TOKEN, BackupTestCase, read_csv, tool_dir

CODA = coda_backup.DEFAULT_ASSET_HOSTS
BLOB = "https://codahosted.io/docs/d1/blobs/bl-abc/" + "ab12" * 50


class AssetRulesTest(unittest.TestCase):
    """Which URLs are assets, where they may redirect, what they are called."""

    def test_is_asset_url(self) -> None:
        local = CODA + ("http://127.0.0.1:8080/", "https://files.example/coda/")
        cases = [
            (BLOB, CODA, True),
            ("HTTPS://CODAHOSTED.IO/docs/x", CODA, True),
            ("http://codahosted.io/docs/x", CODA, False),  # https only unless a prefix says http
            ("https://codahosted.io.evil.example/docs/x", CODA, False),
            ("https://codahosted.io@evil.example/docs/x", CODA, False),
            ("https://evil.example/https://codahosted.io/x", CODA, False),
            ("https://codahosted.io/docs/a b", CODA, False),
            ("https://coda.io/d/Doc_d1", CODA, False),
            ("http://127.0.0.1:8080/docs/x", CODA, False),
            ("http://127.0.0.1:8080/docs/x", local, True),
            ("http://127.0.0.1:8081/docs/x", local, False),
            ("https://files.example/coda/x.png", local, True),
            ("https://files.example/coda-evil/x.png", local, False),
            ("javascript:alert(1)", local, False),
        ]
        for url, prefixes, expected in cases:
            with self.subTest(url=url):
                self.assertEqual(is_asset_url(url, prefixes), expected)

    def test_asset_host_prefix(self) -> None:
        self.assertEqual(asset_host_prefix("HTTP://127.0.0.1:8080"), "http://127.0.0.1:8080/")
        self.assertEqual(asset_host_prefix("https://files.example/coda"), "https://files.example/coda/")
        for bad in ("ftp://x/", "codahosted.io", "https://x/?q=1", "https://user@x/", "https://x/#f"):
            with self.subTest(bad=bad), self.assertRaises(coda_backup.ConfigError):
                asset_host_prefix(bad)

    def test_redirects(self) -> None:
        prefixes = CODA + ("http://127.0.0.1:8080/",)
        cases = [
            ("https://cdn.example/img.png", True),
            ("http://127.0.0.1:8080/blobs/x", True),
            ("http://cdn.example/img.png", False),
            ("http://127.0.0.1:9999/blobs/x", False),
            ("file:///etc/passwd", False),
            ("https:///no-host", False),
        ]
        for url, expected in cases:
            with self.subTest(url=url):
                self.assertEqual(may_follow_redirect(url, prefixes), expected)

    def test_file_names(self) -> None:
        digest = hashlib.sha256(BLOB.encode()).hexdigest()
        cases = [
            (BLOB, "image/png", digest + ".png"),
            (BLOB, "image/jpeg; charset=binary", digest + ".jpg"),
            (BLOB, "application/x-unknown", digest + ".bin"),
            (BLOB, "", digest + ".bin"),
            ("https://codahosted.io/files/Report.PDF", "application/octet-stream", None),
            ("https://codahosted.io/../../etc/passwd", "text/plain", None),
            ("https://codahosted.io/x/evil.exe", "application/octet-stream", None),
            ("https://codahosted.io/x/CON.txt", "text/plain", None),
        ]
        for url, content_type, expected in cases:
            with self.subTest(url=url, content_type=content_type):
                name = asset_file_name(url, content_type)
                self.assertEqual(name, asset_file_name(url, content_type), "stable")
                self.assertRegex(name, r"^[0-9a-f]{64}\.[a-z0-9]{2,5}$")
                self.assertTrue(name.startswith(hashlib.sha256(url.encode()).hexdigest()))
                if expected is not None:
                    self.assertEqual(name, expected)
        self.assertTrue(asset_file_name("https://codahosted.io/files/Report.PDF", "").endswith(".pdf"))
        self.assertTrue(asset_file_name("https://codahosted.io/x/evil.exe", "").endswith(".bin"))
        self.assertNotEqual(asset_file_name(BLOB, "image/png"), asset_file_name(BLOB + "0", "image/png"))


class PageLinksTest(unittest.TestCase):
    """Finding asset links in exported pages and pointing them at the saved files."""

    def test_found_and_rewritten(self) -> None:
        other = BLOB[:-1] + "f"
        longer = BLOB + "/more"
        cases = [
            ("markdown", f"![a [b] c]({BLOB})", [BLOB], "![a [b] c](../assets/p.png)"),
            ("markdown", f'![x]({BLOB} "Title") and [f.pdf](<{other}>)', [BLOB, other],
             '![x](../assets/p.png "Title") and [f.pdf](<../assets/o.pdf>)'),
            ("markdown", f"[site](https://example.com/) [x]({longer}) [y]({BLOB})", [longer, BLOB],
             f"[site](https://example.com/) [x]({longer}) [y](../assets/p.png)"),
            ("markdown", f'text <img src="{BLOB}"> {BLOB}', [BLOB], f'text <img src="../assets/p.png"> {BLOB}'),
            ("html", f"<img src=\"{BLOB}\"><a href='{other}'>f</a><img src={BLOB}>", [BLOB, other],
             "<img src=\"../assets/p.png\"><a href='../assets/o.pdf'>f</a><img src=../assets/p.png>"),
            ("html", f'<a href="{BLOB}?a=1&amp;b=2">x</a>', [f"{BLOB}?a=1&b=2"], f'<a href="{BLOB}?a=1&amp;b=2">x</a>'),
            ("html", f"<p>[x]({BLOB})</p>", [], f"<p>[x]({BLOB})</p>"),
        ]
        paths = {BLOB: "../assets/p.png", other: "../assets/o.pdf"}
        for role, text, urls, rewritten in cases:
            with self.subTest(role=role, text=text):
                self.assertEqual(page_asset_urls(text, role, CODA), urls)
                self.assertEqual(rewrite_links(text, role, paths), rewritten)
        escaped = f'<a href="{BLOB}?a=1&amp;b=2">'
        self.assertEqual([url for _, _, url, _ in link_targets(escaped, "html")], [f"{BLOB}?a=1&b=2"])
        self.assertEqual(rewrite_links(escaped, "html", {f"{BLOB}?a=1&b=2": "a&b.png"}), '<a href="a&amp;b.png">')

    def test_cells(self) -> None:
        cases: List[Any] = [
            (BLOB, [BLOB]),
            (f"  {BLOB} ", [BLOB]),
            ([BLOB, "https://example.com/x.png", BLOB + "1"], [BLOB, BLOB + "1"]),
            ({"@type": "ImageObject", "url": BLOB, "status": "live"}, [BLOB]),
            ({"@type": "ImageObject", "status": "deleted"}, []),
            ([{"url": BLOB}, [BLOB + "2"]], [BLOB, BLOB + "2"]),
            (None, []), ([], []), (7, []), ("", []),
        ]
        for value, expected in cases:
            with self.subTest(value=value):
                self.assertEqual(list(cell_asset_urls(value, CODA)), expected)

    def test_size_cap_while_streaming(self) -> None:
        data = b"x" * 100_001
        for limit, fits in ((100_001, True), (100_000, False)):
            with self.subTest(limit=limit):
                sink = io.BytesIO()
                if fits:
                    self.assertEqual(copy_limited(io.BytesIO(data).read, sink, limit),
                                     (len(data), hashlib.sha256(data).hexdigest()))
                else:
                    with self.assertRaises(coda_backup.AssetTooLarge):
                        copy_limited(io.BytesIO(data).read, sink, limit)
                    self.assertLessEqual(len(sink.getvalue()), limit)

    def test_bad_flags_are_usage_errors(self) -> None:
        for flags in (["--asset-host", "ftp://x/"], ["--max-asset-mb", "0"]):
            with self.subTest(flags=flags), contextlib.redirect_stderr(io.StringIO()) as stderr:
                self.assertEqual(coda_backup.main(["--output", "/nonexistent-never-created", *flags]), 2)
                self.assertEqual(len(stderr.getvalue().splitlines()), 1, stderr.getvalue())


class AssetBackupTest(BackupTestCase):
    """End to end against the fake's asset host."""

    def asset_flags(self) -> List[str]:
        return ["--asset-host", self.fake.assets_url, "--max-asset-mb", "1", "--page-format", "both"]

    def records(self, snapshot: Path) -> Dict[str, Dict[str, Any]]:
        """Every asset record in the manifest by URL, and the object ids that list it."""
        found: Dict[str, Dict[str, Any]] = {}
        for doc in self.manifest(snapshot)["docs"]:
            for child in doc["pages"] + doc["tables"]:
                for record in child.get("assets", []):
                    found.setdefault(record["url"], dict(record, owners=[]))["owners"].append(child["id"])
        return found

    def page_links(self, snapshot: Path) -> Dict[Path, List[str]]:
        return {path: [url for _, _, url, _ in link_targets(path.read_text(encoding="utf-8"),
                                                            "html" if path.suffix == ".html" else "markdown")]
                for path in (snapshot / "docs").rglob("*") if path.suffix in (".md", ".html")}

    def test_sample_run(self) -> None:
        data = build_asset_workspace(self.fake)
        urls, content = data["urls"], data["content"]
        gallery, details, table = data["gallery"], data["details"], data["files"]
        code = self.run_backup(*self.asset_flags())
        snapshot = self.latest()
        summary = self.summary()
        records = self.records(snapshot)
        assets_dir = self.doc_dir(data["doc"]) / "assets"

        with self.subTest("a 500 every time is one asset failure naming the page and the URL; exit 1"):
            self.assertEqual(code, 1, self.stderr)
            self.assertEqual([(f["kind"], f["id"], f["name"]) for f in summary["failures"]],
                             [("asset", details.id, "Details")])
            self.assertIn(urls["broken"], summary["failures"][0]["error"])
            self.assertEqual({page["status"] for doc in self.manifest()["docs"] for page in doc["pages"]}, {"ok"})
        with self.subTest("404 and oversize are skipped, never written"):
            skipped = sorted((s["url"], s["kind"], s["id"]) for s in summary["skipped"])
            self.assertEqual(skipped, sorted((urls[key], "asset", details.id)
                                             for key in ("gone", "huge", "huge_stream")))
            self.assertEqual(sorted(p.name for p in assets_dir.iterdir()),
                             sorted(PurePosixPath(r["path"]).name for r in records.values()), "no partial file")
        with self.subTest("every saved asset byte for byte, once per doc"):
            expected = {urls[key]: content[key] for key in ("photo", "spec", "diagram", "notes", "sheet")}
            expected[urls["moved"]] = content["target"]  # the redirect, saved under the URL the page uses
            self.assertEqual(set(records), set(expected))
            for url, record in records.items():
                saved = (snapshot / record["path"]).read_bytes()
                self.assertEqual(saved, expected[url], url)
                self.assertEqual((record["size"], record["sha256"]), (len(saved), hashlib.sha256(saved).hexdigest()))
                self.assertEqual(PurePosixPath(record["path"]).parent.as_posix(),
                                 assets_dir.relative_to(snapshot).as_posix())
            self.assertEqual(sorted(records[urls["photo"]]["owners"]), sorted([gallery.id, details.id, table.id]))
            self.assertTrue(records[urls["sheet"]]["path"].endswith(".bin"), "unknown type")
            self.assertEqual((summary["counts"]["assets"], summary["counts"]["asset_bytes"]),
                             (len(expected), sum(map(len, expected.values()))))
        links = self.page_links(snapshot)
        with self.subTest("every rewritten link resolves to its file; others keep their URL"):
            kept = {urls[key] for key in ("gone", "broken", "huge", "huge_stream")} | {"https://example.com/elsewhere.png"}
            for page, targets in links.items():
                for target in targets:
                    if target.startswith("http"):
                        self.assertIn(target, kept, f"{page.name} still links to a saved asset")
                    else:
                        self.assertTrue((page.parent / target).resolve().is_file(), f"{page.name}: {target}")
                        self.assertEqual((page.parent / target).resolve().parent, assets_dir.resolve())
        with self.subTest("Markdown drops the page-level attachment, HTML keeps it"):
            gallery_files = {p.suffix: p for p in links if p.name.startswith("Gallery__")}
            notes = PurePosixPath(records[urls["notes"]]["path"]).name
            self.assertNotIn(notes, gallery_files[".md"].read_text(encoding="utf-8"))
            self.assertIn(f"../assets/{notes}", gallery_files[".html"].read_text(encoding="utf-8"))
        with self.subTest("the CSV keeps the original URLs"):
            rows = read_csv(self.find_one(snapshot, "*Files__*.csv"))
            self.assertEqual(rows[1][-2:], [urls["photo"], f'["{urls["spec"]}","{urls["notes"]}"]'])
            self.assertIn(urls["diagram"], rows[2][-2])
            self.assertEqual(rows[3][-2:], ["", "[]"])
        with self.subTest("no credential ever reaches the asset host"):
            seen = self.fake.requests(host="assets")
            self.assertGreater(len(seen), 8)
            for record in seen:
                self.assertNotIn("authorization", record.headers)
                self.assertNotIn("cookie", record.headers)
                self.assertNotIn(TOKEN, repr(record.headers) + record.target)
        with self.subTest("--verify checks asset files"):
            self.assertEqual(self.run_main(["--verify", "--output", str(self.out)]), 0, self.stdout)
            photo = snapshot / records[urls["photo"]]["path"]
            os.chmod(photo, 0o600)
            photo.write_bytes(b"tampered")
            self.assertEqual(self.run_main(["--verify", "--output", str(self.out)]), 1)
            self.assertIn(f"altered: {records[urls['photo']]['path']}", self.stdout)

    def test_incremental_rerun_downloads_no_asset(self) -> None:
        data = build_asset_workspace(self.fake, faulty=False)
        self.assertEqual(self.run_backup(*self.asset_flags()), 0, self.stderr)
        first = self.latest()
        downloaded = len(self.fake.requests(host="assets"))
        self.assertEqual(downloaded, 5)
        self.fake.clear_log()
        self.assertEqual(self.run_backup(*self.asset_flags(), "--incremental"), 0, self.stderr)
        second = self.latest()
        self.assertEqual(self.fake.requests(host="assets"), [], "unchanged objects bring their assets along")
        self.assertEqual(self.records(second), self.records(first))
        gallery = data["gallery"]
        gallery.content = gallery.content.replace("The spec", "The final spec")
        gallery.html = gallery.html.replace("The spec", "The final spec")
        gallery.touch()
        self.assertEqual(self.run_backup(*self.asset_flags(), "--incremental"), 0, self.stderr)
        third = self.latest()
        self.assertEqual(len(self.fake.requests("POST", rf"/pages/{gallery.id}/export$")), 2, "re-exported")
        self.assertEqual(self.fake.requests(host="assets"), [], "its saved URLs are linked, not downloaded")
        for snapshot in (second, third):
            self.assertEqual(self.summary(snapshot)["counts"]["assets"], 5)
            for page, targets in self.page_links(snapshot).items():
                for target in targets:
                    if not target.startswith("http"):
                        self.assertTrue((page.parent / target).is_file(), f"{page}: {target}")
            for record in self.records(snapshot).values():
                self.assertEqual(os.stat(snapshot / record["path"]).st_ino,
                                 os.stat(first / record["path"]).st_ino, "hard-linked")
        self.assertIn("The final spec", self.find_one(third, "Gallery__*.md").read_text(encoding="utf-8"))

    def test_no_assets_then_assets(self) -> None:
        data = build_asset_workspace(self.fake, faulty=False)
        self.assertEqual(self.run_backup("--asset-host", self.fake.assets_url, "--no-assets"), 0, self.stderr)
        self.assertEqual(self.fake.requests(host="assets"), [])
        self.assertFalse((self.doc_dir(data["doc"]) / "assets").exists())
        page = self.find_one(self.latest(), "Gallery__*.md").read_text(encoding="utf-8")
        self.assertIn(data["urls"]["photo"], page)
        self.assertEqual(self.records(self.latest()), {})
        self.assertEqual(self.summary()["skipped"], [])
        self.fake.clear_log()
        self.assertEqual(self.run_backup("--asset-host", self.fake.assets_url, "--incremental"), 0, self.stderr)
        exported = {r.path.split("/")[4] for r in self.fake.requests("POST", r"/export$")}
        self.assertEqual(exported, {data["gallery"].id, data["details"].id}, "pages without assets are linked")
        read = {r.path.split("/")[4] for r in self.fake.requests("GET", r"/rows$")}
        self.assertEqual(read, {data["files"].id}, "a table without file columns is linked")
        self.assertEqual(len(self.records(self.latest())), 5)


# A real full disk: a 1 MiB tmpfs in a private mount namespace (as in test_bad_nights), where the
# page fits and its 2 MB attachment does not.
FULL_DISK_NIGHT = r"""
import contextlib, io, json, os, subprocess, sys
sys.path.insert(0, os.environ["TOOL_DIR"])
import coda_backup
mnt = os.environ["MNT"]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], check=True)
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = coda_backup.main(["--output", os.path.join(mnt, "b"), "--api-url", os.environ["URL"], "--no-extras",
                             "--asset-host", os.environ["ASSETS"], *os.environ["FAST"].split()])
last = json.loads(open(os.path.join(mnt, "b", "last-run.json")).read())
print(json.dumps({"code": code, "last": last, "stderr": err.getvalue()}))
"""


class AssetDiskTest(BackupTestCase):
    def test_a_full_disk_while_saving_an_asset_stops_the_run(self) -> None:
        doc = self.fake.add_doc("Doc")
        url = self.fake.add_asset(doc, b"\0" * 2_000_000, "application/zip")
        doc.add_page("Home", content=f"# Home\n\n[big.zip]({url})\n")
        mnt = Path(tempfile.mkdtemp(prefix="coda-asset-disk-"))
        self.addCleanup(shutil.rmtree, mnt, True)
        env = dict(os.environ, MNT=str(mnt), TOOL_DIR=str(tool_dir()), URL=self.fake.api_url,
                   ASSETS=self.fake.assets_url, FAST=" ".join(FAST_FLAGS), CODA_API_TOKEN=TOKEN)
        done = subprocess.run(["unshare", "-rm", sys.executable, "-c", FULL_DISK_NIGHT], env=env,
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        night = json.loads(done.stdout)
        self.assertEqual((night["code"], night["last"]["status"]), (3, "failed"), night["stderr"])
        self.assertIn("ENOSPC", night["last"]["error"])
        self.assertEqual(night["last"]["counts"]["failures"], 0, "not an asset failure: the run stopped")


if __name__ == "__main__":
    unittest.main()
