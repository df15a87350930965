"""``python -m sip`` is the ``sip`` command."""

from sip.cli import app

app(prog_name="sip")
