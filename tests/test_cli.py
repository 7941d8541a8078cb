"""The command line: exit codes, one-line messages, where the token and the API URL come from,
one home for each default, and --config files.

Runs `coda_backup.main([...])` in-process against the fake (support.BackupTestCase). Most cases
stop before any backup work; the ones that run use an empty or one-page workspace.
"""

from __future__ import annotations

import json
import re
import sys
import unittest
from pathlib import Path
from typing import List

from support import EXTRA_PATHS, FAST_FLAGS, TOKEN, BackupTestCase, SmallWorkspaceTestCase, closed_port, coda_backup

ROOT = Path(__file__).resolve().parent.parent

# Flags the contract names (seed 001 first, then the later extras) and --api-url.
SEED_FLAGS = ["--output", "--token-file", "--include-shared", "--workspace-id", "--skip-hidden-pages", "--no-views",
              "--incremental", "--strict-latest", "--log-level", "--max-retries", "--api-url"]
LATER_FLAGS = ["--page-format", "--dry-run", "--doc", "--exclude-doc", "--concurrency", "--quiet", "--zip", "--keep",
               "--retry-failed", "--list-runs", "--config", "--keep-last", "--keep-daily", "--keep-weekly",
               "--keep-monthly", "--keep-within", "--prune", "--diff", "--find"]


HAVE_TOMLLIB = sys.version_info >= (3, 11)


def toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of plain text is a valid TOML basic string


def closed_port_url() -> str:
    """An API URL on 127.0.0.1 where nothing listens."""
    return f"http://127.0.0.1:{closed_port()}/apis/v1"


