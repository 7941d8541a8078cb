"""Shared scaffolding for end-to-end tests: a started fake, a temp output folder, and readers.

Tests run the real CLI in-process (`coda_backup.main([...])`) over real HTTP against the fake;
these helpers only start things, pass the flags that keep tests fast, and read results back.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import csv
import functools
import io
import json
import os
import py_compile
import re
import shutil
import socket
import sys
import tempfile
import unittest
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, ClassVar, Dict, List, Optional, Set, Tuple

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


def start_fake(cleanup: Callable[[Callable[[], None]], None]) -> FakeCoda:
    """A started fake (seed 7) that `cleanup` (addCleanup or addClassCleanup) stops."""
    fake = FakeCoda(token=TOKEN, seed=7)
    fake.start()
    cleanup(fake.stop)
    return fake


def temp_output(cleanup: Callable[[Callable[[], None]], None]) -> Path:
    """An --output path in a fresh temp folder that `cleanup` removes (the path itself does not exist yet)."""
    tmp = tempfile.TemporaryDirectory()
    cleanup(tmp.cleanup)
    return Path(tmp.name) / "backups"


class BackupTestCase(unittest.TestCase):
    """Starts a fake Coda and a temp --output; `run_backup` runs the CLI against them."""

    fake: FakeCoda
    out: Path
    stderr: str

    def setUp(self) -> None:
        self.fake = start_fake(self.addCleanup)
        self.out = temp_output(self.addCleanup)
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

    def run_backup(self, *extra: str, fast: bool = True, output: Optional[Path] = None, index: bool = False) -> int:
        """Run `main` with the fake's URL; stderr is kept in self.stderr.

        The browsable index (index.html, browse/) is left out unless `index` (or not `fast`): it is
        a tenth of a small run's cost, and its own tests (test_operators.IndexTest) and the default
        sample run (test_backup_layout) check it.
        """
        args = ["--output", str(output or self.out), "--api-url", self.fake.api_url]
        args += FAST_FLAGS + ([] if index else ["--no-index"]) if fast else []
        args += list(extra)
        return self.run_main(args)

    def run_main(self, args: List[str]) -> int:
        code, self.stdout, self.stderr = run_cli(args)
        return code

    def token_file(self, text: str) -> Path:
        """A token file beside --output holding `text`, readable by its owner only."""
        path = self.out.parent / "token.txt"
        path.write_text(text, encoding="utf-8")
        path.chmod(0o600)
        return path

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
    (each one area, for clear failures) pays it once. `build(fake)` fills the fake, `run_flags(fake)`
    gives the run's flags beyond FAST_FLAGS; the run's exit code, stdout and stderr are kept. Tests
    must not change the fake, the output folder or the environment (`api_get` does not log).
    """

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
    def run_flags(cls, fake: FakeCoda) -> List[str]:
        """The run's flags beyond FAST_FLAGS (the fake is started: its URLs are known)."""
        return []

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.shared_fake = start_fake(cls.addClassCleanup)
        cls.shared_out = temp_output(cls.addClassCleanup)
        cls.data = cls.build(cls.shared_fake)
        args = ["--output", str(cls.shared_out), "--api-url", cls.shared_fake.api_url, *FAST_FLAGS,
                *cls.run_flags(cls.shared_fake)]
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


class Clock:
    """A clock a test moves by hand (`clock.now += 1.5`), for the pure pacing and scheduling rules."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@functools.cache
def tool_dir() -> Path:
    """A folder holding coda_backup's bytecode alone (coda_backup.pyc), for child processes.

    Some tests need the CLI as a process of its own (signals, a second lock holder, a private
    mount namespace). Python compiles a script on every start, and an imported module too where
    PYTHONDONTWRITEBYTECODE is set (as on this machine): a quarter second for this file, each
    time. The children import this copy instead, compiled once per test run from the source as it
    is now and removed at exit. TerminalProgressTest runs the file itself, as the README does.
    """
    folder = Path(tempfile.mkdtemp(prefix="coda-backup-bytecode-"))
    atexit.register(shutil.rmtree, folder, True)
    py_compile.compile(str(TESTS.parent / "coda_backup.py"), cfile=str(folder / "coda_backup.pyc"), doraise=True)
    return folder


def tool_command(*args: str) -> List[str]:
    """`python coda_backup.py ARGS` as a child process, from tool_dir()'s bytecode."""
    launch = f"import sys; sys.path.insert(0, {str(tool_dir())!r}); import coda_backup; sys.exit(coda_backup.main())"
    return [sys.executable, "-c", launch, *args]


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (it was free a moment ago): connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


