"""--concurrency bounds the requests in flight, runs them in parallel, and pacing spaces each category.

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

import re
import threading
import time
from typing import Any, List

from fake_coda import FakeCoda
from support import TOKEN, BackupTestCase, coda_backup

LATENCY = 0.02  # long enough that requests sent together overlap at the fake


def add_doc(fake: FakeCoda, name: str, pages: int, tables: int) -> Any:
    """An owned doc with `pages` top-level pages and `tables` three-row tables."""
    doc = fake.add_doc(name)
    page_list: List[Any] = [doc.add_page(f"{name} page {i:02d}") for i in range(pages)]
    for i in range(tables):
        doc.add_table(f"{name} table {i}", columns=["Name", "Value"], parent_page=page_list[i % pages],
                      rows=[{"Name": f"r{j}", "Value": str(j)} for j in range(3)])
    return doc


def first_waits_for_a_second(fake: FakeCoda, path: str = r"/export$|/rows$") -> None:
    """The first export POST or rows read is not answered before a second one has arrived.

    So a client that sends two at once is seen doing it however its threads are scheduled (no
    race against the latency); one that cannot leaves the first waiting 10 s and is seen with one
    request in flight.
    """
    arrived, lock, seen = threading.Event(), threading.Lock(), [0]

    def hook(request: Any) -> None:
        if not re.search(path, request.path):
            return
        with lock:
            seen[0] += 1
            first = seen[0] == 1
        if first:
            arrived.wait(10)
        else:
            arrived.set()

    fake.before_api.append(hook)


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
        # Requests go one after another here, so the latency is paid serially: a shorter one still
        # overlaps any two that were sent together (the export threads, workers and listers start
        # at once).
        self.fake.latency = LATENCY / 2
        self.run_with(1, pages=2, tables=1)
        self.assertEqual(self.fake.max_in_flight, 1)

    def test_concurrency_3_never_has_more_than_3_in_flight(self) -> None:
        first_waits_for_a_second(self.fake)
        self.run_with(3, pages=6, tables=3)
        self.assertLessEqual(self.fake.max_in_flight, 3)
        self.assertGreaterEqual(self.fake.max_in_flight, 2, "no parallelism at all with --concurrency 3")

    def test_concurrency_4_really_runs_requests_in_parallel(self) -> None:
        first_waits_for_a_second(self.fake)
        self.run_with(4, pages=4, tables=2)
        self.assertGreater(self.fake.max_in_flight, 1)
        self.assertLessEqual(self.fake.max_in_flight, 4)


class PacingTest(BackupTestCase):
    def tearDown(self) -> None:
        self.assertEqual(self.fake.errors, [], "the fake hit an internal error")

    def test_client_paces_each_category_to_its_rate_limit(self) -> None:
        # --rate-limits 5 requests per 0.25 s per category. The run makes about 20 reads and 8
        # export POSTs, far more than one window allows. What pacing guarantees whatever the
        # machine's load: the client hands out start slots that a token bucket (a burst of 5, then
        # 5 per window) allows, and nothing is sent before its slot, so the n-th read the fake sees
        # comes at least (n - 5) / 5 windows after the run began. (A sliding window is stricter; the
        # client paces to it until the fake accepts the probe sent half a window early. The
        # fake does not limit here: whether a loaded machine, between the client's send and the
        # fake's read, loses more than the client's small margin on a 0.25 s window and so puts a
        # sixth request into one window at the fake is timing, not pacing. The window maths with
        # a stepped clock is in test_pacing; 429s ridden through and counted are in
        # test_resilience.)
        window, limit = 0.25, 5
        add_doc(self.fake, "Paced", pages=8, tables=3)
        began = time.monotonic()
        code = self.run_backup("--rate-limits", f"read={limit}/{window},write={limit}/{window},"
                               f"list_docs={limit}/{window}", "--no-extras")

        self.assertEqual(code, 0, self.stderr)
        api_requests = self.fake.requests()
        self.assertGreaterEqual(len(api_requests), 25)
        categories = {
            "read": [r for r in api_requests if r.method == "GET" and r.path != "/docs"],
            "write": [r for r in api_requests if r.method == "POST"],
        }
        self.assertGreater(len(categories["read"]), 3 * limit)
        for category, records in categories.items():
            with self.subTest(category=category):
                arrivals = sorted(record.started - began for record in records)
                for n, arrival in enumerate(arrivals, start=1):
                    self.assertGreaterEqual(arrival, max(0, n - limit) * window / limit,
                                            f"{category} request {n} of {len(arrivals)} came too early")
        self.assertEqual(self.summary()["requests"]["rate_limited"], 0)

    def test_the_probe_tells_the_fakes_sliding_window_from_its_token_bucket(self) -> None:
        # Every paced request's answer reaches its limiter: the fake counting a sliding window
        # refuses the probe (one 429, which does not halve the rate), counting a token bucket it
        # accepts it, and the client paces as a bucket from then on.
        for model, refused in (("window", 1), ("bucket", 0)):
            with self.subTest(model=model):
                self.fake.rate_limits = {"read": (4, 1.0)}
                self.fake.rate_model = model
                settings = coda_backup.ClientSettings(api_url=self.fake.api_url, retry_delay=0.01,
                                                      rate_limits={"read": (4, 1.0)})
                client = coda_backup.HttpClient(settings, TOKEN, threading.Event())
                self.addCleanup(client.close)
                for _ in range(6):  # a full window, the probe, one more
                    client.get_json("/whoami")
                limiter = client._limiters["read"]  # what it learnt is not visible otherwise
                self.assertEqual((limiter.model, limiter.allowed), (model, 4.0))
                self.assertEqual(client.stats.rate_limited, refused)

    def test_a_probe_its_deadline_kept_from_going_out_is_given_back(self) -> None:
        # The probe's wait for its slot outlasts its request's deadline, so it is never sent: the
        # thread's next request gives its slot back (it proved nothing), so another request can
        # probe, and the fake (limiting nothing, as a bucket with room would) accepts it.
        settings = coda_backup.ClientSettings(api_url=self.fake.api_url, rate_limits={"read": (10, 0.6)})
        client = coda_backup.HttpClient(settings, TOKEN, threading.Event())
        self.addCleanup(client.close)
        for _ in range(10):  # a full window: the next slot is the probe, about half a window on
            client.get_json("/whoami")
        with self.assertRaises(coda_backup.DeadlineReached):
            client.get_json("/whoami", deadline=time.monotonic() + 0.01)
        client.get_json("/whoami")
        self.assertEqual(client._limiters["read"].model, "bucket")  # what it learnt is not visible otherwise
        self.assertEqual(len(self.fake.requests()), 11)
