"""The web chat page at `/`, end to end in headless Chromium (Debian's `chromium`) against the real server.

`make test` installs Chromium first (scripts/install-chromium.sh). Without Chromium or the playwright package these
tests skip with the reason, unless CHIPI_TEST_REQUIRE_BROWSER=1 (CI sets it), where they fail. Screenshots of each
step are written to artifacts/screenshots/ (gitignored; CI keeps them).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.audio_samples import encode, speak, word_errors
from tests.helpers import create_key, get_conversation
from tests.server import ROOT, ChipiServer

try:
    from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect
except ImportError:  # the dev extra is not installed
    async_playwright = None

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REQUIRE_BROWSER = os.environ.get("CHIPI_TEST_REQUIRE_BROWSER") == "1"
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
REPLY_TIMEOUT_MS = 90_000

PROMPT = "Hello! What can you do?"
LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."
SPOKEN_QUESTION = "What is the capital of France?"

# Records every text the streaming reply shows, so the test can tell a streamed reply from one that appeared whole.
RECORD_PARTIAL_REPLIES = """() => {
  window.partialReplies = [];
  new MutationObserver(() => {
    const reply = document.querySelector('.message.assistant[data-status="streaming"] .body');
    if (reply) window.partialReplies.push(reply.textContent);
  }).observe(document.getElementById("messages"), {childList: true, subtree: true, characterData: true});
}"""


def _browser_missing() -> str | None:
    if async_playwright is None:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (run scripts/install-chromium.sh)"
    return None


@pytest.fixture(scope="module")
def chromium_path() -> str:
    missing = _browser_missing()
    if missing:
        if REQUIRE_BROWSER:
            pytest.fail(f"the browser test is required (CHIPI_TEST_REQUIRE_BROWSER=1) but {missing}")
        pytest.skip(missing)
    return CHROMIUM


async def _launch(chromium_path: str, *args: str) -> AsyncIterator[Browser]:
    assert async_playwright is not None
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium_path, headless=True, args=list(args))
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture(scope="module")
async def browser(chromium_path: str) -> AsyncIterator[Browser]:
    async for launched in _launch(chromium_path):
        yield launched


@dataclass
class ChatPage:
    """A browser tab on the chat page, with the console errors it logged and a screenshot helper."""

    page: Page
    folder: Path
    errors: list[str] = field(default_factory=list)
    shots: int = 0

    async def screenshot(self, step: str) -> None:
        self.shots += 1
        await self.page.screenshot(
            path=self.folder / f"{self.shots:02d}-{step}.png", full_page=True, animations="disabled"
        )

    def session_id(self) -> str:
        match = re.search(r"#/c/([0-9a-f-]{36})$", self.page.url)
        assert match, self.page.url
        return match.group(1)


async def _open_page(browser: Browser, request: pytest.FixtureRequest, **context: Any) -> AsyncIterator[ChatPage]:
    folder = SCREENSHOTS / re.sub(r"[^\w.-]+", "_", request.node.name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    browser_context = await browser.new_context(viewport={"width": 1200, "height": 800}, **context)
    page = await browser_context.new_page()
    chat = ChatPage(page, folder)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            chat.errors.append(f"console: {message.text} ({message.location})")

    page.on("console", on_console)
    page.on("pageerror", lambda error: chat.errors.append(f"page error: {error}"))
    try:
        yield chat
    finally:
        await browser_context.close()


@pytest.fixture
async def chat(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[ChatPage]:
    async for opened in _open_page(browser, request):
        yield opened


def _list_item(chat: ChatPage, session_id: str) -> Any:
    return chat.page.locator(f'#conversation-list li[data-id="{session_id}"]')


async def _start_conversation(chat: ChatPage, server: ChipiServer) -> str:
    await chat.page.goto(server.url + "/")
    await expect(chat.page.locator("#chat-title")).to_have_text("Chipi")
    await expect(chat.page.locator("#welcome")).to_be_visible()
    await chat.screenshot("empty")
    await chat.page.click("#new-chat")
    await expect(chat.page).to_have_url(re.compile(r"#/c/[0-9a-f-]{36}$"))
    session_id = chat.session_id()
    await expect(_list_item(chat, session_id)).to_have_count(1)
    await expect(chat.page.locator("#chat-actions")).to_be_visible()
    return session_id


async def test_chat_reload_rename_regenerate_and_delete(
    chat: ChatPage, server: ChipiServer, client: httpx.AsyncClient
) -> None:
    page = chat.page
    session_id = await _start_conversation(chat, server)

    await page.evaluate(RECORD_PARTIAL_REPLIES)
    await page.fill("#input", PROMPT)
    await page.press("#input", "Enter")
    await expect(page.locator(".message.user")).to_have_text(PROMPT)
    await expect(page.locator("#stop")).to_be_visible()
    reply = page.locator(".message.assistant")
    await expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT_MS)
    await expect(page.locator("#send")).to_be_visible()
    await chat.screenshot("reply")
    reply_text = await reply.locator(".body").inner_text()
    assert reply_text.strip()
    partials = [text for text in await page.evaluate("window.partialReplies") if text]
    assert len(set(partials)) >= 2, f"the reply did not stream in pieces: {partials}"
    # The first message names the conversation in the list.
    await expect(_list_item(chat, session_id)).to_contain_text(PROMPT)

    stored = await get_conversation(client, session_id)
    assert [(m["role"], m["status"]) for m in stored["messages"]] == [("user", "complete"), ("assistant", "complete")]
    assert stored["messages"][0]["content"] == PROMPT
    assert stored["messages"][1]["content"].strip()

    # Reloaded, the page shows the same conversation from the database.
    await page.reload()
    await expect(page.locator(".message")).to_have_count(2)
    await expect(page.locator(".message.user")).to_have_text(PROMPT)
    assert await page.locator(".message.assistant .body").inner_text() == reply_text
    await expect(page.locator("#chat-title")).to_have_text(PROMPT)
    await expect(_list_item(chat, session_id)).to_have_class(re.compile(r"\bactive\b"))
    await chat.screenshot("reloaded")

    # Regenerate: a new reply to the same message; the old one stays on a sibling branch.
    first_reply_id = await page.locator(".message.assistant").get_attribute("data-id")
    await page.click(".message.assistant .regenerate")
    await expect(page.locator(f'.message[data-id="{first_reply_id}"]')).to_have_count(0)
    await expect(page.locator('.message.assistant[data-status="complete"]')).to_have_count(1, timeout=REPLY_TIMEOUT_MS)
    await expect(page.locator(".message")).to_have_count(2)
    tree = (await client.get(f"/api/conversations/{session_id}", params={"tree": "true"})).json()
    assert [m["role"] for m in tree["messages"]].count("assistant") == 2
    await chat.screenshot("regenerated")

    # Rename.
    new_title = "Baking with dragons"
    await page.click("#rename")
    await page.fill("#rename-input", new_title)
    await page.press("#rename-input", "Enter")
    await expect(page.locator("#chat-title")).to_have_text(new_title)
    await expect(_list_item(chat, session_id)).to_contain_text(new_title)
    await chat.screenshot("renamed")
    stored = await get_conversation(client, session_id)
    assert (stored["conversation"]["title"], stored["conversation"]["title_source"]) == (new_title, "manual")
    await page.reload()
    await expect(page.locator("#chat-title")).to_have_text(new_title)

    # Search sends `q` to the list endpoint; the conversation stays reachable while the box is cleared again.
    await page.fill("#search", "dragons")
    await page.wait_for_timeout(400)
    await page.fill("#search", "")
    await expect(_list_item(chat, session_id)).to_have_count(1)

    # Delete (after the browser's confirmation).
    page.once("dialog", lambda dialog: dialog.accept())
    await page.click("#delete")
    await expect(_list_item(chat, session_id)).to_have_count(0)
    await expect(page.locator("#chat-title")).to_have_text("Chipi")
    await expect(page.locator(".message")).to_have_count(0)
    await chat.screenshot("deleted")
    assert (await client.get(f"/api/conversations/{session_id}")).status_code == 404

    assert chat.errors == []


MARKDOWN_SAMPLE = """# Plan

