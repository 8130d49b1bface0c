"""The editor READMEs' quick starts, as written: their configuration snippets, taken verbatim from
the README (only /path/to/lsp-llm and ~/.emacs.d/lisp replaced by this checkout), start the server
found on $PATH the way a newcomer's installed `lsp-llm` would be, and ghost text appears.
(The install command itself, `pip install ./lsp-llm`, builds llama-cpp-python: not run here.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

from editor_helpers import EDITORS, GHOST_AFTER, REPO, TYPED, server_cmd
from test_emacs import emacs_binary
from test_nvim import Nvim, nvim_binary


def readme_block(readme: Path, after: str, lang: str) -> str:
    """The first ```lang block after the line containing `after`."""
    text = readme.read_text()
    start = text.index(after)
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert m, f"no {lang} block after {after!r} in {readme}"
    return m.group(1)


def user_env(tmp_path: Path) -> dict[str, str]:
    """A newcomer's environment: `lsp-llm` on $PATH, a clean home."""
    script = Path(server_cmd()[0])
    assert script.name == "lsp-llm", "the quick starts need the lsp-llm console script (pip install)"
    return dict(
        os.environ,
        PATH=f"{script.parent}{os.pathsep}{os.environ['PATH']}",
        HOME=str(tmp_path),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_STATE_HOME=str(tmp_path / "state"),
        XDG_DATA_HOME=str(tmp_path / "data"),
        XDG_CACHE_HOME=os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")),  # the model cache
    )


def test_install_commands_are_from_a_checkout():
    for editor in ("vscode", "nvim", "emacs"):
        text = (EDITORS / editor / "README.md").read_text()
        assert "pip install ./lsp-llm" in text, editor
        assert not re.search(r"pip install lsp-llm\b", text), f"{editor}: lsp-llm is not on PyPI"


def test_nvim_minimal_init_from_readme(sample_project: Path, tmp_path: Path):
    init = readme_block(EDITORS / "nvim" / "README.md", "Minimal `init.lua`", "lua")
    init = init.replace("/path/to/lsp-llm", str(REPO))
    assert str(REPO) in init
    (tmp_path / "init.lua").write_text(init + "\nfunction _G.T_eval(hex)\n" + T_EVAL)
    sock = tmp_path / "nvim.sock"
    exe = nvim_binary()
    proc = subprocess.Popen(
        [exe, "--clean", "-u", str(tmp_path / "init.lua"), "--headless", "--listen", str(sock),
         str(sample_project / "hello.py")],
        cwd=sample_project, env=user_env(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "nvim did not start"
            time.sleep(0.05)
        nvim = Nvim(exe, sock, proc)
        cmd = nvim.wait(
            "local c = vim.lsp.get_clients({ name = 'lsp_llm', bufnr = 0 })[1];"
            "return c and c.initialized and c.config.cmd or false",
            timeout=60, what="the lsp_llm client",
        )
        assert cmd == ["lsp-llm"]  # found on $PATH, as installed
        nvim.send(f"{GHOST_AFTER}Go")
        for ch in TYPED:
            time.sleep(0.15)
            nvim.send(ch)
        ghost = nvim.wait(
            "local g = require('lsp_llm.inline').get(0); return g and { done = true, text = g.text } or false",
            60, "ghost text",
        )
        assert ghost["text"].strip()
    finally:
        proc.kill()
        proc.wait()


T_EVAL = """  local code = hex:gsub('..', function(h) return string.char(tonumber(h, 16)) end)
  local ok, res = pcall(assert(loadstring(code)))
  if not ok then
    res = tostring(res)
  end
  return vim.json.encode({ ok = ok, value = res })
end
"""


def test_emacs_init_from_readme(sample_project: Path, tmp_path: Path):
    exe = emacs_binary()
    readme = EDITORS / "emacs" / "README.md"
    init = readme_block(readme, "3. In your init file", "elisp")
    # Step 2: copy lsp-llm.el to ~/.emacs.d/lisp/.
    lisp = tmp_path / ".emacs.d" / "lisp"
    lisp.mkdir(parents=True)
    (lisp / "lsp-llm.el").write_text((EDITORS / "emacs" / "lsp-llm.el").read_text())
    (tmp_path / ".emacs.d" / "init.el").write_text(init)
    out = tmp_path / "out.json"
    # Step 4 (M-x lsp-llm-eglot) and 5 (type), then wait for the ghost text. Batch Emacs is never
    # idle: its idle timers run as ordinary timers.
    script = f"""
(progn
  (load (expand-file-name "~/.emacs.d/init.el"))
  (advice-add 'run-with-idle-timer :override #'run-with-timer)
  (find-file {json.dumps(str(sample_project / "hello.py"))})
  (call-interactively #'lsp-llm-eglot)
  (let ((deadline (+ (float-time) 120)))
    (while (and (not (eglot-current-server)) (< (float-time) deadline)) (accept-process-output nil 0.1)))
  (goto-char (point-min)) (forward-line {GHOST_AFTER - 1}) (execute-kbd-macro (kbd "C-e RET"))
  (dolist (ch (string-to-list {json.dumps(TYPED)})) (execute-kbd-macro (vector ch)) (sit-for 0.1))
  (let ((deadline (+ (float-time) 60)))
    (while (and (not lsp-llm--ghost) (< (float-time) deadline)) (accept-process-output nil 0.1)))
  (let ((res (json-encode (list :command (lsp-llm-command) :ghost (plist-get lsp-llm--ghost :text)))))
    (with-temp-file {json.dumps(str(out))} (insert res)))
  (kill-emacs 0))"""
    env = user_env(tmp_path)
    proc = subprocess.run([exe, "--batch", "--eval", script], cwd=sample_project, env=env, capture_output=True,
                          text=True, timeout=300)
    print(proc.stderr[-3000:])
    assert out.exists(), proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert Path(res["command"][0]).name == "lsp-llm"  # found on exec-path, as installed
    assert res["ghost"] and res["ghost"].strip(), res
