"""Chat prompts without Jinja: the model's own chat template, recognised and rendered for one user turn.

A chat model ships its prompt format as a Jinja template (tokenizer_config.json `chat_template`,
chat_template.jinja, or GGUF `tokenizer.chat_template`). minisv has no Jinja interpreter; instead it recognises
the template's family from the special strings it writes and renders that family's format itself, taking the
variable parts (a default system prompt, the `[INST]` spacing, a knowledge-cutoff line) from the template's
own string literals. For one user turn with an optional system turn, the result is exactly what
`transformers.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)` returns:

    ChatML    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n
              (SmolLM2, Qwen2/2.5/3, Hermes; a default system turn when the template writes one;
              Phi-4's <|im_sep|> in place of the newline after the role)
    Llama 3   <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
              <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n
              (texts stripped; 3.1 and later always write the system turn, opening it with
              "Cutting Knowledge Date: ...\\nToday Date: {date}\\n\\n", the date fixed in the template or today's)
    [INST]    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]     (Llama 2; the whole text stripped)
              <s>[INST] {system}\\n\\n{user}[/INST]                           (Mistral; spacing from the template)
    Gemma     <bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n<start_of_turn>model\\n
              (user stripped; Gemma 3 folds the system text into the user turn, Gemma 1/2 have no system role)
    Phi-3     <|system|>\\n{system}<|end|>\\n<|user|>\\n{user}<|end|>\\n<|assistant|>\\n

The rendered text starts with the BOS token's text exactly when the template writes `bos_token` (Llama 2/3,
Mistral, Gemma); `Tokenizer.encode(text, bos=True)` then keeps that one BOS instead of adding a second.
A template with none of these markers, a variant whose pieces the family's format cannot express, or a system
prompt for a template without a system role raises MinisvError: never a silently wrong prompt. (One deliberate
difference: a ChatML template that writes no assistant opener still gets one, as `chat` promises.)

Checked against transformers on 166 real templates (openvino.genai's collection of tokenizer configs): 47 render
identically in every test case, 99 are refused, the rest render or refuse by case (a system prompt for a
template without a system role), and the only other mismatches are the opener above and MiniCPM3's dropping of
an empty system prompt.
"""
import re
import time

from .errors import MinisvError

_OPENER = re.compile(r"\{[{%]")                       # a Jinja tag starts: {{ or {%
_NEXT = re.compile(r"""['"]|[}%]\}""")                  # inside one: a string literal starts, or the tag ends
_LITERAL = {q: re.compile(rf"{q}((?:[^{q}\\]|\\.)*){q}", re.S) for q in "'\""}   # one, backslash escapes and all
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def _scan(text):
    """The Jinja tags of a template, each (start, end, [(literal, start, end), ...] of its string literals).

    One pass, left to right, so a template of any size is read in linear time (the regex that did this before
    backtracked without end on "{{" * 40000): a tag ends at the first "}}" or "%}" outside a string literal; a
    tag or literal that never ends ends the scan, since nothing after it can be read reliably."""
    tags, pos = [], 0
    while opener := _OPENER.search(text, pos):
        literals, pos = [], opener.end()
        while (mark := _NEXT.search(text, pos)) and mark[0] in "'\"":
            literal = _LITERAL[mark[0]].match(text, mark.start())
            if literal is None:
                return tags
            literals.append((literal[1], literal.start(), literal.end()))
            pos = literal.end()
        if mark is None:
            return tags
        tags.append((opener.start(), mark.end(), literals))
        pos = mark.end()
    return tags


