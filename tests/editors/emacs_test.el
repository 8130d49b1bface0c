;;; emacs_test.el --- drive eglot + OUR editors/emacs/lsp-llm.el in batch mode  -*- lexical-binding: t; -*-
;; Run: emacs --batch -l emacs_test.el   with env LSP_LLM_REPO, LSP_LLM_CMD (JSON list),
;; LSP_LLM_FILE (file to edit), LSP_LLM_TYPED, LSP_LLM_EXPECTED, LSP_LLM_OUT (JSON result file).
(require 'json)
(require 'cl-lib)


(defvar t-result (make-hash-table :test #'equal))
(defun t-put (k v) (puthash k v t-result))
(defun t-log (fmt &rest args) (princ (concat (apply #'format fmt args) "\n") #'external-debugging-output))
(defun t-write ()
  (with-temp-file (getenv "LSP_LLM_OUT")
    (insert (json-encode t-result))))
(defun t-wait (pred timeout what)
  (let ((deadline (+ (float-time) timeout)))
    (while (and (not (funcall pred)) (< (float-time) deadline))
      (accept-process-output nil 0.05))
    (unless (funcall pred) (error "timed out after %ss waiting for %s" timeout what))))

(condition-case err
    (progn
      (add-to-list 'load-path (expand-file-name "editors/emacs" (getenv "LSP_LLM_REPO")))
      (require 'eglot)
      (require 'lsp-llm)
      (t-put "emacs" emacs-version)
      (t-put "eglot" (file-name-directory (locate-library "eglot")))
      ;; The user's configuration: where the server is, and a setting.
      (setq lsp-llm-server-command (append (json-read-from-string (getenv "LSP_LLM_CMD")) nil)
            lsp-llm-items 5
            lsp-llm-log-level "info"
            eglot-sync-connect 120
            eglot-connect-timeout 300)
      (t-put "registered" (and (assoc lsp-llm-modes eglot-server-programs) t))

      (find-file (getenv "LSP_LLM_FILE"))
      (t-put "major_mode" (symbol-name major-mode))
      ;; python-mode has its own servers in eglot-server-programs: start lsp-llm explicitly.
      (let ((t0 (float-time)))
        (lsp-llm-eglot)
        (t-wait (lambda () (and (eglot-current-server)
                                (jsonrpc-running-p (eglot-current-server))))
                120 "eglot to connect")
        (t-put "connect_s" (- (float-time) t0)))
      (let ((server (eglot-current-server)))
        (t-put "server_name" (plist-get (eglot--server-info server) :name))
        (t-put "init_options" (eglot-initialization-options server))
        (t-put "managed" (and eglot--managed-mode t)))

      ;; A user-like edit: end of line 6, RET (electric indent), type the prefix key by key.
      (goto-char (point-min))
      (forward-line 5)
      (execute-kbd-macro (kbd "C-e RET"))
      (dolist (ch (string-to-list (getenv "LSP_LLM_TYPED")))
        (execute-kbd-macro (vector ch))
        (sit-for 0.1))
      (t-put "line_before" (buffer-substring-no-properties (line-beginning-position) (line-end-position)))
      ;; Let eglot's idle timer send the didChange (the completion request would flush it anyway).
      (sit-for 1.0)

      ;; completion-at-point, with a completion-in-region UI that picks the way a user would:
      ;; the expected word if offered, else the best-ranked word longer than what was typed.
      (let* ((expected (getenv "LSP_LLM_EXPECTED"))
             (typed (getenv "LSP_LLM_TYPED"))
             (t0 (float-time))
             (completion-in-region-function
              (lambda (start end collection predicate)
                (let* ((input (buffer-substring-no-properties start end))
                       (md (completion-metadata input collection predicate))
                       (sort-fn (completion-metadata-get md 'display-sort-function))
                       (all (completion-all-completions input collection predicate (- end start) md))
                       (last (last all)))
                  (when (consp last) (setcdr last nil))
                  (when sort-fn (setq all (funcall sort-fn all)))
                  (t-put "capf_s" (- (float-time) t0))
                  (t-put "input" input)
                  (t-put "candidates" (mapcar #'substring-no-properties all))
                  (t-put "details" (mapcar (lambda (c) (plist-get (get-text-property 0 'eglot--lsp-item c) :detail)) all))
                  (let ((choice (or (cl-find expected all :test #'string=)
                                    (cl-find-if (lambda (c) (and (> (length c) (length typed))
                                                                 (string-match-p "\\`[[:alnum:]_]+\\'" c)))
                                                all))))
                    (when choice
                      (t-put "chosen" (substring-no-properties choice))
                      ;; what completion-in-region UIs (corfu, company, minibuffer) do:
                      (completion--replace start end choice)
                      (let ((exit (plist-get completion-extra-properties :exit-function)))
                        (when exit (funcall exit choice 'finished))))
                    t)))))
        (completion-at-point))
      (t-put "line_after" (buffer-substring-no-properties (line-beginning-position) (line-end-position)))
      (t-put "buffer" (buffer-substring-no-properties (point-min) (point-max)))
      ;; Our stats command through the same connection.
      (t-put "stats" (lsp-llm-stats))
      (t-put "ok" t))
  (error
   (t-put "ok" :json-false)
   (t-put "error" (error-message-string err))
   (t-log "ERROR: %S" err)))

(ignore-errors
  (with-current-buffer (jsonrpc-stderr-buffer (eglot-current-server))
    (t-put "stderr" (buffer-string))))
(ignore-errors (t-put "events_tail" (with-current-buffer (jsonrpc-events-buffer (eglot-current-server))
                                      (buffer-substring-no-properties (max (point-min) (- (point-max) 4000)) (point-max)))))
(t-write)
(ignore-errors (let ((eglot-autoshutdown t)) (eglot-shutdown (eglot-current-server) nil 5)))
(kill-emacs 0)
