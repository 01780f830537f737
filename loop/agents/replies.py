"""Lenient extraction of a STeP program from a model reply.

A reply may hold the program in many shapes: a fenced block (```python,
```yaml, a bare ``` or ~~~ fence, or one left unclosed when the model ran out
of tokens), a YAML `impl: |` block (alone or inside an echoed task), a
function wrapper (`def impl(E0, E1):` whose body is the program), bare code,
with prose before, between or after, and `<think>...</think>` reasoning.

`extract_program` collects candidate texts from all of these and returns the
best one that `parse_program` accepts, as an `ExtractedProgram` whose
`program` is that text (dedented, trailing spaces dropped, comments kept).
Best: a candidate from the answer part of the reply (after any reasoning)
beats one from the reasoning, a fenced or YAML candidate beats bare text, and
among equals the last one wins (models revise: the final block is the
answer). If nothing parses, it returns None; `extract_program_with_reason`
also says why (the parser's message for the most promising candidate). It
never raises on any text: an unusable reply is a failed sample with stage
`parse`.

Open mode (`extract_candidate_with_reason`): the answer is YAML with `fns`
and `impl` in one ```yaml block; the same leniency applies (reasoning, prose,
several blocks, an unclosed fence, bare YAML), and the candidate's impl goes
through `extract_program_with_reason`. The candidate comes back re-rendered
(`OpenCandidate.to_yaml`), so equal candidates are equal text.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from typing import Optional

from stepforge.config_io import read_yaml_text
from stepforge.errors import ConfigError
from stepforge.simulator import ProgramSyntaxError, parse_program
from stepforge.simulator.program import MAX_PROGRAM_CHARS

MAX_REPLY_CHARS = 200_000  # longer replies are cut (a runaway generation)
MAX_CANDIDATES = 64

_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([^\n`]*)$", re.M)
_THINK_BLOCK = re.compile(r"<(think|thinking|reasoning)>.*?</\1>", re.S | re.I)
_THINK_CLOSE = re.compile(r"</(think|thinking|reasoning)>", re.I)
_THINK_OPEN = re.compile(r"<(think|thinking|reasoning)>", re.I)
_DEF = re.compile(r"^([ \t]*)(?:async[ \t]+)?def[ \t]+\w+[ \t]*\(.*$", re.M)
_IMPL_KEY = re.compile(r"^([ \t]*)(?:-[ \t]+)?impl[ \t]*:[ \t]*([|>][-+0-9]*)?[ \t]*(?:#.*)?$", re.M)
_STATEMENT_START = re.compile(
    r"^[ \t]*(?:"
    r"[A-Za-z_]\w*(?:[ \t]*,[ \t]*[A-Za-z_]\w*)*[ \t]*,?[ \t]*=[ \t]*(?:step[ \t]*\.|\[)"  # x = step... / a, b = step... / l = [...]
    r"|\([ \t]*[A-Za-z_]\w*(?:[ \t]*,[ \t]*[A-Za-z_]\w*)+[ \t]*\)[ \t]*=[ \t]*step[ \t]*\."  # (a, b) = step...
    r"|return\b"
    r")"
)



@dataclass(frozen=True)
class ExtractedProgram:
    """A program found in a reply: `program` is text that `parse_program` accepts."""

    program: str
    source: str  # fence | yaml | function | salvaged | bare: where the text came from
    statements: int

    def __str__(self) -> str:
        return self.program


@dataclass(frozen=True)
class _Candidate:
    text: str
    kind: str
    answer: bool  # from the answer part (outside reasoning)
    fenced: bool  # from a fenced block
    block: int  # the block's position in the reply
    sub: int  # 0: the block itself; 1, 2, ...: texts derived from it, in preference order

    def rank(self) -> tuple:
        return (self.answer, self.fenced, self.block, -self.sub)


def extract_program(reply: str) -> Optional[ExtractedProgram]:
    """The best parsing program in `reply`, or None (see `extract_program_with_reason`)."""
    return extract_program_with_reason(reply)[0]


def extract_program_with_reason(reply: object) -> tuple[Optional[ExtractedProgram], str]:
    """`(program, "")`, or `(None, reason)` with a one-line reason fit for a failed sample's record."""
    if not isinstance(reply, str):
        return None, f"the reply is not text ({type(reply).__name__})"
    if not reply.strip():
        return None, "the reply is empty"
    text = reply[:MAX_REPLY_CHARS].replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    candidates = _candidates(text)
    if not candidates:
        return None, "no STeP statements found in the reply (expected a ```python block ending with `return`)"
    best: Optional[tuple[tuple, ExtractedProgram]] = None
    errors: list[tuple[tuple, str]] = []
    for c in candidates:
        program_text = _normalise(c.text)
        if not program_text:
            continue
        if len(program_text) > MAX_PROGRAM_CHARS:
            errors.append(((_looks_like_step(program_text[:5000]) > 0,) + c.rank(),
                           f"the program is {len(program_text)} characters long; the limit is {MAX_PROGRAM_CHARS}"))
            continue
        try:
            parsed = parse_program(program_text)
        except ProgramSyntaxError as exc:
            errors.append(((_looks_like_step(program_text) > 0,) + c.rank(), exc.message))
            continue
        except (RecursionError, MemoryError, ValueError) as exc:  # defensive: parse_program names its own errors
            errors.append(((False,) + c.rank(), f"the program cannot be parsed ({type(exc).__name__})"))
            continue
        if best is None or c.rank() > best[0]:
            best = (c.rank(), ExtractedProgram(program_text, c.kind, len(parsed.statements)))
    if best is not None:
        return best[1], ""
    if not errors or not any(score[0] for score, _ in errors):
        return None, "no STeP statements found in the reply (expected a ```python block ending with `return`)"
    return None, f"no parsable STeP program in the reply: {max(errors, key=lambda e: e[0])[1]}"


