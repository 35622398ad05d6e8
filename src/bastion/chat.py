"""`bastion chat`: an interactive terminal chat that streams tokens as they come.

Lines that are a slash command (/help, /reset, /exit, /quit; one word) are handled here
and never reach the model; an unknown one says so. Anything else, including text that
merely starts with a slash ("/usr/bin is ..."), is a message. Ctrl-C stops a reply and
keeps the session; Ctrl-D leaves.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from bastion.engine.sampling_params import SamplingParams
from bastion.serving.chat_template import encode_chat

COMMANDS = {
    "/help": "list these commands",
    "/reset": "forget the conversation (the --system prompt stays)",
    "/exit": "leave (also /quit or Ctrl-D)",
}
_COMMAND = re.compile(r"^/[A-Za-z?]+$")


def help_text() -> str:
    width = max(map(len, COMMANDS))
    return "".join(f"  {name:<{width}}  {what}\n" for name, what in COMMANDS.items()) + \
        "  Ctrl-C stops a reply; anything else is sent to the model.\n"


def _stream_reply(llm: Any, prompt_ids: list[int], params: SamplingParams, request_id: str,
                  adapter: str | None, out) -> str:
    engine, proc = llm.engine, llm.processor
    engine.add_request(request_id, prompt_ids, params, adapter=adapter)
    proc.register(request_id, params)
    text = []
    try:
        while engine.has_unfinished():
            for o in engine.step():
                o = proc.process(o)
                if o.new_text:
                    out.write(o.new_text)
                    out.flush()
                    text.append(o.new_text)
    except KeyboardInterrupt:  # stop this reply, keep the session
        engine.abort_request(request_id)
        proc.drop(request_id)
    out.write("\n")
    return "".join(text)


def run_chat(llm: Any, *, adapter: str | None = None, system: str | None = None, max_tokens: int = 512,
             temperature: float = 0.7, inp=None, out=None) -> int:
    """Chat with `llm` (serving.llm.LLM) on `adapter` (None: the base) until /exit or EOF."""
    inp, out = inp or sys.stdin, out or sys.stdout
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    on = f" + adapter {adapter}" if adapter else ""
    out.write(f"bastion chat: {llm.model_name}{on} (/help for commands)\n")
    turn = 0
    while True:
        out.write(">>> ")
        out.flush()
        line = inp.readline()
        if not line:  # EOF (Ctrl-D)
            out.write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if _COMMAND.match(line):
            command = line.lower()
            if command in ("/exit", "/quit"):
                return 0
            if command in ("/help", "/?"):
                out.write(help_text())
            elif command == "/reset":
                history = history[:1] if system else []
                out.write("(conversation reset)\n")
            else:
                out.write(f"unknown command {line}; /help lists the commands\n")
            continue
        history.append({"role": "user", "content": line})
        ids = encode_chat(llm.tokenizer, history)
        if len(ids) + 1 >= llm.engine.max_model_len:
            out.write("(conversation is longer than the context; /reset to start over)\n")
            history.pop()
            continue
        turn += 1
        reply = _stream_reply(llm, ids, params, f"chat-{turn}", adapter, out)
        history.append({"role": "assistant", "content": reply})
