"""`kimi-linear info` and `kimi-linear generate`: output, tokenizers, and clear errors (no traceback)."""

from __future__ import annotations

import base64
import json

import pytest

from kimi_linear.cli import main
from kimi_linear.tokenizer import StreamDecoder, TiktokenTokenizer
from tests.test_model import make_model


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli-ckpt")
    make_model(seed=31).save_pretrained(directory)
    return directory


def test_info_release_preset_shows_the_cache_reduction(capsys):
    rc, out, _ = run_cli(capsys, "info", "48b-a3b", "--json")
    info = json.loads(out)
    assert rc == 0 and info["layer_counts"] == {"kda": 20, "mla": 7}
    # 7 of 27 layers keep a per-token cache: the paper's "up to 75% less" at long context.
    assert 0.73 < info["cache_reduction"] < 0.75
    assert info["params_active"] < info["params_total"]
    rc, out, _ = run_cli(capsys, "info", "48b-a3b")
    assert rc == 0 and "% less" in out and "active" in out


def test_kda_state_dtype_flag_reaches_generate_and_the_engine(capsys, checkpoint, monkeypatch):
    """``--kda-state-dtype bfloat16`` (default float32) becomes generate()'s ``state_dtype`` and, through
    ``kimi-linear serve``'s settings, the engine's ``kda_state_dtype`` and its slot pool's dtype."""
    import torch

    import kimi_linear.generate
    from kimi_linear.cli import build_parser
    from kimi_linear.cli.serve import build_engine, engine_settings

    seen = []
    real = kimi_linear.generate.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["state_dtype"])
        return real(*args, **kwargs)

    monkeypatch.setattr(kimi_linear.generate, "generate", spy)
    for flags, dtype in (([], torch.float32), (["--kda-state-dtype", "bfloat16"], torch.bfloat16)):
        rc, _, _ = run_cli(capsys, "generate", "--checkpoint", str(checkpoint), "--prompt", "ab",
                           "--max-new-tokens", "2", *flags)
        assert rc == 0 and seen[-1] == dtype

    parser = build_parser()
    args = parser.parse_args(["serve", "--checkpoint", str(checkpoint), "--kda-state-dtype", "bfloat16"])
    settings = engine_settings(args, 8192)
    assert settings["kda_state_dtype"] == "bfloat16"
    threads = torch.get_num_threads()
    try:
        engine = build_engine(str(checkpoint), settings, 8192, "cpu", "auto", 1)
    finally:
        torch.set_num_threads(threads)
    assert engine.config.kda_state_dtype == torch.bfloat16
    assert {layer["state"].dtype for layer in engine.pools.layers if "state" in layer} == {torch.bfloat16}
    default = engine_settings(parser.parse_args(["serve", "--checkpoint", str(checkpoint)]), 8192)
    assert default["kda_state_dtype"] == "float32"


def test_info_reads_a_checkpoint_folder(capsys, checkpoint):
    rc, out, _ = run_cli(capsys, "info", str(checkpoint), "--context", "1000", "--json")
    info = json.loads(out)
    assert rc == 0 and info["layers"] == 4 and info["context"] == 1000


