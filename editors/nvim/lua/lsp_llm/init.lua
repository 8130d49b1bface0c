-- lsp-llm Neovim plugin (Neovim 0.11+).
--
--   require('lsp_llm').setup {
--     settings = { items = 5, lineTokens = 12 },   -- server settings, see README
--   }
--
-- setup() registers the `lsp_llm` config (lsp/lsp_llm.lua) with vim.lsp.config, enables it,
-- and, when the client attaches, turns on vim.lsp.completion with autotrigger for it (the
-- popup menu items) and ghost text (lsp_llm.inline: textDocument/inlineCompletion).
local M = {}
local inline = require('lsp_llm.inline')

---@class lsp_llm.Options
M.defaults = {
  --- Command to start the server; nil = `lsp-llm` on $PATH, else `python3 -m lsp_llm`.
  ---@type string[]|nil
  cmd = nil,
  --- Filetypes to attach to; nil = every file buffer.
  ---@type string[]|nil
  filetypes = nil,
  --- Server settings: model, nCtx, threads, maxSessions, items, lineTokens, logLevel.
  settings = {},
  --- Show completions as you type (vim.lsp.completion autotrigger).
  autotrigger = true,
  --- Also trigger on identifier characters (not only the server's triggerCharacters).
  trigger_on_word = true,
  --- Buffer-local 'completeopt' for attached buffers (false = leave it alone).
  --- `noinsert` keeps the menu from inserting text while you type.
  completeopt = 'menu,menuone,noinsert,popup',
  --- Call vim.lsp.enable('lsp_llm').
  enable = true,
  --- Completion items in the popup menu (vim.lsp.completion); false: ghost text only.
  popup = true,
  --- Ghost text (see lua/lsp_llm/inline.lua for every option); false: popup items only.
  ---@type lsp_llm.InlineOptions|false
  inline = {},
}

local WORD_CHARS = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_'

local function add_word_triggers(client)
  local cp = client.server_capabilities and client.server_capabilities.completionProvider
  if not cp then
    return
  end
  local have = {}
  cp.triggerCharacters = cp.triggerCharacters or {}
  for _, c in ipairs(cp.triggerCharacters) do
    have[c] = true
  end
  for c in WORD_CHARS:gmatch('.') do
    if not have[c] then
      table.insert(cp.triggerCharacters, c)
    end
  end
end

--- Client(s) of lsp-llm for a buffer (0 = current).
function M.clients(bufnr)
  return vim.lsp.get_clients({ name = 'lsp_llm', bufnr = bufnr })
end

--- Ask the server for `lsp-llm.stats` (for the buffer's document, or all with `all = true`).
function M.stats(bufnr, all)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  local client = M.clients(bufnr)[1]
  if not client then
    return nil, 'lsp-llm is not attached to this buffer'
  end
  local args = (not all) and { vim.uri_from_bufnr(bufnr) } or nil
  local resp = client:request_sync('workspace/executeCommand', { command = 'lsp-llm.stats', arguments = args }, 5000, bufnr)
  if not resp then
    return nil, 'timeout'
  end
  if resp.err then
    return nil, resp.err.message
  end
  return resp.result
end

--- Send new settings to running clients (workspace/didChangeConfiguration).
function M.update_settings(settings)
  M.options = M.options or vim.deepcopy(M.defaults)
  M.options.settings = vim.tbl_deep_extend('force', M.options.settings or {}, settings or {})
  vim.lsp.config('lsp_llm', { init_options = M.options.settings, settings = { ['lsp-llm'] = M.options.settings } })
  for _, client in ipairs(vim.lsp.get_clients({ name = 'lsp_llm' })) do
    client.settings = { ['lsp-llm'] = M.options.settings }
    client:notify('workspace/didChangeConfiguration', { settings = client.settings })
  end
end

--- Stop running lsp-llm clients and start them again for their buffers.
function M.restart()
  local clients = vim.lsp.get_clients({ name = 'lsp_llm' })
  for _, client in ipairs(clients) do
    client:stop()
  end
  local tries = 0
  local timer = assert(vim.uv.new_timer())
  timer:start(100, 100, vim.schedule_wrap(function()
    tries = tries + 1
    local alive = vim.iter(clients):any(function(c) return not c:is_stopped() end)
    if alive and tries < 50 then
      return
    end
    timer:stop()
    timer:close()
    for _, c in ipairs(clients) do
      if not c:is_stopped() then
        c:stop(true)
      end
    end
    vim.cmd.doautoall('nvim.lsp.enable FileType')
  end))
end

---@param opts? lsp_llm.Options
function M.setup(opts)
  opts = vim.tbl_deep_extend('force', vim.deepcopy(M.defaults), opts or {})
  M.options = opts
  if opts.inline == false then
    inline.setup({ enabled = false })
  else
    inline.setup(opts.inline)
  end

  local cfg = {
    init_options = next(opts.settings) and opts.settings or vim.empty_dict(),
    settings = { ['lsp-llm'] = next(opts.settings) and opts.settings or vim.empty_dict() },
  }
  if opts.cmd then
    cfg.cmd = opts.cmd
  end
  if opts.filetypes then
    cfg.filetypes = opts.filetypes
  end
  vim.lsp.config('lsp_llm', cfg)

  local group = vim.api.nvim_create_augroup('lsp_llm', { clear = true })
  vim.api.nvim_create_autocmd('LspAttach', {
    group = group,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if not client or client.name ~= 'lsp_llm' then
        return
      end
      if opts.popup then
        if opts.autotrigger and opts.trigger_on_word then
          add_word_triggers(client)
        end
        if opts.completeopt then
          vim.bo[args.buf].completeopt = opts.completeopt
        end
        vim.lsp.completion.enable(true, client.id, args.buf, { autotrigger = opts.autotrigger })
      end
      inline.attach(args.buf)
    end,
  })

  vim.api.nvim_create_user_command('LspLlmStats', function(a)
    local res, err = M.stats(0, a.bang)
    if not res then
      vim.notify('lsp-llm: ' .. tostring(err), vim.log.levels.WARN)
    else
      vim.print(res)
    end
  end, { bang = true, desc = 'lsp-llm: show stats for this buffer (! = all documents)' })
  vim.api.nvim_create_user_command('LspLlmRestart', M.restart, { desc = 'lsp-llm: restart the server' })
  vim.api.nvim_create_user_command('LspLlmGhost', function(a)
    inline.enable(a.args ~= 'off')
  end, { nargs = '?', complete = function() return { 'on', 'off' } end, desc = 'lsp-llm: ghost text on/off' })

  if opts.enable then
    vim.lsp.enable('lsp_llm')
  end
  return M
end

return M