# --- a small workspace for the flag tests ------------------------------------------------------

# Request paths of a doc's extras (formulas, controls, sharing), which --no-extras leaves out.
EXTRA_PATHS = r"/docs/[^/]+/(formulas|controls|acl)(/|$)"


def build_small_workspace(fake: FakeCoda, two_docs: bool = True) -> SimpleNamespace:
    """One or two owned docs, small enough to back up in a blink, with everything the features touch.

    alpha "Alpha Doc": pages Overview > Details, Notes; table Tasks (5 rows, list/dict/bool/null
    values) on Overview, view "Open Tasks" (3 rows) on Details, table "Archive 2023" (2 rows) on
    Notes; three formulas and two controls.  beta "Beta: Wiki" (only with two_docs): page Home,
    table Glossary (1 row).  `pages` and `tables` list every page and table/view of the workspace.
    """
    alpha = fake.add_doc("Alpha Doc")
    overview = alpha.add_page("Overview", content="# Overview\n\nWhere things stand.\n\n- one\n- two\n")
    details = alpha.add_page("Details", parent=overview, content="# Details\n\nMore «detail» ✓.\n")
    notes = alpha.add_page("Notes")
    tasks = alpha.add_table("Tasks", parent_page=overview, columns=[
        "Task",
        {"name": "Points", "type": "number"},
        {"name": "Tags", "type": "select", "isArray": True},
        {"name": "Done", "type": "checkbox"},
        {"name": "Meta", "type": "packObject"},
        "Notes",
    ])
    for values in [
        {"Task": "Plan", "Points": 5, "Tags": ["a", "b"], "Done": True, "Meta": {"owner": "Ana"},
         "Notes": 'x, "y"'},
        {"Task": "Build", "Points": 8.5, "Tags": [], "Done": False, "Meta": None, "Notes": "line1\nline2"},
        {"Task": "Ünïcødé ✓", "Points": -3, "Tags": ["c"], "Done": False, "Meta": {"n": [1, None]},
         "Notes": None},
        {"Task": "Ship", "Points": 0, "Tags": ["launch"], "Done": True, "Meta": {}, "Notes": ""},
        {"Task": "Review", "Points": 13, "Tags": ["z"], "Done": False, "Meta": {"k": True}, "Notes": "ok"},
    ]:
        tasks.add_row(values)
    done = tasks.column("Done").id
    open_view = alpha.add_view(tasks, "Open Tasks", parent_page=details,
                               row_filter=lambda values: values.get(done) is False)
    archive = alpha.add_table("Archive 2023", columns=["Name"], parent_page=notes,
                              rows=[{"Name": "old"}, {"Name": "older"}])
    formulas = [alpha.add_formula("Total Points", 42, parent=overview),
                alpha.add_formula("Owners", ["Ana", "Bo"]),
                alpha.add_formula("Launch Ready", True)]
    controls = [alpha.add_control("Start Date", "2024-06-01", control_type="datePicker", parent=overview),
                alpha.add_control("Budget", 7, control_type="slider")]
    ws = SimpleNamespace(
        alpha=alpha, overview=overview, details=details, notes=notes,
        tasks=tasks, open_view=open_view, archive=archive, formulas=formulas, controls=controls,
        pages=[overview, details, notes], tables=[tasks, open_view, archive],
    )
    if two_docs:
        ws.beta = fake.add_doc("Beta: Wiki")
        ws.home = ws.beta.add_page("Home", content="# Home\n\nWelcome.\n")
        ws.glossary = ws.beta.add_table("Glossary", columns=["Term", "Meaning"], parent_page=ws.home,
                                        rows=[{"Term": "API", "Meaning": "interface"}])
        ws.pages.append(ws.home)
        ws.tables.append(ws.glossary)
    return ws


