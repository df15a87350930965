"""HTML reports of sip runs (``sip report``)."""
