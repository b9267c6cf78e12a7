"""nodejob: reattachable background jobs for node-graph workflows."""

__version__ = "0.1.0"