class CliTestCase(BackupTestCase):
    def message_lines(self) -> List[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def assert_clean_error(self, code: int, expected: int) -> None:
        """Exit code as expected, something on stderr, and no traceback."""
        self.assertEqual(code, expected, self.stderr)
        self.assertTrue(self.message_lines(), "no message on stderr")
        self.assertNotIn("Traceback", self.stderr)

    def assert_nothing_done(self) -> None:
        """A usage error makes no request and no snapshot."""
        self.assertEqual(self.fake.requests(host=None), [])
        snapshots = [p for p in self.out.iterdir() if re.match(r"\d{4}-", p.name)] if self.out.exists() else []
        self.assertEqual(snapshots, [])




class TokenTest(CliTestCase):
    def test_no_token_exits_2_with_one_clear_line(self) -> None:
        for value in (None, "", "   "):
            with self.subTest(CODA_API_TOKEN=value):
                self.set_env("CODA_API_TOKEN", value)
                code = self.run_backup()
                self.assert_clean_error(code, 2)
                self.assertEqual(len(self.message_lines()), 1, self.stderr)
                self.assertIn("CODA_API_TOKEN", self.stderr)
                self.assertIn("--token-file", self.stderr)
                self.assert_nothing_done()

    def test_token_file_first_line_stripped(self) -> None:
        self.set_env("CODA_API_TOKEN", None)
        for text in (f"{TOKEN}\n", f"  {TOKEN}  \r\nsecond line\n", TOKEN, f"{TOKEN}\nnot-the-token\n"):
            with self.subTest(text=text):
                self.fake.clear_log()
                self.assertEqual(self.run_backup("--token-file", str(self.token_file(text))), 0, self.stderr)
                whoami = self.fake.requests("GET", r"^/whoami$")
                self.assertEqual(len(whoami), 1)
                self.assertEqual(whoami[0].headers.get("authorization"), f"Bearer {TOKEN}")

    def test_environment_wins_over_token_file(self) -> None:
        path = self.token_file("wrong-token-from-file\n")
        self.assertEqual(self.run_backup("--token-file", str(path)), 0, self.stderr)
        self.assertEqual(self.fake.requests("GET", r"^/whoami$")[0].headers.get("authorization"), f"Bearer {TOKEN}")

    def test_unusable_token_file_exits_2(self) -> None:
        self.set_env("CODA_API_TOKEN", None)
        cases = {
            "missing": str(self.out.parent / "no-such-token.txt"),
            "a folder": str(self.out.parent),
            "empty": str(self.token_file("")),
            "blank first line": str(self.token_file("\n" + TOKEN + "\n")),
        }
        for label, path in cases.items():
            with self.subTest(label):
                code = self.run_backup("--token-file", path)
                self.assert_clean_error(code, 2)
                self.assertEqual(len(self.message_lines()), 1, self.stderr)
                self.assert_nothing_done()

    def test_refused_token_exits_3_with_a_message(self) -> None:
        self.set_env("CODA_API_TOKEN", "wrong-token-Qp7")
        code = self.run_backup()
        self.assert_clean_error(code, 3)
        self.assertRegex(self.stderr, r"401|token")
        self.assertNotIn("wrong-token-Qp7", self.stderr, "the token must never be printed")
        self.assertEqual([r.path for r in self.fake.requests()], ["/whoami"], "nothing after a refused token")


class UsageTest(CliTestCase):
    def test_output_is_required(self) -> None:
        code = self.run_main(["--api-url", self.fake.api_url] + FAST_FLAGS)
        self.assert_clean_error(code, 2)
        self.assertIn("--output", self.stderr)
        self.assertEqual(self.fake.requests(host=None), [])

    def test_bad_flag_values_exit_2(self) -> None:
        cases = [
            ["--concurrency", "0"],
            ["--concurrency", "many"],
            ["--max-retries", "-1"],
            ["--page-format", "pdf"],
            ["--log-level", "LOUD"],
            ["--no-such-flag"],
            ["--api-url", "ftp://example.com/apis/v1"],
            # Day counts a timedelta cannot hold once were tracebacks (OverflowError), some only
            # when a saved copy or a vanished object was there to compare with.
            ["--incremental", "--max-age", "inf"],
            ["--incremental", "--max-age", "1e300"],
            ["--keep-within", "99999999999"],
            ["--timeout", "inf"],
            # URLs urlsplit cannot read were tracebacks; one with a space got as far as the ping,
            # whose error then logged the URL's secret path.
            ["--api-url", "http://[::1"],
            ["--ping-url", "http://[::1"],
            ["--asset-host", "http://[::1"],
            ["--ping-url", "https://hc-ping.com/key with space"],
            ["--ping-url", "https://hc-ping.com:99999/key"],
        ]
        for extra in cases:
            with self.subTest(extra=extra):
                code = self.run_backup(*extra)
                self.assert_clean_error(code, 2)
                self.assert_nothing_done()

    def test_commands_take_no_backup_flags_and_one_at_a_time(self) -> None:
        """`--incremental --prune --keep-daily 7` in a cron line once exited 0 every night and
        backed up nothing; two commands at once quietly ran only the first; and a command's own
        values are checked like a backup's."""
        self.out.mkdir(parents=True)
        cases = [
            (["--prune", "--keep-daily", "7", "--incremental"], "--prune makes no backup: leave out --incremental"),
            (["--find", "x", "--retry-failed"], "--find makes no backup: leave out --retry-failed"),
            (["--list-runs", "--prune", "--keep-last", "1"], "--list-runs and --prune do not go together"),
            (["--verify", "--diff"], "--verify and --diff do not go together"),
            (["--prune", "--keep-last", "1", "--keep-vanished", "99999999999"],
             "--keep-vanished must be between 0 and 36500 days"),  # a traceback once a doc had vanished
        ]
        for extra, message in cases:
            with self.subTest(extra=extra):
                code = self.run_main(["--output", str(self.out), *extra])
                self.assert_clean_error(code, 2)
                self.assertEqual(len(self.message_lines()), 1, self.stderr)
                self.assertIn(message, self.stderr)

    def test_help_lists_every_contract_flag_the_parser_has(self) -> None:
        known = {option for flag in coda_backup.build_parser().flags.values() for option in flag.options}
        self.assertEqual([flag for flag in SEED_FLAGS if flag not in known], [], "seed 001 flags missing")
        self.assertEqual(self.run_main(["--help"]), 0)
        for flag in SEED_FLAGS + LATER_FLAGS:
            if flag in known:
                with self.subTest(flag=flag):
                    self.assertRegex(self.stdout, rf"(?<![\w-]){re.escape(flag)}(?![\w-])")
        self.assertIn("CODA_API_TOKEN", self.stdout)

    def test_version(self) -> None:
        self.assertEqual(self.run_main(["--version"]), 0)
        match = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M)
        assert match is not None
        self.assertIn(match.group(1), self.stdout)
        self.assertEqual(self.fake.requests(host=None), [])