Some **bold**, *italic* and `inline <code>` with a [link](https://example.com/a?b=1&c=2).

- first
- second
  1. nested

```python
print("<b>not bold</b>")
```

<img src=x onerror="window.hacked=1"> <script>window.hacked=2</script>
[bad](javascript:window.hacked=3) [also bad](data:text/html,hi)"""


async def test_markdown_is_rendered_and_markup_is_only_ever_text(chat: ChatPage, server: ChipiServer) -> None:
    page = chat.page
    await page.goto(server.url + "/")
    html = await page.evaluate("(text) => window.Chipi.renderMarkdown(text)", MARKDOWN_SAMPLE)
    await page.evaluate(
        """(html) => { const el = document.createElement("div"); el.id = "sample"; el.className = "message assistant";
        el.innerHTML = `<div class="body">${html}</div>`; document.getElementById("messages").append(el); }""",
        html,
    )
    sample = page.locator("#sample")
    await expect(sample.locator("h1")).to_have_text("Plan")
    await expect(sample.locator("strong")).to_have_text("bold")
    await expect(sample.locator("em")).to_have_text("italic")
    await expect(sample.locator("p code")).to_have_text("inline <code>")
    await expect(sample.locator("a")).to_have_count(1)
    await expect(sample.locator("a")).to_have_attribute("href", "https://example.com/a?b=1&c=2")
    await expect(sample.locator("ul > li")).to_have_count(2)
    await expect(sample.locator("ul ol > li")).to_have_text("nested")
    await expect(sample.locator("pre code.language-python")).to_have_text('print("<b>not bold</b>")')
    await expect(sample.locator("img, script, b")).to_have_count(0)
    await expect(sample).to_contain_text('<img src=x onerror="window.hacked=1">')
    await expect(sample).to_contain_text("[bad](javascript:window.hacked=3)")
    await chat.screenshot("markdown")
    assert await page.evaluate("window.hacked") is None
    assert chat.errors == []


async def test_stop_mid_reply(chat: ChatPage, server: ChipiServer, client: httpx.AsyncClient) -> None:
    page = chat.page
    session_id = await _start_conversation(chat, server)
    await page.fill("#input", LONG_PROMPT)
    await page.click("#send")
    reply = page.locator(".message.assistant")
    await expect(reply.locator(".body")).to_have_text(re.compile(r"\w"), timeout=REPLY_TIMEOUT_MS)
    await page.click("#stop")
    await expect(reply).to_have_attribute("data-status", "cancelled", timeout=REPLY_TIMEOUT_MS)
    await expect(reply.locator(".status")).to_have_text("Stopped")
    await expect(page.locator("#send")).to_be_visible()
    await chat.screenshot("stopped")
    shown = await reply.locator(".body").inner_text()

    stored = await get_conversation(client, session_id)
    last = stored["messages"][-1]
    assert (last["role"], last["status"], last["finish_reason"]) == ("assistant", "cancelled", "cancelled")
    assert last["content"].strip()

    await page.reload()
    await expect(page.locator(".message.assistant")).to_have_attribute("data-status", "cancelled")
    await expect(page.locator(".message.assistant .status")).to_have_text("Stopped")
    assert await page.locator(".message.assistant .body").inner_text() == shown

    # On a phone-sized screen the list slides in over the chat.
    await page.set_viewport_size({"width": 390, "height": 800})
    await expect(page.locator("#menu")).to_be_visible()
    await expect(_list_item(chat, session_id)).not_to_be_in_viewport()
    await page.click("#menu")
    await expect(_list_item(chat, session_id)).to_be_in_viewport()
    await chat.screenshot("narrow-list")
    await _list_item(chat, session_id).locator("button").click()
    await expect(_list_item(chat, session_id)).not_to_be_in_viewport()
    await chat.screenshot("narrow-chat")
    assert chat.errors == []


@pytest.fixture
async def voice_chat(
    chromium_path: str,
    client: httpx.AsyncClient,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> AsyncIterator[ChatPage]:
    """A browser whose microphone plays the server's own speech of SPOKEN_QUESTION (Chromium's fake device)."""
    recording = tmp_path / "question.wav"
    recording.write_bytes(encode(await speak(client, SPOKEN_QUESTION), "wav"))
    flags = (
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={recording}%noloop",
        "--autoplay-policy=no-user-gesture-required",
    )
    async for browser in _launch(chromium_path, *flags):
        async for opened in _open_page(browser, request, permissions=["microphone"]):
            yield opened


async def test_voice_message_is_transcribed_answered_and_spoken(
    voice_chat: ChatPage, server: ChipiServer, client: httpx.AsyncClient
) -> None:
    page = voice_chat.page
    session_id = await _start_conversation(voice_chat, server)
    mic = page.locator("#mic")
    await expect(mic).to_be_visible()
    await mic.click()
    await expect(mic).to_have_class(re.compile(r"\brecording\b"))
    await page.wait_for_timeout(3_500)  # the question lasts about 2 s
    await mic.click()

    user = page.locator(".message.user")
    await expect(user).to_have_attribute("data-id", re.compile(r"[0-9a-f-]{36}"), timeout=REPLY_TIMEOUT_MS)
    heard = await user.inner_text()
    assert word_errors(SPOKEN_QUESTION, heard) <= 1, heard
    reply = page.locator(".message.assistant")
    await expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT_MS)
    await expect(reply).to_have_attribute("data-spoken", re.compile(r"^[1-9]"), timeout=REPLY_TIMEOUT_MS)
    await expect(reply.locator(".spoken")).to_contain_text("Spoken aloud")
    await voice_chat.screenshot("voice-reply")

    stored = await get_conversation(client, session_id)
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert stored["messages"][0]["content"] == heard
    assert voice_chat.errors == []


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ChipiServer, str]]:
    """A server (SQLite) whose database has an API key, so every API request needs one; and the key."""
    database_url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('web-keys') / 'chipi.db'}"
    key = create_key(database_url, "alice")
    with ChipiServer(database_url) as server:
        yield server, key


async def test_a_server_with_keys_asks_for_one_and_the_page_works_with_it(
    chat: ChatPage, keyed_server: tuple[ChipiServer, str]
) -> None:
    server, key = keyed_server
    page = chat.page
    await page.goto(server.url + "/")
    key_form = page.locator("#key-form")
    await expect(key_form).to_be_visible()  # the list answered 401
    await expect(page.locator("#key-prompt")).to_contain_text("needs an API key")
    await chat.screenshot("asks-for-a-key")

    await page.fill("#key-input", "chipi_not-a-key")
    await page.press("#key-input", "Enter")
    await expect(page.locator("#key-prompt")).to_contain_text("refused the saved API key")
    await expect(key_form).to_be_visible()

    await page.fill("#key-input", key)
    await page.click("#key-form button[type=submit]")
    await expect(key_form).to_be_hidden()
    await page.fill("#input", PROMPT)
    await page.press("#input", "Enter")  # a new conversation, then the reply over the WebSocket (?api_key=)
    reply = page.locator(".message.assistant")
    await expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT_MS)
    session_id = chat.session_id()
    await expect(_list_item(chat, session_id)).to_have_count(1)
    await chat.screenshot("with-a-key")

    await page.reload()  # the key stays in this browser
    await expect(page.locator(".message")).to_have_count(2)
    await expect(key_form).to_be_hidden()
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as owner:
        stored = await get_conversation(owner, session_id)
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    # Chromium logs each 401 as a failed resource load; anything else is a fault of the page.
    assert [error for error in chat.errors if "status of 401" not in error] == []
    assert any("status of 401" in error for error in chat.errors)