def files_under(root: Path) -> Dict[str, Path]:
    """Every regular file under root, by relative POSIX path."""
    return {path.relative_to(root).as_posix(): path for path in sorted(root.rglob("*")) if path.is_file()}


def manifest_owners(manifest: Dict[str, Any]) -> Dict[str, List[Tuple[str, Dict[str, Any], Dict[str, Any]]]]:
    """Relative file path -> [(kind, entry, file record)] for every file the manifest lists."""
    owners: Dict[str, List[Tuple[str, Dict[str, Any], Dict[str, Any]]]] = collections.defaultdict(list)
    for doc in manifest["docs"]:
        for record in doc["files"]:
            owners[record["path"]].append(("doc", doc, record))
        for kind in ("pages", "tables"):
            for entry in doc[kind]:
                for record in entry["files"]:
                    owners[record["path"]].append((kind[:-1], entry, record))
    for record in manifest.get("index", []):
        owners[record["path"]].append(("index", {}, record))
    return owners


def manifest_entry(manifest: Dict[str, Any], kind: str, object_id: str) -> Dict[str, Any]:
    """The manifest entry ("docs", "pages" or "tables") of one object id."""
    for doc in manifest["docs"]:
        if kind == "docs" and doc["id"] == object_id:
            return doc
        for entry in doc.get(kind, []) if kind != "docs" else []:
            if entry["id"] == object_id:
                return entry
    raise AssertionError(f"no manifest entry for {kind} {object_id}")


def item_list(data: Any) -> List[Dict[str, Any]]:
    """formulas.json / controls.json items (a list, or an object holding `items`)."""
    return data["items"] if isinstance(data, dict) else data


class SmallWorkspaceTestCase(BackupTestCase):
    """BackupTestCase with build_small_workspace loaded into the fake (one doc unless TWO_DOCS)."""

    TWO_DOCS = False  # a second doc only where a test needs one
    ws: SimpleNamespace

    def setUp(self) -> None:
        super().setUp()
        self.ws = self.make_workspace()

    def make_workspace(self) -> SimpleNamespace:
        return build_small_workspace(self.fake, self.TWO_DOCS)

    def object_file(self, obj: Any, suffix: str, snapshot: Optional[Path] = None) -> Path:
        """The one file of a page/table ending in `__<id><suffix>` in its doc folder."""
        return self.find_one(self.doc_dir(obj.doc, snapshot), f"*__{obj.id}{suffix}")

    def assert_page_files(self, snapshot: Path, pages: List[Any], formats: Tuple[str, ...]) -> None:
        """Each page has exactly the files of `formats`, with the exported bytes, listed in the manifest."""
        suffixes = {"markdown": ".md", "html": ".html"}
        manifest = read_json(snapshot / "manifest.json")
        for page in pages:
            with self.subTest(page=page.name[:40], formats=formats):
                chain, node = [], page  # pages/<Ancestor>__<id>/.../<Name>__<id>, whatever the format
                while node is not None:
                    chain.append(coda_backup.object_stem(node.name, node.id))
                    node = node.parent
                stem = self.doc_dir(page.doc, snapshot).joinpath("pages", *reversed(chain))
                found = {fmt: list(self.doc_dir(page.doc, snapshot).rglob(f"*__{page.id}{suffix}"))
                         for fmt, suffix in suffixes.items()}
                for fmt, suffix in suffixes.items():
                    if fmt not in formats:
                        self.assertEqual(found[fmt], [], f"no {fmt} file expected")
                        continue
                    self.assertEqual(found[fmt], [stem.with_name(stem.name + suffix)], f"one {fmt} file")
                    self.assertEqual(found[fmt][0].read_bytes(), page.render(fmt).encode("utf-8"), fmt)
                if len(formats) == 2:  # the .html sits beside the .md, same name scheme
                    md, html = found["markdown"][0], found["html"][0]
                    self.assertEqual(md.parent, html.parent)
                    self.assertEqual(md.name[:-len(".md")], html.name[:-len(".html")])
                listed = {record["path"] for record in manifest_entry(manifest, "pages", page.id)["files"]}
                self.assertEqual(listed, {found[fmt][0].relative_to(snapshot).as_posix() for fmt in formats})

    def assert_exported_formats(self, page_count: int, formats: Tuple[str, ...]) -> None:
        posted = collections.Counter(
            record.body.get("outputFormat") for record in self.fake.requests("POST", r"/export$"))
        self.assertEqual(posted, dict.fromkeys(formats, page_count))

    def assert_verifies(self, output: Optional[Path] = None) -> None:
        code = self.run_main(["--output", str(output or self.out), "--verify"])
        self.assertEqual(code, 0, f"--verify: {self.stdout} {self.stderr}")


