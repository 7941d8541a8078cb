"""Shared scaffolding for end-to-end tests: a started fake, a temp output folder, and readers.

Tests run the real CLI in-process (`coda_backup.main([...])`) over real HTTP against the fake;
these helpers only start things, pass the flags that keep tests fast, and read results back.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import tempfile
import unittest
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Tuple

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(0, str(TESTS))

import coda_backup  # noqa: E402
from fake_coda import FakeCoda  # noqa: E402

# Scratch folders on a RAM file system where the machine has one. The tool fsyncs every file it
# writes and the folder that holds it (a snapshot must survive a power cut): that is the product's
# durability, not what these tests test, and on a real disk the syncs alone take a third of the
# suite's time. A TMPDIR set by the caller wins; so does tempfile's default where there is no /dev/shm.
RAM_DISK = Path("/dev/shm")
if "TMPDIR" not in os.environ and RAM_DISK.is_dir() and os.access(RAM_DISK, os.W_OK | os.X_OK):
    tempfile.tempdir = str(RAM_DISK)

TOKEN = "test-token-Zx9q"  # distinctive, so leak checks can grep for it

# Tiny delays so the suite stays fast; pacing off unless a test is about pacing.
FAST_FLAGS = [
    "--poll-interval", "0.005",
    "--retry-delay", "0.001",
    "--timeout", "2",
    "--export-timeout", "5",
    "--rate-limits", "none",
    "--log-level", "WARNING",
]


class BackupTestCase(unittest.TestCase):
    """Starts a fake Coda and a temp --output; `run_backup` runs the CLI against them."""

    fake: FakeCoda
    out: Path
    stderr: str

    def setUp(self) -> None:
        self.fake = FakeCoda(token=TOKEN, seed=7)
        self.fake.start()
        self.addCleanup(self.fake.stop)
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.out = Path(tmp.name) / "backups"
        self.stderr = ""
        self.set_env("CODA_API_TOKEN", TOKEN)
        self.set_env("CODA_API_URL", None)

    def set_env(self, name: str, value: Optional[str]) -> None:
        """Set (or, with None, remove) an environment variable for this test only."""
        old = os.environ.get(name)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

        def restore() -> None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old

        self.addCleanup(restore)

    def run_backup(self, *extra: str, fast: bool = True, output: Optional[Path] = None) -> int:
        """Run `main` with the fake's URL; stderr is kept in self.stderr."""
        args = ["--output", str(output or self.out), "--api-url", self.fake.api_url]
        args += FAST_FLAGS if fast else []
        args += list(extra)
        return self.run_main(args)

    def run_main(self, args: List[str]) -> int:
        code, self.stdout, self.stderr = run_cli(args)
        return code

    def api_get(self, path: str, **params: str) -> Any:
        """GET the fake's API directly (what Coda says, to compare with what the backup kept).

        Not logged: the request log stays the backup's own."""
        url = self.fake.api_url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        self.fake.log_requests = False
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return json.loads(answer.read().decode("utf-8"))
        finally:
            self.fake.log_requests = True

    def api_items(self, path: str, **params: str) -> List[Dict[str, Any]]:
        """Every item of an API listing, following nextPageToken."""
        answer = self.api_get(path, limit="200", **params)
        items: List[Dict[str, Any]] = list(answer["items"])
        while answer.get("nextPageToken"):
            answer = self.api_get(path, pageToken=answer["nextPageToken"])
            items.extend(answer["items"])
        return items

    # -- reading results ---------------------------------------------------------------

    def latest(self) -> Path:
        snapshot = coda_backup.read_latest(self.out)
        self.assertIsNotNone(snapshot, "no latest snapshot")
        assert snapshot is not None
        return snapshot

    def snapshots(self) -> List[Path]:
        return sorted(p for p in self.out.iterdir() if coda_backup.SNAPSHOT_NAME_RE.match(p.name))

    def summary(self, snapshot: Optional[Path] = None) -> Dict[str, Any]:
        return read_json((snapshot or self.latest()) / "summary.json")

    def manifest(self, snapshot: Optional[Path] = None) -> Dict[str, Any]:
        return read_json((snapshot or self.latest()) / "manifest.json")

    def doc_dir(self, doc: Any, snapshot: Optional[Path] = None) -> Path:
        matches = list(((snapshot or self.latest()) / "docs").glob(f"*__{doc.id}"))
        self.assertEqual(len(matches), 1, f"doc folder for {doc.id}")
        return matches[0]

    def find_one(self, folder: Path, pattern: str) -> Path:
        matches = list(folder.rglob(pattern))
        self.assertEqual(len(matches), 1, f"{pattern} under {folder}: {matches}")
        return matches[0]


class SharedRunTestCase(BackupTestCase):
    """One backup for the whole class; its tests only read what that run wrote.

    A backup of a sample workspace costs a few tenths of a second; a class of read-only checks
    (each one area, for clear failures) pays it once. `build(fake)` fills the fake, RUN_FLAGS are
    the run's flags beyond FAST_FLAGS; the run's exit code, stdout and stderr are kept. Tests must
    not change the fake, the output folder or the environment (`api_get` does not log).
    """

    RUN_FLAGS: ClassVar[Tuple[str, ...]] = ()
    shared_fake: ClassVar[FakeCoda]
    shared_out: ClassVar[Path]
    data: ClassVar[Any]
    code: ClassVar[int]
    run_stdout: ClassVar[str]
    run_stderr: ClassVar[str]

    @classmethod
    def build(cls, fake: FakeCoda) -> Any:
        """Fill the fake with the workspace the class backs up; returned as `self.data`."""
        raise NotImplementedError

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.shared_fake = FakeCoda(token=TOKEN, seed=7)
        cls.shared_fake.start()
        cls.addClassCleanup(cls.shared_fake.stop)
        tmp = tempfile.TemporaryDirectory()
        cls.addClassCleanup(tmp.cleanup)
        cls.shared_out = Path(tmp.name) / "backups"
        cls.data = cls.build(cls.shared_fake)
        args = ["--output", str(cls.shared_out), "--api-url", cls.shared_fake.api_url, *FAST_FLAGS, *cls.RUN_FLAGS]
        saved = {name: os.environ.get(name) for name in ("CODA_API_TOKEN", "CODA_API_URL")}
        os.environ["CODA_API_TOKEN"] = TOKEN
        os.environ.pop("CODA_API_URL", None)
        try:
            cls.code, cls.run_stdout, cls.run_stderr = run_cli(args)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def setUp(self) -> None:
        self.fake = self.shared_fake
        self.out = self.shared_out
        self.stdout, self.stderr = self.run_stdout, self.run_stderr


def run_cli(args: List[str]) -> Tuple[int, str, str]:
    """`coda_backup.main(args)` in-process: exit code, stdout, stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        code = coda_backup.main(args)
    return code, out.getvalue(), err.getvalue()


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_csv(path: Path) -> List[List[str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle))


# What a snapshot says about itself rather than about Coda: the run's records and the browsable
# index built from them (index.html and browse/), which name the snapshot and its status.
SNAPSHOT_META = ("summary.json", "manifest.json", "index.html", "browse")


def tree_bytes(root: Path, skip: tuple = SNAPSHOT_META) -> Dict[str, bytes]:
    """Every file under root by relative path, for comparing two snapshots byte for byte."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name not in skip and path.relative_to(root).parts[0] not in skip
    }