def test_generate_streams_the_continuation(capsys, checkpoint):
    rc, out, err = run_cli(
        capsys,
        "generate",
        "--checkpoint",
        str(checkpoint),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "6",
        "--stop",
        "258",
    )
    assert rc == 0 and out.startswith("Hello") and "bytes tokenizer, 6 new tokens" in err
    rc, out, err = run_cli(
        capsys,
        "generate",
        "--checkpoint",
        str(checkpoint),
        "--prompt",
        "ab",
        "--prompt",
        "xyz",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "1",
    )
    assert rc == 0 and "--- [0] ---\nab" in out and "--- [1] ---\nxyz" in out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["info", "no-such-preset"], "neither a checkpoint folder nor a preset"),
        (["generate", "--checkpoint", "/no/such/dir", "--prompt", "x"], "not found"),
        (["generate", "--prompt", "", "--max-new-tokens", "2"], "empty"),
        (["generate", "--prompt", "x", "--temperature", "-1"], "temperature"),
        (["generate", "--prompt", "x", "--top-p", "2"], "top_p"),
        (["generate", "--prompt", "x" * 4095, "--max-new-tokens", "8"], "model_max_length"),
        (["generate", "--prompt", "ab\udcffc"], "--prompt #1 is not valid UTF-8 (byte 0xff at character 2)"),
        (["generate", "--prompt", "x", "--stop", "259"], "--stop 259 is not a token id of this model (0..258"),
        (["generate", "--prompt", "x", "--stop", "-1"], "--stop -1 is not a token id"),
        (["generate", "--prompt", "x", "--device", "tpu9"], "--device 'tpu9' is not a device"),
        (["generate", "--prompt", "x", "--threads", "0"], "--threads must be >= 1"),
        (["synth", "--threads", "0"], "--threads must be >= 1"),
        (["synth", "--device", "cuda:99", "--steps", "1"], "--device cuda:99"),
    ],
    ids=["bad-preset", "no-dir", "empty-prompt", "bad-temperature", "bad-top-p", "prompt-too-long",
         "non-utf8", "stop-over-vocab", "stop-negative", "bad-device", "generate-threads-0", "synth-threads-0",
         "synth-no-such-cuda"],
)
def test_errors_are_one_line(capsys, checkpoint, argv, match):
    if argv[0] == "generate" and "--checkpoint" not in argv:
        argv = [*argv, "--checkpoint", str(checkpoint)]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1
    assert out == "", "nothing (no prompt echo) before the error"


def test_corrupt_checkpoint_is_a_clear_error(capsys, tmp_path):
    make_model(seed=32).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", str(tmp_path), "--prompt", "x")
    assert rc == 2 and "not a readable safetensors" in err


def write_tiktoken(directory, merges):
    tokens = [bytes([i]) for i in range(256)] + merges
    lines = "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens))
    (directory / "tiktoken.model").write_text(lines)


def test_tiktoken_folder_uses_bpe_and_special_tokens(capsys, tmp_path):
    # vocab: 256 bytes + 4 merges + 256 reserved specials; bos/eos/pad among the specials as in the release
    model = make_model(seed=33, vocab_size=520, bos_token_id=260, eos_token_id=261, pad_token_id=519)
    model.save_pretrained(tmp_path)
    write_tiktoken(tmp_path, [b"he", b"ll", b"hell", b"hello"])
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": {"260": {"content": "[BOS]"}, "261": {"content": "[EOS]"}}})
    )
    tok = TiktokenTokenizer(str(tmp_path), model.config)
    assert not tok.add_bos  # the folder's tokenizer_config.json does not ask for it
    ids = tok.encode("hello [EOS] 中文")
    assert ids[0] == 259 and 261 not in ids  # BPE merge; special names in user text stay text
    assert tok.decode(ids) == "hello [EOS] 中文"
    assert tok.encoding.encode("[EOS]", allowed_special="all") == [261] and tok.decode([261]) == ""
    stream = StreamDecoder(tok)
    assert "".join(stream(t) for t in ids) + stream.flush() == "hello [EOS] 中文"
    rc, out, err = run_cli(
        capsys, "generate", "--checkpoint", str(tmp_path), "--prompt", "hello", "--max-new-tokens", "4"
    )
    assert rc == 0 and out.startswith("hello") and "tiktoken tokenizer" in err


@pytest.mark.parametrize("mixer", ["kda", "mla"])
def test_info_cache_bytes_are_what_the_cache_allocates(mixer):
    import torch

    from kimi_linear.cache import KimiLinearCache, cache_bytes_per_sequence
    from kimi_linear.config import KimiLinearConfig

    config = KimiLinearConfig.from_preset("debug", mixer=mixer)
    for dtype, nbytes in ((torch.float32, 4), (torch.bfloat16, 2)):
        cache = KimiLinearCache(config, batch_size=3, max_length=77, dtype=dtype)
        assert cache.nbytes() == 3 * cache_bytes_per_sequence(config, 77, dtype_bytes=nbytes)["hybrid"]


def test_info_shows_small_models_in_their_unit(capsys):
    rc, out, _ = run_cli(capsys, "info", "debug")
    assert rc == 0 and "0.000 B" not in out
    total = json.loads(run_cli(capsys, "info", "debug", "--json")[1])["params_total"]
    assert f"parameters: {total / 1e3:.1f} K total" in out