# --- incremental runs: a two-doc workspace and readers of what a run linked ------------------------

def build_incremental_workspace(fake: FakeCoda) -> SimpleNamespace:
    """Two owned docs: Alpha (3 pages, 2 tables, 1 view of "Items") and Beta (1 page, 1 table).

    Four exportable pages, three base tables, one view.
    """
    alpha = fake.add_doc("Alpha Doc")
    overview = alpha.add_page("Overview", content="# Overview\n\nAlpha overview.\n")
    details = alpha.add_page("Details", parent=overview, content="# Details\n\nA nested page.\n")
    scratch = alpha.add_page("Scratch", content="# Scratch\n\nWill be deleted.\n")
    items = alpha.add_table(
        "Items", parent_page=overview,
        columns=["Name", {"name": "Qty", "type": "number"}, {"name": "Open", "type": "checkbox"}],
        rows=[{"Name": "apple", "Qty": 3, "Open": True}, {"Name": "pear", "Qty": 5, "Open": False},
              {"Name": "plum", "Qty": 7, "Open": True}],
    )
    open_id = items.column("Open").id
    open_items = alpha.add_view(items, "Open Items", row_filter=lambda values: values.get(open_id) is True)
    plain = alpha.add_table("Plain", columns=["Key", "Value"], parent_page=overview,
                            rows=[{"Key": "a", "Value": "1"}])
    beta = fake.add_doc("Beta Doc")
    home = beta.add_page("Home", content="# Home\n\nBeta home.\n")
    glossary = beta.add_table("Glossary", columns=["Term", "Meaning"], parent_page=home,
                              rows=[{"Term": "API", "Meaning": "Application programming interface"}])
    return SimpleNamespace(
        alpha=alpha, overview=overview, details=details, scratch=scratch, items=items,
        open_items=open_items, plain=plain, beta=beta, home=home, glossary=glossary,
        docs=[alpha, beta], pages=[overview, details, scratch, home],
    )


