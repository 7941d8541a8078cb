"""Names and paths: every component is safe on Windows, macOS and Linux, and never escapes."""

import sys
import unittest
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import coda_backup as cb

WINDOWS_FORBIDDEN = set('<>:"/\\|?*')


def assert_portable(test: unittest.TestCase, name: str) -> None:
    test.assertTrue(name, "empty name")
    test.assertNotIn(name, (".", ".."))
    test.assertFalse(WINDOWS_FORBIDDEN & set(name), name)
    test.assertFalse(any(ord(ch) < 32 for ch in name), repr(name))
    test.assertFalse(name.endswith((".", " ")), name)
    test.assertFalse(name.startswith("."), name)
    test.assertLessEqual(len(name), cb.MAX_COMPONENT_CHARS)
    test.assertLessEqual(len(name.encode("utf-8")), cb.MAX_COMPONENT_BYTES)
    base = name.split(".")[0].strip().upper()
    test.assertNotIn(base, cb.RESERVED_NAMES, name)


class SafeComponentTest(unittest.TestCase):
    def test_table_of_names(self) -> None:
        cases = [
            ("Launch Status", "Launch Status"),
            ("a/b", "a_b"),
            ("a\\b", "a_b"),
            ("../x", "_x"),
            ("..", "_"),
            (".", "_"),
            ("", "_"),
            ("   ", "_"),
            ("trailing dot.", "trailing dot"),
            ("trailing space ", "trailing space"),
            ("CON", "_CON"),
            ("con", "_con"),
            ("aux.txt", "_aux.txt"),
            ("COM1", "_COM1"),
            ("LPT9.log", "_LPT9.log"),
            ("CONSOLE", "CONSOLE"),
            ("COM10", "COM10"),
            ('what?<>:"|*', "what_______"),
            ("tab\there\nnew\x00nul", "tab_here_new_nul"),
            ("🚀 Launch 🎉", "🚀 Launch 🎉"),
            ("\\\\?\\C:\\evil", "____C__evil"),
            ("/etc/passwd", "_etc_passwd"),
        ]
        for raw, expected in cases:
            with self.subTest(raw=raw):
                got = cb.safe_component(raw)
                self.assertEqual(got, expected)
                assert_portable(self, got)

    def test_unicode_is_normalised_to_nfc_not_escaped(self) -> None:
        decomposed = "Cafe\u0301"
        self.assertEqual(cb.safe_component(decomposed), "Caf\u00e9")

    def test_long_names_are_bounded_in_chars_and_bytes(self) -> None:
        for raw in ("x" * 300, "é" * 300, "🚀" * 300, "x" * 1000 + "."):
            with self.subTest(length=len(raw), first=raw[0]):
                assert_portable(self, cb.safe_component(raw))


class ObjectStemTest(unittest.TestCase):
    def test_id_is_appended_and_suffixes_fit(self) -> None:
        for name in ("Tasks", "x" * 300, "🚀" * 300, "CON", "../..", None, ""):
            with self.subTest(name=name):
                stem = cb.object_stem(name, "grid-pqRst-U")
                self.assertTrue(stem.endswith("__grid-pqRst-U"), stem)
                assert_portable(self, stem)
                for suffix in (".csv", ".columns.json", ".table.json", ".md", ".html"):
                    assert_portable(self, stem + suffix)

    def test_same_name_different_ids_never_collide(self) -> None:
        self.assertNotEqual(cb.object_stem("Notes", "canvas-a"), cb.object_stem("Notes", "canvas-b"))

    def test_hostile_id_is_sanitized_too(self) -> None:
        stem = cb.object_stem("x", "../../etc")
        assert_portable(self, stem)
        self.assertNotIn("/", stem)


class PathTest(unittest.TestCase):
    def test_page_stems_nest_children_in_parent_folders(self) -> None:
        pages = [
            {"id": "canvas-a", "name": "A"},
            {"id": "canvas-b", "name": "B", "parent": {"id": "canvas-a"}},
            {"id": "canvas-c", "name": "C", "parent": {"id": "canvas-b"}},
        ]
        stems = cb.page_stems(pages)
        self.assertEqual(stems["canvas-a"], PurePosixPath("pages/A__canvas-a"))
        self.assertEqual(stems["canvas-c"], PurePosixPath("pages/A__canvas-a/B__canvas-b/C__canvas-c"))

    def test_cycles_and_missing_parents_end(self) -> None:
        pages = [
            {"id": "p1", "name": "One", "parent": {"id": "p2"}},
            {"id": "p2", "name": "Two", "parent": {"id": "p1"}},
            {"id": "p3", "name": "Orphan", "parent": {"id": "gone"}},
        ]
        stems = cb.page_stems(pages)
        self.assertEqual(stems["p3"], PurePosixPath("pages/Orphan__p3"))
        self.assertEqual(stems["p1"], PurePosixPath("pages/Two__p2/One__p1"))

    def test_table_stem_uses_parent_page_and_kind(self) -> None:
        table = {"id": "grid-1", "name": "Tasks", "tableType": "table", "parent": {"id": "canvas-1", "name": "Launch"}}
        view = {"id": "table-1", "name": "Open", "tableType": "view", "parent": {"id": "canvas-1", "name": "Launch"}}
        self.assertEqual(cb.table_stem(table), PurePosixPath("tables/table/Launch__Tasks__grid-1"))
        self.assertEqual(cb.table_stem(view), PurePosixPath("tables/view/Launch__Open__table-1"))

    def test_allocator_separates_case_only_differences(self) -> None:
        paths = cb.PathAllocator()
        first = paths.claim(PurePosixPath("docs/Doc__AbC"))
        second = paths.claim(PurePosixPath("docs/Doc__abc"))
        self.assertEqual(first, PurePosixPath("docs/Doc__AbC"))
        self.assertEqual(second, PurePosixPath("docs/Doc__abc__2"))

    def test_inside_refuses_escapes(self) -> None:
        root = Path("/tmp/root")
        for bad in ("../x", "/etc/passwd", "a/../../b"):
            with self.subTest(bad=bad), self.assertRaises(cb.BackupError):
                cb.inside(root, PurePosixPath(bad))
        self.assertEqual(cb.inside(root, PurePosixPath("docs/a")), root / "docs" / "a")


if __name__ == "__main__":
    unittest.main()
