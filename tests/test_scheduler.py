"""The scheduling rules of page exports (issue 15): which step goes next when both rate budgets have
room, when one is empty and when a poll is due; how the first poll is timed; and, end to end, that
an export that is rendering holds no worker."""

from __future__ import annotations

import math
import unittest
from typing import Any

from support import BackupTestCase, Clock, coda_backup

INF = math.inf


class NextExportStepTest(unittest.TestCase):
    def test_rules(self) -> None:
        now = 50.0
        soon = coda_backup.POLL_READ_WAIT
        # (case, starts waiting, write budget delay, next poll due, read budget delay) -> (step, wait)
        cases = [
            ("both budgets have room: the start goes first", True, 0.0, now - 1.0, 0.0, ("start", 0.0)),
            ("a start waits, no poll", True, 0.0, None, 0.0, ("start", 0.0)),
            ("write budget empty, a poll is due: the poll", True, 2.0, now, 0.0, ("poll", 0.0)),
            ("nothing to start, a poll is due", False, 0.0, now - 0.1, 0.0, ("poll", 0.0)),
            ("write budget empty, the poll later: wait for the write slot", True, 0.3, now + 0.5, 0.0, ("wait", 0.3)),
            ("write budget empty, the poll sooner: wait for the poll", True, 2.0, now + 0.5, 0.0, ("wait", 0.5)),
            ("nothing to start, the poll later", False, 0.0, now + 1.5, 0.0, ("wait", 1.5)),
            ("write budget empty, no poll", True, 4.0, None, 0.0, ("wait", 4.0)),
            ("no work at all: sleep until some comes", False, 0.0, None, 0.0, ("wait", INF)),
            ("a poll is due, its read comes soon: the poll", True, 4.0, now, soon, ("poll", 0.0)),
            ("a poll is due, its read comes before the next start could", True, 4.0, now, 3.0, ("poll", 0.0)),
            ("a poll is due, the read budget spent for seconds: the worker stays free for the starts",
             True, 2.0, now, 5.0, ("wait", 2.0)),
            ("... and looks again once the poll has waited about as long as its read is away", True, 7.0, now,
             soon + 6.5, ("wait", 6.5 / 2 + soon / 2)),
            ("... sooner if it was already overdue", True, 7.0, now - 1.0, soon + 6.5,
             ("wait", 6.5 / 2 + soon / 2 - 0.5)),
            ("a poll due for longer than its read is away goes", True, 0.5, now - 3.0, 3.0, ("poll", 0.0)),
            ("nothing to start: the poll waits for its read, whatever that takes", False, 0.0, now, 5.0,
             ("poll", 0.0)),
        ]
        for case, starts, write_delay, poll, read_delay, expected in cases:
            with self.subTest(case):
                step, wait = coda_backup.next_export_step(now, starts, write_delay, poll, read_delay)
                self.assertEqual(step, expected[0])
                self.assertAlmostEqual(wait, expected[1])


    def test_a_due_poll_is_not_starved_by_a_read_budget_that_stays_spent(self) -> None:
        # Pages wait to start for minutes (the write budget, paced as a bucket: a start every
        # 0.6 s), while other workers keep the read budget booked 1.5 s ahead (e.g. read=10/6 and
        # a few table workers). The poll must go, late, not wait until no start is left: an
        # export unpolled for --export-timeout fails though it rendered long ago.
        now = due = 0.0
        write_free = 0.0
        while now < due + 120.0:
            step, wait = coda_backup.next_export_step(now, True, max(0.0, write_free - now), due, 1.5)
            if step == "poll":
                break
            if step == "start":
                write_free = now + 0.6
            else:
                self.assertGreater(wait, 0.0)
                now += wait
        self.assertLessEqual(now - due, 3.0, "the due poll never went while starts waited")