class _Template:
    """A chat template's text, its tags, their string literals, the text outside the tags and the model's name,
    with the questions the families ask."""

    def __init__(self, text, name):
        self.text, self.name, self.literals = text, name, []
        spans = _scan(text)
        self.tags = [text[start:end] for start, end, _ in spans]
        bounds = [0] + [i for start, end, _ in spans for i in (start, end)] + [len(text)]
        self.outside = "".join(text[a:b] for a, b in zip(bounds[::2], bounds[1::2]))
        # The literals of the tags, unescaped, adjacent ones joined: '<|user|>' + '\n' is one literal
        # '<|user|>\n', so a family's pieces are found however a template splits them.
        for _, _, literals in spans:
            end = None
            for raw, start, stop in literals:
                lit = re.sub(r"\\(.)", lambda e: _ESCAPES.get(e[1], e[0]), raw)
                if end is not None and re.fullmatch(r"\s*\+\s*", text[end:start]):
                    self.literals[-1] += lit
                else:
                    self.literals.append(lit)
                end = stop

    def first(self, needle):
        """The first literal containing `needle`, or None."""
        return next((lit for lit in self.literals if needle in lit), None)

    def strips(self, marker):
        """Whether a tag that mentions `marker` strips text (Jinja's `| trim` or Python's `.strip()`)."""
        return any(marker in tag and re.search(r"\|\s*trim|strip\(", tag) for tag in self.tags)

    def unsupported(self, why):
        return MinisvError(f"{self.name}: {why}; minisv renders the ChatML, Llama 2/3, Mistral, Gemma and Phi-3 chat "
                           "templates itself (no Jinja): pass plain text instead (optimize_sv.py --raw)")

    def no_system(self):
        return MinisvError(f"{self.name}: this model's chat template has no system role; drop the system prompt")


def render_chat(template: str, user: str, system: str | None, bos: str, name: str) -> str:
    """The prompt text `template` renders for one user turn (after an optional system turn), ending with the
    assistant turn's opener. bos: the BOS token's text ("" if none); name: the model, for error messages."""
    t = _Template(template, name)
    # A default system prompt kept in a variable comes with conditions of its own (fine-tunes of every family)
    # (the name is tested apart: `set \w*system\w*` would backtrack quadratically on "set systemsystem...")
    if any("system" in m[1] for m in re.finditer(r"""set (\w+)\s*=\s*(['"])(?!\2)""", template)):
        raise t.unsupported("its chat template sets a default system prompt of its own")
    prefix = bos if "bos_token" in template else ""
    for marker, family in _FAMILIES:
        if re.search(marker, template):
            return prefix + family(t, user, system)
    raise t.unsupported("its chat template is not one minisv recognises")


def _llama3(t, user, system):
    if not t.first("<|start_header_id|>assistant<|end_header_id|>\n\n"):
        raise t.unsupported("its Llama 3 template names or spaces the assistant header differently")
    strip = str.strip if t.strips("content") else str

    def turn(role, text):
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"
    cutoff = t.first("Cutting Knowledge Date:")
    if cutoff is not None:       # 3.1+: a system turn always, opened by the knowledge cutoff and the date
        date = re.search(r"""set date_string = ["']([^"']+)["']""", t.text)
        # transformers gives templates strftime_now, so one that asks for it gets today's date
        date = time.strftime("%d %b %Y") if "strftime_now" in t.text or date is None else date[1]
        system_turn = turn("system", f"{cutoff}Today Date: {date}\n\n{strip(system or '')}")
    else:
        system_turn = turn("system", strip(system)) if system is not None else ""
    return system_turn + turn("user", strip(user)) + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _inst(t, user, system):                                                     # Llama 2, Mistral
    opener, closer = t.first("[INST]"), t.first("[/INST]")
    if (opener is None or closer is None or opener.strip() != "[INST]"
            or any("[INST]" in lit and "<<SYS>>" in lit for lit in t.literals)):    # Llama Guard, FusionNet
        raise t.unsupported("its [INST] template does not write [INST] text [/INST] as strings")
    text = user
    if system is not None:
        if "system" not in t.text:
            raise t.no_system()
        sys_open = next((lit for lit in t.literals if re.fullmatch(r"<<SYS>>\s+", lit)), None)
        sys_close = next((lit for lit in t.literals if re.fullmatch(r"\s+<</SYS>>\s+", lit)), None)
        if sys_open and sys_close:                              # Llama 2
            text = f"{sys_open}{system}{sys_close}{user}"
        elif "\n\n" in t.literals:                                # Mistral: the system text first in the turn
            text = f"{system}\n\n{user}"
        else:
            raise t.unsupported("its [INST] template places the system prompt in a way minisv does not know")
    return opener + (text.strip() if t.strips("[INST]") else text) + closer    # Llama 2 strips the whole turn


