"""The hospital side of a fedimg federation: the `site-agent` command line (`site_agent.commands`),
the site config, the Fed-BioMed node and its runtimes, plan and artifact review, and local
domain adaptation."""
