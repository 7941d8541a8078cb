"""Client-side pacing maths with an injected clock, and Retry-After parsing."""

import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import coda_backup as cb


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run_schedule(limiter: cb.RateLimiter, clock: Clock, requests: int) -> list:
    """Each request waits what the limiter says; return the start times."""
    starts = []
    for _ in range(requests):
        clock.now += limiter.reserve()
        starts.append(clock.now)
    return starts


class RateLimiterTest(unittest.TestCase):
    def test_burst_up_to_limit_then_waits_a_window(self) -> None:
        clock = Clock()
        limiter = cb.RateLimiter(10, 6.0, clock)
        delays = [limiter.reserve() for _ in range(11)]
        self.assertEqual(delays[:10], [0.0] * 10)
        self.assertAlmostEqual(delays[10], 6.0 * cb.RATE_WINDOW_MARGIN)

    def test_no_window_ever_holds_more_than_the_limit(self) -> None:
        clock = Clock()
        limiter = cb.RateLimiter(100, 6.0, clock)
        starts = run_schedule(limiter, clock, 1000)
        for index, start in enumerate(starts):
            in_window = [s for s in starts[index:] if s < start + 6.0]
            self.assertLessEqual(len(in_window), 100)
        # ...and it runs at the ceiling: 1000 requests take about 10 windows, not more.
        self.assertLess(starts[-1] - starts[0], 10 * 6.0 * cb.RATE_WINDOW_MARGIN)

    def test_concurrent_reservations_are_spread_out(self) -> None:
        clock = Clock()
        limiter = cb.RateLimiter(4, 6.0, clock)
        delays = sorted(limiter.reserve() for _ in range(12))  # 12 workers asking at once
        window = 6.0 * cb.RATE_WINDOW_MARGIN
        for got, expected in zip(delays, [0.0] * 4 + [window] * 4 + [2 * window] * 4):
            self.assertAlmostEqual(got, expected, places=6)

    def test_429_halves_the_rate_and_recovers_gradually(self) -> None:
        clock = Clock()
        limiter = cb.RateLimiter(100, 6.0, clock)
        limiter.on_rate_limited(None)
        self.assertEqual(limiter.allowed, 50.0)
        limiter.on_rate_limited(None)
        self.assertEqual(limiter.allowed, 25.0)
        clock.now += limiter.window  # one window later: part of the way back
        limiter.reserve()
        self.assertGreater(limiter.allowed, 25.0)
        self.assertLess(limiter.allowed, 100.0)
        clock.now += cb.RATE_RECOVERY_WINDOWS * limiter.window
        limiter.reserve()
        self.assertEqual(limiter.allowed, 100.0)

    def test_rate_never_drops_below_one(self) -> None:
        limiter = cb.RateLimiter(4, 6.0, Clock())
        for _ in range(10):
            limiter.on_rate_limited(None)
        self.assertEqual(limiter.allowed, 1.0)

    def test_retry_after_pauses_the_whole_category(self) -> None:
        clock = Clock()
        limiter = cb.RateLimiter(100, 6.0, clock)
        limiter.on_rate_limited(3.0)
        self.assertAlmostEqual(limiter.reserve(), 3.0)
        self.assertAlmostEqual(limiter.reserve(), 3.0)

    def test_bad_limits_are_refused(self) -> None:
        for limit, window in ((0, 6.0), (5, 0.0)):
            with self.subTest(limit=limit, window=window), self.assertRaises(ValueError):
                cb.RateLimiter(limit, window)


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
