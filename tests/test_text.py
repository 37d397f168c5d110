"""The text loader's errors and the character-level task."""

import jax
import numpy as np
import pytest

from rtrl_jax._src import tasks
from rtrl_jax._src.text import TextDataError, char_stream, char_task, load_text, vocabulary
from rtrl_jax.experiment import TASKS, ConfigError, build, load_config


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(TextDataError, match="nope.txt.*does not exist"):
        load_text(path)


def test_directory(tmp_path):
    with pytest.raises(TextDataError, match="not a regular file"):
        load_text(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(TextDataError, match="empty.txt.*empty"):
        load_text(path)


def test_undecodable_file(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(TextDataError, match=r"latin.txt.*not valid utf-8: byte 3"):
        load_text(path)
    assert load_text(path, encoding="latin-1") == "café au lait"


def test_too_short_for_a_task(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("a")
    with pytest.raises(TextDataError, match="1 characters, fewer than the 2"):
        char_task(path)


def test_max_chars(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("abcdef")
    assert load_text(path, max_chars=3) == "abc"
    with pytest.raises(TextDataError, match="max_chars"):
        load_text(path, max_chars=0)


def test_char_task_is_next_character(tmp_path):
    text = "hello world, hello jax\n"
    path = tmp_path / "a.txt"
    path.write_text(text)
    task = TASKS["char"](path)
    vocab = vocabulary(text)
    assert task.input_size == task.num_classes == len(set(text))
    assert task.hard_targets
    stream = tasks.sample_batch(task, jax.random.PRNGKey(0), 60, 3)
    assert stream.inputs.shape == (3, 60, len(vocab.chars))
    for b in range(3):
        inputs = vocab.decode(np.argmax(stream.inputs[b], -1))
        targets = vocab.decode(np.argmax(stream.targets[b], -1))
        # the stream reads on and wraps to the start of the text (without the last-to-first pair)
        cycle = len(text) - 1
        starts = [s for s in range(cycle) if inputs == "".join(text[(s + t) % cycle] for t in range(60))]
        assert len(starts) == 1
        position = (starts[0] + np.arange(60)) % cycle
        assert inputs == "".join(text[p] for p in position)
        assert targets == "".join(text[p + 1] for p in position)
        assert bool(stream.reset[b, 0])
        np.testing.assert_array_equal(np.asarray(stream.reset[b, 1:]), position[1:] == 0)


def test_char_stream():
    stream = char_stream(np.array([0, 1, 2, 1]), 3)
    assert stream.inputs.shape == (3, 3)
    np.testing.assert_array_equal(np.argmax(stream.targets, -1), [1, 2, 1])


def test_config_names_the_missing_text(tmp_path):
    missing = tmp_path / "gone.txt"
    with pytest.raises(ConfigError, match=r"task_options.*gone.txt.*does not exist"):
        build(load_config(None, ["task=char", f"task_options={{path: {missing}}}"]))


def test_config_accepts_a_text(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("to be or not to be")
    config = load_config(None, ["task=char", f"task_options={{path: {path}}}", "model.hidden=4"])
    assert config.task_options["path"] == str(path)
