"""Text data: a checked loader and a character-level next-character prediction task.

:func:`load_text` reads a text file and turns every way it can be unusable (missing, a directory,
empty, not decodable, too short) into a :class:`TextDataError` that names the file and the problem,
before anything is compiled. :func:`char_task` builds a :class:`~rtrl_jax._src.tasks.Task` on it:
the vocabulary is the text's sorted set of characters, inputs are one-hot characters and targets the
one-hot next character.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rtrl_jax._src.tasks import Stream, Task


class TextDataError(ValueError):
    """A text file that cannot be used; the message names the path and what is wrong."""


def load_text(
    path: str | Path,
    *,
    encoding: str = "utf-8",
    max_chars: int | None = None,
    min_chars: int = 1,
) -> str:
    """Reads a text file, with a clear error for every way it can be unusable.

    Args:
      path: the file.
      encoding: its encoding (strict decoding: a byte that does not decode is an error).
      max_chars: keep only the first ``max_chars`` characters (``None``: all).
      min_chars: the fewest characters accepted (after ``max_chars``).

    Returns:
      The text.

    Raises:
      TextDataError: the file is missing, not a regular file, unreadable, empty, not decodable
        with ``encoding`` (the message gives the byte offset), or shorter than ``min_chars``.

    Example::

        text = load_text("data/tinyshakespeare.txt", max_chars=100_000)
    """
    path = Path(path)
    if not path.exists():
        raise TextDataError(f"text file {str(path)!r} does not exist.")
    if not path.is_file():
        raise TextDataError(f"text file {str(path)!r} is not a regular file.")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise TextDataError(f"text file {str(path)!r} cannot be read: {error.strerror or error}.") from None
    if not raw:
        raise TextDataError(f"text file {str(path)!r} is empty (0 bytes).")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise TextDataError(
            f"text file {str(path)!r} is not valid {encoding}: byte {error.start} "
            f"({raw[error.start : error.start + 1]!r}) cannot be decoded ({error.reason})."
        ) from None
    except LookupError:
        raise TextDataError(f"unknown text encoding {encoding!r} for {str(path)!r}.") from None
    if max_chars is not None:
        if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
            raise TextDataError(f"max_chars must be a positive integer, got {max_chars!r}.")
        text = text[:max_chars]
    if len(text) < min_chars:
        raise TextDataError(
            f"text file {str(path)!r} has {len(text)} characters, fewer than the {min_chars} needed."
        )
    return text


class Vocabulary(NamedTuple):
    """The characters of a text and their ids.

    Attributes:
      chars: the sorted characters; ``chars[i]`` has id ``i``.
    """

    chars: str

    def encode(self, text: str) -> np.ndarray:
        """The ids of ``text`` (``int32``); raises :class:`TextDataError` for an unknown character."""
        index = {c: i for i, c in enumerate(self.chars)}
        try:
            return np.fromiter((index[c] for c in text), np.int32, count=len(text))
        except KeyError as error:
            raise TextDataError(f"character {error.args[0]!r} is not in the vocabulary.") from None

    def decode(self, ids) -> str:
        """The text of a sequence of ids."""
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))


def vocabulary(text: str) -> Vocabulary:
    """The sorted set of the characters of ``text``."""
    return Vocabulary("".join(sorted(set(text))))


def char_stream(ids: np.ndarray | jax.Array, vocab_size: int) -> Stream:
    """The next-character stream of a sequence of ids: input ``ids[t]``, target ``ids[t + 1]``.

    Returns a :class:`Stream` of ``len(ids) - 1`` steps with one-hot inputs and targets, every step
    weighted 1 and a reset at the first step.
    """
    ids = jnp.asarray(ids)
    num_steps = ids.shape[-1] - 1
    return Stream(
        inputs=jax.nn.one_hot(ids[..., :-1], vocab_size, dtype=jnp.float32),
        targets=jax.nn.one_hot(ids[..., 1:], vocab_size, dtype=jnp.float32),
        mask=jnp.ones(ids.shape[:-1] + (num_steps,), jnp.float32),
        reset=jnp.zeros(ids.shape[:-1] + (num_steps,), bool).at[..., 0].set(True),
    )


def char_task(
    path: str | Path,
    *,
    max_chars: int | None = None,
    encoding: str = "utf-8",
) -> Task:
    """Character-level language modelling of a text file: predict the next character.

    The vocabulary is the sorted set of the text's characters (see :func:`vocabulary`). A stream
    starts at a random position of the text (drawn from the key) and reads on, wrapping to the start
    at the end of the text, where the carry and trace are reset. Inputs are one-hot characters,
    targets the one-hot next character; every step has a loss. The uniform-prediction baseline is
    ``log(vocab size)`` nats per character. The text is held once as character ids and every chunk
    of a stream reads its positions from them (:func:`~rtrl_jax._src.tasks.task_source`).

    Args:
      path: a text file (checked by :func:`load_text`; at least 2 characters).
      max_chars: use only the first ``max_chars`` characters.
      encoding: the file's encoding.

    Returns:
      A :class:`~rtrl_jax._src.tasks.Task` named ``char(<file name>)`` with hard targets.

    Example::

        task = char_task("tinyshakespeare.txt", max_chars=100_000)
        stream = sample_batch(task, jax.random.PRNGKey(0), num_steps=1000, batch_size=8)
    """
    text = load_text(path, encoding=encoding, max_chars=max_chars, min_chars=2)
    vocab = vocabulary(text)
    size = len(vocab.chars)
    # one id per character (1 byte for vocabularies up to 256): the stream reads it by position.
    ids = jnp.asarray(vocab.encode(text).astype(np.uint8 if size <= 256 else np.int32))
    # positions 0 .. n-2 have a next character; a stream cycles through them.
    cycle = ids.shape[0] - 1

    def window(key, start, num_steps):
        offset = jax.random.randint(key, (), 0, cycle)
        steps = start + jnp.arange(num_steps)
        position = (offset + steps) % cycle
        inputs = jax.nn.one_hot(ids[position], size, dtype=jnp.float32)
        targets = jax.nn.one_hot(ids[position + 1], size, dtype=jnp.float32)
        reset = (position == 0) | (steps == 0)
        return Stream(inputs, targets, jnp.ones((num_steps,), jnp.float32), reset)

    def sample(key, num_steps):
        return window(key, 0, num_steps)

    return Task(f"char({Path(path).name})", size, size, sample, True, window)
