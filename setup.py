from setuptools import setup

setup(
    name="securechatd",
    version="0.1.0",
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
    install_requires=["twisted[tls]>=24.7", "bcrypt>=4.1", "cryptography>=42"],
    extras_require={"test": ["hypothesis>=6"]},
    entry_points={
        "console_scripts": [
            "securechatd-admin = securechatd.admin:main",
            "securechat = securechatd.client.main:main",
        ],
    },
)
