"""Client-side pacing maths with an injected clock, and Retry-After parsing."""

import threading
import time
import unittest

from support import Clock
from support import coda_backup as cb


class Server:
    """One limit counted as the fake counts it: a sliding window (at most `limit` accepted in any
    `window`) or a token bucket (`limit` tokens refilled at limit / window per second)."""

    def __init__(self, model: str, limit: int, window: float) -> None:
        self.model, self.limit, self.window = model, limit, window
        self.accepted: list = []
        self.refused = 0
        self._tokens, self._counted = float(limit), None
        self.fewest = float(limit)  # the fewest tokens a bucket had left after accepting a request

    def answer(self, at: float) -> int:
        if self.model == "bucket":
            counted = at if self._counted is None else self._counted
            self._tokens = min(float(self.limit), self._tokens + (at - counted) * self.limit / self.window)
            self._counted = at
            allowed = self._tokens >= 1.0
            self._tokens -= 1.0 if allowed else 0.0
            self.fewest = min(self.fewest, self._tokens)
        else:
            allowed = sum(1 for start in self.accepted if start > at - self.window) < self.limit
        if not allowed:
            self.refused += 1
            return 429
        self.accepted.append(at)
        return 200


def serve(limiter: cb.RateLimiter, clock: Clock, server: Server, requests: int) -> None:
    """One worker sends `requests` requests, each when the limiter says, again after a 429."""
    for _ in range(requests):
        status = 429
        while status == 429:
            slot = limiter.take()
            clock.now += slot.wait
            status = server.answer(clock.now)
            limiter.answered(slot, status)


