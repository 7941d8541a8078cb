"""Tests of the fake Coda API itself, over real HTTP with urllib.

Why: every end-to-end test trusts the fake; if its pagination, faults or export flow drift from the
real API's contract, the CLI tests prove nothing.  These tests pin the contract the others rely on.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import http.client
import json
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

from fake_coda import FakeCoda, LazyRows, build_large_workspace, build_sample_workspace

TOKEN = "test-token"


def call(
    url: str, method: str = "GET", body: Optional[Dict[str, Any]] = None,
    token: Optional[str] = TOKEN, headers: Optional[Dict[str, str]] = None,
) -> Tuple[int, Dict[str, str], bytes]:
    """One request; returns (status, headers with lowercase names, raw body) even for errors."""
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        all_headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


class FakeTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.fake = FakeCoda(token=TOKEN, seed=0).start()
        self.addCleanup(self.fake.stop)
        self.data = build_sample_workspace(self.fake)
        self.doc = self.data["doc"]

    def tearDown(self) -> None:
        self.assertEqual(self.fake.errors, [], "the fake hit an internal error")

    def api(self, path: str, **kwargs: Any) -> Tuple[int, Dict[str, str], bytes]:
        return call(self.fake.api_url + path, **kwargs)

    def api_json(self, path: str, **kwargs: Any) -> Any:
        status, _, body = self.api(path, **kwargs)
        self.assertLess(status, 300, body)
        return json.loads(body)


class AuthAndShapesTest(FakeTestCase):
    def test_missing_or_wrong_token_is_401_with_error_body(self) -> None:
        for token in (None, "wrong"):
            with self.subTest(token=token):
                status, _, body = self.api("/whoami", token=token)
                self.assertEqual(status, 401)
                self.assertEqual(json.loads(body), {
                    "statusCode": 401, "statusMessage": "Unauthorized", "message": "Unauthorized",
                })

    def test_unknown_path_404_and_wrong_method_405(self) -> None:
        self.assertEqual(self.api("/nope")[0], 404)
        self.assertEqual(self.api("/whoami", method="POST", body={})[0], 405)

    def test_is_owner_filters_shared_docs_and_workspace_filter(self) -> None:
        owned = {d["name"] for d in self.api_json("/docs?isOwner=true")["items"]}
        everything = {d["name"] for d in self.api_json("/docs")["items"]}
        ws2 = {d["name"] for d in self.api_json("/docs?workspaceId=ws-2")["items"]}
        self.assertNotIn("Partner Roadmap", owned)
        self.assertIn("Partner Roadmap", everything)
        self.assertEqual(ws2, {"Other Workspace Doc"})

    def test_table_list_has_references_only_and_table_types_filter(self) -> None:
        path = f"/docs/{self.doc.id}/tables"
        refs = self.api_json(path + "?limit=100")["items"]
        self.assertTrue(all("rowCount" not in ref and "parentTable" not in ref for ref in refs))
        views = self.api_json(path + "?tableTypes=view")["items"]
        self.assertEqual([v["id"] for v in views], [self.data["view"].id])
        view = self.api_json(f"{path}/{self.data['view'].id}")
        self.assertEqual(view["parentTable"]["id"], self.data["tasks"].id)
        self.assertEqual(view["rowCount"], 3)

    def test_value_formats_and_hidden_flags(self) -> None:
        tasks = self.data["tasks"]
        tags = tasks.column("Tags").id
        path = f"/docs/{self.doc.id}/tables/{tasks.id}/rows"
        simple = self.api_json(path)["items"][0]["values"][tags]
        arrays = self.api_json(path + "?valueFormat=simpleWithArrays")["items"][0]["values"][tags]
        self.assertEqual((simple, arrays), ("planning,docs", ["planning", "docs"]))
        page = self.api_json(f"/docs/{self.doc.id}/pages/{self.data['hidden_child'].id}")
        self.assertEqual((page["isHidden"], page["isEffectivelyHidden"]), (False, True))


class PaginationTest(FakeTestCase):
    def test_token_carries_params_and_other_params_are_ignored(self) -> None:
        self.fake.max_limit = 50
        table = self.data["big_table"]
        path = f"/docs/{self.doc.id}/tables/{table.id}/rows"
        first = self.api_json(path + "?limit=1000&valueFormat=simpleWithArrays")
        self.assertEqual(len(first["items"]), 50)  # clamped silently
        token = urllib.parse.quote(first["nextPageToken"])
        second = self.api_json(f"{path}?pageToken={token}&limit=3&valueFormat=bogus")
        self.assertEqual(len(second["items"]), 50)
        self.assertEqual(second["items"][0]["index"], 50)
        third = json.loads(urllib.request.urlopen(urllib.request.Request(
            second["nextPageLink"], headers={"Authorization": f"Bearer {TOKEN}"})).read())
        self.assertEqual(len(third["items"]), 20)
        self.assertNotIn("nextPageToken", third)
        self.assertNotIn("nextPageLink", third)
        names = [r["name"] for page in (first, second, third) for r in page["items"]]
        self.assertEqual(names, [f"Item {i:03d}" for i in range(120)])

    def test_invalid_token_is_400_and_columns_cap_at_100(self) -> None:
        path = f"/docs/{self.doc.id}/tables/{self.data['wide_table'].id}/columns"
        self.assertEqual(self.api(path + "?pageToken=garbage")[0], 400)
        self.assertEqual(len(self.api_json(path + "?limit=500")["items"]), 60)
        self.fake.max_limit = 7
        self.assertEqual(len(self.api_json(path + "?limit=500")["items"]), 7)

    def test_repeat_token_returns_the_same_token_forever(self) -> None:
        self.fake.max_limit = 2
        self.fake.repeat_token = r"/pages$"
        first = self.api_json(f"/docs/{self.doc.id}/pages")
        token = first["nextPageToken"]
        for _ in range(3):
            page = self.api_json(f"/docs/{self.doc.id}/pages?pageToken={token}")
            self.assertEqual(page["nextPageToken"], token)

    def test_endless_tokens_start_over_with_a_fresh_token_each_page(self) -> None:
        self.fake.max_limit = 3
        self.fake.endless_tokens = r"/docs$"
        ids, tokens, page = [], set(), self.api_json("/docs")
        for _ in range(4):
            ids += [doc["id"] for doc in page["items"]]
            tokens.add(page["nextPageToken"])
            page = self.api_json(f"/docs?pageToken={page['nextPageToken']}")
        every = [doc.id for doc in self.fake.docs]
        self.assertLess(len(every), len(ids), "the listing goes on past its last item")
        self.assertEqual(len(tokens), 4, "a fresh token on every page")
        self.assertEqual(ids[:len(every)], every)
        self.assertLessEqual(set(ids), set(every), "past the end, the same items again")

    def test_duplicate_ids_repeat_the_last_item_of_the_page_before(self) -> None:
        self.fake.max_limit = 2
        self.fake.duplicate_ids = r"/pages$"
        first = self.api_json(f"/docs/{self.doc.id}/pages")
        second = self.api_json(f"/docs/{self.doc.id}/pages?pageToken={first['nextPageToken']}")
        self.assertEqual(second["items"][0]["id"], first["items"][-1]["id"])
        self.assertEqual(len(second["items"]), 3)


class ExportTest(FakeTestCase):
    def start_export(self, page_id: str, output_format: str = "markdown") -> Dict[str, Any]:
        status, _, body = self.api(f"/docs/{self.doc.id}/pages/{page_id}/export", method="POST",
                                   body={"outputFormat": output_format})
        self.assertEqual(status, 202, body)
        started: Dict[str, Any] = json.loads(body)
        return started

    def test_export_flow_with_delay_and_download_without_auth(self) -> None:
        self.fake.export_delay = 60.0  # renders until the test says otherwise, however slow the machine
        page = self.data["page_c"]
        started = self.start_export(page.id)
        self.assertEqual(started["status"], "inProgress")
        status_path = started["href"][len(self.fake.api_url):]
        self.assertEqual(self.api_json(status_path)["status"], "inProgress")
        page.content = "# Changed after export\n"  # the export keeps the content of its POST
        self.fake.export_delay = 0.0
        done = self.api_json(status_path)
        self.assertEqual(done["status"], "complete")
        self.assertTrue(done["downloadLink"].startswith(self.fake.download_url + "/blobs/"))
        self.assertIn("X-Amz-Expires=300", done["downloadLink"])
        status, headers, body = call(done["downloadLink"], token=None)
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/markdown"))
        self.assertIn("Kick-off 🚀", body.decode("utf-8"))
        status, _, body = call(done["downloadLink"], token=TOKEN)
        self.assertEqual(status, 400)
        self.assertIn(b"Only one auth mechanism allowed", body)
        leaked = self.fake.requests(host="download")[-1]
        self.assertEqual(leaked.headers["authorization"], f"Bearer {TOKEN}")

    def test_bad_format_and_sync_page_are_400(self) -> None:
        path = f"/docs/{self.doc.id}/pages/{self.data['page_a'].id}/export"
        self.assertEqual(self.api(path, method="POST", body={"outputFormat": "pdf"})[0], 400)
        sync = f"/docs/{self.doc.id}/pages/{self.data['sync_page'].id}/export"
        self.assertEqual(self.api(sync, method="POST", body={"outputFormat": "html"})[0], 400)

    def test_expire_fail_and_download_expiry_counters(self) -> None:
        page = self.data["page_a"]
        page.export_expire_times = 1
        page.export_fail_times = 1
        page.download_expire_times = 1
        status_path = self.start_export(page.id, "html")["href"][len(self.fake.api_url):]
        self.assertEqual(self.api(status_path)[0], 404)
        self.assertEqual(self.api(status_path)[0], 404, "an expired export is forgotten")
        status_path = self.start_export(page.id, "html")["href"][len(self.fake.api_url):]
        self.assertEqual(self.api_json(status_path)["error"], "Export failed")
        status_path = self.start_export(page.id, "html")["href"][len(self.fake.api_url):]
        link = self.api_json(status_path)["downloadLink"]
        status, _, body = call(link, token=None)
        self.assertEqual(status, 403)
        self.assertIn(b"<Code>AccessDenied</Code>", body)
        fresh = self.api_json(status_path)["downloadLink"]
        self.assertNotEqual(fresh, link)
        status, headers, body = call(fresh, token=None)
        self.assertEqual(status, 200)
        self.assertIn(b"<h1>Launch Status</h1>", body)


class SwitchesTest(FakeTestCase):
    def test_sliding_window_rate_limit(self) -> None:
        now = [100.0]  # a clock of the test's own: the window is counted, not raced
        self.fake.rate_clock = lambda: now[0]
        self.fake.rate_limits = {"read": (3, 0.3)}
        self.fake.retry_after = 1
        statuses = [self.api("/whoami")[0] for _ in range(4)]
        self.assertEqual(statuses, [200, 200, 200, 429])
        status, headers, body = self.api("/whoami")
        self.assertEqual((status, headers.get("retry-after")), (429, "1"))
        self.assertEqual(json.loads(body)["statusMessage"], "Too Many Requests")
        self.assertEqual(self.fake.rate_limited, 2)
        self.assertEqual(self.api("/docs")[0], 200, "listing docs is another category")
        now[0] += 0.29
        self.assertEqual(self.api("/whoami")[0], 429, "the window still holds three")
        now[0] += 0.02
        self.assertEqual(self.api("/whoami")[0], 200)

    def test_rate_models_differ_after_a_burst(self) -> None:
        """A bucket refills steadily; a sliding window waits until the whole window has passed."""
        now = [100.0]
        self.fake.rate_clock = lambda: now[0]
        self.fake.rate_limits = {"read": (2, 2.0)}
        for model, expected in (("window", [200, 200, 429, 429, 429, 200]), ("bucket", [200, 200, 429, 200, 429, 200])):
            with self.subTest(model=model):
                self.fake.rate_model = model
                now[0] += 10.0  # a fresh window and a full bucket
                statuses = [self.api("/whoami")[0] for _ in range(3)]
                now[0] += 1.2  # the bucket has regained one token; the window still holds both
                statuses += [self.api("/whoami")[0] for _ in range(2)]
                now[0] += 1.0  # past the window; the bucket gained one more
                statuses.append(self.api("/whoami")[0])
                self.assertEqual(statuses, expected)

    def test_scripted_fault_is_used_up(self) -> None:
        self.fake.add_fault(r"^/whoami$", status=503, times=2, headers={"X-Why": "test"})
        results = [self.api("/whoami") for _ in range(3)]
        self.assertEqual([r[0] for r in results], [503, 503, 200])
        self.assertEqual(results[0][1]["x-why"], "test")
        self.assertEqual([r.fault for r in self.fake.requests(path="whoami")], ["status", "status", None])

    def test_random_faults_are_reproducible_per_seed(self) -> None:
        def statuses(seed: int) -> List[int]:
            with FakeCoda(token=TOKEN, seed=seed) as fake:
                fake.fault_rate = 0.5
                fake.fault_kinds = ("500", "503", "429")
                return [call(fake.api_url + "/whoami")[0] for _ in range(20)]

        first = statuses(7)
        self.assertEqual(first, statuses(7))
        self.assertTrue({500, 503, 429} & set(first) and 200 in first)

    def test_reset_truncated_and_notjson_faults(self) -> None:
        path = f"/docs/{self.doc.id}/pages/{self.data['page_a'].id}/export"
        self.fake.add_fault(r"/export$", method="POST", kind="truncated")
        status, _, body = self.api(path, method="POST", body={"outputFormat": "markdown"})
        self.assertEqual(status, 200)
        with self.assertRaises(ValueError):
            json.loads(body)
        self.assertEqual(self.fake._exports, {}, "a faulted export POST creates nothing")
        self.fake.add_fault(r"^/whoami$", kind="notjson")
        status, headers, _ = self.api("/whoami")
        self.assertTrue(headers["content-type"].startswith("text/html"))
        self.fake.add_fault(r"^/whoami$", kind="reset")
        with self.assertRaises((ConnectionError, urllib.error.URLError, http.client.HTTPException)):
            self.api("/whoami")
        self.assertEqual(self.fake.requests(path="whoami")[-1].status, 0)

    def test_doc_forbidden_and_stale(self) -> None:
        self.doc.stale_times = 1
        latest = {"X-Coda-Doc-Version": "latest"}
        status, _, body = self.api(f"/docs/{self.doc.id}/pages", headers=latest)
        self.assertEqual((status, json.loads(body)["message"]), (400, "Doc is not yet up to date."))
        self.assertEqual(self.api(f"/docs/{self.doc.id}/pages", headers=latest)[0], 200)
        self.doc.forbidden = True
        self.assertEqual(self.api(f"/docs/{self.doc.id}/tables")[0], 403)
        self.assertIn(self.doc.id, [d["id"] for d in self.api_json("/docs")["items"]])

    def test_max_in_flight_counts_concurrent_requests(self) -> None:
        together = threading.Barrier(4, timeout=10)  # no request is answered before all four arrived
        self.fake.before_api.append(lambda request: together.wait())
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda _: self.api("/whoami")[0], range(4)))
        self.assertEqual(statuses, [200] * 4)
        self.assertEqual(self.fake.max_in_flight, 4)
        self.fake.before_api.clear()
        self.fake.clear_log()
        self.api("/whoami")
        self.assertEqual(self.fake.max_in_flight, 1)

    def test_gzip_when_accepted(self) -> None:
        self.fake.gzip = True
        status, headers, body = self.api("/whoami", headers={"Accept-Encoding": "gzip"})
        self.assertEqual(headers.get("content-encoding"), "gzip")
        self.assertEqual(json.loads(gzip.decompress(body))["loginId"], "user@example.com")


class LifecycleTest(unittest.TestCase):
    def test_keep_alive_and_stop_with_an_idle_connection(self) -> None:
        fake = FakeCoda(token=TOKEN).start()
        port = int(fake.api_url.split(":")[2].split("/")[0])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        self.addCleanup(connection.close)
        sockets = []
        for _ in range(2):
            connection.request("GET", "/apis/v1/whoami", headers={"Authorization": f"Bearer {TOKEN}"})
            response = connection.getresponse()
            response.read()
            self.assertEqual(response.status, 200)
            sockets.append(connection.sock)
        self.assertIs(sockets[0], sockets[1], "the connection was kept alive")
        started = time.monotonic()
        fake.stop()  # the idle keep-alive connection must not make this wait (its idle timeout is 60 s)
        self.assertLess(time.monotonic() - started, 10.0)

    def test_large_workspace_is_cheap_and_pages_rows(self) -> None:
        with FakeCoda(token=TOKEN) as fake:
            data = build_large_workspace(fake, docs=2, pages=10, tables=2, rows=200_000)
            # cheap by construction, not by a stopwatch: rows are made from their index when read
            self.assertTrue(all(isinstance(table.rows, LazyRows) for table in data["tables"]))
            self.assertEqual(data["rows"], 200_000)
            table = data["tables"][1]
            table.set_cell(99_999, "Name", "edited")
            url = f"{fake.api_url}/docs/{table.doc.id}/tables/{table.id}/rows?limit=200"
            _, _, body = call(url)
            first = json.loads(body)
            self.assertEqual(len(first["items"]), 200)
            self.assertEqual(table.rows[99_999].values[table.column("Name").id], "edited")
            self.assertEqual(len({row.id for row in table.rows[:1000]}), 1000)


if __name__ == "__main__":
    unittest.main()