class ApiUrlTest(CliTestCase):
    def test_api_unreachable_exits_3(self) -> None:
        code = self.run_main(["--output", str(self.out), "--api-url", closed_port_url(), "--max-retries", "1"]
                             + FAST_FLAGS)
        self.assert_clean_error(code, 3)

    def test_coda_api_url_env_is_used_without_the_flag(self) -> None:
        self.set_env("CODA_API_URL", self.fake.api_url)
        self.assertEqual(self.run_main(["--output", str(self.out)] + FAST_FLAGS), 0, self.stderr)
        self.assertEqual([r.path for r in self.fake.requests()][:2], ["/whoami", "/docs"])

    def test_api_url_flag_wins_over_the_env(self) -> None:
        self.set_env("CODA_API_URL", closed_port_url())
        self.assertEqual(self.run_backup(), 0, self.stderr)
        self.assertTrue(self.fake.requests("GET", r"^/whoami$"))


class DefaultsTest(CliTestCase):
    """Each default has one home, a constant: the parser, Options, the HTTP client and --help agree."""

    def test_a_bare_command_line_gives_what_options_and_the_client_default_to(self) -> None:
        args = coda_backup.build_parser().parse_args(["--output", str(self.out)])
        options = coda_backup.options_from_args(args)
        self.assertEqual(options, coda_backup.Options(output=self.out))
        self.assertEqual(coda_backup.client_settings(options), coda_backup.ClientSettings(
            api_url=coda_backup.DEFAULT_API_URL, rate_limits=coda_backup.DEFAULT_RATE_LIMITS))

    def test_help_prints_each_default_from_its_constant(self) -> None:
        self.assertEqual(self.run_main(["--help"]), 0)
        entries = {}  # flag -> its --help text on one line
        for entry in re.split(r"\n(?=  -)", self.stdout):
            names = re.findall(r"(?<![\w-])--[a-z][\w-]*", entry.split("  ", 2)[1] if entry.count("  ") > 1 else "")
            for name in names:
                entries.setdefault(name, " ".join(entry.split()))
        cases = [("--max-retries", coda_backup.DEFAULT_MAX_RETRIES), ("--retry-delay", coda_backup.DEFAULT_RETRY_DELAY),
                 ("--timeout", coda_backup.DEFAULT_TIMEOUT), ("--poll-interval", coda_backup.DEFAULT_POLL_INTERVAL),
                 ("--export-timeout", coda_backup.DEFAULT_EXPORT_TIMEOUT),
                 ("--concurrency", coda_backup.DEFAULT_CONCURRENCY), ("--log-level", coda_backup.DEFAULT_LOG_LEVEL),
                 ("--max-age", coda_backup.DEFAULT_MAX_AGE_DAYS),
                 ("--keep-vanished", coda_backup.DEFAULT_KEEP_VANISHED),
                 ("--max-vanished", coda_backup.DEFAULT_MAX_VANISHED),
                 ("--max-asset-mb", coda_backup.DEFAULT_MAX_ASSET_MB)]
        for flag, value in cases:
            with self.subTest(flag=flag):
                shown = f"{value:g}" if isinstance(value, float) else str(value)
                self.assertRegex(entries.get(flag, ""), rf"\(default:? {re.escape(shown)}[;)]")


# --- --config ----------------------------------------------------------------------------------


