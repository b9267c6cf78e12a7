"""``python -m nodejob`` is the ``nodejob`` command."""

from nodejob.cli import main

raise SystemExit(main())
