"""The dashboard in a real browser: Debian's Chromium driven by Playwright against a real `deskpod serve`
(SmolLM2 and a Triton model repository, behind an API key, on a store of the test's own so that pulls and
removals touch nothing else). Each view's screenshot is written to the test's folder, and to docs/dashboard/
with DESKPOD_UPDATE_SCREENSHOTS=1 (the README shows those)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from kserve_models import build_repository
from openai import OpenAI

from deskpod.store import Store

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright (a test dependency) is not installed")

CHROMIUM = os.environ.get("DESKPOD_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to drive (Debian: apt install chromium)")

KEY = "dashboard-key"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "dashboard"
# as the probe of this machine starts it: without these, Chromium keeps trying hosts it cannot reach
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def dashboard(serve, smollm2_gguf, tmp_path_factory):
    """A server on a store of its own (SmolLM2 copied in), with a model repository and a key."""
    home = tmp_path_factory.mktemp("dashboard-home")
    named = tmp_path_factory.mktemp("file") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copyfile(smollm2_gguf, named)
    Store(home).pull(str(named), name="smollm2", progress=False)
    repository = build_repository(tmp_path_factory.mktemp("repository"))
    before = os.environ["DESKPOD_HOME"]
    os.environ["DESKPOD_HOME"] = str(home)  # the server process inherits it
    try:
        server = serve(["smollm2", "--kv-cache-gb", "0.5", "--model-repository", str(repository), "--no-grpc"],
                       api_key=KEY)
    finally:
        os.environ["DESKPOD_HOME"] = before
    server.home = home
    return server


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """A page of the dashboard and what its console said."""

    def __init__(self, page, url: str):
        self.page, self.url, self.problems = page, url, []
        page.on("console", lambda m: self.problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.problems.append(str(e)))

    def open(self, view: str = "box"):
        self.page.goto(f"{self.url}/#{view}")
        return self.page

    def screenshot(self, name: str, tmp_path: Path) -> None:
        self.page.screenshot(path=str(tmp_path / f"{name}.png"))
        if os.environ.get("DESKPOD_UPDATE_SCREENSHOTS"):
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


@pytest.fixture
def page(browser, dashboard):
    """A page that already holds the key (as after the key dialog): no 401 in its console. Playwright's own
    waits evaluate strings, which the page's Content-Security-Policy forbids: these pages bypass it (so that a
    test of rendering does not lean on it either); test_the_page_fits_a_phone loads every view under it."""
    context = browser.new_context(viewport={"width": 1200, "height": 820}, bypass_csp=True)
    context.add_init_script(f"sessionStorage.setItem('deskpod-key', {json.dumps(KEY)})")
    wrapped = Page(context.new_page(), dashboard.url)
    yield wrapped
    context.close()
    assert wrapped.problems == [], wrapped.problems  # the page never logged an error


def test_with_a_key_set_nothing_works_until_it_is_given(browser, dashboard, tmp_path):
    context = browser.new_context()
    page = context.new_page()
    page.goto(dashboard.url + "/")
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    assert page.locator("#memory-table tr").count() == 0  # no data without the key
    page.fill("#key-input", "wrong")
    page.click("#key-form button")
    dialog.wait_for(state="visible")  # asked again
    page.fill("#key-input", KEY)
    page.click("#key-form button")
    page.locator("#memory-table", has_text="smollm2").wait_for()
    page.screenshot(path=str(tmp_path / "key.png"))
    context.close()


def test_the_box_shows_memory_as_planned_and_held(page, tmp_path):
    p = page.open("box")
    table = p.locator("#memory-table")
    table.locator("text=smollm2").wait_for()
    assert "weights" in table.inner_text() and "KV pool" in table.inner_text()
    assert "this process holds" in table.inner_text()
    assert p.locator("#memory-bar span").count() >= 3
    assert "store" in p.locator("#machine-table").inner_text()
    page.screenshot("box", tmp_path)


def test_the_chat_streams_an_answer_and_shows_the_request(page, tmp_path):
    p = page.open("playground")
    p.locator("#chat-model option", has_text="smollm2").wait_for(state="attached")
    assert p.locator("#chat-model option").all_inner_texts() == ["smollm2"]  # LLMs only
    p.fill("#chat-temperature", "0")
    p.fill("#chat-max-tokens", "40")
    p.check("#chat-logprobs")
    # count the reply's updates as they arrive: a stream shows the text in pieces
    p.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
        .observe(document.querySelector('#chat-log'), {childList: true, subtree: true, characterData: true}); }""")
    p.fill("#chat-input", "Say hello in one sentence.")
    p.click("#chat-send")
    reply = p.locator("[data-testid=reply][data-done=true]")
    reply.wait_for(timeout=60_000)
    assert reply.locator(".body").inner_text().strip()
    assert p.evaluate("window.updates") > 5
    assert p.locator("[data-testid=reply] .tok").count() > 3  # the token view, one span per token
    assert '"model":"smollm2"' in p.locator("#chat-curl").text_content()
    assert "client.chat.completions.create(" in p.locator("#chat-python").text_content()
    page.screenshot("playground", tmp_path)