def _looks_like_step(text: str) -> int:
    """How many lines look like STeP statements (ranks failure reasons)."""
    return sum(1 for line in text.splitlines() if _STATEMENT_START.match(line))


# ---------------------------------------------------------------------------
# candidates


def _split_reasoning(text: str) -> list[tuple[str, bool]]:
    """`(part, is_answer)`: the text outside reasoning tags, then the reasoning itself."""
    parts: list[tuple[str, bool]] = []
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        last = closes[-1]
        answer = text[last.end():]
        reasoning = text[: last.start()]
        parts.append((answer, True))
        parts.append((_THINK_OPEN.sub("", _THINK_CLOSE.sub("", reasoning)), False))
        return parts
    opened = _THINK_OPEN.search(text)
    if opened:  # unclosed: the model never finished thinking
        parts.append((text[: opened.start()], True))
        parts.append((text[opened.end():], False))
        return parts
    return [(text, True)]


def _candidates(text: str) -> list[_Candidate]:
    out: list[_Candidate] = []
    block = 0

    def add(text: str, kind: str, answer: bool, fenced: bool) -> None:
        nonlocal block
        if len(out) >= MAX_CANDIDATES or not text.strip():
            return
        block += 1
        out.append(_Candidate(text, kind, answer, fenced, block, 0))
        for sub, (derived_kind, derived) in enumerate(_derived(text), 1):
            if len(out) >= MAX_CANDIDATES:
                return
            out.append(_Candidate(derived, derived_kind, answer, fenced, block, sub))

    for part, answer in _split_reasoning(text):
        if not part.strip():
            continue
        fenced = _fenced_blocks(part)
        if fenced:
            for lang, body in fenced:
                add(body, "yaml" if lang in ("yaml", "yml") else "fence", answer, True)
            outside = _outside_fences(part)
            if _looks_like_step(outside):
                add(outside, "bare", answer, False)
        else:
            add(part, "bare", answer, False)
    return out


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """`(language, body)` of every fenced block; a last fence left open runs to the end."""
    blocks = []
    marks = list(_FENCE.finditer(text))
    i = 0
    while i < len(marks):
        opening = marks[i]
        fence = opening.group(1)
        lang = opening.group(2).strip().lower().split()[0] if opening.group(2).strip() else ""
        closing = None
        for j in range(i + 1, len(marks)):
            m = marks[j]
            if m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not m.group(2).strip():
                closing = j
                break
        start = opening.end() + 1
        if closing is None:
            blocks.append((lang, text[start:]))
            break
        blocks.append((lang, text[start: marks[closing].start()]))
        i = closing + 1
    return blocks


