"""One controller per step that runs work: it owns its job (started on the window's runner), the
job's events, and its page's widget states. The main window only navigates and holds the session."""
