"""``python -m forwarder``: the same as the ``turret-forwarder`` command."""

from forwarder.cli import main

raise SystemExit(main())