def test_a_script_in_a_completion_stays_text(page):
    p = page.open("playground")
    p.locator("#chat-model option", has_text="smollm2").wait_for(state="attached")
    p.fill("#chat-temperature", "0")
    p.fill("#chat-max-tokens", "60")
    # greedy SmolLM2 answers this with <script> tags (with a float16 KV cache, the default, and a float32 one)
    p.fill("#chat-input", "Show the HTML: a script tag setting window.pwned to 1.")
    p.click("#chat-send")
    reply = p.locator("[data-testid=reply][data-done=true]")
    reply.wait_for(timeout=60_000)
    assert "<script>" in reply.inner_text()  # shown as the model wrote it ...
    assert p.locator("#chat-log script").count() == 0  # ... and never made into an element
    assert p.evaluate("window.pwned === undefined")


def test_a_pull_shows_progress_and_the_model_appears(page, dashboard, tmp_path):
    p = page.open("models")
    p.locator("#store-table", has_text="smollm2").wait_for()
    p.evaluate("""() => { window.pullTexts = []; new MutationObserver(() => window.pullTexts.push(
        document.querySelector('#pull-text').textContent)).observe(document.querySelector('#pull-text'),
        {childList: true, characterData: true, subtree: true}); }""")
    p.fill("#pull-name", "minilm")
    p.click("#pull-form button")
    p.locator("#pull-text", has_text="pulled minilm").wait_for(timeout=120_000)
    texts = p.evaluate("window.pullTexts")
    assert any(t.startswith("downloading ") and t.endswith("with pip...") for t in texts), texts  # no size known
    assert any(re.search(r"extracting .*: [\d.]+ MB of [\d.]+ MB", t) for t in texts), texts  # bytes counted
    assert p.locator("#pull-bar").get_attribute("value") == "1"
    p.locator("#store-table", has_text="minilm").wait_for()
    assert Store(dashboard.home).has("minilm")
    page.screenshot("models", tmp_path)
    p.once("dialog", lambda d: d.accept())
    p.locator("#store-table tr", has_text="minilm").locator("text=Remove").click()
    p.wait_for_function("!document.querySelector('#store-table').textContent.includes('minilm')")
    assert not Store(dashboard.home).has("minilm")


def test_a_served_model_cannot_be_removed(dashboard):
    refused = httpx.delete(f"{dashboard.url}/api/dashboard/store/smollm2", headers={"Authorization": f"Bearer {KEY}"})
    assert refused.status_code == 409 and "being served" in refused.json()["error"]["message"]


def test_the_repository_shows_states_and_loads_and_unloads(page):
    p = page.open("models")
    row = p.locator("#repository-table tr", has_text="add_sub").first
    row.wait_for()
    assert "READY" in row.inner_text()
    assert "UNAVAILABLE" in p.locator("#repository-table tr", has_text="broken").first.inner_text()
    row.get_by_role("button", name="Unload", exact=True).click()
    p.locator("#repository-table tr", has_text="add_sub").first.locator("text=UNAVAILABLE").wait_for()
    p.locator("#repository-table tr", has_text="add_sub").first.get_by_role("button", name="Load", exact=True).click()
    p.locator("#repository-table tr", has_text="add_sub").first.locator("text=READY").wait_for()


