"""The cache of converted models (``partitioner.converted``, SmolLM2's GGUF as a folder):
converted once under a lock, used only when complete and checked, never for another source."""

from __future__ import annotations

import json
import threading
import time
import warnings

import pytest
import torch
from conftest import built
from safetensors.torch import load_file, save_file

from partitioner import converted
from partitioner.zoo import folder_mismatch, write_folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("TEESPLIT_CACHE", str(root))
    return root


class Converter:
    """A conversion that writes one file and counts its calls."""

    def __init__(self, why: str | None = None, delay: float = 0.0) -> None:
        self.calls, self.why, self.delay = 0, why, delay

    def __call__(self, out):
        self.calls += 1
        time.sleep(self.delay)
        (out / "weights").write_text("converted")
        return self.why


def test_a_source_is_converted_once_and_then_read(cache, tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"one")
    convert = Converter()
    first = converted.folder("m", source, convert)
    assert first is not None and first.parent == cache
    assert (first / "weights").read_text() == "converted"
    assert converted.folder("m", source, convert) == first and convert.calls == 1
    source.write_bytes(b"two")  # another file under the same path: another folder
    second = converted.folder("m", source, convert)
    assert second is not None and second != first and convert.calls == 2


def test_an_incomplete_folder_is_never_used(cache, tmp_path):
    """A conversion killed half way leaves a folder without its completion mark: the next
    load converts afresh instead of reading what is there."""
    source = tmp_path / "model.gguf"
    source.write_bytes(b"one")
    convert = Converter()
    folder = converted.folder("m", source, convert)
    (folder / converted._DONE).unlink()
    (folder / "weights").write_text("half written")
    assert converted.folder("m", source, convert) == folder and convert.calls == 2
    assert (folder / "weights").read_text() == "converted"


def test_a_conversion_that_does_not_match_is_not_used_nor_tried_again(cache, tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"one")
    convert = Converter(why="its weights differ")
    with pytest.warns(RuntimeWarning, match="its weights differ; not used"):
        assert converted.folder("m", source, convert) is None
    assert not [p for p in cache.iterdir() if p.is_dir()]  # nothing of it is left
    with pytest.warns(RuntimeWarning, match="says the conversion differs"):
        assert converted.folder("m", source, convert) is None
    assert convert.calls == 1  # remembered: a load does not convert again each time


def test_a_conversion_that_fails_leaves_nothing_and_is_not_used(cache, tmp_path):
    """A full disk in safetensors raises its own error type, not OSError."""
    source = tmp_path / "model.gguf"
    source.write_bytes(b"one")

    def failing(out):
        (out / "weights").write_text("half")
        raise ValueError("No space left on device")

    with pytest.warns(RuntimeWarning, match="No space left on device"):
        assert converted.folder("m", source, failing) is None
    assert not [p for p in cache.iterdir() if p.is_dir()]


def test_a_new_conversion_format_converts_again(cache, tmp_path, monkeypatch):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"one")
    convert = Converter()
    first = converted.folder("m", source, convert)
    monkeypatch.setattr(converted, "FORMAT", converted.FORMAT + 1)
    assert converted.folder("m", source, convert) != first and convert.calls == 2


def test_a_folder_that_no_longer_loads_is_removed_and_the_source_read(tmp_path, monkeypatch):
    """A completed folder truncated or emptied since its check: the load falls back to the
    GGUF file and the folder goes, so that the next load converts afresh."""
    from partitioner import zoo

    broken = tmp_path / "smollm2-x"
    broken.mkdir()
    (broken / converted._DONE).write_text("")
    (broken / "config.json").write_text("{")
    source = object()
    monkeypatch.setattr(zoo, "smollm2_folder", lambda: broken)
    monkeypatch.setattr(zoo, "_smollm2_from_gguf", lambda: source)
    with pytest.warns(RuntimeWarning, match="does not load"):
        assert zoo.smollm2() is source
    assert not broken.exists()


def test_no_writable_cache_means_loading_the_source(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("TEESPLIT_CACHE", str(tmp_path / "file" / "cache"))
    source = tmp_path / "model.gguf"
    source.write_bytes(b"one")
    with pytest.warns(RuntimeWarning, match="no cache at"):
        assert converted.folder("m", source, Converter()) is None


def test_loads_asking_at_once_convert_once(cache, tmp_path):
    """Threads, each with its own open lock file: flock excludes them as it excludes two
    processes."""
    source = tmp_path / "model.gguf"
    source.write_bytes(b"one")
    convert = Converter(delay=0.3)
    got = []
    threads = [
        threading.Thread(target=lambda: got.append(converted.folder("m", source, convert)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert convert.calls == 1 and len(set(got)) == 1 and got[0] is not None


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_end|>"], show_progress=False
    )
    backend.train_from_iterator(["What is the capital of France?"] * 5, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        chat_template="{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}",
    )


def test_the_check_refuses_a_folder_that_differs_from_the_loaded_model(tmp_path):
    """``folder_mismatch`` is what stands between a conversion and its use: a weight changed
    in one bit, or a changed config, is named."""
    model, tokenizer = built("tiny-llama"), _tokenizer()
    write_folder(model, tokenizer, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert folder_mismatch(model, tokenizer, tmp_path) is None
        weights = load_file(str(tmp_path / "model.safetensors"))
        name = next(k for k in weights if k.endswith("q_proj.weight"))
        flipped = weights[name].clone()
        flipped.view(torch.int32)[0, 0] ^= 1  # the last bit of one weight
        save_file({**weights, name: flipped}, str(tmp_path / "model.safetensors"))
        assert folder_mismatch(model, tokenizer, tmp_path) == "its weights differ"
        save_file(weights, str(tmp_path / "model.safetensors"))
        vocab = (tmp_path / "tokenizer.json").read_text()
        swapped = json.loads(vocab)  # two tokens trade ids: every text still encodes
        ids = swapped["model"]["vocab"]
        one, two = sorted(ids)[-2:]
        ids[one], ids[two] = ids[two], ids[one]
        (tmp_path / "tokenizer.json").write_text(json.dumps(swapped))
        assert folder_mismatch(model, tokenizer, tmp_path) == "its tokenizer differs"
        (tmp_path / "tokenizer.json").write_text(vocab)
        config = (tmp_path / "config.json").read_text()
        (tmp_path / "config.json").write_text(config.replace('"rms_norm_eps"', '"x"'))
        assert folder_mismatch(model, tokenizer, tmp_path) == "its config differs"


def test_a_missing_gguf_file_is_named(tmp_path, monkeypatch):
    from partitioner import zoo
    from partitioner.errors import CaptureError

    monkeypatch.setattr(zoo, "smollm2_dir", lambda: tmp_path)
    for load in (zoo.smollm2, zoo.smollm2_tokenizer):
        with pytest.raises(CaptureError, match=f"{zoo.SMOLLM2_FILE} is missing"):
            load()