def _gemma(t, user, system):
    if system is not None and "first_user_prefix" not in t.text:               # Gemma 3 folds it in
        raise t.no_system()
    folded = "" if system is None else system + "\n\n"
    user = user.strip() if t.strips("content") else user
    return f"<start_of_turn>user\n{folded}{user}<end_of_turn>\n<start_of_turn>model\n"


def _chatml(t, user, system):
    sep, end = ("<|im_sep|>", "") if "<|im_sep|>" in t.text else ("\n", "\n")   # Phi-4 / everyone else
    if any(lit.startswith("\n<|im_start|>") for lit in t.literals) or "<|im_end|>" not in t.text:
        raise t.unsupported("its ChatML template does not end each turn with <|im_end|>")   # MPT, DBRX, SeaLLM
    stripped = re.search(r"""message(\[['"]content['"]\]|\.content)\s*(\|\s*trim|\.\w*strip\()""", t.text)
    if "<|im_start|>system" in t.outside or stripped or any(
            re.match(r"<\|im_start\|>(?!(system|user|assistant|tool)\b)\w", lit) for lit in t.literals):
        raise t.unsupported("its ChatML template writes fixed text, strips the turns or renames a role")
    generic = re.search(r"""['"]<\|im_start\|>['"]\s*\+\s*message""", t.text)    # '<|im_start|>' + message.role
    if system is not None and not generic and not t.first("<|im_start|>system"):
        raise t.unsupported("its ChatML template writes no system turn")                   # Yi
    if system is None:           # a default system turn, written whole as one literal (SmolLM2, Qwen2)
        default = (re.fullmatch(rf"<\|im_start\|>system{re.escape(sep)}(.*)<\|im_end\|>{end}", lit, re.S)
                   for lit in t.literals)
        system = next((m[1] for m in default if m), None)
    # The assistant opener as the template writes it (QwQ's opens the thinking: "...assistant\n<think>\n").
    # A template without one gets the standard opener, as chat() promises (transformers would write none).
    opener = next((lit for lit in t.literals if lit.startswith(f"<|im_start|>assistant{sep}")),
                  f"<|im_start|>assistant{sep}")
    turns = ([("system", system)] if system is not None else []) + [("user", user)]
    return "".join(f"<|im_start|>{role}{sep}{text}<|im_end|>{end}" for role, text in turns) + opener


def _phi3(t, user, system):
    generic = re.search(r"""['"]<\|['"]\s*\+\s*message""", t.text)           # '<|' + message['role'] + '|>'
    if not any(lit.endswith(("<|user|>\n", "|>\n")) for lit in t.literals):
        raise t.unsupported("its Phi template writes no newline after the role")           # Phi-4-mini
    if system is not None and "<|system|>" not in t.text and not generic:
        raise t.no_system()
    if system == "" and re.search(r"""['"]system['"] and message\[['"]content['"]\]""", t.text):
        system = None            # Phi-3.5 skips an empty system turn
    sys_turn = "" if system is None else f"<|system|>\n{system}<|end|>\n"
    return f"{sys_turn}<|user|>\n{user}<|end|>\n<|assistant|>\n"


# (a regex the template must match, the family), tried in order: Llama 3 fine-tunes may mention ChatML's tokens,
# and Phi-3 needs both "<|end|>" and "<|user|>" or a role spliced into "<|...|>".
_FAMILIES = [(r"<\|start_header_id\|>", _llama3), (r"\[INST\]", _inst), (r"<start_of_turn>", _gemma),
             (r"<\|im_start\|>", _chatml),
             (r"""^(?=[\s\S]*<\|end\|>)(?=[\s\S]*(<\|user\|>|['"]<\|['"]\s*\+\s*message))""", _phi3)]
