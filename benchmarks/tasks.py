"""Built-in instruction tasks with deterministic references, for benchmarks that must run offline.

Responses range from about 5 to about 300 tokens of the word-level tokenizer (a word, a number,
a letter, a space or a punctuation mark is one token). Every task is a pure function of a random
generator, and splits are drawn from one seed.
"""

from __future__ import annotations

import random
import string

WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ocean", "candle", "forest", "rocket",
         "garden", "silver", "window", "yellow", "dragon", "planet", "shadow", "winter", "button", "kernel", "tensor",
         "bridge", "castle", "pepper", "violet", "summer", "marble", "copper", "falcon", "meadow", "harbor")
NAMES = ("Ada", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena")
KEYWORDS = ("count", "to", "repeat", "spell", "reverse", "sort", "list", "for")
MAX_NUMBER = 300


def _count(rng):
    a = rng.randint(0, 150)
    b = a + rng.randint(2, 120)
    return f"count {a} to {b}", " ".join(str(i) for i in range(a, b + 1))


def _repeat(rng):
    word, k = rng.choice(WORDS), rng.randint(2, 120)
    return f"repeat {k}: {word}", " ".join([word] * k)


def _spell(rng):
    words = rng.sample(WORDS, rng.randint(1, 3))
    return "spell " + " ".join(words), " ".join("-".join(w) for w in words)


def _reverse(rng):
    words = rng.choices(WORDS, k=rng.randint(2, 40))
    return "reverse " + " ".join(words), " ".join(reversed(words))


def _sort(rng):
    digits = [rng.choice(string.digits) for _ in range(rng.randint(3, 100))]
    return "sort " + " ".join(digits), " ".join(sorted(digits))


def _template(rng):
    name, thing, k = rng.choice(NAMES), rng.choice(WORDS), rng.randint(1, 30)
    return f"list {k} {thing} for {name}", " ".join(f"{thing} {i} for {name}." for i in range(1, k + 1))


TASKS = {"count": _count, "repeat": _repeat, "spell": _spell, "reverse": _reverse, "sort": _sort,
         "template": _template}


def make_splits(n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, list[dict]]:
    """Disjoint train/validation/test rows ``{"prompt", "response", "task"}``, tasks in equal shares."""
    rng = random.Random(seed)
    rows, seen = [], set()
    names = sorted(TASKS)
    total = n_train + n_val + n_test
    for _ in range(100 * total):
        if len(rows) == total:
            break
        task = names[len(rows) % len(names)]
        prompt, response = TASKS[task](rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt + "\n", "response": response, "task": task})
    if len(rows) < total:
        raise ValueError(f"cannot draw {total} distinct rows from the built-in tasks")
    rng.shuffle(rows)
    return {"train": rows[:n_train], "validation": rows[n_train : n_train + n_val],
            "test": rows[n_train + n_val :]}


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