class RenderTimesTest(unittest.TestCase):
    def test_first_poll_follows_the_render_times_seen(self) -> None:
        # (samples as (found done after, by a poll due at, found rendering after), expected
        # first-poll delay)
        cases = [
            ("nothing seen yet: the first guess (--poll-interval)", [], 1.0),
            ("rendering at 1.0, done at 2.0: the midpoint", [(2.0, 2.0, 1.0)], 1.5),
            ("rendering at 1.0, done by a poll due at 2.0 that came 3 s late: as if on time",
             [(5.0, 2.0, 1.0)], 1.5),
            ("done at the first poll: a little earlier next time", [(1.5, 1.5, None)], 1.35),
            ("done at a first poll due at 1.5 that came 4 s late: no later than due", [(5.5, 1.5, None)], 1.35),
            ("the median of the recent samples", [(2.0, 2.0, 1.0), (3.0, 3.0, 2.0), (20.0, 20.0, 19.0)], 2.5),
        ]
        for case, samples, expected in cases:
            with self.subTest(case):
                render = coda_backup.RenderTimes(1.0)
                for after, due, rendering_after in samples:
                    render.done(after, due, rendering_after)
                self.assertAlmostEqual(render.expected(), expected)

    def test_a_first_poll_that_just_missed_looks_again_soon_once_if_reads_are_spare(self) -> None:
        render = coda_backup.RenderTimes(2.0)
        soon = 2.0 * coda_backup.FIRST_MISS_SHARE
        self.assertLess(soon, 2.0)
        # (first miss, read budget has room) -> seconds to the next poll
        cases = [((True, True), soon), ((True, False), 2.0), ((False, True), 2.0), ((False, False), 2.0)]
        for (first, spare), expected in cases:
            with self.subTest(first=first, reads_spare=spare):
                self.assertEqual(render.again(first, spare), expected)

    def test_only_recent_samples_count(self) -> None:
        render = coda_backup.RenderTimes(1.0)
        for _ in range(coda_backup.RENDER_SAMPLES):
            render.done(10.0, 10.0, 9.0)
        for _ in range(coda_backup.RENDER_SAMPLES):
            render.done(2.0, 2.0, 1.0)
        self.assertAlmostEqual(render.expected(), 1.5)


class BudgetDelayTest(unittest.TestCase):
    def test_delay_says_when_the_budget_has_room_and_claims_nothing(self) -> None:
        clock = Clock()
        limiter = coda_backup.RateLimiter(1, 6.0, clock)
        self.assertEqual(limiter.delay(), 0.0)
        self.assertEqual(limiter.delay(), 0.0)  # asking twice claimed nothing
        limiter.take()[1]
        window = 6.0 * coda_backup.RATE_WINDOW_MARGIN
        self.assertAlmostEqual(limiter.delay(), window)  # empty: room again one window after the first
        clock.now += 1.0
        self.assertAlmostEqual(limiter.delay(), window - 1.0)
        self.assertAlmostEqual(limiter.take()[1], window - 1.0)  # and take agrees


    def test_a_request_that_went_out_late_counts_from_when_it_went_out(self) -> None:
        # The server counts a request when it arrives, not when pacing allowed it: one that waited
        # for a connection must push the next slot back, or the margin would have to absorb the wait.
        window = 6.0 * coda_backup.RATE_WINDOW_MARGIN
        cases = [("went out on time", 0.0, window), ("went out 2 s late", 2.0, window + 2.0)]
        for case, late, expected in cases:
            with self.subTest(case):
                clock = Clock()
                limiter = coda_backup.RateLimiter(1, 6.0, clock)
                slot = limiter.take()
                self.assertEqual((slot.at, slot.wait), (clock.now, 0.0))
                limiter.started(slot, slot.at + late)
                self.assertAlmostEqual(limiter.delay(), expected)


class RenderingHoldsNoWorkerTest(BackupTestCase):
    def test_exports_render_while_the_one_worker_reads_tables(self) -> None:
        # One request in flight at a time, four exports that render until every export has been
        # started and both tables read: a worker that waited for a render would never get there,
        # and the run would end in export timeouts. No clock decides it.
        doc = self.fake.add_doc("Renders")
        pages = [doc.add_page(f"Page {number}", content=f"# Page {number}\n") for number in range(4)]
        for number in range(2):
            doc.add_table(f"Table {number}", columns=["Name"], parent_page=pages[number],
                          rows=[{"Name": "row"}])
        self.fake.export_delay = 3600.0

        def rendered_once_all_started(request: Any, reply: Any) -> None:
            rows = [record for record in self.fake.requests("GET") if record.path.endswith("/rows")]
            if len(self.fake.requests("POST")) == 4 and len(rows) == 2:
                self.fake.export_delay = 0.0

        self.fake.after_api.append(rendered_once_all_started)
        code = self.run_backup("--concurrency", "1", "--no-extras", "--poll-interval", "0.1")
        self.assertEqual(code, 0, self.stderr)
        self.assertEqual(self.fake.max_in_flight, 1)
        log = self.fake.requests(host=None)
        posts = [index for index, record in enumerate(log) if record.method == "POST"]
        downloads = [index for index, record in enumerate(log) if record.host == "download"]
        rows = [index for index, record in enumerate(log) if record.path.endswith("/rows")]
        self.assertEqual((len(posts), len(downloads), len(rows)), (4, 4, 2))
        self.assertLess(max(posts), min(downloads), "an export waited for another to render")
        self.assertLess(max(rows), min(downloads), "the worker sat out a render instead of reading tables")


if __name__ == "__main__":
    unittest.main()
