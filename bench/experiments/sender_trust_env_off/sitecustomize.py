# Experiment only (not product code): the sender's session with trust_env=False (no per-request scan of the
# environment for proxies / REQUESTS_CA_BUNDLE / netrc).
try:
    from forwarder.delivery import sender
except Exception:
    sender = None
if sender is not None:
    _orig = sender._session
    def _session(concurrency):
        s = _orig(concurrency)
        s.trust_env = False
        return s
    sender._session = _session
