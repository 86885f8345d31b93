"""trial tests for securechatd, one module per module of the package."""