class RateLimiterTest(unittest.TestCase):
    def test_burst_up_to_limit_then_the_probe_then_a_window(self) -> None:
        clock = Clock()
        limiter = cb.RateLimiter(10, 6.0, clock)
        delays = [limiter.take()[1] for _ in range(12)]
        window = 6.0 * cb.RATE_WINDOW_MARGIN
        self.assertEqual(delays[:10], [0.0] * 10)
        self.assertAlmostEqual(delays[10], cb.PROBE_LEAD * window)  # the probe, unanswered yet
        self.assertAlmostEqual(delays[11], window)  # the rest wait for the window meanwhile

    def test_the_probe_tells_a_window_server_from_a_bucket(self) -> None:
        window = 6.0 * cb.RATE_WINDOW_MARGIN
        cases = [  # model, limit, requests, what pacing learns, 429s, when the last request goes at the latest
            ("window", 100, 950, "window", 1, 9 * window),  # the 901st to 950th wait for the 10th window
            ("bucket", 100, 950, "bucket", 0, 850 * window / 100 + cb.BUCKET_RESERVE),  # at the refill rate
            ("window", 1, 30, "unknown", 0, 29 * window),  # one per window: the models are one, no probe
            ("bucket", 1, 30, "unknown", 0, 29 * window),
        ]
        for model, limit, requests, learnt, refused, last in cases:
            with self.subTest(model=model, limit=limit):
                clock = Clock()
                limiter = cb.RateLimiter(limit, 6.0, clock)
                server = Server(model, limit, 6.0)
                serve(limiter, clock, server, requests)
                self.assertEqual((limiter.model, server.refused), (learnt, refused))
                self.assertEqual(limiter.allowed, float(limit))  # the probe's 429 slowed nothing down
                self.assertEqual(len(server.accepted), requests)
                self.assertLessEqual(server.accepted[-1] - server.accepted[0], last + 1e-6)

    def test_paced_as_a_bucket_it_keeps_a_reserve_for_the_network(self) -> None:
        # A request that reaches the server BUCKET_RESERVE earlier than planned, next to one that
        # came late, must still find a token: pacing never plans the bucket below that much refill.
        clock = Clock()
        limiter = cb.RateLimiter(100, 6.0, clock)
        server = Server("bucket", 100, 6.0)
        serve(limiter, clock, server, 101)  # the burst and the probe
        self.assertEqual(limiter.model, "bucket")
        server.fewest = 100.0
        serve(limiter, clock, server, 500)
        self.assertEqual(server.refused, 0)
        self.assertGreaterEqual(server.fewest, cb.BUCKET_RESERVE * 100 / limiter.window - 1e-6)

    def test_paced_to_the_window_no_window_holds_more_than_the_limit(self) -> None:
        clock = Clock()
        limiter = cb.RateLimiter(100, 6.0, clock)
        server = Server("window", 100, 6.0)
        serve(limiter, clock, server, 1000)
        starts = server.accepted
        for index, start in enumerate(starts):
            self.assertLessEqual(len([s for s in starts[index:] if s < start + 6.0]), 100)

    def test_the_probe_waits_for_an_answer_and_no_answer_proves_nothing(self) -> None:
        clock = Clock()
        limiter = cb.RateLimiter(4, 6.0, clock)
        slots = [limiter.take()[0] for _ in range(6)]  # 4 now, the probe, one a window on
        window = limiter.window
        self.assertEqual([round(slot - clock.now, 6) for slot in slots],
                         [0.0] * 4 + [round(cb.PROBE_LEAD * window, 6), round(window, 6)])
        cases = [("the probe's connection failed", None), ("the probe met a 503", 503)]
        for case, status in cases:
            with self.subTest(case):
                clock = Clock()
                limiter = cb.RateLimiter(4, 6.0, clock)
                slots = [limiter.take() for _ in range(5)]
                limiter.answered(slots[4], status)
                self.assertEqual(limiter.model, "unknown")
                probe = limiter.take()  # so the next request probes again: early, and its answer counts
                self.assertLess(probe.at, slots[0].at + limiter.window)
                limiter.answered(probe, 200)
                self.assertEqual(limiter.model, "bucket")

    def test_the_probe_is_known_by_its_slot_not_by_its_time(self) -> None:
        # Three starts at 0 and one at 4 fill the window, and the probe goes at once (its half
        # window has passed): at 4, the very time of the start before it. Every worker queued behind
        # one start gets that start's time, so times are shared all the time. The other request's
        # 200 proves nothing; taken for the probe's, it switched a window server to the bucket, and
        # the burst that followed drew a storm of 429s and halvings.
        clock = Clock()
        limiter = cb.RateLimiter(4, 6.0, clock)
        for _ in range(3):
            limiter.take()
        clock.now += 4.0
        other, probe = limiter.take(), limiter.take()
        self.assertEqual(other.at, probe.at)
        limiter.answered(other, 200)
        self.assertEqual(limiter.model, "unknown")
        limiter.answered(probe, 429)
        self.assertEqual((limiter.model, limiter.allowed), ("window", 4.0))

    def test_the_probe_goes_only_once_the_requests_before_it_were_answered(self) -> None:
        # Sent with the request that fills the window, the probe can reach a window server first
        # and be let in, that request refused in its place: a window server passed off as a bucket.
        clock = Clock()
        limiter = cb.RateLimiter(4, 6.0, clock)
        early = [limiter.take() for _ in range(3)]
        clock.now += 4.0
        last, probe = limiter.take(), limiter.take()
        self.assertEqual(probe.wait, 0.0)
        for slot in early:
            limiter.answered(slot, 200)
        self.assertEqual([limiter.ready(last), limiter.ready(probe)], [True, False])
        limiter.answered(last, 200)
        self.assertTrue(limiter.ready(probe))
        later = limiter.take()  # waits for the window, and need not wait for the probe's answer
        self.assertTrue(limiter.ready(later))

    def test_a_probe_that_cannot_go_in_time_is_given_up(self) -> None:
        # The request before it is still unanswered three quarters of a window after the window's
        # first start: sent later, the probe could reach the server after that start has left the
        # window and be let in by a window server. Its slot is void, and its holder waits for the
        # window like any request.
        clock = Clock()
        limiter = cb.RateLimiter(4, 6.0, clock)
        start = clock.now
        for _ in range(3):
            limiter.answered(limiter.take(), 200)
        clock.now += 4.0
        last, probe = limiter.take(), limiter.take()
        clock.now = start + 0.8 * limiter.window
        self.assertEqual((limiter.ready(probe), limiter.current(probe)), (False, False))
        again = limiter.take()
        self.assertAlmostEqual(again.at, start + limiter.window)
        self.assertEqual((limiter.ready(again), limiter.current(last)), (True, True))

    def test_a_probe_whose_moment_passed_proves_nothing(self) -> None:
        # Nothing before it is unanswered, but the probe goes only once the window's first start
        # has left a window server's window: its holder came late for it (no CPU), or it waited for
        # a connection once ready. Let in, it passed the window server off as a bucket, and the
        # bucket-paced burst that followed drew 429s and halvings.
        for case in ("its holder came late", "it waited for a connection"):
            with self.subTest(case):
                clock = Clock()
                limiter = cb.RateLimiter(4, 6.0, clock)
                server = Server("window", 4, 6.0)
                start = clock.now
                for _ in range(4):
                    limiter.answered(limiter.take(), server.answer(clock.now))
                slot = limiter.take()
                if case == "its holder came late":
                    clock.now = start + limiter.window
                    self.assertEqual((limiter.ready(slot), limiter.current(slot)), (False, False))
                    slot = limiter.take()  # the holder takes a new slot, an ordinary one
                    self.assertEqual(slot.wait, 0.0)
                else:
                    clock.now = slot.at
                    self.assertTrue(limiter.ready(slot))
                    clock.now = start + limiter.window
                    limiter.started(slot, clock.now)
                self.assertEqual(server.answer(clock.now), 200)
                limiter.answered(slot, 200)
                self.assertEqual(limiter.model, "unknown")
                for _ in range(3):
                    limiter.take()
                again = limiter.take()  # the window full again: the next probe goes, early
                self.assertLess(again.wait, (1 - cb.PROBE_LEAD / 2) * limiter.window)

    def test_a_probe_sent_late_and_refused_still_shows_the_window(self) -> None:
        # Sent after its moment but before the window let it go, its 429 is a window's answer (a
        # bucket has refilled three quarters of its burst by then), and it slows nothing down.
        clock = Clock()
        limiter = cb.RateLimiter(4, 6.0, clock)
        start = clock.now
        for _ in range(4):
            limiter.answered(limiter.take(), 200)
        probe = limiter.take()
        clock.now = probe.at
        self.assertTrue(limiter.ready(probe))
        clock.now = start + 0.9 * limiter.window
        limiter.started(probe, clock.now)
        limiter.answered(probe, 429)
        self.assertEqual((limiter.model, limiter.allowed), ("window", 4.0))

    def test_a_request_sent_a_window_after_its_slot_counts_from_then(self) -> None:
        # It waited longer than a window for a connection (every one busy streaming a big file),
        # and meanwhile another worker's look at the budget dropped its slot from the window.
        clock = Clock()
        limiter = cb.RateLimiter(1, 6.0, clock)
        slot = limiter.take()
        clock.now += 2 * limiter.window
        self.assertEqual(limiter.delay(), 0.0)
        limiter.started(slot, clock.now)
        self.assertAlmostEqual(limiter.take()[1], limiter.window)

    def test_concurrent_reservations_are_spread_out(self) -> None:
        clock = Clock()
        limiter = cb.RateLimiter(4, 6.0, clock)
        slots = [limiter.take() for _ in range(5)]
        limiter.answered(slots[4], 429)  # paced to the window from now on, the probe not counted
        delays = sorted(limiter.take()[1] for _ in range(12))  # 12 workers asking at once
        window = 6.0 * cb.RATE_WINDOW_MARGIN
        for got, want in zip(delays, [window] * 4 + [2 * window] * 4 + [3 * window] * 4):
            self.assertAlmostEqual(got, want, places=6)

    def test_answers_decide_the_model(self) -> None:
        cases = [  # model, probe, status -> model, slow down
            ("unknown", True, 429, "window", False),  # the probe refused: a window, and no slow-down
            ("unknown", True, 200, "bucket", False),
            ("unknown", True, 404, "bucket", False),  # the limit let it through all the same
            ("unknown", True, 503, "unknown", False),
            ("unknown", True, None, "unknown", False),
            ("unknown", False, 200, "unknown", False),
            ("unknown", False, 429, "window", True),  # stricter than the pacing: no probing after that
            ("window", True, 200, "window", False),  # ... and the late answer of a probe sent before undoes nothing
            ("bucket", False, 429, "window", True),  # a bucket that is not: back to the window for good
            ("bucket", False, 200, "bucket", False),
            ("window", False, 200, "window", False),
            ("window", False, 429, "window", True),
        ]
        for model, probe, status, expected, slow_down in cases:
            with self.subTest(model=model, probe=probe, status=status):
                self.assertEqual(cb.pacing_after_answer(model, probe, status), (expected, slow_down))

    def test_a_429_while_paced_as_a_bucket_falls_back_to_the_window(self) -> None:
        clock = Clock()
        limiter = cb.RateLimiter(10, 6.0, clock)
        serve(limiter, clock, Server("bucket", 10, 6.0), 30)
        self.assertEqual(limiter.model, "bucket")
        limiter.answered(limiter.take(), 429)
        self.assertEqual((limiter.model, limiter.allowed), ("window", 5.0))

    def test_429_halves_the_rate_and_recovers_gradually(self) -> None:
        clock = Clock()
        limiter = cb.RateLimiter(100, 6.0, clock)
        limiter.answered(limiter.take(), 429)
        self.assertEqual(limiter.allowed, 50.0)
        limiter.answered(limiter.take(), 429)
        self.assertEqual(limiter.allowed, 25.0)
        clock.now += limiter.window  # one window later: part of the way back
        limiter.take()[1]
        self.assertGreater(limiter.allowed, 25.0)
        self.assertLess(limiter.allowed, 100.0)
        clock.now += cb.RATE_RECOVERY_WINDOWS * limiter.window
        limiter.take()[1]
        self.assertEqual(limiter.allowed, 100.0)

    def test_rate_never_drops_below_one(self) -> None:
        limiter = cb.RateLimiter(4, 6.0, Clock())
        for _ in range(10):
            limiter.answered(limiter.take(), 429)
        self.assertEqual(limiter.allowed, 1.0)

    def test_retry_after_pauses_the_whole_category(self) -> None:
        cases = [("an ordinary 429", 100, 1, 50.0), ("the probe's 429", 5, 6, 5.0)]
        for case, limit, taken, allowed in cases:
            with self.subTest(case):
                clock = Clock()
                limiter = cb.RateLimiter(limit, 6.0, clock)
                slots = [limiter.take() for _ in range(taken)]
                limiter.answered(slots[-1], 429, 10.0)
                self.assertEqual(limiter.allowed, allowed)
                self.assertAlmostEqual(limiter.take()[1], 10.0)
                self.assertAlmostEqual(limiter.take()[1], 10.0)

    def test_slots_handed_out_before_the_pacing_changed_are_replaced(self) -> None:
        # Four requests go at once, the probe half a window later, and two workers wait for the
        # window meanwhile. Asleep on window slots once the probe has shown a bucket, they would
        # leave its room unused for half a window; asleep through a Retry-After, they would send
        # into the pause the server asked for.
        cases = [  # case, the probe's answer, its Retry-After
            ("the probe accepted: a bucket", 200, None),
            ("the probe refused with Retry-After: 10", 429, 10.0),
            ("the probe refused, no Retry-After: the window slots hold", 429, None),
        ]
        for case, status, retry_after in cases:
            with self.subTest(case):
                clock = Clock()
                limiter = cb.RateLimiter(4, 6.0, clock)
                server = Server("bucket" if status == 200 else "window", 4, 6.0)
                for slot in [limiter.take() for _ in range(4)]:
                    self.assertEqual(server.answer(slot.at), 200)
                probe = limiter.take()
                waiting = [limiter.take(), limiter.take()]
                self.assertAlmostEqual(waiting[0].at, clock.now + limiter.window)  # the window, for now
                clock.now = probe.at
                self.assertEqual(server.answer(probe.at), status)
                limiter.answered(probe, status, retry_after)
                held = [limiter.current(slot) for slot in waiting]
                if status == 429 and retry_after is None:
                    self.assertEqual(held, [True, True])
                    continue
                self.assertEqual(held, [False, False])
                again = [limiter.take() for _ in waiting]
                if retry_after is None:  # sooner than the window, and the bucket has the room
                    self.assertLess(again[0].at, waiting[0].at)
                    self.assertEqual([server.answer(slot.at) for slot in again], [200, 200])
                else:
                    self.assertGreaterEqual(min(slot.at for slot in again), probe.at + retry_after)

    def test_a_slot_already_due_survives_a_replan(self) -> None:
        clock = Clock()
        limiter = cb.RateLimiter(4, 6.0, clock)
        due = limiter.take()  # its request is on its way out as the probe is answered
        later = [limiter.take() for _ in range(3)][-1]
        probe = limiter.take()
        clock.now = probe.at
        limiter.answered(probe, 429, 5.0)
        self.assertTrue(limiter.current(due))
        self.assertTrue(limiter.current(later))  # also handed out for a moment now past

    def test_bad_limits_are_refused(self) -> None:
        for limit, window in ((0, 6.0), (5, 0.0)):
            with self.subTest(limit=limit, window=window), self.assertRaises(ValueError):
                cb.RateLimiter(limit, window)