def _outside_fences(text: str) -> str:
    """The text with every fenced block removed (bare code next to fenced prose)."""
    marks = list(_FENCE.finditer(text))
    pieces, pos, inside = [], 0, False
    for m in marks:
        if not inside:
            pieces.append(text[pos: m.start()])
        inside = not inside
        pos = m.end()
    if not inside:
        pieces.append(text[pos:])
    return "\n".join(pieces)


def _derived(block: str) -> list[tuple[str, str]]:
    """Texts derived from one block: the YAML impl, function bodies, salvaged statement runs."""
    out: list[tuple[str, str]] = []
    for impl in _yaml_impls(block):
        out.append(("yaml", impl))
        out.extend(("yaml", t) for t in _function_bodies(impl))
    for body in _function_bodies(block):
        out.append(("function", body))
        salvaged = _salvage(body)
        if salvaged and salvaged.strip() != body.strip():
            out.append(("function", salvaged))
    salvaged = _salvage(block)
    if salvaged and salvaged.strip() != block.strip():
        out.append(("salvaged", salvaged))
    return out


def _yaml_impls(block: str) -> list[str]:
    """Values of an `impl:` key in a YAML block (a whole task, or just `impl: |`): the YAML
    value if the block is valid YAML, and the indented lines under the key (which also
    works when the rest of the block is not YAML)."""
    m = _IMPL_KEY.search(block)
    if m is None:
        return []
    out = []
    try:
        data = read_yaml_text(block, "the reply's YAML block")
    except ConfigError:  # not YAML, or past the reader's bounds (an alias bomb, deep nesting): the indent rule
        data = None
    if isinstance(data, dict) and isinstance(data.get("impl"), str) and data["impl"].strip():
        out.append(data["impl"])
    base = len(m.group(1).expandtabs())
    body = []
    for line in block[m.end():].split("\n")[1:]:
        if line.strip() and len(line.expandtabs()) - len(line.expandtabs().lstrip()) <= base:
            break
        body.append(line)
    text = "\n".join(body)
    if text.strip() and text.strip() not in [o.strip() for o in out]:
        out.append(text)
    return out


def _function_bodies(block: str) -> list[str]:
    """The bodies of `def name(...):` wrappers in the block (a docstring is dropped)."""
    out = []
    lines = block.split("\n")
    for m in _DEF.finditer(block):
        start_line = block.count("\n", 0, m.start())
        indent = len(m.group(1).expandtabs())
        # the signature may span lines: it ends at the first line ending with ':'
        k = start_line
        while k < len(lines) and not lines[k].split("#", 1)[0].rstrip().endswith(":"):
            k += 1
            if k - start_line > 20:
                break
        body = []
        for line in lines[k + 1:]:
            if line.strip() and len(line.expandtabs()) - len(line.expandtabs().lstrip()) <= indent:
                break
            body.append(line)
        text = textwrap.dedent("\n".join(body).expandtabs())
        text = _drop_docstring(text)
        if text.strip():
            out.append(text)
    return out


def _drop_docstring(text: str) -> str:
    stripped = text.lstrip("\n")
    for quote in ('"""', "'''"):
        if stripped.startswith(quote):
            end = stripped.find(quote, 3)
            if end != -1:
                return stripped[end + 3:]
    return text


_COMPOUND = re.compile(r"^[ \t]*(?:for|while|if|elif|else|with|try|except|finally|def|class|async)\b.*:[ \t]*(?:#.*)?$")


