"""The web labeller on a loopback port: who may see and do what (tokens, cookies, CSRF), model text shown as
text, every label in the fsynced log once however many annotators post at once; and the real command:
links printed, kill -9 and restart losing nothing, records written when it stops."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from helpers import read_jsonl, write_recipe
from dpo_cli.data.assignment import assign
from dpo_cli.data.labels import LabelLog
from dpo_cli.data.prefs import Pair
from dpo_cli.data.web import ADMIN, COOKIE, Desk, build_app, csrf_for, load_tokens, records_of

EVIL = '<script>alert("x")</script><img src=x onerror="alert(1)">'


def make_desk(tmp_path, pairs, annotators, overlap=0.0):
    log = LabelLog(tmp_path / "labels.jsonl")
    tokens = load_tokens(tmp_path / "serve-tokens.json", annotators)
    admin = next(t for t, n in tokens.items() if n == ADMIN)
    return Desk(
        units={getattr(p, "pair_id", None) or p.item_id: p for p in pairs}, queues=assign([getattr(p, "pair_id", None) or p.item_id for p in pairs], annotators, overlap, 0), log=log, seed=0,
        tokens=tokens, csrf_key=admin.encode(), records=records_of(pairs, log, "all", "keep", {}), train_hint=["dpo-cli dpo RECIPE"],
    )  # fmt: skip


@pytest.fixture()
def server(tmp_path):
    """start(desk) -> the base URL of a real uvicorn server on a free loopback port, serving build_app(desk)."""
    import uvicorn

    running = []

    def start(desk):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(build_app(desk), log_level="warning", access_log=False))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        running.append((server, thread))
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        for _ in range(100):
            try:
                if httpx.get(base + "/health").status_code == 200:
                    return base
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("the server did not start")

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=5)


def token_of(desk, name):
    return next(t for t, n in desk.tokens.items() if n == name)


def login(base, desk, name) -> httpx.Client:
    client = httpx.Client(base_url=base)
    response = client.get("/", params={"token": token_of(desk, name)})
    assert response.status_code == 303 and response.headers["location"] == ("/admin" if name == ADMIN else "/label")
    assert "httponly" in response.headers["set-cookie"].lower() and "samesite=lax" in response.headers["set-cookie"].lower()
    return client


def label(client, desk, name, pair_id, choice, reason=""):
    form = {"csrf": csrf_for(desk, token_of(desk, name)), "pair_id": pair_id, "choice": choice, "reason": reason}
    return client.post("/label", data=form)


def pairs_of(n):
    return [Pair(f"{i}-0-1", f"Review {i}.", f" Great film {i}.", f" Dull film {i}.") for i in range(n)]


def test_tokens_cookies_and_who_sees_what(tmp_path, server):
    desk = make_desk(tmp_path, pairs_of(6), ["alice", "bob"])
    base = server(desk)
    assert httpx.get(base + "/label").status_code == 401  # no token
    assert httpx.get(base + "/", params={"token": "not-a-token"}).status_code == 401
    assert httpx.get(base + "/admin", cookies={COOKIE: "forged"}).status_code == 401
    alice, admin = login(base, desk, "alice"), login(base, desk, ADMIN)
    page = alice.get("/label")
    assert page.status_code == 200 and "0 / 3" in page.text and "alice" in page.text
    assert len(desk.queues["alice"]) == 3
    assert alice.get("/admin").status_code == 403 and alice.get("/admin/prefs.jsonl").status_code == 403  # admin only
    assert admin.get("/label").status_code == 403
    bobs_only = set(desk.queues["bob"]) - set(desk.queues["alice"])
    assert bobs_only and label(alice, desk, "alice", sorted(bobs_only)[0], "left").status_code == 400  # another annotator's pair
    shown = []
    for _ in desk.queues["alice"]:
        text = alice.get("/label").text
        shown.append(re.search(r'name="pair_id" value="([^"]+)"', text).group(1))
        assert not any(f"Great film {p.split('-')[0]}." in text for p in bobs_only)  # never another's data
        label(alice, desk, "alice", shown[-1], "tie")
    assert shown == desk.queues["alice"]  # her own pairs, in her own order
    assert "m=" not in alice.get("/label", params={"m": "<b>call 555</b>"}).text and "call 555" not in alice.get("/label", params={"m": "call 555"}).text
    headers = page.headers
    assert "script-src 'self'" in headers["content-security-policy"] and "unsafe-inline" not in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "no-referrer"
    assert (tmp_path / "serve-tokens.json").stat().st_mode & 0o777 == 0o600


def test_state_changes_need_post_and_the_holders_csrf_token(tmp_path, server):
    desk = make_desk(tmp_path, pairs_of(4), ["alice", "bob"])
    base = server(desk)
    alice = login(base, desk, "alice")
    pair_id = desk.queues["alice"][0]
    assert alice.post("/label", data={"pair_id": pair_id, "choice": "left"}).status_code == 403  # no CSRF token
    bobs = {"csrf": csrf_for(desk, token_of(desk, "bob")), "pair_id": pair_id, "choice": "left"}
    assert alice.post("/label", data=bobs).status_code == 403  # another holder's token
    assert alice.get("/label", params={"pair_id": pair_id, "choice": "left"}).status_code == 200 and not desk.log.events  # GET changes nothing
    big = {"csrf": csrf_for(desk, token_of(desk, "alice")), "pair_id": pair_id, "choice": "left", "reason": "x" * 20000}
    assert alice.post("/label", data=big).status_code == 403  # over the body limit
    assert not desk.log.events
    assert label(alice, desk, "alice", pair_id, "left", reason="clearer").status_code == 303
    assert label(alice, desk, "alice", pair_id, "right").status_code == 303  # a resent form labels once
    events = read_jsonl(tmp_path / "labels.jsonl")
    assert len(events) == 1 and events[0]["reason"] == "clearer" and events[0]["choice"] == ("B" if events[0]["swapped"] else "A")
    assert alice.post("/undo", data={"csrf": csrf_for(desk, token_of(desk, "alice"))}).headers["location"] == "/label?m=undone"
    assert read_jsonl(tmp_path / "labels.jsonl")[-1]["event"] == "undo"


def test_model_text_is_escaped_never_rendered(tmp_path, server):
    pairs = [Pair("0-0-1", [{"role": "user", "content": EVIL}], EVIL, " fine"), Pair("1-0-1", EVIL, " a", " b")]
    desk = make_desk(tmp_path, pairs, ["alice"])
    base = server(desk)
    alice, admin = login(base, desk, "alice"), login(base, desk, ADMIN)
    page = alice.get("/label").text
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page
    assert page.count("<script") == 1  # the page's own script tag only (no inline script)
    for pair_id in desk.queues["alice"]:
        label(alice, desk, "alice", pair_id, "left")
    assert "<script>alert" not in admin.get("/admin").text
    records = [json.loads(line) for line in admin.get("/admin/prefs.jsonl").text.splitlines()]
    assert len(records) == 2 and json.dumps(EVIL) in json.dumps(records)  # the records keep the text as it was


@pytest.mark.parametrize("how", ["link", "cookie"])
def test_too_many_wrong_tokens_are_rate_limited(how, tmp_path, server):
    desk = make_desk(tmp_path, pairs_of(2), ["alice"])
    base = server(desk)
    guess = lambda i: httpx.get(base + "/", params={"token": f"guess-{i}"}) if how == "link" else httpx.get(base + "/admin", cookies={COOKIE: f"guess-{i}"})  # noqa: E731
    codes = [guess(i).status_code for i in range(22)]
    assert codes[:20] == [401] * 20 and codes[20:] == [429, 429]
    assert httpx.get(base + "/", params={"token": token_of(desk, "alice")}).status_code == 429  # this address waits a minute


def test_a_label_is_fsynced_before_the_page_moves_on(tmp_path, server, monkeypatch):
    import dpo_cli.data.labels as labels

    desk = make_desk(tmp_path, pairs_of(2), ["alice"])
    base = server(desk)
    alice = login(base, desk, "alice")
    synced = []
    real = labels.os.fsync
    monkeypatch.setattr(labels.os, "fsync", lambda fd: (synced.append((tmp_path / "labels.jsonl").read_bytes()), real(fd))[1])
    assert label(alice, desk, "alice", desk.queues["alice"][0], "left").status_code == 303
    assert len(synced) == 1 and synced[0].count(b"\n") == 1  # the label's line was written and fsynced before the reply


def test_twenty_annotators_label_five_hundred_pairs_at_once(tmp_path, server):
    """Every label lands in the log exactly once, each line whole, with 20 clients posting at the same time."""
    names = [f"ann{i}" for i in range(20)]
    desk = make_desk(tmp_path, pairs_of(500), names, overlap=0.1)
    base = server(desk)

    def work(name):
        client = login(base, desk, name)
        for pair_id in desk.queues[name]:
            assert label(client, desk, name, pair_id, "left" if hash(pair_id) % 2 else "right").status_code == 303
        return client.get("/label").text

    with ThreadPoolExecutor(20) as pool:
        finals = list(pool.map(work, names))
    assert all("All done" in text for text in finals)
    raw = (tmp_path / "labels.jsonl").read_bytes().splitlines()
    events = [json.loads(line) for line in raw]  # every line whole
    assigned = sum(len(q) for q in desk.queues.values())
    assert assigned == 550 and len(events) == assigned == len({(e["pair_id"], e["annotator"]) for e in events})
    assert len({e["id"] for e in events}) == assigned
    admin = login(base, desk, ADMIN).get("/admin").text
    duos = re.findall(r"<td>(ann\d+) vs (ann\d+)</td><td>(\d+)</td>", admin)
    assert len(duos) == 20 and all(int(n) >= 2 for _, _, n in duos)  # a ring of duos, each sharing enough pairs


@pytest.fixture()
def serve_recipe(tmp_path, tiny_model_dir):
    return write_recipe(tmp_path / "serve.yaml", {
        "stage": "collect-prefs", "seed": 3, "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": "demo:prompts?n=8", "max_length": 64}, "generation": {"max_new_tokens": 6, "batch_size": 16},
        "collect": {"samples_per_prompt": 2}, "label": {"by": "human", "overlap": 0.5},
    })  # fmt: skip


def start_command(recipe, run):
    args = [sys.executable, "-m", "dpo_cli", "collect-prefs", str(recipe), "--run-dir", str(run), "--serve", "--port", "0", "--annotators", "alice,bob"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "400"})
    links = {}
    for line in process.stdout:
        found = re.search(r"(link for (\w+)|admin link): (http://\S+)", line)
        if found:
            links[found.group(2) or "admin"] = found.group(3)
        if len(links) == 3:
            return process, links
    raise AssertionError("no links printed")


def test_the_command_serves_survives_kill_9_and_writes_records_when_stopped(tmp_path, serve_recipe):
    run = tmp_path / "run"
    process, links = start_command(serve_recipe, run)
    try:
        alice = httpx.Client(follow_redirects=False)
        assert alice.get(links["alice"]).status_code == 303
        base = links["alice"].split("/?")[0]
        page = alice.get(base + "/label").text
        total = int(re.search(r"0 / (\d+)", page).group(1))
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
        for _ in range(2):
            pair_id = re.search(r'name="pair_id" value="([^"]+)"', alice.get(base + "/label").text).group(1)
            assert alice.post(base + "/label", data={"csrf": csrf, "pair_id": pair_id, "choice": "left"}).status_code == 303
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert len(read_jsonl(run / "labels.jsonl")) == 2  # fsynced before the page moved on

    process, again = start_command(serve_recipe, run)  # the same links, alice where she stopped
    try:
        assert {k: v.split("token=")[1] for k, v in again.items()} == {k: v.split("token=")[1] for k, v in links.items()}  # port 0: a new port
        alice = httpx.Client()
        alice.get(again["alice"])
        assert f"2 / {total}" in alice.get(again["alice"].split("/?")[0] + "/label").text
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
    assert process.returncode == 0, out
    records = read_jsonl(run / "prefs.jsonl")
    assert len(records) == 2 and all(r["labeler"] == "human" and r["annotator"] == "alice" for r in records)
    assert json.loads((run / "summary.json").read_text())["status"] == "partial"  # bob has not started


def test_serve_options_are_checked(cli, serve_recipe):
    code, _, err = cli("collect-prefs", serve_recipe, "--port", "9000")
    assert code == 1 and "--host, --port and --annotators go with --serve" in err
    code, _, err = cli("validate", serve_recipe, "--set", "label.annotators=[alice, alice]")
    assert code == 1 and "name each annotator once" in err
    code, _, err = cli("validate", serve_recipe, "--set", "label.annotators=['a b']")
    assert code == 1 and "use letters, digits" in err


@pytest.mark.slow  # a real browser: make test-all installs it (make browser-deps)
def test_a_real_browser_labels_with_the_keyboard(tmp_path, server):
    """Headless chromium opens an annotator's link, labels with the keys 1 / 2 / t, undoes with u, meets a
    response holding a script that must not run, and the admin page shows the labels. Screenshots of both pages
    go to $DPO_CLI_SCREENSHOTS when set (scripts/web_screenshots.sh puts them in docs/images)."""
    import shutil

    from helpers import skip_without_system

    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        skip_without_system("no chromium / chromedriver on this machine (make browser-deps installs them)")
    try:
        from selenium import webdriver
    except ImportError:
        skip_without_system("selenium is not installed (make browser-deps)")
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    pairs = pairs_of(4) + [Pair("4-0-1", "A film with a twist.", EVIL, " A fine twist.")]
    desk = make_desk(tmp_path, pairs, ["alice"])
    base = server(desk)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)
    shots = os.environ.get("DPO_CLI_SCREENSHOTS")
    try:
        browser.get(f"{base}/?token={token_of(desk, 'alice')}")
        assert browser.current_url.endswith("/label") and browser.find_element(By.ID, "progress").text == "0 / 5"
        if shots:
            browser.save_screenshot(os.path.join(shots, "web-label.png"))
        for key, count in (("1", 1), ("2", 2), ("u", 1), ("t", 2), ("1", 3), ("2", 4), ("s", 5)):
            browser.find_element(By.TAG_NAME, "body").send_keys(key)
            for _ in range(50):  # the form is posted and the next page loaded
                if f"{count} / 5" in browser.page_source:
                    break
                time.sleep(0.1)
            assert f"{count} / 5" in browser.page_source, (key, browser.page_source[:500])
            with pytest.raises(NoAlertPresentException):
                browser.switch_to.alert.text  # the script in a response never ran
        assert "All done" in browser.page_source
        browser.get(f"{base}/?token={token_of(desk, ADMIN)}")
        assert browser.current_url.endswith("/admin") and "Labelling progress" in browser.page_source
        if shots:
            browser.save_screenshot(os.path.join(shots, "web-admin.png"))
    finally:
        browser.quit()
    events = read_jsonl(tmp_path / "labels.jsonl")
    assert [e["event"] for e in events] == ["label", "label", "undo", "label", "label", "label", "label"]
    records, counts = desk.records()
    assert len(records) == 4 and sum(r["tie"] for r in records) == 1 and counts == {"skipped": 1}  # a skip makes no record


def test_thumbs_up_and_down_in_the_browser(tmp_path, server):
    """collect.mode thumbs served: one response a page, up / down / skip, unpaired records for KTO."""
    from dpo_cli.data.thumbs import Item

    items = [Item(f"{i}-0", f"Review {i}.", EVIL if i == 0 else f" Film {i}.") for i in range(4)]
    desk = make_desk(tmp_path, items, ["alice"])
    desk.records = records_of(items, desk.log, "majority", "drop", {})
    base = server(desk)
    alice = login(base, desk, "alice")
    page = alice.get("/label").text
    assert "Is this a good response" in page and 'value="up"' in page and "<script>alert" not in page
    assert label(alice, desk, "alice", desk.queues["alice"][0], "left").status_code == 400  # a pair's choice
    given = dict(zip(desk.queues["alice"], ["up", "down", "skip", "up"]))
    for item_id, choice in given.items():
        assert label(alice, desk, "alice", item_id, choice).status_code == 303
    assert "All done" in alice.get("/label").text
    records, counts = desk.records()
    assert {r["id"]: r["label"] for r in records} == {i: c == "up" for i, c in given.items() if c != "skip"} and counts == {"skipped": 1}
    admin = login(base, desk, ADMIN).get("/admin").text
    assert "thumbs up: 2, thumbs down: 1" in admin
