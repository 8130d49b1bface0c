"""Ghost text: the stop rules as pure functions, the engine path on the tiny
model (deterministic, progressive through the memo), type-through, FIM on a
tiny model whose vocabulary declares FIM tokens."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import replace

import pytest
import pytest_lsp
from lsprotocol import types as t
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities
from test_session import BASE

from lsp_llm.config import Settings
from lsp_llm.engine.model import FimTokens, Model
from lsp_llm.engine.scheduler import Engine
from lsp_llm.engine.session import Cancelled
from lsp_llm.features.inline import (
    FIM_SESSION,
    Around,
    Inline,
    Request,
    Rules,
    Suggestion,
    extend_task,
    fim_suffix,
    request_at,
    scan,
    shape,
    suggest,
)
from lsp_llm.lsp import lifecycle
from lsp_llm.text.documents import Document, Vocab

FOUR = Rules(lines=4)


def around(prefix: bytes, rest: bytes = b"", next_line: bytes = b"", crlf: bool = False) -> Around:
    return Around(prefix, rest, next_line, crlf)


def shown(text: bytes, at: Around, rules: Rules = FOUR, ended: bool = False) -> str | None:
    out = shape(text, at, rules, ended)
    return None if out is None else out.text


# -- stop rules ----------------------------------------------------------------------
def test_a_line_indented_less_than_the_cursor_ends_the_block() -> None:
    at = around(b"    ")
    assert shown(b"x = 1\n    y = 2\ndef f():\n", at) == "x = 1\n    y = 2"
    cut = scan(b"x = 1\n    y = 2\ndef", at, FOUR)
    assert cut.final and cut.end == len(b"x = 1\n    y = 2")  # known as soon as the line has a word


def test_continuing_a_line_completes_that_statement_only() -> None:
    assert shown(b" 10\ny = 2\n", around(b"x =")) == " 10"
    # a block opened at the cursor's line: its body, up to the next line at its level
    assert shown(b"\n    return 1\n\ndef g():\n", around(b"def f():")) == "\n    return 1"
    # rules for a whole block: only a line indented less than the cursor's ends it
    block = Rules(4, one_statement=False)
    assert shown(b" 10\ny = 2\n  z\n", around(b"x ="), block) == " 10\ny = 2\n  z"
    assert shown(b" 10\ny = 2\n", around(b"    x ="), block) == " 10"


def test_a_closing_line_ends_the_block_and_is_included() -> None:
    at = around(b"  ", next_line=b"")
    assert shown(b"return 1;\n}\nfoo();\n", at) == "return 1;\n}"
    # unless it is already there after the cursor
    assert shown(b"return 1;\n}\nfoo();\n", around(b"  ", next_line=b"}")) == "return 1;"


def test_closing_a_bracket_opened_before_the_cursor_ends_the_suggestion() -> None:
    assert shown(b"'hi')\nprint('more')\n", around(b"print(")) == "'hi')"
    assert shown(b"'a(b')\nx\n", around(b"f(")) == "'a(b')"  # brackets inside quotes do not count
    assert shown(b"b=2)\n    c = 1\n", around(b"    ")) == "b=2)"  # the last argument of a call
    # unless that line opens a block
    cut = scan(b"x):\n        return 1\n", around(b"    if f("), FOUR)
    assert not cut.final


def test_a_line_already_after_the_cursor_is_not_repeated() -> None:
    at = around(b"    ", next_line=b"return x")
    assert shown(b"y = 1\n    return x\n", at) == "y = 1"
    assert shown(b"return x\n", at) is None  # the first line itself


def test_the_rest_of_the_line_is_replaced_when_the_suggestion_repeats_it() -> None:
    out = shape(b"'hi')\n", around(b"print(", rest=b")"), FOUR, False)
    assert out is not None and out.text == "'hi')" and out.covers == 1
    out = shape(b"'hi', end='')\n", around(b"print(", rest=b")"), FOUR, False)
    assert out is not None and out.covers == 1  # the suggestion closes the pair the editor closed
    out = shape(b"a, b)\n", around(b"f(", rest=b"b)  "), FOUR, False)
    assert out is not None and out.covers == 2  # the rest is inside the first line
    # otherwise it is inserted before the rest, on one line only
    out = shape(b"'hi'\n    x = 1\n", around(b"    print(", rest=b")"), FOUR, False)
    assert out is not None and out.text == "'hi'" and not out.covers
    # mid-line in code the model cannot see (no FIM): nothing
    assert shape(b"a, b\n", around(b"x = f(", rest=b"value, other)"), FOUR, False) is None
    assert shape(b"a, b\n", around(b"x = f(", rest=b"value, other)"), FOUR, False, fim=True) is not None


def test_crlf_documents_get_crlf_suggestions() -> None:
    at = around(b"    ", crlf=True)
    assert shown(b"a = 1\r\n    b = 2\r\ndef", at) == "a = 1\r\n    b = 2"
    assert Around.at(b"x = 1\r\n    y\r\n\r\n  z\r\n", 12) == Around(b"    y", b"", b"z", True)


def test_only_punctuation_whitespace_or_too_short_is_skipped() -> None:
    for text in (b")\n", b"):\n", b"   \n\n", b"x", b""):
        assert shown(text, around(b"    "), ended=True) is None, text
    assert shown(b"x = 1", around(b"    "), ended=True) == "x = 1"
    assert shown(b"x = 1", around(b"    "), Rules(4, min_chars=4), ended=True) is None  # 3 non-blank bytes
    assert shown(b"x", around(b"    "), Rules(4, min_chars=1), ended=True) == "x"


def test_stop_strings_lines_blank_lines_and_trailing_whitespace() -> None:
    assert shown(b"x = 1  # note\n", around(b""), Rules(4, (b"#",))) == "x = 1"
    two = Rules(lines=2)
    assert shown(b"a = 1\nb = 2\nc = 3\n", around(b""), two) == "a = 1\nb = 2"
    # after a finished line: the next statements (an empty first line does not count)
    assert shown(b"\na = 1\nb = 2\nc = 3\n", around(b"x = 0"), two) == "\na = 1\nb = 2"
    assert shown(b"\n    a = 1\n    b = 2\n    c\n", around(b"def f():"), two) == "\n    a = 1\n    b = 2"
    assert shown(b"a = 1   \n\n\nb = 2\n", around(b"")) == "a = 1"


def test_a_model_stuck_in_a_loop_shows_nothing_of_the_loop() -> None:
    loop = b'print(f"Hello {name}! I am {name}! I am {name}! I am {name}!'
    cut = scan(loop, around(b"    "), FOUR)
    assert cut.final and cut.end == 0  # known before the line ends
    assert shown(b"x = 1\n" + loop + b"\n", around(b"")) == "x = 1"
    assert shown(b"x = '-----------------'  # ok\n", around(b""), ended=True) is not None  # no letter
    assert shown(b"crab(1, 2), crab(3, 4)\n", around(b""), ended=True) is not None


def test_a_suggestion_cut_short_keeps_whole_balanced_lines() -> None:
    # the budget or the token limit cut it: the partial line goes, and so do
    # lines inside a bracket it opened and did not close
    assert shown(b"x = 1\nfoo(\n    a,\n    b", around(b"")) == "x = 1"
    assert shown(b"x = foo(1,", around(b"")) == "x = foo(1,"  # a first line is kept
    assert shown(b"x = 1\ny = 2\nz", around(b"")) == "x = 1\ny = 2"
    assert shown(b"x = 1\ny = 2\nz", around(b""), ended=True) == "x = 1\ny = 2\nz"


def test_around_the_cursor() -> None:
    data = b"def f(x):\n    return g(x)\n\n\n    y = 2\n"
    at = Around.at(data, data.index(b"g(") + 2)
    assert at == Around(b"    return g(", b"x)", b"y = 2", False)
    assert fim_suffix(data, data.index(b"g(") + 2, 1) == b"x)\n\n"
    assert fim_suffix(data, 3, 100) == data[3:]


# -- type-through ----------------------------------------------------------------------
def test_type_through_answers_the_rest_of_what_was_shown() -> None:
    cache = Inline()
    before, after = b"def f():\n    ", b"\n\nx = 1\n"
    cache.show("u", before, after, Suggestion("return 1\n    pass", False, True))
    hit = cache.type_through("u", before + b"ret" + after, len(before) + 3)  # (bytes compared: no engine)
    assert hit is not None and hit.text == "urn 1\n    pass"
    assert cache.type_through("u", before + b"rex" + after, len(before) + 3) is None  # typed something else
    assert cache.type_through("u", before + b"ret" + after + b"!", len(before) + 3) is None  # text after changed
    assert cache.type_through("u", before + b"ret" + b"#" + after[1:], len(before) + 3) is None  # same length
    assert cache.type_through("u", b"#" + before[1:] + b"ret" + after, len(before) + 3) is None  # text before changed
    assert cache.type_through("u", before + b"return 1\n    pass" + after, len(before) + 17) is None  # all typed
    assert cache.type_through("v", before + b"ret" + after, len(before) + 3) is None  # another document
    # the same place again: a complete suggestion is answered, an incomplete one goes to the engine
    assert cache.type_through("u", before + after, len(before)) is not None
    cache.show("u", before, after, Suggestion("return 1", False, False))
    assert cache.type_through("u", before + after, len(before)) is None
    cache.forget("u")
    assert cache.type_through("u", before + b"ret" + after, len(before) + 3) is None


# -- the engine path (tiny model) ---------------------------------------------------------
def vocab_of(model: Model) -> Vocab:
    return lifecycle.vocab_of(model)  # as the server's documents hold it (FIM tokens included)


def run(engine: Engine, req: Request) -> Suggestion:
    return engine.submit(lambda: suggest(engine, req, lambda: False)).result()


SLOW = Settings(inline_budget_ms=60000, inline_lines=3, inline_tokens=24)
TEXT = BASE + "def crab(x):\n    "


def request(engine: Engine, text: str, s: Settings = SLOW, offset: int | None = None) -> Request:
    doc = Document("file:///crab.py", text, 1, vocab_of(engine.model))
    return request_at(doc, len(doc.data) if offset is None else offset, s, engine)


@pytest.fixture
def fresh(tiny: Model) -> Iterator[Engine]:
    e = Engine(max_sessions=2, n_ctx=1024, n_branches=8, headroom=40)
    e.submit(lambda: e.set_model(tiny)).result()
    yield e
    e.stop()


def test_the_suggestion_is_the_greedy_path_and_the_same_on_a_fresh_engine(engine: Engine, fresh: Engine) -> None:
    # a history on one engine (another prompt first), none on the other
    run(engine, request(engine, BASE))
    ours = run(engine, request(engine, TEXT))
    theirs = run(fresh, request(fresh, TEXT))
    assert ours.stats.tokens > 1
    assert (ours.text, ours.complete, ours.stats.tokens) == (theirs.text, theirs.complete, theirs.stats.tokens)


def test_asking_again_decodes_nothing(engine: Engine) -> None:
    first = run(engine, request(engine, TEXT))
    again = run(engine, request(engine, TEXT))
    assert first.complete and first.stats.decode_calls > 0
    assert again == first and again.stats.decode_calls == 0 and again.stats.decode_ms == 0
    assert again.stats.memo_steps == again.stats.tokens - 1


@pytest.fixture
def gemma_engines(gemma: Model) -> Iterator[tuple[Engine, Engine]]:
    """Two engines on the default model: one with a history, one fresh."""
    engines = (Engine(2, 2048, 16, 80), Engine(2, 2048, 16, 80))
    for e in engines:
        e.submit(lambda e=e: e.set_model(gemma)).result()
    yield engines
    for e in engines:
        e.stop()


FUNCTION = 'import os\n\n\ndef read_lines(path):\n    """Return the lines of a file, without line breaks."""\n    '


def test_a_budget_answers_early_with_whole_lines_and_asking_again_gets_more(
        gemma_engines: tuple[Engine, Engine]) -> None:
    engine, fresh = gemma_engines
    hasty = replace(SLOW, inline_lines=3, inline_tokens=40, inline_budget_ms=0)
    answers = []
    for _ in range(40):
        got = run(engine, request(engine, FUNCTION, hasty))
        answers.append(got)
        if got.complete:
            break
    texts = [a.text for a in answers]
    assert len(answers) > 1 and got.complete, texts
    assert all(a.text.startswith(b.text) for a, b in zip(answers[1:], answers)), texts  # growing
    assert "\n" in got.text  # several lines
    # the same suggestion as a fresh engine with no budget; asking again decodes nothing
    assert run(fresh, request(fresh, FUNCTION, replace(hasty, inline_budget_ms=60000))) == got
    again = run(engine, request(engine, FUNCTION, hasty))
    assert again == got and again.stats.decode_calls == 0


def test_fim_prompt_is_suffix_first_and_a_keystroke_refeeds_little(tiny_fim: Model) -> None:
    assert tiny_fim.fim == FimTokens(6, 7, 8)
    e = Engine(max_sessions=2, n_ctx=1024, n_branches=8, headroom=40)
    try:
        e.submit(lambda: e.set_model(tiny_fim)).result()
        text = BASE + "def crab(x):\n    return x\n\n\nprint(crab(1))\n"
        cursor = text.index("return x")
        req = request(e, text, offset=cursor)
        suffix = tiny_fim.tokenize(b"return x\n\n\nprint(crab(1))\n", False)
        prefix, _ = Document("file:///crab.py", text, 1, vocab_of(tiny_fim)).prompt(cursor)
        assert req.key == "file:///crab.py" + FIM_SESSION and req.fim
        assert req.prompt == [tiny_fim.bos, 7, *suffix, 6, *prefix[1:], 8]
        run(e, req)
        fed = []
        for i, ch in enumerate("y = 1"):  # typing at the cursor
            text = text[: cursor + i] + ch + text[cursor + i :]
            run(e, request(e, text, offset=cursor + i + 1))
            fed.append(e.stats[req.key].fed_last)
        assert max(fed) <= 4, fed  # the changed tokens at the end of the prefix, and <MID>
        off = request(e, text, replace(SLOW, fim=False), offset=cursor)
        assert off.key == "file:///crab.py" and not off.fim
    finally:
        e.stop()


def test_models_without_fim_tokens_use_the_prefix(engine: Engine, tiny: Model) -> None:
    assert tiny.fim is None
    req = request(engine, TEXT)
    doc = Document("file:///crab.py", TEXT, 1, vocab_of(tiny))
    assert req.key == "file:///crab.py" and not req.fim and req.prompt == doc.prompt()[0]


# -- end to end: the real server over stdio, default model ---------------------------------------
SERVER = [sys.executable, "-m", "lsp_llm", "--threads", "2"]


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def client(lsp_client: LanguageClient):
    caps = client_capabilities("visual-studio-code")  # UTF-16 positions
    await lsp_client.initialize_session(t.InitializeParams(
        capabilities=caps, initialization_options={"inlineBudgetMs": 60000, "inlineLines": 3}))
    yield
    await lsp_client.shutdown_session()


async def ghost(client: LanguageClient, uri: str, line: int, col: int) -> list[t.InlineCompletionItem]:
    res = await client.text_document_inline_completion_async(t.InlineCompletionParams(
        context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Automatic),
        text_document=t.TextDocumentIdentifier(uri=uri), position=t.Position(line, col)))
    assert isinstance(res, t.InlineCompletionList)
    return res.items


async def test_ghost_text_end_to_end(client: LanguageClient) -> None:
    uri = "file:///tmp/lines.py"
    call = "print('Zoë 🦀', "  # 19 bytes, 16 UTF-16 units
    text = FUNCTION + "\n\n" + call + ")\n"
    client.text_document_did_open(t.DidOpenTextDocumentParams(
        t.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))
    items = await ghost(client, uri, 5, 4)
    assert len(items) == 1 and "\n" in items[0].insert_text, items  # several lines
    assert items[0].range == t.Range(t.Position(5, 4), t.Position(5, 4))
    # type-through: typing what it shows answers the rest, with no engine job
    shown = items[0].insert_text
    engine_made = (await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="lsp-llm.stats", arguments=[uri])))["inline"]
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=2),
        content_changes=[t.TextDocumentContentChangePartial(
            range=t.Range(t.Position(5, 4), t.Position(5, 4)), text=shown[:3])]))
    items = await ghost(client, uri, 5, 7)
    assert [it.insert_text for it in items] == [shown[3:]]
    st = await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="lsp-llm.stats", arguments=[uri]))
    assert st["inline"]["type_through"] == 1
    # no engine job answered it: an engine answer replaces the request's stats (time, calls, tokens fed)
    assert {k: v for k, v in st["inline"].items() if not k.startswith("type_through")} == \
        {k: v for k, v in engine_made.items() if not k.startswith("type_through")}
    assert (await client.workspace_execute_command_async(
        t.ExecuteCommandParams(command="lsp-llm.stats")))["fim"] is False  # Gemma 3 declares no FIM tokens
    # before a closing bracket, in UTF-16 units
    col = len(call.encode("utf-16-le")) // 2
    assert col == 16 and len(call.encode()) == 19
    items = await ghost(client, uri, 7, col)
    assert items and items[0].range.start == t.Position(7, col)
    assert items[0].range.end in (t.Position(7, col), t.Position(7, col + 1))  # the ")" if it repeats it


def test_idle_work_prepares_more_and_yields_when_told(engine: Engine) -> None:
    short = request(engine, TEXT, replace(SLOW, inline_tokens=8))
    run(engine, short)
    task = extend_task(engine, short, more_lines=4)
    with pytest.raises(Cancelled):  # preempted before its first decode: tried again later
        engine.submit(lambda: task(lambda: True)).result()
    engine.submit(lambda: task(lambda: False)).result()
    longer = run(engine, request(engine, TEXT, replace(SLOW, inline_tokens=16)))
    assert longer.stats.tokens == 16 and longer.stats.decode_calls == 0  # all from the memo


def test_after_accepting_a_suggestion_the_next_one_was_prepared(gemma_engines: tuple[Engine, Engine]) -> None:
    engine, fresh = gemma_engines
    s = replace(SLOW, inline_lines=1, inline_tokens=32)
    req = request(engine, FUNCTION, s)
    shown = run(engine, req)  # "with open(path) as f:" (one line)
    engine.submit(lambda: extend_task(engine, req, more_lines=2)(lambda: False)).result()  # idle time
    accepted = FUNCTION + shown.text
    after = run(engine, request(engine, accepted, s))
    assert after.text.startswith("\n") and after.stats.memo_steps > 0 and after.stats.decode_calls <= 1, after
    assert run(fresh, request(fresh, accepted, s)) == after


def test_ghost_text_settings_are_validated() -> None:
    s, errors = Settings().update({"inline": False, "inlineLines": 2, "inlineTokens": 32, "inlineBudgetMs": 0,
                                   "inlineStop": ["#"], "fim": False, "fimLines": 3})
    assert errors == [] and (s.inline, s.inline_lines, s.inline_tokens, s.inline_budget_ms) == (False, 2, 32, 0)
    assert (s.inline_stop, s.fim, s.fim_lines) == (("#",), False, 3)
    _, errors = Settings().update({"inline": "yes", "inlineLines": 0, "inlineStop": "#", "fimLines": -1})
    assert len(errors) == 4
