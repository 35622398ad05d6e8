"""`bastion chat`: an interactive terminal chat that streams tokens as they come.

Commands at the prompt: /reset (forget the conversation), /exit (or Ctrl-D).
"""

from __future__ import annotations

import sys

from bastion.config import Config
from bastion.serving.chat_template import encode_chat
from bastion.serving.llm import LLM
from bastion.engine.sampling_params import SamplingParams


def _stream_reply(llm: LLM, prompt_ids: list[int], params: SamplingParams, request_id: str, out=sys.stdout) -> str:
    engine, proc = llm.engine, llm.processor
    engine.add_request(request_id, prompt_ids, params)
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


def run_chat(config: Config, system: str | None = None, max_tokens: int = 512, temperature: float = 0.7,
             inp=None, out=sys.stdout) -> int:
    inp = inp or sys.stdin
    llm = LLM(config)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    out.write(f"bastion chat: {llm.model_name} (/reset, /exit)\n")
    turn = 0
    while True:
        out.write(">>> ")
        out.flush()
        line = inp.readline()
        if not line:  # EOF (Ctrl-D)
            out.write("\n")
            return 0
        line = line.strip()
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        ids = encode_chat(llm.tokenizer, history)
        if len(ids) + 1 >= llm.engine.max_model_len:
            out.write("(conversation is longer than the context; /reset to start over)\n")
            history.pop()
            continue
        turn += 1
        reply = _stream_reply(llm, ids, params, f"chat-{turn}", out)
        history.append({"role": "assistant", "content": reply})