def manifest_entries(manifest: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Doc, page and table entries of a manifest by object id."""
    found: Dict[str, Dict[str, Any]] = {}
    for doc in manifest["docs"]:
        found[doc["id"]] = doc
        for child in doc["pages"] + doc["tables"]:
            found[child["id"]] = child
    return found


def flip_one_byte(path: Path) -> None:
    """Change one byte in place (same size, same inode), as an editor run by the owner could:
    snapshot files are read-only, so the owner makes it writable first."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    mode = path.stat().st_mode
    path.chmod(0o600)
    path.write_bytes(bytes(data))
    path.chmod(mode)


class IncrementalTestCase(BackupTestCase):
    def tearDown(self) -> None:
        self.assertEqual(self.fake.errors, [], "the fake hit an internal error")

    # -- running -----------------------------------------------------------------------

    def backup(self, *flags: str, expect: int = 0, output: Optional[Path] = None, extras: bool = False) -> Path:
        """Run a backup that must end with `expect`; return the new latest snapshot.

        Formulas, controls and sharing add five sequential requests per doc and are not what
        most of these tests are about, so runs pass --no-extras unless `extras` (every run of a
        test alike: the flag is part of the layout an incremental run compares).
        """
        code = self.run_backup(*flags, *([] if extras else ["--no-extras"]), output=output)
        self.assertEqual(code, expect, f"exit code; stderr:\n{self.stderr}")
        latest = coda_backup.read_latest(output or self.out)
        assert latest is not None
        return latest

    def verify(self, snapshot_name: Optional[str] = None) -> int:
        which = [snapshot_name] if snapshot_name else []
        return self.run_main(["--verify", *which, "--output", str(self.out)])

    def assert_stdout_names(self, word: str, relative: str) -> None:
        lines = self.stdout.splitlines()
        self.assertTrue(any(word in line and relative in line for line in lines),
                        f"no line names {relative} as {word}:\n{self.stdout}")

    # -- the request log ----------------------------------------------------------------

    def export_posts(self) -> List[str]:
        return [record.path for record in self.fake.requests("POST", r"/export$")]

    def rows_gets(self) -> List[str]:
        return [record.path for record in self.fake.requests("GET", r"/rows$")]

    def doc_requests(self, doc: Any) -> List[str]:
        pattern = rf"^/docs/{re.escape(doc.id)}(/|$)"
        return [f"{record.method} {record.path}" for record in self.fake.requests(None, pattern)]

    @staticmethod
    def export_path(page: Any) -> str:
        return f"/docs/{page.doc.id}/pages/{page.id}/export"

    @staticmethod
    def rows_path(table: Any) -> str:
        return f"/docs/{table.doc.id}/tables/{table.id}/rows"

    # -- files ---------------------------------------------------------------------------

    def page_file(self, snapshot: Path, page: Any, suffix: str = ".md") -> Path:
        return self.find_one(snapshot / "docs", f"*__{page.id}{suffix}")

    def table_csv(self, snapshot: Path, table: Any) -> Path:
        return self.find_one(snapshot / "docs", f"*__{table.id}.csv")

    def assert_linked(self, new: Path, old: Path) -> None:
        """Same file: a hard link on POSIX (same inode, two or more links), same bytes everywhere."""
        self.assertEqual(new.read_bytes(), old.read_bytes(), new)
        if os.name == "posix":
            self.assertEqual(new.stat().st_ino, old.stat().st_ino, f"{new} is not a hard link of {old}")
            self.assertGreaterEqual(new.stat().st_nlink, 2, new)

    def assert_not_linked(self, new: Path, old: Path) -> None:
        if os.name == "posix":
            self.assertNotEqual(new.stat().st_ino, old.stat().st_ino, f"{new} was linked, not downloaded")

    def assert_no_file_of(self, snapshot: Path, object_id: str) -> None:
        self.assertEqual(list(snapshot.rglob(f"*{object_id}*")), [], f"files of deleted {object_id} remain")


# --- nights with faults: a small nightly doc and snapshot bookkeeping ---------------------------

ENOUGH_RETRIES = ["--max-retries", "8"]  # a 10 % fault rate cannot exhaust nine attempts
TEMP_PREFIXES = (".tmp-", ".latest-")  # atomic_file's temp files and point_latest's temp symlink


def build_nightly(fake: FakeCoda, second_doc: bool = False, big_rows: int = 12) -> Dict[str, Any]:
    """One small doc (about 28 requests per run), optionally a second one.

    Pages: Home > Runbook, and the leaf Notes.  Tables: Tasks (on Home, `big_rows` rows), its view
    Big Tasks, People (on Notes).  One formula, so the extras fetch an item too.
    """
    doc = fake.add_doc("Nightly Ops", owned=True)
    home = doc.add_page("Home", content="# Home\n\nStart here.\n")
    runbook = doc.add_page("Runbook", parent=home, content="# Runbook\n\n1. Check the backup.\n")
    notes = doc.add_page("Notes", content="# Notes\n\nA leaf page with *markdown*.\n")
    tasks = doc.add_table("Tasks", parent_page=home, columns=[
        "Task", {"name": "Points", "type": "number"}, {"name": "Tags", "type": "select", "isArray": True},
    ])
    for i in range(big_rows):
        tasks.add_row({"Task": f"Task {i:02d}", "Points": i, "Tags": ["a", f"t{i % 3}"]})
    points = tasks.column("Points").id
    view = doc.add_view(tasks, "Big Tasks", row_filter=lambda values: (values.get(points) or 0) >= 5)
    people = doc.add_table("People", parent_page=notes, columns=["Name"], rows=[{"Name": "Ana"}, {"Name": "Bo"}])
    doc.add_formula("Total", 42, parent=home)
    data: Dict[str, Any] = {"doc": doc, "home": home, "runbook": runbook, "notes": notes,
                            "tasks": tasks, "view": view, "people": people}
    if second_doc:
        doc2 = fake.add_doc("Second Doc", owned=True)
        welcome = doc2.add_page("Welcome", content="# Welcome\n")
        glossary = doc2.add_table("Glossary", parent_page=welcome, columns=["Term"], rows=[{"Term": "API"}])
        data.update(doc2=doc2, welcome=welcome, glossary=glossary)
    return data


def snapshot_dirs(out: Path) -> Set[str]:
    if not out.is_dir():
        return set()
    return {p.name for p in out.iterdir() if coda_backup.SNAPSHOT_NAME_RE.match(p.name) and not p.is_symlink()}


def leftovers(root: Path) -> List[str]:
    """Temp files and temp symlinks anywhere under root (none may survive a run)."""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            if name.startswith(TEMP_PREFIXES):
                found.append(os.path.join(folder, name))
    return found


def rows_path(table: Any) -> str:
    return rf"/docs/{re.escape(table.doc.id)}/tables/{re.escape(table.id)}/rows$"


class ResilienceCase(BackupTestCase):
    """BackupTestCase plus snapshot bookkeeping shared by the tests below."""

    def tearDown(self) -> None:
        self.assertEqual(self.fake.errors, [], "the fake hit an internal error")

    def run_new(self, *extra: str, index: bool = False) -> tuple[int, Path]:
        """Run the CLI; return the exit code and the snapshot folder this run created."""
        before = snapshot_dirs(self.out)
        code = self.run_backup(*extra, index=index)
        created = snapshot_dirs(self.out) - before
        self.assertEqual(len(created), 1, f"expected one new snapshot, got {created}; stderr:\n{self.stderr}")
        return code, self.out / created.pop()

    def clean_snapshot(self, *extra: str, index: bool = False) -> Path:
        code, snapshot = self.run_new(*extra, index=index)
        self.assertEqual(code, 0, f"clean run failed:\n{self.stderr}")
        self.assertEqual(self.summary(snapshot)["status"], "completed")
        return snapshot

    def assertSameTree(self, expected: Path, actual: Path) -> None:
        want, got = tree_bytes(expected), tree_bytes(actual)
        self.assertEqual(sorted(got), sorted(want), "different files")
        differing = [name for name in want if want[name] != got[name]]
        self.assertEqual(differing, [], "files whose bytes differ from the clean run")

    def assertNoLeftovers(self) -> None:
        self.assertEqual(leftovers(self.out), [], "temp files left behind")

    def failure_for(self, summary: Dict[str, Any], object_id: str) -> Dict[str, Any]:
        matches = [f for f in summary["failures"] if f.get("id") == object_id]
        self.assertEqual(len(matches), 1, f"one failure for {object_id}: {summary['failures']}")
        return matches[0]

    def manifest_entry(self, snapshot: Path, object_id: str) -> Dict[str, Any]:
        for doc in self.manifest(snapshot)["docs"]:
            if doc["id"] == object_id:
                return doc
            for child in doc["pages"] + doc["tables"]:
                if child["id"] == object_id:
                    return child
        self.fail(f"{object_id} not in the manifest")
