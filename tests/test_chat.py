"""`bastion chat`'s slash commands (issue 23): they are handled by the chat, never sent
to the model; an unknown one says so; text that merely starts with a slash is a message."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from bastion.chat import COMMANDS, run_chat


class _ReachedTheModel(BaseException):  # not swallowed by encode_chat
    pass


class _Tokenizer:
    def apply_chat_template(self, messages, **kw):
        raise _ReachedTheModel(messages[-1]["content"])


def _chat(lines: str, **kw) -> str:
    out = io.StringIO()
    llm = SimpleNamespace(model_name="m", tokenizer=_Tokenizer())  # no engine: nothing may generate
    assert run_chat(llm, inp=io.StringIO(lines), out=out, **kw) == 0
    return out.getvalue()


def test_slash_commands_never_reach_the_model():
    out = _chat("/help\n/reset\n/bogus\n\n/EXIT\nnot read\n")
    assert "(/help for commands)" in out
    for name in COMMANDS:
        assert name in out
    assert "(conversation reset)" in out
    assert "unknown command /bogus; /help lists the commands" in out
    assert _chat("/quit\n").count(">>> ") == 1
    assert _chat("").endswith(">>> \n")  # Ctrl-D


def test_text_starting_with_a_slash_is_a_message():
    with pytest.raises(_ReachedTheModel, match="/usr/bin is what"):
        _chat("/usr/bin is what?\n")
    with pytest.raises(_ReachedTheModel, match="hello"):
        _chat("/reset\nhello\n", system="be brief")
