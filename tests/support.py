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
from pathlib import Path
from typing import Any, Dict, List, Optional

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(0, str(TESTS))

import coda_backup  # noqa: E402
from fake_coda import FakeCoda  # noqa: E402

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
        buffer = io.StringIO()
        with contextlib.redirect_stderr(buffer), contextlib.redirect_stdout(io.StringIO()) as out:
            code = coda_backup.main(args)
        self.stderr = buffer.getvalue()
        self.stdout = out.getvalue()
        return code

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