def test_generate_on_a_run_folder_uses_its_newest_readable_checkpoint(capsys, tmp_path):
    import torch

    make_model(seed=34).save_pretrained(tmp_path / "checkpoint-0000003")
    make_model(seed=35).save_pretrained(tmp_path / "checkpoint-0000005")
    for step in (3, 5):
        torch.save({"step": step}, tmp_path / f"checkpoint-{step:07d}" / "trainer_state.pt")
    (tmp_path / "checkpoint-0000005" / "model.safetensors").unlink()
    rc, out, err = run_cli(capsys, "generate", "--checkpoint", str(tmp_path), "--prompt", "ab",
                           "--max-new-tokens", "2")
    assert rc == 0 and out.startswith("ab"), err
    assert "skipping checkpoint-0000005: model.safetensors is not readable" in err
    assert f"using {tmp_path / 'checkpoint-0000003'}" in err


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt", "ab", "--max-new-tokens", "2"],
    ["chat", "--max-new-tokens", "2"],
    ["synth", "--steps", "1", "--seq-len", "16", "--batch-size", "2", "--eval-examples", "2", "--heads", "1",
     "--head-dim", "16", "--layers", "1", "--vocab-size", "16", "--num-kv-pairs", "2"],
], ids=["generate", "chat", "synth"])
def test_cpu_heavy_subcommands_default_to_one_thread(capsys, checkpoint, argv, monkeypatch):
    import io

    import torch

    if argv[0] in ("generate", "chat"):
        argv = [*argv, "--checkpoint", str(checkpoint)]
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))  # chat: one piped turn
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert run_cli(capsys, *argv)[0] == 0
        assert torch.get_num_threads() == 1
        assert run_cli(capsys, *argv, "--threads", "2")[0] == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_every_option_documents_its_default():
    import argparse

    from kimi_linear.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            flag = isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction))
            if not action.option_strings or flag or action.required:
                continue
            if "default" not in (action.help or ""):
                missing.append(f"{name} {action.option_strings[0]}")
        if name in ("train", "generate", "chat", "synth", "serve"):  # the CPU-heavy ones
            threads = next(a for a in sub._actions if "--threads" in a.option_strings)
            assert threads.default == 1 and "default 1" in threads.help
    assert missing == []


def test_serve_help_states_the_engine_defaults():
    import re
    from dataclasses import fields

    from kimi_linear.cli import build_parser
    from kimi_linear.serve.engine import EngineConfig

    subparsers = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    serve = subparsers.choices["serve"]
    defaults = {f.name: f.default for f in fields(EngineConfig)}
    checked = []
    for action in serve._actions:
        name = action.dest
        if name in defaults and action.default is None and name not in ("num_blocks", "max_model_len"):
            stated = re.search(r"default ([0-9.]+)", action.help).group(1)
            assert float(stated) == defaults[name], name
            checked.append(name)
    assert sorted(checked) == ["block_size", "gpu_memory_fraction", "max_num_batched_tokens", "max_num_seqs",
                               "max_queue", "snapshot_interval"]


@pytest.mark.parametrize("device, match", [
    ("tpu9", "--device 'tpu9' is not a device"),
    ("mps", "--device 'mps': use cpu, cuda or cuda:N"),
    ("cuda:99", "--device cuda:99"),
], ids=["unknown", "mps", "no-such-cuda"])
@pytest.mark.parametrize("sub", ["generate", "chat", "serve", "synth"])
def test_a_bad_device_is_one_line_in_every_subcommand(capsys, checkpoint, sub, device, match):
    """Nothing is loaded or served: the device is checked first (no traceback, exit 2)."""
    argv = {"generate": ["--checkpoint", str(checkpoint), "--prompt", "x"],
            "chat": ["--checkpoint", str(checkpoint)],
            "serve": ["--checkpoint", str(checkpoint), "--port", "0"],
            "synth": ["--steps", "1"]}[sub]
    rc, out, err = run_cli(capsys, sub, *argv, "--device", device)
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"kimi-linear {sub}: error:") and out == ""
