"""Built-in instruction tasks with deterministic references, for benchmarks that must run offline.

Responses range from 1 to 279 tokens of the word-level tokenizer (a word, a number, a letter, a
space or a punctuation mark is one token; 5-279 in the quality benchmark's test split). Every task
is a pure function of a random generator, and splits are drawn from one seed.

The long tasks count down to 1, so the place to stop is a local signal (the item that holds 1)
that a small model learns; an earlier set (count a to b, repeat k times, reverse, sort) left
stopping or the content out of reach of a teacher trained on a CPU (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import random
import string

WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ocean", "candle", "forest", "rocket",
         "garden", "silver", "window", "yellow", "dragon", "planet", "shadow", "winter", "button", "kernel", "tensor",
         "bridge", "castle", "pepper", "violet", "summer", "marble", "copper", "falcon", "meadow", "harbor")
NAMES = ("Ada", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena")
KEYWORDS = ("count", "down", "from", "by", "to", "repeat", "spell", "list", "for")
MAX_NUMBER = 300


def _count(rng):
    start, step = rng.randint(2, 140), rng.randint(1, 2)
    return f"count down from {start} by {step}", " ".join(str(i) for i in range(start, 0, -step))


def _repeat(rng):
    word, k = rng.choice(WORDS), rng.randint(2, 70)
    return f"repeat {k}: {word}", " ".join(f"{word} {i}" for i in range(k, 0, -1))


def _spell(rng):
    words = rng.sample(WORDS, rng.randint(1, 3))
    return "spell " + " ".join(words), " ".join("-".join(w) for w in words)


def _template(rng):
    name, thing, k = rng.choice(NAMES), rng.choice(WORDS), rng.randint(1, 30)
    return f"list {k} {thing} for {name}", " ".join(f"{thing} {i} for {name}." for i in range(k, 0, -1))


TASKS = {"count": _count, "repeat": _repeat, "spell": _spell, "template": _template}


def _draw(rng, n, names, exclude, distinct):
    rows, seen = [], set(exclude)
    for _ in range(100 * n + 100):
        if len(rows) == n:
            return rows
        task = names[len(rows) % len(names)]
        prompt, response = TASKS[task](rng)
        if prompt in exclude or (distinct and prompt in seen):
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt + "\n", "response": response, "task": task})
    raise ValueError(f"cannot draw {n} distinct rows from the built-in tasks")


def make_splits(n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, list[dict]]:
    """Train/validation/test rows ``{"prompt", "response", "task"}``, tasks in equal shares (±1).

    No prompt is in two splits, and validation and test prompts are distinct; train rows may repeat
    a prompt (count has only 278 prompts), as a training stream drawn from the task would.
    """
    rng = random.Random(seed)
    names = sorted(TASKS)
    held_out = _draw(rng, n_val + n_test, names, set(), distinct=True)
    train = _draw(rng, n_train, names, {r["prompt"][:-1] for r in held_out}, distinct=False)
    rng.shuffle(held_out)
    rng.shuffle(train)
    return {"train": train, "validation": held_out[:n_val], "test": held_out[n_val:]}


def build_tokenizer(level: str = "word"):
    """Tokenizer (``<pad>`` = 0, ``<eos>`` = 1) built with `tokenizers`, in Hugging Face format
    (``build_tokenizer().save_pretrained(path)``). ``"word"``: every word, number (0-300), letter,
    space and punctuation mark of the tasks is one token; ``"char"``: one token per printable character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if level not in ("word", "char"):
        raise ValueError(f"level must be 'word' or 'char', got {level!r}")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    pieces = string.printable
    if level == "word":
        pieces = [*string.printable, *WORDS, *NAMES, *KEYWORDS, *(str(i) for i in range(10, MAX_NUMBER + 1))]
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    pattern = "[A-Za-z]+|[0-9]+|[^A-Za-z0-9]" if level == "word" else "."
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
