"""The chat-template scanner in linear time: pathological templates of 80 kB must be answered (recognised or
refused in one line) at once, not after the quadratic-or-worse backtracking of a regex. Each runs in a
subprocess with a generous wall-clock limit, so a regression fails the test instead of hanging the suite (no
timing is asserted). On well-formed templates the scanner finds exactly the tags and literals that the regex it
replaced finds (the oracle, fast on small inputs)."""
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minisv.chat_template import _scan

N = 40_000
PATHOLOGICAL = {"braces": "{{" * N, "percent": "{%" * N, "quotes": "{{ '" * (N // 2), "escapes": "{{ '" + "\\'" * N,
                "set-system": "{% set " + "system" * (N // 3), "spaces": "{{ 'a'" + " " * N + "+",
                "literals": "{{ " + "'a' + " * N + "}}<|im_start|>", "tags": "{{ x }}" * N + "<|im_start|>"}


@pytest.mark.parametrize("name", PATHOLOGICAL)
def test_pathological_templates_are_answered_at_once(name):
    code = ("from minisv.chat_template import render_chat\nfrom minisv.errors import MinisvError\n"
            "from tests.test_trust_chat_template import PATHOLOGICAL\n"
            f"try:\n    print(render_chat(PATHOLOGICAL[{name!r}], 'hi', None, '', 'm')[:20])\n"
            "except MinisvError as e:\n    print('error:', e)\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20,
                             cwd=Path(__file__).parents[1])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {name} template was still being scanned after 20 s")
    assert out.returncode == 0 and out.stdout.startswith("error: m: ") and out.stdout.count("\n") == 1, out


# The regex the scanner replaced: a tag, skipping string literals inside it ("}}" may appear in one).
OLD_TAG = re.compile(r"""\{[{%](?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^'"])*?[}%]\}""", re.S)
OLD_LITERAL = re.compile(r"""'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)\"""", re.S)


def random_template(rng):
    """Text and complete tags, whose literals hold braces, escapes and the other quote."""
    def literal():
        q = rng.choice("'\"")
        body = "".join(rng.choice(["a", " ", "}}", "%}", "{{", "\\" + q, "\\\\", "\\n", "'\"".replace(q, "")])
                       for _ in range(rng.randrange(5)))
        return q + body + q
    pieces = []
    for _ in range(rng.randrange(1, 8)):
        if rng.random() < 0.4:
            pieces.append("".join(rng.choice("ab }%\n") for _ in range(rng.randrange(6))))
        else:
            inner = "".join(rng.choice([" ", "x", "+", "|", "(", literal()]) for _ in range(rng.randrange(6)))
            pieces.append(rng.choice(["{{", "{%"]) + inner + rng.choice(["}}", "%}"]))
    return "".join(pieces)


def test_the_scanner_reads_well_formed_templates_like_the_regex_it_replaced():
    rng = random.Random(0)
    for _ in range(3000):
        text = random_template(rng)
        tags = _scan(text)
        assert [text[start:end] for start, end, _ in tags] == [m[0] for m in OLD_TAG.finditer(text)], text
        for (start, end, literals), old in zip(tags, OLD_TAG.finditer(text)):
            assert [raw for raw, _, _ in literals] == [m[1] if m[1] is not None else m[2]
                                                       for m in OLD_LITERAL.finditer(old[0])], text
