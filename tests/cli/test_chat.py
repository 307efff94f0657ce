"""`dsv4 chat` driven through a real pseudo-terminal: two turns (the second reusing the cached prefix), slash
commands, Ctrl-C during an answer returns to the prompt, /save + /load, /exit."""

import json
import re
import sys

import pytest

from dsv4.cli.session import FIRST_PREFILL

from .cli_helpers import AUTO_CPU

pexpect = pytest.importorskip("pexpect")

PROMPT = ">>> "
STATS = re.compile(rf"(\d+) tokens? (?:· [\d.]+ tok/s )?· prompt (\d+) tokens?(?:, (\d+) cached,)? in [\d.]+ s "
                   rf"\([\d.]+ tok/s(; {re.escape(FIRST_PREFILL)})?\) · peak RSS [\d.]+ \w+ · "
                   rf"context (\d+)/256 · (\w+) · {AUTO_CPU}/float32")


@pytest.fixture
def chat(tiny_dir):
    child = pexpect.spawn(sys.executable, ["-m", "dsv4.cli", "chat", "--model", str(tiny_dir), "--context", "256",
                                           "--max-tokens", "12", "--temperature", "0"],
                          encoding="utf-8", timeout=60, dimensions=(40, 200))
    child.expect_exact(PROMPT)
    yield child
    if child.isalive():
        child.terminate(force=True)


def turn(child, text, first=False):
    """One turn; its stats line flags the warm-up of the session's first prefill, and only that one."""
    child.sendline(text)
    child.expect(STATS)
    generated, prompt, cached, warm, used, reason = child.match.groups()
    assert bool(warm) == first, child.match.group(0)
    child.expect_exact(PROMPT)
    return int(generated), int(prompt), int(cached or 0), int(used), reason


def test_two_turns_reuse_the_prefix_and_commands_work(chat, tmp_path):
    g1, p1, c1, used1, _ = turn(chat, "Hello, who are you?", first=True)
    assert 1 <= g1 <= 12 and c1 == 0 and used1 == p1 + g1
    g2, p2, c2, used2, _ = turn(chat, "Tell me more.")
    assert p2 > used1 - 1 and c2 >= p1 - 1                  # the first turn's prompt came from the cache
    assert used2 == p2 + g2

    chat.sendline("/stats")
    chat.expect(r"turns 2 · prompt tokens (\d+) \((\d+) from cache\) · generated (\d+)")
    assert int(chat.match.group(1)) == p1 + p2 and int(chat.match.group(3)) == g1 + g2
    chat.expect_exact(PROMPT)

    chat.sendline("/mode thinking")
    chat.expect_exact("mode: thinking")
    chat.expect_exact(PROMPT)
    chat.sendline("/nonsense")
    chat.expect_exact("error: unknown command /nonsense; /help lists them")
    chat.expect_exact(PROMPT)

    saved = tmp_path / "conv.json"
    chat.sendline(f"/save {saved}")
    chat.expect_exact("saved 4 messages")
    chat.expect_exact(PROMPT)
    data = json.loads(saved.read_text())
    assert data["mode"] == "thinking" and [m["role"] for m in data["messages"]] == ["user", "assistant"] * 2
    assert data["messages"][0]["content"] == "Hello, who are you?"

    chat.sendline("/reset")
    chat.expect_exact("conversation cleared")
    chat.expect_exact(PROMPT)
    chat.sendline(f"/load {saved}")
    chat.expect_exact("loaded 4 messages (mode thinking)")
    chat.expect_exact(PROMPT)

    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_ctrl_c_stops_the_answer_and_returns_to_the_prompt(tiny_dir):
    child = pexpect.spawn(sys.executable, ["-m", "dsv4.cli", "chat", "--model", str(tiny_dir), "--context", "256",
                                           "--max-tokens", "200", "--temperature", "0"],
                          encoding="utf-8", timeout=60, dimensions=(40, 200))
    child.expect_exact(PROMPT)
    child.sendline("Write a very long story.")
    child.expect_exact("Write a very long story.\r\n")     # the echo of the input line
    child.expect(r"\S")                                     # the first piece of the answer is on screen
    child.sendintr()
    child.expect(r"\[interrupted\] (\d+) tokens")
    assert int(child.match.group(1)) < 200
    child.expect_exact(PROMPT)
    g, p, c, used, reason = turn(child, "Shorter, please.")
    assert reason in ("length", "stop") and c > 0   # the interrupted turn's state was kept for reuse
    child.sendeof()                              # Ctrl-D at the prompt quits too
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
