"""The `coordinator` CLI's verbs, one module per group; `coordinator.cli` assembles them into one click group."""
