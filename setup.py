import re

from setuptools import setup

with open("securechatd/__init__.py", encoding="utf-8") as package:
    VERSION = re.search(r'__version__ = "([^"]+)"', package.read()).group(1)

setup(
    name="securechatd",
    version=VERSION,
    description="A self-hosted secure chat daemon: AMP over TLS, SQLite, bcrypt.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=[
        "securechatd",
        "securechatd.server",
        "securechatd.store",
        "securechatd.client",
        "securechatd.e2ee",
        "twisted.plugins",
    ],
    package_data={"securechatd.store": ["schema/*/*.sql"]},  # the migrations, one folder per engine
    install_requires=["twisted[tls]>=24.7", "bcrypt>=4.1", "cryptography>=42", "urwid>=5.1", "segno>=1.6"],
    extras_require={"test": ["hypothesis>=6", "pyte>=0.8"]},
    entry_points={
        "console_scripts": [
            "securechatd-admin = securechatd.admin:main",
            "securechat = securechatd.client.main:main",
            "securechatd-verify = securechatd.verify:main",
            "securechatd-verify-log = securechatd.verify_log:main",
        ],
    },
)
