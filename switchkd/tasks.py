"""Built-in instruction tasks with deterministic references, for benchmarks that must run offline.

Responses range from about 10 to about 300 characters (the tokenizer is character-level, so
characters are tokens). Every task is a pure function of a random generator, and splits are
drawn from one seed.
"""

from __future__ import annotations

import random
import string

WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ocean", "candle", "forest", "rocket",
         "garden", "silver", "window", "yellow", "dragon", "planet", "shadow", "winter", "button", "kd", "gpu")
NAMES = ("Ada", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana")


def _count(rng):
    a = rng.randint(0, 60)
    b = a + rng.randint(2, 70)
    return f"count {a} to {b}", " ".join(str(i) for i in range(a, b + 1))


def _repeat(rng):
    word, k = rng.choice(WORDS), rng.randint(2, 40)
    return f"repeat {k}: {word}", " ".join([word] * k)


def _spell(rng):
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 14)))
    return f"spell {word}", "-".join(word)


def _reverse(rng):
    words = rng.choices(WORDS, k=rng.randint(2, 12))
    return "reverse " + " ".join(words), " ".join(reversed(words))


def _sort(rng):
    digits = [rng.choice(string.digits) for _ in range(rng.randint(3, 40))]
    return "sort " + " ".join(digits), " ".join(sorted(digits))


def _template(rng):
    name, thing, k = rng.choice(NAMES), rng.choice(WORDS), rng.randint(1, 12)
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


def build_tokenizer():
    """Character-level tokenizer (``<pad>`` = 0, ``<eos>`` = 1) built with `tokenizers`, in Hugging Face
    format: ``build_tokenizer().save_pretrained(path)``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
