"""The `site-agent` verbs, one module per group; `site_agent.cli` assembles them into one command.

- `lifecycle`: ``init``, ``start``, ``stop``, ``status``, ``logs``, ``doctor`` (the node);
- `datasets`: ``dataset add|where|list|remove``, ``prepare``, ``deidentify`` (the site's data);
- `plans`: ``plans list|show|approve|reject`` (training-plan review);
- `artifacts`: ``artifacts list|show|approve|reject`` (executable artifacts, by sha256);
- `adapt`: ``adapt source|target``, ``infer`` (local domain adaptation);
- `common`: what they share (the site config of the invocation, the output console, progress bars).
"""
