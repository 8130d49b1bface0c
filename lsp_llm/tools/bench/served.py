"""The bench's sections on a served engine (``--remote``: remote.py, ``--team``:
team.py): their options, their runs, their Markdown, and their own blocks in
docs/benchmarks.md (between their markers, apart from the main block, so a
run of these sections alone leaves the rest as it was) and docs/team.png.

    lsp-llm bench --remote --team --readme docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path
from typing import Any

from . import remote, team

SECTIONS = ("remote", "team")
MARKERS = {"remote": ("<!-- bench-remote:start -->", "<!-- bench-remote:end -->"),
           "team": ("<!-- bench-team:start -->", "<!-- bench-team:end -->")}
TEAM_PNG = "team.png"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--remote", action="store_true",
                   help="remote engines at a typing pace: lsp-llm on llama-server (xllamacpp, loopback), "
                   "llama.vscode-style requests to it, lsp-llm in-process (alone, unless another section is given)")
    p.add_argument("--team", action="store_true",
                   help="N typists, each through its own lsp-llm, on one llama-server with N slots (alone, unless "
                   "another section is given)")
    p.add_argument("--remote-doc-tokens", type=int, help="tokens before the cursor in the --remote traces")
    p.add_argument("--remote-keystrokes", type=int, help="keystrokes in each --remote trace")
    p.add_argument("--team-sizes", help="comma-separated numbers of typists (default 1,2,4; quick 1,2)")
    p.add_argument("--team-doc-tokens", type=int, help="tokens before each typist's cursor")
    p.add_argument("--team-keystrokes", type=int, help="keystrokes of each typist")


def chosen(args: argparse.Namespace) -> set[str]:
    return {name for name in SECTIONS if getattr(args, name, False)}


def config(args: argparse.Namespace) -> dict[str, Any]:
    preset = {**(remote.QUICK if args.quick else remote.FULL), **(team.QUICK if args.quick else team.FULL)}
    cfg = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in preset.items()}
    if isinstance(cfg["team_sizes"], str):
        cfg["team_sizes"] = [int(x) for x in cfg["team_sizes"].split(",") if x]
    return cfg


def run(setup: Any, sections: set[str], log: Any) -> dict[str, Any]:
    """The chosen sections' results (setup: the bench's Setup)."""
    args = setup.args
    cfg = config(args)
    settings = setup.settings(args.n_ctx or 4096)
    out: dict[str, Any] = {}
    if "remote" in sections:
        log(f"lsp-llm bench: remote engines at a typing pace on {setup.files[0].name} (seed {args.seed})")
        out["remote"] = remote.run_section(settings, setup.files, cfg, args.seed, setup.vocab.count, setup.out)
        for s in out["remote"]["summaries"]:
            log(f"  {s['trace']:>24} {s['engine']:>24}: {s['status']} p50 {s['p50_ms']:.1f} p90 {s['p90_ms']:.1f} "
                f"p99 {s['p99_ms']:.1f} ms, tokens/key p50 {s['tokens_p50']}")
    if "team" in sections:
        log(f"lsp-llm bench: a team of {', '.join(map(str, cfg['team_sizes']))} typists on one llama-server")
        out["team"] = team.run_section(settings, setup.files, cfg, args.seed, setup.vocab.count, setup.out)
        for r in out["team"]["rows"]:
            log(f"  team of {r['typists']}: {r['status']} p50 {r['p50_ms']:.1f} p90 {r['p90_ms']:.1f} "
                f"p99 {r['p99_ms']:.1f} ms, prompt tokens/key {r['prompt_per_key']:.2f}")
    return out


def markdown(results: dict[str, Any], team_png: bool) -> list[str]:
    out = remote.markdown(results["remote"]) if results.get("remote") else []
    out += team.markdown(results["team"], TEAM_PNG if team_png else None) if results.get("team") else []
    return out


def plot(results: dict[str, Any], out: Path) -> Path | None:
    if not results.get("team"):
        return None
    m = results.get("model", {})
    return team.plot(results["team"], out / TEAM_PNG, f"a team on one llama-server: {m.get('name', '?')}, "
                     f"{results.get('settings', {}).get('threads', '?')} threads per server")


def failed(results: dict[str, Any]) -> bool:
    """Whether a run of these sections broke (unavailable is not a failure)."""
    runs = (results.get("remote") or {}).get("runs", []) + (results.get("team") or {}).get("rows", [])
    return any(r["status"] == "error" for r in runs)


def update_readme(readme: Path, results: dict[str, Any], png: Path | None) -> str:
    """Each section's block in readme, and the plot beside it (docs/team.png)."""
    text = readme.read_text()
    done = []
    for name in SECTIONS:
        if not results.get(name):
            continue
        body = "\n".join(remote.markdown(results[name]) if name == "remote" else
                         team.markdown(results[name], TEAM_PNG if png else None))
        new = replace_block(text, MARKERS[name], body, f"lsp-llm bench --remote --team --readme {_shown(readme)}")
        if new is None:
            return f"{readme} has no {' ... '.join(MARKERS[name])} markers; left unchanged"
        text = new
        done.append(name)
    readme.write_text(text)
    copied = ""
    if png is not None and png.exists():
        in_docs = readme.resolve().parent.name == "docs"
        target = readme.parent / TEAM_PNG if in_docs else readme.parent / "docs" / TEAM_PNG
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, target)
        copied = f" and {target}"
    return f"updated the {', '.join(done)} block(s) of {readme}{copied}"


def _shown(path: Path) -> str:
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.name


def replace_block(text: str, markers: tuple[str, str], body: str, command: str) -> str | None:
    start, end = markers
    if start not in text or end not in text:
        return None
    block = f"{start}\n<!-- generated by `{command}`; do not edit by hand -->\n\n{body}\n{end}"
    return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