def _salvage(block: str) -> Optional[str]:
    """The statement lines of a block with prose around them: from the first line that starts a
    STeP statement to the first `return` after it, keeping continuation lines of open brackets
    and comment lines, and dropping other lines (prose, imports, prints) in between.

    Control flow is never dropped: if the statements sit under a `for`, `if`, `def`, ... header
    (or one comes between them), there is no salvage, since taking the lines out would change
    what the program means.
    """
    lines = textwrap.dedent(block.expandtabs()).split("\n")
    kept: list[str] = []
    depth = 0
    started = False
    previous = ""  # the last non-blank line before the current one
    for line in lines:
        if depth > 0:
            kept.append(line)
            depth = max(0, depth + _bracket_balance(line))
            if depth == 0 and _is_return(kept):
                break
            continue
        if _STATEMENT_START.match(line):
            if not started and _COMPOUND.match(previous):
                return None
            started = True
            kept.append(line.strip())
            depth = max(0, _bracket_balance(line))
            if depth == 0 and line.strip().startswith("return"):
                break
        elif started and _COMPOUND.match(line):
            return None
        elif started and line.strip().startswith("#"):
            kept.append(line.strip())
        if line.strip():
            previous = line
    if not kept:
        return None
    return "\n".join(kept)


def _is_return(kept: list[str]) -> bool:
    """Whether the statement just completed (the last kept lines) is a `return`."""
    for line in reversed(kept):
        if _STATEMENT_START.match(line):
            return line.strip().startswith("return")
    return False


def _bracket_balance(line: str) -> int:
    code = line.split("#", 1)[0]
    return code.count("(") + code.count("[") + code.count("{") - code.count(")") - code.count("]") - code.count("}")


def _normalise(text: str) -> str:
    """Dedent, drop trailing spaces and blank edge lines, strip a `>>> ` prompt; one final newline."""
    text = text.expandtabs()
    lines = [ln.rstrip() for ln in textwrap.dedent(text).split("\n")]
    if lines and all(ln.startswith((">>> ", "... ")) or not ln for ln in lines if ln):
        lines = [ln[4:] for ln in lines]
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines) + "\n" if lines else ""


# ---------------------------------------------------------------------------
# open mode


def extract_candidate_with_reason(reply: object) -> tuple[Optional[str], str]:
    """`(candidate YAML, "")` for the best open candidate (fns + impl) in `reply`, or `(None, reason)`.

    Best: from the answer part before the reasoning, fenced before bare, later
    blocks before earlier ones. Never raises.
    """
    from stepforge.benchmark.open_mode import CandidateError, OpenCandidate, load_candidate

    if not isinstance(reply, str):
        return None, f"the reply is not text ({type(reply).__name__})"
    if not reply.strip():
        return None, "the reply is empty"
    text = reply[:MAX_REPLY_CHARS].replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    blocks: list[tuple[tuple, str]] = []
    for part, answer in _split_reasoning(text):
        fenced = _fenced_blocks(part)
        for i, (_lang, body) in enumerate(fenced):
            blocks.append(((answer, True, i), body))
        if not fenced and part.strip():
            blocks.append(((answer, False, 0), part))
    reasons: list[str] = []
    for _rank, body in sorted(blocks[:MAX_CANDIDATES], key=lambda b: b[0], reverse=True):
        body = _normalise(body)
        if "fns" not in body or "impl" not in body:
            continue
        try:
            cand = load_candidate(body)
        except CandidateError as exc:
            reasons.append(str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - defensive: any other failure of the YAML reader is a bad reply
            reasons.append(f"the candidate cannot be read ({type(exc).__name__})")
            continue
        found, why = extract_program_with_reason(cand.impl)
        if found is None:
            reasons.append(f"impl: {why}")
            continue
        try:
            return OpenCandidate(fns=cand.fns, impl=found.program).to_yaml(), ""
        except Exception as exc:  # noqa: BLE001 - defensive: re-rendering never fails on a validated candidate
            reasons.append(f"the candidate cannot be written back ({type(exc).__name__})")
    if not reasons:
        return None, "no open candidate in the reply (expected a ```yaml block with the keys fns and impl)"
    return None, f"no usable open candidate in the reply: {reasons[0]}"


__all__ = ["ExtractedProgram", "extract_candidate_with_reason", "extract_program", "extract_program_with_reason"]
