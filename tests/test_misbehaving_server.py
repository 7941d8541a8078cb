"""A server that misbehaves forever: endless page tokens, a download host that never answers,
the same id on two listing pages. Each run must end, soon, with the damage recorded.

Where the code before these fixes would loop for hours, a hook turns the fault off after a
number of requests no fixed run comes near, so such a test fails instead of hanging.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fake_coda import FakeCoda
from support import TOKEN, BackupTestCase, closed_port, coda_backup

RUNAWAY = 60  # requests to one endpoint after which the hook turns the fault off


def stop_after(fake: FakeCoda, switch: str, path_end: str, most: int = RUNAWAY) -> None:
    """Turn `fake.<switch>` off once `most` requests ending in `path_end` came."""
    def hook(request: Any, _reply: Any) -> None:
        if len(fake.requests("GET", path_end)) >= most:
            setattr(fake, switch, None)

    fake.after_api.append(hook)


class MisbehavingServerTest(BackupTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.alpha = self.fake.add_doc("Alpha")
        self.home = self.alpha.add_page("Home")
        self.child = self.alpha.add_page("Child", parent=self.home)
        self.tasks = self.alpha.add_table("Tasks", columns=["Task"], parent_page=self.home,
                                          rows=[{"Task": f"t{i}"} for i in range(5)])
        self.view = self.alpha.add_view(self.tasks, "All Tasks", parent_page=self.child)
        self.beta = self.fake.add_doc("Beta")
        self.beta.add_page("Start")

    def failures(self) -> Any:
        return self.summary(self.snapshots()[-1])["failures"]

    def test_endless_doc_list_ends_with_a_recorded_failure(self) -> None:
        self.fake.endless_tokens = r"^/docs$"  # every page the same two docs and a fresh token
        stop_after(self.fake, "endless_tokens", r"^/docs$")
        self.assertEqual(self.run_backup("--no-extras"), 1, self.stderr)
        self.assertLessEqual(len(self.fake.requests("GET", r"^/docs$")), coda_backup.MAX_STALE_PAGES + 1)
        failure, = self.failures()
        self.assertEqual(failure["kind"], "listing")
        self.assertIn("brought nothing new", failure["error"])
        counts = self.summary(self.snapshots()[-1])["counts"]
        self.assertEqual((counts["docs"], counts["pages"]), (2, 3), "each doc once")

    def test_endless_rows_end_at_the_row_count(self) -> None:
        rows = rf"/tables/{self.tasks.id}/rows$"
        self.fake.endless_tokens = rows  # the same five rows on every page, forever
        stop_after(self.fake, "endless_tokens", rows)
        self.assertEqual(self.run_backup("--no-extras", "--no-views"), 1, self.stderr)
        bound = coda_backup.listing_bound(5)
        self.assertLessEqual(len(self.fake.requests("GET", rows)), bound // 5 + 1)
        failure, = self.failures()
        self.assertEqual((failure["kind"], failure["id"]), ("table", self.tasks.id))
        self.assertIn(f"more than {bound} items where the API counts 5", failure["error"])

    def test_download_host_that_never_answers_holds_a_page_no_longer_than_the_export_timeout(self) -> None:
        self.fake.download_stall = 60.0  # cut short when the fake stops
        code = self.run_backup("--no-extras", "--doc", "Beta", "--timeout", "2", "--export-timeout", "0.8")
        self.assertEqual(code, 1, self.stderr)
        failure, = self.failures()
        self.assertEqual(failure["kind"], "page")
        self.assertIn("did not finish within 0.8s", failure["error"])
        self.assertEqual(len(self.fake.requests(host="download")), 1, "no retry after the deadline")

    def test_an_answer_that_trickles_is_cut_at_the_timeout(self) -> None:
        # A piece every 50 ms never trips a read timeout; the rows page would take about 2 s whole.
        rows = rf"/tables/{self.tasks.id}/rows$"
        self.fake.add_fault(rows, kind="trickle", times=None)
        code = self.run_backup("--no-extras", "--no-views", "--doc", "Alpha", "--timeout", "0.5",
                               "--max-retries", "0")
        self.assertEqual(code, 1, self.stderr)
        failure, = self.failures()
        self.assertEqual((failure["kind"], failure["id"]), ("table", self.tasks.id))
        self.assertIn("did not arrive whole in time", failure["error"])

    def test_a_download_that_trickles_ends_at_the_export_timeout(self) -> None:
        self.beta.add_page("Long", content="word " * 800)  # 4 KB: 64 pieces, about 3 s
        self.fake.add_fault(r"/blobs/", kind="trickle", times=None, host="download")
        code = self.run_backup("--no-extras", "--doc", "Beta", "--timeout", "2", "--export-timeout", "0.6")
        self.assertEqual(code, 1, self.stderr)
        errors = {failure["name"]: failure["error"] for failure in self.failures()}
        self.assertIn("did not finish within 0.6s", errors.get("Long", ""), errors)

    def test_an_answer_past_the_most_an_answer_may_hold_is_refused_not_retried(self) -> None:
        # One that never ends (no Content-Length), then a small gzip body that decodes to 160 MiB.
        columns = rf"/tables/{self.tasks.id}/columns$"
        self.fake.add_fault(columns, kind="endless", times=None)
        self.assertEqual(self.run_backup("--no-extras", "--no-views", "--doc", "Alpha", "--max-retries", "2"), 1,
                         self.stderr)
        failure, = self.failures()
        self.assertEqual((failure["kind"], failure["id"]), ("table", self.tasks.id))
        self.assertIn("answer larger than 128 MiB (", failure["error"])
        self.assertEqual(len(self.fake.requests("GET", columns)), 1, "a retry would bring it again")
        self.assertEqual(self.summary(self.snapshots()[-1])["counts"]["pages"], 2, "Home and Child saved")

        self.fake.add_fault(r"/blobs/", kind="gzip-bomb", times=None, host="download")
        self.assertEqual(self.run_backup("--no-extras", "--doc", "Beta"), 1, self.stderr)
        failure, = self.failures()
        self.assertEqual((failure["kind"], failure["name"]), ("page", "Start"))
        self.assertIn("answer larger than 128 MiB once decoded", failure["error"])

    def test_an_id_on_two_listing_pages_is_kept_once(self) -> None:
        self.fake.max_limit = 1  # one item a page, and each page after the first repeats the one before
        self.fake.duplicate_ids = r"^/docs$|/pages$|/tables$"
        self.assertEqual(self.run_backup("--no-extras"), 0, self.stderr)
        snapshot = self.latest()
        counts = self.summary(snapshot)["counts"]
        self.assertEqual((counts["docs"], counts["pages"], counts["tables"], counts["views"]), (2, 3, 1, 1))
        self.assertEqual([p.name for p in snapshot.rglob("*__2*")], [], "no object saved twice")
        self.assertEqual(len(self.manifest(snapshot)["docs"]), 2)
        warnings = self.summary(snapshot)["warnings"]
        self.assertEqual(len([w for w in warnings if "came more than once in the listing" in w]), 3, warnings)


class WholeAnswerDeadlineTest(BackupTestCase):
    """--timeout bounds one exchange, from the moment its request may go out to the last byte of
    its answer: no more (a wait for a free in-flight place is not the server being slow), and no
    less (an answer whose connection is to close once it ends is not read against a socket whose
    timeout nobody sets any more)."""

    def client(self, **settings: Any) -> Any:
        client = coda_backup.HttpClient(coda_backup.ClientSettings(api_url=self.fake.api_url, max_retries=0,
                                                                   **settings), TOKEN, threading.Event())
        self.addCleanup(client.close)
        return client

    def test_an_answer_that_trickles_until_its_connection_closes_ends_at_the_timeout(self) -> None:
        doc = self.fake.add_doc("Alpha")
        for index in range(10):
            doc.add_page(f"Page number {index}")  # a listing of some 20 pieces
        self.fake.trickle_interval = 0.45  # each piece well within a read timeout of 0.5 s
        self.fake.add_fault(rf"/docs/{doc.id}/pages$", kind="trickle-close", times=None)
        client = self.client(timeout=0.5)
        began = time.monotonic()
        with self.assertRaisesRegex(coda_backup.ApiError, "did not arrive whole in time"):
            client.get_json(f"/docs/{doc.id}/pages")
        self.assertLess(time.monotonic() - began, 0.8, "the third piece (at 0.9 s) was waited for")

    def test_a_wait_for_a_place_in_flight_is_not_part_of_the_timeout(self) -> None:
        self.fake.latency = 0.3
        client = self.client(timeout=0.5, max_in_flight=1)
        errors = []

        def whoami() -> None:
            try:
                client.get_json("/whoami")
            except coda_backup.ApiError as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=whoami) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [], "each answer took 0.3 s of its 0.5 s")
        self.assertEqual(client.breaker.unanswered(), 0)


class AnswerOrNoAnswerTest(BackupTestCase):
    """ApiError with status 0 means no HTTP answer came, and only that feeds the breaker that ends a
    run as `api_lost`; an answer in the wrong shape, a request our own rules refuse and a deadline
    already past are other errors, none of them a sign of a lost API."""

    def client(self, api_url: str) -> Any:
        settings = coda_backup.ClientSettings(api_url=api_url, max_retries=0, retry_delay=0.001, timeout=2.0)
        client = coda_backup.HttpClient(settings, TOKEN, threading.Event())
        self.addCleanup(client.close)
        return client

    def test_only_no_answer_is_status_0_and_counts_toward_a_lost_api(self) -> None:
        doc = self.fake.add_doc("Alpha")
        pages = [doc.add_page("One"), doc.add_page("Two")]
        gone = f"http://127.0.0.1:{closed_port()}/apis/v1"
        self.fake.add_fault(r"^/whoami$", status=200, body=[1, 2], times=None)
        self.fake.add_fault(r"/tables/grid-x$", status=200, body="[]", times=None)
        self.fake.add_fault(r"/export$", method="POST", status=200, body={"status": "inProgress"}, times=None)
        self.fake.add_fault(r"/blobs/", status=302, headers={"Location": "/docs/d/blobs/loop"}, times=None,
                            host="assets")
        assets = self.fake.assets_url + "docs/d/blobs/"
        cases = [
            # (label, API base, two different requests, the error each raises)
            ("port refused", gone, lambda api: api.whoami(), lambda api: api.get_table("d", "t"),
             coda_backup.ApiError),
            ("not a JSON object", self.fake.api_url, lambda api: api.whoami(),
             lambda api: api.get_table(doc.id, "grid-x"), coda_backup.MalformedAnswer),
            ("export answer without a request id", self.fake.api_url,
             lambda api: api.start_export(doc.id, pages[0].id, "markdown"),
             lambda api: api.start_export(doc.id, pages[1].id, "markdown"), coda_backup.MalformedAnswer),
            ("unsupported scheme", self.fake.api_url, lambda api: api.download("ftp://127.0.0.1/a"),
             lambda api: api.download("file:///etc/passwd"), coda_backup.RefusedRequest),
            ("deadline already past", self.fake.api_url,
             lambda api: api.export_status(doc.id, pages[0].id, "r-1", time.monotonic() - 1),
             lambda api: api.export_status(doc.id, pages[1].id, "r-2", time.monotonic() - 1),
             coda_backup.DeadlineReached),
            ("too many redirects", self.fake.api_url,
             lambda api: api.http.get_streamed(assets + "a", lambda raw: raw.read(), lambda url: True),
             lambda api: api.http.get_streamed(assets + "b", lambda raw: raw.read(), lambda url: True),
             coda_backup.ApiError),
        ]
        for label, api_url, first, second, error in cases:
            with self.subTest(label):
                api = coda_backup.CodaApi(self.client(api_url))
                raised = []
                for call in (first, second):
                    with self.assertRaises(error) as caught:
                        call(api)
                    raised.append(caught.exception)
                no_answer = [isinstance(exc, coda_backup.ApiError) and exc.status == 0 for exc in raised]
                self.assertEqual(no_answer, [label == "port refused"] * 2, [str(exc) for exc in raised])
                self.assertEqual(api.http.breaker.unanswered(), 2 if label == "port refused" else 0)
                self.assertIsNone(api.http.halted)
        self.assertEqual(self.fake.requests("GET", r"/export/r-"), [], "a request went out after its deadline")
        with self.assertRaises(coda_backup.MalformedAnswer):  # rows come in an answer that said success
            coda_backup.csv_record({"id": "i-1", "values": [1]}, [])
