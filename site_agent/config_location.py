"""Where `site-agent` finds the site config: the environment variable and the default file name.

Kept apart from `site_agent.config` (pydantic models) so the command line can name its
``--config`` option without importing them.
"""

__all__ = ["CONFIG_ENV", "DEFAULT_CONFIG"]

CONFIG_ENV = "FEDIMG_SITE_CONFIG"
DEFAULT_CONFIG = "site.yaml"