class PacedClientTest(unittest.TestCase):
    def test_a_slot_whose_deadline_came_during_the_wait_is_given_back(self) -> None:
        # The request's deadline came while it waited for its slot, the probe's. Held until this
        # thread's next request, that slot kept every other request from probing meanwhile (and,
        # unanswered, it holds a later probe back until that probe is given up).
        settings = cb.ClientSettings(api_url="http://127.0.0.1:9", rate_limits={"read": (10, 1.0)})
        client = cb.HttpClient(settings, "token", threading.Event())
        limiter = client._limiters["read"]
        for _ in range(10):
            limiter.answered(limiter.take(), 200)

        def attempt(timeout: float) -> None:
            raise AssertionError("sent after its deadline")

        with self.assertRaises(cb.DeadlineReached):
            client._with_retries(attempt, "read", "/x", deadline=time.monotonic() + 0.05)
        again = limiter.take()  # the window still full: another request probes, early
        self.assertLess(again.wait, 0.25 * limiter.window)


class RetryAfterTest(unittest.TestCase):
    def test_values(self) -> None:
        cases = [(None, None), ("", None), ("0", 0.0), ("2", 2.0), (" 7 ", 7.0), ("-3", 0.0),
                 ("99999", cb.MAX_RETRY_AFTER), ("soon", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)]
        for raw, expected in cases:
            with self.subTest(raw=raw):
                self.assertEqual(cb._retry_after(raw), expected)


class RateLimitSpecTest(unittest.TestCase):
    def test_parse(self) -> None:
        self.assertEqual(cb.parse_rate_limits(None), cb.DEFAULT_RATE_LIMITS)
        self.assertIsNone(cb.parse_rate_limits("none"))
        parsed = cb.parse_rate_limits("read=50/6, write=5/10")
        self.assertEqual(parsed["read"], (50, 6.0))
        self.assertEqual(parsed["write"], (5, 10.0))
        self.assertEqual(parsed["list_docs"], cb.DEFAULT_RATE_LIMITS["list_docs"])
        for bad in ("read=0/6", "reads=1/6", "read=1", "read=1/0", "x"):
            with self.subTest(bad=bad), self.assertRaises(cb.ConfigError):
                cb.parse_rate_limits(bad)


if __name__ == "__main__":
    unittest.main()
