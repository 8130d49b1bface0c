;;; lsp-llm.el --- Local-LLM code completion through the lsp-llm language server  -*- lexical-binding: t; -*-

;; Version: 0.1.0
;; Package-Requires: ((emacs "28.1"))
;; Keywords: languages, tools, completion
;; URL: https://github.com/lsp-llm/lsp-llm

;;; Commentary:

;; lsp-llm is a language server that completes code with a small local LLM.
;; This file connects it to Emacs:
;;
;; * eglot (built into Emacs 29+, `elpa-eglot' on Debian's Emacs 28):
;;   `lsp-llm' is registered in `eglot-server-programs' for `lsp-llm-modes'
;;   (appended, so a language's own server keeps priority unless
;;   `lsp-llm-eglot-prefer' is non-nil).  M-x lsp-llm-eglot starts it for the
;;   current buffer whatever else is registered.  eglot manages a buffer with
;;   ONE server; see the README for running it beside pylsp & co.
;;
;; * lsp-mode: a client with `:add-on? t' is registered once lsp-mode is
;;   loaded, so lsp-llm runs beside pyright/pylsp/... in the same buffer.
;;
;; Completions arrive through `completion-at-point' (and so company/corfu).
;;
;; Settings (`lsp-llm-model', `lsp-llm-items', ...) are sent as
;; initializationOptions, and again with M-x lsp-llm-send-settings.

;;; Code:

(require 'cl-lib)
(require 'subr-x)

(defgroup lsp-llm nil
  "Code completion from a local LLM (lsp-llm language server)."
  :group 'tools
  :prefix "lsp-llm-")

(defcustom lsp-llm-server-command nil
  "Command (a list of strings) that starts the lsp-llm server on stdio.
nil means: `lsp-llm' on `exec-path', else \"python3 -m lsp_llm\"."
  :type '(choice (const :tag "Automatic" nil) (repeat string)))

(defcustom lsp-llm-modes '(prog-mode text-mode conf-mode)
  "Major modes (and modes derived from them) that lsp-llm serves."
  :type '(repeat symbol))

(defcustom lsp-llm-eglot-prefer nil
  "Non-nil: put lsp-llm first in `eglot-server-programs'.
Then `eglot' starts lsp-llm (instead of the language's own server) in
`lsp-llm-modes'.  nil: lsp-llm is appended and only used where no
other server is registered, or through \\[lsp-llm-eglot]."
  :type 'boolean)

(defcustom lsp-llm-model nil
  "Path of a GGUF model file; nil uses the server's default model."
  :type '(choice (const :tag "Default model" nil) file))

(defcustom lsp-llm-n-ctx nil
  "Context size in tokens (server default 4096)."
  :type '(choice (const :tag "Default" nil) integer))

(defcustom lsp-llm-threads nil
  "Number of CPU threads for the model (server default: automatic)."
  :type '(choice (const :tag "Default" nil) integer))

(defcustom lsp-llm-max-sessions nil
  "Documents kept live in the model at once (server default 4)."
  :type '(choice (const :tag "Default" nil) integer))

(defcustom lsp-llm-items nil
  "Number of word completion items (server default 5)."
  :type '(choice (const :tag "Default" nil) integer))

(defcustom lsp-llm-line-tokens nil
  "Maximum tokens of the complete-to-end-of-line item (server default 24)."
  :type '(choice (const :tag "Default" nil) integer))

(defcustom lsp-llm-log-level nil
  "Server log level: \"debug\", \"info\", \"warning\" or \"error\"."
  :type '(choice (const :tag "Default" nil)
                 (const "debug") (const "info") (const "warning") (const "error")))

(defun lsp-llm-command ()
  "The command list that starts the server."
  (or lsp-llm-server-command
      (if-let ((exe (executable-find "lsp-llm")))
          (list exe)
        (list (or (executable-find "python3") "python3") "-m" "lsp_llm"))))

(defun lsp-llm-settings ()
  "Server settings as a plist with the server's camelCase keys.
Settings left at nil (server default) are left out."
  (let (plist)
    (dolist (pair `((:model . ,lsp-llm-model)
                    (:nCtx . ,lsp-llm-n-ctx)
                    (:threads . ,lsp-llm-threads)
                    (:maxSessions . ,lsp-llm-max-sessions)
                    (:items . ,lsp-llm-items)
                    (:lineTokens . ,lsp-llm-line-tokens)
                    (:logLevel . ,lsp-llm-log-level)))
      (when (cdr pair)
        (setq plist (append plist (list (car pair)
                                        (if (eq (car pair) :model)
                                            (expand-file-name (cdr pair))
                                          (cdr pair)))))))
    plist))

(defun lsp-llm--settings-hash ()
  "`lsp-llm-settings' as a hash table (encodes as {} when empty)."
  (let ((h (make-hash-table :test #'equal)))
    (cl-loop for (k v) on (lsp-llm-settings) by #'cddr
             do (puthash (substring (symbol-name k) 1) v h))
    h))

;;;; eglot

(declare-function eglot-current-server "eglot")
(declare-function eglot--current-server-or-lose "eglot")
(declare-function jsonrpc-notify "jsonrpc")
(declare-function jsonrpc-request "jsonrpc")
(declare-function eglot "eglot")
(declare-function json-encode "json")
(defvar eglot-server-programs)

(defun lsp-llm-eglot-contact (&optional _interactive)
  "Contact for `eglot-server-programs': command plus initializationOptions."
  (append (lsp-llm-command)
          (list :initializationOptions (lsp-llm--settings-hash))))

(defun lsp-llm-eglot-entry ()
  "The `eglot-server-programs' entry for lsp-llm."
  (cons lsp-llm-modes #'lsp-llm-eglot-contact))

(defun lsp-llm-eglot-register ()
  "Register lsp-llm in `eglot-server-programs' (see `lsp-llm-eglot-prefer')."
  (setq eglot-server-programs
        (cl-remove-if (lambda (e) (eq (cdr-safe e) #'lsp-llm-eglot-contact))
                      eglot-server-programs))
  (if lsp-llm-eglot-prefer
      (push (lsp-llm-eglot-entry) eglot-server-programs)
    (setq eglot-server-programs
          (append eglot-server-programs (list (lsp-llm-eglot-entry))))))

;;;###autoload
(defun lsp-llm-eglot ()
  "Start (or reconnect) eglot with lsp-llm for the current buffer.
Works whatever other servers `eglot-server-programs' lists for this mode;
it replaces eglot's server for this major mode in this project."
  (interactive)
  (require 'eglot)
  (let ((eglot-server-programs
         (cons (cons major-mode #'lsp-llm-eglot-contact) eglot-server-programs))
        (current-prefix-arg nil))
    (call-interactively #'eglot)))

;;;###autoload
(defun lsp-llm-send-settings ()
  "Send the current lsp-llm settings to the running server(s).
eglot: workspace/didChangeConfiguration for this buffer's server.
lsp-mode: the lsp-llm workspaces."
  (interactive)
  (let ((settings (list :settings (list :lsp-llm (lsp-llm--settings-hash))))
        (sent nil))
    (when (and (featurep 'eglot) (eglot-current-server))
      (jsonrpc-notify (eglot-current-server) :workspace/didChangeConfiguration settings)
      (setq sent t))
    (when (and (featurep 'lsp-mode) (fboundp 'lsp-llm--lsp-mode-send-settings))
      (setq sent (or (lsp-llm--lsp-mode-send-settings settings) sent)))
    (message (if sent "lsp-llm: settings sent" "lsp-llm: no running server for this buffer"))))

;;;###autoload
(defun lsp-llm-stats (&optional all)
  "Show `lsp-llm.stats' for this buffer's document.
With prefix argument ALL, for every document."
  (interactive "P")
  (require 'eglot)
  (let* ((server (eglot--current-server-or-lose))
         (res (jsonrpc-request server :workspace/executeCommand
                               (list :command "lsp-llm.stats"
                                     :arguments (if all [] (vector (eglot--path-to-uri buffer-file-name)))))))
    (require 'json)
    (message "lsp-llm: %s" (json-encode res))
    res))

(declare-function eglot--path-to-uri "eglot")

(with-eval-after-load 'eglot
  (lsp-llm-eglot-register))

;;;; lsp-mode (add-on client: runs beside the language's own server)

(declare-function lsp-register-client "lsp-mode")
(declare-function make-lsp-client "lsp-mode")
(declare-function lsp-stdio-connection "lsp-mode")
(declare-function lsp-workspaces "lsp-mode")
(declare-function lsp--workspace-client "lsp-mode")
(declare-function lsp--client-server-id "lsp-mode")
(declare-function lsp--workspace-root "lsp-mode")
(declare-function lsp-notify "lsp-mode")
(defvar lsp--cur-workspace)

(defun lsp-llm--lsp-mode-activate-p (_file-name mode)
  "lsp-mode activation function: MODE derives from one of `lsp-llm-modes'."
  (cl-some (lambda (m) (provided-mode-derived-p mode m)) lsp-llm-modes))

(defun lsp-llm--lsp-mode-send-settings (settings)
  "Send SETTINGS (didChangeConfiguration params) to lsp-mode's lsp-llm workspaces."
  (let ((sent nil))
    (dolist (ws (and (bound-and-true-p lsp-mode) (lsp-workspaces)))
      (when (eq (lsp--client-server-id (lsp--workspace-client ws)) 'lsp-llm)
        (let ((lsp--cur-workspace ws))
          (lsp-notify "workspace/didChangeConfiguration" settings))
        (setq sent t)))
    sent))

(with-eval-after-load 'lsp-mode
  (lsp-register-client
   (make-lsp-client
    :new-connection (lsp-stdio-connection #'lsp-llm-command)
    :activation-fn #'lsp-llm--lsp-mode-activate-p
    :server-id 'lsp-llm
    :add-on? t
    :priority -5
    :initialization-options #'lsp-llm--settings-hash
    :initialized-fn (lambda (workspace)
                      (let ((lsp--cur-workspace workspace))
                        (lsp-notify "workspace/didChangeConfiguration"
                                    (list :settings (list :lsp-llm (lsp-llm--settings-hash)))))))))

(provide 'lsp-llm)
;;; lsp-llm.el ends here
