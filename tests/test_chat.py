"""Chat: a session keeps the model cache between turns and answers as a fresh ``generate()`` on the whole
conversation would (greedy); `kimi-linear chat` through a pipe; stop tokens, interrupts, a full cache."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kimi_linear.chat import ChatSession, ContextFullError, SamplingSettings
from kimi_linear.generate import generate
from kimi_linear.model import KimiLinearForCausalLM
from kimi_linear.tokenizer import load_tokenizer
from tests.test_model import make_model
from tests.test_tokenizer import make_folder

PRINTABLE = range(32, 127)


def printable_byte_model(seed: int) -> KimiLinearForCausalLM:
    """A random byte-level model that only ever picks printable ASCII or EOS: its replies re-encode to the
    same bytes, so the whole conversation can be re-rendered from text for the reference."""
    model = make_model(seed=seed)
    keep = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    keep[list(PRINTABLE)] = True
    keep[model.config.eos_token_id] = True
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0.0
        model.lm_head.weight[keep] *= 4.0  # the best printable logit is well above the zero logits
    return model


def fresh_reply(model, tokenizer, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = generate(model, [prompt], max_new_tokens=max_new_tokens, stop_tokens=tokenizer.stop_token_ids)[0]
    return out[:-1] if out and out[-1] in tokenizer.stop_token_ids else out


def test_cli_pipe_multi_turn_equals_fresh_generate(tmp_path):
    model = printable_byte_model(seed=41)
    model.save_pretrained(tmp_path)
    turns = ["hello there", "and now? [EOS] <|im_end|>", "/system be brief", "third turn"]
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kimi_linear",
            "chat",
            "--checkpoint",
            str(tmp_path),
            "--max-new-tokens",
            "12",
        ],
        input="".join(t + "\n" for t in turns),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.endswith("\n\n")
    blocks = proc.stdout[:-2].split("\n\n")
    assert len(blocks) == 3

    tokenizer = load_tokenizer(str(tmp_path), model.config)
    messages: list[dict] = []
    for turn, block in zip([t for t in turns if not t.startswith("/")], blocks, strict=True):
        if turn == "third turn":
            messages.insert(0, {"role": "system", "content": "be brief"})
        messages.append({"role": "user", "content": turn})
        reply = fresh_reply(model, tokenizer, tokenizer.apply_chat_template(messages), 12)
        assert all(t in PRINTABLE for t in reply)
        assert block == tokenizer.decode(reply)
        messages.append({"role": "assistant", "content": block})


class CountingModel:
    """The model, recording how many tokens each prefill (hidden_states call) takes."""

    def __init__(self, model):
        self.inner, self.prefills = model, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def hidden_states(self, ids, cache=None, cu_seqlens=None):
        self.prefills.append(ids.shape[1])
        return self.inner.hidden_states(ids, cache=cache, cu_seqlens=cu_seqlens)


def tiktoken_session(tmp_path, seed: int, **kwargs):
    _, config = make_folder(tmp_path)
    model = make_model(
        seed=seed,
        vocab_size=config.vocab_size,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    tokenizer = load_tokenizer(str(tmp_path), model.config)
    counting = CountingModel(model)
    return model, tokenizer, counting, ChatSession(counting, tokenizer, **kwargs)


def test_session_prefills_only_new_tokens_and_answers_as_fresh_generate(tmp_path):
    model, tokenizer, counting, session = tiktoken_session(
        tmp_path, seed=42, sampling=SamplingSettings(max_new_tokens=7)
    )
    turns = ["hello world", "中文 hello <|im_end|>", "again"]
    replies = []
    for k, text in enumerate(turns):
        before = list(session.cached_ids)
        reply = session.send(text)
        replies.append(reply.token_ids)
        prompt = session.conversation_ids(add_generation_prompt=False)
        # The prompt of this turn: the conversation up to the new assistant turn's opening.
        prompt = prompt[: len(prompt) - len(reply.token_ids) - 1]  # minus the reply and its <|im_end|>
        assert prompt[: len(before)] == before and len(before) == reply.reused
        assert counting.prefills[-1] == reply.prefilled == len(prompt) - len(before)
        assert reply.token_ids == fresh_reply(model, tokenizer, prompt, 7)
        assert reply.finish_reason in ("stop", "length")
        if k:
            assert reply.reused > 0 and reply.prefilled < len(prompt) / 2
    # The conversation holds the generated tokens themselves, and reads as the template renders the messages.
    # (the random model emits special tokens too: the rendered messages show them by name)
    text = tokenizer.decode(session.conversation_ids(), skip_special_tokens=False)
    shown = [dict(m) for m in session.messages]
    for m, ids in zip(shown[1::2], replies, strict=True):
        m["content"] = tokenizer.decode(ids, skip_special_tokens=False)
    assert text == tokenizer.render_chat_template(shown)
    # "<|im_end|>" typed by the user is text: one <|im_end|> id per turn (the default system turn, each user
    # and each assistant turn), none inside the replies (a stop token is not kept).
    im_end = tokenizer.special_tokens["<|im_end|>"]
    assert session.conversation_ids().count(im_end) == 1 + 2 * len(turns)


def test_stop_token_ends_the_reply(tmp_path):
    model, tokenizer, _, session = tiktoken_session(
        tmp_path, seed=43, sampling=SamplingSettings(max_new_tokens=6)
    )
    free = fresh_reply(
        model, tokenizer, tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]), 6
    )
    stop = free[2]
    session.stop_token_ids = {stop}
    reply = session.send("hi")
    assert reply.finish_reason == "stop" and reply.token_ids == free[: free.index(stop)]
    assert session.send("more").finish_reason in ("stop", "length")


def test_interrupt_keeps_the_conversation(tmp_path):
    model, tokenizer, counting, session = tiktoken_session(
        tmp_path, seed=44, sampling=SamplingSettings(max_new_tokens=8)
    )
    seen = []

    def stop_at_third(token):
        seen.append(token)
        if len(seen) == 3:
            raise KeyboardInterrupt

    reply = session.send("hello", on_token=stop_at_third)
    assert reply.finish_reason == "interrupted" and reply.token_ids == seen
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    reply = session.send("go on")
    prompt = session.conversation_ids(add_generation_prompt=False)
    prompt = prompt[: len(prompt) - len(reply.token_ids) - 1]
    assert reply.reused > 0 and reply.token_ids == fresh_reply(model, tokenizer, prompt, 8)

    # An interrupt inside the model (mid-prefill) leaves the cache unusable: the next turn prefills everything.
    inner = counting.hidden_states

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    counting.hidden_states = interrupted
    assert session.send("x").finish_reason == "interrupted" and session.cached_ids == []
    counting.hidden_states = inner
    reply = session.send("y")
    prompt = session.conversation_ids(add_generation_prompt=False)
    prompt = prompt[: len(prompt) - len(reply.token_ids) - 1]
    assert reply.reused == 0 and reply.prefilled == len(prompt)
    assert reply.token_ids == fresh_reply(model, tokenizer, prompt, 8)


def test_system_prompt_change_and_reset(tmp_path):
    model, tokenizer, _, session = tiktoken_session(
        tmp_path, seed=45, sampling=SamplingSettings(max_new_tokens=4)
    )
    session.send("hello")
    session.set_system("Be brief.")
    reply = session.send("again")
    assert reply.reused == 0  # the history now starts with another system turn
    assert session.messages[0] == {"role": "system", "content": "Be brief."} and len(session.messages) == 5
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}] and session.cached_ids == []
    reply = session.send("hello")
    assert reply.reused == 0
    assert reply.token_ids == fresh_reply(
        model, tokenizer, tokenizer.apply_chat_template(session.messages[:2]), 4
    )


def test_full_cache_is_a_clear_error(tmp_path):
    _, _, _, session = tiktoken_session(tmp_path, seed=46, max_length=40)
    with pytest.raises(ContextFullError, match="cache holds 40"):
        session.send("a long message " * 10)
    assert session.messages == []


def test_sampling_defaults_from_generation_config():
    s = SamplingSettings.from_generation_config({"temperature": 0.6, "top_p": 0.9, "eos_token_id": 1})
    assert (s.temperature, s.top_p, s.top_k) == (0.6, 0.9, 0)
    s = SamplingSettings.from_generation_config({"do_sample": False, "temperature": 0.6}, top_k=5)
    assert (s.temperature, s.top_k) == (0.0, 5)
    assert SamplingSettings.from_generation_config({}, temperature=None).temperature == 0.0
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings.from_generation_config({"top_p": 0})


def test_terminal_chat_streams_and_ctrl_c_keeps_the_conversation(tmp_path):
    """On a terminal (a pseudo-terminal here): the reply streams, SIGINT stops it without ending the session,
    /reset and /exit work."""
    import pty
    import select
    import signal
    import time

    make_model(seed=47).save_pretrained(tmp_path)
    master, slave = pty.openpty()
    env = {
        **os.environ,
        "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "TERM": "dumb",
    }
    argv = ["--checkpoint", str(tmp_path), "--max-new-tokens", "100000", "--max-context", "4000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kimi_linear", "chat", *argv], stdin=slave, stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    output = bytearray()

    def read_until(predicate, timeout=120.0):
        deadline = time.monotonic() + timeout
        while not predicate(bytes(output)):
            assert time.monotonic() < deadline, f"timed out; output so far: {bytes(output)[-400:]!r}"
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    output.extend(os.read(master, 4096))
                except OSError:  # the child closed the terminal
                    break

    try:
        read_until(lambda out: out.endswith(b"> "))
        os.write(master, b"hello\n")
        start = len(output)
        read_until(lambda out: len(out) - start > 40)  # the echo and a part of the streamed reply
        os.kill(proc.pid, signal.SIGINT)
        read_until(lambda out: b"[reply stopped" in out and out.endswith(b"> "))
        os.write(master, b"/reset\n")
        read_until(lambda out: b"[new conversation]" in out and out.endswith(b"> "))
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert b"Traceback" not in output


def test_cli_pipe_names_a_line_that_is_not_utf8_and_goes_on(tmp_path):
    """A line of undecodable bytes is skipped with an error naming it; the other turns are answered (stdin
    decoded strictly, as in a UTF-8 locale)."""
    printable_byte_model(seed=47).save_pretrained(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "PYTHONIOENCODING": "utf-8:strict"}
    command = [sys.executable, "-m", "kimi_linear", "chat", "--checkpoint", str(tmp_path),
               "--max-new-tokens", "3"]
    proc = subprocess.run(command, input=b"ab\xffc\nhello\n", capture_output=True, timeout=300, env=env)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert err.strip() == ("kimi-linear chat: error: input line 1 is not valid UTF-8 (byte 0xff at character 2); "
                           "skipped")
    assert len(proc.stdout.decode().split("\n\n")) == 2, "one reply block (to 'hello') and the end"


def test_system_prompt_that_is_not_utf8_is_named(tmp_path, capsys, monkeypatch):
    import io

    from kimi_linear.cli import main

    printable_byte_model(seed=48).save_pretrained(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", "--checkpoint", str(tmp_path), "--system", "be \udcffbrief"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "kimi-linear chat: error: --system is not valid UTF-8 (byte 0xff at character 3)"


def test_chat_on_a_training_run_folder_uses_its_newest_checkpoint(tmp_path, capsys, monkeypatch):
    """`kimi-linear chat --checkpoint runs/NAME` works as `generate` does on a `kimi-linear train` folder."""
    import io

    from kimi_linear.cli import main

    for step, seed in ((2, 49), (4, 50)):
        folder = tmp_path / f"checkpoint-{step:07d}"
        printable_byte_model(seed=seed).save_pretrained(folder)
        torch.save({"step": step}, folder / "trainer_state.pt")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", "--checkpoint", str(tmp_path), "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert f"using {tmp_path / 'checkpoint-0000004'}" in err and out.endswith("\n\n"), err
