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
prompt for a template without a system role raises MinisvError: never a silently wrong prompt.
"""
import re
import time

from .errors import MinisvError

# A Jinja tag {{ ... }} or {% ... %}, skipping over string literals inside it ("}}" may appear in one).
_TAG = re.compile(r"""\{[{%](?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^'"])*?[}%]\}""", re.S)
_LITERAL = re.compile(r"""'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)\"""", re.S)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def _literals(template: str) -> list[str]:
    """The string literals of the template's tags, unescaped, with adjacent ones joined: '<|user|>' + '\\n'
    is one literal '<|user|>\\n', so a family's pieces are found however the template splits them."""
    out = []
    for tag in _TAG.finditer(template):
        end = None
        for m in _LITERAL.finditer(tag[0]):
            text = re.sub(r"\\(.)", lambda e: _ESCAPES.get(e[1], e[0]), m[1] if m[1] is not None else m[2])
            if end is not None and re.fullmatch(r"\s*\+\s*", tag[0][end:m.start()]):
                out[-1] += text
            else:
                out.append(text)
            end = m.end()
    return out


def _first(literals, needle):
    return next((text for text in literals if needle in text), None)


def render_chat(template: str, user: str, system: str | None, bos: str, name: str) -> str:
    """The prompt text `template` renders for one user turn (after an optional system turn), ending with the
    assistant turn's opener. bos: the BOS token's text ("" if none); name: the model, for error messages."""
    literals = _literals(template)
    prefix = bos if "bos_token" in template else ""

    def strips(marker):
        """Whether a tag that mentions `marker` strips text (Jinja's `| trim` or Python's `.strip()`)."""
        return any(marker in tag[0] and re.search(r"\|\s*trim|strip\(", tag[0]) for tag in _TAG.finditer(template))

    def unsupported(why):
        return MinisvError(f"{name}: {why}; minisv renders the ChatML, Llama 2/3, Mistral, Gemma and Phi-3 chat "
                           "templates itself (no Jinja): pass plain text instead (optimize_sv.py --raw)")

    def no_system():
        return MinisvError(f"{name}: this model's chat template has no system role; drop the system prompt")

    # A default system prompt kept in a variable comes with conditions of its own (fine-tunes of every family)
    if re.search(r"""set \w*system\w*\s*=\s*(['"])(?!\1)""", template):
        raise unsupported("its chat template sets a default system prompt of its own")

    if "<|start_header_id|>" in template:                                       # Llama 3
        if not _first(literals, "<|start_header_id|>assistant<|end_header_id|>\n\n"):
            raise unsupported("its Llama 3 template names or spaces the assistant header differently")
        strip = str.strip if strips("content") else str

        def turn(role, text):
            return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"
        cutoff = _first(literals, "Cutting Knowledge Date:")
        if cutoff is not None:   # 3.1+: a system turn always, opened by the knowledge cutoff and the date
            date = re.search(r"""set date_string = ["']([^"']+)["']""", template)
            # transformers gives templates strftime_now, so one that asks for it gets today's date
            date = time.strftime("%d %b %Y") if "strftime_now" in template or date is None else date[1]
            system_turn = turn("system", f"{cutoff}Today Date: {date}\n\n{strip(system or '')}")
        else:
            system_turn = turn("system", strip(system)) if system is not None else ""
        return prefix + system_turn + turn("user", strip(user)) + "<|start_header_id|>assistant<|end_header_id|>\n\n"

    if "[INST]" in template:                                                    # Llama 2, Mistral
        opener, closer = _first(literals, "[INST]"), _first(literals, "[/INST]")
        if (opener is None or closer is None or opener.strip() != "[INST]"
                or any("[INST]" in t and "<<SYS>>" in t for t in literals)):            # Llama Guard, FusionNet
            raise unsupported("its [INST] template does not write [INST] text [/INST] as strings")
        text = user
        if system is not None:
            if "system" not in template:
                raise no_system()
            sys_open = next((t for t in literals if re.fullmatch(r"<<SYS>>\s+", t)), None)
            sys_close = next((t for t in literals if re.fullmatch(r"\s+<</SYS>>\s+", t)), None)
            if sys_open and sys_close:                          # Llama 2
                text = f"{sys_open}{system}{sys_close}{user}"
            elif "\n\n" in literals:                            # Mistral: the system text first in the turn
                text = f"{system}\n\n{user}"
            else:
                raise unsupported("its [INST] template places the system prompt in a way minisv does not know")
        return prefix + opener + (text.strip() if strips("[INST]") else text) + closer   # Llama 2 strips the turn

    if "<start_of_turn>" in template:                                           # Gemma
        if system is not None and "first_user_prefix" not in template:
            raise no_system()
        folded = "" if system is None else system + "\n\n"
        user = user.strip() if strips("content") else user
        return f"{prefix}<start_of_turn>user\n{folded}{user}<end_of_turn>\n<start_of_turn>model\n"

    if "<|im_start|>" in template:                                              # ChatML
        sep, end = ("<|im_sep|>", "") if "<|im_sep|>" in template else ("\n", "\n")
        if any(t.startswith("\n<|im_start|>") for t in literals) or "<|im_end|>" not in template:
            raise unsupported("its ChatML template does not end each turn with <|im_end|>")   # MPT, DBRX, SeaLLM
        raw = _TAG.sub("", template)
        stripped = re.search(r"""message(\[['"]content['"]\]|\.content)\s*(\|\s*trim|\.\w*strip\()""", template)
        if "<|im_start|>system" in raw or stripped or any(
                re.match(r"<\|im_start\|>(?!(system|user|assistant|tool)\b)\w", t) for t in literals):
            raise unsupported("its ChatML template writes fixed text, strips the turns or renames a role")
        generic = re.search(r"""['"]<\|im_start\|>['"]\s*\+\s*message""", template)
        if system is not None and not generic and not _first(literals, "<|im_start|>system"):
            raise unsupported("its ChatML template writes no system turn")     # Yi
        if system is None:       # a default system turn, written whole as one literal (SmolLM2, Qwen2)
            default = (re.fullmatch(rf"<\|im_start\|>system{re.escape(sep)}(.*)<\|im_end\|>{end}", t, re.S)
                       for t in literals)
            system = next((m[1] for m in default if m), None)
        # The assistant opener as the template writes it (QwQ's opens the thinking: "...assistant\n<think>\n").
        # A template without one gets the standard opener, as chat() promises (transformers would write none).
        opener = next((t for t in literals if t.startswith(f"<|im_start|>assistant{sep}")), f"<|im_start|>assistant{sep}")
        turns = ([("system", system)] if system is not None else []) + [("user", user)]
        return prefix + "".join(f"<|im_start|>{role}{sep}{text}<|im_end|>{end}" for role, text in turns) + opener

    generic = re.search(r"""['"]<\|['"]\s*\+\s*message""", template)             # Phi-3: '<|' + message['role']
    if "<|end|>" in template and ("<|user|>" in template or generic):
        if not any(t.endswith(("<|user|>\n", "|>\n")) for t in literals):
            raise unsupported("its Phi template writes no newline after the role")   # Phi-4-mini
        if system is not None and "<|system|>" not in template and not generic:
            raise no_system()
        if system == "" and re.search(r"""['"]system['"] and message\[['"]content['"]\]""", template):
            system = None        # Phi-3.5 skips an empty system turn
        sys_turn = "" if system is None else f"<|system|>\n{system}<|end|>\n"
        return f"{prefix}{sys_turn}<|user|>\n{user}<|end|>\n<|assistant|>\n"

    raise unsupported("its chat template is not one minisv recognises")
