"""The chat page at `/`, in a real headless browser: Playwright driving Debian's chromium (Playwright's
own browser download is not reachable from CI).

The server behind it runs the scripted stand-in (see `ScriptedModel`) slowed down per step, so each
test knows the exact reasoning and answer the page must show and can watch them arrive while the
stream is still open.  Without chromium or playwright the tests skip, except in CI (`CI` set), where
they fail: there the browser is installed by `.ci/run`.
"""

import json
import os
import shutil
import time

import httpx
import pytest

from .server_helpers import API_KEY, ScriptedModel, live, openai_prompt, random_text
from .test_scripted import dsml_call

from dsv4.cli.server import build_app

MODES = {"chat": {"thinking": {"type": "disabled"}},
         "thinking": {"thinking": {"type": "enabled"}},
         "max": {"thinking": {"type": "enabled"}, "reasoning_effort": "max"}}
STEP_DELAY = 0.02     # seconds per model step: slow enough to see the stream open, fast enough for CI


def _unavailable(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must run the browser tests (.ci/run installs chromium)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        _unavailable("no chromium on PATH (apt-get install chromium)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=path)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(demo_model):
    """(ScriptedModel, base URL) of a key-protected server for the page."""
    model = ScriptedModel(demo_model.tokenizer, delay=STEP_DELAY)
    with live(build_app(model, model_name="scripted", api_key=API_KEY)) as url:
        yield model, url


class Chat:
    """The page in a fresh browser context (empty localStorage), with the chat requests it sent."""

    def __init__(self, browser, url, key=API_KEY):
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.requests, self.problems = [], []
        self.page.on("request", self._record)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.problems.append(str(e)))
        self.page.goto(url + "/")
        if key:
            self.page.fill("#key", key)

    def _console(self, message):
        """Script errors and CSP refusals; a 401 the page was meant to get is not a problem."""
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.problems.append(message.text)

    def _record(self, request):
        self.requests.append(request)

    def bodies(self) -> list:
        return [json.loads(r.post_data) for r in self.requests if r.url.endswith("/v1/chat/completions")]

    def send(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.locator("#prompt").press("Enter")

    def until(self, predicate: str, timeout: float = 30.0) -> None:
        """Poll the JS function `predicate` until it returns true.  (Playwright's `wait_for_function`
        evaluates its predicate with `eval`, which the page's CSP rightly forbids.)"""
        deadline = time.monotonic() + timeout
        while not self.page.evaluate(predicate):
            assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
            time.sleep(0.01)

    def wait_idle(self) -> None:
        self.until("() => !document.getElementById('send').disabled")

    def last(self, selector: str) -> str:
        """The text in `selector` of the latest assistant turn, shown or folded away."""
        return self.page.locator(f".assistant >> nth=-1 >> {selector}").text_content()

    def close(self):
        self.context.close()


@pytest.fixture
def chat(browser, server):
    opened = []

    def open_chat(key=API_KEY):
        opened.append(Chat(browser, server[1], key))
        return opened[-1]
    yield open_chat
    for c in opened:
        assert not c.problems, c.problems
        c.close()


def plan(model, messages, mode, completion):
    model.script.clear()
    model.plan(openai_prompt(model.tokenizer, {"messages": messages, **MODES[mode]}), completion)


def test_page_is_served_without_a_key_and_loads_nothing_else(server, chat):
    _, url = server
    r = httpx.get(url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert httpx.get(url + "/v1/models").status_code == 401          # the API itself still wants the key
    c = chat()
    c.page.wait_for_load_state("networkidle")
    assert c.requests and all(r.url.startswith(url + "/") for r in c.requests)
    assert c.page.locator("label", has_text="API key").count() == 1 and c.page.get_by_label("Message").count() == 1


def test_streams_the_answer_and_keeps_the_conversation(server, chat):
    model, _ = server
    c = chat()
    first = f"{random_text()}\n{random_text()}"
    answer = " ".join(random_text(2) for _ in range(6)) + "."
    plan(model, [{"role": "user", "content": first}], "chat", answer)
    c.page.fill("#prompt", first.split("\n")[0])
    c.page.locator("#prompt").press("Shift+Enter")                  # a new line, not a send
    c.page.locator("#prompt").press_sequentially(first.split("\n")[1])
    assert c.page.input_value("#prompt") == first and not c.bodies()
    c.page.locator("#prompt").press("Enter")
    # text appears while the stream is still open (Stop enabled), then the whole answer
    c.until("""() => {
        const a = document.querySelector('.assistant .answer');
        return a && a.textContent.length > 0 && !document.getElementById('stop').disabled; }""")
    c.wait_idle()
    assert c.last(".answer") == answer and c.page.locator("details").count() == 0
    assert c.page.input_value("#prompt") == ""
    assert c.bodies()[0]["thinking"] == {"type": "disabled"} and c.bodies()[0]["stream"] is True
    assert c.page.inner_text("#model") == "scripted"

    second, answer2 = random_text(), f"Second answer, {random_text()}."
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": answer},
               {"role": "user", "content": second}]
    plan(model, history, "chat", answer2)
    c.send(second)
    c.wait_idle()
    assert c.bodies()[1]["messages"] == history
    assert c.page.locator(".assistant").count() == 2 and c.last(".answer") == answer2


@pytest.mark.parametrize("mode", ["thinking", "max"])
def test_reasoning_is_shown_apart_and_folded_when_the_answer_starts(server, chat, mode):
    model, _ = server
    c = chat()
    c.page.select_option("#mode", mode)
    question = random_text()
    thought = " ".join(random_text(2) for _ in range(5))
    answer = f"So: {random_text()}."
    plan(model, [{"role": "user", "content": question}], mode, thought + "</think>" + answer)
    c.send(question)
    c.until("""() => {
        const d = document.querySelector('.assistant details.reasoning');
        return d && d.open && d.textContent.length > 12 && !document.querySelector('.assistant .answer'); }""")
    c.wait_idle()
    assert c.last(".reasoning-text") == thought and c.last(".answer") == answer
    assert c.page.locator(".assistant details.reasoning").evaluate("d => d.open") is False
    body = c.bodies()[0]
    assert {k: body.get(k) for k in MODES[mode]} == MODES[mode]
    c.page.reload()
    assert c.page.input_value("#mode") == mode                          # the choice is remembered


def test_a_missing_key_shows_the_api_error_and_a_set_key_works(server, chat):
    model, _ = server
    c = chat(key=None)
    question, answer = random_text(), f"Keyed {random_text()}."
    c.send(question)
    c.until("() => document.getElementById('error').textContent.length > 0")
    assert "401" in c.page.inner_text("#error") and "missing API key" in c.page.inner_text("#error")
    assert c.page.locator(".msg").count() == 0 and c.page.input_value("#prompt") == question  # ready to resend
    c.page.fill("#key", "wrong-" + API_KEY)
    c.page.locator("#prompt").press("Enter")
    c.until("() => document.getElementById('error').textContent.includes('invalid API key')")

    c.page.fill("#key", API_KEY)
    plan(model, [{"role": "user", "content": question}], "chat", answer)
    c.page.locator("#prompt").press("Enter")
    c.wait_idle()
    assert c.last(".answer") == answer and c.page.inner_text("#error") == ""
    auth = [r.headers.get("authorization") for r in c.requests if r.url.endswith("/v1/chat/completions")]
    assert auth[-1] == f"Bearer {API_KEY}"
    c.page.reload()
    assert c.page.input_value("#key") == API_KEY                        # kept in localStorage


def test_stop_ends_the_stream_and_keeps_what_arrived(server, chat):
    model, _ = server
    c = chat()
    question = random_text()
    answer = " ".join(random_text(3) for _ in range(40))
    plan(model, [{"role": "user", "content": question}], "chat", answer)
    c.send(question)
    c.until("() => (document.querySelector('.assistant .answer') || {}).textContent?.length > 10")
    c.page.click("#stop")
    c.wait_idle()
    shown = c.last(".answer")
    assert shown and answer.startswith(shown) and len(shown) < len(answer)
    assert "stopped" in c.last(".meta")


def test_tool_calls_are_shown_with_their_arguments(server, chat):
    model, _ = server
    c = chat()
    question = random_text()
    plan(model, [{"role": "user", "content": question}], "chat", "Looking." + dsml_call("get_weather", "Oslo", 3))
    c.send(question)
    c.wait_idle()
    tool = c.last(".tool")
    assert tool.startswith("get_weather(") and json.loads(tool[len("get_weather("):-1]) == {"city": "Oslo", "days": 3}
    assert c.last(".answer") == "Looking." and "tool_calls" in c.last(".meta")
