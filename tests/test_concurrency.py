"""--concurrency bounds the requests in flight, really runs them in parallel, and pacing avoids 429s.

The bound, from coda_backup.py: `back_up_docs` lists docs on a few lister threads, page exports
run on the export scheduler's threads and a pool of N workers reads the tables, so many more than N
threads may want the network at once. They all share one `HttpClient`, which holds a
`BoundedSemaphore(N)` (N = --concurrency) around every request on the wire, whichever thread sends
it, downloads included: the fake (which counts API-host requests from the moment it has read one
until its reply is ready) must never see more than N in flight. The workspaces below have two docs
so that the second doc is listed while workers are busy with the first: that is when an N + 1
would show.
"""

from __future__ import annotations

import time
from typing import Any, List

from fake_coda import FakeCoda
from support import BackupTestCase

LATENCY = 0.05  # long enough that requests sent together overlap at the fake


def add_doc(fake: FakeCoda, name: str, pages: int, tables: int) -> Any:
    """An owned doc with `pages` top-level pages and `tables` three-row tables."""
    doc = fake.add_doc(name)
    page_list: List[Any] = [doc.add_page(f"{name} page {i:02d}") for i in range(pages)]
    for i in range(tables):
        doc.add_table(f"{name} table {i}", columns=["Name", "Value"], parent_page=page_list[i % pages],
                      rows=[{"Name": f"r{j}", "Value": str(j)} for j in range(3)])
    return doc


class ConcurrencyTest(BackupTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.fake.latency = LATENCY

    def tearDown(self) -> None:
        self.assertEqual(self.fake.errors, [], "the fake hit an internal error")

    def run_with(self, concurrency: int, pages: int, tables: int) -> None:
        """Back up two docs, a big one and a small one, with --concurrency N; all must succeed."""
        add_doc(self.fake, "Big", pages, tables)
        add_doc(self.fake, "Small", 2, 1)
        code = self.run_backup("--concurrency", str(concurrency), "--no-extras")
        self.assertEqual(code, 0, self.stderr)
        counts = self.summary()["counts"]
        self.assertEqual((counts["pages"], counts["tables"]), (pages + 2, tables + 1))
        self.assertEqual(len(self.fake.requests("POST", r"/export$")), pages + 2)

    def test_concurrency_1_sends_one_request_at_a_time(self) -> None:
        self.run_with(1, pages=2, tables=1)
        self.assertEqual(self.fake.max_in_flight, 1)

    def test_concurrency_3_never_has_more_than_3_in_flight(self) -> None:
        self.run_with(3, pages=6, tables=3)
        self.assertLessEqual(self.fake.max_in_flight, 3)
        self.assertGreaterEqual(self.fake.max_in_flight, 2, "no parallelism at all with --concurrency 3")

    def test_concurrency_4_really_runs_requests_in_parallel(self) -> None:
        self.run_with(4, pages=4, tables=2)
        self.assertGreater(self.fake.max_in_flight, 1)
        self.assertLessEqual(self.fake.max_in_flight, 4)


class PacingTest(BackupTestCase):
    def tearDown(self) -> None:
        self.assertEqual(self.fake.errors, [], "the fake hit an internal error")

    def test_client_paces_to_the_rate_limits_and_meets_almost_no_429s(self) -> None:
        # 5 requests per 0.5 s per category, at the fake and in the client. The run makes about
        # 30 requests (20 reads): far more than one window allows, so without pacing the fake
        # would answer 429 many times; paced, it takes about four read windows (~2 s).
        limits = {"read": (5, 0.5), "write": (5, 0.5), "list_docs": (5, 0.5)}
        self.fake.rate_limits = limits
        add_doc(self.fake, "Paced", pages=8, tables=3)
        started = time.monotonic()
        code = self.run_backup("--rate-limits", "read=5/0.5,write=5/0.5,list_docs=5/0.5", "--no-extras")
        elapsed = time.monotonic() - started

        self.assertEqual(code, 0, self.stderr)
        api_requests = self.fake.requests()
        reads = [r for r in api_requests if r.method == "GET" and r.path != "/docs"]
        self.assertGreaterEqual(len(api_requests), 25)
        self.assertGreater(len(reads), 3 * limits["read"][0])
        self.assertLessEqual(self.fake.rate_limited, 2, f"{self.fake.rate_limited} answers were 429")
        self.assertEqual(self.summary()["requests"]["rate_limited"], self.fake.rate_limited)
        self.assertLess(elapsed, 8.0, "pacing far slower than the limits allow")
