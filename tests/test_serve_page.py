"""The server's chat page (jaxllm/serve/static/index.html) in headless Chromium: a reply streams
into the conversation and ends as the same text the API answers without streaming, JSON mode
gives JSON, an error answer shows as an error line.

Needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver; .ci/run
installs them) and selenium: without them this test fails rather than skips, so CI cannot go
green without checking the page. A screenshot goes to $JAXLLM_TEST_ARTIFACTS/chat_page.png
(default: <repo>/test-artifacts/).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from conftest import REPO
from serving import serve

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SYSTEM, MAX_TOKENS = "You answer in one short sentence.", 60

# Records the assistant bubble's text each time the page changes it, once per task (so once per
# network read of the stream: events handled in one read land in one record). Returned by
# window.__records(): [[ms since install, text], ...] for the last assistant bubble.
RECORDER = """
window.__log = [];
const t0 = performance.now();
new MutationObserver(() => {
  const all = document.querySelectorAll('#messages .assistant');
  if (all.length) window.__log.push([performance.now() - t0, all[all.length - 1].textContent]);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
window.__records = () => window.__log;
"""

# The page's state in one round trip: the last bubbles of each kind and the errors.
STATE = """
const last = (sel) => { const all = document.querySelectorAll(sel); return all.length ? all[all.length - 1] : null; };
const meta = last('#messages .meta');
const user = last('#messages .user'), assistant = last('#messages .assistant');
return {user: user && user.textContent, assistant: assistant && assistant.textContent,
        meta: meta && meta.textContent, finish: meta && meta.dataset.finishReason || null,
        completion_tokens: meta && meta.dataset.completionTokens ? Number(meta.dataset.completionTokens) : null,
        metas: document.querySelectorAll('#messages .meta').length,
        errors: Array.from(document.querySelectorAll('#messages .error'), (e) => e.textContent),
        busy: document.getElementById('send').disabled};
"""


@pytest.fixture(scope="module")
def url(params, cfg, tokenizer):
    from jaxllm.serve.app import create_app
    from jaxllm.serve.engine import Engine

    engine = Engine(params, cfg, tokenizer, slots=4, chunk=2)  # test_serve.py's shapes (the chunk is traced)
    with serve(create_app(engine, model_name="tiny")) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: this test drives the chat page in headless Chromium. "
                    "Install Debian's chromium and chromium-driver: "
                    "apt-get install -y --no-install-recommends chromium chromium-driver", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.fail(f"selenium does not import ({e}): pip install -e '.[test]'", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--window-size=1200,860"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(10)
    yield driver
    driver.quit()


def wait_for(browser, predicate, timeout: float = 60.0, every: float = 0.02) -> tuple[dict, list[dict]]:
    """Polls the page's state every `every` s until `predicate(state)`. -> (the last state, all states)."""
    states, deadline = [], time.monotonic() + timeout
    while True:
        state = browser.execute_script(STATE)
        states.append(state)
        if predicate(state):
            return state, states
        if time.monotonic() > deadline:
            raise AssertionError(f"the page did not get there in {timeout} s; it shows {state}")
        time.sleep(every)


def set_value(browser, element_id: str, text: str) -> None:
    element = browser.find_element("id", element_id)
    element.clear()
    element.send_keys(text)


def reference(url: str, message: str, **extra) -> dict:
    """The same request, not streamed, from the API."""
    body = dict(model="tiny", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": message}],
                temperature=0, max_tokens=MAX_TOKENS, **extra)
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_chat_page_streams_replies_json_mode_and_errors(url, browser):
    from selenium.webdriver.common.keys import Keys

    page = httpx.get(f"{url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere: works offline

    browser.get(f"{url}/")
    wait_for(browser, lambda s: "tiny" in browser.find_element("id", "model-info").text, timeout=15)
    set_value(browser, "system", SYSTEM)
    set_value(browser, "temperature", "0")
    set_value(browser, "max-tokens", str(MAX_TOKENS))
    browser.execute_script(RECORDER)

    # A reply streams in, and ends as the API's non-streamed answer to the same request
    message = "Say hello to the world"
    set_value(browser, "message", message)
    browser.find_element("id", "send").click()
    state, states = wait_for(browser, lambda s: s["metas"] >= 1 or s["errors"])
    assert not state["errors"], state["errors"]
    assert state["user"] == message
    assert browser.find_element("id", "message").get_attribute("value") == ""
    final = state["assistant"]
    records = [text for _, text in browser.execute_script("return window.__records()")]
    polled = [s["assistant"] for s in states if s["assistant"]]
    for seen in records + polled:
        assert final.startswith(seen), (seen, final)
    growing = [t for i, t in enumerate(records) if t and (i == 0 or t != records[i - 1])]
    assert len(growing) >= 2, f"the reply did not stream: the page's text changed as {growing}"
    expected = reference(url, message)
    assert final == expected["choices"][0]["message"]["content"]
    assert state["finish"] == expected["choices"][0]["finish_reason"] and state["finish"] in ("stop", "length")
    assert f"finish: {state['finish']}" in state["meta"]
    assert state["completion_tokens"] == expected["usage"]["completion_tokens"]
    print(f"\nstreamed in {len(growing)} page updates ({len(set(polled))} distinct texts seen polling every 20 ms)")

    # JSON mode (Clear starts a new conversation; Enter sends): the reply is constrained to JSON
    browser.find_element("id", "clear").click()
    assert browser.execute_script("return document.querySelectorAll('#messages > *').length") == 0
    browser.find_element("id", "json-mode").click()
    message = "Give me a JSON object"
    set_value(browser, "message", message)
    browser.find_element("id", "message").send_keys(Keys.ENTER)
    state, _ = wait_for(browser, lambda s: s["metas"] >= 1 or s["errors"])
    assert not state["errors"], state["errors"]
    assert state["user"] == message
    expected = reference(url, message, response_format={"type": "json_object"})
    assert state["assistant"] == expected["choices"][0]["message"]["content"]
    assert state["finish"] == expected["choices"][0]["finish_reason"]
    if state["finish"] == "stop":  # the constraint closed the object within max_tokens
        assert isinstance(json.loads(state["assistant"]), dict)
    else:  # the tiny model ran out of tokens first: the server guarantees only the finish reason
        assert state["finish"] == "length" and state["assistant"].lstrip().startswith("{")

    # An error answer (max_tokens past the context) shows as an error line, and the page recovers
    browser.find_element("id", "json-mode").click()
    set_value(browser, "max-tokens", "100000")
    set_value(browser, "message", "This one is too long")
    browser.find_element("id", "send").click()
    state, _ = wait_for(browser, lambda s: s["errors"] and not s["busy"], timeout=30)
    assert "context" in state["errors"][-1], state["errors"]
    assert state["metas"] == 1  # the failed request added no reply
    assert browser.execute_script(  # and its message is marked as not part of the conversation any more
        "const u = document.querySelectorAll('#messages .user'); return u[u.length - 1].classList.contains('unsent')")
    assert browser.find_element("id", "send").is_enabled() and not browser.find_element("id", "stop").is_enabled()

    artifacts = Path(os.environ.get("JAXLLM_TEST_ARTIFACTS") or REPO / "test-artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    screenshot = artifacts / "chat_page.png"
    screenshot.unlink(missing_ok=True)
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.is_file() and screenshot.stat().st_size > 0
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# A stand-in for fetch on /v1/chat/completions: records the request, answers one event of a
# stream that then hangs until its signal aborts it (as fetch's body does).
HANGING_STREAM = """
window.__requests = [];
const realFetch = window.fetch;
window.fetch = (url, init) => {
  if (!String(url).endsWith('/v1/chat/completions')) return realFetch(url, init);
  window.__requests.push({url: String(url), headers: init.headers, body: JSON.parse(init.body)});
  const piece = 'data: ' + JSON.stringify({choices: [{index: 0, delta: {content: 'partial <b>reply</b>'}, finish_reason: null}]});
  const body = new ReadableStream({start(controller) {
    controller.enqueue(new TextEncoder().encode(piece + '\\r\\n\\r\\n'));
    init.signal.addEventListener('abort', () => controller.error(new DOMException('aborted', 'AbortError')));
  }});
  return Promise.resolve(new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}}));
};
"""


def test_chat_page_request_and_stop(url, browser):
    """What the page sends (the system message first, the settings, the key as a bearer token), and
    Stop: it aborts the reply in flight, which keeps its text (as text, not HTML) and stays in the
    conversation."""
    browser.get(f"{url}/")
    wait_for(browser, lambda s: "tiny" in browser.find_element("id", "model-info").text, timeout=15)
    browser.execute_script(HANGING_STREAM)
    set_value(browser, "system", "Be brief.")
    set_value(browser, "temperature", "1.5")
    set_value(browser, "max-tokens", "12")
    set_value(browser, "api-key", "sk-test")
    browser.find_element("id", "json-mode").click()
    set_value(browser, "message", "first line")
    from selenium.webdriver.common.keys import Keys
    browser.find_element("id", "message").send_keys(Keys.SHIFT, Keys.ENTER, Keys.NULL, "second line")
    browser.find_element("id", "send").click()
    state, _ = wait_for(browser, lambda s: s["assistant"] == "partial <b>reply</b>", timeout=10)
    assert state["busy"] and browser.find_element("id", "stop").is_enabled()
    assert browser.execute_script("return document.querySelectorAll('#messages b').length") == 0  # text, not HTML
    (request,) = browser.execute_script("return window.__requests")
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    assert request["body"] == {
        "model": "tiny", "stream": True, "stream_options": {"include_usage": True}, "temperature": 1.5, "max_tokens": 12,
        "response_format": {"type": "json_object"},
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first line\nsecond line"}],
    }

    browser.find_element("id", "stop").click()
    state, _ = wait_for(browser, lambda s: s["metas"] == 1, timeout=10)
    assert state["finish"] == "stopped" and not state["errors"] and not state["busy"]
    assert state["assistant"] == "partial <b>reply</b>"

    set_value(browser, "system", "")
    set_value(browser, "message", "next")
    browser.find_element("id", "send").click()
    wait_for(browser, lambda s: s["user"] == "next" and s["busy"], timeout=10)
    request = browser.execute_script("return window.__requests")[-1]
    assert request["body"]["messages"] == [{"role": "user", "content": "first line\nsecond line"},
                                           {"role": "assistant", "content": "partial <b>reply</b>"},
                                           {"role": "user", "content": "next"}]
    browser.find_element("id", "clear").click()  # aborts the reply in flight too
    wait_for(browser, lambda s: not s["busy"] and s["user"] is None and not s["errors"], timeout=10)
