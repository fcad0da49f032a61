"""Text sources and token windows: shapes, contents, the calibration RNG protocol, errors."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from compensator import data
from compensator.data import (
    calibration_windows,
    eval_windows,
    load_calibration_windows,
    load_eval_windows,
    resolve_text,
    tokenize_text,
)
from compensator.errors import CompensatorError
from conftest import require

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
WIKI_TEST_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
WIKI_VALID_SHA256 = "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"

WORDS = ["[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "."]


def make_tokenizer(model_max_length: int = 1_000_000) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS, built in memory (no downloads)."""
    vocab = {word: i for i, word in enumerate(WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", model_max_length=model_max_length
    )


@pytest.fixture
def no_data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.DATA_ENV, raising=False)


@pytest.fixture
def shared_data(monkeypatch: pytest.MonkeyPatch) -> Path:
    require(
        (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").is_file(),
        f"shared data dir {SHARED_DATA} is absent",
    )
    monkeypatch.setenv(data.DATA_ENV, str(SHARED_DATA))
    return SHARED_DATA


def assert_one_line_error(exc: pytest.ExceptionInfo[CompensatorError], *needles: str) -> None:
    message = str(exc.value)
    assert message
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


# ---------------------------------------------------------------------------- eval windows


def test_eval_windows_are_consecutive_and_drop_the_tail() -> None:
    tokens = torch.arange(23)
    out = eval_windows(tokens, seqlen=5)
    assert out.dtype == torch.long
    assert out.shape == (4, 5)
    assert torch.equal(out.reshape(-1), torch.arange(20))
    assert torch.equal(out[2], torch.tensor([10, 11, 12, 13, 14]))


def test_eval_windows_limit_keeps_the_first_windows() -> None:
    tokens = torch.arange(100)
    out = eval_windows(tokens, seqlen=10, windows=3)
    assert torch.equal(out, torch.arange(30).reshape(3, 10))
    # Asking for more than exist gives all complete windows.
    assert eval_windows(tokens, seqlen=10, windows=50).shape == (10, 10)


def test_eval_windows_exact_multiple_keeps_everything() -> None:
    out = eval_windows(torch.arange(12), seqlen=4)
    assert torch.equal(out, torch.arange(12).reshape(3, 4))


def test_eval_windows_does_not_alias_the_tokens() -> None:
    tokens = torch.arange(8)
    out = eval_windows(tokens, seqlen=4)
    out[0, 0] = 99
    assert tokens[0] == 0


@pytest.mark.parametrize(
    ("n_tokens", "seqlen", "windows", "needle"),
    [
        (9, 10, None, "fewer than one window"),
        (100, 10, 0, "windows=0"),
        (100, 10, -2, "windows=-2"),
        (100, 1, None, "seqlen=1"),
    ],
)
def test_eval_windows_errors(n_tokens: int, seqlen: int, windows: int | None, needle: str) -> None:
    with pytest.raises(CompensatorError) as exc:
        eval_windows(torch.arange(n_tokens), seqlen=seqlen, windows=windows)
    assert_one_line_error(exc, needle)


def test_windows_reject_2d_tokens() -> None:
    with pytest.raises(CompensatorError) as exc:
        eval_windows(torch.arange(20).reshape(2, 10), seqlen=5)
    assert_one_line_error(exc, "1-D")


# ---------------------------------------------------------------------------- calibration


def reference_offsets(n_tokens: int, n: int, seqlen: int, seed: int) -> list[int]:
    """The peers' protocol, literally: global RNG seeded once, one randint per window."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [int(torch.randint(0, n_tokens - seqlen - 1, (1,)).item()) for _ in range(n)]


@pytest.mark.parametrize(
    ("n_tokens", "n", "seqlen", "seed"), [(5000, 16, 64, 0), (300, 7, 37, 1234)]
)
def test_calibration_windows_match_global_rng_reference(
    n_tokens: int, n: int, seqlen: int, seed: int
) -> None:
    tokens = torch.arange(n_tokens) * 3 + 1  # distinct values so a window pins its start
    out = calibration_windows(tokens, n=n, seqlen=seqlen, seed=seed)
    assert out.shape == (n, seqlen)
    assert out.dtype == torch.long
    expected = torch.stack(
        [tokens[s : s + seqlen] for s in reference_offsets(n_tokens, n, seqlen, seed)]
    )
    assert torch.equal(out, expected)


def test_calibration_windows_leave_global_rng_untouched() -> None:
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    calibration_windows(torch.arange(1000), n=4, seqlen=16, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_calibration_windows_depend_on_seed_and_are_reproducible() -> None:
    tokens = torch.arange(10_000)
    a = calibration_windows(tokens, n=8, seqlen=32, seed=0)
    assert torch.equal(a, calibration_windows(tokens, n=8, seqlen=32, seed=0))
    assert not torch.equal(a, calibration_windows(tokens, n=8, seqlen=32, seed=1))


def test_calibration_windows_shortest_valid_text() -> None:
    # n_tokens = seqlen + 2 is the minimum: randint(0, 1) always draws 0.
    out = calibration_windows(torch.arange(12), n=3, seqlen=10, seed=5)
    assert torch.equal(out, torch.arange(10).expand(3, 10))


@pytest.mark.parametrize(("n_tokens", "n", "needle"), [(11, 2, "too few"), (1000, 0, "n=0")])
def test_calibration_windows_errors(n_tokens: int, n: int, needle: str) -> None:
    with pytest.raises(CompensatorError) as exc:
        calibration_windows(torch.arange(n_tokens), n=n, seqlen=10)
    assert_one_line_error(exc, needle)


# ---------------------------------------------------------------------------- tokenization


def test_tokenize_text_whole_string_and_silences_length_warning() -> None:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.WARNING)
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        text = "the cat sat on the mat . a dog ran ."
        # Control: the plain call does warn, so the silence below is not vacuous.
        make_tokenizer(model_max_length=4)(text, return_tensors="pt")
        assert any("longer than the specified maximum" in r.getMessage() for r in records)
        records.clear()

        tokens = tokenize_text(make_tokenizer(model_max_length=4), text)
        assert not any("longer than the specified maximum" in r.getMessage() for r in records)
    finally:
        hf_logger.removeHandler(handler)
    assert tokens.dtype == torch.long
    assert tokens.dim() == 1
    assert tokens.tolist() == [1, 2, 3, 4, 1, 5, 9, 6, 7, 8, 9]


def test_tokenize_text_accepts_minimal_fake_tokenizer() -> None:
    class Fake:
        def __call__(self, text: str, return_tensors: str) -> types.SimpleNamespace:
            assert return_tensors == "pt"
            return types.SimpleNamespace(input_ids=torch.tensor([[len(w) for w in text.split()]]))

    assert tokenize_text(Fake(), "ab c def").tolist() == [2, 1, 3]


# ---------------------------------------------------------------------------- sources


def test_embedded_corpus_is_pydoc_topics_in_sorted_order(no_data_env: None) -> None:
    from pydoc_data.topics import topics

    text, description = resolve_text("embedded", "eval")
    assert description == "embedded pydoc corpus"
    assert text == "\n\n".join(topics[k] for k in sorted(topics))
    assert len(text) > 100_000  # enough for hundreds of 512-token windows


@pytest.mark.parametrize(("purpose", "expected"), [("eval", "embedded"), ("calib", "embedded")])
def test_default_without_data_dir_is_embedded(
    no_data_env: None, purpose: data.Purpose, expected: str
) -> None:
    assert data.default_source(purpose) == expected
    assert resolve_text(None, purpose)[1] == "embedded pydoc corpus"


def test_default_with_data_dir_picks_split_per_purpose(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text("test split text")
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "valid.txt").write_text("valid split text")
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert resolve_text(None, "eval")[0] == "test split text"
    assert resolve_text(None, "calib")[0] == "valid split text"


def test_named_source_without_env_names_the_variable(no_data_env: None) -> None:
    with pytest.raises(CompensatorError) as exc:
        resolve_text("wikitext2", "eval")
    assert_one_line_error(exc, "COMPENSATOR_DATA")


def test_named_source_with_missing_file_names_the_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    with pytest.raises(CompensatorError) as exc:
        resolve_text("wikitext2-valid", "calib")
    assert_one_line_error(exc, str(tmp_path / "wikitext-2" / "valid.txt"), "COMPENSATOR_DATA")


def test_real_data_dir_resolves_both_names(shared_data: Path) -> None:
    test_path = shared_data / "wikitext-2-raw" / "wiki.test.raw"
    valid_path = shared_data / "wikitext-2" / "valid.txt"
    test_bytes = test_path.read_bytes()
    valid_bytes = valid_path.read_bytes()
    assert hashlib.sha256(test_bytes).hexdigest() == WIKI_TEST_SHA256
    assert hashlib.sha256(valid_bytes).hexdigest() == WIKI_VALID_SHA256

    text, description = resolve_text("wikitext2", "eval")
    assert str(test_path) in description
    # Text mode turns the file's CRLF line ends into "\n".
    assert text == test_bytes.decode("utf-8").replace("\r\n", "\n")
    assert text.startswith(" = Robert Boulter = \n")
    assert "\r" not in text

    valid, valid_description = resolve_text("wikitext2-valid", "calib")
    assert str(valid_path) in valid_description
    assert valid == valid_bytes.decode("utf-8")
    assert "<unk>" in valid

    assert resolve_text(None, "eval") == (text, description)
    assert resolve_text(None, "calib") == (valid, valid_description)


def test_text_and_raw_files(tmp_path: Path) -> None:
    for name in ("corpus.txt", "corpus.raw", "CORPUS.TXT"):
        path = tmp_path / name
        path.write_text("hello\nworld\n", encoding="utf-8")
        text, description = resolve_text(str(path), "calib")
        assert text == "hello\nworld\n"
        assert description == f"file {path}"


def test_jsonl_concatenates_text_fields(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": "first", "id": 1}), "", json.dumps({"text": "sec\nond"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    text, _ = resolve_text(str(path), "eval")
    assert text == "first\n\nsec\nond"


@pytest.mark.parametrize(
    ("bad_line", "needle"),
    [
        (json.dumps({"content": "x"}), 'no "text" field'),
        ("[1, 2]", 'no "text" field'),
        ("{not json", "not valid JSON"),
        (json.dumps({"text": 3}), "not a string"),
    ],
)
def test_jsonl_bad_line_names_line_number(tmp_path: Path, bad_line: str, needle: str) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text(f'{{"text": "a"}}\n{{"text": "b"}}\n{bad_line}\n', encoding="utf-8")
    with pytest.raises(CompensatorError) as exc:
        resolve_text(str(path), "eval")
    assert_one_line_error(exc, "line 3", needle)


def test_missing_file_and_empty_text_errors(tmp_path: Path) -> None:
    with pytest.raises(CompensatorError) as exc:
        resolve_text(str(tmp_path / "nope.txt"), "eval")
    assert_one_line_error(exc, "does not exist")

    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n ")
    with pytest.raises(CompensatorError) as exc:
        resolve_text(str(empty), "eval")
    assert_one_line_error(exc, "no text")


@pytest.mark.parametrize(
    "source", ["c4", "wikitext", "corpus.csv", "", "hf:onlyname", "hf:a:b:c:d"]
)
def test_unknown_sources_give_one_line_error(no_data_env: None, source: str) -> None:
    with pytest.raises(CompensatorError) as exc:
        resolve_text(source, "eval")
    assert_one_line_error(exc)


def test_unknown_source_lists_accepted_forms(no_data_env: None) -> None:
    with pytest.raises(CompensatorError) as exc:
        resolve_text("c4", "eval")
    assert_one_line_error(exc, "'c4'", ".jsonl", "wikitext2-valid", "embedded", "hf:")


def test_bad_purpose() -> None:
    with pytest.raises(CompensatorError) as exc:
        resolve_text("embedded", "train")  # type: ignore[arg-type]
    assert_one_line_error(exc, "'train'")


def test_hf_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(CompensatorError) as exc:
        resolve_text("hf:wikitext:wikitext-2-raw-v1:test", "eval")
    assert_one_line_error(exc, "datasets")


def test_hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: pytest.fail("must not load while offline")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CompensatorError) as exc:
        resolve_text("hf:wikitext:test", "eval")
    assert_one_line_error(exc, "offline")


@pytest.mark.parametrize(
    ("source", "expected_args"),
    [
        ("hf:wikitext:wikitext-2-raw-v1:test", ("wikitext", "wikitext-2-raw-v1", "test")),
        ("hf:org/corpus:validation", ("org/corpus", None, "validation")),
    ],
)
def test_hf_online_with_fake_datasets(
    monkeypatch: pytest.MonkeyPatch, source: str, expected_args: tuple[str, str | None, str]
) -> None:
    calls: list[tuple[str, str | None, str]] = []

    def load_dataset(name: str, config: str | None, split: str) -> dict[str, list[str]]:
        calls.append((name, config, split))
        return {"text": ["one", "two"]}

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: True)
    text, description = resolve_text(source, "eval")
    assert calls == [expected_args]
    assert text == "one\n\ntwo"
    assert expected_args[0] in description


# ---------------------------------------------------------------------------- end to end


def test_load_windows_end_to_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = make_tokenizer()
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(WORDS[1:] * 30))  # 270 tokens: ids 1..9 repeated
    all_ids = torch.tensor(list(range(1, 10)) * 30)

    with caplog.at_level(logging.INFO, logger="compensator.data"):
        ev = load_eval_windows(tokenizer, str(path), seqlen=16, windows=5)
        cal = load_calibration_windows(tokenizer, str(path), n=3, seqlen=16, seed=2)
    assert torch.equal(ev, all_ids[:80].reshape(5, 16))
    expected = torch.stack([all_ids[s : s + 16] for s in reference_offsets(270, 3, 16, 2)])
    assert torch.equal(cal, expected)
    assert str(path) in caplog.text
    assert "270 tokens" in caplog.text