def test_the_planner_answers_like_deskpod_plan(page, tmp_path):
    p = page.open("planner")
    p.locator("#plan-hardware option").first.wait_for(state="attached")
    p.fill("#plan-model", "llama-3.1-70b")
    p.select_option("#plan-hardware", ["digits", "digits-x2"])
    p.select_option("#plan-precision", "nvfp4")
    p.fill("#plan-context", "32768")
    p.click("#plan-form button")
    p.locator("#plan-table", has_text="decode").wait_for()
    cli = subprocess.run([sys.executable, "-m", "deskpod.cli", "plan", "llama-3.1-70b", "--precision", "nvfp4",
                          "--hardware", "digits,digits-x2", "--context", "32768", "--json"],
                         capture_output=True, text=True, check=True)
    text = p.locator("#plan-table").inner_text()
    for plan in json.loads(cli.stdout):
        assert f"{plan['decode_tokens_per_s']:.1f} tok/s" in text
        assert f"{plan['memory']['weights'] / 1e9:.2f} GB" in text
        assert f"{plan['max_context']:,}" in text
    page.screenshot("planner", tmp_path)


def test_the_charts_move_under_load(page, dashboard, tmp_path):
    p = page.open("live")
    p.wait_for_function("document.querySelector('#live-tps').textContent !== '–'")
    before = p.evaluate("document.querySelector('#chart-tps').toDataURL()")
    def load() -> None:
        with OpenAI(base_url=f"{dashboard.url}/v1", api_key=KEY) as client:
            for _ in range(3):
                client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=48, temperature=0)

    workers = [threading.Thread(target=load) for _ in range(2)]
    for worker in workers:
        worker.start()
    p.wait_for_function("parseFloat(document.querySelector('#live-tps').textContent) > 0", timeout=60_000)
    for worker in workers:
        worker.join()
    p.wait_for_function("document.querySelector('#live-itl50').textContent !== '–'", timeout=10_000)
    assert p.evaluate("document.querySelector('#chart-tps').toDataURL()") != before
    page.screenshot("live", tmp_path)


def test_the_page_fits_a_phone_and_keeps_its_content_security_policy(browser, dashboard):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    context.add_init_script(f"sessionStorage.setItem('deskpod-key', {json.dumps(KEY)})")
    page = Page(context.new_page(), dashboard.url)
    for view in ("box", "models", "playground", "planner", "live"):
        p = page.open(view)
        p.wait_for_load_state("networkidle")
        p.wait_for_timeout(500)
        assert p.locator(f"#view-{view}").is_visible()
        width = p.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1] + 1, (view, width)
    context.close()
    assert page.problems == []  # no CSP violation, no error: the page runs under its own policy


def test_the_dashboard_pulls_catalog_models_only(dashboard):
    refused = httpx.post(f"{dashboard.url}/api/dashboard/store/pull", json={"name": "/etc/passwd"},
                         headers={"Authorization": f"Bearer {KEY}"})
    assert refused.status_code == 400 and "catalog" in refused.json()["error"]["message"]


def test_a_rebound_name_gets_nothing_from_a_loopback_server(dashboard):
    # DNS rebinding: evil.example now resolves to 127.0.0.1, and the browser sends its own name as Host
    answer = httpx.get(f"{dashboard.url}/api/dashboard/models", headers={"Host": "evil.example:80",
                                                                          "Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 403 and "loopback" in answer.json()["error"]["message"]
    assert httpx.get(f"{dashboard.url}/health", headers={"Host": "localhost"}).status_code == 200


def test_another_site_cannot_change_anything(dashboard):
    headers = {"Authorization": f"Bearer {KEY}", "Origin": "http://evil.example"}
    pulled = httpx.post(f"{dashboard.url}/api/dashboard/store/pull", json={"name": "minilm"}, headers=headers)
    unloaded = httpx.post(f"{dashboard.url}/v2/repository/models/add_sub/unload", json={}, headers=headers)
    assert pulled.status_code == unloaded.status_code == 403
    assert "--allowed-origins" in pulled.json()["error"]["message"]
    same_site = httpx.post(f"{dashboard.url}/api/dashboard/plan", json={"model": "smollm2"},
                           headers={**headers, "Origin": dashboard.url})
    assert same_site.status_code == 200
