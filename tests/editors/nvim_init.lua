-- Test init for Neovim: OUR shipped plugin (editors/nvim) and nothing else.
-- Started as: nvim --clean -u tests/editors/nvim_init.lua --headless --listen SOCK FILE
local repo = assert(vim.env.LSP_LLM_REPO, 'LSP_LLM_REPO not set')
vim.opt.runtimepath:prepend(repo .. '/editors/nvim')
vim.opt.swapfile = false
vim.opt.shada = ''

-- The documented minimal setup (README), with the server command the test chose.
-- LSP_LLM_SETUP (JSON, optional): more setup options, e.g. {"popup": false}.
require('lsp_llm').setup(vim.tbl_deep_extend('force', {
  cmd = vim.json.decode((assert(vim.env.LSP_LLM_CMD, 'LSP_LLM_CMD not set'))),
  settings = { items = 5, logLevel = 'info' },
}, vim.json.decode(vim.env.LSP_LLM_SETUP or '{}')))

-- Test helper: evaluate hex-encoded Lua, return the result as JSON (for --remote-expr).
function _G.T_eval(hex)
  local code = hex:gsub('..', function(h) return string.char(tonumber(h, 16)) end)
  local ok, res = pcall(assert(loadstring(code)))
  if not ok then
    res = tostring(res)
  end
  return vim.json.encode({ ok = ok, value = res })
end
