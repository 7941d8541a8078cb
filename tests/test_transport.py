"""How the client talks and shows itself: gzip, keep-alive, User-Agent, and the progress line."""

from __future__ import annotations

import gzip
import io
import os
import select
import subprocess
import sys
import time
import unittest
from pathlib import Path

import coda_backup
from fake_coda import FakeCoda
from support import TOKEN, BackupTestCase, tree_bytes

ROOT = Path(__file__).resolve().parent.parent


def small_workspace(fake: FakeCoda) -> None:
    doc = fake.add_doc("Transport Doc")
    parent = doc.add_page("Parent", content="# Parent\n\nText 🚀\n")
    for index in range(6):
        doc.add_page(f"Child {index}", parent=parent)
    table = doc.add_table("Numbers", columns=["Name", {"name": "N", "type": "number"}], parent_page=parent)
    for index in range(30):
        table.add_row({"Name": f"row {index}", "N": index})


class GzipTest(BackupTestCase):
    def test_gzip_bodies_are_decoded_and_the_backup_is_identical(self) -> None:
        small_workspace(self.fake)
        self.assertEqual(self.run_backup("--max-retries", "0"), 0, self.stderr)
        plain = tree_bytes(self.latest())

        zipped = FakeCoda(token=TOKEN, seed=7)  # same seed: same ids, same data
        zipped.gzip = True
        zipped.start()
        self.addCleanup(zipped.stop)
        small_workspace(zipped)
        self.fake = zipped
        self.assertEqual(self.run_backup("--max-retries", "0", output=self.out.parent / "gz"), 0, self.stderr)
        latest = coda_backup.read_latest(self.out.parent / "gz")
        assert latest is not None
        content = (".csv", ".md")  # JSON metadata holds hrefs with each fake's port
        gzipped = {path: data for path, data in tree_bytes(latest).items() if path.endswith(content)}
        self.assertEqual(gzipped, {path: data for path, data in plain.items() if path.endswith(content)})
        self.assertEqual(len(gzipped), 8)
        requests = zipped.requests(host=None)
        self.assertTrue(requests)
        self.assertTrue(all("gzip" in r.headers.get("accept-encoding", "") for r in requests))

    def test_a_gzip_body_is_decoded_as_the_gzip_module_would(self) -> None:
        one, two = gzip.compress(b"one "), gzip.compress(b"two")
        cases = [
            ("empty", b"", b""),
            ("two members", one + two, b"one two"),
            ("zero padding after the last member (gzip.decompress skips it)", one + two + b"\0" * 7, b"one two"),
        ]
        for case, body, expected in cases:
            with self.subTest(case):
                self.assertEqual(gzip.decompress(body), expected)
                self.assertEqual(coda_backup.gunzip(body, 200, "u"), expected)
        for case, body in (("cut", one[:-3]), ("garbage after a member", one + b"junk")):
            with self.subTest(case), self.assertRaisesRegex(coda_backup._Transient, "corrupt gzip body"):
                coda_backup.gunzip(body, 200, "u")


class ConnectionTest(BackupTestCase):
    def test_requests_reuse_kept_alive_connections(self) -> None:
        small_workspace(self.fake)
        self.assertEqual(self.run_backup("--concurrency", "2", "--no-extras"), 0, self.stderr)
        api = self.fake.requests()
        ports = {record.client_port for record in api}
        self.assertGreater(len(api), 20)
        # every thread that sends requests keeps one persistent connection: two pool workers, the
        # export workers and two doc listers (at most --concurrency of them)
        threads = 2 + coda_backup.EXPORT_WORKERS + min(coda_backup.DOC_LISTERS, 2)
        self.assertLessEqual(len(ports), threads, f"{len(api)} requests over {len(ports)} connections")
        self.assertGreater(len(api), 2 * len(ports), "hardly any connection was used twice")

    def test_user_agent_names_the_tool_and_version(self) -> None:
        small_workspace(self.fake)
        self.assertEqual(self.run_backup(), 0, self.stderr)
        agents = {record.headers.get("user-agent") for record in self.fake.requests(host=None)}
        self.assertEqual(len(agents), 1)
        agent = agents.pop() or ""
        self.assertTrue(agent.startswith(f"coda-backup/{coda_backup.__version__}"), agent)


