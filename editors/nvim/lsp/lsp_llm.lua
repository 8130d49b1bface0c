-- lsp-llm: code completions from a local LLM, for Neovim 0.11+.
--
-- With this directory on 'runtimepath', `vim.lsp.enable('lsp_llm')` is all you need;
-- override anything with `vim.lsp.config('lsp_llm', { ... })`.
-- The plugin `require('lsp_llm').setup{}` does both and also turns on completion as you type.

--- The command that starts the server: `lsp-llm` on $PATH, else `python3 -m lsp_llm`
--- (set `cmd` yourself if it lives in a virtualenv that is not active).
local function default_cmd()
  if vim.fn.executable('lsp-llm') == 1 then
    return { 'lsp-llm' }
  end
  local venv = vim.env.VIRTUAL_ENV
  if venv and vim.fn.executable(venv .. '/bin/lsp-llm') == 1 then
    return { venv .. '/bin/lsp-llm' }
  end
  return { vim.fn.exepath('python3') ~= '' and vim.fn.exepath('python3') or 'python3', '-m', 'lsp_llm' }
end

---@type vim.lsp.Config
return {
  cmd = default_cmd(),
  -- No `filetypes`: attach to every buffer that is a file (the model is language-agnostic).
  root_markers = { '.git', 'pyproject.toml', 'package.json', 'Cargo.toml', 'go.mod' },
  -- Server settings (all optional): model, nCtx, threads, maxSessions, items, lineTokens, logLevel.
  -- Sent as initializationOptions, and as workspace/didChangeConfiguration {settings = {['lsp-llm'] = ...}}.
  init_options = vim.empty_dict(),
  settings = { ['lsp-llm'] = vim.empty_dict() },
}