class ConfigTest(SmallWorkspaceTestCase):
    """On Python 3.11+ the TOML file gives defaults; before 3.11 --config is a clear exit 2."""

    TWO_DOCS = True

    def run_config(self, text: str, *extra: str, output_flag: bool = True) -> int:
        config = self.out.parent / "coda-backup.toml"
        config.write_text(text, encoding="utf-8")
        args = ["--config", str(config), "--api-url", self.fake.api_url, *FAST_FLAGS]
        if output_flag:
            args = ["--output", str(self.out), *args]
        return self.run_main([*args, *extra])

    def assert_refused_before_any_work(self, code: int, needle: str) -> None:
        """Exit 2 with `needle` in the message, no traceback, no output folder, no request."""
        self.assertEqual(code, 2, self.stderr)
        self.assertIn(needle, self.stderr)
        self.assertNotIn("Traceback", self.stderr)
        self.assertFalse(self.out.exists())
        self.assertEqual(self.fake.requests(), [])

    def assert_old_python_refuses(self, code: int) -> None:
        self.assert_refused_before_any_work(code, "3.11")

    def test_file_gives_defaults(self) -> None:
        code = self.run_config("\n".join([
            f"output = {toml_string(str(self.out))}",
            'page-format = "html"',
            "rows-json = true",
            'exclude-table = ["Alpha Doc/Arch*"]',
            "no-extras = true",
            "",
        ]), output_flag=False)
        if not HAVE_TOMLLIB:
            self.assert_old_python_refuses(code)
            return
        self.assertEqual(code, 0, self.stderr)
        snapshot = self.latest()  # the output folder came from the file
        self.assertTrue(self.object_file(self.ws.overview, ".html", snapshot).is_file())
        self.assertEqual(list(snapshot.rglob("*.md")), [])
        self.assertTrue(self.object_file(self.ws.tasks, ".rows.ndjson", snapshot).is_file())
        self.assertEqual(list(snapshot.rglob(f"*__{self.ws.archive.id}.csv")), [])
        self.assertEqual(self.fake.requests(None, EXTRA_PATHS), [])

    def test_one_run_flags_and_commands_are_refused(self) -> None:
        """A config key the command line could not undo: allow-vanished would disarm the deletion
        guard every night, dry-run would make every night a dry run."""
        for key in ("allow-vanished = true", "dry-run = true", "prune = true", "retry-failed = true"):
            with self.subTest(key=key):
                code = self.run_config(key + "\n")
                if not HAVE_TOMLLIB:
                    self.assert_old_python_refuses(code)
                    continue
                self.assertEqual(code, 2, self.stderr)
                self.assertIn("is for one run", self.stderr)
                self.assertEqual(self.fake.requests(), [])

    def test_command_line_wins(self) -> None:
        code = self.run_config('page-format = "html"\ndoc = ["Beta: Wiki"]\nkeep = 3\nno-extras = true\n',
                               "--page-format", "markdown", "--doc", "Alpha Doc")
        if not HAVE_TOMLLIB:
            self.assert_old_python_refuses(code)
            return
        self.assertEqual(code, 0, self.stderr)
        snapshot = self.latest()
        self.assertEqual(list((snapshot / "docs").rglob("*.html")), [])
        self.assertTrue(self.object_file(self.ws.overview, ".md", snapshot).is_file())
        self.assertEqual([doc["id"] for doc in self.manifest(snapshot)["docs"]], [self.ws.alpha.id],
                         "--doc on the command line replaces the file's doc list")

    def test_a_switch_from_the_file_can_be_turned_off(self) -> None:
        config = "incremental = true\nno-extras = true\n"
        if not HAVE_TOMLLIB:
            self.assert_old_python_refuses(self.run_config(config, "--no-incremental"))
            return
        self.assertEqual(self.run_backup("--no-extras"), 0, self.stderr)
        self.fake.clear_log()
        code = self.run_config(config, "--no-incremental")
        self.assertEqual(code, 0, self.stderr)
        self.assertEqual(len(self.fake.requests("POST", r"/export$")), len(self.ws.pages), "a full backup")

    def test_unknown_key(self) -> None:
        code = self.run_config('page-format = "html"\ncolour = "blue"\n')
        if not HAVE_TOMLLIB:
            self.assert_old_python_refuses(code)
            return
        self.assert_refused_before_any_work(code, "colour")

    def test_bad_values(self) -> None:
        cases = [
            ("keep", 'keep = "three"'),
            ("page-format", "page-format = 5"),
            ("page-format", 'page-format = "pdf"'),
            ("include-shared", 'include-shared = "yes"'),
            ("exclude-table", 'exclude-table = "Alpha Doc/*"'),
            ("concurrency", "concurrency = 2.5"),
            ("max-retries", "max-retries = true"),
            ("not TOML", "page-format = "),
        ]
        for key, line in cases:
            with self.subTest(line=line):
                code = self.run_config(line + "\n")
                if not HAVE_TOMLLIB:
                    self.assert_old_python_refuses(code)
                    continue
                self.assertEqual(code, 2, self.stderr)
                self.assertEqual(len(self.stderr.strip().splitlines()), 1, self.stderr)
                if key != "not TOML":
                    self.assertIn(key, self.stderr)
                self.assertFalse(self.out.exists())
        self.assertEqual(self.fake.requests(), [])


if __name__ == "__main__":
    unittest.main()