class IdleConnectionTest(BackupTestCase):
    def test_a_connection_the_server_closed_while_idle_is_replaced_before_use(self) -> None:
        self.fake.add_doc("Idle Doc").add_page("Only Page")
        self.fake.idle_timeout = 0.2
        self.fake.export_delay = 0.25
        # --max-retries 0: a closed connection counted as an attempt would fail the run
        code = self.run_backup("--max-retries", "0", "--concurrency", "1", "--no-extras", "--poll-interval", "0.5")
        self.assertEqual(code, 0, self.stderr)
        self.assertEqual(self.summary()["requests"]["retries"], 0)
        post, = self.fake.requests("POST", r"/export$")
        poll, = self.fake.requests("GET", r"/export/")
        self.assertNotEqual(post.client_port, poll.client_port, "the idle connection was really closed")


class StatusLineTest(unittest.TestCase):
    def test_log_lines_scroll_above_the_status(self) -> None:
        stream = io.StringIO()
        line = coda_backup.StatusLine(stream)
        line.show("docs 1 | objects 2/5")
        line.write("a log line\n")
        self.assertEqual(stream.getvalue(),
                         "\r\x1b[Kdocs 1 | objects 2/5" + "\r\x1b[Ka log line\n" + "docs 1 | objects 2/5")

    def test_progress_text_counts_and_eta(self) -> None:
        recorder, stats = coda_backup.RunRecorder(), coda_backup.RequestStats()
        monitor = coda_backup.Monitor(lambda: None, recorder, stats, None)
        for _ in range(4):
            recorder.queue()
        recorder.settle()
        recorder.count("docs")
        recorder.count("rows", 1234)
        stats.count_request("read")
        text = monitor.progress_text()
        for part in ("docs 1", "objects 1/4", "rows 1,234", "429s 0", "ETA "):
            self.assertIn(part, text)
        self.assertNotIn("ETA ?", text)


class NoTerminalTest(BackupTestCase):
    def test_no_progress_line_without_a_terminal(self) -> None:
        small_workspace(self.fake)
        self.fake.latency = 0.02
        # run_backup captures stderr in a StringIO, which is not a terminal
        self.assertEqual(self.run_backup("--log-level", "INFO"), 0, self.stderr)
        self.assertIn(" INFO ", self.stderr)
        self.assertNotIn("\r", self.stderr)
        self.assertNotIn("\x1b[K", self.stderr)


@unittest.skipUnless(os.name == "posix", "needs a pseudo-terminal")
class TerminalProgressTest(BackupTestCase):
    def test_progress_line_on_a_terminal(self) -> None:
        import pty

        small_workspace(self.fake)
        # The line is drawn every Monitor.DRAW_EVERY seconds: the fake holds one page export until
        # the test has seen the line, so the run lasts long enough however fast or slow the machine.
        hold = self.fake.hold(r"/export$", "POST")
        self.addCleanup(hold.release)
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        env = dict(os.environ, CODA_API_TOKEN=TOKEN)
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "coda_backup.py"), "--output", str(self.out), "--api-url", self.fake.api_url,
             "--poll-interval", "0.01", "--rate-limits", "none", "--concurrency", "1", "--log-level", "WARNING"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, env=env)
        os.close(slave)
        seen = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
                if all(part in seen for part in (b"\x1b[K", b"objects ", b"req/s")):
                    hold.release()
            elif proc.poll() is not None:
                break
        hold.release()  # the line never came: let the run end so the assertions below can say so
        self.assertEqual(proc.wait(timeout=30), 0, seen[-2000:])
        text = seen.decode("utf-8", "replace")
        self.assertIn("\x1b[K", text)
        self.assertIn("objects ", text)
        self.assertIn("req/s", text)


if __name__ == "__main__":
    unittest.main()
